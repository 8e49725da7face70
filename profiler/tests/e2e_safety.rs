//! End-to-end, safety: QEMU is left as it was found whatever happens to the profiler, and two
//! profilers on one QEMU both count everything. Root, real guests on the USDT QEMU.

mod common;

use std::{
    os::unix::fs::FileExt as _,
    path::PathBuf,
    process::{Child, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use common::*;
use xtask::launch::{DeviceSet, GuestSpec, RunningGuest, launch};

/// The values of QEMU's `memory_region_ops_read/_write` USDT semaphores, read from its memory
/// where its ELF notes and `/proc/PID/maps` put them.
fn semaphores(pid: u32) -> Vec<u16> {
    let bytes = std::fs::read(format!("/proc/{pid}/exe")).unwrap();
    let sites = profiler::offer::usdt::find_region_ops_sites(&bytes)
        .unwrap()
        .expect("a USDT QEMU");
    let segments = profiler::offer::elf::load_segments(&bytes).unwrap();
    let inode = profiler::offer::exe::exe_identity(pid).unwrap().1;
    let bias = profiler::offer::exe::load_bias(pid, inode, |off| {
        segments.iter().find_map(|s| s.vaddr_of(off))
    })
    .unwrap();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    sites
        .read
        .iter()
        .chain(&sites.write)
        .map(|s| {
            let mut buf = [0u8; 2];
            mem.read_exact_at(&mut buf, bias + s.semaphore.expect("guarded site"))
                .unwrap();
            u16::from_ne_bytes(buf)
        })
        .collect()
}

/// Polls until QEMU's semaphores read `want`.
fn wait_semaphores(pid: u32, want: u16, what: &str) {
    let deadline = Instant::now() + HANG;
    loop {
        let now = semaphores(pid);
        if now.iter().all(|&v| v == want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: semaphores {now:?}, expected all {want}"
        );
        sleep(Duration::from_millis(100));
    }
}

/// A booted guest on the USDT QEMU; with a workload (`append`), also the socket of its sync
/// port: the workload waits for the test's go line.
fn usdt_guest(
    test: &str,
    name: &str,
    append: &str,
) -> Option<(RunningGuest, tempfile::TempDir, Option<PathBuf>)> {
    let image = e2e_guest_image(test)?;
    let qemu = usdt_qemu(test)?;
    let dir = run_dir(test);
    let mut spec = GuestSpec::new(name, DeviceSet::Noisy);
    spec.qemu = qemu;
    spec.extra_append = append.into();
    let ctl = (!append.is_empty()).then(|| add_sync_port(&mut spec, dir.path()));
    let guest = launch(&spec, &image, dir.path()).expect("launch");
    guest.wait_ready(BOOT).expect("boots");
    Some((guest, dir, ctl))
}

fn recorder(vm: &str, out: &std::path::Path) -> Child {
    profiler()
        .args(["record", "--window", "1", "--vm", vm, "--output"])
        .arg(out)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("profiler starts")
}

/// SIGKILL (as the OOM killer or `systemctl kill` would) leaves no semaphore raised: the
/// kernel manages them (uprobe `ref_ctr_offset`) and lowers them when the profiler's probes go.
#[test]
fn sigkill_of_the_profiler_leaves_qemus_semaphores_at_zero() {
    let test = "sigkill_semaphores";
    let Some((guest, dir, _)) = usdt_guest(test, "e2e-sigkill", "") else {
        return;
    };
    let pid = guest.pid();
    assert_eq!(semaphores(pid), [0, 0], "a fresh QEMU");
    for round in 0..2 {
        let mut child = recorder("e2e-sigkill", &dir.path().join(format!("r{round}.jsonl")));
        wait_semaphores(pid, 1, "while recording");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        wait_semaphores(pid, 0, "after SIGKILL");
    }
    // A normal stop too.
    let mut child = recorder("e2e-sigkill", &dir.path().join("last.jsonl"));
    wait_semaphores(pid, 1, "while recording");
    // SAFETY: plain signal to our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert!(child.wait().unwrap().success());
    assert_eq!(semaphores(pid), [0, 0], "after a normal stop");
}

/// Two profilers on the same QEMU at once: both count every one of the guest's N reads, and
/// QEMU's semaphores are back to zero when both have gone.
#[test]
fn two_profilers_at_once_both_count_everything() {
    let test = "two_profilers";
    const N: u64 = 30_000;
    let Some((guest, dir, ctl)) = usdt_guest(test, "e2e-two", &format!("workload=inb:0x378:{N}"))
    else {
        return;
    };
    let pid = guest.pid();
    let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    let mut first = recorder("e2e-two", &a);
    let mut second = recorder("e2e-two", &b);
    wait_semaphores(pid, 1, "both recording (one breakpoint, one increment)");
    // Each has written a window of the VM, so each has attached: the workload may start.
    wait_for_record_of(&a, "e2e-two");
    wait_for_record_of(&b, "e2e-two");
    let _go = release_workload(&guest, &ctl.expect("a sync port"));
    guest
        .wait_for_line("PROFILER-WORKLOAD-DONE", BOOT)
        .expect("workload finishes");
    for child in [&mut first, &mut second] {
        // SAFETY: plain signal to our child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        assert!(child.wait().unwrap().success());
    }
    wait_semaphores(pid, 0, "both stopped");
    for path in [&a, &b] {
        let records = load(path);
        let windows = of(&records, "e2e-two");
        let (reads, _) = device_total(&windows, "parallel");
        eprintln!("{}: {reads} parallel reads of {N}", path.display());
        assert!((N..=N + N / 50).contains(&reads), "{reads} of {N}");
    }
}
