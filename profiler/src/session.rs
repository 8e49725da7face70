//! One profiling session: discovery + probes + collector, sampled once per refresh.

use std::collections::{BTreeMap, HashMap};

use crate::{
    collector::{Collector, Counts, RunningWindow, VmObservation},
    discovery::{HostPaths, QemuProcess, VmKey, clock_ticks_per_second, scan_qemu_processes},
    probes::{EventProbes, ProbeCost, ProcessCounters},
    record::{Sources, WindowRecord},
};

/// Which VMs to profile: empty means all.
#[derive(Debug, Clone, Default)]
pub struct VmFilter {
    pub names: Vec<String>,
    pub pids: Vec<u32>,
}

impl VmFilter {
    pub fn matches(&self, p: &QemuProcess) -> bool {
        (self.names.is_empty() && self.pids.is_empty())
            || self.names.contains(&p.identity.name)
            || self.pids.contains(&p.key.pid)
    }
}

/// Reason given for read/write until a source for them exists on this VM.
pub const READ_WRITE_UNAVAILABLE: &str = "unavailable: this version counts timer and fd \
     wakeups only; read/write sources (USDT, symbols, KVM tracepoints) are not implemented yet";

/// Which source serves each count for a VM.
pub fn sources_for(_p: &QemuProcess) -> Sources {
    Sources {
        timer: "syscall".into(),
        read: READ_WRITE_UNAVAILABLE.into(),
        write: READ_WRITE_UNAVAILABLE.into(),
    }
}

fn counts_of(p: &QemuProcess, c: Option<&ProcessCounters>) -> Counts {
    let c = c.cloned().unwrap_or_default();
    Counts {
        timer: Some(c.timer()),
        fd_wakeups: Some(c.fd_wakeups()),
        read: None,
        write: None,
        cpu_ticks: Some(p.cpu.total()),
    }
}

/// A running profiling session.
pub struct Session {
    paths: HostPaths,
    probes: EventProbes,
    collector: Collector,
    filter: VmFilter,
    /// The VMs being watched, by PID.
    watched: HashMap<u32, VmKey>,
    /// The processes seen by the last sample.
    last_seen: Vec<QemuProcess>,
}

impl Session {
    pub fn new(
        probes: EventProbes,
        window_secs: f64,
        wall_start: chrono::DateTime<chrono::Utc>,
        filter: VmFilter,
    ) -> Self {
        Self {
            paths: HostPaths::default(),
            probes,
            collector: Collector::new(window_secs, wall_start, clock_ticks_per_second()),
            filter,
            watched: HashMap::new(),
            last_seen: Vec::new(),
        }
    }

    /// Samples every VM at `t` seconds since the start; returns the windows that closed.
    pub fn sample(&mut self, t: f64) -> anyhow::Result<Vec<WindowRecord>> {
        let procs: Vec<QemuProcess> = scan_qemu_processes(&self.paths)
            .into_iter()
            .filter(|p| self.filter.matches(p))
            .collect();
        let counters = self.probes.read_counters()?;

        let current: HashMap<u32, VmKey> = procs.iter().map(|p| (p.key.pid, p.key)).collect();
        // Exited VMs (or PIDs now held by a new QEMU): their last events are still in the
        // kernel map; take them, then drop the counters.
        let mut finals = BTreeMap::new();
        let gone: Vec<(u32, VmKey)> = self
            .watched
            .iter()
            .filter(|(pid, key)| current.get(pid) != Some(key))
            .map(|(pid, key)| (*pid, *key))
            .collect();
        for (pid, key) in gone {
            let c = counters.get(&pid).cloned().unwrap_or_default();
            finals.insert(
                key,
                Counts {
                    timer: Some(c.timer()),
                    fd_wakeups: Some(c.fd_wakeups()),
                    read: None,
                    write: None,
                    cpu_ticks: None,
                },
            );
            self.probes.unwatch(pid)?;
            self.watched.remove(&pid);
        }

        let mut observations = Vec::with_capacity(procs.len());
        for p in &procs {
            let counts = if self.watched.contains_key(&p.key.pid) {
                counts_of(p, counters.get(&p.key.pid))
            } else {
                // Newly seen: counting starts now, from zero.
                self.probes.watch(p.key.pid)?;
                self.watched.insert(p.key.pid, p.key);
                counts_of(p, None)
            };
            observations.push(VmObservation {
                key: p.key,
                identity: p.identity.clone(),
                sources: sources_for(p),
                counts,
            });
        }
        self.last_seen = procs;
        Ok(self.collector.observe(t, &observations, &finals))
    }

    /// Closes every running window as partial (the profiler stops at `t`).
    pub fn finish(&mut self, t: f64) -> Vec<WindowRecord> {
        self.collector.finish(t)
    }

    pub fn running(&self) -> Vec<RunningWindow> {
        self.collector.running()
    }

    pub fn processes(&self) -> &[QemuProcess] {
        &self.last_seen
    }

    pub fn probe_cost(&self) -> ProbeCost {
        self.probes.cost()
    }
}
