//! Windowing: cumulative per-VM counters in, per-window records out (bpftop style).
//!
//! The runtime samples every VM's cumulative counters once per refresh, and always exactly at
//! each window boundary. The collector turns consecutive samples into deltas, adds them to the
//! window the sample interval belongs to, and emits a [`ClosedWindow`] when a window closes, a
//! VM exits, or the profiler stops ([`crate::windows::finish`] writes its record). Times are seconds since the profiler started (monotonic);
//! no I/O happens here.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};

use crate::{
    identity::discovery::{VmIdentity, VmKey},
    record::{PartialReason, Sources},
};

/// Tolerance for comparing sample times with window boundaries.
const EPSILON: f64 = 1e-6;

pub use crate::attribution::{
    Attributed, CallbackTotals, Counts, DeviceKey, DeviceTotals, WindowCounts,
};

/// One VM as seen by one sample.
#[derive(Debug, Clone)]
pub struct VmObservation {
    pub key: VmKey,
    pub identity: std::sync::Arc<VmIdentity>,
    pub sources: std::sync::Arc<Sources>,
    /// Its totals since it was first watched; `counts.cpu_ticks` is the process's whole CPU
    /// time, `counts.cpu_roles` set when its threads were read in this sample.
    pub totals: Attributed,
}

/// Fixed windows aligned to the profiler's start.
#[derive(Debug, Clone, Copy)]
pub struct WindowClock {
    pub length: f64,
}

impl WindowClock {
    pub fn new(length_secs: f64) -> Self {
        assert!(length_secs > 0.0, "window length must be positive");
        Self {
            length: length_secs,
        }
    }

    /// The window that time `t` falls in; a time on a boundary starts the next window.
    pub fn index_at(&self, t: f64) -> u64 {
        ((t + EPSILON) / self.length).floor().max(0.0) as u64
    }

    pub fn start_of(&self, index: u64) -> f64 {
        index as f64 * self.length
    }

    pub fn end_of(&self, index: u64) -> f64 {
        self.start_of(index + 1)
    }
}

/// The open window of one VM.
#[derive(Debug, Clone)]
struct VmState {
    identity: std::sync::Arc<VmIdentity>,
    /// When its process started (RFC 3339), when the host's boot time is known.
    started: Option<String>,
    sources: std::sync::Arc<Sources>,
    window: u64,
    /// When this window's coverage started (window start, or first sight of the VM).
    coverage_start: f64,
    started_mid_window: bool,
    /// Totals at `coverage_start`.
    base: Attributed,
    /// Totals at the last sample.
    last: Attributed,
    last_t: f64,
}

/// The running (not yet closed) window of one VM, for live views.
#[derive(Debug, Clone)]
pub struct RunningWindow {
    pub key: VmKey,
    pub identity: std::sync::Arc<VmIdentity>,
    pub sources: std::sync::Arc<Sources>,
    pub window: u64,
    pub elapsed: f64,
    pub activity: WindowCounts,
}

/// How closed windows are written: the window length, and the clocks their times come from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecordFrame {
    /// Seconds of a full window.
    pub length: f64,
    /// Wall time of profiler time 0.
    pub wall_start: DateTime<Utc>,
    /// Clock ticks of the CPU counts per second.
    pub ticks_per_second: u64,
}

impl RecordFrame {
    /// `ticks` of CPU time in seconds, to the millisecond.
    pub fn seconds(&self, ticks: u64) -> f64 {
        round3(ticks as f64 / self.ticks_per_second.max(1) as f64)
    }
}

/// `x` to the thousandth (records keep seconds to the millisecond).
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A window the collector closed: what it measured of one VM. The record is written from it
/// and what else is known of that window ([`crate::windows::finish`]).
#[derive(Debug, Clone)]
pub struct ClosedWindow {
    pub pid: u32,
    pub identity: std::sync::Arc<VmIdentity>,
    /// When its process started (RFC 3339), when known.
    pub started: Option<String>,
    pub sources: std::sync::Arc<Sources>,
    pub window: u64,
    /// Profiler time its coverage started and ended.
    pub from: f64,
    pub to: f64,
    /// Why it covers less than the window (`None`: a full window).
    pub reason: Option<PartialReason>,
    pub activity: WindowCounts,
}

/// Turns samples of cumulative counters into closed windows.
#[derive(Debug)]
pub struct Collector {
    clock: WindowClock,
    wall_start: DateTime<Utc>,
    ticks_per_second: u64,
    /// When the host booted: a process's start tick is counted from it.
    boot: Option<DateTime<Utc>>,
    vms: BTreeMap<VmKey, VmState>,
}

impl Collector {
    pub fn new(window_secs: f64, wall_start: DateTime<Utc>, ticks_per_second: u64) -> Self {
        Self {
            clock: WindowClock::new(window_secs),
            wall_start,
            ticks_per_second: ticks_per_second.max(1),
            boot: None,
            vms: BTreeMap::new(),
        }
    }

    /// Records say when each VM's process started, counted from the host's `boot`.
    pub fn with_boot_time(mut self, boot: Option<DateTime<Utc>>) -> Self {
        self.boot = boot;
        self
    }

    /// When the process of `key` started, from its start tick.
    fn started(&self, key: &VmKey) -> Option<String> {
        let since_boot = key.start_ticks as f64 / self.ticks_per_second as f64;
        let at = self.boot? + TimeDelta::microseconds((since_boot * 1e6).round() as i64);
        Some(at.to_rfc3339_opts(SecondsFormat::Millis, true))
    }

    pub fn clock(&self) -> WindowClock {
        self.clock
    }

    /// Takes one sample at time `t` of every VM that is alive. VMs missing from `observed`
    /// have exited: their window is closed as partial with their last counts, after adding
    /// `final_counts` when the caller could still read them. Returns the records of every
    /// window this sample closed, in VM order.
    pub fn observe(
        &mut self,
        t: f64,
        observed: &[VmObservation],
        final_counts: &BTreeMap<VmKey, Attributed>,
    ) -> Vec<ClosedWindow> {
        let mut closed = Vec::new();
        let now_window = self.clock.index_at(t);

        let alive: BTreeMap<VmKey, &VmObservation> = observed.iter().map(|o| (o.key, o)).collect();
        let exited: Vec<VmKey> = self
            .vms
            .keys()
            .filter(|k| !alive.contains_key(k))
            .copied()
            .collect();
        for key in exited {
            let mut state = self.vms.remove(&key).expect("key from map");
            let fin = final_counts.get(&key).cloned().unwrap_or_default();
            state.last = state.last.with_final(&fin);
            closed.push(self.close(&key, &state, t, Some(PartialReason::VmExited)));
        }

        for obs in observed {
            match self.vms.get_mut(&obs.key) {
                None => {
                    let window_start = self.clock.start_of(now_window);
                    let started = self.started(&obs.key);
                    self.vms.insert(
                        obs.key,
                        VmState {
                            identity: obs.identity.clone(),
                            started,
                            sources: obs.sources.clone(),
                            window: now_window,
                            coverage_start: t,
                            started_mid_window: t > window_start + EPSILON,
                            base: obs.totals.clone(),
                            last: obs.totals.clone(),
                            last_t: t,
                        },
                    );
                }
                Some(state) => {
                    state.last = obs.totals.clone();
                    state.last_t = t;
                    // Identity details (accel from open fds, sources) may sharpen over time.
                    state.identity = obs.identity.clone();
                    state.sources = obs.sources.clone();
                    if now_window > state.window {
                        let state = state.clone();
                        let end = self.clock.end_of(state.window);
                        closed.push(self.close(&obs.key, &state, end, None));
                        let state = self.vms.get_mut(&obs.key).expect("present");
                        state.window = now_window;
                        state.coverage_start = self.clock.start_of(now_window);
                        state.started_mid_window = false;
                        state.base = state.last.clone();
                    }
                }
            }
        }
        closed
    }

    /// Closes every running window as partial: the profiler stops at `t`. Call after a last
    /// `observe` at `t`. Windows that cover no time (stop exactly on a boundary) are dropped.
    pub fn finish(&mut self, t: f64) -> Vec<ClosedWindow> {
        let states = std::mem::take(&mut self.vms);
        states
            .iter()
            .filter(|(_, s)| t - s.coverage_start > EPSILON)
            .map(|(k, s)| self.close(k, s, t, Some(PartialReason::ProfilerStopped)))
            .collect()
    }

    /// The running windows, as of the last sample.
    pub fn running(&self) -> Vec<RunningWindow> {
        self.vms
            .iter()
            .map(|(key, s)| RunningWindow {
                key: *key,
                identity: s.identity.clone(),
                sources: s.sources.clone(),
                window: s.window,
                elapsed: s.last_t - s.coverage_start,
                activity: s.last.since(&s.base),
            })
            .collect()
    }

    fn close(
        &self,
        key: &VmKey,
        state: &VmState,
        end: f64,
        reason: Option<PartialReason>,
    ) -> ClosedWindow {
        ClosedWindow {
            pid: key.pid,
            identity: state.identity.clone(),
            started: state.started.clone(),
            sources: state.sources.clone(),
            window: state.window,
            from: state.coverage_start,
            to: end.min(self.clock.end_of(state.window)),
            reason: reason.or(state.started_mid_window.then_some(PartialReason::VmStarted)),
            activity: state.last.since(&state.base),
        }
    }

    /// How this collector's closed windows are written as records.
    pub fn frame(&self) -> RecordFrame {
        RecordFrame {
            length: self.clock.length,
            wall_start: self.wall_start,
            ticks_per_second: self.ticks_per_second,
        }
    }
}

#[cfg(test)]
mod tests;
