//! `profiler top`: the live ranking. The shared sampler runs on a collector thread and
//! publishes a [`LiveSnapshot`] on a watch channel; the UI runs on the main thread. Nothing is
//! written outside ratatui while the alternate screen is up: notes go to the status line, and
//! whatever could not be written to `--output` is printed after the terminal is restored.

use std::{fs::File, ops::ControlFlow, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use crossterm::event::EventStream;
use tokio::sync::watch;

use super::live::{
    LiveOptions, finish_output, join_collector, spawn_collector, start_session, stop_signals,
};
use crate::{
    identity::discovery::clock_ticks_per_second,
    outputs::output::RecordSink,
    tui::{self, TerminalGuard},
    windows::{
        live::{LiveSnapshot, LiveState, ProfilerCost},
        sampler::{Sample, SampleSink},
    },
};

pub struct TopOptions {
    pub live: LiveOptions,
    /// Also write closed windows here, as `profiler record` would.
    pub output: Option<PathBuf>,
}

/// Exited VMs stay on screen for this many windows after their last one.
const KEEP_EXITED_WINDOWS: u64 = 2;

/// Folds every sample into the live state and publishes a snapshot; stops when the UI is gone.
struct Publish {
    live: LiveState,
    tx: watch::Sender<LiveSnapshot>,
    out: Option<RecordSink<File>>,
    ticks_per_second: u64,
    window_secs: f64,
}

impl SampleSink for Publish {
    /// The screen shows every VM's running window, each second.
    fn reads_every_vm(&self) -> bool {
        true
    }

    fn on_sample(&mut self, s: &Sample<'_>) -> ControlFlow<()> {
        self.live.note(s.t, s.notes);
        if let Some(note) = self.out.as_mut().and_then(|out| out.write(s.closed)) {
            // A full disk must not take the live view down: records stay pending and are
            // retried every window; what is left at exit is printed after the screen is back.
            self.live.note(s.t, &[note]);
        }
        if s.last {
            return ControlFlow::Break(());
        }
        self.live.update(
            s.session.running_with_devices(),
            s.closed,
            self.ticks_per_second,
        );
        let window = s.session.window_clock().index_at(s.t);
        self.live
            .prune_exited(window.saturating_sub(KEEP_EXITED_WINDOWS));
        let mut snapshot = self.live.snapshot(s.t, window, self.window_secs);
        snapshot.cost = ProfilerCost::now(s.session.probe_cost());
        snapshot.live_sources = s.session.live_sources();
        match self.tx.send(snapshot) {
            Ok(()) => ControlFlow::Continue(()),
            // The UI has gone away.
            Err(_) => ControlFlow::Break(()),
        }
    }
}

pub fn run(opts: TopOptions) -> anyhow::Result<ExitCode> {
    // Everything that can fail for an ordinary reason (not root, no tracefs) fails here,
    // before the terminal switches to full screen.
    let session = start_session(&opts.live)?;
    let out = match &opts.output {
        Some(p) => Some(RecordSink::new(
            crate::outputs::output::create_private(p)
                .with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let window_secs = opts.live.window as f64;
    let (tx, rx) = watch::channel(LiveSnapshot {
        window_secs,
        ..LiveSnapshot::default()
    });
    let sink = Publish {
        live: LiveState::default(),
        tx,
        out,
        ticks_per_second: clock_ticks_per_second(),
        window_secs,
    };
    // A dropped sender (the UI ended any way at all) stops sampling too.
    let (collector, stop_tx) = spawn_collector(session, sink)?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ui_result = runtime.block_on(async {
        let stop = stop_signals()?;
        let mut terminal = TerminalGuard::new().context("opening the terminal")?;
        let result = tokio::select! {
            r = tui::run(&mut terminal, EventStream::new(), rx, Duration::from_millis(250)) => r,
            _ = stop => Ok(()),
        };
        drop(terminal);
        result
    });
    let _ = stop_tx.send(());
    let sink = join_collector(collector);
    ui_result?;
    // The terminal is back to normal: leftovers can be printed now.
    if let Some(out) = &mut sink?.out {
        finish_output(out)?;
    }
    Ok(ExitCode::SUCCESS)
}
