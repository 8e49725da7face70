//! Command-line interface.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::analysis::report::ReportFormat;

/// How `check` prints its verdicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckFormat {
    Text,
    Json,
}

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
    /// KVM guests of libvirt (which holds their QMP monitor): ask libvirt for QEMU's memory
    /// map (`info mtree -f`, read-only) to name their ports and pages. libvirt then marks the
    /// domain tainted (custom-monitor).
    #[arg(long)]
    pub libvirt_monitor: bool,
    #[arg(long, value_enum, default_value_t, help = crate::offer::policy::TIMER_SOURCE_HELP)]
    pub timer_source: crate::offer::policy::TimerChoice,
    /// Keep the probes' cost to each QEMU under PCT % of a core: a busy VM's uprobes are then
    /// attached for only part of each window, and its counts scaled and marked estimated.
    #[arg(long, value_name = "PCT")]
    pub max_overhead: Option<f64>,
    /// How uprobes are linked: `auto`, multi-uprobe links where the kernel makes them (Linux ≥
    /// 6.6), one per QEMU binary shared by its VMs when every VM is watched, one per VM with
    /// `--vm`/`--pid` or `--max-overhead`; else per site. `profiler list` says which.
    #[arg(long, value_enum, default_value_t, env = "PROFILER_UPROBE_LINKS")]
    pub uprobe_links: crate::offer::policy::UprobeLinkChoice,
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
        /// The timer source to show, as `record --timer-source` would pick it (`auto`: the
        /// hrtimer tracepoints, else libc uprobes, else the syscall tracepoints).
        #[arg(long, value_enum, default_value_t)]
        timer_source: crate::offer::policy::TimerChoice,
        /// The uprobe links to show, as `record --uprobe-links` would make them.
        #[arg(long, value_enum, default_value_t, env = "PROFILER_UPROBE_LINKS")]
        uprobe_links: crate::offer::policy::UprobeLinkChoice,
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
    /// Did these devices go quiet? A verdict per VM and device class, with the evidence and
    /// the fix; exit 0 all quiet, 1 something noisy, 2 cannot tell (or no VM matched).
    Check {
        /// Judge this recording instead of recording live.
        file: Option<PathBuf>,
        /// Device classes that must be quiet, comma-separated (`usb,serial,parallel`);
        /// `--list-classes` shows them all.
        #[arg(long, value_delimiter = ',', required_unless_present_any = ["list_classes", "max_timer_rate", "max_wakeup_rate"])]
        quiet: Vec<String>,
        /// Windows to judge (live).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=1000))]
        windows: u64,
        /// Window length in seconds (live).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86400))]
        window: u64,
        /// Skip each VM's first SETTLE seconds after its QEMU started (boot noise); live, also
        /// the check's own first SETTLE seconds (probes just attached). Default: one window
        /// live, none for a recording.
        #[arg(long)]
        settle: Option<u64>,
        /// Also noisy: more timer events per second than this.
        #[arg(long)]
        max_timer_rate: Option<f64>,
        /// Also noisy: more host wakeups per second than this: QEMU's timer and fd wakeups
        /// plus, under KVM, its vCPUs woken from guest halts (the guest's own tick).
        #[arg(long)]
        max_wakeup_rate: Option<f64>,
        #[arg(long, value_enum, default_value = "text")]
        format: CheckFormat,
        /// List the device classes: what each matches and how it is disabled.
        #[arg(long)]
        list_classes: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Serve per-VM metrics for Prometheus (`/metrics`), a long-running collector.
    Serve {
        /// Address to listen on. A non-loopback address exposes this host's VM names and
        /// counts to the network; it is said on stderr.
        #[arg(long, default_value = "127.0.0.1:9464")]
        listen: std::net::SocketAddr,
        /// Window length in seconds (records, textfile updates, per-VM counter updates).
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
        /// Also draw events per window per VM into this file (.svg, or .png where fonts exist).
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// Two recordings side by side (before/after a change): per-window means of every count,
    /// the change in %, per device and per timer callback.
    Compare {
        before: PathBuf,
        after: PathBuf,
        /// Pair VM BEFORE_NAME of the first recording with AFTER_NAME of the second
        /// (repeatable; default: by name, or the only VM of each).
        #[arg(long = "pair")]
        pairs: Vec<crate::analysis::compare::Pair>,
        /// Seconds after each VM's QEMU started that the means skip (boot; recordings that do
        /// not say when it started count from its first window).
        #[arg(long, default_value_t = 0.0)]
        settle: f64,
        #[arg(long)]
        json: bool,
        /// Also draw before vs after into this file (.svg, or .png where fonts exist).
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// How many VMs like the recorded ones fit on a host: each VM's idle cost, per profile
    /// (VMs named alike), and the host's measured CPU against the number of VMs.
    Capacity(CapacityArgs),
}

/// `profiler capacity`'s options.
#[derive(Debug, clap::Args)]
pub struct CapacityArgs {
    /// A recording written by `profiler record`.
    pub file: PathBuf,
    /// Cores to plan for (default: the recorded host's).
    #[arg(long)]
    pub cores: Option<f64>,
    /// Cores kept for the host itself.
    #[arg(long, default_value_t = 0.0)]
    pub reserve_cores: f64,
    /// Share of the remaining cores the VMs' device models may use (0..1].
    #[arg(long, default_value_t = 0.8)]
    pub target_util: f64,
    /// Seconds after a VM's QEMU started that do not count (boot; recordings that do not
    /// say when it started count from its first window).
    #[arg(long, default_value_t = 30.0)]
    pub settle: f64,
    /// The host's memory to plan for, GiB (default: the recorded host's).
    #[arg(long)]
    pub memory_gib: Option<f64>,
    /// Memory kept for the host itself, GiB.
    #[arg(long, default_value_t = 4.0)]
    pub reserve_memory_gib: f64,
    #[arg(long)]
    pub json: bool,
    /// Also draw host CPU against VM count with the projection (.svg or .png).
    #[arg(long)]
    pub plot: Option<PathBuf>,
}
