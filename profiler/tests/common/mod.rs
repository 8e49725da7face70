//! Shared set-up for the end-to-end tests: real QEMU guests, the real profiler binary, root.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use profiler::record::{WindowRecord, read_records};
use xtask::{
    guest::GuestImage,
    launch::{DeviceSet, GuestSpec, RunningGuest, launch},
};

/// Returns `None` (after saying why) when the end-to-end prerequisites are missing. With
/// `PROFILER_E2E_REQUIRE=1` (set by `cargo xtask test` as root) a missing prerequisite
/// fails the test instead.
pub fn e2e_guest_image(test: &str) -> Option<GuestImage> {
    let skip = |why: &str| {
        if std::env::var_os("PROFILER_E2E_REQUIRE").is_some() {
            panic!("{test}: {why}");
        }
        eprintln!("SKIPPED {test}: {why}");
        None
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("needs root (eBPF); run `sudo -E cargo xtask test`");
    }
    let (Some(kernel), Some(initrd)) = (
        std::env::var_os("PROFILER_GUEST_KERNEL"),
        std::env::var_os("PROFILER_GUEST_INITRD"),
    ) else {
        return skip(
            "PROFILER_GUEST_KERNEL/INITRD not set; run `cargo xtask test`, which builds the guest",
        );
    };
    Some(GuestImage {
        kernel: kernel.into(),
        initrd: initrd.into(),
    })
}

pub fn run_dir(test: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("profiler-e2e-{test}-"))
        .tempdir()
        .expect("temp dir")
}

pub fn boot(name: &str, devices: DeviceSet, image: &GuestImage, dir: &Path) -> RunningGuest {
    let guest = launch(&GuestSpec::new(name, devices), image, dir).expect("launch QEMU");
    guest
        .wait_ready(Duration::from_secs(180))
        .expect("guest boots");
    guest
}

pub fn profiler() -> Command {
    Command::new(env!("CARGO_BIN_EXE_profiler"))
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run profiler");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn load(path: &Path) -> Vec<WindowRecord> {
    let f = std::fs::File::open(path).expect("recording exists");
    let (records, warnings) = read_records(std::io::BufReader::new(f)).expect("valid recording");
    assert!(warnings.is_empty(), "{warnings:?}");
    records
}

pub fn of<'a>(records: &'a [WindowRecord], name: &str) -> Vec<&'a WindowRecord> {
    records.iter().filter(|r| r.vm.name == name).collect()
}

pub fn recording_path(dir: &Path) -> PathBuf {
    dir.join("recording.jsonl")
}
