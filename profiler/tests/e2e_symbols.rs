//! End-to-end, symbol-based sources: a stripped QEMU whose symbols come from a separate debug
//! file in a build-id tree, and timer callbacks by name. Root, real guests.

mod common;

use std::time::Duration;

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
    spec.extra_append = format!("workload=inb:0x378:{N} workload_delay=8");
    let records = record_workload(
        &spec,
        &image,
        dir.path(),
        &["--debug-dir".as_ref(), debug_root.as_os_str()],
        Duration::from_secs(6),
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
    // UHCI's frame timer runs at 1 kHz while the tablet is attached.
    let full: Vec<_> = windows.iter().filter(|w| !w.partial).collect();
    assert!(!full.is_empty());
    let last = full.last().unwrap();
    // Subpage regions (nameless) are not counted twice: every counted read has a device name.
    assert!(
        last.devices.iter().all(|d| !d.name.starts_with("region@")),
        "{last:?}"
    );
    let frame_timer = last
        .timers
        .iter()
        .find(|t| t.callback == "uhci_frame_timer")
        .unwrap_or_else(|| panic!("no uhci_frame_timer: {last:?}"));
    assert!(frame_timer.count >= 4_000, "{frame_timer:?}");
}
