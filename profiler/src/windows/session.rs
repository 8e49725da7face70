//! One profiling session: discovery → watch/unwatch diff → raw counters → attribution →
//! windowing, once per sample.
//!
//! The session works through two seams, [`ProbeLayer`] and [`Discover`], so its own logic
//! (which VMs to watch, PID reuse, exits, notes) is unit-tested on fake processes and fake
//! counters; the real probes and procfs are tested on their own, as root.

use std::collections::{BTreeMap, HashMap};

use crate::{
    attribution::{self, RawCounters, cpu_roles::ThreadLedger, names::VmNameCache},
    identity::discovery::{QemuProcess, VmKey},
    note::Note,
    offer::policy::{ReadWriteSource, TimerSource, VmSources},
    probes::{ProbeCost, ProbeLayer},
    record::{HostWindow, WindowRecord},
    windows::{
        budget::Probed,
        collector::{ClosedWindow, Collector, RunningWindow, VmObservation, WindowClock},
        discover::{Discover, ProcDiscovery},
        drops::DropLedger,
        finish::{self, WindowFacts},
        host::HostWindows,
    },
};

/// This process's CPU time so far, nanoseconds.
fn own_cpu_ns() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write to.
    (unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } == 0)
        .then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

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

/// What one sample produced.
#[derive(Debug, Default)]
pub struct SampleReport {
    /// Windows that closed at this sample (VM order).
    pub closed: Vec<WindowRecord>,
    /// What the command should tell the user (sources not used, names not available, ...).
    pub notes: Vec<Note>,
    /// Every VM was read ([`Session::observations`] are as of this sample); `false` for a
    /// refresh of [`Session::sample_changes`] that found nothing to read.
    pub every_vm: bool,
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
    /// Its threads' CPU time by role, read at window boundaries.
    threads: ThreadLedger,
}

impl WatchedVm {
    fn read_write(&self) -> Option<ReadWriteSource> {
        self.sources.read_write.as_ref().ok().copied()
    }

    /// Resolves new names in `raw` and attributes it.
    fn attribute(&mut self, raw: &RawCounters, notes: &mut Vec<Note>) -> attribution::Attributed {
        notes.extend(self.names.update(raw));
        let resolved = self.names.names();
        let names = resolved.as_names();
        let mut attributed = attribution::attribute(raw, self.read_write(), &names);
        attribution::add_guest(&mut attributed, raw, &self.sources.guest, &names);
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
    /// Binaries whose crowd of budgeted VMs was said.
    crowds_said: std::collections::BTreeSet<std::sync::Arc<std::path::Path>>,
    /// When the last sample that read every VM was taken.
    last_t: Option<f64>,
}

/// Budgeted VMs of one binary above which a note says what their per-VM links cost.
const BUDGETED_VMS_PER_BINARY: usize = 100;

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
            crowds_said: Default::default(),
            last_t: None,
        }
    }

    /// Once per binary: more budgeted VMs run it than per-VM links serve well. A budget gives
    /// each VM links of its own, and the kernel walks every link of a probed site at each hit
    /// in any of them (docs/probes.md: fine at 100 busy VMs, the host saturated at 500).
    fn budget_crowds(&mut self, procs: &[QemuProcess]) -> Vec<Note> {
        let mut per_binary: BTreeMap<&std::sync::Arc<std::path::Path>, usize> = BTreeMap::new();
        for p in procs {
            *per_binary.entry(&p.exe).or_default() += 1;
        }
        let mut notes = Vec::new();
        for (exe, n) in per_binary {
            if n > BUDGETED_VMS_PER_BINARY && self.crowds_said.insert(exe.clone()) {
                notes.push(Note::general(format!(
                    "{n} budgeted VMs run {}: under --max-overhead each has uprobe links of its \
                     own, so every probe hit in any of them walks {n} links; above about \
                     {BUDGETED_VMS_PER_BINARY} that costs more than the budget saves \
                     (docs/probes.md)",
                    exe.display()
                )));
            }
        }
        notes
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
        let execs = self.probes.take_execs();
        self.sample_at(t, false, execs)
    }

    /// Samples every VM at `t` if a window starts there, a budget runs, or a QEMU appeared or
    /// exited since the last sample; otherwise only the host-wide work (linking new timer
    /// callbacks, counting drops). Windows come out the same as from [`Self::sample`]: a
    /// window's counts are the difference of two samples at its boundaries, and a VM's exit
    /// is sampled when it is seen. What it saves is the per-VM work between boundaries,
    /// which a view that shows running windows needs each second and a record does not.
    pub fn sample_changes(&mut self, t: f64) -> anyhow::Result<SampleReport> {
        let execs = self.probes.take_execs();
        let quiet = !self.starts_window(t)
            && self.budgeted.is_none()
            && self.discovery.unchanged(execs.as_deref());
        if !quiet {
            return self.sample_at(t, false, execs);
        }
        let mut notes = self.probes.refresh();
        let open_window = self.collector.clock().index_at((t - 1e-3).max(0.0));
        notes.extend(self.drops.sample(open_window, self.probes.dropped()));
        self.exited.clear();
        Ok(SampleReport {
            closed: Vec::new(),
            notes,
            every_vm: false,
        })
    }

    /// Whether a sample at `t` is the first, or the first in a window since the last sample
    /// that read every VM.
    fn starts_window(&self, t: f64) -> bool {
        let clock = self.collector.clock();
        self.last_t
            .is_none_or(|before| clock.index_at(before) != clock.index_at(t))
    }

    /// The last sample, at the stop `t`: its threads are read, for the windows it closes.
    pub fn sample_last(&mut self, t: f64) -> anyhow::Result<SampleReport> {
        let execs = self.probes.take_execs();
        self.sample_at(t, true, execs)
    }

    /// Samples every VM at `t`; threads are read at the first sample, at each one that starts
    /// a new window (their CPU by role is a per-window count, and reading every thread of
    /// every VM each second would cost more than the rest of a sample), and at the `last`.
    fn sample_at(
        &mut self,
        t: f64,
        last: bool,
        execs: Option<Vec<u32>>,
    ) -> anyhow::Result<SampleReport> {
        let workers = (last || self.starts_window(t)).then(|| self.discovery.kernel_workers());
        let filter = &self.filter;
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
        let host_now = crate::windows::host::HostReading {
            stat: self.discovery.host_cpu(),
            runtime_ns: self.discovery.host_runtime_ns(),
            busy_ns: self.probes.host_busy_ns(),
            memory_bytes: self.discovery.host_memory(),
            own_cpu_ns: own_cpu_ns(),
        };
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
            let mut last = vm.attribute(&raw, &mut notes);
            // Read since the last sample that read every VM, while it still ran.
            if let Some(cpu) = self.discovery.exit_cpu(pid) {
                last.counts.cpu_ticks = Some(cpu.total());
            }
            finals.insert(vm.key, last);
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
                        threads: ThreadLedger::default(),
                    },
                );
                &no_counters
            };
            let vm = self.watched.get_mut(&p.key.pid).expect("watched above");
            let mut totals = vm.attribute(raw, &mut notes);
            totals.counts.cpu_ticks = Some(p.cpu.total());
            if let Some(workers) = &workers
                && let Some(threads) = self
                    .discovery
                    .threads(p.key.pid, &vm.threads.settled_roles())
            {
                let mine: Vec<_> = workers
                    .iter()
                    .filter(|w| w.owner == p.key.pid)
                    .copied()
                    .collect();
                totals.counts.cpu_roles = Some(vm.threads.update(&threads, &mine));
            }
            if workers.is_some() {
                totals.counts.resident_bytes = self.discovery.resident_bytes(p.key.pid);
            }
            observations.push(VmObservation {
                key: p.key,
                identity: p.identity.clone(),
                sources: vm.record_sources.clone(),
                totals,
            });
        }
        if self.budgeted.is_some() {
            notes.extend(self.budget_crowds(&procs));
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
        let host = self.host.sample(t, host_now, observations.len());
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
            .filter_map(|o| {
                let fin = finals.get(&o.key)?;
                Some(VmObservation {
                    totals: o.totals.with_final(fin),
                    ..o.clone()
                })
            })
            .collect();
        self.observed = observations;
        Ok(SampleReport {
            closed,
            notes,
            every_vm: true,
        })
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
mod tests;
