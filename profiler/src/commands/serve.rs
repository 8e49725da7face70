//! `profiler serve`: a long-running collector for Prometheus. The shared sampler runs on a
//! collector thread and folds every sample into a [`FleetState`]; the main thread serves
//! `/metrics` from it (OpenMetrics, or Prometheus text to clients that do not ask for
//! OpenMetrics), optionally writes the same metrics for node_exporter's textfile collector each
//! window, and optionally the JSONL windows `record` writes (reopened on SIGHUP, for
//! logrotate). SIGTERM and SIGINT end it cleanly: a last sample, the file flushed.

use std::{
    convert::Infallible,
    fs::{File, OpenOptions},
    io::Write as _,
    net::SocketAddr,
    ops::ControlFlow,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};

use super::live::{LiveOptions, finish_output, join_collector, spawn_collector, start_session};
use crate::{
    identity::discovery::clock_ticks_per_second,
    outputs::{metrics::FleetState, output::RecordSink},
    windows::{
        live::ProfilerCost,
        sampler::{Sample, SampleSink},
    },
};

pub struct ServeOptions {
    pub live: LiveOptions,
    pub listen: SocketAddr,
    pub output: Option<PathBuf>,
    pub textfile_dir: Option<PathBuf>,
    /// Seconds an exited VM's series stay.
    pub exit_grace: u64,
}

/// The file name node_exporter's textfile collector reads (it takes `*.prom`).
pub const TEXTFILE_NAME: &str = "qemu_profiler.prom";

/// Opens the JSONL output for appending, owner read/write and group read only.
fn open_append(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Writes `text` to `dir/name` atomically: a temporary file in the same directory, then a
/// rename, so a reader never sees half a file.
pub fn write_atomically(dir: &Path, name: &str, text: &str) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))
}

/// The JSONL output, reopened when asked (SIGHUP).
struct Output {
    path: PathBuf,
    sink: RecordSink<File>,
    reopen: Arc<AtomicBool>,
}

/// Folds samples into the fleet state; writes the textfile and the records.
struct Serve {
    fleet: Arc<Mutex<FleetState>>,
    exit_grace: f64,
    window: u64,
    textfile_dir: Option<PathBuf>,
    output: Option<Output>,
    /// The textfile write failed last time (to say so once per streak).
    textfile_failing: bool,
}

impl Serve {
    fn say(&mut self, note: impl std::fmt::Display) {
        eprintln!("profiler: {note}");
        self.fleet.lock().unwrap_or_else(|e| e.into_inner()).notes += 1;
    }
}

impl SampleSink for Serve {
    fn on_sample(&mut self, s: &Sample<'_>) -> ControlFlow<()> {
        for note in s.notes {
            self.say(note);
        }
        {
            let mut fleet = self.fleet.lock().unwrap_or_else(|e| e.into_inner());
            // Between window boundaries the VMs are read only when one starts or exits: the
            // counters advance at each boundary (docs/fleet.md).
            if s.every_vm {
                fleet.update(
                    s.t,
                    s.session.observations(),
                    s.session.exits(),
                    self.exit_grace,
                );
            }
            fleet.set_estimates(s.session.estimate_additions());
            fleet.set_duties(s.session.duty_views());
            fleet.cost = ProfilerCost::now(s.session.probe_cost());
            fleet.maps = s.session.map_entries();
            fleet.dropped = s.session.dropped();
            fleet.sources_up = s
                .session
                .host_sources()
                .into_iter()
                .map(|(name, status)| (name, status.is_ok()))
                .collect();
        }
        if let Some(out) = &mut self.output {
            if out.reopen.swap(false, Ordering::Relaxed) {
                match open_append(&out.path) {
                    Ok(f) => {
                        // Whatever the old file could not take goes to the new one.
                        let pending = out.sink.pending().to_vec();
                        out.sink = RecordSink::new(f);
                        out.sink.requeue(pending);
                        eprintln!("profiler: reopened {}", out.path.display());
                    }
                    Err(e) => eprintln!("profiler: cannot reopen the output: {e:#}"),
                }
            }
            if let Some(note) = out.sink.write(s.closed) {
                eprintln!("profiler: {note}");
            }
        }
        let boundary = s.first || s.last || (s.t as u64).is_multiple_of(self.window);
        if let Some(dir) = self.textfile_dir.clone()
            && boundary
        {
            let text = crate::outputs::metrics::prometheus_text(&self.fleet);
            match write_atomically(&dir, TEXTFILE_NAME, &text) {
                Ok(()) if self.textfile_failing => {
                    self.textfile_failing = false;
                    self.say("writing the textfile again");
                }
                Ok(()) => {}
                Err(e) if !self.textfile_failing => {
                    self.textfile_failing = true;
                    self.say(format!(
                        "cannot write {}: {e}; retrying every window",
                        dir.join(TEXTFILE_NAME).display()
                    ));
                }
                Err(_) => {}
            }
        }
        ControlFlow::Continue(())
    }
}

const INDEX: &str = "<!doctype html>\n<html><head><title>QEMU device-model event profiler</title>\
    </head><body><h1>QEMU device-model event profiler</h1><p>Per-VM timer, fd, read and \
    write events of the QEMU processes on this host, for Prometheus: \
    <a href=\"/metrics\">/metrics</a>.</p></body></html>\n";

/// Prometheus asks for OpenMetrics in its Accept header; anything else (curl, promtool)
/// gets the Prometheus text format.
fn wants_openmetrics(req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

fn respond(req: &Request<Incoming>, fleet: &Arc<Mutex<FleetState>>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" if wants_openmetrics(req) => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            crate::outputs::metrics::openmetrics_text(fleet),
        ),
        "/metrics" => reply(
            StatusCode::OK,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            crate::outputs::metrics::prometheus_text(fleet),
        ),
        "/" => reply(StatusCode::OK, "text/html; charset=utf-8", INDEX.into()),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

pub fn run(opts: ServeOptions) -> anyhow::Result<ExitCode> {
    let session = start_session(&opts.live)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listener = runtime
        .block_on(TcpListener::bind(opts.listen))
        .with_context(|| format!("listening on {}", opts.listen))?;
    let bound = listener.local_addr()?;
    if !bound.ip().is_loopback() {
        eprintln!(
            "profiler: serving on {bound}, which is reachable from other hosts: the metrics name \
             this host's VMs; firewall it or use a loopback address"
        );
    }
    eprintln!("profiler: serving metrics on http://{bound}/metrics");

    let output = match &opts.output {
        Some(path) => Some(Output {
            path: path.clone(),
            sink: RecordSink::new(open_append(path)?),
            reopen: Arc::new(AtomicBool::new(false)),
        }),
        None => None,
    };
    if let Some(dir) = &opts.textfile_dir
        && !dir.is_dir()
    {
        anyhow::bail!("--textfile-dir {} is not a directory", dir.display());
    }
    let reopen = output.as_ref().map(|o| o.reopen.clone());
    let fleet = Arc::new(Mutex::new(FleetState::new(
        opts.live.window as f64,
        clock_ticks_per_second(),
    )));
    let sink = Serve {
        fleet: fleet.clone(),
        exit_grace: opts.exit_grace as f64,
        window: opts.live.window,
        textfile_dir: opts.textfile_dir.clone(),
        output,
        textfile_failing: false,
    };
    let (collector, stop_tx) = spawn_collector(session, sink)?;

    let served = runtime.block_on(async {
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sighup = signal(SignalKind::hangup())?;
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let fleet = fleet.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |req: Request<Incoming>| {
                            let response = respond(&req, &fleet);
                            async move { Ok::<_, Infallible>(response) }
                        });
                        // A client that goes away mid-request is its own business.
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                _ = sighup.recv() => {
                    if let Some(flag) = &reopen {
                        flag.store(true, Ordering::Relaxed);
                    }
                }
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
            }
        }
        anyhow::Ok(())
    });
    let _ = stop_tx.send(());
    let mut sink = join_collector(collector)?;
    served?;
    if let Some(out) = &mut sink.output {
        finish_output(&mut out.sink)?;
    }
    eprintln!("profiler: stopped");
    Ok(ExitCode::SUCCESS)
}
