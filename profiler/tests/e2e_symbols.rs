//! End-to-end, symbol-based sources: a stripped QEMU whose symbols come from a separate debug
//! file in a build-id tree, and timer callbacks by name. Root, real guests.

mod common;

use common::*;
use xtask::launch::{DeviceSet, GuestSpec};

#[test]
fn stripped_qemu_with_debug_file_counts_reads_and_names_timer_callbacks() {
    let Some(image) = e2e_guest_image("stripped_with_debug_file") else {
        return;
    };
    let Some(qemu) = usdt_qemu("stripped_with_debug_file") else {
        return;
    };
    let dir = run_dir("symbols");
    let (stripped, debug_root) = stripped_qemu_with_debug_file(&qemu, dir.path());
    const N: u64 = 20_000;
    let mut spec = GuestSpec::new("e2e-sym", DeviceSet::Noisy);
    spec.qemu = stripped;
    spec.extra_append = format!("workload=inb:0x378:{N}");
    let records = record_workload(
        &spec,
        &image,
        dir.path(),
        &["--debug-dir".as_ref(), debug_root.as_os_str()],
        // The frame timer is checked in a window after the workload: while the guest's
        // reads hold QEMU's big lock, its main loop runs the timer less often.
        1,
    );
    let windows = of(&records, "e2e-sym");
    assert!(windows.len() >= 3, "{records:#?}");
    for w in &windows {
        assert_eq!(w.sources.read, "symbols", "{w:?}");
        assert_eq!(w.sources.timer_callbacks, "symbols", "{w:?}");
    }
    let (reads, _) = device_total(&windows, "parallel");
    eprintln!("parallel reads counted through memory_region_dispatch_read: {reads} of {N}");
    assert!((N..=N + N / 50).contains(&reads), "{reads} for {N}");
    // UHCI's frame timer runs at 1 kHz while the tablet is attached (the last full window
    // started after the workload).
    let full: Vec<_> = windows.iter().filter(|w| !w.partial).collect();
    assert!(!full.is_empty());
    let last = full.last().unwrap();
    // Subpage regions (nameless) are not counted twice: every counted read has a device name.
    assert!(
        last.devices.iter().all(|d| !d.name.starts_with("region@")),
        "{last:?}"
    );
    // Most of the window's timer events, at a kHz-class rate: not 1,000 runs a second, as a
    // late QEMU main loop (a slow or busy host) catches up on a late timer in one run.
    let frame_timer = last
        .timers
        .iter()
        .find(|t| t.callback == "uhci_frame_timer")
        .unwrap_or_else(|| panic!("no uhci_frame_timer: {last:?}"));
    let timer = last.timer.expect("timer events counted");
    eprintln!(
        "uhci_frame_timer ran {} times of {timer} timer events in {} s",
        frame_timer.count, last.seconds
    );
    assert!(
        frame_timer.count * 2 >= timer,
        "{frame_timer:?} of {timer}: {last:?}"
    );
    // An idle Linux guest's next busiest timer (its APIC timer) runs ~15 times a second.
    assert!(
        frame_timer.count as f64 >= 100.0 * last.seconds,
        "{frame_timer:?} in {} s: {last:?}",
        last.seconds
    );
}
