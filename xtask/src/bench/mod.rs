//! `cargo xtask bench`: the profiler's costs, measured on this machine, written to
//! docs/benchmarks.md (each figure with the command that produced it) and a JSON file beside
//! it. Speed and overhead goals live here, not in timed tests.
//!
//! Each benchmark owns one section of docs/benchmarks.md, between
//! `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`, rewritten when it runs.

mod budget;
mod events;
mod floor;
mod loops;
mod qemu_like;
mod remedies;
mod scale;
mod soak;
mod standin;
mod tax;
mod teardown;
mod tmux;
mod top_history;
mod tracers;
mod watched;

use std::{fs, path::Path};

use anyhow::{Context as _, bail};

pub use loops::syscall_loop_main;
pub use qemu_like::qemu_like_main;

const USAGE: &str = "\
usage: cargo xtask bench [--quick] | cargo xtask bench <benchmark> [options]

Without a benchmark: the cost set (tax, watched, events, budget, scale, attach, self-cost), each
section of
docs/benchmarks.md rewritten; --quick runs fewer rounds and sizes (up to 100 VMs).

benchmarks:
  tax [--quick]       unrelated getppid/ppoll loops and a watched QEMU's ppoll, per timer source
                      and against bpftrace
  watched [--quick]   a real guest's QEMU CPU per second while watched, per timer source, and
                      (with /dev/kvm) a KVM guest's whose only activity is its own 1 kHz tick
  events [--quick]    ns per guest port read per read/write source, against bpftrace and QEMU's
                      log trace backend
  budget [--quick]    --max-overhead on a busy guest: its QEMU's CPU, and the estimates' error
  scale [--quick]     collector CPU and memory with 1, 10, 100, 500, 2,000 QEMU-like processes
  attach              time to attach to 50 running USDT QEMUs
  teardown [--quick]  time until the profiler is gone after q / SIGTERM / SIGKILL, uprobes
                      linked per site, per VM and per binary: 20 and 100 paused USDT QEMUs,
                      500 USDT stand-ins
  self-cost [--quick] the demo's own cost
  soak [--minutes M] [--step S]
                      profiler serve against churning guests for M minutes (30), 20 QEMU-like
                      processes replaced every S seconds (60): CPU, memory, descriptors flat
  soak --exits-per-second R [--standins N] [--minutes M]
                      profiler serve watching N USDT stand-ins (200), one killed and replaced
                      R times a second for M minutes (10): CPU, memory, links, descriptors flat
  top-history [--vms N] [--windows W]
      profiler top's CPU and memory with N QEMU-like processes after 5 windows and after W
      (default 100 VMs, 120 one-second windows)
  remedies [--window S] [--windows K]
      what disabling USB (UHCI vs xHCI vs none) and the parallel port brings, on real guests
";

pub fn bench(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    match args.first().map(String::as_str) {
        Some("top-history") => top_history::run(root, &args[1..]),
        Some("remedies") => remedies::run(root, &args[1..]),
        Some("soak") if args.iter().any(|a| a == "--exits-per-second") => {
            crate::setup::setup(root)?;
            let profiler = crate::demo::build_profiler(root)?;
            soak::run_churn(root, &profiler, &args[1..])
        }
        Some("soak") => {
            crate::setup::setup(root)?;
            let image = xtask::guest::build_guest(root)?;
            let profiler = crate::demo::build_profiler(root)?;
            let dir = xtask::cache::cache_subdir(&format!("run/soak-{}", std::process::id()))?;
            soak::run(root, &image, &profiler, &dir, &args[1..])
        }
        Some(
            name @ ("tax" | "watched" | "events" | "budget" | "scale" | "attach" | "self-cost"
            | "teardown"),
        ) => cost_set(root, &[name], quick),
        Some("help" | "-h" | "--help") => {
            print!("{USAGE}");
            Ok(())
        }
        None | Some("--quick") => cost_set(
            root,
            &[
                "tax",
                "watched",
                "events",
                "budget",
                "scale",
                "attach",
                "self-cost",
            ],
            quick,
        ),
        _ => {
            eprint!("{USAGE}");
            bail!("which benchmark?")
        }
    }
}

/// Runs the named sections of the cost set and publishes each.
fn cost_set(root: &Path, names: &[&str], quick: bool) -> anyhow::Result<()> {
    crate::setup::setup(root)?;
    let profiler = crate::demo::build_profiler(root)?;
    let dir = xtask::cache::cache_subdir(&format!("run/bench-{}", std::process::id()))?;
    let command = |name: &str| {
        let all = names.len() > 1;
        match (all, quick) {
            (true, false) => "cargo xtask bench".to_string(),
            (true, true) => "cargo xtask bench --quick".to_string(),
            (false, false) => format!("cargo xtask bench {name}"),
            (false, true) => format!("cargo xtask bench {name} --quick"),
        }
    };
    let needs_guest = names
        .iter()
        .any(|n| matches!(*n, "watched" | "events" | "budget" | "self-cost"));
    let image = if needs_guest {
        Some(xtask::guest::build_guest(root)?)
    } else {
        None
    };
    let needs_usdt = names
        .iter()
        .any(|n| matches!(*n, "events" | "budget" | "attach" | "teardown"));
    let usdt_qemu = if needs_usdt {
        Some(crate::qemu_usdt::qemu_usdt()?)
    } else {
        None
    };
    for &name in names {
        eprintln!("xtask bench: {name}");
        let (body, json) = match name {
            "tax" => {
                let (rounds, calls) = if quick { (2, 300_000) } else { (5, 1_000_000) };
                tax::run(&profiler, &dir, rounds, calls, &command(name))?
            }
            "watched" => {
                let (rounds, secs) = if quick { (2, 10) } else { (5, 20) };
                let (mut body, mut json) = watched::run(
                    image.as_ref().expect("built"),
                    &profiler,
                    &dir,
                    rounds,
                    secs,
                    &command(name),
                )?;
                if let Some((kvm, kvm_json)) =
                    watched::run_kvm(&profiler, &dir, rounds, secs, &command(name))?
                {
                    body.push_str(&kvm);
                    json["kvm"] = kvm_json;
                }
                (body, json)
            }
            "events" => {
                let (rounds, reads) = if quick { (1, 100_000) } else { (3, 300_000) };
                events::run(
                    image.as_ref().expect("built"),
                    &profiler,
                    usdt_qemu.as_ref().expect("built"),
                    &dir,
                    rounds,
                    reads,
                    &command(name),
                )?
            }
            "budget" => budget::run(
                image.as_ref().expect("built"),
                &profiler,
                usdt_qemu.as_ref().expect("built"),
                &dir,
                // Five: the guest's own CPU moves by tenths of a percent between spans.
                if quick { 1 } else { 5 },
                // Below the counted cost of the UHCI guest's probes (~1.4 % here), so the
                // duty cycle engages and its estimates can be checked.
                0.1,
                &command(name),
            )?,
            "scale" => {
                // The default window, as `record` runs; quick runs take shorter ones.
                let (sizes, window): (&[usize], u64) = if quick {
                    (&[1, 10, 100], 5)
                } else {
                    (&[1, 10, 100, 500, 2000], 30)
                };
                scale::run_scale(&profiler, &dir, sizes, window, &command(name))?
            }
            "attach" => scale::run_attach(
                &profiler,
                usdt_qemu.as_ref().expect("built"),
                &dir,
                50,
                &command(name),
            )?,
            "teardown" => {
                use teardown::Fleet;
                let (fleets, per_site_up_to): (&[Fleet], usize) = if quick {
                    (&[Fleet::PausedUsdtQemus(20)], 20)
                } else {
                    (
                        &[
                            Fleet::PausedUsdtQemus(20),
                            Fleet::PausedUsdtQemus(100),
                            Fleet::Standins(500),
                        ],
                        100,
                    )
                };
                teardown::run(
                    &profiler,
                    usdt_qemu.as_ref().expect("built"),
                    &dir,
                    fleets,
                    per_site_up_to,
                    &command(name),
                )?
            }
            "self-cost" => scale::run_self_cost(
                image.as_ref().expect("built"),
                &profiler,
                &dir,
                if quick { 15 } else { 30 },
                &command(name),
            )?,
            _ => unreachable!("names are checked above"),
        };
        publish(root, name, &body, &json)?;
    }
    Ok(())
}

/// `--name N` from `args`, else `default`.
pub(crate) fn flag(args: &[String], name: &str, default: u64) -> anyhow::Result<u64> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()
            .with_context(|| format!("{name} takes a whole number")),
        None => Ok(default),
    }
}

/// Replaces (or appends) section `name` of docs/benchmarks.md with `body`, and writes
/// `json` to docs/benchmarks/NAME.json.
fn publish(root: &Path, name: &str, body: &str, json: &serde_json::Value) -> anyhow::Result<()> {
    publish_to(
        root,
        "benchmarks.md",
        "# Benchmarks\n\nMeasured on this project's test machine kind (2 cores, nested \
         virtualization, TCG guests): absolute numbers are high, ratios measured side by side \
         in one run are what carry over. Each section is written by the `cargo xtask` command \
         it names.\n",
        name,
        body,
        json,
    )
}

/// [`publish`] into `docs/DOC`, which starts with `intro` when it is created.
pub(crate) fn publish_to(
    root: &Path,
    doc: &str,
    intro: &str,
    name: &str,
    body: &str,
    json: &serde_json::Value,
) -> anyhow::Result<()> {
    let docs = root.join("docs");
    let md = docs.join(doc);
    let text = fs::read_to_string(&md).unwrap_or_else(|_| intro.to_string());
    let (open, close) = (
        format!("<!-- bench:{name} -->"),
        format!("<!-- /bench:{name} -->"),
    );
    let section = format!("{open}\n{}\n{close}", body.trim_end());
    let text = match (text.find(&open), text.find(&close)) {
        (Some(a), Some(b)) if b > a => {
            format!("{}{section}{}", &text[..a], &text[b + close.len()..])
        }
        _ => format!("{}\n\n{section}\n", text.trim_end()),
    };
    fs::write(&md, text).with_context(|| format!("writing {}", md.display()))?;
    let dir = docs.join("benchmarks");
    fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.json"));
    fs::write(&path, serde_json::to_string_pretty(json)? + "\n")?;
    eprintln!("xtask bench: wrote {} and {}", md.display(), path.display());
    Ok(())
}

/// CPU ticks (user + system) and resident memory of a process.
#[derive(Debug, Clone, Copy)]
struct ProcUsage {
    cpu_ticks: u64,
    /// The same CPU time in seconds, at ns resolution where the CPU clock can be read.
    cpu_seconds: f64,
    rss_bytes: u64,
}

fn proc_usage(pid: u32) -> anyhow::Result<ProcUsage> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    let after = &stat[stat.rfind(')').context("malformed stat")? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Field 14/15 (utime, stime) are at 11/12 counting from field 3.
    let cpu_ticks = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")?;
    Ok(ProcUsage {
        cpu_ticks,
        cpu_seconds: process_cpu_clock(pid).unwrap_or(cpu_ticks as f64 / ticks_per_second()),
        rss_bytes: rss_kb * 1024,
    })
}

/// CPU time of process `pid` (all threads) in seconds from its CPU clock: nanoseconds, where
/// `stat`'s ticks are 10 ms (0.05 % of a core over a 20 s span).
fn process_cpu_clock(pid: u32) -> Option<f64> {
    // The kernel's encoding of another process's CPU clock (clock_getcpuclockid).
    let clock = ((!(pid as libc::clockid_t)) << 3) | 2;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write to.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9)
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Turns the kernel's BPF run-time statistics on for every program until the returned
/// descriptor is dropped (`BPF_ENABLE_STATS`, what the profiler does while it runs): unlike
/// the `kernel.bpf_stats_enabled` sysctl, an interrupted bench cannot leave them on.
pub fn bpf_stats_on() -> anyhow::Result<std::os::fd::OwnedFd> {
    use anyhow::Context as _;
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling the kernel's BPF run-time statistics")
}

/// Makes `cmd`'s process get `signal` when this one dies (an interrupted bench must not leave
/// QEMU-like fleets or profilers running). SIGTERM lets a profiler detach in order.
pub fn die_with_parent(cmd: &mut std::process::Command, signal: i32) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
