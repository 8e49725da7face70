//! End-to-end: every timer source counts a process that waits like QEMU exactly (what it can
//! see), and the syscall tracepoints are attached only while a VM needs them (as root).
//!
//! The workload (`fixtures/waits/waits.c`) makes a known number of timed-out waits, fd-woken
//! waits and zero-timeout polls through the C library, as QEMU's event loop does.

mod common;

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use common::*;

const TIMERS: u64 = 400;
const FDS: u64 = 300;
const ZEROS: u64 = 1000;
const LATE: u64 = 200;
const INFINITE: u64 = 100;

/// Builds the workload with the system C compiler.
fn build_waits(dir: &Path, p: &Prereq) -> Option<PathBuf> {
    p.tool("cc")?;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/waits/waits.c");
    let bin = dir.join("waits");
    let out = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .expect("cc runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(bin)
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The workload, named like QEMU, waiting for `dir/go`.
fn start_waits(bin: &Path, dir: &Path, name: &str) -> KillOnDrop {
    let child = Command::new(bin)
        .arg0("qemu-system-x86_64")
        .arg(dir.join("go"))
        .arg(dir.join("done"))
        .args([TIMERS, FDS, ZEROS, LATE, INFINITE].map(|n| n.to_string()))
        .args(["-name", &format!("guest={name}")])
        .stdin(Stdio::null())
        .spawn()
        .expect("workload starts");
    KillOnDrop(child)
}

/// Runs of the loaded eBPF program named `name` (kernel BPF statistics, enabled by the
/// profiler while it runs); 0 when no such program is loaded.
/// Runs of the loaded programs named `name`: counted while BPF statistics are on, which the
/// profiler does only now and then (one refresh in ten), so callers hold [`bpf_stats_on`].
fn program_runs(name: &str) -> u64 {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        // The kernel keeps 15 bytes of a program's name.
        .filter(|p| p.name_as_str() == Some(&name[..name.len().min(15)]))
        .map(|p| p.run_count())
        .sum()
}

/// BPF run statistics on while the returned fd lives.
fn bpf_stats_on() -> std::os::fd::OwnedFd {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS")
}

/// Some ppoll calls of this (unwatched) process.
fn unrelated_ppolls(n: usize) {
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    for _ in 0..n {
        // SAFETY: no fds, a valid timespec.
        unsafe { libc::ppoll(std::ptr::null_mut(), 0, &zero, std::ptr::null()) };
    }
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(50));
    }
}

/// What one recording of the workload counted.
struct Recorded {
    /// `timer` summed over the recording.
    timer: u64,
    /// `fd_wakeups` summed over the recording.
    fds: u64,
    /// `sources.timer`.
    label: String,
    /// Runs of `sys_enter_ppoll` while the workload ran.
    runs: u64,
    /// Runs of the libc result probe (`libc_wait_result`) and of the libc entry probe of
    /// `ppoll` while the workload ran.
    result_runs: u64,
    entry_runs: u64,
    /// `dropped_updates` summed over the recording (full maps and skipped nested runs).
    dropped: u64,
}

/// Records the workload with `--timer-source source`.
fn record_with(source: &str, bin: &Path) -> Recorded {
    let dir = run_dir(&format!("timer-source-{source}"));
    let name = format!("waits-{source}");
    let workload = start_waits(bin, dir.path(), &name);
    let rec = recording_path(dir.path());
    let mut recorder = KillOnDrop(
        profiler()
            .args(["record", "--window", "2", "--timer-source", source])
            .args(["--vm", &name, "--output"])
            .arg(&rec)
            .stderr(Stdio::piped())
            .spawn()
            .expect("profiler starts"),
    );
    // Watched once the first sample has attached its probes: its first window is written
    // after 2 s.
    wait_for("the first window", HANG, || {
        std::fs::read_to_string(&rec).is_ok_and(|t| t.contains(&name))
    });
    let stats = bpf_stats_on();
    let programs = ["sys_enter_ppoll", "libc_wait_result", "libc_ppoll"];
    let before = programs.map(program_runs);
    std::fs::write(dir.path().join("go"), "").unwrap();
    wait_for("the workload", HANG, || dir.path().join("done").exists());
    let after = programs.map(program_runs);
    let [runs, result_runs, entry_runs] = [0, 1, 2].map(|i| after[i] - before[i]);
    drop(stats);
    // Its last waits land in a window that closes within 2 s.
    sleep(Duration::from_millis(2500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(recorder.0.id() as i32, libc::SIGTERM) };
    let status = recorder.0.wait().unwrap();
    assert!(status.success(), "{status}");
    drop(workload);
    let records = load(&rec);
    let windows = of(&records, &name);
    assert!(!windows.is_empty());
    let sum = |f: fn(&&profiler::record::WindowRecord) -> Option<u64>| -> u64 {
        windows.iter().map(|w| f(w).expect("counted")).sum()
    };
    Recorded {
        timer: sum(|w| w.timer),
        fds: sum(|w| w.fd_wakeups),
        label: windows[0].sources.timer.clone(),
        runs,
        result_runs,
        entry_runs,
        dropped: windows.iter().map(|w| w.dropped_updates).sum(),
    }
}

#[test]
fn every_timer_source_counts_exactly_and_only_the_fallback_taxes_others() {
    let p = Prereq::new("every_timer_source_counts_exactly");
    let Some(()) = p.root() else { return };
    let build = run_dir("waits-build");
    let Some(bin) = build_waits(build.path(), &p) else {
        return;
    };
    let waits = TIMERS + FDS + ZEROS + LATE + INFINITE;
    // One probe per wait, after its syscall: a zero-timeout ppoll's 0 (a thousand of them)
    // must not pass for a timed-out ppoll's.
    let Recorded {
        timer,
        fds,
        label,
        runs,
        result_runs,
        entry_runs,
        ..
    } = record_with("libc", &bin);
    assert_eq!(label, "libc-uprobes");
    assert_eq!(
        (timer, fds),
        (TIMERS, FDS + LATE + INFINITE),
        "libc uprobes"
    );
    assert_eq!(
        runs, 0,
        "the syscall tracepoints ran while only the libc source was needed"
    );
    assert!(
        (waits..waits + 50).contains(&result_runs) && entry_runs == 0,
        "{waits} waits ran the result probe {result_runs} times, the entry probe {entry_runs}"
    );

    // The two-trap fallback counts the same.
    let Recorded {
        timer,
        fds,
        label,
        runs,
        result_runs,
        entry_runs,
        ..
    } = record_with("libc-entry-return", &bin);
    assert_eq!(label, "libc-entry-return-uprobes");
    assert_eq!(
        (timer, fds),
        (TIMERS, FDS + LATE + INFINITE),
        "libc entry/return uprobes"
    );
    assert_eq!((runs, result_runs), (0, 0));
    assert!(entry_runs >= TIMERS / 2 + FDS / 2 + ZEROS, "{entry_runs}");

    let Recorded {
        timer,
        fds,
        label,
        runs,
        ..
    } = record_with("syscall", &bin);
    assert_eq!(label, "syscall");
    assert_eq!(
        (timer, fds),
        (TIMERS, FDS + LATE + INFINITE),
        "syscall tracepoints"
    );
    assert!(
        runs >= TIMERS / 2 + FDS / 2 + ZEROS,
        "sys_enter_ppoll ran {runs} times"
    );

    // The sleep timers: every timed-out wait, and the fd wakeups that cancelled a wait's
    // timer or woke a wait without one (not those ready at entry, which never sleep). The
    // workload's nanosleep naps before it starts arm the same kind of timer and must not
    // count. The default (`auto`) is this source where the kernel offers it.
    let Recorded {
        timer,
        fds,
        label,
        runs,
        dropped,
        ..
    } = record_with("auto", &bin);
    assert_eq!(label, "hrtimer", "the default timer source");
    let slept = LATE + INFINITE;
    // Never more than happened; in one fresh-clone CI run 3 of the 400 expiries were not
    // counted, when the expiry was a classic tracepoint (skipped by the kernel whenever the
    // timer interrupt lands in another BPF program; now a raw tracepoint): within 2 %.
    assert!(
        timer <= TIMERS && timer * 100 >= TIMERS * 98,
        "hrtimer tracepoints: {timer} timers of {TIMERS} ({dropped} updates dropped)"
    );
    assert!(
        fds <= slept && fds * 100 >= slept * 98,
        "hrtimer tracepoints: {fds} fd wakeups of {slept} ({dropped} updates dropped)"
    );
    if timer < TIMERS || fds < slept {
        eprintln!(
            "hrtimer tracepoints: {timer} of {TIMERS} timers, {fds} of {slept} fd wakeups, \
             {dropped} updates dropped"
        );
    }
    assert_eq!(
        runs, 0,
        "the syscall tracepoints ran for the hrtimer source"
    );
}

#[test]
fn the_syscall_tracepoints_detach_when_their_last_vm_exits() {
    let p = Prereq::new("the_syscall_tracepoints_detach_when_their_last_vm_exits");
    let Some(()) = p.root() else { return };
    let dir = run_dir("syscall-detach");
    let Some(bin) = build_waits(dir.path(), &p) else {
        return;
    };
    let name = "waits-detach";
    let workload = start_waits(&bin, dir.path(), name);
    let mut recorder = KillOnDrop(
        profiler()
            .args(["record", "--window", "1", "--timer-source", "syscall"])
            .args(["--vm", name, "--output", "/dev/null"])
            .stderr(Stdio::null())
            .spawn()
            .expect("profiler starts"),
    );
    let _stats = bpf_stats_on();
    // Attached: this test's own ppolls run the program.
    wait_for("the tracepoints to attach", HANG, || {
        let before = program_runs("sys_enter_ppoll");
        unrelated_ppolls(100);
        program_runs("sys_enter_ppoll") >= before + 100
    });
    drop(workload);
    // The next sample sees the VM gone and detaches them: ppolls no longer run the program.
    wait_for("the tracepoints to detach", HANG, || {
        let before = program_runs("sys_enter_ppoll");
        unrelated_ppolls(100);
        program_runs("sys_enter_ppoll") == before
    });
    assert!(
        recorder.0.try_wait().unwrap().is_none(),
        "the profiler runs on"
    );
}

/// Counter slots handed out so far by the newest loaded profiler (`COUNTER_META[NEXT_SLOT]`).
fn counter_slots_used() -> u64 {
    let id = aya::maps::loaded_maps()
        .filter_map(Result::ok)
        .filter(|m| m.name_as_str() == Some("COUNTER_META"))
        .map(|m| m.id())
        .max()
        .expect("a profiler's COUNTER_META is loaded");
    let data = aya::maps::MapData::from_id(id).unwrap();
    let meta: aya::maps::Array<_, u64> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).unwrap();
    meta.get(&profiler_common::counter_meta::NEXT_SLOT, 0)
        .unwrap()
}

/// Keyed counters of process `tgid` in the newest loaded profiler's `COUNTER_SLOTS`.
fn counter_keys_of(tgid: u32) -> usize {
    let id = aya::maps::loaded_maps()
        .filter_map(Result::ok)
        .filter(|m| m.name_as_str() == Some("COUNTER_SLOTS"))
        .map(|m| m.id())
        .max()
        .expect("a profiler's COUNTER_SLOTS is loaded");
    let data = aya::maps::MapData::from_id(id).unwrap();
    let slots: aya::maps::HashMap<_, profiler_common::CounterKey, u32> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).unwrap();
    slots
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.tgid == tgid)
        .count()
}

#[test]
fn a_gone_vms_counter_slots_serve_the_next_vm_without_its_counts() {
    let p = Prereq::new("a_gone_vms_counter_slots_serve_the_next_vm");
    let Some(()) = p.root() else { return };
    let build = run_dir("waits-build-reuse");
    let Some(bin) = build_waits(build.path(), &p) else {
        return;
    };
    let dir = run_dir("counter-slot-reuse");
    let rec = recording_path(dir.path());
    let mut recorder = KillOnDrop(
        profiler()
            .args([
                "record",
                "--window",
                "1",
                "--timer-source",
                "libc",
                "--output",
            ])
            .arg(&rec)
            .stderr(Stdio::piped())
            .spawn()
            .expect("profiler starts"),
    );
    let run = |name: &str| {
        let run = run_dir(name);
        let workload = start_waits(&bin, run.path(), name);
        wait_for("the workload's first window", HANG, || {
            std::fs::read_to_string(&rec).is_ok_and(|t| t.contains(name))
        });
        std::fs::write(run.path().join("go"), "").unwrap();
        wait_for("the workload", HANG, || run.path().join("done").exists());
        // Its last waits land in a window that closes within a second.
        sleep(Duration::from_millis(1500));
        let pid = workload.0.id();
        drop(workload);
        pid
    };
    let first = run("slots-first");
    // Gone: its exit window is written, its counters forgotten (after its uprobes are
    // detached) and their slots freed.
    wait_for(
        "the first VM's exit window and its counters forgotten",
        HANG,
        || {
            load_so_far(&rec).iter().any(|w| {
                w.vm.name == "slots-first"
                    && w.partial_reason == Some(profiler::record::PartialReason::VmExited)
            }) && counter_keys_of(first) == 0
        },
    );
    let used = counter_slots_used();
    run("slots-second");
    let used_after = counter_slots_used();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(recorder.0.id() as i32, libc::SIGTERM) };
    assert!(recorder.0.wait().unwrap().success());
    let records = load(&rec);
    for name in ["slots-first", "slots-second"] {
        let windows = of(&records, name);
        let sum = |f: fn(&&profiler::record::WindowRecord) -> Option<u64>| -> u64 {
            windows.iter().map(|w| f(w).expect("counted")).sum()
        };
        assert_eq!(
            (sum(|w| w.timer), sum(|w| w.fd_wakeups)),
            (TIMERS, FDS + LATE + INFINITE),
            "{name}"
        );
    }
    assert_eq!(
        used_after, used,
        "the second VM's counters took new slots instead of the first one's"
    );
}
