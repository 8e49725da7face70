//! End-to-end, a bad environment: each gives a clear message and the right exit code, and
//! what still works keeps working. Root (to take privileges away, and to hide parts of sysfs
//! in a private mount namespace); real guests where counting is involved.

mod common;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use xtask::launch::{DeviceSet, GuestSpec, launch};

fn profiler_path() -> &'static str {
    env!("CARGO_BIN_EXE_profiler")
}

/// Runs `script` with `sh -c` in a private mount namespace (what it mounts there is seen by
/// nothing else on the host).
fn in_mount_namespace(script: &str) -> std::process::Output {
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .output()
        .expect("unshare runs")
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn missing_privileges_are_named() {
    if Prereq::new("missing_privileges").root().is_none() {
        return;
    }
    // Root without CAP_BPF and CAP_PERFMON.
    let out = Command::new("setpriv")
        .args(["--bounding-set=-bpf,-perfmon", profiler_path()])
        .args(["record", "--duration", "1", "-o", "/dev/null"])
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(
        t.contains("without CAP_BPF (") && t.contains("CAP_PERFMON ("),
        "{t}"
    );
    assert!(!t.contains("CAP_SYS_PTRACE"), "only what is missing: {t}");
    // Not root at all: everything it lacks, and what to do.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            profiler_path(),
        ])
        .args(["top"])
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(
        t.contains("not root") && t.contains("CAP_SYS_PTRACE") && t.contains("sudo"),
        "{t}"
    );
    // `list` works unprivileged, saying what it cannot read.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            profiler_path(),
            "list",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn no_tracefs_is_a_clear_error() {
    if Prereq::new("no_tracefs").root().is_none()
        || Prereq::new("no_tracefs").tool("unshare").is_none()
    {
        return;
    }
    // /sys/kernel hidden: no tracefs, nowhere to mount it.
    let out = in_mount_namespace(&format!(
        "mount -t tmpfs none /sys/kernel && exec {} record --duration 1 -o /dev/null",
        profiler_path()
    ));
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("tracefs is not mounted"), "{t}");
}

#[test]
fn a_kernel_without_the_kvm_tracepoints_or_btf_still_records() {
    let test = "no_kvm_tracepoints";
    let Some(image) = e2e_guest_image(test) else {
        return;
    };
    let dir = run_dir("env-kvm");
    let guest = launch(
        &GuestSpec::new("e2e-env", DeviceSet::Quiet),
        &image,
        dir.path(),
    )
    .expect("launch");
    guest.wait_ready(BOOT).expect("boots");
    let rec = dir.path().join("rec.jsonl");
    // The kvm tracepoints and the kernel's BTF gone; tracefs itself there (the profiler
    // mounts it in the namespace if the host had not).
    let out = in_mount_namespace(&format!(
        "mkdir -p /sys/kernel/tracing && (mountpoint -q /sys/kernel/tracing || mount -t tracefs \
         nodev /sys/kernel/tracing) && mount -t tmpfs none /sys/kernel/tracing/events/kvm && \
         mount -t tmpfs none /sys/kernel/btf && exec {} record --window 1 --duration 3 --vm \
         e2e-env -o {}",
        profiler_path(),
        rec.display()
    ));
    assert!(out.status.success(), "{}", text(&out));
    let records = load(&rec);
    let windows = of(&records, "e2e-env");
    assert!(!windows.is_empty());
    assert!(windows.iter().all(|w| w.timer.is_some()), "{windows:#?}");

    // A KVM guest then has no read/write source, and says why.
    let Some(_kvm) = kvm_guest_without_qmp("e2e-env-kvm") else {
        return;
    };
    let out = in_mount_namespace(&format!(
        "mkdir -p /sys/kernel/tracing && (mountpoint -q /sys/kernel/tracing || mount -t tracefs \
         nodev /sys/kernel/tracing) && mount -t tmpfs none /sys/kernel/tracing/events/kvm && \
         exec {} list --json",
        profiler_path()
    ));
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let vm: serde_json::Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["name"] == "e2e-env-kvm")
        .expect("the KVM guest is listed");
    let read = vm["sources"]["read"].as_str().unwrap();
    assert!(
        read.contains("KVM tracepoints: tracepoint kvm:kvm_pio does not exist"),
        "{read}"
    );
}

#[test]
fn a_closed_output_pipe_stops_the_recording() {
    let test = "closed_pipe";
    let Some(image) = e2e_guest_image(test) else {
        return;
    };
    let dir = run_dir("env-pipe");
    let guest = launch(
        &GuestSpec::new("e2e-pipe", DeviceSet::Quiet),
        &image,
        dir.path(),
    )
    .expect("launch");
    guest.wait_ready(BOOT).expect("boots");
    let started = Instant::now();
    // The reader of its standard output goes away at once.
    let mut child = Command::new(profiler_path())
        .args([
            "record",
            "--window",
            "1",
            "--duration",
            "300",
            "--vm",
            "e2e-pipe",
            "-o",
            "-",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    let mut err = String::new();
    use std::io::Read as _;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    // Long before its --duration 300 (loading the eBPF programs on a slow, busy host takes
    // a while, so not within seconds).
    assert!(
        started.elapsed() < Duration::from_secs(150),
        "it kept recording into a closed pipe"
    );
    assert!(!status.success(), "{err}");
    assert!(err.contains("broken pipe"), "{err}");
}

#[test]
fn a_selection_that_matches_nothing_says_so_and_fails() {
    if Prereq::new("no_match").root().is_none() {
        return;
    }
    let out = profiler()
        .args([
            "record",
            "--window",
            "1",
            "--duration",
            "3",
            "--vm",
            "no-such-vm",
            "-o",
            "/dev/null",
        ])
        .output()
        .unwrap();
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    let said = t.matches("no QEMU process matches --vm no-such-vm").count();
    assert!(said >= 3, "at the start and each window: {said}\n{t}");
    assert!(t.contains("nothing was recorded"), "{t}");
}

#[test]
fn output_files_are_not_world_readable() {
    use std::os::unix::fs::PermissionsExt as _;
    if Prereq::new("file_modes").root().is_none() {
        return;
    }
    let dir = run_dir("env-modes");
    let rec = dir.path().join("rec.jsonl");
    run_ok(
        profiler()
            .args(["record", "--window", "1", "--duration", "1"])
            .arg("-o")
            .arg(&rec),
    );
    let mode = std::fs::metadata(&rec).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode & 0o027, 0, "{mode:o}");
}
