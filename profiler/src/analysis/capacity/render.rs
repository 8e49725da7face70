//! `capacity`'s report for people: the assumptions first, then per profile and per VM, then
//! the measured ramp with what it can and cannot say.

use std::fmt::Write as _;

use super::{CapacityReport, Limit, RampVerdict};
use crate::{record::BusySource, text::clean};

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or_else(
        || "n/a".into(),
        |b| format!("{:.0}", b as f64 / (1u64 << 20) as f64),
    )
}

fn count(n: Option<u64>) -> String {
    n.map_or_else(|| "unbounded".into(), |n| n.to_string())
}

/// The report for people, assumptions first.
pub fn render_text(r: &CapacityReport) -> String {
    let mut out = String::new();
    let budget = (r.cores - r.reserve_cores).max(0.0) * r.target_util;
    let memory = match r.memory_bytes {
        Some(m) => format!(
            "{} of memory, {} kept for the host = {}",
            gib(m),
            gib(r.reserve_memory_bytes),
            gib(m.saturating_sub(r.reserve_memory_bytes))
        ),
        None => "the host's memory not recorded (--memory BYTES to plan for it)".into(),
    };
    let _ = writeln!(
        out,
        "assumptions: {} cores, {} kept for the host, VMs may use {:.0} % of the rest = \
         {budget:.2} cores; {memory}; cost = a VM's QEMU CPU and resident memory over its full \
         windows {} s after it started",
        r.cores,
        r.reserve_cores,
        r.target_util * 100.0,
        r.settle_seconds
    );
    let _ = writeln!(out, "\nper profile (median of its VMs):");
    let _ = writeln!(
        out,
        "  {:<20} {:>4} {:>10} {:>10} {:>9}  {:<22} {:>9}  fit (limit)",
        "profile", "VMs", "CPU % core", "events/s", "RSS MiB", "VMs/host by CPU", "by memory",
    );
    for p in &r.profiles {
        let by_cpu = match p.vms_per_host_range {
            Some((lo, hi)) if lo != hi => format!("{} ({lo}–{hi})", count(p.vms_per_host)),
            _ => count(p.vms_per_host),
        };
        let fits = match (p.fits, p.binding) {
            (Some(n), Some(Limit::Cpu)) => format!("{n} (CPU)"),
            (Some(n), Some(Limit::Memory)) => format!("{n} (memory)"),
            _ => "unbounded".into(),
        };
        let by_memory = p
            .vms_per_host_memory
            .map_or_else(|| "n/a".into(), |n| n.to_string());
        let _ = writeln!(
            out,
            "  {:<20} {:>4} {:>10.2} {:>10.1} {:>9}  {by_cpu:<22} {by_memory:>9}  {fits}",
            clean(&p.profile),
            p.vms,
            p.cpu_percent,
            p.events_per_second,
            mib(p.resident_bytes),
        );
        if let Some(n) = p.vms_per_host_memory_configured {
            let _ = writeln!(
                out,
                "  {:<20} if every guest touched all its configured RAM: {n} by memory",
                ""
            );
        }
    }
    let _ = writeln!(
        out,
        "  (range: the same budget at the profile's costliest and cheapest VM)"
    );
    let _ = writeln!(out, "\nper VM:");
    for v in &r.vms {
        let (name, pid, windows) = (clean(&v.name), v.pid, v.windows);
        let (cpu, events) = (v.cpu_percent, v.events_per_second);
        let split = v.cpu_by_role.map_or_else(String::new, |r| {
            format!(
                "  (vCPU {:.2}, device model {:.2}, other {:.2}; kernel workers {:.2})",
                r.vcpu, r.device_model, r.other, r.kernel_workers
            )
        });
        let _ = writeln!(
            out,
            "  {name:<24} pid {pid:<8} {windows:>3} windows  CPU {cpu:>6.2} % of a core  \
             {events:>10.1} events/s  RSS {:>5} MiB{split}",
            mib(v.resident_bytes)
        );
    }
    render_host(&mut out, r, budget);
    out
}

/// The measured ramp, and what it may say.
fn render_host(out: &mut String, r: &CapacityReport, budget: f64) {
    if r.host.is_empty() {
        return;
    }
    let source = match r.host_busy_source {
        Some(BusySource::Cpuacct) => "the scheduler's runtime of every task, exact",
        Some(BusySource::SchedSwitch) => {
            "each CPU's time outside its idle task (it may read a little below the tasks' own \
             runtimes)"
        }
        _ => "/proc/stat, sampled at the tick: it reads low when work comes in short bursts",
    };
    let _ = writeln!(
        out,
        "\nhost, measured (busy CPU of the whole host by VMs running; {source}):"
    );
    let line = |vms: u32| {
        r.ramp.as_ref().map_or_else(String::new, |c| {
            format!(
                "  line: {:.2}",
                c.fit.base_cores + c.fit.per_vm_cores * f64::from(vms)
            )
        })
    };
    for h in &r.host {
        let _ = writeln!(
            out,
            "  {:>4} VMs  {:>6.2} cores busy  ({} windows){}",
            h.vms,
            h.busy_cores,
            h.windows,
            line(h.vms)
        );
    }
    if let Some(c) = &r.ramp {
        let f = c.fit;
        let _ = writeln!(
            out,
            "  straight line: {:.3} cores + {:.4} ± {:.4} cores per VM (95 %; R² {:.3}, noise \
             {:.3} cores, {} windows)",
            f.base_cores, f.per_vm_cores, f.per_vm_ci95, f.r_squared, f.noise_cores, f.windows
        );
        let _ = writeln!(out, "  {}", c.why);
        match c.verdict {
            RampVerdict::Agrees { vms, range } => {
                let range = range.map_or_else(String::new, |(lo, hi)| {
                    format!(" ({lo}–{hi} over the slope's interval)")
                });
                let _ = writeln!(
                    out,
                    "  at {budget:.2} cores the line says {} VMs{range}",
                    count(vms)
                );
            }
            _ => {
                let _ = writeln!(
                    out,
                    "  so the line gives no VM count: use the per-VM figures above"
                );
            }
        }
    }
    if !r.host_below_vms.is_empty() {
        let _ = writeln!(
            out,
            "warning: in {} window(s) the VMs' own CPU added up to more than the host's busy \
             time ({}): the host figure misses work{}",
            r.host_below_vms.len(),
            crate::analysis::check::windows_list(&r.host_below_vms),
            match r.host_busy_source {
                Some(BusySource::Cpuacct) => "",
                Some(BusySource::SchedSwitch) => {
                    " (idle time ends at a switch, while a woken task's runtime starts at its \
                     wakeup; a host with a cgroup v1 cpuacct hierarchy measures it exactly)"
                }
                _ => {
                    " (/proc/stat samples at the tick; a recording by this profiler's current \
                     version measures it exactly)"
                }
            }
        );
    }
}
