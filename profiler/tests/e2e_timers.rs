//! End-to-end: real QEMU guests, the real profiler binary, eBPF as root.

mod common;

use std::{
    io::{BufRead as _, BufReader},
    process::Stdio,
    thread::sleep,
    time::Duration,
};

use common::*;
use profiler::record::PartialReason;
use xtask::launch::DeviceSet;

/// The Pulsar effect on Linux guests: default devices + USB tablet vs everything disabled.
#[test]
fn noisy_guest_has_20x_the_timer_events_of_quiet_guest() {
    let Some(image) = e2e_guest_image("noisy_vs_quiet") else {
        return;
    };
    let dir = run_dir("noisy-vs-quiet");
    let noisy = boot("e2e-noisy", DeviceSet::Noisy, &image, dir.path());
    let quiet = boot("e2e-quiet", DeviceSet::Quiet, &image, dir.path());
    let rec = recording_path(dir.path());
    run_ok(
        profiler()
            .args(["record", "--window", "5", "--duration", "12"])
            .args(["--vm", "e2e-noisy", "--vm", "e2e-quiet", "--output"])
            .arg(&rec),
    );
    let records = load(&rec);

    for (name, guest) in [("e2e-noisy", &noisy), ("e2e-quiet", &quiet)] {
        let windows = of(&records, name);
        let full: Vec<_> = windows.iter().filter(|w| !w.partial).collect();
        assert!(full.len() >= 2, "{name}: {windows:#?}");
        for w in &full {
            assert_eq!(w.vm.pid, guest.pid());
            assert_eq!(w.seconds, 5.0);
            assert!(w.timer.is_some() && w.fd_wakeups.is_some() && w.cpu_seconds.is_some());
            // Debian's QEMU has no USDT probes and no symbols: unavailable with the reason,
            // never a made-up 0.
            assert_eq!((w.read, w.write), (None, None));
            assert!(
                w.sources
                    .read
                    .starts_with("unavailable: stripped QEMU without USDT probes"),
                "{}",
                w.sources.read
            );
        }
        // Windows are numbered from 0 in order; the last one is cut by --duration 12.
        let numbers: Vec<u64> = windows.iter().map(|w| w.window).collect();
        assert_eq!(numbers, vec![0, 1, 2], "{name}");
        assert_eq!(
            windows[2].partial_reason,
            Some(PartialReason::ProfilerStopped)
        );
        assert!((windows[2].seconds - 2.0).abs() < 0.01, "{:?}", windows[2]);
    }
    let full_timers = |name: &str| -> u64 {
        of(&records, name)
            .iter()
            .filter(|w| !w.partial)
            .map(|w| w.timer.unwrap())
            .sum()
    };
    let (n, q) = (full_timers("e2e-noisy"), full_timers("e2e-quiet"));
    eprintln!("timer events in full windows: noisy {n}, quiet {q}");
    assert!(n >= 20 * q.max(1), "noisy {n} vs quiet {q}");

    let out = run_ok(profiler().arg("report").arg(&rec));
    let report = String::from_utf8(out.stdout).unwrap();
    assert!(report.contains("VM e2e-noisy (pid"), "{report}");
    assert!(report.contains("VM e2e-quiet (pid"), "{report}");
    assert!(report.contains("5 Secs Interval  Timer Events  Read Events  Write Events"));
}

/// VMs that start and exit mid-window get partial windows; SIGTERM flushes and exits 0.
#[test]
fn vms_coming_and_going_and_sigterm() {
    let Some(image) = e2e_guest_image("coming_and_going") else {
        return;
    };
    let dir = run_dir("coming-and-going");
    let early = boot("e2e-early", DeviceSet::Quiet, &image, dir.path());
    let rec = recording_path(dir.path());
    let mut recorder = profiler()
        .args([
            "record",
            "--window",
            "5",
            "--vm",
            "e2e-early",
            "--vm",
            "e2e-late",
            "--output",
        ])
        .arg(&rec)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its first sample (time zero) has seen `early`: what starts now starts mid-recording.
    let mut stderr = BufReader::new(recorder.stderr.take().unwrap()).lines();
    loop {
        let line = stderr
            .next()
            .expect("the profiler says when it records")
            .unwrap();
        eprintln!("{line}");
        if line.starts_with("profiler: recording ") {
            break;
        }
    }
    std::thread::spawn(move || stderr.map_while(Result::ok).for_each(|l| eprintln!("{l}")));
    // Announced within one refresh of appearing.
    let late = boot("e2e-late", DeviceSet::Quiet, &image, dir.path());
    let late_pid = late.pid();
    // The profiler's windows start at its time zero, which window 0's record gives (on the
    // wall clock); the test's own clock started earlier, by however long loading took.
    wait_for_record_of(&rec, "e2e-early");
    let zero = load_so_far(&rec)
        .iter()
        .find(|r| r.vm.name == "e2e-early" && r.window == 0)
        .expect("window 0 of e2e-early")
        .start
        .parse::<chrono::DateTime<chrono::Utc>>()
        .expect("an RFC 3339 start");
    let phase = || {
        let since = chrono::Utc::now() - zero;
        (since.num_milliseconds() as f64 / 1000.0).rem_euclid(5.0)
    };
    // Exit `early` well inside a window (not near a boundary).
    while !(1.5..3.5).contains(&phase()) {
        sleep(Duration::from_millis(100));
    }
    // At once (SIGKILL; dropping the guest asks QEMU with SIGTERM first, which a busy host
    // may take a while to act on).
    // SAFETY: a plain signal to our own child, not reaped yet.
    unsafe { libc::kill(early.pid() as i32, libc::SIGKILL) };
    drop(early);
    // Its exit window, and a full window of `late`, are written before the stop.
    wait_until(
        "the exit window of e2e-early and a full window of e2e-late",
        HANG,
        || {
            let records = load_so_far(&rec);
            of(&records, "e2e-early")
                .iter()
                .any(|w| w.partial_reason == Some(PartialReason::VmExited))
                && of(&records, "e2e-late").iter().any(|w| !w.partial)
        },
    );
    // SAFETY: plain signal to our child.
    unsafe { libc::kill(recorder.id() as i32, libc::SIGTERM) };
    let status = recorder.wait().unwrap();
    assert!(status.success(), "SIGTERM must flush and exit 0: {status}");

    let records = load(&rec);
    let early_w = of(&records, "e2e-early");
    let last = early_w.last().unwrap();
    assert_eq!(
        last.partial_reason,
        Some(PartialReason::VmExited),
        "{early_w:#?}"
    );
    assert!(last.seconds > 0.5 && last.seconds < 4.5, "{last:?}");
    // Closed within one refresh of the exit, not at the end of the recording.
    let late_w = of(&records, "e2e-late");
    assert_eq!(
        late_w[0].partial_reason,
        Some(PartialReason::VmStarted),
        "{late_w:#?}"
    );
    assert_eq!(late_w[0].vm.pid, late_pid);
    assert!(late_w.iter().skip(1).any(|w| !w.partial), "{late_w:#?}");
    let stop = late_w.last().unwrap();
    assert_eq!(
        stop.partial_reason,
        Some(PartialReason::ProfilerStopped),
        "{late_w:#?}"
    );
    // Every window a VM had is there, numbered consecutively.
    for w in [&early_w, &late_w] {
        let nums: Vec<u64> = w.iter().map(|r| r.window).collect();
        let expected: Vec<u64> = (nums[0]..nums[0] + nums.len() as u64).collect();
        assert_eq!(nums, expected);
    }
}
