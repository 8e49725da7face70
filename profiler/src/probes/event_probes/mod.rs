//! [`EventProbes`], the real probe layer: loads the eBPF object, attaches each VM's sources
//! as the source policy picks them (`attach.rs`), keeps the watched-process set current, hands
//! out raw counters, and duty-cycles uprobes for the overhead budget (`duty.rs`).

mod attach;
mod duty;
mod hit_cost;
#[cfg(test)]
mod tests;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use aya::Ebpf;
use profiler_common::{RegionKey, RegionName, UNNAMED_REGION_MARK, link_generation, watch_flag};

use crate::{
    identity::discovery::QemuProcess,
    note::Note,
    offer::{
        exe::{ExeAnalysis, ExeCatalog},
        libc::{LibcCatalog, LibcOffer},
        policy::{TimerChoice, UprobeLinkChoice, VmSources},
    },
    probes::{
        AttachedVm, HitCost, NESTED_RUNS, ProbeCost, ProbeLayer, ProbeOptions, RawCounters,
        RegionLabel,
        kernel::{batch, counters, detacher, object, prog_info, stats, uprobe_multi, watch_table},
        sources::{
            execs, host_cpu, hrtimers,
            kvm::{self, KvmSource},
            libc_waits::LibcWaitSource,
            symbols::{self, SymbolSource},
            syscall_waits::{self, SyscallWaits},
            usdt::{self, UsdtSource},
        },
    },
};

/// The timer sources whose tracepoints all their VMs share.
#[derive(Debug, Clone, Copy)]
enum SharedWaits {
    Syscall,
    Hrtimer,
    /// `timer:hrtimer_start` alone, for the libc result probes.
    HrtimerStarts,
}

impl SharedWaits {
    /// The detacher's job key for its links (no process has these pids).
    fn job(self) -> u32 {
        match self {
            SharedWaits::Syscall => u32::MAX,
            SharedWaits::Hrtimer => u32::MAX - 1,
            SharedWaits::HrtimerStarts => u32::MAX - 2,
        }
    }
}

/// Whether process `pid` still runs (a VM may exit while it is being attached to): a killed
/// process lingers in /proc as a zombie, and an exiting one has no memory map (`exe`) left.
fn process_alive(pid: u32) -> bool {
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, after_comm) = stat.rsplit_once(')')?;
            after_comm.trim_start().chars().next()
        });
    matches!(state, Some(s) if s != 'Z' && s != 'X')
        && std::fs::read_link(format!("/proc/{pid}/exe")).is_ok()
}

/// What serves one watched VM, kept to re-attach its uprobes after a pause.
#[derive(Debug, Clone)]
struct Served {
    sources: VmSources,
    exe: Option<Arc<ExeAnalysis>>,
    libc: Option<LibcOffer>,
    paused: bool,
}

/// The real probes: the eBPF object and every source family.
pub struct EventProbes {
    ebpf: Ebpf,
    catalog: ExeCatalog,
    libc_catalog: LibcCatalog,
    timer_choice: TimerChoice,
    watched: HashSet<u32>,
    libc: LibcWaitSource,
    syscall_waits: SyscallWaits,
    hrtimer_waits: hrtimers::HrtimerWaits,
    usdt: UsdtSource,
    symbols: SymbolSource,
    kvm: KvmSource,
    /// The host's busy time from the scheduler.
    host_cpu: host_cpu::HostCpuSource,
    /// Multi-uprobe links (`Err`: why per-site links are used).
    uprobe_links: Result<(), String>,
    /// Said while attaching, handed out with the watch that caused it.
    pending_notes: Vec<Note>,
    /// What serves each watched VM, to re-attach it after a pause.
    served: HashMap<u32, Served>,
    /// Closes paused and gone VMs' links off the sampling thread.
    detacher: detacher::Detacher,
    /// Unwatched VMs whose links are still being closed: their map entries are cleared again
    /// once they are (a live process may hit a probe until its link is gone).
    closing: HashSet<u32>,
    /// BPF run-time statistics, sampled.
    stats: stats::StatsSampler,
    loaded_at: std::time::Instant,
    /// Watch flags every process gets: under a budget its uprobe runs are counted.
    base_flags: u32,
    /// Region names read from `REGION_NAMES`, by process and region.
    region_labels: HashMap<u32, HashMap<u64, RegionLabel>>,
    /// Exec events for discovery, or why there are none (discovery then reads all of /proc).
    execs: Result<execs::ExecWatch, String>,
    counters: counters::CounterStore,
    /// Where the programs find the watched processes.
    watch_table: watch_table::WatchTable,
    /// The libc result source's per-thread ppoll marks.
    ppoll_marks: syscall_waits::PpollMarks,
}

impl EventProbes {
    /// Loads the programs and attaches the host-wide ones (KVM; the syscall tracepoints wait
    /// until a VM needs them); debug files are searched under `debug_roots`, timer sources are
    /// chosen as `timer_choice` allows.
    pub fn load(options: ProbeOptions) -> anyhow::Result<Self> {
        let ProbeOptions {
            debug_roots,
            timer_choice,
            max_overhead,
            uprobe_links,
            selective,
        } = options;
        crate::probes::host::check_privileges()?;
        crate::probes::host::raise_fd_limit();
        let tracefs = crate::offer::tracefs::ensure_tracefs()?;
        let mut ebpf = Ebpf::load(object::EBPF_OBJECT).context("loading the eBPF object")?;
        // Before any map is taken out of `ebpf`: the copies are relocated against them all.
        let multi = match uprobe_links {
            UprobeLinkChoice::PerSite => Err("per-site links asked for (--uprobe-links)".into()),
            UprobeLinkChoice::Auto | UprobeLinkChoice::PerBinary | UprobeLinkChoice::PerVm => {
                let programs: Vec<&str> = SymbolSource::PROGRAMS
                    .into_iter()
                    .chain([usdt::PROGRAM])
                    .chain(LibcWaitSource::programs())
                    .collect();
                // A budget pauses one VM's probes: each needs links of its own.
                let per_binary = max_overhead.is_none()
                    && match uprobe_links {
                        UprobeLinkChoice::Auto => !selective,
                        UprobeLinkChoice::PerBinary => true,
                        _ => false,
                    };
                uprobe_multi::MultiPrograms::load(&ebpf, object::EBPF_OBJECT, &programs)
                    .map(|m| if per_binary { m.shared_per_binary() } else { m })
                    .map(Arc::new)
                    .map_err(|e| format!("{e:#}"))
            }
        };
        let shared = multi.as_ref().ok().cloned();
        let syscall_waits = syscall_waits::load(&mut ebpf)?;
        let hrtimer_waits = hrtimers::HrtimerWaits::load(&mut ebpf, &tracefs);
        let libc = LibcWaitSource::load(&mut ebpf, shared.clone())?;
        let usdt = UsdtSource::load(&mut ebpf, shared.clone())?;
        let symbols = SymbolSource::load(&mut ebpf, shared)?;
        // KVM tracepoints are cheap when no KVM guest runs; their absence is not fatal.
        let kvm = KvmSource::attach(&mut ebpf, &tracefs);
        let execs = execs::ExecWatch::attach(&mut ebpf).map_err(|e| format!("{e:#}"));
        // Only where no cpuacct hierarchy gives the tasks' runtimes: it costs every context
        // switch on the host.
        let host_cpu = if crate::identity::procfs::CpuacctReader::default()
            .read(std::path::Path::new("/proc"))
            .is_some()
        {
            host_cpu::HostCpuSource::not_needed()
        } else {
            host_cpu::HostCpuSource::attach(&mut ebpf)
        };
        let counters = counters::CounterStore::open(&ebpf)?;
        let watch_table = watch_table::WatchTable::open(&ebpf)?;
        let ppoll_marks = syscall_waits::PpollMarks::open(&ebpf)?;
        Ok(Self {
            ebpf,
            catalog: ExeCatalog::new(debug_roots),
            libc_catalog: LibcCatalog::default(),
            timer_choice,
            watched: HashSet::new(),
            libc,
            syscall_waits,
            hrtimer_waits,
            usdt,
            symbols,
            kvm,
            host_cpu,
            uprobe_links: multi.map(|_| ()),
            pending_notes: Vec::new(),
            served: HashMap::new(),
            detacher: detacher::Detacher::new(),
            closing: HashSet::new(),
            stats: stats::StatsSampler::start(),
            loaded_at: std::time::Instant::now(),
            base_flags: if max_overhead.is_some() {
                watch_flag::COUNT_HITS
            } else {
                0
            },
            region_labels: HashMap::new(),
            execs,
            counters,
            watch_table,
            ppoll_marks,
        })
    }
    /// Runs the kernel skipped because another BPF program was running on that CPU, of the
    /// programs whose skip can lose a count. Not `hrtimer_start`'s or `hrtimer_cancel`'s: they
    /// only count sleep timers, which their sleeper arms and cancels in its own process
    /// context where no other program can be running; their skips are of timers armed or
    /// cancelled in interrupts (the tick), which they ignore anyway.
    fn nested_runs(&self) -> u64 {
        self.ebpf
            .programs()
            .filter(|(name, _)| !hrtimers::PROCESS_CONTEXT_PROGRAMS.contains(name))
            .filter_map(|(_, p)| p.fd().ok())
            .filter_map(|fd| prog_info::recursion_misses(std::os::fd::AsFd::as_fd(fd)).ok())
            .sum()
    }
    fn forget_counters(&mut self, tgid: u32) -> anyhow::Result<()> {
        self.counters.forget(&mut self.ebpf, tgid).map(drop)
    }
    /// Every uprobe link of `pid` (USDT sites, symbols, libc waits), for the detacher.
    fn take_uprobes(&mut self, pid: u32) -> Vec<detacher::Detach> {
        let mut items = self.usdt.take(&mut self.ebpf, pid);
        items.extend(self.symbols.take(&mut self.ebpf, pid));
        items.extend(self.libc.take(&mut self.ebpf, pid));
        items
    }
    /// Clears the map entries of `pid` (it is not watched).
    fn forget_process(&mut self, pid: u32) -> anyhow::Result<()> {
        batch::forget_region_keys::<RegionName>(&mut self.ebpf, "REGION_NAMES", pid);
        self.region_labels.remove(&pid);
        batch::forget_region_keys::<u64>(&mut self.ebpf, symbols::SEEN_CALLBACKS_MAP, pid);
        syscall_waits::forget_process(&mut self.ebpf, pid);
        self.ppoll_marks.free_process(pid);
        hrtimers::forget_process(&mut self.ebpf, pid);
        self.kvm.forget(&mut self.ebpf, pid);
        self.forget_counters(pid)
    }
    /// Detaches every per-process probe and lowers the USDT semaphores (also done on drop):
    /// every link closed at once, since each close waits for a grace period.
    pub fn detach_all(&mut self) {
        let pids: HashSet<u32> = self
            .watched
            .iter()
            .chain(self.served.keys())
            .copied()
            .collect();
        for pid in pids {
            let items = self.take_uprobes(pid);
            self.detacher.submit(pid, items);
        }
        self.detacher.drain();
        self.usdt.detach_all(&mut self.ebpf);
        self.symbols.detach_all(&mut self.ebpf);
        self.libc.detach_all(&mut self.ebpf);
        self.syscall_waits.detach_all(&mut self.ebpf);
        self.hrtimer_waits.detach_all(&mut self.ebpf);
    }
}

impl ProbeLayer for EventProbes {
    fn watch(&mut self, vm: &QemuProcess) -> anyhow::Result<AttachedVm> {
        let pid = vm.key.pid;
        self.forget_counters(pid)?;
        if self.base_flags & watch_flag::COUNT_HITS != 0 {
            // Budgeted: its links carry a generation, so that a pause stops them at once.
            self.watch_table
                .set_generation(&mut self.ebpf, pid, link_generation::FIRST)?;
        }
        // Watched with no source flags until its timer source is chosen.
        self.set_watch_flags(pid, 0)?;
        self.watched.insert(pid);
        self.attach_planned(vm)
    }

    fn replan(&mut self, vm: &QemuProcess) -> anyhow::Result<AttachedVm> {
        // The per-process probes go and the plan's come; the kernel's counters stay (the kvm
        // tracepoint programs counted the process all along).
        self.usdt.detach(&mut self.ebpf, vm.key.pid);
        self.symbols.detach(&mut self.ebpf, vm.key.pid);
        self.detach_timer(vm.key.pid);
        self.attach_planned(vm)
    }

    fn unwatch(&mut self, pid: u32) -> anyhow::Result<()> {
        if self.watched.remove(&pid) {
            // Already gone is fine: the process may have been removed concurrently.
            self.watch_table.remove(&mut self.ebpf, pid)?;
        }
        // Closing a uprobe link waits for a grace period: off the sampling thread, or a VM
        // that lives a second is never seen.
        let items = self.take_uprobes(pid);
        self.detacher.submit(pid, items);
        self.closing.insert(pid);
        self.detach_timer(pid);
        self.served.remove(&pid);
        self.forget_process(pid)
    }

    fn refresh(&mut self) -> Vec<Note> {
        for (pid, _) in self.detacher.finished() {
            if self.closing.remove(&pid) && !self.watched.contains(&pid) {
                let _ = self.forget_process(pid);
            }
        }
        self.stats.tick();
        let _attaching = self.detacher.hold();
        self.symbols.refresh_callbacks(&mut self.ebpf);
        Vec::new()
    }

    fn take_execs(&mut self) -> Option<Vec<u32>> {
        self.execs.as_mut().ok()?.drain(&self.ebpf)
    }

    fn host_busy_ns(&self) -> Option<u64> {
        self.host_cpu.busy_ns(&self.ebpf)
    }

    fn read_counters(&mut self) -> anyhow::Result<HashMap<u32, RawCounters>> {
        let mut out: HashMap<u32, RawCounters> = HashMap::new();
        for (key, value) in self.counters.read(&self.ebpf)? {
            *out.entry(key.tgid)
                .or_default()
                .by_key
                .entry((key.kind, key.id))
                .or_default() += value;
        }
        // A region's name is written once, before or just after its first count: the map
        // is read again only when a counted region has no name yet (a full read scans every
        // bucket, a fixed cost each refresh however few regions there are).
        let unnamed = out.iter().any(|(tgid, c)| {
            let known = self.region_labels.get(tgid);
            c.by_key.keys().any(|&(kind, id)| {
                (kind == profiler_common::kind::READ || kind == profiler_common::kind::WRITE)
                    && !known.is_some_and(|k| k.contains_key(&id))
            })
        });
        if unnamed
            && let Some(Ok(names)) = self
                .ebpf
                .map("REGION_NAMES")
                .map(batch::read_hash::<RegionKey, RegionName>)
        {
            for (key, name) in names {
                if self.watched.contains(&key.tgid) {
                    self.region_labels
                        .entry(key.tgid)
                        .or_default()
                        .entry(key.region)
                        .or_insert_with(|| region_label(&name));
                }
            }
        }
        for (tgid, c) in &mut out {
            if let Some(labels) = self.region_labels.get(tgid) {
                c.regions.clone_from(labels);
            }
        }
        Ok(out)
    }

    fn set_probing(&mut self, pid: u32, on: bool) -> anyhow::Result<Duration> {
        self.set_duty(pid, on)
    }

    fn uprobe_hit_cost(&mut self) -> anyhow::Result<HitCost> {
        self.measure_uprobe_hit_cost()
    }

    fn dropped(&self) -> Vec<(&'static str, u64)> {
        use profiler_common::dropped;
        if self.ebpf.map("DROPPED").is_none() {
            return Vec::new();
        }
        (0..dropped::SLOTS)
            .map(|slot| {
                let total = batch::per_cpu_total(&self.ebpf, "DROPPED", slot).unwrap_or(0);
                (dropped::NAMES[slot as usize], total)
            })
            .chain([(NESTED_RUNS, self.nested_runs())])
            .collect()
    }

    fn map_entries(&self) -> Vec<(&'static str, usize, u32)> {
        use profiler_common::{
            MAX_COUNTERS, MAX_PENDING, MAX_REGION_NAMES, MAX_USDT_SPECS, MAX_WATCHED, PendingWait,
            UsdtSpec,
            kvm::{KvmThreadState, MAX_KVM_PORTS, MAX_KVM_THREADS, PortKey},
        };
        // A hash map's entries, under its name, with its capacity.
        fn hash<K: aya::Pod, V: aya::Pod>(
            e: &Ebpf,
            name: &'static str,
            max: u32,
        ) -> (&'static str, usize, u32) {
            (name, batch::count_entries::<K, V>(e, name), max)
        }
        let e = &self.ebpf;
        vec![
            ("COUNTERS", self.counters.known(), MAX_COUNTERS),
            ("WATCHED", self.watch_table.len(), MAX_WATCHED),
            hash::<u32, PendingWait>(e, syscall_waits::PENDING_MAP, MAX_PENDING),
            hash::<u64, profiler_common::Sleeper>(e, hrtimers::SLEEPERS_MAP, MAX_PENDING),
            hash::<RegionKey, RegionName>(e, "REGION_NAMES", MAX_REGION_NAMES),
            hash::<u32, UsdtSpec>(e, usdt::SPECS_MAP, MAX_USDT_SPECS),
            hash::<RegionKey, u64>(e, symbols::SEEN_CALLBACKS_MAP, MAX_REGION_NAMES),
            hash::<u32, KvmThreadState>(e, kvm::THREADS_MAP, MAX_KVM_THREADS),
            hash::<PortKey, u32>(e, kvm::PORTS_MAP, MAX_KVM_PORTS),
        ]
    }

    fn host_sources(&self) -> Vec<(&'static str, Result<(), String>)> {
        // The syscall tracepoints are loaded (verified) at start and attached only while a
        // VM needs them: usable either way.
        vec![
            ("syscall-tracepoints", Ok(())),
            ("hrtimer-tracepoints", self.hrtimer_waits.status()),
            (
                "exec-tracepoint",
                self.execs.as_ref().map(|_| ()).map_err(Clone::clone),
            ),
            ("kvm-tracepoints", self.kvm.status().clone()),
            ("sched-switch-idle-time", self.host_cpu.status().clone()),
            ("multi-uprobe-links", self.uprobe_links.clone()),
        ]
    }

    fn cost(&self) -> ProbeCost {
        let mut measured = ProbeCost::default();
        for (_, program) in self.ebpf.programs() {
            if let Ok(info) = program.info() {
                measured.run_count += info.run_count();
                measured.run_time += info.run_time();
            }
        }
        // Statistics the administrator turned on for the whole host (the sysctl) counted every
        // run, not one refresh in ten: nothing to scale then.
        let host_wide = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
            .is_ok_and(|v| v.trim() == "1");
        let factor = stats::stats_scale(
            self.loaded_at.elapsed().as_secs_f64(),
            self.stats.on_seconds(),
            host_wide,
        );
        ProbeCost {
            run_count: (measured.run_count as f64 * factor).round() as u64,
            run_time: measured.run_time.mul_f64(factor),
        }
    }
}

fn region_label(name: &RegionName) -> RegionLabel {
    if name.name[0] == UNNAMED_REGION_MARK {
        return RegionLabel::Unnamed;
    }
    let len = name
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(name.name.len());
    RegionLabel::Named(String::from_utf8_lossy(&name.name[..len]).into_owned())
}

impl Drop for EventProbes {
    fn drop(&mut self) {
        self.detach_all();
    }
}
