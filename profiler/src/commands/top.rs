//! `profiler top`: the live ranking. A collector thread samples once per second and publishes
//! a [`LiveSnapshot`] on a watch channel; the UI runs on the main thread's tokio runtime.

use std::{
    fs::File,
    io::Write,
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use crossterm::event::EventStream;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::{
    discovery::clock_ticks_per_second,
    live::{LiveSnapshot, LiveState, ProfilerCost},
    output::RecordSink,
    probes::EventProbes,
    record::WindowRecord,
    session::{Session, VmFilter},
    tui::{self, TerminalGuard},
};

pub struct TopOptions {
    pub window: u64,
    pub filter: VmFilter,
    pub debug_roots: crate::elf::DebugRoots,
    /// Also write closed windows here, as `profiler record` would.
    pub output: Option<PathBuf>,
}

const REFRESH: Duration = Duration::from_secs(1);
/// Exited VMs stay on screen for this many windows after their last one.
const KEEP_EXITED_WINDOWS: u64 = 2;

/// User + system CPU of this process, in seconds.
fn own_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn write_records(out: &mut Option<RecordSink<File>>, records: &[WindowRecord]) {
    if let Some(out) = out {
        // A full disk must not take the live view down: records stay pending and are
        // retried every window; what is left at exit goes to stderr.
        let _ = out.push(records);
    }
}

/// The collector loop: samples at every whole second since `start` until `stop` is set or the
/// UI has gone away.
fn collect(
    mut session: Session,
    start: Instant,
    window_secs: f64,
    tx: watch::Sender<LiveSnapshot>,
    stop: Arc<AtomicBool>,
    mut out: Option<RecordSink<File>>,
) -> anyhow::Result<()> {
    let ticks = clock_ticks_per_second();
    let mut live = LiveState::default();
    let mut k: u64 = 0;
    loop {
        let t = k as f64;
        let closed = session.sample(t)?;
        write_records(&mut out, &closed);
        live.update(session.running_with_devices(), &closed, ticks);
        let window = session.window_clock().index_at(t);
        live.prune_exited(window.saturating_sub(KEEP_EXITED_WINDOWS));
        let mut snapshot = live.snapshot(t, window, window_secs);
        let cost = session.probe_cost();
        snapshot.cost = ProfilerCost {
            bpf_run_count: cost.run_count,
            bpf_run_time_ns: cost.run_time.as_nanos() as u64,
            collector_cpu_seconds: own_cpu_seconds(),
        };
        snapshot.live_sources = session.live_sources();
        if tx.send(snapshot).is_err() {
            break;
        }
        k += 1;
        let next = start + REFRESH * k as u32;
        while Instant::now() < next {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            thread::sleep((next - Instant::now()).min(Duration::from_millis(100)));
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
    }
    let t = start.elapsed().as_secs_f64();
    let mut last = session.sample(t)?;
    last.extend(session.finish(t));
    write_records(&mut out, &last);
    if let Some(out) = &mut out
        && out.drain().is_err()
    {
        eprintln!("profiler: these window records could not be written to the output:");
        std::io::stderr().write_all(out.pending())?;
        anyhow::bail!("the output could not take every window record (printed above instead)");
    }
    Ok(())
}

pub fn run(opts: TopOptions) -> anyhow::Result<ExitCode> {
    // Everything that can fail for an ordinary reason (not root, no tracefs) fails here,
    // before the terminal switches to full screen.
    let probes = EventProbes::load_with(opts.debug_roots.clone())?;
    let out = match &opts.output {
        Some(p) => Some(RecordSink::new(
            File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let start = Instant::now();
    let window_secs = opts.window as f64;
    let session = Session::new(probes, window_secs, chrono::Utc::now(), opts.filter);
    let (tx, rx) = watch::channel(LiveSnapshot {
        window_secs,
        ..LiveSnapshot::default()
    });
    let stop = Arc::new(AtomicBool::new(false));
    let collector = {
        let stop = stop.clone();
        thread::Builder::new()
            .name("collector".into())
            .spawn(move || collect(session, start, window_secs, tx, stop, out))?
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ui_result = runtime.block_on(async {
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut terminal = TerminalGuard::new().context("opening the terminal")?;
        let result = tokio::select! {
            r = tui::run(&mut terminal, EventStream::new(), rx, Duration::from_millis(250)) => r,
            _ = sigterm.recv() => Ok(()),
            _ = sigint.recv() => Ok(()),
        };
        drop(terminal);
        result
    });
    stop.store(true, Ordering::Relaxed);
    let collected = collector
        .join()
        .map_err(|_| anyhow::anyhow!("the collector thread panicked"))?;
    ui_result?;
    collected?;
    Ok(ExitCode::SUCCESS)
}
