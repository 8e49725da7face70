//! One profiling session: discovery → watch/unwatch diff → raw counters → attribution →
//! windowing, once per sample.
//!
//! The session works through two seams, [`ProbeLayer`] and [`Discover`], so its own logic
//! (which VMs to watch, PID reuse, exits, notes) is unit-tested on fake processes and fake
//! counters; the real probes and procfs are tested on their own, as root.

use std::collections::{BTreeMap, HashMap};

use crate::{
    attribution::{self, RawCounters, names::VmNameCache},
    identity::discovery::{
        DiscoveryCache, HostCpu, HostPaths, QemuProcess, VmKey, scan_qemu_processes_cached,
        scan_qemu_processes_hinted,
    },
    note::Note,
    offer::policy::{ReadWriteSource, TimerSource, VmSources},
    probes::{ProbeCost, ProbeLayer},
    record::{HostWindow, WindowRecord},
    windows::{
        collector::{
            ClosedWindow, Collector, FinalCounts, RunningWindow, VmObservation, WindowClock,
        },
        drops::DropLedger,
        finish::{self, Probed, WindowFacts},
        host::HostWindows,
    },
};

/// Which VMs to profile: empty means all.
#[derive(Debug, Clone, Default)]
pub struct VmFilter {
    pub names: Vec<String>,
    pub pids: Vec<u32>,
}

impl VmFilter {
    /// Whether any VM was asked for by name or pid (empty means every VM).
    pub fn is_selective(&self) -> bool {
        !(self.names.is_empty() && self.pids.is_empty())
    }

    /// `--vm a --pid 42`, for messages.
    pub fn describe(&self) -> String {
        let names = self
            .names
            .iter()
            .map(|n| format!("--vm {}", crate::text::clean(n)));
        let pids = self.pids.iter().map(|p| format!("--pid {p}"));
        names.chain(pids).collect::<Vec<_>>().join(" ")
    }

    /// A VM matches by its name, its libvirt domain name, its Nova display name or its uuid,
    /// or by pid.
    pub fn matches(&self, p: &QemuProcess) -> bool {
        if self.names.is_empty() && self.pids.is_empty() {
            return true;
        }
        let id = &p.identity;
        let libvirt = id.libvirt.as_ref();
        let names = [
            Some(id.name.as_str()),
            libvirt.map(|l| l.name.as_str()),
            libvirt.and_then(|l| l.nova.as_ref()?.name.as_deref()),
            id.uuid.as_deref(),
        ];
        names
            .into_iter()
            .flatten()
            .any(|n| self.names.iter().any(|want| want == n))
            || self.pids.contains(&p.key.pid)
    }
}

/// Where QEMU processes come from.
pub trait Discover {
    /// Every QEMU process running now.
    fn scan(&mut self) -> Vec<QemuProcess>;
    /// The same, told which PIDs exec'd since the last scan (`None`: not known), so that it
    /// need not look at every process.
    fn scan_hinted(&mut self, execs: Option<Vec<u32>>) -> Vec<QemuProcess> {
        let _ = execs;
        self.scan()
    }
    /// The host's CPU time so far (`None`: not known).
    fn host_cpu(&mut self) -> Option<HostCpu> {
        None
    }
}

/// The host's procfs (and libvirt's state files).
#[derive(Debug, Default)]
pub struct ProcDiscovery {
    paths: HostPaths,
    cache: DiscoveryCache,
    /// Scans since the last full one.
    since_full: u32,
    host_cpu: crate::identity::discovery::HostCpuReader,
}

/// A hinted scan trusts the exec hints and pidfds; every this many scans, one looks at all of
/// `/proc` anyway (a process the hints missed would be found this much later).
const FULL_SCAN_EVERY: u32 = 30;

impl Discover for ProcDiscovery {
    fn scan(&mut self) -> Vec<QemuProcess> {
        self.since_full = 0;
        scan_qemu_processes_cached(&self.paths, &mut self.cache)
    }
    fn scan_hinted(&mut self, execs: Option<Vec<u32>>) -> Vec<QemuProcess> {
        match execs {
            // The first scan is a full one (since_full starts at 0 only after it).
            Some(execs) if self.since_full > 0 && self.since_full < FULL_SCAN_EVERY => {
                self.since_full += 1;
                scan_qemu_processes_hinted(&self.paths, &mut self.cache, &execs)
            }
            _ => {
                let found = self.scan();
                self.since_full = 1;
                found
            }
        }
    }
    fn host_cpu(&mut self) -> Option<HostCpu> {
        self.host_cpu.read(&self.paths)
    }
}

/// What one sample produced.
#[derive(Debug, Default)]
pub struct SampleReport {
    /// Windows that closed at this sample (VM order).
    pub closed: Vec<WindowRecord>,
    /// What the command should tell the user (sources not used, names not available, ...).
    pub notes: Vec<Note>,
}

/// A watched VM.
#[derive(Debug)]
struct WatchedVm {
    key: VmKey,
    /// The accelerator its sources were chosen for.
    accel: crate::identity::cmdline::Accel,
    sources: VmSources,
    /// `sources` as records say it, built once.
    record_sources: std::sync::Arc<crate::record::Sources>,
    names: VmNameCache,
}

impl WatchedVm {
    fn read_write(&self) -> Option<ReadWriteSource> {
        self.sources.read_write.as_ref().ok().copied()
    }

    /// Resolves new names in `raw` and attributes it.
    fn attribute(&mut self, raw: &RawCounters, notes: &mut Vec<Note>) -> attribution::Attributed {
        notes.extend(self.names.update(raw));
        let resolved = self.names.names();
        let mut attributed = attribution::attribute(raw, self.read_write(), &resolved.as_names());
        if self.sources.timer.is_err() {
            // Nothing counted its waits: unknown, not zero.
            attributed.counts.timer = None;
            attributed.counts.fd_wakeups = None;
        }
        attributed
    }
}

/// A running profiling session.
pub struct Session<P: ProbeLayer, D: Discover = ProcDiscovery> {
    probes: P,
    discovery: D,
    collector: Collector,
    filter: VmFilter,
    /// The VMs being watched, by PID.
    watched: HashMap<u32, WatchedVm>,
    /// The processes seen by the last sample.
    last_seen: Vec<QemuProcess>,
    /// Every live VM's cumulative counts at the last sample.
    observed: Vec<VmObservation>,
    /// VMs that exited at the last sample, with their final cumulative counts.
    exited: Vec<VmObservation>,
    host: HostWindows,
    /// Ask libvirt for the memory map of domains whose monitor it holds.
    libvirt_monitor: bool,
    /// Some VM matched the selection at some sample.
    ever_matched: bool,
    /// The window in which "nothing matches" was last said.
    no_match_said: Option<u64>,
    drops: DropLedger,
    /// Duty cycles under `--max-overhead`.
    budgeted: Option<crate::windows::budget::BudgetedVms>,
    /// When the last sample was taken.
    last_t: Option<f64>,
}

impl<P: ProbeLayer> Session<P> {
    /// A session over the host's processes.
    pub fn new(
        probes: P,
        window_secs: f64,
        wall_start: chrono::DateTime<chrono::Utc>,
        filter: VmFilter,
    ) -> Self {
        Self::with_discovery(
            probes,
            ProcDiscovery::default(),
            Collector::new(
                window_secs,
                wall_start,
                crate::identity::discovery::clock_ticks_per_second(),
            )
            .with_boot_time(crate::identity::discovery::boot_time()),
            filter,
        )
    }
}

impl<P: ProbeLayer, D: Discover> Session<P, D> {
    pub fn with_discovery(probes: P, discovery: D, collector: Collector, filter: VmFilter) -> Self {
        let host = HostWindows::new(
            collector.clock(),
            crate::identity::discovery::clock_ticks_per_second(),
        );
        Self {
            host,
            probes,
            discovery,
            collector,
            filter,
            watched: HashMap::new(),
            last_seen: Vec::new(),
            observed: Vec::new(),
            exited: Vec::new(),
            libvirt_monitor: false,
            ever_matched: false,
            no_match_said: None,
            drops: DropLedger::default(),
            budgeted: None,
            last_t: None,
        }
    }

    /// Whether any VM matched the selection so far.
    pub fn ever_matched(&self) -> bool {
        self.ever_matched
    }

    /// Ask libvirt (`virsh qemu-monitor-command`, read-only `info mtree -f`) for the memory
    /// map of KVM domains whose QMP socket libvirt holds; libvirt marks them tainted.
    pub fn with_libvirt_monitor(mut self, on: bool) -> Self {
        self.libvirt_monitor = on;
        self
    }

    /// Keeps each VM's uprobe cost within `percent` of a core (`--max-overhead`): the cost
    /// of one hit is measured here first. `None`: no budget.
    pub fn with_overhead_budget(mut self, percent: Option<f64>) -> anyhow::Result<Self> {
        let Some(percent) = percent else {
            return Ok(self);
        };
        anyhow::ensure!(
            percent > 0.0 && percent <= 100.0,
            "--max-overhead must be in (0, 100], not {percent}"
        );
        let hit_cost = self.probes.uprobe_hit_cost()?;
        self.budgeted = Some(crate::windows::budget::BudgetedVms::new(
            crate::windows::budget::OverheadBudget::new(percent / 100.0, hit_cost),
        ));
        Ok(self)
    }

    /// The overhead budget, when there is one.
    pub fn overhead_budget(&self) -> Option<crate::windows::budget::OverheadBudget> {
        self.budgeted.as_ref().map(|b| b.budget())
    }

    /// Under a budget: what scaling has added to each VM's closed windows, `(pid, exited at
    /// the last sample, addition)`, for counters that carry the estimates (`serve`).
    pub fn estimate_additions(&self) -> Vec<(u32, bool, crate::windows::budget::EstimateAddition)> {
        self.budgeted
            .as_ref()
            .map_or_else(Vec::new, |b| b.additions())
    }

    /// Under a budget: each budgeted VM's duty view, by pid (for `serve`).
    pub fn duty_views(&self) -> Vec<(u32, crate::windows::budget::DutyView)> {
        let Some(budgeted) = &self.budgeted else {
            return Vec::new();
        };
        let budget = budgeted.budget();
        budgeted
            .states()
            .into_iter()
            .filter_map(|(pid, d)| Some((pid, d.view(&budget)?)))
            .collect()
    }

    /// Under a budget: each VM seen by the last sample (by name) with its duty cycle.
    pub fn duty_cycles(&self) -> Vec<(String, crate::windows::budget::DutyCycle)> {
        let Some(budgeted) = &self.budgeted else {
            return Vec::new();
        };
        budgeted
            .states()
            .into_iter()
            .filter_map(|(pid, d)| {
                let p = self.last_seen.iter().find(|p| p.key.pid == pid)?;
                Some((p.identity.name.clone(), d))
            })
            .collect()
    }

    /// Duty cycles: each VM's uprobe hits so far decide whether its probes are on for the
    /// next interval.
    fn cycle_duties(
        &mut self,
        counters: &HashMap<u32, RawCounters>,
        cpu_seconds: &HashMap<u32, f64>,
        t: f64,
        secs: f64,
        notes: &mut Vec<Note>,
    ) {
        let Some(budgeted) = &mut self.budgeted else {
            return;
        };
        let clock = self.collector.clock();
        let window = clock.index_at(t);
        let intervals = (clock.end_of(window) - clock.start_of(window))
            .round()
            .max(1.0) as u32;
        for (pid, vm) in &self.watched {
            let uprobed = crate::windows::budget::Uprobed::of(&vm.sources);
            let hits = counters
                .get(pid)
                .map_or_else(Default::default, |raw| uprobed.hits(raw));
            let tick = crate::windows::budget::Tick {
                t,
                secs,
                window,
                window_intervals: intervals,
            };
            let cpu = cpu_seconds.get(pid).copied();
            let Some(on) = budgeted.observe(*pid, uprobed, hits, cpu, tick) else {
                continue;
            };
            match self.probes.set_probing(*pid, on) {
                Ok(attach) => budgeted.applied(*pid, on, t, attach.as_secs_f64()),
                Err(e) => notes.push(Note::general(format!(
                    "pid {pid}: resuming its probes after a budget pause: {e:#}"
                ))),
            }
        }
    }

    /// Samples every VM at `t` seconds since the start.
    pub fn sample(&mut self, t: f64) -> anyhow::Result<SampleReport> {
        let filter = &self.filter;
        let execs = self.probes.take_execs();
        let procs: Vec<QemuProcess> = self
            .discovery
            .scan_hinted(execs)
            .into_iter()
            .filter(|p| filter.matches(p))
            .collect();
        let mut notes_first = Vec::new();
        self.ever_matched |= !procs.is_empty();
        if self.filter.is_selective() && !self.ever_matched {
            // Said at the start and once per window until a VM appears: a typo must not cost
            // a whole silent recording.
            let window = self.collector.clock().index_at(t);
            if self.no_match_said != Some(window) {
                self.no_match_said = Some(window);
                notes_first.push(Note::general(format!(
                    "no QEMU process matches {} (yet); `profiler list` shows the running ones",
                    self.filter.describe()
                )));
            }
        }
        let host_cpu = self.discovery.host_cpu();
        let mut notes = notes_first;
        notes.extend(self.probes.refresh());
        let counters = self.probes.read_counters()?;
        // What was dropped since the last sample happened before `t`, in the window open then.
        let open_window = self.collector.clock().index_at((t - 1e-3).max(0.0));
        notes.extend(self.drops.sample(open_window, self.probes.dropped()));

        let current: HashMap<u32, VmKey> = procs.iter().map(|p| (p.key.pid, p.key)).collect();
        // Exited VMs (or PIDs now held by a new QEMU): their last events are still in the
        // kernel map; take them, then drop the counters.
        let mut finals = BTreeMap::new();
        let gone: Vec<u32> = self
            .watched
            .iter()
            .filter(|(pid, vm)| current.get(pid) != Some(&vm.key))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in gone {
            let mut vm = self.watched.remove(&pid).expect("listed above");
            let raw = counters.get(&pid).cloned().unwrap_or_default();
            let a = vm.attribute(&raw, &mut notes);
            finals.insert(
                vm.key,
                FinalCounts {
                    counts: a.counts,
                    devices: a.devices,
                    callbacks: a.callbacks,
                },
            );
            self.probes.unwatch(pid)?;
        }

        let mut observations = Vec::with_capacity(procs.len());
        let no_counters = RawCounters::default();
        for p in &procs {
            // QEMU opens /dev/kvm while it starts: a VM first seen a moment before is TCG to
            // the first look. Its sources are chosen again once the accelerator is known.
            if let Some(vm) = self.watched.get(&p.key.pid)
                && vm.accel != p.identity.accel
            {
                let watched = self.probes.replan(p)?;
                notes.extend(watched.notes);
                notes.push(Note::vm(
                    &p.identity.name,
                    format!(
                        "runs under {} (it was {} when first seen): its sources were chosen again",
                        p.identity.accel, vm.accel
                    ),
                ));
                let (names, name_notes) =
                    VmNameCache::for_vm(p, watched.names, self.libvirt_monitor);
                notes.extend(name_notes);
                let vm = self.watched.get_mut(&p.key.pid).expect("checked above");
                vm.accel = p.identity.accel;
                vm.record_sources = std::sync::Arc::new(watched.sources.record());
                vm.sources = watched.sources;
                vm.names = names;
            }
            let raw = if self.watched.contains_key(&p.key.pid) {
                counters.get(&p.key.pid).unwrap_or(&no_counters)
            } else {
                // Newly seen: counting starts now, from zero.
                let watched = self.probes.watch(p)?;
                notes.extend(watched.notes);
                let (names, name_notes) =
                    VmNameCache::for_vm(p, watched.names, self.libvirt_monitor);
                notes.extend(name_notes);
                self.watched.insert(
                    p.key.pid,
                    WatchedVm {
                        key: p.key,
                        accel: p.identity.accel,
                        record_sources: std::sync::Arc::new(watched.sources.record()),
                        sources: watched.sources,
                        names,
                    },
                );
                &no_counters
            };
            let vm = self.watched.get_mut(&p.key.pid).expect("watched above");
            let mut a = vm.attribute(raw, &mut notes);
            a.counts.cpu_ticks = Some(p.cpu.total());
            observations.push(VmObservation {
                key: p.key,
                identity: p.identity.clone(),
                sources: vm.record_sources.clone(),
                counts: a.counts,
                devices: a.devices,
                callbacks: a.callbacks,
            });
        }
        self.last_seen = procs;
        let secs = self.last_t.map_or(0.0, |last| t - last);
        self.last_t = Some(t);
        let ticks_per_second = crate::identity::discovery::clock_ticks_per_second() as f64;
        let cpu_seconds: HashMap<u32, f64> = self
            .last_seen
            .iter()
            .map(|p| (p.key.pid, p.cpu.total() as f64 / ticks_per_second))
            .collect();
        self.cycle_duties(&counters, &cpu_seconds, t, secs, &mut notes);
        let closed = self.collector.observe(t, &observations, &finals);
        let host = self.host.sample(t, host_cpu, observations.len());
        // A VM's window stays open for at most one window past the current one.
        let oldest = open_window.saturating_sub(2);
        let closed = self.finish_windows(closed, host, oldest);
        if let Some(budgeted) = &mut self.budgeted {
            for key in finals.keys() {
                budgeted.forget(key.pid);
            }
        }
        self.exited = self
            .observed
            .iter()
            .filter_map(|o| finals.get(&o.key).map(|fin| o.with_final(fin)))
            .collect();
        self.observed = observations;
        Ok(SampleReport { closed, notes })
    }

    /// Every live VM's cumulative counts (since it was first watched) at the last sample;
    /// `cpu_ticks` is the process's whole CPU time.
    pub fn observations(&self) -> &[VmObservation] {
        &self.observed
    }

    /// The VMs that exited at the last sample, with their final cumulative counts.
    pub fn exits(&self) -> &[VmObservation] {
        &self.exited
    }

    /// Closes every running window as partial (the profiler stops at `t`).
    pub fn finish(&mut self, t: f64) -> Vec<WindowRecord> {
        let closed = self.collector.finish(t);
        self.finish_windows(closed, None, 0)
    }

    /// Writes the records of `closed`, each with what else is known of its window: the host in
    /// it (`host`: the window that ended at this sample), the drops while it was open, and how
    /// long a budgeted VM's uprobes were on in it. Facts older than window `oldest` are then
    /// forgotten.
    fn finish_windows(
        &mut self,
        closed: Vec<ClosedWindow>,
        host: Option<(u64, HostWindow)>,
        oldest: u64,
    ) -> Vec<WindowRecord> {
        let frame = self.collector.frame();
        if let Some(budgeted) = &mut self.budgeted {
            budgeted.next_sample(self.collector.clock().start_of(oldest));
        }
        let records = closed
            .iter()
            .map(|c| {
                let facts = WindowFacts {
                    host: host.filter(|(w, _)| *w == c.window).map(|(_, h)| h),
                    dropped_updates: self.drops.in_window(c.window),
                    probed: self
                        .budgeted
                        .as_ref()
                        .map_or(Probed::Throughout, |b| b.probed(c.pid, c.from, c.to)),
                };
                let (record, added) = finish::record(c, &facts, &frame);
                if let Some(budgeted) = &mut self.budgeted
                    && !added.is_empty()
                {
                    budgeted.absorb(c.pid, &added);
                }
                record
            })
            .collect();
        self.drops.forget_before(oldest);
        records
    }

    /// The running windows.
    pub fn running(&self) -> Vec<RunningWindow> {
        self.collector.running()
    }

    /// Running windows with each VM's command-line devices, for live views.
    pub fn running_with_devices(&self) -> Vec<(RunningWindow, Vec<String>)> {
        let devices: HashMap<VmKey, &Vec<String>> = self
            .last_seen
            .iter()
            .map(|p| (p.key, &p.cmdline.devices))
            .collect();
        self.collector
            .running()
            .into_iter()
            .map(|r| {
                let d = devices
                    .get(&r.key)
                    .map(|d| (*d).clone())
                    .unwrap_or_default();
                (r, d)
            })
            .collect()
    }

    /// Probe sources attached right now, for the live header.
    pub fn live_sources(&self) -> Vec<String> {
        let timers = [
            (TimerSource::LibcUprobes, "libc uprobes (timer, fd)"),
            (
                TimerSource::LibcEntryReturnUprobes,
                "libc entry/return uprobes (timer, fd)",
            ),
            (
                TimerSource::SyscallTracepoints,
                "syscall tracepoints (timer, fd)",
            ),
            (
                TimerSource::HrtimerTracepoints,
                "hrtimer tracepoints (timer, fd of waits that slept)",
            ),
        ];
        let read_writes = [
            (
                ReadWriteSource::Usdt,
                "usdt memory_region_ops (read, write)",
            ),
            (
                ReadWriteSource::Symbols,
                "uprobes memory_region_dispatch (read, write)",
            ),
            (
                ReadWriteSource::KvmTracepoints,
                "kvm tracepoints (read, write)",
            ),
        ];
        let any = |f: &dyn Fn(&WatchedVm) -> bool| self.watched.values().any(f);
        let timer_sources = timers
            .iter()
            .filter(|(source, _)| any(&|vm| vm.sources.timer == Ok(*source)))
            .map(|(_, label)| *label);
        let read_write_sources = read_writes
            .iter()
            .filter(|(source, _)| any(&|vm| vm.read_write() == Some(*source)))
            .map(|(_, label)| *label);
        let callbacks =
            any(&|vm| vm.sources.callbacks.is_ok()).then_some("uprobes timer callbacks");
        timer_sources
            .chain(read_write_sources)
            .chain(callbacks)
            .map(String::from)
            .collect()
    }

    pub fn window_clock(&self) -> WindowClock {
        self.collector.clock()
    }

    /// The (selected) QEMU processes seen by the last sample.
    pub fn processes(&self) -> &[QemuProcess] {
        &self.last_seen
    }

    pub fn probe_cost(&self) -> ProbeCost {
        self.probes.cost()
    }

    /// The host-wide probe sources and whether they are attached.
    pub fn host_sources(&self) -> Vec<(&'static str, Result<(), String>)> {
        self.probes.host_sources()
    }

    /// Entries and capacity of each eBPF map.
    pub fn map_entries(&self) -> Vec<(&'static str, usize, u32)> {
        self.probes.map_entries()
    }

    /// Updates each eBPF map refused because it was full, since the start (as of the last
    /// sample).
    pub fn dropped(&self) -> Vec<(&'static str, u64)> {
        self.drops.totals()
    }

    #[cfg(test)]
    pub(crate) fn probes(&self) -> &P {
        &self.probes
    }
}

#[cfg(test)]
mod tests {
    use std::{
        cell::RefCell,
        collections::{BTreeSet, HashMap},
        rc::Rc,
    };

    use chrono::{DateTime, Utc};
    use profiler_common::kind;

    use super::*;
    use crate::{
        attribution::RegionLabel,
        identity::cmdline::Accel,
        offer::policy::ReadWriteUnavailable,
        probes::{AttachedVm as Watched, NameSources},
        record::PartialReason,
    };

    /// Counters per pid, as a test sets them; shared with the fake probes.
    type Kernel = Rc<RefCell<HashMap<u32, RawCounters>>>;

    /// Probes over a fake kernel: watching starts a process's counters from zero, as the
    /// real layer does; everything it was asked is logged.
    struct FakeProbes {
        kernel: Kernel,
        watched: BTreeSet<u32>,
        log: Vec<String>,
        read_write: HashMap<u32, ReadWriteSource>,
        /// Cumulative updates the fake COUNTERS map refused.
        dropped: Rc<std::cell::Cell<u64>>,
    }

    impl FakeProbes {
        /// KVM guests get the kvm tracepoints; others what the test set.
        fn watch_sources(&self, vm: &QemuProcess) -> Watched {
            let pid = vm.key.pid;
            let read_write = match (self.read_write.get(&pid), vm.identity.accel) {
                (Some(source), _) => Ok(*source),
                (None, Accel::Kvm) => Ok(ReadWriteSource::KvmTracepoints),
                (None, _) => Err(ReadWriteUnavailable::NoUsdtStripped),
            };
            let notes = if read_write.is_err() {
                vec![Note::vm(&vm.identity.name, "usdt source not used: test")]
            } else {
                Vec::new()
            };
            Watched {
                sources: VmSources {
                    read_write,
                    callbacks: Ok(()),
                    timer: Ok(crate::offer::policy::TimerSource::LibcUprobes),
                },
                names: NameSources::default(),
                notes,
            }
        }
    }

    impl ProbeLayer for FakeProbes {
        fn watch(&mut self, vm: &QemuProcess) -> anyhow::Result<Watched> {
            let pid = vm.key.pid;
            self.log.push(format!("watch {pid}"));
            self.watched.insert(pid);
            self.kernel.borrow_mut().remove(&pid);
            Ok(self.watch_sources(vm))
        }
        fn replan(&mut self, vm: &QemuProcess) -> anyhow::Result<Watched> {
            self.log
                .push(format!("replan {} {}", vm.key.pid, vm.identity.accel));
            let mut w = self.watch_sources(vm);
            w.notes.clear();
            Ok(w)
        }
        fn unwatch(&mut self, pid: u32) -> anyhow::Result<()> {
            self.log.push(format!("unwatch {pid}"));
            self.watched.remove(&pid);
            self.kernel.borrow_mut().remove(&pid);
            Ok(())
        }
        fn refresh(&mut self) -> Vec<Note> {
            Vec::new()
        }
        fn read_counters(&mut self) -> anyhow::Result<HashMap<u32, RawCounters>> {
            Ok(self
                .kernel
                .borrow()
                .iter()
                .filter(|(pid, _)| self.watched.contains(pid))
                .map(|(pid, c)| (*pid, c.clone()))
                .collect())
        }
        fn cost(&self) -> ProbeCost {
            ProbeCost::default()
        }
        fn dropped(&self) -> Vec<(&'static str, u64)> {
            vec![("COUNTERS", self.dropped.get()), ("PENDING", 0)]
        }
        fn set_probing(&mut self, pid: u32, on: bool) -> anyhow::Result<std::time::Duration> {
            self.log
                .push(format!("probing {pid} {}", if on { "on" } else { "off" }));
            Ok(std::time::Duration::ZERO)
        }
        fn uprobe_hit_cost(&mut self) -> anyhow::Result<crate::windows::budget::HitCost> {
            Ok(crate::windows::budget::HitCost {
                tight: 1e-6,
                after_sleep: 1e-6,
            })
        }
    }

    /// Processes as a test sets them.
    struct FakeHost(Rc<RefCell<Vec<QemuProcess>>>);

    impl Discover for FakeHost {
        fn scan(&mut self) -> Vec<QemuProcess> {
            self.0.borrow().clone()
        }
    }

    fn qemu(pid: u32, start_ticks: u64, name: &str) -> QemuProcess {
        crate::identity::fixtures::process(pid, start_ticks, name)
    }

    struct Rig {
        kernel: Kernel,
        host: Rc<RefCell<Vec<QemuProcess>>>,
        session: Session<FakeProbes, FakeHost>,
    }

    fn rig(filter: VmFilter, read_write: &[(u32, ReadWriteSource)]) -> Rig {
        let kernel: Kernel = Rc::default();
        let host: Rc<RefCell<Vec<QemuProcess>>> = Rc::default();
        let probes = FakeProbes {
            kernel: kernel.clone(),
            watched: BTreeSet::new(),
            log: Vec::new(),
            read_write: read_write.iter().copied().collect(),
            dropped: Rc::default(),
        };
        let collector = Collector::new(
            10.0,
            "2026-11-22T00:00:00Z".parse::<DateTime<Utc>>().unwrap(),
            100,
        );
        Rig {
            kernel: kernel.clone(),
            host: host.clone(),
            session: Session::with_discovery(probes, FakeHost(host), collector, filter),
        }
    }

    impl Rig {
        fn set_timer(&self, pid: u32, n: u64) {
            self.kernel
                .borrow_mut()
                .entry(pid)
                .or_default()
                .by_key
                .insert((kind::TIMER, 1), n);
        }
        fn log(&self) -> Vec<String> {
            self.session.probes().log.clone()
        }
    }

    #[test]
    fn new_vms_are_watched_once_and_count_from_zero() {
        let mut r = rig(VmFilter::default(), &[]);
        r.host.borrow_mut().push(qemu(10, 1, "a"));
        // Events before the profiler watched the VM do not count.
        r.set_timer(10, 500);
        let report = r.session.sample(0.0).unwrap();
        assert!(report.closed.is_empty());
        assert_eq!(report.notes.len(), 1, "{:?}", report.notes);
        r.set_timer(10, 40);
        r.session.sample(5.0).unwrap();
        r.set_timer(10, 100);
        let report = r.session.sample(10.0).unwrap();
        assert_eq!(r.log(), ["watch 10"]);
        assert_eq!(report.closed.len(), 1);
        assert_eq!(report.closed[0].timer, Some(100));
        assert!(report.notes.is_empty(), "notes are said once");
        assert!(
            report.closed[0]
                .sources
                .read
                .starts_with("unavailable: stripped")
        );
    }

    #[test]
    fn dropped_updates_stamp_the_window_they_happened_in_and_are_said_once() {
        let mut r = rig(VmFilter::default(), &[]);
        r.host.borrow_mut().push(qemu(10, 1, "a"));
        r.session.sample(0.0).unwrap();
        let dropped = r.session.probes().dropped.clone();
        dropped.set(7);
        let notes = r.session.sample(4.0).unwrap().notes;
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].to_string().contains("7 by COUNTERS"),
            "{}",
            notes[0]
        );
        dropped.set(9);
        assert!(
            r.session.sample(8.0).unwrap().notes.is_empty(),
            "once per window"
        );
        let report = r.session.sample(10.0).unwrap();
        assert_eq!(report.closed[0].dropped_updates, 9);
        // The next window lost nothing, and its record says so by leaving the field out.
        let report = r.session.sample(20.0).unwrap();
        assert_eq!(report.closed[0].dropped_updates, 0);
        let line = serde_json::to_string(&report.closed[0]).unwrap();
        assert!(!line.contains("dropped_updates"), "{line}");
        dropped.set(10);
        let closed = r.session.finish(25.0);
        assert_eq!(closed[0].dropped_updates, 0, "not sampled before the stop");
    }

    /// A VM whose waits (libc uprobes, two hits each) would cost 4 % of a core under a 1 %
    /// budget is probed for a block of a quarter of each window (rounded up), and its window
    /// is scaled and marked.
    #[test]
    fn a_budget_duty_cycles_a_busy_vm_and_scales_its_window() {
        let mut r = rig(VmFilter::default(), &[]);
        r.session = std::mem::replace(&mut r.session, rig(VmFilter::default(), &[]).session)
            .with_overhead_budget(Some(1.0))
            .unwrap();
        r.host.borrow_mut().push(qemu(10, 1, "busy"));
        r.session.sample(0.0).unwrap();
        let mut timer = 0;
        let mut probing = true;
        for t in 1..=10 {
            // 20,000 waits a second while probed, none counted while paused.
            if probing {
                timer += 20_000;
            }
            r.set_timer(10, timer);
            // The programs count their own runs: an entry and a return per wait.
            r.kernel
                .borrow_mut()
                .get_mut(&10)
                .unwrap()
                .by_key
                .insert((kind::UPROBE_HIT, 0), 2 * timer);
            let report = r.session.sample(f64::from(t)).unwrap();
            probing = r
                .log()
                .iter()
                .rev()
                .find(|l| l.starts_with("probing 10"))
                .is_none_or(|l| l.ends_with("on"));
            if t == 10 {
                let w = &report.closed[0];
                assert!(w.estimated, "{w:?}");
                let probed = w.probed_seconds.unwrap();
                assert!((2.0..=4.0).contains(&probed), "{probed}");
                // The estimate is the rate while probed times the window.
                assert_eq!(w.timer, Some(200_000), "{w:?}");
            }
        }
        // One block per window: off once the block is over, on again at the next window.
        assert_eq!(
            r.log(),
            ["watch 10", "probing 10 off", "probing 10 on"],
            "{:?}",
            r.log()
        );
        // Without a budget nothing is paused.
        let mut plain = rig(VmFilter::default(), &[]);
        plain.host.borrow_mut().push(qemu(10, 1, "busy"));
        for t in 0..=10 {
            plain.set_timer(10, 20_000 * t);
            plain.session.sample(t as f64).unwrap();
        }
        assert_eq!(plain.log(), ["watch 10"]);
    }

    #[test]
    fn an_exited_vm_keeps_its_last_counts_and_is_unwatched() {
        let mut r = rig(VmFilter::default(), &[(10, ReadWriteSource::Usdt)]);
        r.host.borrow_mut().push(qemu(10, 1, "a"));
        r.session.sample(0.0).unwrap();
        r.set_timer(10, 30);
        {
            let mut k = r.kernel.borrow_mut();
            let c = k.get_mut(&10).unwrap();
            c.by_key.insert((kind::READ, 0x77), 12);
            c.regions
                .insert(0x77, RegionLabel::Named("parallel".into()));
        }
        r.session.sample(1.0).unwrap();
        // Events after the last sample, then the VM exits.
        r.set_timer(10, 45);
        r.host.borrow_mut().clear();
        let report = r.session.sample(2.0).unwrap();
        assert_eq!(r.log(), ["watch 10", "unwatch 10"]);
        assert_eq!(report.closed.len(), 1);
        let w = &report.closed[0];
        assert_eq!(w.partial_reason, Some(PartialReason::VmExited));
        assert_eq!((w.timer, w.read), (Some(45), Some(12)));
        assert_eq!(w.devices[0].name, "parallel");
        assert_eq!(w.sources.read, "usdt");
        assert!(r.session.running().is_empty());
        // The cumulative view (what `serve` exports) has the final counts too.
        assert!(r.session.observations().is_empty());
        let exits = r.session.exits();
        assert_eq!(exits.len(), 1);
        assert_eq!(
            (exits[0].counts.timer, exits[0].counts.read),
            (Some(45), Some(12))
        );
    }

    #[test]
    fn a_reused_pid_is_a_new_vm() {
        let mut r = rig(VmFilter::default(), &[]);
        r.host.borrow_mut().push(qemu(10, 1, "old"));
        r.session.sample(0.0).unwrap();
        r.set_timer(10, 7);
        // Same PID, another start time: the old QEMU exited, a new one took its PID.
        *r.host.borrow_mut() = vec![qemu(10, 2, "new")];
        let report = r.session.sample(1.0).unwrap();
        assert_eq!(r.log(), ["watch 10", "unwatch 10", "watch 10"]);
        assert_eq!(report.closed.len(), 1);
        assert_eq!(report.closed[0].vm.name, "old");
        assert_eq!(report.closed[0].timer, Some(7));
        let running = r.session.running();
        assert_eq!(running.len(), 1);
        assert_eq!(running[0].identity.name, "new");
        assert_eq!(running[0].counts.timer, Some(0));
    }

    #[test]
    fn a_selection_that_matches_nothing_is_said_each_window_until_a_vm_appears() {
        let mut r = rig(
            VmFilter {
                names: vec!["web01".into()],
                pids: Vec::new(),
            },
            &[],
        );
        let said = |report: &SampleReport| {
            report
                .notes
                .iter()
                .any(|n| n.text.starts_with("no QEMU process matches --vm web01"))
        };
        assert!(said(&r.session.sample(0.0).unwrap()));
        assert!(!said(&r.session.sample(5.0).unwrap()), "once per window");
        assert!(
            said(&r.session.sample(10.0).unwrap()),
            "again in the next window"
        );
        assert!(!r.session.ever_matched());
        r.host.borrow_mut().push(qemu(10, 1, "web01"));
        r.session.sample(11.0).unwrap();
        assert!(r.session.ever_matched());
        r.host.borrow_mut().clear();
        assert!(!said(&r.session.sample(20.0).unwrap()), "it did match once");
    }

    #[test]
    fn a_vm_that_turns_out_to_be_kvm_gets_its_sources_again_and_keeps_its_counts() {
        let mut r = rig(VmFilter::default(), &[]);
        r.host.borrow_mut().push(qemu(10, 1, "a"));
        let report = r.session.sample(0.0).unwrap();
        assert_eq!(report.notes.len(), 1, "stripped TCG: {:?}", report.notes);
        r.set_timer(10, 4);
        // The next look finds /dev/kvm open.
        std::sync::Arc::make_mut(&mut r.host.borrow_mut()[0].identity).accel = Accel::Kvm;
        let report = r.session.sample(1.0).unwrap();
        assert_eq!(r.log(), ["watch 10", "replan 10 kvm"]);
        assert!(
            report
                .notes
                .iter()
                .any(|n| n.text.starts_with("runs under kvm (it was tcg")),
            "{:?}",
            report.notes
        );
        r.set_timer(10, 9);
        let closed = r.session.sample(10.0).unwrap().closed;
        assert_eq!(closed[0].sources.read, "kvm-tracepoints");
        assert_eq!(closed[0].timer, Some(9), "counts kept across the re-plan");
        // Once settled, no more re-planning.
        r.session.sample(11.0).unwrap();
        assert_eq!(r.log().len(), 2);
    }

    #[test]
    fn only_selected_vms_are_watched() {
        let mut r = rig(
            VmFilter {
                names: vec!["b".into()],
                pids: vec![30],
            },
            &[],
        );
        *r.host.borrow_mut() = vec![qemu(10, 1, "a"), qemu(20, 1, "b"), qemu(30, 1, "c")];
        r.session.sample(0.0).unwrap();
        assert_eq!(r.log(), ["watch 20", "watch 30"]);
        assert_eq!(r.session.processes().len(), 2);
        assert_eq!(
            r.session.live_sources(),
            ["libc uprobes (timer, fd)", "uprobes timer callbacks"]
        );
    }
}
