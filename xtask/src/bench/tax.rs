//! What recording costs processes: an unrelated `getppid` loop, `ppoll` loop and pipe round
//! trip between two threads (the host-wide tax), and a watched QEMU-named `ppoll` loop (what a
//! watched QEMU pays per wait), with each timer source and with bpftrace on the same
//! tracepoints. Configurations interleaved in each round; medians over rounds.

use std::path::Path;

use serde_json::json;

use super::{
    loops::{LoopKind, median, run_loop},
    qemu_like::QemuLikeFleet,
    tracers::Tracer,
};

/// What is running while the loops run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Config {
    Nothing,
    ProfilerLibc,
    ProfilerLibcEntryReturn,
    ProfilerSyscall,
    ProfilerHrtimer,
    /// bpftrace on `syscalls:sys_{enter,exit}_ppoll`, filtered on the watched QEMU's pid,
    /// classifying returns as the profiler does.
    Bpftrace,
    /// An empty BPF program at the watched loop's libc result sites, attached as the profiler
    /// attaches (`super::floor`): the trap and dispatch alone, under any uprobe source.
    Floor,
}

const CONFIGS: [Config; 7] = [
    Config::Nothing,
    Config::ProfilerHrtimer,
    Config::ProfilerLibc,
    Config::ProfilerLibcEntryReturn,
    Config::ProfilerSyscall,
    Config::Bpftrace,
    Config::Floor,
];

impl Config {
    fn label(self) -> &'static str {
        match self {
            Config::Nothing => "nothing",
            Config::ProfilerLibc => "profiler, libc uprobes at the results (--timer-source libc)",
            Config::ProfilerLibcEntryReturn => {
                "profiler, libc uprobes at entry and return (--timer-source libc-entry-return)"
            }
            Config::ProfilerSyscall => "profiler, syscall tracepoints (--timer-source syscall)",
            Config::ProfilerHrtimer => "profiler, hrtimer tracepoints (the default)",
            Config::Bpftrace => "bpftrace, ppoll tracepoints with a pid filter",
            Config::Floor => "an empty BPF program at the watched loop's result sites (the floor)",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Config::Nothing => "nothing",
            Config::ProfilerLibc => "profiler_libc",
            Config::ProfilerLibcEntryReturn => "profiler_libc_entry_return",
            Config::ProfilerSyscall => "profiler_syscall",
            Config::ProfilerHrtimer => "profiler_hrtimer",
            Config::Bpftrace => "bpftrace",
            Config::Floor => "empty_program",
        }
    }
}

/// The bpftrace equivalent of the syscall timer source, for the process `pid`.
fn bpftrace_script(pid: u32) -> String {
    format!(
        "tracepoint:syscalls:sys_enter_ppoll /pid == {pid}/ {{ @tsp[tid] = args->tsp; }} \
         tracepoint:syscalls:sys_exit_ppoll /pid == {pid}/ {{ \
         @kind[args->ret > 0 ? 1 : (args->ret == 0 ? 0 : 2)] = count(); delete(@tsp[tid]); }}"
    )
}

const WATCHED: &str = "bench-watched";
const VM: &str = "bench-vm";

/// Figures of one round: ns per call of the unrelated `getppid` and `ppoll` loops and of the
/// watched zero-timeout `ppoll` loop, CPU ns per call of the watched timed `ppoll` loop, CPU
/// ns per unrelated pipe round trip.
const FIGURES: usize = 5;

/// The figures of one round under `config`.
fn one_round(
    config: Config,
    profiler: &Path,
    dir: &Path,
    vm_pid: u32,
    calls: u64,
) -> anyhow::Result<[f64; FIGURES]> {
    let source = match config {
        Config::ProfilerLibc => Some("libc"),
        Config::ProfilerLibcEntryReturn => Some("libc-entry-return"),
        Config::ProfilerSyscall => Some("syscall"),
        Config::ProfilerHrtimer => Some("hrtimer"),
        _ => None,
    };
    let tracer = match (config, source) {
        (_, Some(source)) => Some(Tracer::profiler(
            profiler,
            &["--timer-source", source],
            &[VM, WATCHED],
            &[VM],
            dir,
            &format!("tax-{source}"),
        )?),
        (Config::Bpftrace, _) => Some(Tracer::bpftrace(&bpftrace_script(vm_pid), None)?),
        _ => None,
    };
    let getppid = run_loop(LoopKind::Getppid, 2 * calls, None, None, |_| Ok(()))?;
    let ppoll = run_loop(LoopKind::PpollZero, calls, None, None, |_| Ok(()))?;
    let pipe = run_loop(LoopKind::PipeRoundTrip, calls / 20, None, None, |_| Ok(()))?;
    // The watched loops: named like QEMU; each tracer attaches to them before they start.
    let go = dir.join("go");
    let watched_loop = |kind: LoopKind, calls: u64| -> anyhow::Result<f64> {
        let mut extra: Option<Box<dyn std::any::Any>> = None;
        let figure = run_loop(kind, calls, Some(WATCHED), Some(&go), |pid| {
            match (&tracer, config) {
                (_, Config::Bpftrace) => {
                    extra = Some(Box::new(Tracer::bpftrace(&bpftrace_script(pid), None)?));
                }
                (_, Config::Floor) => {
                    // Just spawned: its C library is mapped once the loader has run.
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                    let libc = loop {
                        match super::watched::mapped_libc(pid) {
                            Ok(libc) => break libc,
                            Err(e) if std::time::Instant::now() > deadline => return Err(e),
                            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                        }
                    };
                    let sites = super::watched::libc_result_sites(&libc)?;
                    extra = Some(Box::new(super::floor::EmptyProgramUprobes::attach(
                        pid, &libc, &sites,
                    )?));
                }
                (Some(t), _) => t.wait_records([format!("\"pid\":{pid}")])?,
                _ => {}
            }
            Ok(())
        })?;
        drop(extra);
        Ok(figure)
    };
    let watched = watched_loop(LoopKind::PpollZero, calls)?;
    // Each timed call sleeps ~20 µs plus the timer slack: fewer of them.
    let watched_timed = watched_loop(LoopKind::PpollTimed, calls / 20)?;
    drop(tracer);
    Ok([getppid, ppoll, watched, watched_timed, pipe])
}

/// Runs the rounds and returns (markdown section, JSON).
pub fn run(
    profiler: &Path,
    dir: &Path,
    rounds: usize,
    calls: u64,
    command: &str,
) -> anyhow::Result<(String, serde_json::Value)> {
    // The VM the tracers watch while the unrelated loops run: a QEMU-like process.
    let vm = QemuLikeFleet::start_named(&[VM], 10)?;
    let vm_pid = vm.pids()[0];
    let mut samples: Vec<Vec<[f64; FIGURES]>> = vec![Vec::new(); CONFIGS.len()];
    for round in 0..rounds {
        // Rotate the order each round so drift on the machine spreads over all configs.
        for k in 0..CONFIGS.len() {
            let i = (k + round) % CONFIGS.len();
            let r = one_round(CONFIGS[i], profiler, dir, vm_pid, calls)?;
            eprintln!(
                "xtask bench tax: round {round} {:<55} getppid {:7.1} ns, ppoll {:7.1} ns, watched \
                 ppoll {:7.1} ns, watched timed ppoll {:7.1} CPU ns, pipe round trip {:7.1} CPU ns",
                CONFIGS[i].label(),
                r[0],
                r[1],
                r[2],
                r[3],
                r[4]
            );
            samples[i].push(r);
        }
    }
    drop(vm);
    let med = |i: usize, j: usize| median(&samples[i].iter().map(|r| r[j]).collect::<Vec<_>>());
    // Added by config `i` to figure `j`: the median over rounds of its difference to
    // "nothing" in the same round (configurations run back to back), which cancels the
    // machine's drift between rounds.
    let paired = |i: usize, j: usize| -> Vec<f64> {
        samples[i]
            .iter()
            .zip(&samples[0])
            .map(|(r, b)| r[j] - b[j])
            .collect()
    };
    let added = |i: usize, j: usize| median(&paired(i, j));
    // How far "nothing" itself moves between rounds: differences within it are noise.
    let spread = |j: usize| {
        let v: Vec<f64> = samples[0].iter().map(|r| r[j]).collect();
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        (hi - lo) / 2.0
    };
    let base: [f64; FIGURES] = std::array::from_fn(|j| med(0, j));
    let mut rows = String::new();
    let mut json_rows = Vec::new();
    for (i, config) in CONFIGS.iter().enumerate() {
        let m: [f64; FIGURES] = std::array::from_fn(|j| med(i, j));
        let cell = |j: usize| {
            if i == 0 {
                format!("{:.0} (±{:.0})", m[j], spread(j))
            } else {
                let added = added(i, j);
                format!(
                    "{:.0} ({:+.0}, {:+.1} %)",
                    m[j],
                    added,
                    added / base[j] * 100.0
                )
            }
        };
        rows.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            config.label(),
            cell(0),
            cell(1),
            cell(4),
            cell(2),
            cell(3)
        ));
        json_rows.push(json!({
            "config": config.key(),
            "getppid_ns": m[0], "ppoll_ns": m[1], "watched_ppoll_ns": m[2],
            "watched_timed_ppoll_cpu_ns": m[3], "pipe_round_trip_cpu_ns": m[4],
            "added": (0..FIGURES).map(|j| added(i, j)).collect::<Vec<_>>(),
            "rounds": samples[i],
        }));
    }
    let (hrtimer, libc, entry_return, sys, floor) = (1, 2, 3, 4, 6);
    let getppid_pct = added(hrtimer, 0) / base[0] * 100.0;
    let ppoll_added = added(hrtimer, 1);
    let (hr_zero, hr_timed) = (added(hrtimer, 2), added(hrtimer, 3));
    let (pipe_hr, pipe_libc, pipe_sys) = (added(hrtimer, 4), added(libc, 4), added(sys, 4));
    let pipe_noise = spread(4);
    let watched_libc = added(libc, 2);
    let watched_sys = added(sys, 2);
    let libc_getppid_pct = added(libc, 0) / base[0] * 100.0;
    let libc_ppoll = added(libc, 1);
    let (sys_timed, libc_timed) = (added(sys, 3), added(libc, 3));
    let (er_zero, er_timed) = (added(entry_return, 2), added(entry_return, 3));
    let (floor_zero, floor_timed) = (added(floor, 2), added(floor, 3));
    let timed_noise = spread(3);
    // A timed wait's CPU moves by microseconds between rounds here: a difference smaller
    // than that spread is not a measured difference.
    let timed_verdict = |ours: f64| {
        if ours <= sys_timed {
            "met".to_string()
        } else if ours - sys_timed <= timed_noise {
            format!("within the ±{timed_noise:.0} ns spread")
        } else {
            "MISSED".to_string()
        }
    };
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    // The same for the unrelated getppid loop: a few ns either way is the machine's.
    let getppid_noise = spread(0);
    let getppid_verdict = if getppid_pct <= 2.0 {
        "met".to_string()
    } else if added(hrtimer, 0) <= getppid_noise {
        format!("MISSED by less than nothing's own ±{getppid_noise:.0} ns spread")
    } else {
        "MISSED".to_string()
    };
    let body = format!(
        "## What recording costs other processes, and a watched QEMU\n\n\
         `{command}`: CPU ns per call (median of {rounds} rounds; configurations interleaved, \
         order rotated each round) of a `getppid` loop ({} calls) and a zero-timeout `ppoll` \
         loop ({calls} calls) in processes the profiler does not watch, of a one-byte round \
         trip through two pipes to a second thread on the same CPU and back ({} round trips; \
         each thread sleeps in `read` and is woken each time, so every round trip is two \
         context switches) in another, \
         and of the same `ppoll` loop in a process named like QEMU that it watches — each \
         loop's figure is its fastest of 20 equal chunks by thread CPU time, so the shared \
         machine's preemptions and stray interrupts drop out while a cost every call pays \
         stays in; and the CPU time per call of a watched `ppoll` loop whose 20 µs timeout \
         expires each time ({} calls, fastest of 20 chunks too; QEMU's timer waits). Each \
         tracer watches one QEMU-like process (waking from `ppoll` every 10 ms) besides. In \
         brackets: added per call, and relative to nothing running.\n\n\
         | running | unrelated `getppid` (ns) | unrelated `ppoll` (ns) | unrelated pipe round trip (CPU ns) | watched QEMU's `ppoll` (ns) | watched QEMU's timed `ppoll` (CPU ns) |\n\
         |---|---|---|---|---|---|\n{rows}\n\
         Targets, with the default source (the hrtimer tracepoints): unrelated syscalls ≤ 2 % \
         slower while recording — {getppid_pct:+.1} % ({}); an unrelated `ppoll` ≤ 60 ns \
         added — {ppoll_added:+.0} ns ({}); a watched QEMU pays no more per wait than the \
         syscall tracepoints cost it — {hr_zero:+.0} ns per zero-timeout poll ({}) and \
         {hr_timed:+.0} ns per timed wait ({}), against {watched_sys:+.0} / {sys_timed:+.0} ns \
         with the syscall tracepoints. What the default's `sched_switch` raw tracepoint \
         program (for waits without a timeout) costs every task that blocks: {pipe_hr:+.0} ns per pipe \
         round trip (nothing's own spread ±{pipe_noise:.0} ns; the libc source, which has no \
         such program, {pipe_libc:+.0} ns; the syscall tracepoints {pipe_sys:+.0} ns, for \
         the calling thread's two syscalls per round trip). With `--timer-source libc` (every wait's result, \
         a trap per wait call): unrelated `getppid` {libc_getppid_pct:+.1} %, `ppoll` \
         {libc_ppoll:+.0} ns; watched {watched_libc:+.0} ns per zero-timeout poll ({}) and \
         {libc_timed:+.0} ns per timed wait ({}); the two-trap entry and return probes \
         {er_zero:+.0} / {er_timed:+.0} ns. Added figures are medians of each round's \
         difference to \"nothing\" in that round; \"nothing\" shows its own round-to-round \
         spread (±).\n\n\
         Why: the syscall tracepoints, once any is enabled, put every task on the host on the \
         slow syscall path (the `getppid` column); the libc uprobes put a breakpoint in the \
         watched QEMU's memory only: one per wait, on the jump after its syscall (the \
         fallback probes entry and return, two traps). A trap into the kernel on this \
         nested-virtualization machine is far slower than on bare metal, which is what bounds \
         the libc figures: an empty BPF program at the same result sites, attached as the \
         profiler attaches, adds {floor_zero:+.0} ns per zero-timeout poll and \
         {floor_timed:+.0} ns per timed wait by itself. A trap after a sleep costs more than \
         one in a tight loop (cold caches and TLB): per timed wait the result probe adds \
         {:+.0} ns over its zero-timeout figure, the entry and return probes' two traps \
         {:+.0} ns, the syscall tracepoints {:+.0} ns. The hrtimer tracepoints run only \
         where a sleep timer is armed, expires or is cancelled, and `sched_switch` where a \
         task blocks: no trap, no slow syscall path, and a zero-timeout poll arms no timer \
         and never sleeps. Their price: a wait that returns without sleeping (an fd ready at \
         entry) is not seen, so `fd_wakeups` counts the waits that slept (docs/events.md); \
         `--timer-source libc` (or `syscall`) counts every wait's result.\n",
        2 * calls,
        calls / 20,
        calls / 20,
        getppid_verdict,
        verdict(ppoll_added <= 60.0),
        verdict(hr_zero <= watched_sys),
        timed_verdict(hr_timed),
        verdict(watched_libc <= watched_sys),
        timed_verdict(libc_timed),
        libc_timed - watched_libc,
        er_timed - er_zero,
        sys_timed - watched_sys,
    );
    let json = json!({
        "command": command,
        "rounds": rounds,
        "calls": calls,
        "configs": json_rows,
        "targets": {
            "unrelated_getppid_percent": getppid_pct,
            "unrelated_ppoll_added_ns": ppoll_added,
            "watched_added_ns_libc": watched_libc,
            "watched_added_ns_syscall": watched_sys,
            "watched_added_ns_hrtimer": hr_zero,
            "watched_timed_added_cpu_ns_libc": libc_timed,
            "watched_added_ns_libc_entry_return": er_zero,
            "watched_timed_added_cpu_ns_libc_entry_return": er_timed,
            "watched_timed_added_cpu_ns_syscall": sys_timed,
            "watched_timed_added_cpu_ns_hrtimer": hr_timed,
            "unrelated_getppid_percent_libc": libc_getppid_pct,
            "unrelated_ppoll_added_ns_libc": libc_ppoll,
            "unrelated_pipe_round_trip_added_cpu_ns": pipe_hr,
            "unrelated_pipe_round_trip_added_cpu_ns_libc": pipe_libc,
            "unrelated_pipe_round_trip_added_cpu_ns_syscall": pipe_sys,
            "default_timer_source": "hrtimer",
            "watched_added_ns_floor": floor_zero,
            "watched_timed_added_cpu_ns_floor": floor_timed,
        },
    });
    Ok((body, json))
}
