use super::*;
use crate::{
    record::{DeviceCount, TimerCallbackCount, WindowRecord},
    windows::finish::{self, WindowFacts},
};

/// The collector's closed windows as records with no other facts (no host, drops or
/// budget): what it measured.
trait Records {
    fn observe_records(
        &mut self,
        t: f64,
        observed: &[VmObservation],
        finals: &BTreeMap<VmKey, Attributed>,
    ) -> Vec<WindowRecord>;
    fn finish_records(&mut self, t: f64) -> Vec<WindowRecord>;
}

impl Records for Collector {
    fn observe_records(
        &mut self,
        t: f64,
        observed: &[VmObservation],
        finals: &BTreeMap<VmKey, Attributed>,
    ) -> Vec<WindowRecord> {
        let closed = self.observe(t, observed, finals);
        let frame = self.frame();
        closed
            .iter()
            .map(|c| finish::record(c, &WindowFacts::default(), &frame).0)
            .collect()
    }
    fn finish_records(&mut self, t: f64) -> Vec<WindowRecord> {
        let closed = self.finish(t);
        let frame = self.frame();
        closed
            .iter()
            .map(|c| finish::record(c, &WindowFacts::default(), &frame).0)
            .collect()
    }
}

fn vm(pid: u32, start_ticks: u64, name: &str) -> (VmKey, VmIdentity) {
    (
        VmKey { pid, start_ticks },
        crate::identity::fixtures::identity(name, pid),
    )
}

fn sources() -> Sources {
    Sources {
        timer: "syscall".into(),
        read: "unavailable: test".into(),
        write: "unavailable: test".into(),
        timer_callbacks: "unavailable: test fixture".into(),
        ..Default::default()
    }
}

fn obs(v: &(VmKey, VmIdentity), timer: u64, cpu: u64) -> VmObservation {
    VmObservation {
        key: v.0,
        identity: v.1.clone().into(),
        sources: sources().into(),
        totals: Attributed {
            counts: Counts {
                timer: Some(timer),
                fd_wakeups: Some(timer / 10),
                cpu_ticks: Some(cpu),
                ..Counts::default()
            },
            ..Attributed::default()
        },
    }
}

fn collector() -> Collector {
    Collector::new(
        10.0,
        "2026-11-22T00:00:00Z".parse::<DateTime<Utc>>().unwrap(),
        100,
    )
}

const NONE: &BTreeMap<VmKey, Attributed> = &BTreeMap::new();

#[test]
fn clock_boundaries() {
    let c = WindowClock::new(30.0);
    assert_eq!(c.index_at(0.0), 0);
    assert_eq!(c.index_at(29.999), 0);
    assert_eq!(c.index_at(30.0), 1);
    // Floating-point noise just under a boundary still counts as the boundary.
    assert_eq!(c.index_at(30.0 - 1e-9), 1);
    assert_eq!(c.index_at(61.0), 2);
    assert_eq!(c.start_of(2), 60.0);
    assert_eq!(c.end_of(2), 90.0);
}

#[test]
fn records_say_when_the_vms_process_started() {
    let a = vm(100, 6_000, "a");
    let mut c = collector().with_boot_time(Some(
        "2026-11-21T23:00:00Z".parse::<DateTime<Utc>>().unwrap(),
    ));
    c.observe_records(0.0, &[obs(&a, 0, 0)], NONE);
    let closed = c.observe_records(10.0, &[obs(&a, 10, 5)], NONE);
    // 6,000 ticks at 100 a second after boot.
    assert_eq!(
        closed[0].vm.started.as_deref(),
        Some("2026-11-21T23:01:00.000Z")
    );
    let mut unknown = collector();
    unknown.observe_records(0.0, &[obs(&a, 0, 0)], NONE);
    assert_eq!(
        unknown.observe_records(10.0, &[obs(&a, 1, 1)], NONE)[0]
            .vm
            .started,
        None
    );
}

#[test]
fn the_boot_time_puts_this_process_start_in_the_past_minute_or_earlier() {
    let boot = crate::identity::discovery::boot_time().unwrap();
    let now = Utc::now();
    assert!(boot < now);
    let own =
        crate::identity::discovery::read_stat(&Default::default(), std::process::id()).unwrap();
    let ticks = crate::identity::discovery::clock_ticks_per_second() as f64;
    let started = boot + TimeDelta::milliseconds((own.start_ticks as f64 / ticks * 1e3) as i64);
    // This test process started before now, and not long before: the test harness ran it.
    assert!(
        started <= now + TimeDelta::milliseconds(20),
        "{started} after {now}"
    );
    assert!(
        now - started < TimeDelta::hours(1),
        "{started} long before {now}"
    );
}

/// A VM first seen before QEMU opened /dev/kvm has no read count until its sources are
/// chosen again; the kernel counted it since it was watched, so the window has it.
#[test]
fn a_count_that_becomes_available_counts_from_zero() {
    let a = vm(100, 1, "a");
    let mut c = collector();
    c.observe_records(0.0, &[obs(&a, 0, 0)], NONE);
    let mut later = obs(&a, 10, 5);
    later.totals.counts.read = Some(42);
    c.observe_records(5.0, &[later.clone()], NONE);
    let closed = c.observe_records(10.0, &[later], NONE);
    assert_eq!(closed[0].read, Some(42));
    assert_eq!(closed[0].write, None, "still unavailable");
}

#[test]
fn full_windows_from_boundary_samples() {
    let a = vm(100, 1, "a");
    let mut c = collector();
    assert!(
        c.observe_records(0.0, &[obs(&a, 1000, 500)], NONE)
            .is_empty()
    );
    assert!(
        c.observe_records(5.0, &[obs(&a, 1500, 550)], NONE)
            .is_empty()
    );
    let closed = c.observe_records(10.0, &[obs(&a, 2000, 600)], NONE);
    assert_eq!(closed.len(), 1);
    let r = &closed[0];
    assert_eq!(r.window, 0);
    assert!(!r.partial);
    assert_eq!(r.partial_reason, None);
    assert_eq!(r.seconds, 10.0);
    assert_eq!(r.timer, Some(1000));
    assert_eq!(r.fd_wakeups, Some(100));
    assert_eq!(r.read, None);
    assert_eq!(r.cpu_seconds, Some(1.0));
    assert_eq!(r.start, "2026-11-22T00:00:00.000Z");
    let closed = c.observe_records(20.0, &[obs(&a, 2600, 600)], NONE);
    assert_eq!(closed[0].window, 1);
    assert_eq!(closed[0].timer, Some(600));
    assert_eq!(closed[0].cpu_seconds, Some(0.0));
    assert_eq!(closed[0].start, "2026-11-22T00:00:10.000Z");
}

#[test]
fn vm_appearing_mid_window_is_partial() {
    let a = vm(100, 1, "a");
    let b = vm(200, 2, "b");
    let mut c = collector();
    c.observe_records(0.0, &[obs(&a, 0, 0)], NONE);
    c.observe_records(4.0, &[obs(&a, 40, 0), obs(&b, 7, 0)], NONE);
    let closed = c.observe_records(10.0, &[obs(&a, 100, 0), obs(&b, 67, 0)], NONE);
    assert_eq!(closed.len(), 2);
    let rb = closed.iter().find(|r| r.vm.name == "b").unwrap();
    assert!(rb.partial);
    assert_eq!(rb.partial_reason, Some(PartialReason::VmStarted));
    assert_eq!(rb.seconds, 6.0);
    assert_eq!(rb.timer, Some(60));
    assert_eq!(rb.start, "2026-11-22T00:00:04.000Z");
    // Its next window is full.
    let closed = c.observe_records(20.0, &[obs(&a, 100, 0), obs(&b, 77, 0)], NONE);
    let rb = closed.iter().find(|r| r.vm.name == "b").unwrap();
    assert!(!rb.partial);
    assert_eq!(rb.seconds, 10.0);
}

#[test]
fn vm_exiting_mid_window_is_closed_at_once_with_final_counts() {
    let a = vm(100, 1, "a");
    let b = vm(200, 2, "b");
    let mut c = collector();
    c.observe_records(0.0, &[obs(&a, 0, 0), obs(&b, 0, 0)], NONE);
    c.observe_records(12.0, &[obs(&a, 5, 0), obs(&b, 50, 10)], NONE);
    // b's window 0 closed at 10 with 0..12's counts (sample lag goes to the older window).
    let mut finals = BTreeMap::new();
    finals.insert(
        b.0,
        Attributed {
            counts: Counts {
                timer: Some(80),
                fd_wakeups: Some(8),
                read: None,
                write: None,
                cpu_ticks: None,
                in_kernel: None,
                ..Counts::default()
            },
            ..Attributed::default()
        },
    );
    let closed = c.observe_records(15.0, &[obs(&a, 9, 0)], &finals);
    assert_eq!(closed.len(), 1);
    let rb = &closed[0];
    assert_eq!(rb.vm.name, "b");
    assert_eq!(rb.window, 1);
    assert!(rb.partial);
    assert_eq!(rb.partial_reason, Some(PartialReason::VmExited));
    assert_eq!(rb.seconds, 5.0);
    assert_eq!(rb.timer, Some(30));
    assert_eq!(rb.fd_wakeups, Some(3));
    assert_eq!(rb.cpu_seconds, Some(0.0));
    assert!(c.running().iter().all(|r| r.identity.name == "a"));
}

#[test]
fn pid_reuse_is_a_new_vm() {
    let old = vm(300, 10, "old");
    let new = vm(300, 99, "new");
    let mut c = collector();
    c.observe_records(0.0, &[obs(&old, 0, 0)], NONE);
    let closed = c.observe_records(3.0, &[obs(&new, 0, 0)], NONE);
    assert_eq!(closed.len(), 1);
    assert_eq!(closed[0].vm.name, "old");
    assert_eq!(closed[0].partial_reason, Some(PartialReason::VmExited));
    let closed = c.observe_records(10.0, &[obs(&new, 20, 0)], NONE);
    assert_eq!(closed[0].vm.name, "new");
    assert_eq!(closed[0].partial_reason, Some(PartialReason::VmStarted));
    assert_eq!(closed[0].seconds, 7.0);
}

#[test]
fn stop_flushes_running_window_as_partial() {
    let a = vm(100, 1, "a");
    let mut c = collector();
    c.observe_records(0.0, &[obs(&a, 0, 0)], NONE);
    c.observe_records(10.0, &[obs(&a, 10, 0)], NONE);
    c.observe_records(13.5, &[obs(&a, 45, 0)], NONE);
    let fin = c.finish_records(13.5);
    assert_eq!(fin.len(), 1);
    assert_eq!(fin[0].window, 1);
    assert_eq!(fin[0].partial_reason, Some(PartialReason::ProfilerStopped));
    assert_eq!(fin[0].seconds, 3.5);
    assert_eq!(fin[0].timer, Some(35));
    // Stopping exactly on a boundary emits no empty window.
    let mut c = collector();
    c.observe_records(0.0, &[obs(&a, 0, 0)], NONE);
    assert_eq!(c.observe_records(10.0, &[obs(&a, 10, 0)], NONE).len(), 1);
    assert!(c.finish_records(10.0).is_empty());
}

#[test]
fn unavailable_counts_stay_null() {
    let a = vm(100, 1, "a");
    let mut c = collector();
    let mut o = obs(&a, 0, 0);
    o.totals.counts.timer = None;
    c.observe_records(0.0, std::slice::from_ref(&o), NONE);
    let closed = c.observe_records(10.0, &[o], NONE);
    assert_eq!(closed[0].timer, None);
    assert_eq!(closed[0].read, None);
}

#[test]
fn per_device_and_callback_deltas() {
    let a = vm(100, 1, "a");
    let mut c = collector();
    let mut o = obs(&a, 0, 0);
    o.totals.devices.insert(DeviceKey::named("uhci"), (100, 0));
    o.totals.callbacks.insert("uhci_frame_timer".into(), 1000);
    c.observe_records(0.0, std::slice::from_ref(&o), NONE);
    o.totals.devices.insert(DeviceKey::named("uhci"), (350, 0));
    o.totals
        .devices
        .insert(DeviceKey::named("parallel"), (0, 7));
    o.totals.devices.insert(DeviceKey::named("hpet"), (0, 0));
    o.totals.callbacks.insert("uhci_frame_timer".into(), 11000);
    let closed = c.observe_records(10.0, &[o], NONE);
    assert_eq!(
        closed[0].devices,
        vec![
            DeviceCount {
                name: "uhci".into(),
                owner: None,
                read: 250,
                write: 0
            },
            DeviceCount {
                name: "parallel".into(),
                owner: None,
                read: 0,
                write: 7
            },
        ]
    );
    assert_eq!(
        closed[0].timers,
        vec![TimerCallbackCount {
            callback: "uhci_frame_timer".into(),
            count: 10000
        }]
    );
}

#[test]
fn device_keys_carry_the_owner() {
    let key = DeviceKey {
        name: "operational".into(),
        owner: Some("qemu-xhci".into()),
    };
    let a = vm(100, 1, "a");
    let mut c = collector();
    let mut o = obs(&a, 0, 0);
    c.observe_records(0.0, std::slice::from_ref(&o), NONE);
    o.totals.devices.insert(key, (3, 4));
    let closed = c.observe_records(10.0, &[o], NONE);
    assert_eq!(closed[0].devices[0].name, "operational");
    assert_eq!(closed[0].devices[0].owner.as_deref(), Some("qemu-xhci"));
}

#[test]
fn running_window_grows() {
    let a = vm(100, 1, "a");
    let mut c = collector();
    c.observe_records(0.0, &[obs(&a, 0, 0)], NONE);
    c.observe_records(3.0, &[obs(&a, 30, 0)], NONE);
    let r = c.running();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].activity.counts.timer, Some(30));
    assert_eq!(r[0].elapsed, 3.0);
    assert_eq!(r[0].window, 0);
}
