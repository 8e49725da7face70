//! `profiler capacity`: how many VMs like these fit on a host. Each VM's idle cost (its QEMU
//! process's CPU and resident memory, its events per second) over its settled full windows;
//! per profile (VMs named alike: `web-01`, `web-02` → `web`) the median cost, Pulsar's
//! arithmetic (3 % of a core per VM → ~130 VMs on 4 cores) and the same for memory, with the
//! limit that binds; and, where the recording has the host's own busy CPU per window, the
//! measured host CPU against the number of VMs, fitted with a line whose slope is checked
//! against the VMs' own cost before it projects anything (`ramp`).

mod ramp;
mod render;

use std::collections::BTreeMap;

use serde::Serialize;

pub use ramp::{Fit, RampCheck, RampVerdict, fit};
pub use render::render_text;

use crate::{
    analysis::report::{epoch_secs, group_by_vm},
    record::{BusySource, WindowRecord},
};

/// Memory kept for the host by default: its own processes, page cache, the hypervisor.
pub const DEFAULT_RESERVE_MEMORY: u64 = 4 << 30;

/// The assumptions of the projection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CapacityRequest {
    /// Cores of the host to plan for (default: the recorded host's).
    pub cores: Option<f64>,
    /// Cores kept for the host itself (dom0 / hypervisor services, storage, network).
    pub reserve_cores: f64,
    /// The share of the remaining cores VMs' device models may use, 0..=1.
    pub target_util: f64,
    /// Seconds after a VM's process started that do not count (boot); counted from its
    /// first window in recordings that do not say when it started.
    pub settle: f64,
    /// The host's memory to plan for, bytes (default: the recorded host's).
    pub memory: Option<u64>,
    /// Memory kept for the host itself, bytes.
    pub reserve_memory: u64,
}

impl CapacityRequest {
    /// The recorded host, all of it for VMs: nothing reserved, no settle time.
    pub const WHOLE_HOST: Self = Self {
        cores: None,
        reserve_cores: 0.0,
        target_util: 1.0,
        settle: 0.0,
        memory: None,
        reserve_memory: 0,
    };
}

/// One VM's idle cost.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmCost {
    pub name: String,
    pub pid: u32,
    pub profile: String,
    /// Full windows after the settle time.
    pub windows: usize,
    /// QEMU CPU, % of one core.
    pub cpu_percent: f64,
    /// Timer + fd + read + write events and vCPU wakeups per second (the counts available).
    pub events_per_second: f64,
    /// Where its CPU went, % of one core, over the windows that say (`None`: none does).
    pub cpu_by_role: Option<RoleCost>,
    /// Its QEMU's resident memory, the most any of its windows ended with, bytes.
    pub resident_bytes: Option<u64>,
    /// Its guest's RAM as configured, bytes.
    pub guest_memory_bytes: Option<u64>,
}

/// A VM's CPU by thread role, % of one core (record field `cpu_by_role`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RoleCost {
    pub vcpu: f64,
    pub device_model: f64,
    pub other: f64,
    /// Kernel threads working for it; those outside its process (`kvm-pit/PID`) come on top
    /// of `cpu_percent`.
    pub kernel_workers: f64,
}

/// The mean split of the windows of `settled` that have one, % of one core.
fn role_cost(settled: &[&WindowRecord]) -> Option<RoleCost> {
    let split: Vec<(f64, crate::record::CpuByRole)> = settled
        .iter()
        .filter_map(|w| Some((w.seconds, w.cpu_by_role?)))
        .collect();
    let secs: f64 = split.iter().map(|(s, _)| s).sum();
    if secs <= 0.0 {
        return None;
    }
    let pct = |f: fn(&crate::record::CpuByRole) -> f64| {
        split.iter().map(|(_, r)| f(r)).sum::<f64>() / secs * 100.0
    };
    Some(RoleCost {
        vcpu: pct(|r| r.vcpu),
        device_model: pct(|r| r.device_model),
        other: pct(|r| r.other),
        kernel_workers: pct(|r| r.kernel_workers),
    })
}

/// What limits how many VMs fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    Cpu,
    Memory,
}

/// VMs of one profile, and how many such VMs fit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProfileCapacity {
    pub profile: String,
    pub vms: usize,
    /// Median of the VMs' CPU, % of one core.
    pub cpu_percent: f64,
    pub events_per_second: f64,
    /// VMs like these the host's CPU takes at the target utilization; `None` when they cost
    /// no measurable CPU.
    pub vms_per_host: Option<u64>,
    /// The same at the profile's cheapest and costliest VM: the range its VMs' spread allows.
    pub vms_per_host_range: Option<(u64, u64)>,
    /// Median of the VMs' resident memory, bytes.
    pub resident_bytes: Option<u64>,
    /// VMs like these the host's memory takes, less its reserve, by their resident memory.
    pub vms_per_host_memory: Option<u64>,
    /// The same if every guest touched all its configured RAM (the median VM's `-m`).
    pub vms_per_host_memory_configured: Option<u64>,
    /// The smaller of the CPU and memory counts, and which one it is.
    pub fits: Option<u64>,
    pub binding: Option<Limit>,
}

/// The host's measured busy CPU with `vms` VMs running (mean over such windows).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostPoint {
    pub vms: u32,
    pub busy_cores: f64,
    pub windows: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CapacityReport {
    pub cores: f64,
    pub reserve_cores: f64,
    pub target_util: f64,
    pub settle_seconds: f64,
    /// The host's memory planned for and kept back, bytes (`None`: not known).
    pub memory_bytes: Option<u64>,
    pub reserve_memory_bytes: u64,
    pub vms: Vec<VmCost>,
    pub profiles: Vec<ProfileCapacity>,
    /// Every window with host data and no VM settling in it: (VMs running, busy cores).
    pub host_windows: Vec<(u32, f64)>,
    pub host: Vec<HostPoint>,
    /// How the host's busy time was measured in those windows (the least exact of theirs).
    pub host_busy_source: Option<BusySource>,
    /// Windows in which the VMs' own CPU added up to more than the host's busy time: a host
    /// figure that misses work (`/proc/stat` samples at the tick).
    pub host_below_vms: Vec<u64>,
    /// The straight line through the host windows, checked against the VMs' own cost.
    pub ramp: Option<RampCheck>,
}

/// `web-01` → `web`; `density-quiet-7` → `density-quiet`; `noisy` → `noisy`.
pub fn profile_of(name: &str) -> String {
    let trimmed = name.trim_end_matches(|c: char| c.is_ascii_digit());
    let trimmed = trimmed.trim_end_matches(['-', '_', '.']);
    if trimmed.is_empty() {
        name.to_string()
    } else {
        trimmed.to_string()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The capacity report of a recording. `host_cores` is used when neither the request nor the
/// recording says how many cores the host has.
pub fn capacity(
    records: &[WindowRecord],
    req: &CapacityRequest,
    host_cores: f64,
) -> CapacityReport {
    let recorded_cores = records.iter().find_map(|r| r.host.map(|h| h.cpus as f64));
    let cores = req.cores.or(recorded_cores).unwrap_or(host_cores);
    let recorded_memory = records.iter().find_map(|r| r.host?.memory_bytes);
    let memory = req.memory.or(recorded_memory);
    let vms = vm_costs(records, req.settle);
    let budget = (cores - req.reserve_cores).max(0.0) * req.target_util;
    let memory_budget = memory.map(|m| m.saturating_sub(req.reserve_memory));
    let profiles = profiles(&vms, budget, memory_budget);
    let (ramp_windows, host_source) = host_windows(records, req.settle);
    let host_windows: Vec<(u32, f64)> = ramp_windows.iter().map(|w| (w.0, w.1)).collect();
    let own_windows: Vec<(u32, f64)> = ramp_windows.iter().map(|w| (w.0, w.2)).collect();
    let mut by_count: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
    for &(n, busy) in &host_windows {
        by_count.entry(n).or_default().push(busy);
    }
    let host = by_count
        .into_iter()
        .map(|(n, v)| HostPoint {
            vms: n,
            busy_cores: v.iter().sum::<f64>() / v.len() as f64,
            windows: v.len(),
        })
        .collect();
    let costs: Vec<f64> = vms.iter().map(|v| v.cpu_percent / 100.0).collect();
    let (per_vm, per_vm_ci95) = ramp::per_vm_cost(&costs);
    let ramp = fit(&host_windows)
        .map(|f| ramp::check(f, fit(&own_windows), (per_vm, per_vm_ci95), budget));
    CapacityReport {
        cores,
        reserve_cores: req.reserve_cores,
        target_util: req.target_util,
        settle_seconds: req.settle,
        memory_bytes: memory,
        reserve_memory_bytes: req.reserve_memory,
        host_below_vms: host_below_vms(records),
        ramp,
        vms,
        profiles,
        host_windows,
        host,
        host_busy_source: host_source,
    }
}

/// Each VM's cost over its full windows after the settle time.
fn vm_costs(records: &[WindowRecord], settle: f64) -> Vec<VmCost> {
    let mut vms = Vec::new();
    for g in group_by_vm(records) {
        let settled: Vec<&WindowRecord> = g
            .after_settle(settle)
            .into_iter()
            .filter(|w| !w.partial)
            .collect();
        let secs: f64 = settled.iter().map(|w| w.seconds).sum();
        if settled.is_empty() || secs <= 0.0 {
            continue;
        }
        let cpu: f64 = settled.iter().filter_map(|w| w.cpu_seconds).sum();
        let events: u64 = settled
            .iter()
            .map(|w| {
                [w.timer, w.fd_wakeups, w.read, w.write, w.vcpu_wakeups]
                    .iter()
                    .flatten()
                    .sum::<u64>()
            })
            .sum();
        vms.push(VmCost {
            name: g.name.to_string(),
            pid: g.pid,
            profile: profile_of(g.name),
            windows: settled.len(),
            cpu_percent: cpu / secs * 100.0,
            events_per_second: events as f64 / secs,
            cpu_by_role: role_cost(&settled),
            resident_bytes: settled.iter().filter_map(|w| w.resident_bytes).max(),
            guest_memory_bytes: settled.last().and_then(|w| w.vm.guest_memory_bytes),
        });
    }
    vms
}

/// Per profile: the median VM, and how many such VMs the CPU budget (cores) and the memory
/// budget (bytes) take.
fn profiles(vms: &[VmCost], budget: f64, memory_budget: Option<u64>) -> Vec<ProfileCapacity> {
    let mut by_profile: BTreeMap<String, Vec<&VmCost>> = BTreeMap::new();
    for v in vms {
        by_profile.entry(v.profile.clone()).or_default().push(v);
    }
    let by_cpu = |pct: f64| (pct > 0.0).then(|| (budget / (pct / 100.0)).floor() as u64);
    let by_memory = |bytes: Option<u64>| Some(memory_budget? / bytes.filter(|b| *b > 0)?);
    let median_bytes =
        |v: Vec<u64>| (!v.is_empty()).then(|| median(v.iter().map(|b| *b as f64).collect()) as u64);
    by_profile
        .into_iter()
        .map(|(profile, list)| {
            let cpu = median(list.iter().map(|v| v.cpu_percent).collect());
            let events = median(list.iter().map(|v| v.events_per_second).collect());
            let costs = list.iter().map(|v| v.cpu_percent);
            let (cheapest, costliest) =
                costs.fold((f64::MAX, 0f64), |(lo, hi), c| (lo.min(c), hi.max(c)));
            let resident = median_bytes(list.iter().filter_map(|v| v.resident_bytes).collect());
            let configured =
                median_bytes(list.iter().filter_map(|v| v.guest_memory_bytes).collect());
            let vms_cpu = by_cpu(cpu);
            let vms_memory = by_memory(resident);
            let (fits, binding) = match (vms_cpu, vms_memory) {
                (Some(c), Some(m)) if m < c => (Some(m), Some(Limit::Memory)),
                (Some(c), _) => (Some(c), Some(Limit::Cpu)),
                (None, Some(m)) => (Some(m), Some(Limit::Memory)),
                (None, None) => (None, None),
            };
            ProfileCapacity {
                profile,
                vms: list.len(),
                cpu_percent: cpu,
                events_per_second: events,
                vms_per_host: vms_cpu,
                vms_per_host_range: by_cpu(costliest).zip(by_cpu(cheapest)),
                resident_bytes: resident,
                vms_per_host_memory: vms_memory,
                vms_per_host_memory_configured: by_memory(configured),
                fits,
                binding,
            }
        })
        .collect()
}

/// One point per window (every VM record of a window carries the same host figures), leaving
/// out windows that overlap a VM's settle time: a booting guest is not what the host costs
/// with that many VMs idle. And how their busy time was measured (`proc_stat` if any was).
/// The windows of the ramp: (VMs running, host busy cores, the VMs' own cores) each.
type RampWindows = Vec<(u32, f64, f64)>;

fn host_windows(records: &[WindowRecord], settle: f64) -> (RampWindows, Option<BusySource>) {
    let starts: Vec<f64> = group_by_vm(records)
        .iter()
        .filter_map(|g| g.started())
        .collect();
    let mut per_window: BTreeMap<u64, (u32, f64, f64)> = BTreeMap::new();
    let mut source = None;
    for r in records {
        let Some(h) = r.host else { continue };
        if r.seconds <= 0.0 {
            continue;
        }
        let booting = epoch_secs(&r.start).is_some_and(|s| {
            starts
                .iter()
                .any(|&s0| s < s0 + settle && s + r.seconds > s0)
        });
        if !booting {
            // Less the profiler's own CPU: the measurement's, not what the VMs cost.
            let busy = h.busy_cpu_seconds - h.profiler_cpu_seconds.unwrap_or(0.0);
            let e = per_window
                .entry(r.window)
                .or_insert((h.vms_running, busy / r.seconds, 0.0));
            e.2 += r.cpu_seconds.unwrap_or(0.0) / r.seconds;
            // The least exact of the windows' sources is the ramp's.
            let exactness = |s: BusySource| match s {
                BusySource::ProcStat => 0,
                BusySource::SchedSwitch => 1,
                BusySource::Cpuacct => 2,
            };
            let this = h.busy_source.unwrap_or(BusySource::ProcStat);
            if source.is_none_or(|s| exactness(this) < exactness(s)) {
                source = Some(this);
            }
        }
    }
    (per_window.into_values().collect(), source)
}

/// Full windows in which the VMs' own CPU (their records' `cpu_seconds`) added up to more
/// than the host's busy time (beyond rounding).
fn host_below_vms(records: &[WindowRecord]) -> Vec<u64> {
    let mut per_window: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for r in records {
        let Some(h) = r.host else { continue };
        let e = per_window
            .entry(r.window)
            .or_insert((h.busy_cpu_seconds, 0.0));
        e.1 += r.cpu_seconds.unwrap_or(0.0);
    }
    per_window
        .into_iter()
        .filter(|(_, (host, vms))| *vms > host + 0.01)
        .map(|(w, _)| w)
        .collect()
}

/// Why `capacity` of `records` has no VM cost to answer with, and what to do (`None`: it has).
pub fn why_no_vm_costs(records: &[WindowRecord], req: &CapacityRequest) -> Option<String> {
    let groups = group_by_vm(records);
    if groups.is_empty() {
        return Some(
            "the recording holds no window records (one is written per VM per closed window): \
             record until at least one window has closed"
                .into(),
        );
    }
    let full: Vec<(f64, bool)> = groups
        .iter()
        .flat_map(|g| {
            let (started, known) = (g.started(), g.start_known());
            g.windows
                .iter()
                .filter(|w| !w.partial)
                .filter_map(move |w| Some((epoch_secs(&w.start)? - started?, known)))
        })
        .collect();
    if full.is_empty() {
        return Some(format!(
            "none of its {} VMs has a full window (all {} records are partial: the VM started \
             or exited in the window, or the profiler stopped): record for at least two \
             windows (--duration at least twice --window)",
            groups.len(),
            records.len()
        ));
    }
    let latest = full
        .iter()
        .map(|&(after, _)| after)
        .fold(f64::MIN, f64::max);
    let from = if full.iter().all(|&(_, known)| known) {
        "its VM's process started"
    } else {
        "its VM's first window (this recording does not say when its VMs started)"
    };
    (latest < req.settle - 1e-3).then(|| {
        format!(
            "none of its {} VMs has a full window starting --settle {} s after it started: the \
             latest starts {latest:.0} s after {from}; record longer, or lower --settle (e.g. \
             --settle {})",
            groups.len(),
            req.settle,
            latest.max(0.0).floor()
        )
    })
}

/// Why `report` of `records` has no host point (the ramp and its plot), and what to do
/// (`None`: it has).
pub fn why_no_host_points(records: &[WindowRecord], report: &CapacityReport) -> Option<String> {
    if !report.host_windows.is_empty() {
        return None;
    }
    Some(if records.iter().all(|r| r.host.is_none()) {
        "no record carries the host's CPU (`host`): only full windows do, in recordings made \
         by a profiler that writes it; record for at least two windows"
            .into()
    } else {
        format!(
            "every window with the host's CPU overlaps a VM's first --settle {} s (boot is not \
             what idle VMs cost the host): record longer, or lower --settle",
            report.settle_seconds
        )
    })
}

#[cfg(test)]
mod tests;
