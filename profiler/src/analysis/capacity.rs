//! `profiler capacity`: how many VMs like these fit on a host. Each VM's idle cost (its QEMU
//! process's CPU, its events per second) over its settled full windows; per profile (VMs named
//! alike: `web-01`, `web-02` → `web`) the median cost and Pulsar's arithmetic (3 % of a core
//! per VM → ~130 VMs on 4 cores); and, where the recording has the host's own busy CPU per
//! window, the measured host CPU against the number of VMs, with a straight-line fit that says
//! how linear it really is.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use crate::text::clean;
use crate::{
    analysis::report::{epoch_secs, group_by_vm},
    record::WindowRecord,
};

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

/// VMs of one profile, and how many such VMs fit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProfileCapacity {
    pub profile: String,
    pub vms: usize,
    /// Median of the VMs' CPU, % of one core.
    pub cpu_percent: f64,
    pub events_per_second: f64,
    /// VMs like these the host takes at the target utilization; `None` when they cost no
    /// measurable CPU (memory or other limits decide then).
    pub vms_per_host: Option<u64>,
}

/// The host's measured busy CPU with `vms` VMs running (mean over such windows).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostPoint {
    pub vms: u32,
    pub busy_cores: f64,
    pub windows: usize,
}

/// Least-squares line through the host points: busy cores = base + per_vm × VMs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Fit {
    pub base_cores: f64,
    pub per_vm_cores: f64,
    /// Coefficient of determination, 1 = perfectly linear.
    pub r_squared: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CapacityReport {
    pub cores: f64,
    pub reserve_cores: f64,
    pub target_util: f64,
    pub settle_seconds: f64,
    pub vms: Vec<VmCost>,
    pub profiles: Vec<ProfileCapacity>,
    /// Every window with host data and no VM settling in it: (VMs running, busy cores).
    pub host_windows: Vec<(u32, f64)>,
    pub host: Vec<HostPoint>,
    pub fit: Option<Fit>,
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

/// Fits busy cores = a + b × VMs.
pub fn fit(points: &[(u32, f64)]) -> Option<Fit> {
    let n = points.len() as f64;
    let distinct: std::collections::BTreeSet<u32> = points.iter().map(|p| p.0).collect();
    if distinct.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0 as f64).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 as f64 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 as f64 - mx) * (p.1 - my)).sum();
    let b = sxy / sxx;
    let a = my - b * mx;
    let ss_tot: f64 = points.iter().map(|p| (p.1 - my).powi(2)).sum();
    let ss_res: f64 = points
        .iter()
        .map(|p| (p.1 - (a + b * p.0 as f64)).powi(2))
        .sum();
    Some(Fit {
        base_cores: a,
        per_vm_cores: b,
        r_squared: if ss_tot > 0.0 {
            1.0 - ss_res / ss_tot
        } else {
            1.0
        },
    })
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
    let mut vms = Vec::new();
    for g in group_by_vm(records) {
        let settled: Vec<&WindowRecord> = g
            .after_settle(req.settle)
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
        });
    }
    let mut by_profile: BTreeMap<String, Vec<&VmCost>> = BTreeMap::new();
    for v in &vms {
        by_profile.entry(v.profile.clone()).or_default().push(v);
    }
    let budget = (cores - req.reserve_cores).max(0.0) * req.target_util;
    let profiles = by_profile
        .into_iter()
        .map(|(profile, list)| {
            let cpu = median(list.iter().map(|v| v.cpu_percent).collect());
            let events = median(list.iter().map(|v| v.events_per_second).collect());
            ProfileCapacity {
                profile,
                vms: list.len(),
                cpu_percent: cpu,
                events_per_second: events,
                vms_per_host: (cpu > 0.0).then(|| (budget / (cpu / 100.0)).floor() as u64),
            }
        })
        .collect();
    // One point per window (every VM record of a window carries the same host figures),
    // leaving out windows that overlap a VM's settle time: a booting guest is not what the
    // host costs with that many VMs idle.
    let starts: Vec<f64> = group_by_vm(records)
        .iter()
        .filter_map(|g| g.started())
        .collect();
    let mut per_window: BTreeMap<u64, (u32, f64)> = BTreeMap::new();
    for r in records {
        let Some(h) = r.host else { continue };
        if r.seconds <= 0.0 {
            continue;
        }
        let booting = epoch_secs(&r.start).is_some_and(|s| {
            starts
                .iter()
                .any(|&s0| s < s0 + req.settle && s + r.seconds > s0)
        });
        if !booting {
            per_window.insert(r.window, (h.vms_running, h.busy_cpu_seconds / r.seconds));
        }
    }
    let host_windows: Vec<(u32, f64)> = per_window.into_values().collect();
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
    CapacityReport {
        cores,
        reserve_cores: req.reserve_cores,
        target_util: req.target_util,
        settle_seconds: req.settle,
        fit: fit(&host_windows),
        vms,
        profiles,
        host_windows,
        host,
    }
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

/// The report for people, assumptions first.
pub fn render_text(r: &CapacityReport) -> String {
    let mut out = String::new();
    let budget = (r.cores - r.reserve_cores).max(0.0) * r.target_util;
    let _ = writeln!(
        out,
        "assumptions: {} cores, {} kept for the host, VMs' device models may use {:.0} % of the \
         rest = {budget:.2} cores; cost = a VM's QEMU CPU over its full windows {} s after it \
         appeared; other limits (memory, vCPUs) not considered",
        r.cores,
        r.reserve_cores,
        r.target_util * 100.0,
        r.settle_seconds
    );
    let _ = writeln!(out, "\nper profile (median of its VMs):");
    let _ = writeln!(
        out,
        "  {:<20} {:>4} {:>12} {:>12} {:>12}",
        "profile", "VMs", "CPU % core", "events/s", "VMs/host"
    );
    let profile_rows = r.profiles.iter().map(|p| {
        let fits = p
            .vms_per_host
            .map_or("unbounded".to_string(), |n| n.to_string());
        let name = clean(&p.profile);
        let (vms, cpu, events) = (p.vms, p.cpu_percent, p.events_per_second);
        format!("  {name:<20} {vms:>4} {cpu:>12.2} {events:>12.1} {fits:>12}\n")
    });
    out.extend(profile_rows);
    let _ = writeln!(out, "\nper VM:");
    let vm_rows = r.vms.iter().map(|v| {
        let (name, pid, windows) = (clean(&v.name), v.pid, v.windows);
        let (cpu, events) = (v.cpu_percent, v.events_per_second);
        let split = v.cpu_by_role.map_or_else(String::new, |r| {
            format!(
                "  (vCPU {:.2}, device model {:.2}, other {:.2}; kernel workers {:.2})",
                r.vcpu, r.device_model, r.other, r.kernel_workers
            )
        });
        format!(
            "  {name:<24} pid {pid:<8} {windows:>3} windows  CPU {cpu:>6.2} % of a core  \
             {events:>10.1} events/s{split}\n"
        )
    });
    out.extend(vm_rows);
    if !r.host.is_empty() {
        let _ = writeln!(
            out,
            "\nhost, measured (busy CPU of the whole host by VMs running):"
        );
        for h in &r.host {
            let projected = r
                .fit
                .map(|f| {
                    format!(
                        "  line: {:.2}",
                        f.base_cores + f.per_vm_cores * h.vms as f64
                    )
                })
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {:>4} VMs  {:>6.2} cores busy  ({} windows){projected}",
                h.vms, h.busy_cores, h.windows
            );
        }
        if let Some(f) = r.fit {
            let _ = writeln!(
                out,
                "  straight line: {:.3} cores + {:.4} cores per VM (R² {:.3}); at {budget:.2} \
                 cores that is {} VMs",
                f.base_cores,
                f.per_vm_cores,
                f.r_squared,
                if f.per_vm_cores > 0.0 {
                    (((budget - f.base_cores) / f.per_vm_cores).floor().max(0.0) as u64).to_string()
                } else {
                    "unbounded".into()
                }
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::HostWindow;

    fn w(
        name: &str,
        pid: u32,
        n: u64,
        cpu: f64,
        timer: u64,
        host: Option<(u32, f64)>,
    ) -> WindowRecord {
        let mut r = crate::record::tests::window(name, pid, n, 10.0);
        r.timer = Some(timer);
        r.cpu_seconds = Some(cpu);
        r.host = host.map(|(vms, busy)| HostWindow {
            cpus: 4,
            busy_cpu_seconds: busy,
            vms_running: vms,
        });
        r
    }

    const REQ: CapacityRequest = CapacityRequest {
        cores: None,
        reserve_cores: 0.0,
        target_util: 1.0,
        settle: 0.0,
    };

    /// Recorded under KVM: a guest whose own 1 kHz timer costs its QEMU a third of a core,
    /// nearly all in its vCPU thread, plus the in-kernel PIT's kernel thread beside it.
    #[test]
    fn a_kvm_guest_s_cost_is_split_by_thread_role() {
        let text = include_str!("../../tests/fixtures/records/kvm-pit-and-seabios.jsonl");
        let (records, _) = crate::record::read_records(text.as_bytes()).unwrap();
        let req = CapacityRequest {
            cores: None,
            reserve_cores: 0.0,
            target_util: 1.0,
            settle: 0.0,
        };
        let report = capacity(&records, &req, 2.0);
        let pit = report.vms.iter().find(|v| v.name == "pit1000").unwrap();
        let split = pit.cpu_by_role.unwrap();
        assert!(split.vcpu / pit.cpu_percent > 0.9, "{pit:?}");
        assert!(split.kernel_workers > 1.0, "{pit:?}");
        assert!(
            pit.events_per_second > 970.0,
            "its vCPU wakeups count: {pit:?}"
        );
        assert!(
            render_text(&report).contains("(vCPU 32."),
            "{}",
            render_text(&report)
        );
    }

    #[test]
    fn pulsars_arithmetic_3_percent_per_vm_is_about_130_on_4_cores() {
        // 0.3 CPU seconds per 10 s window: 3 % of a core.
        let records: Vec<WindowRecord> = (0..3)
            .map(|n| w("win7-01", 1, n, 0.3, 1035, None))
            .collect();
        let r = capacity(&records, &REQ, 4.0);
        assert_eq!(r.profiles[0].profile, "win7");
        assert!((r.profiles[0].cpu_percent - 3.0).abs() < 1e-9);
        assert_eq!(r.profiles[0].vms_per_host, Some(133));
        assert!((r.profiles[0].events_per_second - 103.5).abs() < 1e-9);
        let text = render_text(&r);
        assert!(text.starts_with("assumptions: 4 cores"), "{text}");
        assert!(text.contains("win7"), "{text}");
    }

    #[test]
    fn quiet_vms_fit_more_than_noisy_ones_and_settle_skips_boot() {
        let mut records = Vec::new();
        for n in 0..4 {
            // The first window is boot: expensive for both.
            let boot = n == 0;
            records.push(w(
                "noisy-1",
                1,
                n,
                if boot { 9.0 } else { 0.6 },
                19_330,
                None,
            ));
            records.push(w(
                "noisy-2",
                2,
                n,
                if boot { 9.0 } else { 0.62 },
                19_000,
                None,
            ));
            records.push(w("quiet-1", 3, n, if boot { 9.0 } else { 0.01 }, 89, None));
        }
        let req = CapacityRequest {
            reserve_cores: 1.0,
            target_util: 0.8,
            settle: 10.0,
            ..REQ
        };
        let r = capacity(&records, &req, 4.0);
        let noisy = r.profiles.iter().find(|p| p.profile == "noisy").unwrap();
        let quiet = r.profiles.iter().find(|p| p.profile == "quiet").unwrap();
        assert_eq!(noisy.vms, 2);
        assert!((noisy.cpu_percent - 6.1).abs() < 1e-9, "{noisy:?}");
        assert!(quiet.vms_per_host.unwrap() > noisy.vms_per_host.unwrap());
        // (4 - 1) × 0.8 / 0.061 = 39.3
        assert_eq!(noisy.vms_per_host, Some(39));
    }

    #[test]
    fn host_cpu_against_vm_count_with_a_straight_line() {
        let mut records = Vec::new();
        // 0.2 cores of base load, 0.05 cores per VM, one VM more every two windows.
        for n in 0..8u64 {
            let vms = (n / 2 + 1) as u32;
            let busy = (0.2 + 0.05 * vms as f64) * 10.0;
            records.push(w("d-1", 1, n, 0.5, 100, Some((vms, busy))));
        }
        let r = capacity(&records, &REQ, 4.0);
        assert_eq!(r.host.len(), 4);
        assert_eq!(r.host[0].vms, 1);
        let f = r.fit.unwrap();
        assert!((f.base_cores - 0.2).abs() < 1e-9 && (f.per_vm_cores - 0.05).abs() < 1e-9);
        assert!((f.r_squared - 1.0).abs() < 1e-9);
        assert_eq!(r.cores, 4.0, "cores from the recording");
        assert!(render_text(&r).contains("straight line: 0.200 cores + 0.0500 cores per VM"));
    }

    #[test]
    fn windows_where_a_vm_boots_are_not_host_points() {
        let mut records = Vec::new();
        for n in 0..6u64 {
            records.push(w("a-1", 1, n, 0.5, 100, Some((1, 2.0))));
        }
        // a-1 settles in windows 0-1, b-1 appears in window 3 and settles in 3-4: those are
        // left out.
        for n in 3..6u64 {
            records.push(w("b-1", 2, n, 5.0, 100, Some((2, 9.0))));
        }
        let req = CapacityRequest {
            settle: 20.0,
            ..REQ
        };
        let r = capacity(&records, &req, 4.0);
        assert_eq!(r.host_windows, [(1, 0.2), (2, 0.9)]);
        assert_eq!(r.host.iter().map(|h| h.vms).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn settle_counts_from_the_vms_process_start_not_its_first_window() {
        // Two VMs up for a minute before the recording's first window (00:00:00); 5 s windows.
        let started = Some("2026-11-21T23:59:00.000Z".to_string());
        let mut records = Vec::new();
        for n in 0..2 {
            for (name, pid) in [("a-1", 1), ("a-2", 2)] {
                let mut r = w(name, pid, n, 0.05, 50, Some((2, 0.2)));
                r.seconds = 5.0;
                r.start = format!("2026-11-22T00:00:{:02}.000Z", n * 5);
                r.vm.started.clone_from(&started);
                records.push(r);
            }
        }
        let req = CapacityRequest {
            settle: 30.0,
            ..REQ
        };
        let r = capacity(&records, &req, 4.0);
        assert_eq!(r.vms.len(), 2, "{r:#?}");
        assert_eq!(r.vms[0].windows, 2);
        assert_eq!(r.host_windows.len(), 2);
        assert_eq!(why_no_vm_costs(&records, &req), None);
        assert_eq!(why_no_host_points(&records, &r), None);

        // Without `started` (an older recording) the first window is the start: nothing
        // settles, and the answer says why and what to do.
        for r in &mut records {
            r.vm.started = None;
        }
        let report = capacity(&records, &req, 4.0);
        assert!(report.vms.is_empty());
        let why = why_no_vm_costs(&records, &req).unwrap();
        assert!(why.contains("--settle 30"), "{why}");
        assert!(why.contains("does not say when its VMs started"), "{why}");
        assert!(why.contains("lower --settle (e.g. --settle 5)"), "{why}");
        let why = why_no_host_points(&records, &report).unwrap();
        assert!(why.contains("overlaps a VM's first --settle 30 s"), "{why}");
    }

    #[test]
    fn nothing_to_answer_says_what_is_missing() {
        let req = CapacityRequest { settle: 0.0, ..REQ };
        let none = why_no_vm_costs(&[], &req).unwrap();
        assert!(none.contains("no window records"), "{none}");
        let mut partial = w("a-1", 1, 0, 0.1, 5, None);
        partial.partial = true;
        let why = why_no_vm_costs(std::slice::from_ref(&partial), &req).unwrap();
        assert!(
            why.contains("has a full window (all 1 records are partial"),
            "{why}"
        );
        assert!(why.contains("--duration at least twice --window"), "{why}");
        let full = [w("a-1", 1, 0, 0.1, 5, None)];
        let report = capacity(&full, &req, 4.0);
        let why = why_no_host_points(&full, &report).unwrap();
        assert!(why.contains("no record carries the host's CPU"), "{why}");
    }

    #[test]
    fn profiles_from_names() {
        assert_eq!(profile_of("web-01"), "web");
        assert_eq!(profile_of("density-quiet-7"), "density-quiet");
        assert_eq!(profile_of("noisy"), "noisy");
        assert_eq!(profile_of("42"), "42");
        assert_eq!(median(vec![3.0, 1.0, 2.0, 10.0]), 2.5);
    }
}
