//! Command-line interface.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::report::ReportFormat;

#[derive(Debug, Parser)]
#[command(
    name = "profiler",
    version,
    about = "QEMU device-model event profiler: which guests keep the host awake, and why",
    long_about = "Counts, per QEMU process, the events that wake its device model — timer \
                  expiries, fd wakeups, guest reads and writes of emulated devices — in fixed \
                  windows (Project Pulsar's method). Recording needs root."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Which VMs to profile, and where their symbols are: shared by `record` and `top`.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// Only VMs with this name (repeatable).
    #[arg(long = "vm")]
    pub vms: Vec<String>,
    /// Only the QEMU process with this PID (repeatable).
    #[arg(long = "pid")]
    pub pids: Vec<u32>,
    /// Also look for QEMU debug files (`.build-id/NN/REST.debug`) under this directory
    /// (repeatable; /usr/lib/debug is always searched).
    #[arg(long = "debug-dir")]
    pub debug_dirs: Vec<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List QEMU processes: identity, accelerator, and which probe source serves each count.
    List {
        /// One JSON object per VM instead of a table.
        #[arg(long)]
        json: bool,
        /// Also look for QEMU debug files under this directory, as `record --debug-dir`
        /// does (repeatable).
        #[arg(long = "debug-dir")]
        debug_dirs: Vec<PathBuf>,
    },
    /// Record per-VM events in fixed windows, one JSON line per VM per closed window.
    Record {
        /// Window length in seconds.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86400))]
        window: u64,
        /// Stop after this many seconds (default: until Ctrl-C / SIGTERM).
        #[arg(long)]
        duration: Option<u64>,
        /// Where to write the records; `-` is standard output.
        #[arg(long, short, default_value = "-")]
        output: PathBuf,
        #[command(flatten)]
        target: Target,
    },
    /// Live ranking of the noisiest guests (a terminal UI; `?` for keys).
    Top {
        /// Window length in seconds.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86400))]
        window: u64,
        /// Also write closed windows to this file, as `record` does.
        #[arg(long, short)]
        output: Option<PathBuf>,
        #[command(flatten)]
        target: Target,
    },
    /// Serve per-VM metrics for Prometheus (`/metrics`), a long-running collector.
    Serve {
        /// Address to listen on. A non-loopback address exposes this host's VM names and
        /// counts to the network; it is said on stderr.
        #[arg(long, default_value = "127.0.0.1:9464")]
        listen: std::net::SocketAddr,
        /// Window length in seconds (records, textfile updates).
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86400))]
        window: u64,
        /// Also append closed windows here as JSON lines, as `record` writes them; SIGHUP
        /// reopens the file (logrotate).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Also write the metrics to DIR/qemu_profiler.prom each window, atomically, for
        /// node_exporter's textfile collector.
        #[arg(long)]
        textfile_dir: Option<PathBuf>,
        /// Seconds an exited VM's series stay before they are dropped.
        #[arg(long, default_value_t = 300)]
        exit_grace: u64,
        #[command(flatten)]
        target: Target,
    },
    /// Print a recording as Pulsar tables (Interval | Timer | Read | Write | CPU), per VM.
    Report {
        /// A recording written by `profiler record` (`-` for standard input).
        file: PathBuf,
        #[arg(long, value_enum, default_value = "table")]
        format: ReportFormat,
    },
}
