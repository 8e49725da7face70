use super::*;
use crate::{
    attribution::DeviceKey,
    windows::collector::{Attributed, CallbackTotals, Counts, DeviceTotals},
};

fn obs(pid: u32, name: &str, read: &str) -> VmObservation {
    let mut devices = DeviceTotals::new();
    let mut callbacks = CallbackTotals::new();
    if read == "usdt" {
        devices.insert(DeviceKey::named("uhci"), (700, 20));
        devices.insert(
            DeviceKey {
                name: "operational".into(),
                owner: Some("qemu-xhci".into()),
            },
            (3, 4),
        );
        callbacks.insert("uhci_frame_timer".into(), 9000);
    }
    VmObservation {
        key: VmKey {
            pid,
            start_ticks: 1,
        },
        identity: VmIdentity {
            uuid: Some("5f1c2a9e-7b3d-4c11-9a0e-2d4f6b8c1e37".into()),
            ..crate::identity::fixtures::identity(name, pid)
        }
        .into(),
        sources: Sources {
            timer: "syscall".into(),
            read: read.into(),
            write: read.into(),
            timer_callbacks: if read == "usdt" {
                "symbols".into()
            } else {
                "unavailable: stripped".into()
            },
            ..Default::default()
        }
        .into(),
        totals: Attributed {
            counts: Counts {
                timer: Some(1000),
                fd_wakeups: Some(10),
                read: (read == "usdt").then_some(703),
                write: (read == "usdt").then_some(24),
                cpu_ticks: Some(250),
                ..Counts::default()
            },
            devices,
            callbacks,
            ..Attributed::default()
        },
    }
}

fn state() -> Arc<Mutex<FleetState>> {
    let mut s = FleetState::new(30.0, 100);
    s.update(
        0.0,
        &[
            obs(10, "noisy", "usdt"),
            obs(20, "quiet\"\\\n\u{1b}[31m", "unavailable: stripped QEMU"),
        ],
        &[],
        300.0,
    );
    s.sources_up = vec![("syscall-tracepoints", true), ("kvm-tracepoints", false)];
    s.dropped = vec![
        ("COUNTERS", 3),
        ("PENDING", 0),
        (crate::probes::NESTED_RUNS, 2),
    ];
    Arc::new(Mutex::new(s))
}

#[test]
fn counters_info_and_own_cost_under_one_prefix() {
    let text = openmetrics_text(&state());
    assert!(text.ends_with("# EOF\n"), "{text}");
    for line in [
        "# TYPE qemu_profiler_timer_events counter",
        "qemu_profiler_timer_events_total{vm=\"noisy\",pid=\"10\"} 1000",
        "qemu_profiler_reads_total{vm=\"noisy\",pid=\"10\"} 703",
        "qemu_profiler_device_reads_total{vm=\"noisy\",pid=\"10\",device=\"uhci\"} 700",
        "qemu_profiler_device_writes_total{vm=\"noisy\",pid=\"10\",device=\"operational\",device_type=\"qemu-xhci\"} 4",
        "qemu_profiler_timer_callback_runs_total{vm=\"noisy\",pid=\"10\",callback=\"uhci_frame_timer\"} 9000",
        "# TYPE qemu_profiler_device_model_cpu_seconds counter",
        "# UNIT qemu_profiler_device_model_cpu_seconds seconds",
        "qemu_profiler_device_model_cpu_seconds_total{vm=\"noisy\",pid=\"10\"} 2.5",
        "qemu_profiler_vm_info{vm=\"noisy\",pid=\"10\",uuid=\"5f1c2a9e-7b3d-4c11-9a0e-2d4f6b8c1e37\",accel=\"tcg\",timer_source=\"syscall\",read_source=\"usdt\",write_source=\"usdt\",timer_callbacks_source=\"symbols\"} 1",
        "qemu_profiler_source_up{source=\"kvm-tracepoints\"} 0",
        "qemu_profiler_vms{read_source=\"unavailable\"} 1",
        "qemu_profiler_samples_total 1",
        "qemu_profiler_bpf_map_dropped_updates_total{map=\"COUNTERS\"} 3",
        "qemu_profiler_bpf_map_dropped_updates_total{map=\"PENDING\"} 0",
        "qemu_profiler_bpf_program_skipped_runs_total 2",
    ] {
        assert!(text.contains(line), "missing {line}\n{text}");
    }
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(line.starts_with("qemu_profiler_"), "{line}");
        assert!(
            !line.contains("instance=") && !line.contains("job="),
            "{line}"
        );
    }
}

/// Under a budget each live VM shows its duty, cost per hit and unbudgeted cost; without
/// one (or once the VM exits) the families are absent.
#[test]
fn budget_gauges_show_each_live_vms_duty_and_cost_per_hit() {
    let state = state();
    assert!(!openmetrics_text(&state).contains("budget_"));
    let view = crate::windows::budget::DutyView {
        hits_per_second: 5000.0,
        hit_cost: 2e-6,
        learned: true,
        full_cost: 0.01,
        duty: 0.1,
        closing_hits_per_second: 100.0,
        closing_cost: 0.0002,
    };
    state
        .lock()
        .unwrap()
        .set_duties(vec![(10, view), (99, view)]);
    let text = openmetrics_text(&state);
    for line in [
        "# TYPE qemu_profiler_budget_probed_ratio gauge",
        "qemu_profiler_budget_probed_ratio{vm=\"noisy\",pid=\"10\"} 0.1",
        "# UNIT qemu_profiler_budget_hit_cost_seconds seconds",
        "qemu_profiler_budget_hit_cost_seconds{vm=\"noisy\",pid=\"10\"} 0.000002",
        "qemu_profiler_budget_unbudgeted_cost_ratio{vm=\"noisy\",pid=\"10\"} 0.01",
        "qemu_profiler_budget_closing_cost_ratio{vm=\"noisy\",pid=\"10\"} 0.0002",
    ] {
        assert!(text.contains(line), "missing {line}\n{text}");
    }
    assert!(!text.contains("pid=\"99\""), "a pid not watched: {text}");
    // The next sample without budget views drops them.
    state
        .lock()
        .unwrap()
        .update(1.0, &[obs(10, "noisy", "usdt")], &[], 300.0);
    assert!(!openmetrics_text(&state).contains("budget_"));
}

/// Under a budget the counters carry what scaling added to closed windows; an exited VM
/// keeps its addition for its grace period, and a new VM reusing its PID does not get it.
#[test]
fn budget_estimates_are_added_to_the_counters() {
    let state = state();
    let mut added = crate::windows::budget::EstimateAddition {
        timer: 500,
        read: 70,
        ..Default::default()
    };
    added.devices.insert(("uhci".into(), None), (70, 0));
    added.callbacks.insert("uhci_frame_timer".into(), 900);
    state
        .lock()
        .unwrap()
        .set_estimates(vec![(10, false, added.clone())]);
    let text = openmetrics_text(&state);
    for line in [
        "qemu_profiler_timer_events_total{vm=\"noisy\",pid=\"10\"} 1500",
        "qemu_profiler_fd_wakeups_total{vm=\"noisy\",pid=\"10\"} 10",
        "qemu_profiler_reads_total{vm=\"noisy\",pid=\"10\"} 773",
        "qemu_profiler_device_reads_total{vm=\"noisy\",pid=\"10\",device=\"uhci\"} 770",
        "qemu_profiler_timer_callback_runs_total{vm=\"noisy\",pid=\"10\",callback=\"uhci_frame_timer\"} 9900",
        "qemu_profiler_timer_events_total{vm=\"quiet",
    ] {
        assert!(text.contains(line), "missing {line}\n{text}");
    }
    // It exits (its final counts, the addition handed out once more), and a new VM takes
    // its PID: the addition stays with the exited one.
    let mut s = state.lock().unwrap();
    let mut gone = obs(10, "noisy", "usdt");
    gone.totals.counts.timer = Some(1100);
    let mut new = obs(10, "fresh", "usdt");
    new.key.start_ticks = 2;
    s.update(1.0, &[new], &[gone], 300.0);
    added.timer = 600;
    s.set_estimates(vec![(10, true, added)]);
    drop(s);
    let text = openmetrics_text(&state);
    assert!(
        text.contains("qemu_profiler_timer_events_total{vm=\"noisy\",pid=\"10\"} 1700"),
        "{text}"
    );
    assert!(
        text.contains("qemu_profiler_timer_events_total{vm=\"fresh\",pid=\"10\"} 1000"),
        "{text}"
    );
}

#[test]
fn what_cannot_be_observed_has_no_series() {
    let text = openmetrics_text(&state());
    // The stripped VM has timer series but no read/write/device/callback series.
    let quiet: Vec<&str> = text.lines().filter(|l| l.contains("pid=\"20\"")).collect();
    assert!(
        quiet
            .iter()
            .any(|l| l.starts_with("qemu_profiler_timer_events_total"))
    );
    for absent in [
        "reads_total",
        "writes_total",
        "device_reads",
        "device_writes",
        "timer_callback_runs",
        "in_kernel",
    ] {
        assert!(
            !quiet.iter().any(|l| l.contains(absent)),
            "{absent} present for an unobservable VM:\n{text}"
        );
    }
}

#[test]
fn label_values_are_escaped_and_cleaned() {
    let text = prometheus_text(&state());
    let line = text
        .lines()
        .find(|l| l.starts_with("qemu_profiler_timer_events_total{") && l.contains("pid=\"20\""))
        .unwrap();
    // Quote, backslash and newline escaped; the escape character cannot reach a terminal.
    crate::testing::assert_contains(line, r#"vm="quiet\"\\�"#);
    assert!(!line.contains('\u{1b}'));
}

#[test]
fn an_exited_vm_keeps_its_final_counts_for_the_grace_period() {
    let mut s = FleetState::new(30.0, 100);
    s.update(0.0, &[obs(10, "a", "usdt")], &[], 60.0);
    let mut last = obs(10, "a", "usdt");
    last.totals.counts.timer = Some(1500);
    s.update(5.0, &[], &[last], 60.0);
    assert_eq!(s.vms().count(), 1);
    assert_eq!(
        s.vms().next().unwrap().observation.totals.counts.timer,
        Some(1500)
    );
    s.update(64.0, &[], &[], 60.0);
    assert_eq!(s.vms().count(), 1);
    s.update(65.0, &[], &[], 60.0);
    assert_eq!(s.vms().count(), 0);
}

/// A KVM guest's own counts: vCPU wakeups, halt polls, exits by a bounded reason label, and
/// its threads' CPU by role, which stays as last read between window boundaries.
#[test]
fn a_kvm_guest_s_own_counts_and_cpu_by_role() {
    let mut kvm = obs(30, "pit", "kvm-tracepoints");
    kvm.totals.counts.vcpu_wakeups = Some(29_749);
    kvm.totals.counts.vcpu_halt_polls = Some(3);
    kvm.totals.exits.insert("HLT".into(), 29_000);
    kvm.totals.exits.insert("vmx:0x99".into(), 2);
    kvm.totals.exits.insert("vmx:0x98".into(), 1);
    kvm.totals.counts.cpu_roles = Some(crate::attribution::cpu_roles::RoleTicks {
        vcpu: 981,
        vcpu_guest: 1,
        device_model: 2,
        workers_in_process: 0,
        workers_outside: 56,
        vcpu_threads: 1,
    });
    let state = Arc::new(Mutex::new(FleetState::new(30.0, 100)));
    state
        .lock()
        .unwrap()
        .update(0.0, &[kvm.clone()], &[], 300.0);
    // A sample between boundaries: no thread read.
    kvm.totals.counts.cpu_roles = None;
    state.lock().unwrap().update(1.0, &[kvm], &[], 300.0);
    let text = openmetrics_text(&state);
    for line in [
        "qemu_profiler_vcpu_wakeups_total{vm=\"pit\",pid=\"30\"} 29749",
        "qemu_profiler_vcpu_halt_polls_total{vm=\"pit\",pid=\"30\"} 3",
        "qemu_profiler_kvm_exits_total{vm=\"pit\",pid=\"30\",reason=\"HLT\"} 29000",
        "qemu_profiler_kvm_exits_total{vm=\"pit\",pid=\"30\",reason=\"other\"} 3",
        "qemu_profiler_thread_cpu_seconds_total{vm=\"pit\",pid=\"30\",role=\"vcpu\"} 9.81",
        "qemu_profiler_thread_cpu_seconds_total{vm=\"pit\",pid=\"30\",role=\"kernel_workers\"} 0.56",
    ] {
        assert!(text.contains(line), "missing {line}\n{text}");
    }
    // A TCG guest has none of these series: absent, never 0.
    assert!(!openmetrics_text(&self::state()).contains("vcpu_wakeups_total"));
}
