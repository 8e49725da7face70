//! `cargo xtask bench soak [--minutes M]`: the profiler for M minutes (30 by default) against
//! churning guests: real TCG guests that boot, run and are killed in turn, and QEMU-like
//! processes that come and go every few seconds. `profiler serve` (the mode that stays up for
//! months) watches them; its CPU, memory, open descriptors and eBPF map entries are sampled
//! every minute. Flat means: the last third of the run costs what the first third did, and
//! nothing grows with the number of VMs that came and went.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::json;
use xtask::{
    guest::GuestImage,
    launch::{DeviceSet, GuestSpec, RunningGuest, launch},
};

use super::{flag, proc_usage, qemu_like::QemuLikeFleet, standin::StandinFleet, ticks_per_second};

/// Real guests alive at once, and how long each lives.
const GUESTS: usize = 2;
const GUEST_LIFE: Duration = Duration::from_secs(90);
/// QEMU-like processes replaced per churn step (every `--step` seconds, 60 by default).
///
/// Each exiting VM leaves about eight uprobe links to close, and the kernel closes perf-event
/// uprobes one at a time (each waits a grace period inside the trace-event mutex: measured
/// here, a 5 s step with 20 VMs — four exits a second — piled up closes faster than they
/// drained, ~900 more link fds each minute). 20 every 60 s is a busy cloud host's churn.
const LIKE: usize = 20;

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// `qemu_profiler_bpf_map_entries{map="COUNTERS"}` and the watched-VM count from /metrics.
fn scrape(port: u16) -> Option<(f64, f64)> {
    use std::io::{Read as _, Write as _};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut body = Vec::new();
    conn.read_to_end(&mut body).ok()?;
    let text = String::from_utf8_lossy(&body);
    let value = |prefix: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    Some((
        value("qemu_profiler_bpf_map_entries{map=\"COUNTERS\"}"),
        value("qemu_profiler_vms{"),
    ))
}

/// `profiler serve --window 10` on 127.0.0.1:`port`, stopped when the bench goes.
fn start_serve(profiler: &Path, port: u16) -> anyhow::Result<Serve> {
    let mut cmd = Command::new(profiler);
    cmd.args(["serve", "--window", "10", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    super::die_with_parent(&mut cmd, libc::SIGTERM);
    Ok(Serve(cmd.spawn().context("starting profiler serve")?))
}

/// `pid`'s CPU (% of a core) since `last` at `last_t`, and its RSS (MiB) now; `last` and
/// `last_t` move on to now.
fn usage_since(
    pid: u32,
    last: &mut super::ProcUsage,
    last_t: &mut Instant,
) -> anyhow::Result<(f64, f64)> {
    let now = proc_usage(pid)?;
    let secs = last_t.elapsed().as_secs_f64();
    let cpu = (now.cpu_ticks - last.cpu_ticks) as f64 / ticks_per_second() / secs * 100.0;
    let rss_mib = now.rss_bytes as f64 / (1 << 20) as f64;
    *last = now;
    *last_t = Instant::now();
    Ok((cpu, rss_mib))
}

/// The mean of `key` over the last third of `rows` against the first third.
fn last_third_over_first(rows: &[serde_json::Value], key: &str) -> f64 {
    let third = (rows.len() / 3).max(1);
    let mean = |rs: &[serde_json::Value]| {
        rs.iter().filter_map(|r| r[key].as_f64()).sum::<f64>() / rs.len().max(1) as f64
    };
    mean(&rows[rows.len() - third..]) / mean(&rows[..third]).max(1e-9)
}

fn verdict(ratio: f64) -> &'static str {
    if ratio <= 1.2 { "flat" } else { "GROWING" }
}

pub fn run(
    root: &Path,
    image: &GuestImage,
    profiler: &Path,
    dir: &Path,
    args: &[String],
) -> anyhow::Result<()> {
    let minutes = flag(args, "--minutes", 30)?;
    let like_step = Duration::from_secs(flag(args, "--step", 60)?.max(1));
    if minutes < 3 {
        bail!("--minutes must be at least 3");
    }
    let port = 19464;
    let mut serve = start_serve(profiler, port)?;
    sleep(Duration::from_secs(2));
    if let Some(status) = serve.0.try_wait()? {
        bail!("profiler serve exited at once ({status}); is 127.0.0.1:{port} taken?");
    }
    let pid = serve.0.id();
    eprintln!(
        "xtask bench soak: {minutes} min; {GUESTS} real guests living {} s each, {LIKE} \
         QEMU-like processes replaced every {} s; profiler serve pid {pid}",
        GUEST_LIFE.as_secs(),
        like_step.as_secs()
    );
    let started = Instant::now();
    let end = started + Duration::from_secs(minutes * 60);
    let mut guests: Vec<(RunningGuest, Instant)> = Vec::new();
    let mut like: Option<QemuLikeFleet> = None;
    let mut guests_started = 0usize;
    let mut like_started = 0usize;
    let mut next_like = Instant::now();
    let mut next_sample = Instant::now() + Duration::from_secs(60);
    let mut last = proc_usage(pid)?;
    let mut last_t = Instant::now();
    let mut rows = Vec::new();
    while Instant::now() < end {
        // Guests: replace any that lived their time, keep GUESTS alive.
        guests.retain(|(_, born)| born.elapsed() < GUEST_LIFE);
        while guests.len() < GUESTS {
            let mut spec = GuestSpec::new(
                format!("soak-{guests_started:03}"),
                if guests_started.is_multiple_of(2) {
                    DeviceSet::Noisy
                } else {
                    DeviceSet::Quiet
                },
            );
            spec.memory_mb = 192;
            guests.push((launch(&spec, image, dir)?, Instant::now()));
            guests_started += 1;
        }
        if Instant::now() >= next_like {
            // Dropping the old fleet kills it: these VMs exit mid-window.
            drop(like.take());
            like = Some(QemuLikeFleet::start(
                LIKE,
                &format!("soak-like{like_started:05}"),
                20,
            )?);
            like_started += LIKE;
            next_like += like_step;
        }
        if Instant::now() >= next_sample {
            let (cpu, rss_mib) = usage_since(pid, &mut last, &mut last_t)?;
            let (counters, vms) = scrape(port).unwrap_or((f64::NAN, f64::NAN));
            let minute = started.elapsed().as_secs_f64() / 60.0;
            let row = json!({
                "minute": (minute * 10.0).round() / 10.0,
                "cpu_percent": cpu,
                "rss_mib": rss_mib,
                "fds": open_fds(pid),
                "counters_entries": counters,
                "vms_watched": vms,
                "vms_started_so_far": guests_started + like_started,
            });
            eprintln!("xtask bench soak: {row}");
            rows.push(row);
            next_sample += Duration::from_secs(60);
        }
        sleep(Duration::from_millis(500));
    }
    drop(like);
    drop(guests);
    drop(serve);
    let cpu_ratio = last_third_over_first(&rows, "cpu_percent");
    let rss_ratio = last_third_over_first(&rows, "rss_mib");
    let fds_ratio = last_third_over_first(&rows, "fds");
    let mut table = String::new();
    for r in rows.iter().step_by(5.min(rows.len()).max(1)) {
        table.push_str(&format!(
            "| {} | {:.2} | {:.1} | {} | {} | {} |\n",
            r["minute"],
            r["cpu_percent"].as_f64().unwrap_or(0.0),
            r["rss_mib"].as_f64().unwrap_or(0.0),
            r["fds"],
            r["counters_entries"],
            r["vms_started_so_far"],
        ));
    }
    let command = format!(
        "cargo xtask bench soak --minutes {minutes} --step {}",
        like_step.as_secs()
    );
    let body = format!(
        "## Soak: {minutes} minutes against churning guests\n\n\
         `{command}`: `profiler serve --window 10` while {GUESTS} real TCG guests (UHCI-tablet \
         and quiet, alternately) boot, run {} s and are killed, over and over, and {LIKE} \
         QEMU-like processes are replaced every {} s ({} VMs came and went in all). Sampled \
         every minute (every fifth row shown; all in the JSON):\n\n\
         | minute | CPU (% of a core) | RSS (MiB) | open fds | COUNTERS entries | VMs started so far |\n\
         |---:|---:|---:|---:|---:|---:|\n{table}\n\
         Last third against the first: CPU {cpu_ratio:.2}× ({}), RSS {rss_ratio:.2}× ({}), open \
         descriptors {fds_ratio:.2}× ({}).\n",
        GUEST_LIFE.as_secs(),
        like_step.as_secs(),
        guests_started + like_started,
        verdict(cpu_ratio),
        verdict(rss_ratio),
        verdict(fds_ratio),
    );
    super::publish(
        root,
        "soak",
        &body,
        &json!({"command": command, "minutes": minutes, "samples": rows,
                "cpu_ratio": cpu_ratio, "rss_ratio": rss_ratio, "fds_ratio": fds_ratio}),
    )
}

/// `soak --exits-per-second R`: `profiler serve` watching `--standins N` USDT stand-ins (each
/// with the probes a USDT QEMU gets), one of them killed and replaced R times a second for
/// `--minutes M`. Sampled every minute: the profiler's CPU, RSS, open descriptors and probe
/// links (in every descriptor table of its). Flat means the last third as the first.
pub fn run_churn(root: &Path, profiler: &Path, args: &[String]) -> anyhow::Result<()> {
    let minutes = flag(args, "--minutes", 10)?;
    let rate = flag(args, "--exits-per-second", 4)?.max(1);
    let n = flag(args, "--standins", 200)? as usize;
    if minutes < 3 {
        bail!("--minutes must be at least 3");
    }
    let period_ms = 100;
    let mut fleet = StandinFleet::start(n, "churn", period_ms)?;
    let port = 19465;
    let mut serve = start_serve(profiler, port)?;
    let pid = serve.0.id();
    // Every stand-in watched before the churn starts.
    let deadline = Instant::now() + Duration::from_secs(120);
    while scrape(port).is_none_or(|(_, vms)| (vms as usize) < n) {
        if let Some(status) = serve.0.try_wait()? {
            bail!("profiler serve exited ({status}); is 127.0.0.1:{port} taken?");
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "serve never watched all {n} stand-ins"
        );
        sleep(Duration::from_millis(500));
    }
    eprintln!(
        "xtask bench soak: {minutes} min; {n} USDT stand-ins, {rate} exits a second; profiler \
         serve pid {pid}"
    );
    let step = Duration::from_secs_f64(1.0 / rate as f64);
    let started = Instant::now();
    let end = started + Duration::from_secs(minutes * 60);
    let mut next_exit = Instant::now();
    let mut next_sample = Instant::now() + Duration::from_secs(60);
    let mut exits = 0usize;
    let mut last = proc_usage(pid)?;
    let mut last_t = Instant::now();
    let mut rows = Vec::new();
    while Instant::now() < end {
        if Instant::now() >= next_exit {
            fleet.replace_oldest(&format!("churn-r{exits:06}"), period_ms)?;
            exits += 1;
            next_exit += step;
        }
        if Instant::now() >= next_sample {
            let (cpu, rss_mib) = usage_since(pid, &mut last, &mut last_t)?;
            let (_, vms) = scrape(port).unwrap_or((f64::NAN, f64::NAN));
            let row = json!({
                "minute": (started.elapsed().as_secs_f64() / 6.0).round() / 10.0,
                "cpu_percent": cpu,
                "rss_mib": rss_mib,
                "fds": open_fds(pid),
                "links": xtask::links::probe_links(pid),
                "vms_watched": vms,
                "exits_so_far": exits,
            });
            eprintln!("xtask bench soak: {row}");
            rows.push(row);
            next_sample += Duration::from_secs(60);
        }
        sleep(
            next_exit
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100)),
        );
    }
    drop(serve);
    drop(fleet);
    let ratio = |k: &str| last_third_over_first(&rows, k);
    let mut table = String::new();
    for r in &rows {
        table.push_str(&format!(
            "| {} | {:.2} | {:.1} | {} | {} | {} | {} |\n",
            r["minute"],
            r["cpu_percent"].as_f64().unwrap_or(0.0),
            r["rss_mib"].as_f64().unwrap_or(0.0),
            r["fds"],
            r["links"],
            r["vms_watched"],
            r["exits_so_far"],
        ));
    }
    let command = format!(
        "cargo xtask bench soak --exits-per-second {rate} --standins {n} --minutes {minutes}"
    );
    let (cpu, rss, fds, links) = (
        ratio("cpu_percent"),
        ratio("rss_mib"),
        ratio("fds"),
        ratio("links"),
    );
    let body = format!(
        "## Churn: {rate} VM exits a second for {minutes} minutes\n\n\
         `{command}`: `profiler serve --window 10` (release build, default options) watching \
         {n} USDT stand-ins, the oldest killed and a new one started {rate} times a second \
         ({exits} exits in all). Sampled every minute; \"links\": BPF links and perf events in \
         every descriptor table of the profiler's. `serve` keeps an exited VM's series for \
         `--exit-grace` (300 s by default), so what it holds grows over the first five minutes \
         before exits drop out as fast as they come.\n\n\
         | minute | CPU (% of a core) | RSS (MiB) | open fds | links | VMs watched | exits so far |\n\
         |---:|---:|---:|---:|---:|---:|---:|\n{table}\n\
         Last third against the first: CPU {cpu:.2}× ({}), RSS {rss:.2}× ({}), open descriptors \
         {fds:.2}× ({}), links {links:.2}× ({}).\n",
        verdict(cpu),
        verdict(rss),
        verdict(fds),
        verdict(links),
    );
    super::publish(
        root,
        "churn",
        &body,
        &json!({"command": command, "minutes": minutes, "exits_per_second": rate,
                "standins": n, "samples": rows, "cpu_ratio": cpu, "rss_ratio": rss,
                "fds_ratio": fds, "links_ratio": links}),
    )
}
