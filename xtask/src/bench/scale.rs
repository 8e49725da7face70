//! The collector at scale (1 … 2,000 VMs: small real processes named like QEMU that wake from
//! `ppoll` at a known rate, through the real discovery, probes and windowing), the time to
//! attach to 50 running USDT QEMUs, and the demo's own cost.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::json;
use xtask::{
    guest::GuestImage,
    launch::{DeviceSet, GuestSpec, launch},
};

use super::{proc_usage, standin::StandinFleet, ticks_per_second};

/// `profiler record` with stderr read line by line; killed on drop.
struct Recorder {
    child: Child,
    lines: mpsc::Receiver<String>,
    started: Instant,
}

impl Recorder {
    fn start(profiler: &Path, args: &[&str], out: &Path) -> anyhow::Result<Self> {
        let started = Instant::now();
        let mut cmd = Command::new(profiler);
        cmd.arg("record")
            .args(args)
            .arg("--output")
            .arg(out)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        super::die_with_parent(&mut cmd, libc::SIGTERM);
        let mut child = cmd.spawn().context("starting profiler record")?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            lines,
            started,
        })
    }

    /// Seconds from start until it said it records, and how many processes.
    fn attached(&self) -> anyhow::Result<(f64, usize)> {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(120))
                .context("the profiler said nothing for 120 s")?;
            if let Some(rest) = line.strip_prefix("profiler: recording ") {
                let n = rest
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                return Ok((self.started.elapsed().as_secs_f64(), n));
            }
        }
    }

    /// Stops it and returns its last stderr line (the eBPF run-time summary).
    fn stop(mut self) -> anyhow::Result<String> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait()?;
        if !status.success() {
            bail!("profiler record failed: {status}");
        }
        Ok(self.lines.try_iter().last().unwrap_or_default())
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Milliseconds of BPF run time from the profiler's summary line.
fn bpf_ms(summary: &str) -> Option<f64> {
    let i = summary.find(" times, ")?;
    summary[i + 8..].split_whitespace().next()?.parse().ok()
}

/// The wake-up period of a fleet of `n` (bounded total wakeups, so 2,000 fit on 2 cores).
fn period_ms(n: usize) -> u64 {
    match n {
        0..=100 => 10,
        101..=500 => 50,
        _ => 250,
    }
}

/// `key` events per second each VM's full windows recorded, in `records`.
fn recorded_rates(records: &Path, key: &str) -> anyhow::Result<Vec<f64>> {
    let text = std::fs::read_to_string(records)?;
    let mut per_vm: std::collections::BTreeMap<u64, (u64, f64)> = Default::default();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        // Skip each VM's first window: it started counting mid-window.
        if v["partial"] == true || v["window"].as_u64() == Some(0) {
            continue;
        }
        let e = per_vm
            .entry(v["vm"]["pid"].as_u64().unwrap_or(0))
            .or_default();
        e.0 += v[key].as_u64().unwrap_or(0);
        e.1 += v["seconds"].as_f64().unwrap_or(0.0);
    }
    Ok(per_vm
        .values()
        .filter(|(_, s)| *s > 0.0)
        .map(|(n, s)| *n as f64 / s)
        .collect())
}

/// How many VMs the last closed window of `records` counted timer callbacks for.
fn vms_with_callbacks(records: &Path) -> usize {
    let text = std::fs::read_to_string(records).unwrap_or_default();
    let mut by_window: std::collections::BTreeMap<u64, usize> = Default::default();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let e = by_window
            .entry(v["window"].as_u64().unwrap_or(0))
            .or_default();
        if v["timers"].as_array().is_some_and(|t| !t.is_empty()) {
            *e += 1;
        }
    }
    by_window.values().next_back().copied().unwrap_or(0)
}

/// The timer and read sources the first record names.
fn first_sources(records: &Path) -> anyhow::Result<(String, String)> {
    let text = std::fs::read_to_string(records)?;
    let first: serde_json::Value =
        serde_json::from_str(text.lines().next().context("no records")?)?;
    let name = |k: &str| first["sources"][k].as_str().unwrap_or("?").to_string();
    Ok((name("timer"), name("read")))
}

/// Slices of a size's span, one window each; its CPU figure is the median slice's.
const SLICES: u32 = 5;

/// One size: (attach seconds, CPU % of a core, µs per VM per second, RSS MiB, rates).
fn one_size(
    profiler: &Path,
    dir: &Path,
    n: usize,
    window: u64,
) -> anyhow::Result<serde_json::Value> {
    let period = period_ms(n);
    let fleet = StandinFleet::start(n, &format!("scale{n}"), period)?;
    sleep(Duration::from_secs(1) + Duration::from_millis(n as u64));
    let out = dir.join(format!("scale-{n}.jsonl"));
    // The default sources: every stand-in gets its USDT, `timer_mod` and callback links.
    let rec = Recorder::start(profiler, &["--window", &window.to_string()], &out)?;
    let (attach_s, seen) = rec.attached()?;
    if seen < n {
        bail!("the profiler saw {seen} of {n} processes");
    }
    // Steady state: past the first window, and every VM's timer callbacks linked (a refresh
    // links those it found for at most 200 ms; thousands take tens of seconds).
    sleep(Duration::from_secs(window + 1));
    // At most two windows or a minute: the figure says how many were linked by then.
    let settle = Instant::now();
    let settle_max = Duration::from_secs((2 * window).max(60));
    while vms_with_callbacks(&out) < n && settle.elapsed() < settle_max {
        sleep(Duration::from_secs(1));
    }
    let settled_after = settle.elapsed().as_secs_f64() + (window + 1) as f64;
    let with_callbacks = vms_with_callbacks(&out);
    let pid = rec.child.id();
    // Slices of one window each (every VM is read at each boundary, so each slice holds one),
    // the median slice's rate: this machine is shared, and a burst of another tenant's work
    // in one slice should not make the figure.
    let slice = Duration::from_secs(window);
    let mut rates = Vec::new();
    let mut a = proc_usage(pid)?;
    let mut b = a;
    for _ in 0..SLICES {
        let t = Instant::now();
        sleep(slice);
        b = proc_usage(pid)?;
        rates.push((b.cpu_seconds - a.cpu_seconds) / t.elapsed().as_secs_f64());
        a = b;
    }
    let cpu_per_s = super::loops::median(&rates);
    // The fleet first: closing a uprobe walks every process that maps the file.
    drop(fleet);
    sleep(Duration::from_secs(3));
    rec.stop()?;
    let cpu_pct = cpu_per_s * 100.0;
    let us_per_second = cpu_per_s * 1e6;
    let rss_mib = b.rss_bytes as f64 / (1 << 20) as f64;
    let rates = recorded_rates(&out, "timer")?;
    let reads = recorded_rates(&out, "read")?;
    let writes = recorded_rates(&out, "write")?;
    let (source, read_source) = first_sources(&out)?;
    let expected = 1000.0 / period as f64;
    let mean = rates.iter().sum::<f64>() / rates.len().max(1) as f64;
    let (lo, hi) = rates
        .iter()
        .fold((f64::INFINITY, 0.0f64), |(l, h), r| (l.min(*r), h.max(*r)));
    eprintln!(
        "xtask bench scale: {n:5} VMs: attach {attach_s:.2} s, CPU {cpu_pct:.2} % ({:.2} µs per \
         VM per second), RSS {rss_mib:.1} MiB, timer {mean:.1}/s per VM (expected ≤ \
         {expected:.0}; {lo:.1}–{hi:.1})",
        us_per_second / n as f64
    );
    Ok(json!({
        "vms": n,
        "timer_source": source,
        "period_ms": period,
        "attach_seconds": attach_s,
        "callbacks_linked_after_seconds": settled_after,
        "vms_with_callbacks": with_callbacks,
        "window_seconds": window,
        "cpu_percent": cpu_pct,
        "us_per_vm_per_second": us_per_second / n as f64,
        "rss_mib": rss_mib,
        "read_source": read_source,
        "read_rate_mean": reads.iter().sum::<f64>() / reads.len().max(1) as f64,
        "write_rate_mean": writes.iter().sum::<f64>() / writes.len().max(1) as f64,
        "timer_rate_expected": expected,
        "timer_rate_mean": mean,
        "timer_rate_min": lo,
        "timer_rate_max": hi,
        "vms_with_full_windows": rates.len(),
    }))
}

pub fn run_scale(
    profiler: &Path,
    dir: &Path,
    sizes: &[usize],
    window: u64,
    command: &str,
) -> anyhow::Result<(String, serde_json::Value)> {
    let mut results = Vec::new();
    for &n in sizes {
        results.push(one_size(profiler, dir, n, window)?);
    }
    let mut rows = String::new();
    for r in &results {
        rows.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.0} ({} VMs) | {:.2} | {:.2} | {:.1} | {:.1} ({:.1}–{:.1}) of ≤ {:.0} | {:.1} / {:.1} |\n",
            r["vms"],
            r["timer_source"].as_str().unwrap_or("?"),
            r["period_ms"],
            r["attach_seconds"].as_f64().unwrap_or(0.0),
            r["callbacks_linked_after_seconds"].as_f64().unwrap_or(0.0),
            r["vms_with_callbacks"],
            r["cpu_percent"].as_f64().unwrap_or(0.0),
            r["us_per_vm_per_second"].as_f64().unwrap_or(0.0),
            r["rss_mib"].as_f64().unwrap_or(0.0),
            r["timer_rate_mean"].as_f64().unwrap_or(0.0),
            r["timer_rate_min"].as_f64().unwrap_or(0.0),
            r["timer_rate_max"].as_f64().unwrap_or(0.0),
            r["timer_rate_expected"].as_f64().unwrap_or(0.0),
            r["read_rate_mean"].as_f64().unwrap_or(0.0),
            r["write_rate_mean"].as_f64().unwrap_or(0.0),
        ));
    }
    let at = |n: u64| results.iter().find(|r| r["vms"] == n);
    let target = |n: u64, max: f64| match at(n) {
        Some(r) => {
            let c = r["cpu_percent"].as_f64().unwrap_or(f64::NAN);
            format!(
                "{c:.2} % at {n} ({})",
                if c <= max { "met" } else { "MISSED" }
            )
        }
        None => format!("{n} VMs not measured (--quick)"),
    };
    let rss_max = results
        .iter()
        .filter_map(|r| r["rss_mib"].as_f64())
        .fold(0.0f64, f64::max);
    let attach_500 = match at(500) {
        Some(r) => {
            let a = r["attach_seconds"].as_f64().unwrap_or(f64::NAN);
            format!("{a:.2} s ({})", if a < 3.0 { "met" } else { "MISSED" })
        }
        None => "500 VMs not measured (--quick)".into(),
    };
    let body = format!(
        "## The collector at scale\n\n\
         `{command}`: N USDT stand-ins (`xtask/src/bench/standin.c`: a small process named \
         like QEMU with QEMU's USDT read/write probes and timer functions, so each gets the \
         probes a USDT QEMU gets: by default linked once for the binary, shared by all), each arming a timer, running its callback, making one \
         read and one write through the probes and waking from `ppoll` with the period shown \
         (so all sizes fit on 2 cores), watched by `profiler record --window {window}` with \
         the default sources (a refresh a second; every VM read at each window boundary and \
         when a QEMU starts or exits). Attach: seconds from the profiler's start \
         until it said it records them all; callbacks linked: seconds after that until a window \
         closed with every VM's timer callbacks counted (at most 60 s; in brackets how many \
         VMs' were) (a refresh links the callbacks it \
         found for at most 200 ms, so the windows keep closing on time meanwhile). CPU of the \
         profiler process (discovery, map reads, windowing, output) over {SLICES} windows \
         from then — the median of the windows, so a burst of another tenant's work in one \
         does not make the figure — from \
         its CPU clock (ns; `stat`'s ticks would be 0.05 % steps); RSS at the end; events per \
         second per VM over its full windows against the rate its period allows (a `ppoll` \
         timeout plus the loop's own time: slightly below).\n\n\
         | VMs | timer source | period (ms) | attach (s) | callbacks linked (s) | CPU (% of a core) | µs per VM per second | RSS (MiB) | timer/s per VM (min–max) | reads / writes per s per VM |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---|---|\n{rows}\n\
         Targets: attach < 3 s at 500 — {attach_500}; ≤ 0.3 % of a core at 500 VMs — {}; \
         ≤ 0.6 % at 2,000 — {}; ≤ 64 MB — {rss_max:.1} MiB at most ({}).\n",
        target(500, 0.3),
        target(2000, 0.6),
        if rss_max <= 64.0 { "met" } else { "MISSED" },
    );
    Ok((
        body,
        json!({"command": command, "window_seconds": window, "sizes": results}),
    ))
}

/// Time for `profiler record` to discover and attach to `n` paused USDT QEMUs, against its
/// start-up with nothing to attach.
pub fn run_attach(
    profiler: &Path,
    usdt_qemu: &Path,
    dir: &Path,
    n: usize,
    command: &str,
) -> anyhow::Result<(String, serde_json::Value)> {
    let mut qemus: Vec<Child> = Vec::new();
    struct KillAll<'a>(&'a mut Vec<Child>);
    impl Drop for KillAll<'_> {
        fn drop(&mut self) {
            for c in self.0.iter_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let guard = KillAll(&mut qemus);
    // A QEMU built from source finds Debian's firmware only through -L.
    let firmware: Vec<&str> = xtask::launch::FIRMWARE_DIRS
        .iter()
        .filter(|d| Path::new(d).is_dir())
        .flat_map(|d| ["-L", d])
        .collect();
    for i in 0..n {
        guard.0.push(
            Command::new(usdt_qemu)
                .args(&firmware)
                .args([
                    "-machine",
                    "pc,accel=tcg",
                    "-S",
                    "-m",
                    "32",
                    "-display",
                    "none",
                ])
                .args(["-nodefaults", "-monitor", "none"])
                .args(["-name", &format!("guest=attach-{i:02}")])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting a paused USDT QEMU")?,
        );
    }
    sleep(Duration::from_secs(3));
    for c in guard.0.iter_mut() {
        if let Some(status) = c.try_wait()? {
            bail!("a paused USDT QEMU exited at once ({status})");
        }
    }
    let mut runs = Vec::new();
    for (what, args) in [
        ("nothing to attach", vec!["--vm", "no-such-vm"]),
        ("all", vec![]),
    ] {
        let out = dir.join("attach.jsonl");
        let mut a = vec!["--window", "2"];
        a.extend(args);
        let rec = Recorder::start(profiler, &a, &out)?;
        let (secs, seen) = rec.attached()?;
        sleep(Duration::from_millis(2500));
        let _ = rec.stop();
        let records = std::fs::read_to_string(&out).unwrap_or_default();
        let usdt = records
            .lines()
            .filter(|l| l.contains("\"read\":\"usdt\"") && l.contains("\"window\":0"))
            .count();
        eprintln!("xtask bench attach: {what}: {secs:.2} s ({seen} processes, {usdt} on USDT)");
        runs.push((what, secs, seen, usdt));
    }
    drop(guard);
    let (base, all) = (runs[0].1, runs[1].1);
    let body = format!(
        "## Time to attach to {n} running QEMUs\n\n\
         `{command}`: {n} paused USDT QEMUs (`-S`), then `profiler record` started; seconds \
         from its start until it said it records them (eBPF load, discovery, reading each \
         binary once, attaching USDT, libc and timer-callback probes to each), against a \
         run with nothing to attach.\n\n\
         | run | seconds | processes | served by USDT |\n|---|---:|---:|---:|\n\
         | nothing to attach | {base:.2} | {} | — |\n| all {n} | {all:.2} | {} | {} |\n\n\
         Target: < 2 s for 50 — {all:.2} s ({}).\n",
        runs[0].2,
        runs[1].2,
        runs[1].3,
        if all < 2.0 { "met" } else { "MISSED" },
    );
    Ok((
        body,
        json!({"command": command, "qemus": n, "seconds_nothing": base, "seconds_all": all,
               "seen": runs[1].2, "usdt": runs[1].3}),
    ))
}

/// The demo's own cost: its two guests recorded for `secs` seconds.
pub fn run_self_cost(
    image: &GuestImage,
    profiler: &Path,
    dir: &Path,
    secs: u64,
    command: &str,
) -> anyhow::Result<(String, serde_json::Value)> {
    let noisy = launch(&GuestSpec::new("noisy", DeviceSet::Noisy), image, dir)?;
    let quiet = launch(&GuestSpec::new("quiet", DeviceSet::Quiet), image, dir)?;
    noisy.wait_ready(Duration::from_secs(240))?;
    quiet.wait_ready(Duration::from_secs(240))?;
    let out = dir.join("self-cost.jsonl");
    let rec = Recorder::start(
        profiler,
        &["--window", "10", "--vm", "noisy", "--vm", "quiet"],
        &out,
    )?;
    rec.attached()?;
    let pids = [rec.child.id(), noisy.pid(), quiet.pid()];
    let before: Vec<_> = pids
        .iter()
        .map(|&p| proc_usage(p))
        .collect::<Result<_, _>>()?;
    let t = Instant::now();
    sleep(Duration::from_secs(secs));
    let after: Vec<_> = pids
        .iter()
        .map(|&p| proc_usage(p))
        .collect::<Result<_, _>>()?;
    let elapsed = t.elapsed().as_secs_f64();
    let summary = rec.stop()?;
    let pct = |i: usize| {
        (after[i].cpu_ticks - before[i].cpu_ticks) as f64 / ticks_per_second() / elapsed * 100.0
    };
    let bpf = bpf_ms(&summary).unwrap_or(f64::NAN);
    let body = format!(
        "## The demo's own cost\n\n\
         `{command}`: the demo's two guests (Debian's QEMU: `noisy` with a UHCI tablet, \
         `quiet`), recorded by `profiler record --window 10`; CPU over {secs} s.\n\n\
         | process | CPU (% of a core) |\n|---|---:|\n\
         | profiler (collector) | {:.2} |\n| QEMU `noisy` | {:.1} |\n| QEMU `quiet` | {:.1} |\n\n\
         The probes' own run time over the whole recording: {bpf:.1} ms (kernel BPF \
         statistics; `{}`).\n",
        pct(0),
        pct(1),
        pct(2),
        summary.trim_start_matches("profiler: "),
    );
    Ok((
        body,
        json!({"command": command, "seconds": secs, "profiler_cpu_percent": pct(0),
               "noisy_cpu_percent": pct(1), "quiet_cpu_percent": pct(2), "bpf_ms": bpf,
               "summary": summary}),
    ))
}
