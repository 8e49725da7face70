//! End-to-end, read/write by device: a QEMU built with USDT probes (`cargo xtask qemu-usdt`),
//! real guests, the real profiler binary, as root.

mod common;

use std::time::Duration;

use common::*;
use xtask::launch::{DeviceSet, GuestSpec, launch};

/// The guest reads the parallel port's data register exactly N times: the profiler must
/// count N `parallel` reads (+2 % at most for the guest's own driver traffic).
#[test]
fn exact_parallel_port_reads_by_name() {
    let Some(image) = e2e_guest_image("exact_parallel_port_reads") else {
        return;
    };
    let Some(qemu) = usdt_qemu("exact_parallel_port_reads") else {
        return;
    };
    const N: u64 = 50_000;
    let dir = run_dir("parallel");
    let mut spec = GuestSpec::new("e2e-lpt", DeviceSet::Noisy);
    spec.qemu = qemu;
    spec.extra_append = format!("workload=inb:0x378:{N}");
    let records = record_workload(&spec, &image, dir.path(), &[], 0);
    let windows = of(&records, "e2e-lpt");
    assert!(!windows.is_empty());
    for w in &windows {
        assert_eq!(w.sources.read, "usdt", "{w:?}");
        assert!(w.read.is_some() && w.write.is_some());
    }
    let (reads, _) = device_total(&windows, "parallel");
    eprintln!("parallel reads counted: {reads} of {N}");
    assert!(reads >= N, "counted {reads} of {N} parallel reads");
    assert!(
        reads <= N + N / 50,
        "counted {reads} for {N} parallel reads"
    );
    // The USDT build has DWARF, so each region names the QOM type of the device owning it.
    assert!(
        windows
            .iter()
            .flat_map(|w| &w.devices)
            .any(|d| d.name == "parallel" && d.owner.as_deref() == Some("isa-parallel")),
        "{windows:#?}"
    );
    // The per-device rows add up to the totals.
    for w in &windows {
        let sum: u64 = w.devices.iter().map(|d| d.read).sum();
        assert_eq!(Some(sum), w.read, "{w:?}");
    }
    let report =
        String::from_utf8(run_ok(profiler().arg("report").arg(recording_path(dir.path()))).stdout)
            .unwrap();
    assert!(report.contains("parallel"), "{report}");
}

/// The Pulsar pair on the USDT QEMU: the tablet guest's UHCI controller is polled all the
/// time; the quiet guest shows no USB, serial or parallel events once booted.
#[test]
fn uhci_polling_shows_and_quiet_guest_has_no_legacy_device_events() {
    let Some(image) = e2e_guest_image("uhci_vs_quiet") else {
        return;
    };
    let Some(qemu) = usdt_qemu("uhci_vs_quiet") else {
        return;
    };
    let dir = run_dir("uhci-vs-quiet");
    let mut noisy = GuestSpec::new("e2e-usb", DeviceSet::Noisy);
    noisy.qemu = qemu.clone();
    let mut quiet = GuestSpec::new("e2e-calm", DeviceSet::Quiet);
    quiet.qemu = qemu;
    let g1 = launch(&noisy, &image, dir.path()).unwrap();
    let g2 = launch(&quiet, &image, dir.path()).unwrap();
    g1.wait_ready(BOOT).unwrap();
    g2.wait_ready(BOOT).unwrap();
    // The guest's uhci-hcd may still be starting its schedule just after boot (seen once: the
    // frame timer ran ~1.5 s of a 5 s window); let it settle.
    std::thread::sleep(Duration::from_secs(6));
    let rec = recording_path(dir.path());
    run_ok(
        profiler()
            .args(["record", "--window", "5", "--duration", "10"])
            .args(["--vm", "e2e-usb", "--vm", "e2e-calm", "--output"])
            .arg(&rec),
    );
    let records = load(&rec);
    let usb: Vec<_> = of(&records, "e2e-usb")
        .into_iter()
        .filter(|w| !w.partial)
        .collect();
    let calm: Vec<_> = of(&records, "e2e-calm")
        .into_iter()
        .filter(|w| !w.partial)
        .collect();
    assert_eq!((usb.len(), calm.len()), (2, 2), "{records:#?}");
    for w in &usb {
        let (uhci_reads, _) = device_total(&[w], "uhci");
        // UHCI's frame timer polls the schedule; Linux's uhci-hcd reads its status ~25/s.
        assert!(uhci_reads >= 50, "uhci reads in 5 s: {uhci_reads}: {w:?}");
    }
    // The USDT build is unstripped, so timers are split by callback: UHCI's 1 kHz frame timer.
    let last = usb.last().unwrap();
    assert_eq!(last.sources.timer_callbacks, "symbols");
    assert_frame_timer_dominates(last);
    assert!(
        !calm
            .last()
            .unwrap()
            .timers
            .iter()
            .any(|t| t.callback.starts_with("uhci"))
    );
    for w in &calm {
        for quiet_device in ["uhci", "parallel", "serial"] {
            assert_eq!(
                device_total(&[w], quiet_device),
                (0, 0),
                "{quiet_device}: {w:?}"
            );
        }
        assert_eq!(w.sources.read, "usdt");
        assert!(w.read.is_some());
    }
}

/// UHCI's 1 kHz frame timer is most of the window's timer events, and runs at a kHz-class
/// rate. Not 1,000 runs a second: a QEMU main loop that runs late (a slow or busy host)
/// catches up on a late timer in one run, so the runs depend on the host's speed; the share
/// of the window's own timer events does not.
fn assert_frame_timer_dominates(w: &profiler::record::WindowRecord) {
    let frame = w
        .timers
        .iter()
        .find(|t| t.callback == "uhci_frame_timer")
        .unwrap_or_else(|| panic!("no uhci_frame_timer: {w:?}"));
    let timer = w.timer.expect("timer events counted");
    eprintln!(
        "uhci_frame_timer ran {} times of {timer} timer events in {} s",
        frame.count, w.seconds
    );
    assert!(frame.count * 2 >= timer, "{frame:?} of {timer}: {w:?}");
    // The next busiest timer of an idle Linux guest (its APIC timer) runs ~15 times a second.
    assert!(
        frame.count as f64 >= 100.0 * w.seconds,
        "{frame:?} in {} s: {w:?}",
        w.seconds
    );
}
