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

/// The QEMU built with USDT probes (`cargo xtask qemu-usdt`), or `None` after saying why (a
/// failure under `PROFILER_E2E_REQUIRE`).
pub fn usdt_qemu(test: &str) -> Option<PathBuf> {
    match std::env::var_os("PROFILER_QEMU_USDT") {
        Some(p) => Some(p.into()),
        None if std::env::var_os("PROFILER_E2E_REQUIRE").is_some() => {
            panic!("{test}: PROFILER_QEMU_USDT not set")
        }
        None => {
            eprintln!("SKIPPED {test}: PROFILER_QEMU_USDT not set; run `cargo xtask test`");
            None
        }
    }
}

/// Boots `spec` (whose guest runs a port workload), records it with `extra` profiler
/// arguments until the workload is done plus `tail`, and returns the recording.
pub fn record_workload(
    spec: &GuestSpec,
    image: &GuestImage,
    dir: &Path,
    extra: &[&std::ffi::OsStr],
    tail: Duration,
) -> Vec<WindowRecord> {
    let guest = launch(spec, image, dir).expect("launch QEMU");
    let rec = recording_path(dir);
    // Recording starts before the guest boots, so the workload (delayed after the ready line)
    // runs while the probes are attached.
    let mut recorder = profiler()
        .args(["record", "--window", "5", "--vm", &spec.name])
        .args(extra)
        .arg("--output")
        .arg(&rec)
        // Inherited: the profiler's warnings show in the test output when something fails.
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("start profiler");
    guest
        .wait_ready(Duration::from_secs(180))
        .expect("guest boots");
    guest
        .wait_for_line("PROFILER-WORKLOAD-DONE", Duration::from_secs(120))
        .expect("workload finishes");
    std::thread::sleep(tail);
    // SAFETY: plain signal to our child.
    unsafe { libc::kill(recorder.id() as i32, libc::SIGINT) };
    assert!(recorder.wait().expect("profiler exits").success());
    load(&rec)
}

/// Reads and writes of device `name` summed over `windows`.
pub fn device_total(windows: &[&WindowRecord], name: &str) -> (u64, u64) {
    windows
        .iter()
        .flat_map(|w| &w.devices)
        .filter(|d| d.name == name)
        .fold((0, 0), |(r, w), d| (r + d.read, w + d.write))
}
