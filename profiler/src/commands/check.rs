//! `profiler check`: a verdict on whether devices are quiet, with an exit code a pipeline can
//! use: live (records a few windows with the shared sampler) or on a recording.

use std::{io::IsTerminal as _, ops::ControlFlow, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, bail};
use tokio::time::Instant;

use super::live::{LiveOptions, start_session, stop_signals};

use crate::text::clean;
use crate::{
    analysis::check::{CheckReport, CheckRequest, check, render_text},
    cli::CheckFormat,
    identity::devices::{CLASSES, DeviceClass, class},
    record::{WindowRecord, read_records},
    windows::sampler::{self, Sample, SampleSink},
};

pub struct CheckOptions {
    pub file: Option<PathBuf>,
    pub quiet: Vec<String>,
    pub windows: u64,
    pub settle: Option<u64>,
    pub max_timer_rate: Option<f64>,
    pub max_wakeup_rate: Option<f64>,
    pub format: CheckFormat,
    /// The window length is `live.window` (live checks only).
    pub live: LiveOptions,
}

/// The classes named on the command line (`usb,serial`), or an error listing the known ones.
pub fn parse_classes(names: &[String]) -> anyhow::Result<Vec<&'static DeviceClass>> {
    names
        .iter()
        .flat_map(|n| n.split(','))
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| {
            class(n).with_context(|| {
                format!(
                    "unknown device class {:?}; known: {} (profiler check --list-classes)",
                    clean(n),
                    CLASSES.iter().map(|c| c.id).collect::<Vec<_>>().join(", ")
                )
            })
        })
        .collect()
}

/// `profiler check --list-classes`.
pub fn list_classes() -> String {
    let mut out = String::new();
    for c in CLASSES {
        out.push_str(&format!("{:<9} {}\n", c.id, c.title));
        let list = |items: &[&str]| items.join(", ");
        if !c.regions.is_empty() {
            out.push_str(&format!("          regions: {}\n", list(c.regions)));
        }
        if !c.owners.is_empty() {
            out.push_str(&format!("          device types: {}\n", list(c.owners)));
        }
        if !c.callbacks.is_empty() {
            out.push_str(&format!(
                "          timer callbacks: {}\n",
                list(c.callbacks)
            ));
        }
        if !c.ports.is_empty() {
            let ports: Vec<String> = c
                .ports
                .iter()
                .map(|(a, b)| {
                    if a == b {
                        format!("{a:#x}")
                    } else {
                        format!("{a:#x}-{b:#x}")
                    }
                })
                .collect();
            out.push_str(&format!(
                "          ports (KVM, by address): {}\n",
                ports.join(", ")
            ));
        }
        out.push_str(&format!("          fix (QEMU): {}\n", c.remedy.qemu));
        out.push_str(&format!("          fix (libvirt): {}\n", c.remedy.libvirt));
        if !c.remedy.measured.is_empty() {
            out.push_str(&format!("          measured: {}\n", c.remedy.measured));
        }
    }
    out
}

/// Keeps every closed window; notes go to stderr.
struct Collect(Vec<WindowRecord>);

impl SampleSink for Collect {
    fn on_sample(&mut self, s: &Sample<'_>) -> ControlFlow<()> {
        for note in s.notes {
            eprintln!("profiler: {note}");
        }
        self.0.extend_from_slice(s.closed);
        if s.first && s.session.processes().is_empty() {
            eprintln!("profiler: no QEMU process matches the selection yet");
        }
        ControlFlow::Continue(())
    }
}

async fn record_live(opts: &CheckOptions, settle: u64) -> anyhow::Result<Vec<WindowRecord>> {
    let mut session = start_session(&opts.live)?;
    let window = opts.live.window;
    // Whole windows: the settle time rounded up, then the windows judged.
    let settle_windows = settle.div_ceil(window);
    let duration = (settle_windows + opts.windows) * window;
    eprintln!(
        "profiler: checking for {duration} s ({} s to settle, then {} window(s) of {window} s)",
        settle_windows * window,
        opts.windows
    );
    let stop = stop_signals()?;
    let mut sink = Collect(Vec::new());
    sampler::run(
        &mut session,
        Instant::now(),
        Some(duration as f64),
        stop,
        &mut sink,
    )
    .await?;
    Ok(sink.0)
}

pub fn run(opts: CheckOptions) -> anyhow::Result<ExitCode> {
    let classes = parse_classes(&opts.quiet)?;
    if classes.is_empty() && opts.max_timer_rate.is_none() && opts.max_wakeup_rate.is_none() {
        bail!(
            "nothing to check: give --quiet CLASS[,CLASS...], --max-timer-rate or \
             --max-wakeup-rate"
        );
    }
    let (records, settle) = match &opts.file {
        Some(path) => {
            let file =
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            let (records, warnings) = read_records(std::io::BufReader::new(file))
                .with_context(|| format!("reading {}", path.display()))?;
            for w in warnings {
                eprintln!("profiler: {}: {w}", path.display());
            }
            let records: Vec<WindowRecord> = records
                .into_iter()
                .filter(|r| {
                    (opts.live.filter.names.is_empty() && opts.live.filter.pids.is_empty())
                        || opts.live.filter.names.contains(&r.vm.name)
                        || opts.live.filter.pids.contains(&r.vm.pid)
                })
                .collect();
            (records, opts.settle.unwrap_or(0))
        }
        None => {
            let settle = opts.settle.unwrap_or(opts.live.window);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let mut records = runtime.block_on(record_live(&opts, settle))?;
            // The check's own settle windows are skipped whatever the VM's age: its probes
            // were just attached (a callback is under-counted in its first window).
            records.retain(|r| r.window >= settle.div_ceil(opts.live.window));
            (records, settle)
        }
    };
    let report: CheckReport = check(
        &records,
        &CheckRequest {
            classes,
            settle: settle as f64,
            max_timer_rate: opts.max_timer_rate,
            max_wakeup_rate: opts.max_wakeup_rate,
        },
    );
    match opts.format {
        CheckFormat::Text => print!("{}", render_text(&report)),
        CheckFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    if report.vms.is_empty() && std::io::stderr().is_terminal() {
        eprintln!("profiler: no VM matched; `profiler list` shows the QEMU processes");
    }
    Ok(ExitCode::from(report.exit_code))
}
