//! `cargo xtask bench top-history`: does `profiler top` cost the same per refresh after 120
//! windows of history as after 5? N QEMU-like processes, `top --window 1` in a real terminal
//! (tmux), its CPU and resident memory over 10 s after window 5 and after window W.

use std::{
    path::Path,
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::bail;
use serde_json::json;

use super::{
    ProcUsage, flag, proc_usage, publish,
    qemu_like::QemuLikeFleet,
    ticks_per_second,
    tmux::{TmuxSession, tmux},
};

/// Seconds over which each CPU figure is averaged.
const SPAN: u64 = 10;

/// CPU % of one core between two readings `secs` apart.
fn cpu_percent(a: ProcUsage, b: ProcUsage, secs: f64) -> f64 {
    (b.cpu_ticks - a.cpu_ticks) as f64 / ticks_per_second() / secs * 100.0
}

pub fn run(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let vms = flag(args, "--vms", 100)? as usize;
    let windows = flag(args, "--windows", 120)?;
    if windows < 5 + SPAN {
        bail!("--windows must be at least {}", 5 + SPAN);
    }
    crate::setup::setup(root)?;
    let profiler = crate::demo::build_profiler(root)?;
    let fleet = QemuLikeFleet::start(vms, "like", 10)?;
    eprintln!(
        "xtask bench top-history: {} QEMU-like processes (ppoll, 10 ms), `profiler top \
         --window 1` in tmux for {} s",
        fleet.len(),
        windows + SPAN + 2
    );
    let dir = tempfile_dir()?;
    let pidfile = dir.join("top.pid");
    let session = format!("profiler-bench-{}", std::process::id());
    let script = format!(
        "echo $$ > {}; exec {} top --window 1",
        pidfile.display(),
        profiler.display()
    );
    let _kill = TmuxSession::start(&session, &script, 160, 50)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let pid: u32 = loop {
        if let Some(pid) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            break pid;
        }
        if Instant::now() > deadline {
            bail!("profiler top did not start");
        }
        sleep(Duration::from_millis(50));
    };
    let started = Instant::now();
    let at = |secs: u64| {
        let target = started + Duration::from_secs(secs);
        if let Some(wait) = target.checked_duration_since(Instant::now()) {
            sleep(wait);
        }
    };
    at(5);
    let early_a = proc_usage(pid)?;
    at(5 + SPAN);
    let early_b = proc_usage(pid)?;
    let screen_early = tmux(&["capture-pane", "-p", "-t", &session])?;
    at(windows);
    let late_a = proc_usage(pid)?;
    at(windows + SPAN);
    let late_b = proc_usage(pid)?;
    let screen_late = tmux(&["capture-pane", "-p", "-t", &session])?;
    let shown = format!("host  {vms} VMs");
    if !screen_early.contains(&shown) || !screen_late.contains(&shown) {
        bail!("top did not show {vms} VMs:\n{screen_late}");
    }
    let early_cpu = cpu_percent(early_a, early_b, SPAN as f64);
    let late_cpu = cpu_percent(late_a, late_b, SPAN as f64);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let (early_rss, late_rss) = (mib(early_b.rss_bytes), mib(late_b.rss_bytes));
    let cpu_ratio = late_cpu / early_cpu.max(1e-9);
    let rss_ratio = late_rss / early_rss.max(1e-9);
    let verdict = |r: f64| {
        if r <= 1.2 {
            "within 1.2×"
        } else {
            "ABOVE 1.2×"
        }
    };
    eprintln!(
        "xtask bench top-history: CPU {early_cpu:.2}% → {late_cpu:.2}% ({cpu_ratio:.2}×, {}), \
         RSS {early_rss:.1} → {late_rss:.1} MiB ({rss_ratio:.2}×, {})",
        verdict(cpu_ratio),
        verdict(rss_ratio)
    );
    let command = format!("cargo xtask bench top-history --vms {vms} --windows {windows}");
    let body = format!(
        "## `profiler top`: cost independent of its history\n\n\
         `{command}`: {vms} QEMU-like processes (each wakes from `ppoll` every 10 ms), \
         `profiler top --window 1` in tmux (160×50). CPU of the `top` process (collector \
         thread + drawing) averaged over {SPAN} s, resident memory at the end of that span.\n\n\
         | after | CPU (% of a core) | RSS (MiB) |\n|---|---|---|\n\
         | 5 windows | {early_cpu:.2} | {early_rss:.1} |\n\
         | {windows} windows | {late_cpu:.2} | {late_rss:.1} |\n\
         | ratio | {cpu_ratio:.2}× ({}) | {rss_ratio:.2}× ({}) |\n\n\
         Target (issue: `top`'s cost must not grow with its history): both ratios ≤ 1.2×. \
         History is shared between the snapshots the collector publishes and the screen \
         draws (a pointer copy per VM per refresh, not a copy of its windows).\n",
        verdict(cpu_ratio),
        verdict(rss_ratio)
    );
    let json = json!({
        "command": command,
        "vms": vms,
        "windows": windows,
        "span_seconds": SPAN,
        "early": {"cpu_percent": early_cpu, "rss_mib": early_rss},
        "late": {"cpu_percent": late_cpu, "rss_mib": late_rss},
        "cpu_ratio": cpu_ratio,
        "rss_ratio": rss_ratio,
    });
    publish(root, "top-history", &body, &json)?;
    drop(fleet);
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("profiler-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
