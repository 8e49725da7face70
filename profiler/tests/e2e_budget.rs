//! End-to-end: `--max-overhead` keeps a busy guest's probes within budget by duty-cycling
//! them, and its scaled counts stay close to what an unbudgeted profiler counts exactly at
//! the same time (as root, on the USDT QEMU). Its waits are counted by the libc uprobes, the
//! source whose every wait is a uprobe hit (the default hrtimer tracepoints are never paused:
//! their counts stay exact, and only the callback and read/write uprobes are duty-cycled).

mod common;

use std::{
    process::{Child, Stdio},
    thread::sleep,
    time::Duration,
};

use common::*;
use xtask::launch::{DeviceSet, GuestSpec, launch};

fn recorder(duration: &str, extra: &[&str], out: &std::path::Path) -> Child {
    profiler()
        .args([
            "record",
            "--window",
            "5",
            "--duration",
            duration,
            "--vm",
            "e2e-budget",
            "--timer-source",
            "libc",
        ])
        .args(extra)
        .arg("--output")
        .arg(out)
        .stderr(Stdio::piped())
        .spawn()
        .expect("profiler starts")
}

/// The first number after `before` on any line of `text`.
fn number_after(text: &str, before: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.split(before)
            .nth(1)?
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .next()?
            .parse()
            .ok()
    })
}

/// The budget this run tests with, in % of a core: a tenth of what the guest's uprobes would
/// cost it always on at the least a hit can cost, as a profiler measures both here and now
/// (under a budget it never reaches: the guest's hits per second while probed, times the
/// start-up's tight-loop cost per hit, the floor under every cost a budget learns). A budget
/// from this machine's own figures duty-cycles the guest on a machine of any speed.
fn budget_for_this_machine(dir: &std::path::Path) -> f64 {
    let out = recorder(
        "11",
        &["--max-overhead", "100"],
        &dir.join("calibration.jsonl"),
    )
    .wait_with_output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let hits = number_after(&stderr, "overhead budget: e2e-budget: ")
        .unwrap_or_else(|| panic!("no hit rate for the guest: {stderr}"));
    let tight_us = number_after(&stderr, "(measured; ")
        .unwrap_or_else(|| panic!("no tight-loop cost per hit: {stderr}"));
    let always_on = hits * tight_us * 1e-6 * 100.0;
    eprintln!(
        "calibration: {hits:.0} hits/s × {tight_us:.2} µs = {always_on:.3} % of a core always on"
    );
    assert!(always_on > 0.0, "{stderr}");
    always_on / 10.0
}

/// Events per second over the full windows after the first that observed the count. Under
/// a budget a window its probes never reached (every resume deferred past its end while the
/// kernel closed the last pause's links) has the count `null`, with `probed_seconds` 0: not
/// observed, so left out of the rate, not taken as 0.
fn rate(path: &std::path::Path, count: fn(&profiler::record::WindowRecord) -> Option<u64>) -> f64 {
    let records = load(path);
    let full: Vec<_> = records
        .iter()
        .filter(|r| !r.partial && r.window > 0)
        .filter(|r| {
            let observed = count(r).is_some();
            assert!(
                observed || r.probed_seconds == Some(0.0),
                "a null count in a window its probes saw: {r:#?}"
            );
            observed
        })
        .collect();
    assert!(
        full.len() >= 3,
        "fewer than 3 observed windows: {records:#?}"
    );
    let n: u64 = full.iter().filter_map(|r| count(r)).sum();
    n as f64 / full.iter().map(|r| r.seconds).sum::<f64>()
}

#[test]
fn a_budget_duty_cycles_a_busy_guest_and_its_estimates_stay_close() {
    let test = "budget";
    let Some(image) = e2e_guest_image(test) else {
        return;
    };
    let Some(qemu) = usdt_qemu(test) else {
        return;
    };
    let dir = run_dir(test);
    // A UHCI tablet: ~1,000 frame-timer runs and several thousand waits a second.
    let mut spec = GuestSpec::new("e2e-budget", DeviceSet::Noisy);
    spec.qemu = qemu;
    let guest = launch(&spec, &image, dir.path()).expect("launch");
    guest.wait_ready(Duration::from_secs(180)).expect("boots");
    sleep(Duration::from_secs(3));

    let budget = format!("{:.6}", budget_for_this_machine(dir.path()));
    let (exact, budgeted) = (
        dir.path().join("exact.jsonl"),
        dir.path().join("budget.jsonl"),
    );
    let a = recorder("32", &[], &exact);
    let b = recorder("32", &["--max-overhead", &budget], &budgeted);
    let served_records = dir.path().join("served.jsonl");
    // serve under the same budget: its counters must carry the estimates, not only what was
    // counted while probed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let serve = KillOnDrop(
        profiler()
            .args([
                "serve",
                "--window",
                "5",
                "--vm",
                "e2e-budget",
                "--max-overhead",
                &budget,
                "--timer-source",
                "libc",
            ])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--output")
            .arg(&served_records)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("profiler serve starts"),
    );
    sleep(Duration::from_secs(31));
    // The counter and the windows serve closed by then (scraped again if one closed meanwhile).
    let (scraped, served_windows) = loop {
        let before = std::fs::read_to_string(&served_records).unwrap_or_default();
        let scraped = ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
            .call()
            .expect("scrape")
            .into_body()
            .read_to_string()
            .unwrap();
        if std::fs::read_to_string(&served_records).unwrap_or_default() == before {
            break (scraped, load(&served_records));
        }
    };
    drop(serve);
    let out_b = b.wait_with_output().unwrap();
    let out_a = a.wait_with_output().unwrap();
    let stderr_b = String::from_utf8_lossy(&out_b.stderr);
    assert!(
        out_a.status.success() && out_b.status.success(),
        "{stderr_b}"
    );
    assert!(
        stderr_b.contains("profiler: overhead budget ") && stderr_b.contains(" % of a core"),
        "{stderr_b}"
    );

    let records = load(&budgeted);
    for (name, path) in [("exact", &exact), ("budgeted", &budgeted)] {
        for r in load(path) {
            eprintln!(
                "{name} window {} ({} s, probed {:?}): timer {:?}, callbacks {}",
                r.window,
                r.seconds,
                r.probed_seconds,
                r.timer,
                r.timers.iter().map(|t| t.count).sum::<u64>()
            );
        }
    }
    // What the budgeted profiler said (its pauses, resumes and their notes), for a failure.
    eprintln!("budgeted profiler's stderr:\n{stderr_b}");
    // Its rate is known within the first window; from the third on, every window is probed
    // for one block at its start and scaled.
    let settled: Vec<_> = records
        .iter()
        .filter(|r| !r.partial && r.window > 1)
        .collect();
    assert!(settled.len() >= 3, "{records:#?}");
    assert!(
        settled
            .iter()
            .all(|r| r.estimated && r.probed_seconds.unwrap() < r.seconds - 0.5),
        "every settled window of the busy guest is duty-cycled: {settled:#?}"
    );
    assert!(load(&exact).iter().all(|r| !r.estimated));

    // The estimates against the exact counts of the same seconds (windows not aligned: rates
    // over the same span). The guest's frame timer is steady; waits vary more.
    // Callback runs are a list: a window the probes never saw has it empty, not null.
    let callbacks = |r: &profiler::record::WindowRecord| {
        (r.probed_seconds != Some(0.0)).then(|| r.timers.iter().map(|t| t.count).sum::<u64>())
    };
    for (what, f) in [
        (
            "timer",
            (|r: &profiler::record::WindowRecord| r.timer) as fn(&_) -> _,
        ),
        ("callback runs", callbacks),
    ] {
        let (e, b) = (rate(&exact, f), rate(&budgeted, f));
        let error = (b - e).abs() / e;
        eprintln!(
            "{what}: exact {e:.0}/s, estimated {b:.0}/s ({:.1} % off)",
            error * 100.0
        );
        assert!(error < 0.10, "{what}: exact {e:.0}/s, estimated {b:.0}/s");
    }

    // serve's counter: counted plus what scaling added to its closed windows, so at least
    // the sum of those windows' estimates (counted alone it would be about their probed
    // share), and at most that plus the running window counted unscaled.
    let served: f64 = scraped
        .lines()
        .find(|l| l.starts_with("qemu_profiler_timer_events_total{vm=\"e2e-budget\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no timer counter for the guest:\n{scraped}"));
    let closed: u64 = served_windows.iter().filter_map(|r| r.timer).sum();
    let probed: f64 = served_windows
        .iter()
        .map(|r| r.probed_seconds.unwrap_or(r.seconds))
        .sum();
    let seconds: f64 = served_windows.iter().map(|r| r.seconds).sum();
    let running_at_most = rate(&exact, |r| r.timer) * 5.0 * 1.5;
    eprintln!(
        "serve under the budget: counter {served:.0}; its {} closed windows' estimates {closed} \
         (probed {probed:.0} of {seconds:.0} s); the running window adds at most \
         {running_at_most:.0}",
        served_windows.len()
    );
    assert!(
        served_windows.iter().any(|r| r.estimated),
        "{served_windows:#?}"
    );
    assert!(
        served >= closed as f64 * 0.99,
        "serve's counter {served:.0} below its closed windows' estimates {closed}"
    );
    assert!(
        served <= closed as f64 + running_at_most,
        "serve's counter {served:.0} above its closed windows' {closed} plus a window"
    );

    // The budget's basis is the runs its probes counted: at least an entry and a return per
    // wait and one run per callback (the timer_mod probes add more), never a model of them.
    let counted: f64 = stderr_b
        .lines()
        .find_map(|l| {
            l.split("overhead budget: e2e-budget: ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no measured rate for the guest: {stderr_b}"));
    let waits = rate(&exact, |r| r.timer) + rate(&exact, |r| r.fd_wakeups);
    let floor = 2.0 * waits + rate(&exact, callbacks);
    eprintln!("counted {counted:.0} uprobe runs/s; waits and callbacks alone make {floor:.0}");
    assert!(
        counted > 0.9 * floor,
        "counted {counted:.0} runs/s, below the {floor:.0} its waits and callbacks make"
    );
    drop(guest);
}
