//! What a live view (`profiler top`) receives from the collector once per refresh.
//!
//! Plain data, so the UI can be driven by a real session or by a test.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    ops::Deref,
    sync::Arc,
};

use crate::{
    identity::discovery::{VmIdentity, VmKey},
    note::Note,
    record::{Sources, WindowRecord},
    windows::collector::{Counts, RunningWindow},
};

/// Closed windows kept per VM for sparklines and the detail view.
pub const HISTORY_WINDOWS: usize = 120;

/// Notes kept for the status line.
pub const KEPT_NOTES: usize = 20;

/// A VM's closed windows, oldest first, shared between snapshots: a snapshot copies a pointer,
/// not the windows, so a refresh costs the same with 5 windows of history as with 120.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History(Arc<Vec<Arc<WindowRecord>>>);

impl History {
    /// Appends a window, dropping the oldest beyond [`HISTORY_WINDOWS`]. Copies the list of
    /// pointers only if a snapshot still shares it.
    pub fn push(&mut self, record: WindowRecord) {
        let windows = Arc::make_mut(&mut self.0);
        windows.push(Arc::new(record));
        if windows.len() > HISTORY_WINDOWS {
            let excess = windows.len() - HISTORY_WINDOWS;
            windows.drain(..excess);
        }
    }
}

impl From<Vec<WindowRecord>> for History {
    fn from(records: Vec<WindowRecord>) -> Self {
        let mut h = History::default();
        for r in records {
            h.push(r);
        }
        h
    }
}

impl Deref for History {
    type Target = [Arc<WindowRecord>];
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

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
    /// What the profiler had to say lately (sources not used, names not available, output
    /// failing), oldest first, each with the time it was said (seconds since the start).
    pub notes: Vec<(f64, Note)>,
}

/// One VM, live.
#[derive(Debug, Clone)]
pub struct LiveVm {
    pub key: VmKey,
    pub identity: std::sync::Arc<VmIdentity>,
    /// Emulated devices named on its command line (`-device` drivers, `-usb`, ...).
    pub devices: Vec<String>,
    pub sources: std::sync::Arc<Sources>,
    /// Counts of the running window so far, and the seconds it covers.
    pub running: Counts,
    pub running_elapsed: f64,
    /// CPU seconds of the running window so far.
    pub running_cpu_seconds: Option<f64>,
    /// Closed windows, oldest first, at most [`HISTORY_WINDOWS`].
    pub history: History,
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

impl ProfilerCost {
    /// The probes' cost so far (`probes`) and this process's own CPU.
    pub fn now(probes: crate::probes::ProbeCost) -> Self {
        // SAFETY: getrusage writes into the zeroed struct we pass.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Self {
            bpf_run_count: probes.run_count,
            bpf_run_time_ns: probes.run_time.as_nanos() as u64,
            collector_cpu_seconds: tv(usage.ru_utime) + tv(usage.ru_stime),
        }
    }
}

/// Accumulates closed windows per VM between refreshes and builds [`LiveSnapshot`]s.
#[derive(Debug, Default)]
pub struct LiveState {
    vms: BTreeMap<VmKey, LiveVm>,
    notes: VecDeque<(f64, Note)>,
}

impl LiveState {
    /// Folds one refresh in: the VMs alive now (with their running windows and command-line
    /// devices) and the windows this refresh closed. VMs that are gone stay, marked exited,
    /// until none of their windows is recent (so an operator sees a VM that just died).
    pub fn update(
        &mut self,
        running: Vec<(RunningWindow, Vec<String>)>,
        closed: &[WindowRecord],
        ticks_per_second: u64,
    ) {
        let alive: BTreeSet<VmKey> = running.iter().map(|(r, _)| r.key).collect();
        for (r, devices) in running {
            let vm = self.vms.entry(r.key).or_insert_with(|| LiveVm {
                key: r.key,
                identity: r.identity.clone(),
                devices: Vec::new(),
                sources: r.sources.clone(),
                running: Counts::default(),
                running_elapsed: 0.0,
                running_cpu_seconds: None,
                history: History::default(),
                exited: false,
            });
            vm.identity = r.identity;
            vm.devices = devices;
            vm.sources = r.sources;
            vm.running_cpu_seconds = r
                .activity
                .counts
                .cpu_ticks
                .map(|t| t as f64 / ticks_per_second.max(1) as f64);
            vm.running = r.activity.counts;
            vm.running_elapsed = r.elapsed;
            vm.exited = false;
        }
        if !closed.is_empty() {
            // Records carry pid and name, not the start time: a reused PID may have an
            // exited VM and a live one under the same pid and name. An exit record belongs to
            // the one that is gone, any other to the live one.
            let mut by_pid: HashMap<(u32, &str), Vec<VmKey>> = HashMap::new();
            for (key, vm) in &self.vms {
                by_pid
                    .entry((vm.identity.pid, vm.identity.name.as_str()))
                    .or_default()
                    .push(*key);
            }
            let targets: Vec<Option<VmKey>> = closed
                .iter()
                .map(|r| {
                    let keys = by_pid.get(&(r.vm.pid, r.vm.name.as_str()))?;
                    let exited = r.partial_reason == Some(crate::record::PartialReason::VmExited);
                    keys.iter()
                        .find(|k| alive.contains(k) != exited)
                        .or(keys.first())
                        .copied()
                })
                .collect();
            for (record, key) in closed.iter().zip(targets) {
                if let Some(vm) = key.and_then(|k| self.vms.get_mut(&k)) {
                    vm.history.push(record.clone());
                }
            }
        }
        for (key, vm) in self.vms.iter_mut() {
            if !alive.contains(key) && !vm.exited {
                vm.exited = true;
                vm.running = Counts::default();
                vm.running_elapsed = 0.0;
                vm.running_cpu_seconds = None;
            }
        }
    }

    /// Keeps `notes` (said at `t`) for the status line; the oldest go beyond [`KEPT_NOTES`].
    pub fn note(&mut self, t: f64, notes: &[Note]) {
        for note in notes {
            self.notes.push_back((t, note.clone()));
        }
        while self.notes.len() > KEPT_NOTES {
            self.notes.pop_front();
        }
    }

    /// Drops exited VMs whose last window closed before window `keep_from`.
    pub fn prune_exited(&mut self, keep_from: u64) {
        self.vms
            .retain(|_, vm| !vm.exited || vm.history.last().is_some_and(|w| w.window >= keep_from));
    }

    pub fn snapshot(&self, t: f64, window: u64, window_secs: f64) -> LiveSnapshot {
        LiveSnapshot {
            t,
            window,
            window_secs,
            vms: self.vms.values().cloned().collect(),
            cost: ProfilerCost::default(),
            live_sources: Vec::new(),
            notes: self.notes.iter().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(pid: u32, timer: u64) -> (RunningWindow, Vec<String>) {
        (
            RunningWindow {
                key: VmKey {
                    pid,
                    start_ticks: 1,
                },
                identity: crate::identity::fixtures::identity(&format!("vm{pid}"), pid).into(),
                sources: Sources {
                    timer: "syscall".into(),
                    read: "unavailable: x".into(),
                    write: "unavailable: x".into(),
                    timer_callbacks: "unavailable: test fixture".into(),
                    ..Default::default()
                }
                .into(),
                window: 0,
                elapsed: 2.0,
                activity: crate::attribution::WindowCounts {
                    counts: Counts {
                        timer: Some(timer),
                        cpu_ticks: Some(50),
                        in_kernel: None,
                        ..Counts::default()
                    },
                    ..Default::default()
                },
            },
            vec!["usb-tablet".into()],
        )
    }

    fn closed(pid: u32, window: u64) -> WindowRecord {
        let mut r = crate::record::tests::window(&format!("vm{pid}"), pid, window, 5.0);
        r.timer = Some(10);
        r.cpu_seconds = Some(0.1);
        r
    }

    #[test]
    fn history_running_and_exits() {
        let mut s = LiveState::default();
        s.update(vec![running(1, 5), running(2, 7)], &[], 100);
        let snap = s.snapshot(2.0, 0, 5.0);
        assert_eq!(snap.vms.len(), 2);
        assert_eq!(snap.vms[0].running.timer, Some(5));
        assert_eq!(snap.vms[0].running_cpu_seconds, Some(0.5));
        assert_eq!(snap.vms[0].devices, vec!["usb-tablet"]);
        // vm2 exits; its last window closes in the same refresh.
        s.update(vec![running(1, 9)], &[closed(1, 0), closed(2, 0)], 100);
        let snap = s.snapshot(5.0, 1, 5.0);
        assert_eq!(snap.vms[1].history.len(), 1);
        assert!(snap.vms[1].exited);
        assert_eq!(snap.vms[1].running.timer, None);
        s.prune_exited(0);
        assert_eq!(s.snapshot(5.0, 1, 5.0).vms.len(), 2);
        s.prune_exited(1);
        assert_eq!(s.snapshot(5.0, 1, 5.0).vms.len(), 1);
        for w in 1..=(HISTORY_WINDOWS as u64 + 5) {
            s.update(vec![running(1, 1)], &[closed(1, w)], 100);
        }
        let vm = &s.snapshot(0.0, 0, 5.0).vms[0];
        assert_eq!(vm.history.len(), HISTORY_WINDOWS);
        assert_eq!(
            vm.history.last().unwrap().window,
            HISTORY_WINDOWS as u64 + 5
        );
    }

    #[test]
    fn snapshots_share_history_until_a_window_closes() {
        let mut s = LiveState::default();
        for w in 0..5 {
            s.update(vec![running(1, 1)], &[closed(1, w)], 100);
        }
        let a = s.snapshot(1.0, 5, 5.0);
        let b = s.snapshot(2.0, 5, 5.0);
        // Same windows, not copies.
        assert!(std::ptr::eq(
            a.vms[0].history.as_ptr(),
            b.vms[0].history.as_ptr()
        ));
        s.update(vec![running(1, 1)], &[closed(1, 5)], 100);
        let c = s.snapshot(3.0, 6, 5.0);
        assert_eq!((a.vms[0].history.len(), c.vms[0].history.len()), (5, 6));
        // The records themselves are still shared.
        assert!(Arc::ptr_eq(&a.vms[0].history[0], &c.vms[0].history[0]));
    }

    #[test]
    fn notes_are_kept_newest_last_and_capped() {
        let mut s = LiveState::default();
        for i in 0..(KEPT_NOTES + 3) {
            s.note(i as f64, &[Note::general(format!("n{i}"))]);
        }
        let notes = s.snapshot(0.0, 0, 5.0).notes;
        assert_eq!(notes.len(), KEPT_NOTES);
        assert_eq!(notes.last().unwrap().1.text, format!("n{}", KEPT_NOTES + 2));
        assert_eq!(notes[0].0, 3.0);
    }
}
