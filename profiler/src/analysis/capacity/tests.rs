use super::*;
use crate::record::HostWindow;
use crate::testing::assert_contains;

fn w(name: &str, pid: u32, n: u64, cpu: f64, timer: u64, host: Option<(u32, f64)>) -> WindowRecord {
    let mut r = crate::record::tests::window(name, pid, n, 10.0);
    r.timer = Some(timer);
    r.cpu_seconds = Some(cpu);
    r.host = host.map(|(vms, busy)| HostWindow {
        cpus: 4,
        busy_cpu_seconds: busy,
        vms_running: vms,
        busy_source: None,
        proc_stat_busy_cpu_seconds: None,
        memory_bytes: None,
        profiler_cpu_seconds: None,
    });
    r
}

const REQ: CapacityRequest = CapacityRequest::WHOLE_HOST;

/// Recorded under KVM: a guest whose own 1 kHz timer costs its QEMU a third of a core,
/// nearly all in its vCPU thread, plus the in-kernel PIT's kernel thread beside it.
#[test]
fn a_kvm_guest_s_cost_is_split_by_thread_role() {
    let text = include_str!("../../../tests/fixtures/records/kvm-pit-and-seabios.jsonl");
    let (records, _) = crate::record::read_records(text.as_bytes()).unwrap();
    let report = capacity(&records, &REQ, 2.0);
    let pit = report.vms.iter().find(|v| v.name == "pit1000").unwrap();
    let split = pit.cpu_by_role.unwrap();
    assert!(split.vcpu / pit.cpu_percent > 0.9, "{pit:?}");
    assert!(split.kernel_workers > 1.0, "{pit:?}");
    assert!(
        pit.events_per_second > 970.0,
        "its vCPU wakeups count: {pit:?}"
    );
    assert_contains(&render_text(&report), "(vCPU 32.");
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
    crate::testing::assert_contains(&text, "win7");
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
    let f = r.ramp.as_ref().unwrap().fit;
    assert!((f.base_cores - 0.2).abs() < 1e-9 && (f.per_vm_cores - 0.05).abs() < 1e-9);
    assert!((f.r_squared - 1.0).abs() < 1e-9);
    assert_eq!(r.cores, 4.0, "cores from the recording");
    assert_contains(
        &render_text(&r),
        "straight line: 0.200 cores + 0.0500 ± 0.0000 cores per VM",
    );
}

#[test]
fn windows_where_a_vm_boots_are_not_host_points() {
    let mut records = Vec::new();
    // Every record of a window carries the same host figures.
    for n in 0..6u64 {
        let host = if n < 3 { (1, 2.0) } else { (2, 9.0) };
        records.push(w("a-1", 1, n, 0.5, 100, Some(host)));
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
    crate::testing::assert_contains(&why, "--settle 30");
    crate::testing::assert_contains(&why, "does not say when its VMs started");
    crate::testing::assert_contains(&why, "lower --settle (e.g. --settle 5)");
    let why = why_no_host_points(&records, &report).unwrap();
    crate::testing::assert_contains(&why, "overlaps a VM's first --settle 30 s");
}

#[test]
fn nothing_to_answer_says_what_is_missing() {
    let req = CapacityRequest { settle: 0.0, ..REQ };
    let none = why_no_vm_costs(&[], &req).unwrap();
    crate::testing::assert_contains(&none, "no window records");
    let mut partial = w("a-1", 1, 0, 0.1, 5, None);
    partial.partial = true;
    let why = why_no_vm_costs(std::slice::from_ref(&partial), &req).unwrap();
    assert!(
        why.contains("has a full window (all 1 records are partial"),
        "{why}"
    );
    crate::testing::assert_contains(&why, "--duration at least twice --window");
    let full = [w("a-1", 1, 0, 0.1, 5, None)];
    let report = capacity(&full, &req, 4.0);
    let why = why_no_host_points(&full, &report).unwrap();
    crate::testing::assert_contains(&why, "no record carries the host's CPU");
}

#[test]
fn profiles_from_names() {
    crate::testing::assert_maps(
        profile_of,
        &[
            ("web-01", "web".to_string()),
            ("density-quiet-7", "density-quiet".to_string()),
            ("noisy", "noisy".to_string()),
            ("42", "42".to_string()),
        ],
    );
    assert_eq!(median(vec![3.0, 1.0, 2.0, 10.0]), 2.5);
}

/// Memory binds before CPU for cheap VMs that hold a lot of memory; both counts are given.
#[test]
fn the_binding_limit_is_named_with_both_counts() {
    let mut records = Vec::new();
    for n in 0..3 {
        for (name, pid, rss) in [("web-1", 1, 900u64 << 20), ("web-2", 2, 1100 << 20)] {
            let mut r = w(name, pid, n, 0.05, 100, Some((2, 0.2)));
            r.resident_bytes = Some(rss);
            r.vm.guest_memory_bytes = Some(2 << 30);
            r.host.as_mut().unwrap().memory_bytes = Some(24 << 30);
            records.push(r);
        }
    }
    let req = CapacityRequest {
        reserve_memory: 4 << 30,
        ..REQ
    };
    let r = capacity(&records, &req, 4.0);
    let p = &r.profiles[0];
    // CPU: 4 cores / 0.5 % = 800 (799 in floating point); memory: 20 GiB / 1000 MiB = 20.
    assert!(matches!(p.vms_per_host, Some(799..=800)), "{p:?}");
    assert_eq!(p.resident_bytes, Some(1000 << 20));
    assert_eq!(p.vms_per_host_memory, Some(20));
    assert_eq!(p.vms_per_host_memory_configured, Some(10));
    assert_eq!((p.fits, p.binding), (Some(20), Some(Limit::Memory)));
    assert_eq!(r.memory_bytes, Some(24 << 30), "the recorded host's");
    let text = render_text(&r);
    crate::testing::assert_contains(&text, "20 (memory)");
    assert!(
        text.contains("all its configured RAM: 10 by memory"),
        "{text}"
    );
    // Planning for a bigger host moves the limit to the CPU.
    let big = CapacityRequest {
        memory: Some(1 << 40),
        ..req
    };
    let p = capacity(&records, &big, 4.0).profiles[0].clone();
    assert_eq!((p.fits, p.binding), (p.vms_per_host, Some(Limit::Cpu)));
}

/// The per-VM figure comes with the range its VMs' spread allows.
#[test]
fn vms_per_host_has_a_range() {
    let records: Vec<WindowRecord> = (0..2)
        .flat_map(|n| {
            [
                w("app-1", 1, n, 0.2, 10, None),
                w("app-2", 2, n, 0.3, 10, None),
                w("app-3", 3, n, 0.4, 10, None),
            ]
        })
        .collect();
    let r = capacity(&records, &REQ, 4.0);
    let p = &r.profiles[0];
    assert_eq!(p.vms_per_host, Some(133));
    assert_eq!(p.vms_per_host_range, Some((100, 200)));
    assert!(render_text(&r).contains("133 (100–200)"));
}

/// A host figure below what its VMs alone used is flagged, with where it came from.
#[test]
fn a_host_below_its_vms_is_warned_about() {
    let mut records = Vec::new();
    for n in 0..3u64 {
        // Two VMs using 0.52 s each per 10 s; /proc/stat saw 0.39 s of the host busy.
        for (name, pid) in [("tab-1", 1), ("tab-2", 2)] {
            records.push(w(name, pid, n, 0.52, 940, Some((2, 0.39))));
        }
    }
    let r = capacity(&records, &REQ, 2.0);
    assert_eq!(r.host_below_vms, [0, 1, 2]);
    assert_eq!(
        r.host_busy_source,
        Some(crate::record::BusySource::ProcStat)
    );
    let text = render_text(&r);
    crate::testing::assert_contains(&text, "warning: in 3 window(s)");
    crate::testing::assert_contains(&text, "/proc/stat samples at the tick");
}

/// Today's quiet ramp (docs/capacity.md before this check): 0.5 % of a core per VM on a host
/// whose noise is several times that. No VM count from the line, and why.
#[test]
fn an_unresolved_ramp_gives_no_count_from_its_line() {
    let mut records = Vec::new();
    let noise = [0.05, -0.04, 0.03, -0.06, 0.02, 0.05, -0.03, 0.0];
    for n in 0..16u64 {
        let vms = (n / 2 + 1) as u32;
        let busy = (0.036 + 0.005 * f64::from(vms) + noise[n as usize % 8]) * 10.0;
        records.push(w("quiet-1", 1, n, 0.049, 90, Some((vms, busy))));
    }
    let r = capacity(&records, &REQ, 2.0);
    let ramp = r.ramp.as_ref().unwrap();
    assert!(
        matches!(ramp.verdict, RampVerdict::Unresolved { .. }),
        "{ramp:?}"
    );
    let text = render_text(&r);
    crate::testing::assert_contains(&text, "the line gives no VM count");
    assert!(!text.contains("the line says"), "{text}");
}
