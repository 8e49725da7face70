//! `cargo xtask bench teardown`: how long the profiler takes to be gone once asked (`q` in
//! `top`, SIGTERM to `record`, SIGKILL), with its uprobes linked per site, with one
//! multi-uprobe link per VM and program, and with binary-wide links shared by the VMs (the
//! default), side by side: paused USDT QEMUs (the cache's build, `-S`) at 20 and 100, and the
//! USDT stand-ins (`standin.c`) at 500.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::json;

use super::{
    standin::StandinFleet,
    tmux::{TmuxSession, tmux},
};

/// What the VMs are.
#[derive(Debug, Clone, Copy)]
pub enum Fleet {
    PausedUsdtQemus(usize),
    Standins(usize),
}

impl Fleet {
    fn size(self) -> usize {
        match self {
            Fleet::PausedUsdtQemus(n) | Fleet::Standins(n) => n,
        }
    }

    fn label(self) -> String {
        match self {
            Fleet::PausedUsdtQemus(n) => format!("{n} paused USDT QEMUs"),
            Fleet::Standins(n) => format!("{n} USDT stand-ins"),
        }
    }
}

/// Processes killed on drop.
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

fn paused_usdt_qemus(usdt_qemu: &Path, n: usize) -> anyhow::Result<Processes> {
    let firmware: Vec<&str> = xtask::launch::FIRMWARE_DIRS
        .iter()
        .filter(|d| Path::new(d).is_dir())
        .flat_map(|d| ["-L", d])
        .collect();
    let mut all = Processes(Vec::new());
    for i in 0..n {
        let mut cmd = Command::new(usdt_qemu);
        cmd.args(&firmware)
            .args(["-machine", "pc,accel=tcg", "-S", "-m", "32"])
            .args(["-display", "none", "-nodefaults", "-monitor", "none"])
            .args(["-name", &format!("guest=teardown-{i:03}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        super::die_with_parent(&mut cmd, libc::SIGKILL);
        all.0
            .push(cmd.spawn().context("starting a paused USDT QEMU")?);
    }
    Ok(all)
}

/// `profiler record` watching every VM, once it has attached to all `n` and a window closed.
fn recording(profiler: &Path, mode: &str, out: &Path, n: usize) -> anyhow::Result<Child> {
    let _ = std::fs::remove_file(out);
    let mut cmd = Command::new(profiler);
    cmd.args([
        "record",
        "--window",
        "3",
        "--uprobe-links",
        mode,
        "--output",
    ])
    .arg(out)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    super::die_with_parent(&mut cmd, libc::SIGKILL);
    let child = cmd.spawn().context("starting profiler record")?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let windows = std::fs::read_to_string(out)
            .map(|t| t.lines().filter(|l| l.contains("\"window\":1,")).count())
            .unwrap_or(0);
        if windows >= n {
            return Ok(child);
        }
        if Instant::now() > deadline {
            bail!("profiler record did not close window 1 of {n} VMs in 10 minutes");
        }
        sleep(Duration::from_millis(200));
    }
}

/// Seconds from `signal` until `child` is gone (reaped).
fn signal_until_gone(child: &mut Child, signal: i32) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    // SAFETY: a plain signal to our own child.
    unsafe { libc::kill(child.id() as i32, signal) };
    child.wait()?;
    Ok(t0.elapsed().as_secs_f64())
}

/// `profiler top` in a terminal (tmux): seconds from `q` until its process is gone and the
/// shell after it has printed (the terminal is back).
fn top_quit(profiler: &Path, mode: &str) -> anyhow::Result<f64> {
    let session = format!("bench-teardown-{}", std::process::id());
    let script = format!(
        "{} top --window 3 --uprobe-links {mode}; echo TOP-EXITED; sleep 600",
        profiler.display()
    );
    let _kill = TmuxSession::start(&session, &script, 120, 30)?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while !tmux(&["capture-pane", "-p", "-t", &session])?.contains("window 002") {
        if Instant::now() > deadline {
            bail!("top did not reach window 2 in 10 minutes");
        }
        sleep(Duration::from_millis(200));
    }
    let pid = tmux(&["list-panes", "-t", &session, "-F", "#{pane_pid}"])?;
    let shell: u32 = pid.trim().parse().context("the pane's pid")?;
    let top = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children"))?
        .split_whitespace()
        .next()
        .and_then(|p| p.parse::<u32>().ok())
        .context("top's pid")?;
    let t0 = Instant::now();
    tmux(&["send-keys", "-t", &session, "q"])?;
    loop {
        let gone = !Path::new(&format!("/proc/{top}")).exists();
        if gone && tmux(&["capture-pane", "-p", "-t", &session])?.contains("TOP-EXITED") {
            return Ok(t0.elapsed().as_secs_f64());
        }
        if t0.elapsed() > Duration::from_secs(600) {
            bail!("top did not quit in 10 minutes");
        }
        sleep(Duration::from_millis(10));
    }
}

/// How long a budget pause and a resume take to be done with: `profiler record --window 3
/// --max-overhead 0.001` on `n` busy stand-ins (a budget that pauses every one of them for most
/// of each window), its probe links sampled every 10 ms over four windows. A pause stops the
/// counting at once (the links' generation); it has taken effect when its links are closed
/// (the breakpoints gone): seconds from the first sample below the fleet's full count of links
/// to the first at the paused count. A resume: from the first above the paused count to the
/// full count again. The longest of each over the windows seen.
fn measure_pause(
    profiler: &Path,
    dir: &Path,
    mode: &str,
    n: usize,
) -> anyhow::Result<serde_json::Value> {
    let out = dir.join(format!("pause-{mode}.jsonl"));
    let _ = std::fs::remove_file(&out);
    let mut cmd = Command::new(profiler);
    cmd.args([
        "record",
        "--window",
        "3",
        "--max-overhead",
        "0.001",
        "--uprobe-links",
        mode,
    ])
    .arg("--output")
    .arg(&out)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    super::die_with_parent(&mut cmd, libc::SIGKILL);
    let mut rec = cmd.spawn().context("starting profiler record")?;
    let pid = rec.id();
    // Past the first window: every VM attached, its cost learned.
    let deadline = Instant::now() + Duration::from_secs(600);
    while std::fs::read_to_string(&out)
        .map(|t| t.lines().filter(|l| l.contains("\"window\":1,")).count())
        .unwrap_or(0)
        < n
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "window 1 of {n} VMs never closed"
        );
        sleep(Duration::from_millis(200));
    }
    let t0 = Instant::now();
    let mut samples: Vec<(f64, usize)> = Vec::new();
    while t0.elapsed() < Duration::from_secs(12) {
        samples.push((t0.elapsed().as_secs_f64(), xtask::links::probe_links(pid)));
        sleep(Duration::from_millis(10));
    }
    let _ = signal_until_gone(&mut rec, libc::SIGTERM);
    let full = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let paused = samples.iter().map(|s| s.1).min().unwrap_or(0);
    // Each run from one level to the other: (seconds, falling).
    let mut spans: Vec<(f64, bool)> = Vec::new();
    let mut start: Option<(f64, bool)> = None;
    for pair in samples.windows(2) {
        let ((_, a), (t, b)) = (pair[0], pair[1]);
        match start {
            None if a == full && b < full => start = Some((pair[0].0, true)),
            None if a == paused && b > paused => start = Some((pair[0].0, false)),
            Some((from, falling)) if (falling && b == paused) || (!falling && b == full) => {
                spans.push((t - from, falling));
                start = None;
            }
            _ => {}
        }
    }
    let longest = |falling: bool| {
        spans
            .iter()
            .filter(|s| s.1 == falling)
            .map(|s| s.0)
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))
    };
    let (pause, resume) = (longest(true), longest(false));
    eprintln!(
        "xtask bench teardown: {n} busy stand-ins, budget, {mode}: links {full} → {paused}; \
         pause done in {pause:?} s, resume in {resume:?} s"
    );
    Ok(json!({
        "mode": mode, "links_full": full, "links_paused": paused,
        "pause_seconds": pause, "resume_seconds": resume,
        "pauses_seen": spans.iter().filter(|s| s.1).count(),
        "resumes_seen": spans.iter().filter(|s| !s.1).count(),
    }))
}

/// Every measure of one fleet with one link mode.
fn measure(profiler: &Path, dir: &Path, mode: &str, n: usize) -> anyhow::Result<serde_json::Value> {
    let out = dir.join(format!("teardown-{mode}.jsonl"));
    let mut rec = recording(profiler, mode, &out, n)?;
    let links = xtask::links::probe_links(rec.id());
    let sigterm = signal_until_gone(&mut rec, libc::SIGTERM)?;
    // Every VM's running window written at the stop.
    let stopped = std::fs::read_to_string(&out)?
        .lines()
        .filter(|l| l.contains("\"profiler_stopped\""))
        .count();
    let mut rec = recording(profiler, mode, &out, n)?;
    let sigkill = signal_until_gone(&mut rec, libc::SIGKILL)?;
    let top = top_quit(profiler, mode)?;
    eprintln!(
        "xtask bench teardown: {n} VMs, {mode}: {links} links; top q {top:.2} s, SIGTERM \
         {sigterm:.2} s ({stopped} windows written at the stop), SIGKILL {sigkill:.2} s"
    );
    Ok(json!({
        "mode": mode, "links": links, "top_quit_seconds": top,
        "sigterm_seconds": sigterm, "sigkill_seconds": sigkill,
        "stopped_windows_written": stopped,
    }))
}

pub fn run(
    profiler: &Path,
    usdt_qemu: &Path,
    dir: &Path,
    fleets: &[Fleet],
    per_site_up_to: usize,
    command: &str,
) -> anyhow::Result<(String, serde_json::Value)> {
    let mut rows = String::new();
    let mut results = Vec::new();
    let mut verdicts = Vec::new();
    for &fleet in fleets {
        let n = fleet.size();
        let _vms: Box<dyn std::any::Any> = match fleet {
            Fleet::PausedUsdtQemus(n) => Box::new(paused_usdt_qemus(usdt_qemu, n)?),
            Fleet::Standins(n) => Box::new(StandinFleet::start(n, "teardown", 100)?),
        };
        sleep(Duration::from_secs(3));
        let multi = measure(profiler, dir, "auto", n)?;
        let per_vm = measure(profiler, dir, "per-vm", n)?;
        let per_site = if n <= per_site_up_to {
            Some(measure(profiler, dir, "per-site", n)?)
        } else {
            None
        };
        let cell = |m: &Option<serde_json::Value>, key: &str| {
            m.as_ref()
                .and_then(|m| m[key].as_f64())
                .map_or_else(|| "not run".to_string(), |s| format!("{s:.2} s"))
        };
        let per_site_links = per_site
            .as_ref()
            .map_or_else(|| "not run".into(), |m| m["links"].to_string());
        for (action, key) in [
            ("`top`, `q`, until gone", "top_quit_seconds"),
            ("`record`, SIGTERM", "sigterm_seconds"),
            ("`record`, SIGKILL", "sigkill_seconds"),
        ] {
            rows.push_str(&format!(
                "| {} | {action} | {} | {} | {:.2} s |\n",
                fleet.label(),
                cell(&per_site, key),
                cell(&Some(per_vm.clone()), key),
                multi[key].as_f64().unwrap_or(f64::NAN),
            ));
        }
        rows.push_str(&format!(
            "| {} | probe links held | {per_site_links} | {} | {} |\n",
            fleet.label(),
            per_vm["links"],
            multi["links"]
        ));
        if n >= 100 {
            let f = |k: &str| multi[k].as_f64().unwrap_or(f64::INFINITY);
            let met = f("top_quit_seconds") < 1.0
                && f("sigterm_seconds") < 1.0
                && f("sigkill_seconds") < 3.0
                && multi["stopped_windows_written"].as_u64() >= Some(n as u64);
            verdicts.push(format!(
                "{}: {}",
                fleet.label(),
                if met { "met" } else { "MISSED" }
            ));
        }
        // A budget pause needs VMs busy enough to be paused: stand-ins, as many.
        drop(_vms);
        let busy = StandinFleet::start(n, "pause", 100)?;
        sleep(Duration::from_secs(3));
        let pause_vm = measure_pause(profiler, dir, "per-vm", n)?;
        let pause_site = if n <= per_site_up_to {
            Some(measure_pause(profiler, dir, "per-site", n)?)
        } else {
            None
        };
        drop(busy);
        let secs = |m: Option<&serde_json::Value>, k: &str| match m.map(|m| m[k].as_f64()) {
            None => "not run".to_string(),
            Some(None) => "not done in 12 s".to_string(),
            Some(Some(s)) => format!("{s:.2} s"),
        };
        for (action, key) in [
            ("budget pause: links closed", "pause_seconds"),
            ("budget resume: links made", "resume_seconds"),
        ] {
            rows.push_str(&format!(
                "| {n} busy stand-ins | {action} | {} | {} | — |\n",
                secs(pause_site.as_ref(), key),
                secs(Some(&pause_vm), key),
            ));
        }
        results.push(json!({
            "fleet": fleet.label(), "vms": n, "per_binary": multi, "per_vm": per_vm,
            "per_site": per_site, "budget_pause_per_vm": pause_vm,
            "budget_pause_per_site": pause_site,
        }));
    }
    let body = format!(
        "## How long stopping takes\n\n\
         `{command}`: the profiler watching every VM (release build, default options, \
         3 s windows) until window 1 of each has closed, then asked to stop; seconds until its \
         process is gone (reaped; for `top`, gone and the shell after it printing in the \
         terminal). With the uprobes linked per probe site (`--uprobe-links per-site`, what \
         kernels before 6.6 get), with one multi-uprobe link per VM and program \
         (`--uprobe-links per-vm`, what a budget uses) and with one multi-uprobe link per QEMU \
         binary and program shared by its VMs (the default where the kernel makes them). \
         \"Probe links held\": the BPF links and perf events open in the recording process. \
         Budget rows: `record --window 3 --max-overhead 0.001` on as many busy stand-ins (a \
         budget has each VM's own links, so no per-binary column), links sampled every 10 ms \
         for 12 s: the longest a pause took from its first link closed to its last (the \
         counting stops at the pause itself: the links' generation), and a resume from its \
         first link made to its last.\n\n\
         | VMs | action | per site | per VM | per binary (default) |\n|---|---|---:|---:|---:|\n{rows}\n\
         Targets (100 paused USDT QEMUs or 500 stand-ins): `top` quits and `record` exits on \
         SIGTERM with every window written in < 1 s, a SIGKILLed profiler is gone in < 3 s — \
         {}.\n",
        verdicts.join("; ")
    );
    Ok((body, json!({"command": command, "fleets": results})))
}
