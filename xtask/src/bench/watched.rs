//! What a watched QEMU pays per second, per timer source, on a real guest: the demo's noisy
//! guest (Debian's QEMU, a UHCI tablet whose frame timer wakes the main loop 1,000 times a
//! second), its QEMU's CPU time measured while `profiler record` watches it with each
//! `--timer-source`, configurations interleaved and rotated, medians of per-round paired
//! differences to nothing running. The per-call figures of `tax` weigh only one kind of call;
//! this weighs the QEMU's own mix (zero-timeout polls, timed waits, and every other syscall,
//! which the syscall tracepoints also put on the slow path).

use std::{
    collections::BTreeMap,
    path::Path,
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde_json::json;
use xtask::{
    guest::GuestImage,
    launch::{DeviceSet, GuestSpec, launch},
};

use super::{loops::median, process_cpu_clock, tracers::Tracer};

/// (record key, `--timer-source`, label); `None`: nothing running, or (`empty_program`) the
/// floor, an empty BPF program at the result sites ([`super::floor`]).
const CONFIGS: [(&str, Option<&str>, &str); 6] = [
    ("nothing", None, "nothing"),
    (
        EMPTY_PROGRAM,
        None,
        "an empty BPF program at the result sites (the floor)",
    ),
    ("libc", Some("libc"), "libc uprobes at the results"),
    (
        "libc_entry_return",
        Some("libc-entry-return"),
        "libc uprobes at entry and return",
    ),
    ("syscall", Some("syscall"), "syscall tracepoints"),
    (
        "hrtimer",
        Some("hrtimer"),
        "hrtimer tracepoints (the default)",
    ),
];

const VM: &str = "watched-noisy";
/// An identical guest never watched, measured over the same spans: what the probes add is
/// taken against it, which cancels what moves both (this machine's other tenants).
const TWIN: &str = "watched-twin";
const EMPTY_PROGRAM: &str = "empty_program";

/// `cmp $-4096,%rax` / `cmp $-4095,%rax`, glibc's error check after a `syscall`.
const CMP_RAX_ERRNO: [[u8; 6]; 2] = [
    [0x48, 0x3d, 0x00, 0xf0, 0xff, 0xff],
    [0x48, 0x3d, 0x01, 0xf0, 0xff, 0xff],
];

/// File offsets in the C library at `path` of the conditional jump after each
/// `syscall; cmp $-4096,%rax` of `ppoll`, `epoll_pwait` and `epoll_pwait2`: where the
/// profiler's libc result probes go (profiler/src/probes/libc_waits.rs finds them the same
/// way and refuses a function with any other syscall site; this only measures).
pub(super) fn libc_result_sites(path: &Path) -> anyhow::Result<Vec<u64>> {
    use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let elf = object::File::parse(&*bytes)?;
    let mut sites = Vec::new();
    for symbol in elf.dynamic_symbols() {
        let name = symbol.name().unwrap_or("");
        if !["ppoll", "epoll_pwait", "epoll_pwait2"].contains(&name) || symbol.size() == 0 {
            continue;
        }
        // The segment holding the function turns its address into a file offset.
        let Some(file_start) = elf.segments().find_map(|seg| {
            let (off, size) = seg.file_range();
            (seg.address() <= symbol.address() && symbol.address() < seg.address() + size)
                .then(|| off + symbol.address() - seg.address())
        }) else {
            continue;
        };
        let start = file_start as usize;
        let Some(code) = bytes.get(start..start + symbol.size() as usize) else {
            continue;
        };
        for at in 0..code.len().saturating_sub(10) {
            if code[at..at + 2] == [0x0f, 0x05]
                && CMP_RAX_ERRNO.iter().any(|c| code[at + 2..at + 8] == *c)
                && matches!(code[at + 8], 0x77 | 0x73 | 0x0f)
            {
                sites.push(file_start + at as u64 + 8);
            }
        }
    }
    // A function can have several dynamic symbols (versions).
    sites.sort_unstable();
    sites.dedup();
    anyhow::ensure!(
        !sites.is_empty(),
        "no result site found in {}",
        path.display()
    );
    Ok(sites)
}

/// The C library process `pid` maps, by the path in its `/proc/PID/maps`.
pub(super) fn mapped_libc(pid: u32) -> anyhow::Result<std::path::PathBuf> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| {
            p.rsplit('/')
                .next()
                .is_some_and(|f| f.starts_with("libc.so"))
        })
        .map(std::path::PathBuf::from)
        .context("the QEMU maps no libc.so")
}

/// x86-64 syscall numbers named in the mix.
const SYSCALL_NAMES: [(u64, &str); 8] = [
    (0, "read"),
    (1, "write"),
    (7, "poll"),
    (16, "ioctl"),
    (202, "futex"),
    (232, "epoll_wait"),
    (271, "ppoll"),
    (281, "epoll_pwait"),
];

/// The syscalls `pid` makes per second, by number, counted by bpftrace over `secs` (before
/// any configuration runs: the raw syscall tracepoint taxes every syscall while attached).
fn syscall_mix(pid: u32, secs: u64) -> anyhow::Result<BTreeMap<u64, f64>> {
    let script = format!(
        "tracepoint:raw_syscalls:sys_enter /pid == {pid}/ {{ @[args->id] = count(); }} \
         interval:s:{secs} {{ exit(); }}"
    );
    let out = Command::new("bpftrace")
        .args(["-e", &script])
        .stderr(Stdio::null())
        .output()
        .context("running bpftrace (apt install bpftrace)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // Lines `@[271]: 4512`.
    let mix: BTreeMap<u64, f64> = text
        .lines()
        .filter_map(|l| {
            let (id, n) = l.strip_prefix("@[")?.split_once("]: ")?;
            Some((
                id.parse().ok()?,
                n.trim().parse::<f64>().ok()? / secs as f64,
            ))
        })
        .collect();
    anyhow::ensure!(
        !mix.is_empty(),
        "bpftrace counted no syscalls of {pid}: {text}"
    );
    Ok(mix)
}

/// CPU seconds per second of each QEMU in `pids`, over the same `secs`.
fn cpu_per_second_of(pids: &[u32], secs: u64) -> anyhow::Result<Vec<f64>> {
    let clocks = || -> anyhow::Result<Vec<f64>> {
        pids.iter()
            .map(|&pid| process_cpu_clock(pid).context("the guest's QEMU is gone"))
            .collect()
    };
    let (c0, t0) = (clocks()?, Instant::now());
    sleep(Duration::from_secs(secs));
    let c1 = clocks()?;
    let elapsed = t0.elapsed().as_secs_f64();
    Ok(c0.iter().zip(&c1).map(|(a, b)| (b - a) / elapsed).collect())
}

/// Run count and run time of one BPF program over a pass.
struct ProgramRate {
    name: String,
    runs_per_s: f64,
    ns_per_run: f64,
}

/// Every loaded BPF program with an id above `after`: id -> (name, run count, run time ns).
fn program_stats(after: u32) -> BTreeMap<u32, (String, u64, u64)> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.id() > after)
        .map(|p| {
            let name = p.name_as_str().unwrap_or("?").to_owned();
            (
                p.id(),
                (name, p.run_count(), p.run_time().as_nanos() as u64),
            )
        })
        .collect()
}

/// What the BPF programs of `profiler record --timer-source SOURCE` cost while it watches the
/// guest, from the kernel's BPF statistics (held on by this pass alone: they add two clock
/// reads to every run, so the CPU rounds run without them). Programs that did not run are
/// left out; a tracepoint program runs for every process on the host, not the QEMU only.
fn program_rates(
    profiler: &Path,
    dir: &Path,
    source: &str,
    secs: u64,
) -> anyhow::Result<Vec<ProgramRate>> {
    program_rates_of(profiler, dir, &["--timer-source", source], VM, secs)
}

/// [`program_rates`] of `profiler record ARGS --vm VM`.
fn program_rates_of(
    profiler: &Path,
    dir: &Path,
    args: &[&str],
    vm: &str,
    secs: u64,
) -> anyhow::Result<Vec<ProgramRate>> {
    let before = program_stats(0).into_keys().max().unwrap_or(0);
    let tracer = Tracer::profiler(
        profiler,
        args,
        &[vm],
        &[vm],
        dir,
        &format!("watched-programs-{vm}"),
    )?;
    let _stats = super::bpf_stats_on()?;
    let (a, t0) = (program_stats(before), Instant::now());
    sleep(Duration::from_secs(secs));
    let (b, elapsed) = (program_stats(before), t0.elapsed().as_secs_f64());
    drop(tracer);
    let mut rates: Vec<ProgramRate> = b
        .iter()
        .filter_map(|(id, (name, runs, ns))| {
            let (_, runs0, ns0) = a.get(id)?;
            let runs = runs.checked_sub(*runs0).filter(|r| *r > 0)?;
            Some(ProgramRate {
                name: name.clone(),
                runs_per_s: runs as f64 / elapsed,
                ns_per_run: ns.saturating_sub(*ns0) as f64 / runs as f64,
            })
        })
        .collect();
    rates.sort_by(|x, y| (y.runs_per_s * y.ns_per_run).total_cmp(&(x.runs_per_s * x.ns_per_run)));
    Ok(rates)
}

/// Runs the rounds and returns (markdown section, JSON).
pub fn run(
    image: &GuestImage,
    profiler: &Path,
    dir: &Path,
    rounds: usize,
    secs: u64,
    command: &str,
) -> anyhow::Result<(String, serde_json::Value)> {
    let guest = launch(&GuestSpec::new(VM, DeviceSet::Noisy), image, dir)?;
    let twin = launch(&GuestSpec::new(TWIN, DeviceSet::Noisy), image, dir)?;
    guest.wait_ready(Duration::from_secs(240))?;
    twin.wait_ready(Duration::from_secs(240))?;
    let (pid, twin_pid) = (guest.pid(), twin.pid());
    // Past boot's tail (a guest's QEMU settles over its first half minute).
    sleep(Duration::from_secs(30));
    let mix = syscall_mix(pid, 5)?;
    let libc_file = mapped_libc(pid)?;
    let sites = libc_result_sites(&libc_file)?;
    // Per config, per round: the watched QEMU's CPU minus its twin's, and the two.
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); CONFIGS.len()];
    let mut own: Vec<Vec<(f64, f64)>> = vec![Vec::new(); CONFIGS.len()];
    for round in 0..rounds {
        for k in 0..CONFIGS.len() {
            let i = (k + round) % CONFIGS.len();
            let (key, source, label) = CONFIGS[i];
            let tracer: Option<Box<dyn std::any::Any>> = match source {
                Some(source) => Some(Box::new(Tracer::profiler(
                    profiler,
                    &["--timer-source", source],
                    &[VM],
                    &[VM],
                    dir,
                    &format!("watched-{key}"),
                )?)),
                None if key == EMPTY_PROGRAM => Some(Box::new(
                    super::floor::EmptyProgramUprobes::attach(pid, &libc_file, &sites)?,
                )),
                None => None,
            };
            let cpus = cpu_per_second_of(&[pid, twin_pid], secs)?;
            drop(tracer);
            let (cpu, cpu_twin) = (cpus[0], cpus[1]);
            eprintln!(
                "xtask bench watched: round {round} {label:<40} QEMU {:6.2} ms CPU per s, twin \
                 {:6.2}, difference {:+6.2}",
                cpu * 1e3,
                cpu_twin * 1e3,
                (cpu - cpu_twin) * 1e3
            );
            samples[i].push(cpu - cpu_twin);
            own[i].push((cpu, cpu_twin));
        }
    }
    // The programs' share, source by source, in a pass of its own.
    let mut programs = Vec::new();
    for (key, source, label) in CONFIGS {
        let Some(source) = source else { continue };
        let rates = program_rates(profiler, dir, source, secs)?;
        let total: f64 = rates.iter().map(|r| r.runs_per_s * r.ns_per_run).sum();
        eprintln!(
            "xtask bench watched: programs of {label:<40} {:6.2} ms per s",
            total / 1e6
        );
        programs.push((key, label, total, rates));
    }
    drop((guest, twin));
    // What config `i` adds: the median over rounds of its span's watched-minus-twin
    // difference less the median of that difference with nothing running.
    let baseline = median(&samples[0]);
    let added = |i: usize| median(&samples[i]) - baseline;
    // How far nothing itself moves between rounds (the difference to the twin).
    let spread = {
        let (lo, hi) = samples[0]
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        (hi - lo) / 2.0
    };
    let mut rows = String::new();
    let mut json_rows = Vec::new();
    for (i, (key, _, label)) in CONFIGS.iter().enumerate() {
        let m = median(&own[i].iter().map(|c| c.0).collect::<Vec<_>>());
        let m_twin = median(&own[i].iter().map(|c| c.1).collect::<Vec<_>>());
        let diff = median(&samples[i]);
        let cell = if i == 0 {
            format!("{:+.2} (±{:.2})", diff * 1e3, spread * 1e3)
        } else {
            format!("{:+.2} ({:+.2})", diff * 1e3, added(i) * 1e3)
        };
        rows.push_str(&format!(
            "| {label} | {:.2} | {:.2} | {cell} |\n",
            m * 1e3,
            m_twin * 1e3
        ));
        json_rows.push(json!({
            "config": key, "cpu_seconds_per_second": m, "twin_cpu_seconds_per_second": m_twin,
            "minus_twin": diff, "added": if i == 0 { 0.0 } else { added(i) },
            "rounds_minus_twin": samples[i], "rounds": own[i],
        }));
    }
    let total: f64 = mix.values().sum();
    let named = |id: u64| {
        SYSCALL_NAMES
            .iter()
            .find(|(n, _)| *n == id)
            .map_or_else(|| format!("#{id}"), |(_, name)| name.to_string())
    };
    let mut by_rate: Vec<(&u64, &f64)> = mix.iter().collect();
    by_rate.sort_by(|a, b| b.1.total_cmp(a.1));
    let mix_text = by_rate
        .iter()
        .take(6)
        .map(|(id, rate)| format!("{} {:.0}/s", named(**id), rate))
        .collect::<Vec<_>>()
        .join(", ");
    let (floor, libc, entry_return, sys, hrtimer) =
        (added(1), added(2), added(3), added(4), added(5));
    // Two configurations in each round, each against the twin over its own span: their
    // difference, round by round.
    let paired = |a: usize, b: usize| -> (Vec<f64>, f64, f64, f64) {
        let d: Vec<f64> = samples[a]
            .iter()
            .zip(&samples[b])
            .map(|(x, y)| x - y)
            .collect();
        let (lo, hi) = d
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        let m = median(&d);
        (d, m, lo, hi)
    };
    let (hr_minus_sys, hr_sys, lo, hi) = paired(5, 4);
    let verdict = format!(
        "{}: the hrtimer tracepoints' CPU minus the syscall tracepoints' in each round {:+.2} \
         to {:+.2} ms/s, median {:+.2}",
        if hr_sys <= 0.0 { "met" } else { "MISSED" },
        lo * 1e3,
        hi * 1e3,
        hr_sys * 1e3
    );
    let (libc_minus_sys, libc_sys, libc_lo, libc_hi) = paired(2, 4);
    let (floor_minus_sys, floor_sys, floor_lo, floor_hi) = paired(1, 4);
    let (_, libc_floor, libc_floor_lo, libc_floor_hi) = paired(2, 1);
    let libc_path = libc_file.display().to_string();
    let mut program_rows = String::new();
    let mut program_json = Vec::new();
    for (key, label, total, rates) in &programs {
        let each = rates
            .iter()
            .map(|r| {
                format!(
                    "`{}` {:.0}/s × {:.0} ns",
                    r.name, r.runs_per_s, r.ns_per_run
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        program_rows.push_str(&format!("| {label} | {:.2} | {each} |\n", total / 1e6));
        program_json.push(json!({
            "config": key, "program_ns_per_second": total,
            "programs": rates.iter().map(|r| json!({
                "name": r.name, "runs_per_second": r.runs_per_s, "ns_per_run": r.ns_per_run,
            })).collect::<Vec<_>>(),
        }));
    }
    let program_ms = |key: &str| {
        programs
            .iter()
            .find(|(k, ..)| *k == key)
            .map_or(f64::NAN, |(_, _, total, _)| total / 1e6)
    };
    let per_call = |added: f64| added / mix.get(&271).copied().unwrap_or(f64::NAN) * 1e9;
    let body = format!(
        "## What a watched QEMU pays per second, per timer source\n\n\
         `{command}`: the CPU time of the demo's noisy guest's QEMU (Debian's QEMU, TCG, a \
         UHCI tablet) over {secs} s while `profiler record --window 1 --timer-source SOURCE` \
         watches it, beside an identical twin guest that is never watched, measured over the \
         same spans; {rounds} rounds, configurations interleaved and rotated each round; \
         milliseconds of CPU per second (0.01 % of a core each), medians over rounds. What \
         the probes add is the watched QEMU's CPU minus its twin's, less the same difference \
         with nothing running (what moves both guests cancels; so does what a source costs \
         every process on the host, which the twin pays too: the slow syscall path of the \
         syscall tracepoints, the first load of the hrtimer and `sched_switch` programs — \
         the tax section measures those per call). Its syscalls, counted \
         before the rounds by bpftrace on `raw_syscalls:sys_enter` over 5 s: \
         {total:.0}/s in all — {mix_text}.\n\n\
         | watching it | QEMU CPU (ms per s) | its twin | minus the twin (added) |\n\
         |---|---:|---:|---:|\n{rows}\n\
         Target: a watched QEMU pays no more probe CPU per second than the syscall \
         tracepoints cost it — {:+.2} ms/s with the default hrtimer tracepoints against \
         {:+.2} ms/s with the syscall tracepoints ({verdict}). With `--timer-source libc` (every \
         wait's result, a trap per wait call): {:+.2} ms/s (its CPU minus the tracepoints' in \
         each round {:+.2} to {:+.2} ms/s, median {:+.2}); the two-trap entry and return \
         probes {:+.2} ms/s. Per `ppoll` of this QEMU that is about \
         {:.1} µs (libc results), {:.1} µs (entry and return), {:.1} µs (syscall \
         tracepoints), {:.1} µs (hrtimer): several times the same probes' cost per call in \
         the tight loops of the tax section.\n\n\
         What bounds the libc source: the floor under any uprobe source, an empty BPF program \
         (`r0 = 0; exit`) at the same {n_sites} result sites of {libc_path}, attached as the \
         profiler attaches its own (per-process perf events opened disabled, linked with \
         `BPF_LINK_CREATE`), costs this QEMU {:+.2} ms/s ({:.1} µs per `ppoll`): the \
         breakpoint trap and the kernel's uprobe and BPF dispatch alone, against {:+.2} ms/s \
         for the syscall tracepoints (the floor minus the tracepoints in each round {:+.2} to \
         {:+.2} ms/s, median {:+.2}). Every wait-function call takes the trap, zero-timeout \
         polls included, so no program at these sites can cost this QEMU much less than the \
         tracepoints do; the profiler's result probes (their program, and the \
         `hrtimer_start` mark that tells a timed ppoll from a zero-timeout one) add a median \
         {:+.2} ms/s over the floor in the same rounds ({:+.2} to {:+.2}).\n\n\
         Where the probes' time goes: the kernel's BPF statistics of each source's programs \
         over {secs} s, in a pass after the rounds with the statistics held on (they are off \
         in the rounds: they add two clock reads to each run). Programs' names are cut to 15 \
         characters by the kernel; a tracepoint program runs for every process on the host \
         (most runs return at the first lookup), so its time is not all the QEMU's. The libc \
         source's programs take at most {:.2} ms/s of the {:+.2} it adds (with the \
         statistics on, each run also pays their clock reads, and `hrtimer_start` runs for \
         the whole host); the rest is the breakpoint trap and the uprobe dispatch around \
         them. The default's `sched_switch` runs at every context switch of the host.\n\n\
         | source | BPF programs (ms per s) | each: runs per s × time per run |\n|---|---|---|\n\
         {program_rows}",
        hrtimer * 1e3,
        sys * 1e3,
        libc * 1e3,
        libc_lo * 1e3,
        libc_hi * 1e3,
        libc_sys * 1e3,
        entry_return * 1e3,
        per_call(libc) / 1e3,
        per_call(entry_return) / 1e3,
        per_call(sys) / 1e3,
        per_call(hrtimer) / 1e3,
        floor * 1e3,
        per_call(floor) / 1e3,
        sys * 1e3,
        floor_lo * 1e3,
        floor_hi * 1e3,
        floor_sys * 1e3,
        libc_floor * 1e3,
        libc_floor_lo * 1e3,
        libc_floor_hi * 1e3,
        program_ms("libc"),
        libc * 1e3,
        n_sites = sites.len(),
        libc_path = libc_path,
    );
    let json = json!({
        "command": command, "rounds": rounds, "seconds": secs,
        "syscalls_per_second": mix.iter().map(|(id, r)| (named(*id), *r)).collect::<BTreeMap<_, _>>(),
        "configs": json_rows,
        "libc_minus_syscall_per_round": libc_minus_sys,
        "hrtimer_minus_syscall_per_round": hr_minus_sys,
        "default_timer_source": "hrtimer",
        "floor_minus_syscall_per_round": floor_minus_sys,
        "programs": program_json,
        "floor_sites": sites, "libc": libc_path,
        "targets": {"added_floor": floor, "added_libc": libc, "added_syscall": sys,
                    "added_libc_entry_return": entry_return, "added_hrtimer": hrtimer},
    });
    Ok((body, json))
}

/// A KVM guest whose only activity is its own 1 kHz PIT, and an identical twin.
const KVM_VM: &str = "watched-pit";
const KVM_TWIN: &str = "watched-pit-twin";

/// What watching a KVM guest costs it: a boot sector with its PIT at 1,000 Hz (its vCPU is
/// woken a thousand times a second in the kernel, never in QEMU's event loop) and its twin,
/// nothing running against `profiler record` with its defaults, interleaved; and the BPF
/// statistics of the programs that ran for it. `None` without /dev/kvm.
pub fn run_kvm(
    profiler: &Path,
    dir: &Path,
    rounds: usize,
    secs: u64,
    command: &str,
) -> anyhow::Result<Option<(String, serde_json::Value)>> {
    use xtask::boot_sector::{BootSector, BootSectorGuest};
    if !Path::new("/dev/kvm").exists() {
        return Ok(None);
    }
    let specs =
        [KVM_VM, KVM_TWIN].map(|name| BootSectorGuest::new(name, BootSector::Pit { hz: 1000 }));
    let guests = specs
        .iter()
        .map(|spec| {
            let guest = spec.launch(dir)?;
            guest.wait_for_line(&spec.ready_line(), Duration::from_secs(240))?;
            Ok(guest)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let pids = [guests[0].pid(), guests[1].pid()];
    sleep(Duration::from_secs(5));
    // Per round: (nothing, profiler) each as the watched QEMU's CPU minus its twin's.
    let mut samples: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut own: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for k in 0..2 {
            let i = (k + round) % 2;
            let tracer = (i == 1)
                .then(|| Tracer::profiler(profiler, &[], &[KVM_VM], &[KVM_VM], dir, "watched-kvm"))
                .transpose()?;
            let cpus = cpu_per_second_of(&pids, secs)?;
            drop(tracer);
            eprintln!(
                "xtask bench watched: KVM round {round} {} QEMU {:6.2} ms CPU per s, twin {:6.2}",
                if i == 1 { "profiler" } else { "nothing " },
                cpus[0] * 1e3,
                cpus[1] * 1e3
            );
            samples[i].push(cpus[0] - cpus[1]);
            own[i].push(cpus[0]);
        }
    }
    let rates = program_rates_of(profiler, dir, &[], KVM_VM, secs)?;
    drop(guests);
    let added = median(&samples[1]) - median(&samples[0]);
    let cpu = median(&own[0]);
    let wakeups = rates
        .iter()
        .find(|r| r.name.starts_with("kvm_vcpu_wakeup"))
        .map_or(f64::NAN, |r| r.runs_per_s);
    let target = added <= 0.02 * cpu;
    let each = rates
        .iter()
        .take(6)
        .map(|r| {
            format!(
                "`{}` {:.0}/s × {:.0} ns",
                r.name, r.runs_per_s, r.ns_per_run
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let programs_ms: f64 = rates
        .iter()
        .map(|r| r.runs_per_s * r.ns_per_run)
        .sum::<f64>()
        / 1e6;
    let body = format!(
        "\n### A KVM guest's own tick\n\n\
         The same measure (`{command}`) on a KVM guest whose only activity is its own timer: a \
         boot sector that sets the PIT to 1,000 Hz and halts (Debian's QEMU, this host's KVM), \
         beside an identical twin, with nothing running and with `profiler record` and its \
         defaults (which count this guest's vCPU wakeups, its accesses by the kvm tracepoints, \
         its threads' CPU by role at each window boundary); {rounds} rounds of {secs} s. Its \
         QEMU uses {:.1} ms of CPU per second unwatched; watching it adds {:+.2} ms/s \
         (rounds minus the twin: nothing {}, profiler {}). Target: at most 2 % of the guest's \
         own CPU — {} ({:+.2} %). The programs that ran meanwhile, with the BPF statistics on \
         (every KVM guest's events on the host run them; `kvm_vcpu_wakeup` ran {:.0} times a \
         second): {programs_ms:.2} ms/s in all — {each}.\n",
        cpu * 1e3,
        added * 1e3,
        fmt_rounds(&samples[0]),
        fmt_rounds(&samples[1]),
        if target { "met" } else { "MISSED" },
        added / cpu * 100.0,
        wakeups,
    );
    let json = json!({
        "command": command, "rounds": rounds, "seconds": secs,
        "cpu_seconds_per_second": cpu, "added": added,
        "rounds_minus_twin": {"nothing": samples[0], "profiler": samples[1]},
        "programs": rates.iter().map(|r| json!({
            "name": r.name, "runs_per_second": r.runs_per_s, "ns_per_run": r.ns_per_run,
        })).collect::<Vec<_>>(),
        "target_met": target,
    });
    Ok(Some((body, json)))
}

/// Each round's figure in ms/s: `+1.20, -0.35, ...`.
fn fmt_rounds(samples: &[f64]) -> String {
    samples
        .iter()
        .map(|x| format!("{:+.2}", x * 1e3))
        .collect::<Vec<_>>()
        .join(", ")
}
