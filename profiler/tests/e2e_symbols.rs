//! End-to-end, symbol-based sources: a stripped QEMU whose symbols come from a separate debug
//! file in a build-id tree, and timer callbacks by name. Root, real guests.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::*;
use xtask::launch::{DeviceSet, GuestSpec};

fn sh(cmd: &mut Command) {
    let status = cmd.status().expect("tool runs");
    assert!(status.success(), "{cmd:?}: {status}");
}

/// GNU build-id of an ELF file, as hex, from `readelf -n`.
fn build_id(path: &Path) -> String {
    let out = Command::new("readelf")
        .arg("-n")
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .expect("binary has a build-id")
        .trim()
        .to_string()
}

/// A copy of the USDT QEMU with its symbols, DWARF and USDT notes removed, and its debug file
/// in `<dir>/debug/.build-id/NN/REST.debug` — what a distribution ships, minus the probes.
fn stripped_qemu_with_debug_file(qemu: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    // Named like QEMU so discovery recognises it.
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    let bin = dir.join("bin/qemu-system-x86_64");
    let debug = dir.join("qemu.debug");
    sh(Command::new("objcopy")
        .arg("--only-keep-debug")
        .arg(qemu)
        .arg(&debug));
    sh(Command::new("objcopy")
        .args([
            "--strip-debug",
            "--strip-unneeded",
            "--remove-section=.note.stapsdt",
        ])
        .arg(qemu)
        .arg(&bin));
    let id = build_id(&bin);
    let root = dir.join("debug");
    let tree = root.join(".build-id").join(&id[..2]);
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::rename(&debug, tree.join(format!("{}.debug", &id[2..]))).unwrap();
    (bin, root)
}

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
