//! One profiling session: discovery + probes + collector, sampled once per refresh.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use crate::{
    collector::{Collector, Counts, FinalCounts, RunningWindow, VmObservation},
    discovery::{
        DiscoveryCache, HostPaths, QemuProcess, VmKey, clock_ticks_per_second,
        scan_qemu_processes_cached,
    },
    mtree::MtreeMap,
    probes::{EventProbes, NO_USDT_REASON, ProbeCost, ProcessCounters, ReadWriteSource},
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

/// Which source serves each count for a VM; `callbacks_unavailable` says why timers cannot be
/// split by callback (None: they are, from symbols).
pub fn sources_with(rw: &ReadWriteSource, callbacks_unavailable: Option<&str>) -> Sources {
    Sources {
        timer: "syscall".into(),
        read: rw.label(),
        write: rw.label(),
        timer_callbacks: match callbacks_unavailable {
            None => "symbols".into(),
            Some(why) => format!("unavailable: {why}"),
        },
    }
}

/// What a process's binary could offer, found without attaching anything (for
/// `profiler list`, which may run unprivileged).
#[derive(Debug, Clone)]
pub struct OfferedSources {
    pub read_write: ReadWriteSource,
    /// Why timers cannot be split by callback (None: they can).
    pub callbacks_unavailable: Option<String>,
    /// Where the symbols come from, or where a debug file was looked for.
    pub symbols: String,
}

pub fn probe_offered_sources(p: &QemuProcess) -> OfferedSources {
    let unavailable = |why: String| OfferedSources {
        read_write: ReadWriteSource::Unavailable(why.clone()),
        callbacks_unavailable: Some(why.clone()),
        symbols: why,
    };
    let bytes = match std::fs::read(format!("/proc/{}/exe", p.key.pid)) {
        Ok(b) => b,
        Err(e) => {
            return unavailable(format!(
                "cannot read /proc/{}/exe ({e}); run as root",
                p.key.pid
            ));
        }
    };
    let usdt = match crate::probes::usdt::find_region_ops_sites(&bytes) {
        Ok(found) => found.is_some(),
        Err(e) => return unavailable(format!("reading its USDT notes: {e:#}")),
    };
    let path = std::fs::read_link(format!("/proc/{}/exe", p.key.pid))
        .ok()
        .filter(|p| p.exists())
        .unwrap_or_else(|| format!("/proc/{}/exe", p.key.pid).into());
    match crate::probes::symbols::analyze(&path, &crate::elf::DebugRoots::system()) {
        Ok(exe) => OfferedSources {
            read_write: if usdt {
                ReadWriteSource::Usdt
            } else {
                match exe.dispatch_unavailable() {
                    None => ReadWriteSource::Symbols,
                    Some(why) => ReadWriteSource::Unavailable(why),
                }
            },
            callbacks_unavailable: exe.callbacks_unavailable(),
            symbols: exe.describe(),
        },
        Err(e) => OfferedSources {
            read_write: if usdt {
                ReadWriteSource::Usdt
            } else {
                ReadWriteSource::Unavailable(NO_USDT_REASON.into())
            },
            callbacks_unavailable: Some(format!("{e:#}")),
            symbols: format!("{e:#}"),
        },
    }
}

fn counts_of(c: Option<&ProcessCounters>, rw: &ReadWriteSource, cpu: Option<u64>) -> Counts {
    let c = c.cloned().unwrap_or_default();
    let (read, write) = c.reads_writes(rw);
    Counts {
        timer: Some(c.timer()),
        fd_wakeups: Some(c.fd_wakeups()),
        read,
        write,
        cpu_ticks: cpu,
        in_kernel: (*rw == ReadWriteSource::KvmTracepoints).then(|| c.kvm_in_kernel()),
    }
}

/// Device names of a KVM guest from its QMP monitor (`info mtree -f`), fetched once in the
/// background so a slow, busy or broken monitor never stalls sampling.
#[derive(Debug, Clone)]
enum DeviceNames {
    Pending,
    Ready(Arc<MtreeMap>),
    Failed,
}

fn fetch_device_names(p: &QemuProcess) -> Arc<Mutex<DeviceNames>> {
    let slot = Arc::new(Mutex::new(DeviceNames::Pending));
    let Some(endpoint) = p.cmdline.qmp.first().cloned() else {
        eprintln!(
            "profiler: VM {}: no QMP socket on its command line; KVM ports and pages are \
             named by address",
            crate::report::sanitize(&p.identity.name)
        );
        *slot.lock().expect("fresh mutex") = DeviceNames::Failed;
        return slot;
    };
    let name = crate::report::sanitize(&p.identity.name);
    let out = slot.clone();
    std::thread::spawn(move || {
        let result = crate::qmp::device_names(&endpoint, crate::qmp::DEFAULT_TIMEOUT);
        let state = match result {
            Ok(map) => DeviceNames::Ready(Arc::new(map)),
            Err(e) => {
                eprintln!(
                    "profiler: VM {name}: device names from QMP failed ({e:#}); KVM ports and \
                     pages are named by address"
                );
                DeviceNames::Failed
            }
        };
        if let Ok(mut slot) = out.lock() {
            *slot = state;
        }
    });
    slot
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
    discovery: DiscoveryCache,
    /// QMP device names of KVM-tracepoint VMs.
    device_names: HashMap<VmKey, Arc<Mutex<DeviceNames>>>,
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
            device_names: HashMap::new(),
            discovery: DiscoveryCache::default(),
        }
    }

    fn names_of(&self, key: &VmKey) -> Option<Arc<MtreeMap>> {
        match &*self.device_names.get(key)?.lock().ok()? {
            DeviceNames::Ready(map) => Some(map.clone()),
            _ => None,
        }
    }

    /// Samples every VM at `t` seconds since the start; returns the windows that closed.
    pub fn sample(&mut self, t: f64) -> anyhow::Result<Vec<WindowRecord>> {
        let procs: Vec<QemuProcess> = scan_qemu_processes_cached(&self.paths, &mut self.discovery)
            .into_iter()
            .filter(|p| self.filter.matches(p))
            .collect();
        self.probes.refresh_callbacks();
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
            let c = counters.get(&pid);
            let rw = self.probes.read_write_source(pid);
            let names = self.names_of(&key);
            finals.insert(
                key,
                FinalCounts {
                    counts: counts_of(c, &rw, None),
                    devices: c
                        .map(|c| c.devices_for(&rw, names.as_deref()))
                        .unwrap_or_default(),
                    callbacks: c.map(|c| c.callbacks()).unwrap_or_default(),
                },
            );
            self.device_names.remove(&key);
            self.probes.unwatch(pid)?;
            self.watched.remove(&pid);
        }

        let mut observations = Vec::with_capacity(procs.len());
        for p in &procs {
            let current = if self.watched.contains_key(&p.key.pid) {
                counters.get(&p.key.pid).cloned()
            } else {
                // Newly seen: counting starts now, from zero.
                self.probes.watch(p.key.pid, p.identity.accel)?;
                self.watched.insert(p.key.pid, p.key);
                if self.probes.read_write_source(p.key.pid) == ReadWriteSource::KvmTracepoints {
                    self.device_names.insert(p.key, fetch_device_names(p));
                }
                None
            };
            let rw = self.probes.read_write_source(p.key.pid);
            let names = self.names_of(&p.key);
            let devices = current
                .as_ref()
                .map(|c| c.devices_for(&rw, names.as_deref()))
                .unwrap_or_default();
            let callbacks = current.as_ref().map(|c| c.callbacks()).unwrap_or_default();
            let callbacks_unavailable = self.probes.callbacks_unavailable(p.key.pid);
            observations.push(VmObservation {
                key: p.key,
                identity: p.identity.clone(),
                sources: sources_with(&rw, callbacks_unavailable.as_deref()),
                counts: counts_of(current.as_ref(), &rw, Some(p.cpu.total())),
                devices,
                callbacks,
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

    /// Running windows with each VM's command-line devices, for live views.
    pub fn running_with_devices(&self) -> Vec<(RunningWindow, Vec<String>)> {
        self.collector
            .running()
            .into_iter()
            .map(|r| {
                let devices = self
                    .last_seen
                    .iter()
                    .find(|p| p.key == r.key)
                    .map(|p| p.cmdline.devices.clone())
                    .unwrap_or_default();
                (r, devices)
            })
            .collect()
    }

    /// Probe sources attached right now, for the live header.
    pub fn live_sources(&self) -> Vec<String> {
        let mut live = vec!["syscall tracepoints (timer, fd)".to_string()];
        let sources: Vec<ReadWriteSource> = self
            .watched
            .keys()
            .map(|pid| self.probes.read_write_source(*pid))
            .collect();
        if sources.contains(&ReadWriteSource::Usdt) {
            live.push("usdt memory_region_ops (read, write)".into());
        }
        if sources.contains(&ReadWriteSource::Symbols) {
            live.push("uprobes memory_region_dispatch (read, write)".into());
        }
        if sources.contains(&ReadWriteSource::KvmTracepoints) {
            live.push("kvm tracepoints (read, write)".into());
        }
        if self
            .watched
            .keys()
            .any(|pid| self.probes.callbacks_unavailable(*pid).is_none())
        {
            live.push("uprobes timer callbacks".into());
        }
        live
    }

    pub fn window_clock(&self) -> crate::collector::WindowClock {
        self.collector.clock()
    }

    pub fn processes(&self) -> &[QemuProcess] {
        &self.last_seen
    }

    pub fn probe_cost(&self) -> ProbeCost {
        self.probes.cost()
    }
}
