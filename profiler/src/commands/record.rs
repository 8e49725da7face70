//! `profiler record`: sample every refresh and at every window boundary, write closed windows
//! as JSON lines, flush the running window as partial on stop.

use std::{
    fs::File,
    io::{self, Write},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    time::{Instant, MissedTickBehavior},
};

use crate::{
    output::RecordSink,
    probes::EventProbes,
    record::WindowRecord,
    session::{Session, VmFilter},
};

pub struct RecordOptions {
    pub window: u64,
    pub duration: Option<u64>,
    pub output: PathBuf,
    pub filter: VmFilter,
    pub debug_roots: crate::elf::DebugRoots,
}

/// How often counters are read. Window boundaries are whole seconds from the start, so a
/// one-second refresh also samples exactly at every boundary.
const REFRESH: Duration = Duration::from_secs(1);

fn open_output(path: &PathBuf) -> anyhow::Result<Box<dyn Write>> {
    if path.as_os_str() == "-" {
        Ok(Box::new(io::stdout()))
    } else {
        let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Box::new(f))
    }
}

/// Writes closed windows; while the output fails (disk full), keeps them and says so once.
fn emit(out: &mut RecordSink<Box<dyn Write>>, records: &[WindowRecord]) {
    let was_failing = out.is_failing();
    if let Err(e) = out.push(records)
        && !was_failing
    {
        eprintln!(
            "profiler: cannot write window records ({e}); keeping them in memory and \
             retrying every window"
        );
    } else if was_failing && !out.is_failing() {
        eprintln!("profiler: writing window records again; nothing was lost");
    }
}

/// Last attempt at exit; what still cannot be written goes to stderr rather than being lost.
fn finish_output(out: &mut RecordSink<Box<dyn Write>>) -> anyhow::Result<()> {
    if out.drain().is_ok() {
        return Ok(());
    }
    eprintln!("profiler: these window records could not be written to the output:");
    io::stderr().write_all(out.pending())?;
    anyhow::bail!("the output could not take every window record (printed above instead)")
}

pub fn run(opts: RecordOptions) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(record(opts))
}

async fn record(opts: RecordOptions) -> anyhow::Result<ExitCode> {
    let mut out = RecordSink::new(open_output(&opts.output)?);
    let probes = EventProbes::load_with(opts.debug_roots.clone())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;

    let start = Instant::now();
    let wall_start = chrono::Utc::now();
    let mut session = Session::new(probes, opts.window as f64, wall_start, opts.filter);
    emit(&mut out, &session.sample(0.0)?);
    eprintln!(
        "profiler: recording {} QEMU process(es) in {} s windows{}; Ctrl-C stops",
        session.processes().len(),
        opts.window,
        opts.duration
            .map(|d| format!(" for {d} s"))
            .unwrap_or_default()
    );

    let mut ticks = tokio::time::interval_at(start + REFRESH, REFRESH);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let stop_at = opts.duration.map(|d| d as f64);
    let stopped_at = loop {
        tokio::select! {
            scheduled = ticks.tick() => {
                // The scheduled instant, not the wakeup time: boundaries stay exact.
                let t = (scheduled - start).as_secs_f64().round();
                emit(&mut out, &session.sample(t)?);
                if stop_at.is_some_and(|s| t >= s) {
                    break t;
                }
            }
            _ = sigint.recv() => break start.elapsed().as_secs_f64(),
            _ = sigterm.recv() => break start.elapsed().as_secs_f64(),
        }
    };
    // A last sample so the running window carries everything up to the stop.
    let mut last = session.sample(stopped_at)?;
    last.extend(session.finish(stopped_at));
    emit(&mut out, &last);
    finish_output(&mut out)?;
    let cost = session.probe_cost();
    eprintln!(
        "profiler: stopped after {stopped_at:.1} s; eBPF programs ran {} times, {:.1} ms in total",
        cost.run_count,
        cost.run_time.as_secs_f64() * 1e3
    );
    Ok(ExitCode::SUCCESS)
}
