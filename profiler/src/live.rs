//! What a live view (`profiler top`) receives from the collector once per refresh.
//!
//! Plain data, so the UI can be driven by a real session or by a test.

use crate::{
    collector::Counts,
    discovery::{VmIdentity, VmKey},
    record::{Sources, WindowRecord},
};

/// Closed windows kept per VM for sparklines and the detail view.
pub const HISTORY_WINDOWS: usize = 120;

/// The state of everything after one refresh.
#[derive(Debug, Clone, Default)]
pub struct LiveSnapshot {
    /// Seconds since the profiler started.
    pub t: f64,
    /// The running window's number.
    pub window: u64,
    pub window_secs: f64,
    pub vms: Vec<LiveVm>,
    pub cost: ProfilerCost,
    /// Probe sources attached right now, e.g. `syscall tracepoints`.
    pub live_sources: Vec<String>,
}

/// One VM, live.
#[derive(Debug, Clone)]
pub struct LiveVm {
    pub key: VmKey,
    pub identity: VmIdentity,
    /// Emulated devices named on its command line (`-device` drivers, `-usb`, ...).
    pub devices: Vec<String>,
    pub sources: Sources,
    /// Counts of the running window so far, and the seconds it covers.
    pub running: Counts,
    pub running_elapsed: f64,
    /// CPU seconds of the running window so far.
    pub running_cpu_seconds: Option<f64>,
    /// Closed windows, oldest first, at most [`HISTORY_WINDOWS`].
    pub history: Vec<WindowRecord>,
    /// The QEMU process has exited; kept until its last window scrolls away.
    pub exited: bool,
}

/// The profiler's own cost.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProfilerCost {
    /// Runs of all our eBPF programs since the start.
    pub bpf_run_count: u64,
    /// Time spent in them, nanoseconds (BPF stats; 0 if the kernel refused stats).
    pub bpf_run_time_ns: u64,
    /// User + system CPU of the profiler process itself, seconds.
    pub collector_cpu_seconds: f64,
}
