//! What counting one guest access costs, per read/write source, against what an operator would
//! use instead: bpftrace on the same probe (bare `count()` and keyed by region), and QEMU's own
//! log trace backend. One guest per QEMU binary runs the same port-read workload round after
//! round; the host switches tracers between rounds (the guest waits for a line on its second
//! serial port before each), so every configuration is measured in the same QEMU process,
//! interleaved. The guest times its own reads: ns per access, median over rounds.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::json;
use xtask::{
    guest::GuestImage,
    launch::{DeviceSet, GuestSpec, RunningGuest, launch},
};

use super::{loops::median, tracers::Tracer};

/// The port the workload reads: the parallel port's data register.
const PORT: &str = "0x378";

/// A tracer configuration of one round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Config {
    Nothing,
    Profiler,
    /// bpftrace `@ = count()` on the source's probe.
    BpftraceCount,
    /// bpftrace keyed by region: `@[str(name)]` (USDT) or `@[mr]` (symbols).
    BpftraceKeyed,
    /// bpftrace `@ = count()` with the kernel's BPF run-time statistics on, as they are while
    /// the profiler runs (it reports its own cost from them).
    BpftraceCountStats,
    /// QEMU's log trace backend, `memory_region_ops_read` enabled over QMP.
    LogBackend,
}

impl Config {
    fn label(self) -> &'static str {
        match self {
            Config::Nothing => "nothing",
            Config::Profiler => "profiler record",
            Config::BpftraceCount => "bpftrace `@ = count()`",
            Config::BpftraceKeyed => "bpftrace keyed by region",
            Config::BpftraceCountStats => "bpftrace `@ = count()`, BPF statistics on",
            Config::LogBackend => "QEMU log trace backend (`memory_region_ops_read`)",
        }
    }
}

/// One QEMU binary and the configurations it is measured under.
struct Subject {
    key: &'static str,
    title: &'static str,
    qemu: PathBuf,
    configs: &'static [Config],
}

fn bpftrace_script(subject: &str, qemu: &Path, pid: u32, keyed: bool) -> String {
    let q = qemu.display();
    match (subject, keyed) {
        ("usdt", false) => {
            format!("usdt:{q}:qemu:memory_region_ops_read /pid == {pid}/ {{ @ = count(); }}")
        }
        ("usdt", true) => format!(
            "usdt:{q}:qemu:memory_region_ops_read /pid == {pid}/ {{ @[str(arg5)] = count(); }}"
        ),
        (_, false) => {
            format!("uprobe:{q}:memory_region_dispatch_read /pid == {pid}/ {{ @ = count(); }}")
        }
        (_, true) => {
            format!(
                "uprobe:{q}:memory_region_dispatch_read /pid == {pid}/ {{ @[arg0] = count(); }}"
            )
        }
    }
}

/// A copy of the USDT QEMU without its USDT notes, next to it (QEMU finds its firmware
/// relative to its own path): the profiler serves it from its symbols.
fn symbols_only_qemu(usdt: &Path) -> anyhow::Result<PathBuf> {
    let out = usdt.with_file_name("qemu-system-x86_64-nousdt");
    if !out.exists() {
        let status = Command::new("objcopy")
            .arg("--remove-section=.note.stapsdt")
            .arg(usdt)
            .arg(&out)
            .status()
            .context("running objcopy")?;
        if !status.success() {
            bail!("objcopy failed: {status}");
        }
    }
    Ok(out)
}

/// A QMP command on `socket` (greeting and capabilities first).
fn qmp(socket: &Path, command: serde_json::Value) -> anyhow::Result<()> {
    let stream = UnixStream::connect(socket).context("connecting to QMP")?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut w = stream;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    for cmd in [json!({"execute": "qmp_capabilities"}), command] {
        writeln!(w, "{cmd}")?;
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let v: serde_json::Value = serde_json::from_str(&line)?;
            if v.get("return").is_some() {
                break;
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {cmd}: {e}");
            }
        }
    }
    Ok(())
}

fn set_log_trace(guest: &RunningGuest, on: bool) -> anyhow::Result<()> {
    qmp(
        &guest.qmp_socket(),
        json!({"execute": "trace-event-set-state",
               "arguments": {"name": "memory_region_ops_read", "enable": on}}),
    )
}

/// `ns_per_op` of the workload's round `round`, from the serial log.
fn round_timing(guest: &RunningGuest, round: usize) -> anyhow::Result<f64> {
    let needle = format!("round={round}");
    guest
        .serial_text()
        .lines()
        .find(|l| l.contains("PROFILER-WORKLOAD-TIMING") && l.ends_with(&needle))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("ns_per_op="))
                .and_then(|v| v.parse().ok())
        })
        .with_context(|| format!("no timing for round {round}"))
}

/// Port reads of the `parallel` device the profiler recorded in `records`.
fn recorded_reads(records: &Path) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(records)?;
    let mut total = 0;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        for d in v["devices"].as_array().into_iter().flatten() {
            if d["name"] == "parallel" {
                total += d["read"].as_u64().unwrap_or(0);
            }
        }
    }
    Ok(total)
}

/// Per configuration: ns per access in each round; and the profiler's counts per round.
struct Measured {
    ns: Vec<Vec<f64>>,
    profiler_counts: Vec<u64>,
}

fn measure(
    subject: &Subject,
    image: &GuestImage,
    profiler: &Path,
    dir: &Path,
    rounds: usize,
    reads: u64,
) -> anyhow::Result<Measured> {
    let name = format!("bench-{}", subject.key);
    let total_rounds = rounds * subject.configs.len();
    let ctl = dir.join(format!("{}.ctl", subject.key));
    let _ = std::fs::remove_file(&ctl);
    let mut spec = GuestSpec::new(&name, DeviceSet::Quiet);
    spec.qemu = subject.qemu.clone();
    spec.extra_append = format!(
        "workload=inb:{PORT}:{reads} workload_rounds={total_rounds} workload_sync=/dev/ttyS1"
    );
    spec.extra_args = [
        "-chardev",
        "null,id=lp0",
        "-device",
        "isa-parallel,chardev=lp0",
        "-chardev",
        &format!("socket,id=ctl,path={},server=on,wait=off", ctl.display()),
        "-device",
        "isa-serial,chardev=ctl",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if subject.configs.contains(&Config::LogBackend) {
        let log = dir.join(format!("{}.trace.log", subject.key));
        spec.extra_args.extend([
            "-trace".into(),
            "enable=memory_region_ops_read".into(),
            "-D".into(),
            log.display().to_string(),
        ]);
    }
    let guest = launch(&spec, image, dir)?;
    guest.wait_for_line(
        "PROFILER-WORKLOAD-WAITING round=0",
        Duration::from_secs(300),
    )?;
    if subject.configs.contains(&Config::LogBackend) {
        // Enabled at start so QEMU turns its log on; off until a round wants it.
        set_log_trace(&guest, false)?;
    }
    let mut go = UnixStream::connect(&ctl).context("connecting to the guest's sync port")?;
    let mut measured = Measured {
        ns: vec![Vec::new(); subject.configs.len()],
        profiler_counts: Vec::new(),
    };
    let mut round = 0;
    for r in 0..rounds {
        for k in 0..subject.configs.len() {
            let i = (k + r) % subject.configs.len();
            let config = subject.configs[i];
            guest.wait_for_line(&format!("WAITING round={round}"), Duration::from_secs(60))?;
            let pid = guest.pid();
            // Held for this round only.
            let stats = (config == Config::BpftraceCountStats)
                .then(super::bpf_stats_on)
                .transpose()?;
            let tracer = match config {
                Config::Nothing => None,
                Config::Profiler => Some(Tracer::profiler(
                    profiler,
                    &[],
                    &[&name],
                    &[&name],
                    dir,
                    &format!("events-{}-{round}", subject.key),
                )?),
                Config::BpftraceCount | Config::BpftraceKeyed | Config::BpftraceCountStats => {
                    Some(Tracer::bpftrace(
                        &bpftrace_script(
                            subject.key,
                            &subject.qemu,
                            pid,
                            config == Config::BpftraceKeyed,
                        ),
                        Some(pid),
                    )?)
                }
                Config::LogBackend => {
                    set_log_trace(&guest, true)?;
                    None
                }
            };
            go.write_all(b"go\n")?;
            let deadline = std::time::Instant::now() + Duration::from_secs(300);
            let ns = loop {
                if let Ok(ns) = round_timing(&guest, round) {
                    break ns;
                }
                if std::time::Instant::now() > deadline {
                    bail!("round {round} did not finish");
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            if config == Config::LogBackend {
                set_log_trace(&guest, false)?;
            }
            drop(stats);
            if let Some(t) = tracer {
                // A window closes (with this round's reads) within a second.
                std::thread::sleep(Duration::from_millis(1500));
                let records = t.records.clone();
                t.stop();
                if let Some(records) = records {
                    measured.profiler_counts.push(recorded_reads(&records)?);
                }
            }
            eprintln!(
                "xtask bench events: {} round {round}: {:<48} {ns:7.0} ns per read",
                subject.key,
                config.label()
            );
            measured.ns[i].push(ns);
            round += 1;
        }
    }
    Ok(measured)
}

/// Runs every subject and returns (markdown section, JSON).
pub fn run(
    image: &GuestImage,
    profiler: &Path,
    usdt_qemu: &Path,
    dir: &Path,
    rounds: usize,
    reads: u64,
    command: &str,
) -> anyhow::Result<(String, serde_json::Value)> {
    use Config::*;
    let subjects = [
        Subject {
            key: "usdt",
            title: "USDT `qemu:memory_region_ops_read` (the USDT QEMU)",
            qemu: usdt_qemu.to_path_buf(),
            configs: &[
                Nothing,
                Profiler,
                BpftraceCount,
                BpftraceKeyed,
                BpftraceCountStats,
            ],
        },
        Subject {
            key: "symbols",
            title: "uprobe on `memory_region_dispatch_read` (the same QEMU without its USDT notes)",
            qemu: symbols_only_qemu(usdt_qemu)?,
            configs: &[Nothing, Profiler, BpftraceCount, BpftraceKeyed],
        },
        Subject {
            key: "log",
            title: "QEMU's log trace backend (Debian's QEMU)",
            qemu: PathBuf::from("qemu-system-x86_64"),
            configs: &[Nothing, LogBackend],
        },
    ];
    let mut rows = String::new();
    let mut json_subjects = Vec::new();
    let mut exact = true;
    let mut ratios = Vec::new();
    for subject in &subjects {
        let m = measure(subject, image, profiler, dir, rounds, reads)?;
        let meds: Vec<f64> = m.ns.iter().map(|v| median(v)).collect();
        let base = meds[0];
        let added = |i: usize| meds[i] - base;
        for (i, config) in subject.configs.iter().enumerate() {
            let cell = if i == 0 {
                "—".to_string()
            } else {
                format!("{:+.0}", added(i))
            };
            rows.push_str(&format!(
                "| {} | {} | {:.0} | {cell} |\n",
                subject.title,
                config.label(),
                meds[i]
            ));
        }
        if subject.key != "log" {
            let (p, c, k) = (added(1), added(2), added(3));
            let stats = subject
                .configs
                .iter()
                .position(|c| *c == BpftraceCountStats)
                .map(|i| p / added(i));
            ratios.push(
                json!({"source": subject.key, "vs_count": p / c, "vs_keyed": p / k,
                               "vs_count_with_stats": stats}),
            );
        }
        exact &= m.profiler_counts.iter().all(|&n| n == reads);
        json_subjects.push(json!({
            "subject": subject.key,
            "qemu": subject.qemu,
            "configs": subject.configs.iter().map(|c| c.label()).collect::<Vec<_>>(),
            "ns_per_read_rounds": m.ns,
            "ns_per_read_median": meds,
            "profiler_counted": m.profiler_counts,
        }));
    }
    let ratio_text: Vec<String> = ratios
        .iter()
        .map(|r| {
            let stats = r["vs_count_with_stats"]
                .as_f64()
                .map(|x| format!(", {x:.2}× its `count()` with BPF statistics on"))
                .unwrap_or_default();
            format!(
                "{}: {:.2}× bpftrace's `count()` (target ≤ 1.1×), {:.2}× its keyed count (target \
                 ≤ 1.0×){stats}",
                r["source"].as_str().unwrap_or(""),
                r["vs_count"].as_f64().unwrap_or(f64::NAN),
                r["vs_keyed"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect();
    let body = format!(
        "## What counting one guest access costs\n\n\
         `{command}`: a TCG guest reads port {PORT} {reads} times per round, {rounds} round(s) \
         per configuration, configurations interleaved in one QEMU process (the guest waits \
         for the host to switch tracers between rounds); the guest's own clock gives ns per \
         read, median over rounds. The profiler counts per region (what `devices` shows), \
         like the keyed bpftrace.\n\n\
         | probe | running | ns per read | added |\n|---|---|---:|---:|\n{rows}\n\
         Per-event cost of the profiler relative to bpftrace on the same probe: {}.\n\n\
         Accuracy: every profiler round counted exactly {reads} reads of `parallel` — {}.\n",
        ratio_text.join("; "),
        if exact { "yes" } else { "NO (see the JSON)" }
    );
    let json = json!({
        "command": command,
        "reads_per_round": reads,
        "rounds": rounds,
        "subjects": json_subjects,
        "ratios": ratios,
        "profiler_exact": exact,
    });
    Ok((body, json))
}
