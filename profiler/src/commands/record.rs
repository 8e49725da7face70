//! `profiler record`: the shared sampler writing closed windows as JSON lines; notes and
//! output trouble go to stderr.

use std::{
    io::{self, Write},
    ops::ControlFlow,
    path::PathBuf,
    process::ExitCode,
};

use anyhow::Context as _;
use tokio::time::Instant;

use super::live::{LiveOptions, finish_output, start_session, stop_signals};

use crate::{
    outputs::output::RecordSink,
    windows::sampler::{self, Sample, SampleSink},
};

pub struct RecordOptions {
    pub live: LiveOptions,
    pub duration: Option<u64>,
    pub output: PathBuf,
}

fn open_output(path: &std::path::Path) -> anyhow::Result<Box<dyn Write>> {
    if path.as_os_str() == "-" {
        Ok(Box::new(io::stdout()))
    } else {
        let f = crate::outputs::output::create_private(path)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(Box::new(f))
    }
}

/// Writes every sample's closed windows; says on stderr what the sampler and the output
/// have to say.
struct RecordToOutput {
    out: RecordSink<Box<dyn Write>>,
    window: u64,
    duration: Option<u64>,
}

impl SampleSink for RecordToOutput {
    fn on_sample(&mut self, s: &Sample<'_>) -> ControlFlow<()> {
        for note in s.notes {
            eprintln!("profiler: {note}");
        }
        if let Some(note) = self.out.write(s.closed) {
            eprintln!("profiler: {note}");
        }
        if self.out.is_closed() {
            return ControlFlow::Break(());
        }
        if s.first {
            eprintln!(
                "profiler: recording {} QEMU process(es) in {} s windows{}; Ctrl-C stops",
                s.session.processes().len(),
                self.window,
                self.duration
                    .map(|d| format!(" for {d} s"))
                    .unwrap_or_default()
            );
        }
        ControlFlow::Continue(())
    }
}

pub fn run(opts: RecordOptions) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(record(opts))
}

async fn record(opts: RecordOptions) -> anyhow::Result<ExitCode> {
    // Probes first: a run that cannot record must not leave an empty output file behind.
    let mut session = start_session(&opts.live)?;
    let out = RecordSink::new(open_output(&opts.output)?);
    let stop = stop_signals()?;
    let start = Instant::now();
    let selection = (opts.live.filter.is_selective()).then(|| opts.live.filter.describe());
    if let Some(b) = session.overhead_budget() {
        eprintln!("profiler: {}", crate::windows::budget::describe(&b));
    }
    let mut sink = RecordToOutput {
        out,
        window: opts.live.window,
        duration: opts.duration,
    };
    let (stopped_at, _) = sampler::run(
        &mut session,
        start,
        opts.duration.map(|d| d as f64),
        stop,
        &mut sink,
    )
    .await?;
    if sink.out.is_closed() {
        anyhow::bail!("the output was closed before the recording ended (broken pipe)");
    }
    finish_output(&mut sink.out)?;
    if let Some(selection) = selection
        && !session.ever_matched()
    {
        anyhow::bail!(
            "no QEMU process matched {selection} in {stopped_at:.0} s; nothing was recorded"
        );
    }
    let cost = session.probe_cost();
    eprintln!(
        "profiler: stopped after {stopped_at:.1} s; eBPF programs ran about {} times, {:.1} ms in \
         total (kernel BPF statistics, sampled one refresh in {})",
        cost.run_count,
        cost.run_time.as_secs_f64() * 1e3,
        crate::probes::kernel::stats::STATS_EVERY
    );
    if let Some(b) = session.overhead_budget() {
        for (name, duty) in session.duty_cycles() {
            eprintln!(
                "profiler: overhead budget: {}",
                crate::windows::budget::describe_vm(&name, &duty, &b)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
