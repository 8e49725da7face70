//! How every live command (`record`, `top`, `check`, `serve`) starts and stops: the probes
//! loaded and a session over them, the sampler on a collector thread where a UI or a server
//! holds the main one, Ctrl-C and SIGTERM, and window records the output could not take.

use std::{future::Future, io::Write as _, thread};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::oneshot,
    time::Instant,
};

use crate::{
    outputs::output::RecordSink,
    probes::{EventProbes, ProbeOptions},
    windows::{
        sampler::{self, SampleSink},
        session::{Session, VmFilter},
    },
};

/// What every live command is given: which VMs, how they are probed, the window length.
#[derive(Debug, Clone)]
pub struct LiveOptions {
    pub window: u64,
    pub filter: VmFilter,
    pub probe: ProbeOptions,
    /// Ask libvirt for the memory map of its KVM domains (`--libvirt-monitor`).
    pub libvirt_monitor: bool,
}

/// The probes loaded and a session over them (the overhead budget, when asked for, measured
/// first): everything that can fail for an ordinary reason (not root, no tracefs) fails here.
pub fn start_session(opts: &LiveOptions) -> anyhow::Result<Session<EventProbes>> {
    let probes = EventProbes::load(opts.probe.clone())?;
    Session::new(
        probes,
        opts.window as f64,
        chrono::Utc::now(),
        opts.filter.clone(),
    )
    .with_libvirt_monitor(opts.libvirt_monitor)
    .with_overhead_budget(opts.probe.max_overhead)
}

/// Resolves at Ctrl-C or SIGTERM.
pub fn stop_signals() -> anyhow::Result<impl Future<Output = ()>> {
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
    })
}

/// The sampler running `session` into `sink` on its own thread, until the sender is used or
/// dropped; the thread hands the sink back.
pub fn spawn_collector<S: SampleSink + Send + 'static>(
    mut session: Session<EventProbes>,
    mut sink: S,
) -> anyhow::Result<(thread::JoinHandle<anyhow::Result<S>>, oneshot::Sender<()>)> {
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let collector =
        thread::Builder::new()
            .name("collector".into())
            .spawn(move || -> anyhow::Result<S> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async {
                    let stop = async {
                        let _ = stop_rx.await;
                    };
                    sampler::run(&mut session, Instant::now(), None, stop, &mut sink).await
                })?;
                Ok(sink)
            })?;
    Ok((collector, stop_tx))
}

/// Waits for the collector thread and hands back its sink.
pub fn join_collector<S>(collector: thread::JoinHandle<anyhow::Result<S>>) -> anyhow::Result<S> {
    collector
        .join()
        .map_err(|_| anyhow::anyhow!("the collector thread panicked"))?
}

/// Writes what the output still holds; what it cannot take goes to stderr instead, and the
/// command fails.
pub fn finish_output<W: std::io::Write>(out: &mut RecordSink<W>) -> anyhow::Result<()> {
    if let Err(leftover) = out.finish() {
        eprintln!("profiler: these window records could not be written to the output:");
        std::io::stderr().write_all(&leftover)?;
        anyhow::bail!("the output could not take every window record (printed above instead)");
    }
    Ok(())
}
