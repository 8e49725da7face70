//! The probe layer: loads the eBPF object, attaches each VM's sources as the source policy
//! picks them, keeps the watched-process set current and hands out raw counters.
//!
//! One module per source family (kunai style), each owning its attach/detach and per-process
//! state: [`timers`] (wait-syscall tracepoints), [`usdt`] (QEMU's memory_region_ops probes),
//! [`symbols`] (memory_region_dispatch and timer callbacks), [`kvm`] (the kvm tracepoints).
//! [`policy`] decides which source serves which count; [`exe`] reads what each binary offers.
//! What the counters mean is decided outside, by `crate::attribution`.
//!
//! [`ProbeLayer`] is the seam the session works through, so the session is tested on fake
//! counters (`crate::session` tests) and this layer on the real kernel (root tests).

pub mod batch;
pub mod counters;
pub mod detacher;
pub mod exe;
pub mod execs;
pub mod hrtimers;
pub mod kvm;
pub mod libc_waits;
pub mod mapped;
pub mod perf_uprobe;
pub mod policy;
pub mod prog_info;
pub mod symbols;
pub mod timers;
pub mod tracepoint_group;
pub mod uprobes;
pub mod usdt;
pub mod watch_table;

use std::{
    collections::{HashMap, HashSet},
    os::fd::OwnedFd,
    time::Duration,
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
};
use profiler_common::{RegionKey, RegionName, UNNAMED_REGION_MARK, link_generation, watch_flag};

use self::{
    exe::{ExeAnalysis, ExeCatalog},
    kvm::KvmSource,
    libc_waits::{LibcCatalog, LibcOffer, LibcProbes, LibcWaitSource},
    policy::{ProcessOffer, ReadWriteSource, TimerChoice, TimerSource, VmSources},
    symbols::SymbolSource,
    timers::SyscallWaits,
    usdt::UsdtSource,
};
use crate::{
    attribution::{RawCounters, RegionLabel},
    discovery::QemuProcess,
    names::{NameSources, Note},
};

/// The compiled eBPF object, embedded at build time by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler"));

/// The profiler's own cost in the kernel, from BPF run-time statistics.
///
/// While statistics are on, the kernel times every BPF program run on the host (two clock
/// reads per run: measured by `xtask bench events` as a fifth of a USDT event's cost here), so
/// the profiler turns them on for one refresh in [`STATS_EVERY`] and scales what it measured
/// to the whole run: an estimate from a 1-in-10 sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProbeCost {
    pub run_count: u64,
    pub run_time: Duration,
}

/// The [`ProbeLayer::dropped`] entry of program runs the kernel skipped as nested (see
/// [`prog_info`]); the others are maps.
pub const NESTED_RUNS: &str = "nested runs";

/// BPF statistics are on for one refresh in this many.
pub const STATS_EVERY: u64 = 10;

/// Kernel BPF run-time statistics, on for one refresh in [`STATS_EVERY`].
#[derive(Debug)]
struct StatsSampler {
    /// Held while statistics are on (the kernel keeps them on while any holder has one).
    fd: Option<OwnedFd>,
    refreshes: u64,
    on_since: Option<std::time::Instant>,
    on_total: Duration,
    /// The kernel refused (no CAP_SYS_ADMIN, old kernel): counts stay zero.
    refused: bool,
}

impl StatsSampler {
    fn start() -> Self {
        let mut s = Self {
            fd: None,
            refreshes: 0,
            on_since: None,
            on_total: Duration::ZERO,
            refused: false,
        };
        s.turn(true);
        s
    }

    fn turn(&mut self, on: bool) {
        if on && self.fd.is_none() && !self.refused {
            match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
                Ok(fd) => {
                    self.fd = Some(fd);
                    self.on_since = Some(std::time::Instant::now());
                }
                Err(_) => self.refused = true,
            }
        } else if !on && let Some(since) = self.on_since.take() {
            self.fd = None;
            self.on_total += since.elapsed();
        }
    }

    /// Once per refresh.
    fn tick(&mut self) {
        self.refreshes += 1;
        self.turn(self.refreshes.is_multiple_of(STATS_EVERY));
    }

    /// Seconds the statistics were on so far.
    fn on_seconds(&self) -> f64 {
        (self.on_total + self.on_since.map_or(Duration::ZERO, |s| s.elapsed())).as_secs_f64()
    }
}

/// What watching one VM gave.
#[derive(Debug, Clone)]
pub struct WatchedVm {
    pub sources: VmSources,
    /// What its devices and callbacks can be named from.
    pub names: NameSources,
    /// Why a source the policy picked could not be used, and the like.
    pub notes: Vec<Note>,
}

/// The probes as the session sees them.
pub trait ProbeLayer {
    /// Starts counting `vm`'s events from zero, attaching the sources the policy picks.
    fn watch(&mut self, vm: &QemuProcess) -> anyhow::Result<WatchedVm>;
    /// Chooses `vm`'s sources again (its accelerator turned out different from what it was
    /// when first seen: QEMU opens `/dev/kvm` while it starts), keeping its counters.
    fn replan(&mut self, vm: &QemuProcess) -> anyhow::Result<WatchedVm>;
    /// Stops counting process `pid` and drops its counters (read them first).
    fn unwatch(&mut self, pid: u32) -> anyhow::Result<()>;
    /// Per-refresh upkeep before reading (attach counters to newly seen timer callbacks).
    fn refresh(&mut self) -> Vec<Note>;
    /// Cumulative counters of every watched process.
    fn read_counters(&mut self) -> anyhow::Result<HashMap<u32, RawCounters>>;
    /// The probes' own run count and run time so far.
    fn cost(&self) -> ProbeCost;
    /// The host-wide sources and whether they are attached (`Err`: why not).
    fn host_sources(&self) -> Vec<(&'static str, Result<(), String>)> {
        Vec::new()
    }
    /// Entries in each eBPF map now, and its capacity: (map, entries, max entries).
    fn map_entries(&self) -> Vec<(&'static str, usize, u32)> {
        Vec::new()
    }
    /// Updates each map refused because it was full, since the start: (map, updates); and
    /// ([`NESTED_RUNS`], program runs the kernel skipped).
    fn dropped(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    /// Detaches (`on == false`) or re-attaches the uprobes serving watched VM `pid`, keeping
    /// its counters: the overhead budget's duty cycle. Kernel tracepoints stay. A pause stops
    /// the counting at once (the links, closed in the background a grace period each, count
    /// nothing meanwhile: see [`profiler_common::link_generation`]); a resume counts from its
    /// return, which says how long the attach took.
    fn set_probing(&mut self, _pid: u32, _on: bool) -> anyhow::Result<Duration> {
        Ok(Duration::ZERO)
    }
    /// Seconds one uprobe hit costs the probed thread on this host, measured.
    fn uprobe_hit_cost(&mut self) -> anyhow::Result<crate::budget::HitCost> {
        anyhow::bail!("this probe layer cannot measure uprobe costs")
    }
    /// The PIDs that exec'd since the last call, for discovery (`None`: not watched, or
    /// some were lost).
    fn take_execs(&mut self) -> Option<Vec<u32>> {
        None
    }
}

/// Entries of the hash map `name` with keys `K` and values `V` (0 if it cannot be read).
fn count_entries<K: aya::Pod, V: aya::Pod>(ebpf: &Ebpf, name: &str) -> usize {
    ebpf.map(name)
        .and_then(|m| batch::read_hash::<K, V>(m).ok())
        .map_or(0, |entries| entries.len())
}

/// Capabilities the profiler uses: (number, name, what for).
const NEEDED_CAPS: &[(u32, &str, &str)] = &[
    (39, "CAP_BPF", "loading eBPF programs and maps"),
    (38, "CAP_PERFMON", "attaching tracepoints and uprobes"),
    (
        21,
        "CAP_SYS_ADMIN",
        "mounting tracefs, BPF run-time statistics",
    ),
    (19, "CAP_SYS_PTRACE", "reading QEMU's executable and memory"),
];

/// The effective capability set from `/proc/self/status` (`CapEff:` in hex).
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

/// The capabilities of `NEEDED_CAPS` missing from `effective`, by name and purpose.
pub fn missing_caps(effective: u64) -> Vec<(&'static str, &'static str)> {
    NEEDED_CAPS
        .iter()
        .filter(|(bit, _, _)| effective & (1 << bit) == 0)
        .map(|(_, name, why)| (*name, *why))
        .collect()
}

/// Checks the privileges loading eBPF needs, with an error a person can act on: which
/// capabilities are missing and what each is for.
pub fn check_privileges() -> anyhow::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let Some(effective) = parse_cap_eff(&status) else {
        bail!("cannot read this process's capabilities from /proc/self/status");
    };
    let missing = missing_caps(effective);
    if missing.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = missing
        .iter()
        .map(|(name, why)| format!("{name} ({why})"))
        .collect();
    // SAFETY: geteuid has no preconditions.
    let who = if unsafe { libc::geteuid() } == 0 {
        "running as root, but without"
    } else {
        "not root, and without"
    };
    bail!(
        "recording needs root or these capabilities: {who} {}. Run it with sudo (or grant the \
         capabilities, e.g. in a systemd unit's AmbientCapabilities).",
        list.join(", ")
    );
}

/// Raises this process's open-file limit to its hard limit: each watched VM holds a BPF link
/// per uprobe (the libc waits alone are 6) and a kept `/proc` handle, so 2,000 VMs need
/// over 14,000 descriptors where the usual soft limit is 1,024. Returns the limit now.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    lim.rlim_cur
}

/// Loads the tracepoint program `name` and attaches it to `category:name`.
pub fn attach_tracepoint(ebpf: &mut Ebpf, category: &str, name: &str) -> anyhow::Result<()> {
    let program: &mut aya::programs::TracePoint = ebpf
        .program_mut(name)
        .with_context(|| format!("eBPF program {name} missing from the object"))?
        .try_into()?;
    program
        .load()
        .with_context(|| format!("loading eBPF program {name}"))?;
    program
        .attach(category, name)
        .with_context(|| format!("attaching to tracepoint {category}:{name}"))?;
    Ok(())
}

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

/// Removes every entry of process `tgid` from a map keyed by [`RegionKey`].
fn forget_region_keys<V: aya::Pod>(ebpf: &mut Ebpf, map: &str, tgid: u32) {
    batch::remove_where::<RegionKey, V>(ebpf, map, |k, _| k.tgid == tgid);
}

/// What serves one watched VM, kept to re-attach its uprobes after a pause.
#[derive(Debug, Clone)]
struct Served {
    sources: VmSources,
    exe: Option<std::sync::Arc<ExeAnalysis>>,
    libc: Option<LibcOffer>,
    paused: bool,
}

/// What the user chose about the probes.
#[derive(Debug, Clone, Default)]
pub struct ProbeOptions {
    /// Where QEMU debug files are searched.
    pub debug_roots: crate::elf::DebugRoots,
    /// Which timer sources may be used.
    pub timer_choice: TimerChoice,
    /// `--max-overhead`: percent of a core each VM's uprobes may cost (applied by the session).
    pub max_overhead: Option<f64>,
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
    stats: StatsSampler,
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
    ppoll_marks: timers::PpollMarks,
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
        } = options;
        check_privileges()?;
        raise_fd_limit();
        let tracefs = crate::tracefs::ensure_tracefs()?;
        let mut ebpf = Ebpf::load(EBPF_OBJECT).context("loading the eBPF object")?;
        let syscall_waits = timers::load(&mut ebpf)?;
        let hrtimer_waits = hrtimers::HrtimerWaits::load(&mut ebpf, &tracefs);
        let libc = LibcWaitSource::load(&mut ebpf)?;
        let usdt = UsdtSource::load(&mut ebpf)?;
        let symbols = SymbolSource::load(&mut ebpf)?;
        // KVM tracepoints are cheap when no KVM guest runs; their absence is not fatal.
        let kvm = KvmSource::attach(&mut ebpf, &tracefs);
        let execs = execs::ExecWatch::attach(&mut ebpf).map_err(|e| format!("{e:#}"));
        let counters = counters::CounterStore::open(&ebpf)?;
        let watch_table = watch_table::WatchTable::open(&ebpf)?;
        let ppoll_marks = timers::PpollMarks::open(&ebpf)?;
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
            pending_notes: Vec::new(),
            served: HashMap::new(),
            detacher: detacher::Detacher::new(),
            closing: HashSet::new(),
            stats: StatsSampler::start(),
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

    /// Attaches one read/write source to `pid`, as links of `generation` (all or nothing).
    fn attach_read_write(
        &mut self,
        source: ReadWriteSource,
        pid: u32,
        exe: Option<&ExeAnalysis>,
        generation: u32,
    ) -> Result<(), String> {
        let result = match source {
            ReadWriteSource::Usdt => match exe.map(|e| &e.usdt) {
                Some(Ok(Some(usdt))) => self
                    .usdt
                    .attach(&mut self.ebpf, pid, usdt, generation)
                    .map(|how| {
                        if how == usdt::SemaphoreManagement::ByHand {
                            self.pending_notes.push(Note::general(format!(
                                "pid {pid}: another tracer holds QEMU's USDT sites without a \
                             kernel-managed semaphore; the profiler raises the semaphores by \
                             hand, and a SIGKILL of the profiler would leave them raised"
                            )));
                        }
                    }),
                _ => Err(anyhow::anyhow!("no USDT probes")),
            },
            ReadWriteSource::Symbols => match exe.map(|e| &e.symbols) {
                Some(Ok(symbols)) => {
                    self.symbols
                        .attach_dispatch(&mut self.ebpf, pid, symbols, generation)
                }
                _ => Err(anyhow::anyhow!("no symbols")),
            },
            // Attached host-wide at load; the plan only offers it when that worked.
            ReadWriteSource::KvmTracepoints => Ok(()),
        };
        result.map_err(|e| format!("{e:#}"))
    }

    /// Attaches what the source policy picks for `vm` (all or nothing per source) and says
    /// which source serves each count.
    fn attach_planned(&mut self, vm: &QemuProcess) -> anyhow::Result<WatchedVm> {
        let pid = vm.key.pid;
        let name = &vm.identity.name;
        let _attaching = self.detacher.hold();
        let (binary, exe) = self.catalog.offer(pid);
        let libc = self.libc_catalog.offer(pid);
        let offer = ProcessOffer {
            binary,
            libc: libc.as_ref().map(|_| ()).map_err(Clone::clone),
            timer_choice: self.timer_choice,
        };
        let mut plan = policy::plan(&offer, vm.identity.accel, self.kvm.status());
        if !process_alive(pid) {
            // Gone while it was being looked at: nothing to attach (its exit is recorded).
            plan = plan.exited();
        }
        let libc = libc.ok();
        let timer = self.attach_timer(&plan, pid, libc.as_ref(), name);
        let mut attempts = Vec::new();
        for &source in &plan.read_write {
            let generation = self.watch_table.generation(pid);
            let result = self.attach_read_write(source, pid, exe.as_deref(), generation);
            let attached = result.is_ok();
            attempts.push((source, result));
            if attached || !process_alive(pid) {
                break;
            }
        }
        let read_write = policy::settle(&plan, &attempts);
        let (timer, mut notes) = timer;
        notes.extend(
            attempts
                .iter()
                .filter_map(|(source, r)| r.as_ref().err().map(|why| (source, why)))
                .map(|(source, why)| {
                    Note::vm(name, format!("{} source not used: {why}", source.label()))
                }),
        );
        let symbols = exe.as_ref().and_then(|e| e.symbols.as_ref().ok());
        let callbacks = match (&plan.callbacks, symbols) {
            (Ok(()), Some(symbols)) => self
                .symbols
                .attach_timers(
                    &mut self.ebpf,
                    pid,
                    symbols,
                    self.watch_table.generation(pid),
                )
                .map_err(|e| policy::CallbacksUnavailable::AttachFailed(format!("{e:#}"))),
            (Err(why), _) => Err(why.clone()),
            (Ok(()), None) => Err(policy::CallbacksUnavailable::SymbolsUnreadable(
                "no symbols".into(),
            )),
        };
        if let Err(why @ policy::CallbacksUnavailable::AttachFailed(_)) = &callbacks {
            notes.push(Note::vm(name, why.to_string()));
        }
        notes.append(&mut self.pending_notes);
        let names = NameSources::from_symbols(
            symbols,
            callbacks.is_ok(),
            read_write == Ok(ReadWriteSource::KvmTracepoints),
        );
        let sources = VmSources {
            read_write,
            callbacks,
            timer,
        };
        self.served.insert(
            pid,
            Served {
                sources: sources.clone(),
                exe: exe.clone(),
                libc,
                paused: false,
            },
        );
        Ok(WatchedVm {
            sources,
            names,
            notes,
        })
    }

    /// Attaches the plan's timer candidates to `pid` in order until one serves it; says which
    /// (or why none), with a note for each candidate that failed.
    fn attach_timer(
        &mut self,
        plan: &policy::SourcePlan,
        pid: u32,
        libc: Option<&LibcOffer>,
        name: &str,
    ) -> (Result<TimerSource, String>, Vec<Note>) {
        let mut attempts = Vec::new();
        for &source in &plan.timer {
            let result = match source {
                TimerSource::LibcUprobes | TimerSource::LibcEntryReturnUprobes => match libc {
                    Some(offer) => self.attach_libc(source, pid, offer),
                    None => Err(anyhow::anyhow!("no C library offer")),
                },
                TimerSource::SyscallTracepoints => {
                    self.acquire_shared(SharedWaits::Syscall, pid, watch_flag::WAITS_BY_SYSCALL)
                }
                TimerSource::HrtimerTracepoints => {
                    self.acquire_shared(SharedWaits::Hrtimer, pid, watch_flag::WAITS_BY_HRTIMER)
                }
            }
            .map_err(|e| format!("{e:#}"));
            let attached = result.is_ok();
            attempts.push((source, result));
            // A VM that exited meanwhile needs no fallback (and the tracepoints' attach and
            // detach would stall sampling for seconds).
            if attached || !process_alive(pid) {
                break;
            }
        }
        let notes = attempts
            .iter()
            .filter_map(|(source, r)| r.as_ref().err().map(|why| (source, why)))
            .map(|(source, why)| {
                Note::vm(
                    name,
                    format!("{} timer source not used: {why}", source.label()),
                )
            })
            .collect();
        (policy::settle_timer(plan, &attempts), notes)
    }

    fn set_watch_flags(&mut self, pid: u32, flags: u32) -> anyhow::Result<()> {
        let flags = flags | self.base_flags;
        let wait_block = self.counters.wait_block(pid);
        self.watch_table.set(&mut self.ebpf, pid, flags, wait_block)
    }

    /// Stops counting `pid` by shared tracepoints; the last user's links are closed in the
    /// background.
    fn release_shared(&mut self, shared: SharedWaits, pid: u32) {
        let links = match shared {
            SharedWaits::Syscall => self.syscall_waits.release(&mut self.ebpf, pid),
            SharedWaits::Hrtimer => self.hrtimer_waits.release(&mut self.ebpf, pid),
            SharedWaits::HrtimerStarts => self.hrtimer_waits.release_starts(&mut self.ebpf, pid),
        };
        if !links.is_empty() {
            self.detacher.submit(shared.job(), links);
        }
    }

    /// Counts `pid` by shared tracepoints (their programs act on `flags`), attaching them for
    /// their first user.
    fn acquire_shared(&mut self, shared: SharedWaits, pid: u32, flags: u32) -> anyhow::Result<()> {
        // Links still being closed from their last user would count twice.
        self.detacher.wait_for(shared.job());
        match shared {
            SharedWaits::Syscall => self.syscall_waits.acquire(&mut self.ebpf, pid),
            SharedWaits::Hrtimer => self.hrtimer_waits.acquire(&mut self.ebpf, pid),
            SharedWaits::HrtimerStarts => self.hrtimer_waits.acquire_starts(&mut self.ebpf, pid),
        }?;
        self.set_watch_flags(pid, flags)
            .inspect_err(|_| self.release_shared(shared, pid))
    }

    /// The libc source for `pid`, probed as `source` says: the result probes also need
    /// `timer:hrtimer_start` (it marks a ppoll that armed its timeout). All or nothing.
    fn attach_libc(
        &mut self,
        source: TimerSource,
        pid: u32,
        offer: &LibcOffer,
    ) -> anyhow::Result<()> {
        let how = source.libc_probes().context("not a libc source")?;
        if how == LibcProbes::Result {
            // Checked first: no tracepoint is attached for a library without result sites.
            offer.result_points()?;
            self.acquire_shared(
                SharedWaits::HrtimerStarts,
                pid,
                watch_flag::WAITS_BY_LIBC_RESULT,
            )
            .context("timer:hrtimer_start (tells a ppoll's timeout from a zero timeout)")?;
        }
        let generation = self.watch_table.generation(pid);
        self.libc
            .attach(&mut self.ebpf, pid, offer, how, generation)
            .inspect_err(|_| {
                if how == LibcProbes::Result {
                    self.release_shared(SharedWaits::HrtimerStarts, pid);
                    // Back to no source flags (the process stays watched: the next candidate
                    // sets its own).
                    let _ = self.set_watch_flags(pid, 0);
                }
            })
    }

    /// Stops counting `pid`'s waits, whichever source did.
    fn detach_timer(&mut self, pid: u32) {
        self.libc.detach(&mut self.ebpf, pid);
        self.release_shared(SharedWaits::Syscall, pid);
        self.release_shared(SharedWaits::Hrtimer, pid);
        self.release_shared(SharedWaits::HrtimerStarts, pid);
        if self.watched.contains(&pid) {
            let _ = self.set_watch_flags(pid, 0);
        }
    }

    /// Takes the uprobe links serving `pid` for the detacher (a budget pause); counters and
    /// tracepoints stay.
    fn pause_uprobes(&mut self, pid: u32, sources: &VmSources) -> Vec<detacher::Detach> {
        let mut items = Vec::new();
        if let Ok(Some(how)) = sources.timer.as_ref().map(|t| t.libc_probes()) {
            items.extend(self.libc.take(&mut self.ebpf, pid));
            if how == LibcProbes::Result {
                // `timer:hrtimer_start` is host-wide and stays attached: without the flag its
                // program returns at the watch-table load for this VM's timers, which would
                // otherwise cost it about half of a 0.1 % budget while its probes are away.
                let _ = self.set_watch_flags(pid, 0);
            }
        }
        items.extend(self.usdt.take(&mut self.ebpf, pid));
        items.extend(self.symbols.pause(&mut self.ebpf, pid));
        items
    }

    /// Attaches again what served `pid` before its pause, as links of `generation`.
    fn resume_uprobes(&mut self, pid: u32, served: &Served, generation: u32) -> anyhow::Result<()> {
        if let Ok(how) = served.sources.timer.as_ref().map(|t| t.libc_probes())
            && let (Some(how), Some(libc)) = (how, &served.libc)
        {
            // A ppoll's timer mark (or an entry) left while the probes were away must not
            // classify the thread's next wait.
            let tids = timers::thread_ids(pid);
            self.ppoll_marks.disarm_threads(pid, tids.iter().copied());
            timers::clear_pending(&mut self.ebpf, pid, tids);
            self.libc
                .attach(&mut self.ebpf, pid, libc, how, generation)?;
            if how == LibcProbes::Result {
                // Marks again (a wait in flight meanwhile is at worst one misclassified).
                self.set_watch_flags(pid, watch_flag::WAITS_BY_LIBC_RESULT)?;
            }
        }
        if served.sources.read_write == Ok(ReadWriteSource::Usdt) {
            self.attach_read_write(
                ReadWriteSource::Usdt,
                pid,
                served.exe.as_deref(),
                generation,
            )
            .map_err(anyhow::Error::msg)?;
        }
        // Dispatch, timer_mod and every callback discovered so far, as they were.
        self.symbols.resume(&mut self.ebpf, pid, generation)
    }

    /// What one uprobe hit costs a thread here: this process's own `ppoll`s, timed without
    /// and with the libc wait probes (the programs run in full: this process is watched as a
    /// budgeted VM). Two kinds of call: zero-timeout polls in a tight loop (a hit with hot
    /// caches: the floor), and polls that sleep 50 µs first (a hit after a sleep, as most of
    /// QEMU's are: cold caches and TLB make it several times dearer on nested virtualization,
    /// and a budget computed from the hot figure did not hold; the budget starts from the
    /// larger). Both
    /// by thread CPU time (preemption and the sleep are not costs), three interleaved tries of
    /// each; each kind's cost is its fastest probed try minus its fastest bare try, so a try
    /// an interrupt or a busy neighbour slowed drops out on either side. (The difference of
    /// each try's pair, once taken instead, went from 0.10 to 8.66 µs between runs here: one
    /// slowed bare try made the budget think a hit nearly free, and a VM never paused never
    /// teaches it otherwise.)
    fn measure_uprobe_hit_cost(&mut self) -> anyhow::Result<crate::budget::HitCost> {
        const TIGHT_CALLS: u32 = 5000;
        const SLEEPING_CALLS: u32 = 600;
        let pid = std::process::id();
        let offer = self
            .libc_catalog
            .offer(pid)
            .map_err(|why| anyhow::anyhow!("measuring the uprobe cost: {why}"))?;
        let time_calls = |calls: u32, nanos: i64| {
            let timeout = libc::timespec {
                tv_sec: 0,
                tv_nsec: nanos,
            };
            let now = || {
                let mut ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: a valid clock id and a pointer to a timespec.
                unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
                ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
            };
            let start = now();
            for _ in 0..calls {
                // SAFETY: no fds, a valid timespec, no signal mask.
                unsafe { libc::ppoll(std::ptr::null_mut(), 0, &timeout, std::ptr::null()) };
            }
            (now() - start) / f64::from(calls)
        };
        let _attaching = self.detacher.hold();
        // Watched as a budgeted VM is, so each hit runs the whole program (remember, classify,
        // the hit count), not only the early return of an unwatched process.
        let wait_block = self.counters.wait_block(pid);
        let generation = link_generation::FIRST;
        self.watch_table
            .set_generation(&mut self.ebpf, pid, generation)?;
        self.watch_table
            .set(&mut self.ebpf, pid, watch_flag::COUNT_HITS, wait_block)?;
        // The probes the libc source would use here: one hit per call at the result, two at
        // entry and return.
        let (how, hits) = match offer.result_points() {
            Ok(_) => (LibcProbes::Result, 1.0),
            Err(_) => (LibcProbes::EntryReturn, 2.0),
        };
        // Fastest (tight, sleeping) per call, bare and probed.
        let mut bare = (f64::INFINITY, f64::INFINITY);
        let mut probed = (f64::INFINITY, f64::INFINITY);
        let fastest = |best: &mut (f64, f64), tight: f64, sleeping: f64| {
            best.0 = best.0.min(tight);
            best.1 = best.1.min(sleeping);
        };
        let mut result = Ok(());
        for _ in 0..3 {
            fastest(
                &mut bare,
                time_calls(TIGHT_CALLS, 0),
                time_calls(SLEEPING_CALLS, 50_000),
            );
            if let Err(e) = self
                .libc
                .attach(&mut self.ebpf, pid, &offer, how, generation)
            {
                result = Err(e);
                break;
            }
            fastest(
                &mut probed,
                time_calls(TIGHT_CALLS, 0),
                time_calls(SLEEPING_CALLS, 50_000),
            );
            self.libc.detach(&mut self.ebpf, pid);
        }
        self.watch_table.remove(&mut self.ebpf, pid)?;
        self.forget_counters(pid)?;
        result?;
        Ok(crate::budget::HitCost {
            tight: ((probed.0 - bare.0) / hits).max(1e-9),
            after_sleep: ((probed.1 - bare.1) / hits).max(1e-9),
        })
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
        forget_region_keys::<RegionName>(&mut self.ebpf, "REGION_NAMES", pid);
        self.region_labels.remove(&pid);
        forget_region_keys::<u64>(&mut self.ebpf, symbols::SEEN_CALLBACKS_MAP, pid);
        timers::forget_process(&mut self.ebpf, pid);
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
    fn watch(&mut self, vm: &QemuProcess) -> anyhow::Result<WatchedVm> {
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

    fn replan(&mut self, vm: &QemuProcess) -> anyhow::Result<WatchedVm> {
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
        // Closing a uprobe link waits for a grace period (about a second here for a QEMU's
        // links): off the sampling thread, or a VM that lives a second is never seen.
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
        let Some(served) = self.served.get(&pid).cloned() else {
            return Ok(Duration::ZERO);
        };
        if served.paused != on {
            return Ok(Duration::ZERO);
        }
        let generation = self.watch_table.generation(pid);
        if !on {
            // Its links stop counting at once (each run until it is closed, a grace period
            // later in the background, counts as a closing hit and nothing else).
            self.watch_table.set_generation(
                &mut self.ebpf,
                pid,
                link_generation::next(generation),
            )?;
            let items = self.pause_uprobes(pid, &served.sources);
            self.detacher.submit(pid, items);
            if let Some(s) = self.served.get_mut(&pid) {
                s.paused = true;
            }
            return Ok(Duration::ZERO);
        }
        // New links of the next generation, beside the old ones still being closed (those no
        // longer count); they count once every one of them is in.
        let live = link_generation::next(generation);
        let started = std::time::Instant::now();
        let attaching = self.detacher.hold();
        let resumed = self.resume_uprobes(pid, &served, live);
        drop(attaching);
        if let Err(e) = resumed {
            // Half a resume is no resume: leave it paused and say why.
            let items = self.pause_uprobes(pid, &served.sources);
            self.detacher.submit(pid, items);
            return Err(e);
        }
        self.watch_table.set_generation(&mut self.ebpf, pid, live)?;
        if let Some(s) = self.served.get_mut(&pid) {
            s.paused = false;
        }
        Ok(started.elapsed())
    }

    fn uprobe_hit_cost(&mut self) -> anyhow::Result<crate::budget::HitCost> {
        self.measure_uprobe_hit_cost()
    }

    fn dropped(&self) -> Vec<(&'static str, u64)> {
        use profiler_common::dropped;
        let Some(Ok(array)) = self
            .ebpf
            .map("DROPPED")
            .map(PerCpuArray::<&MapData, u64>::try_from)
        else {
            return Vec::new();
        };
        (0..dropped::SLOTS)
            .map(|slot| {
                let total = array
                    .get(&slot, 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
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
        let e = &self.ebpf;
        vec![
            ("COUNTERS", self.counters.known(), MAX_COUNTERS),
            ("WATCHED", self.watch_table.len(), MAX_WATCHED),
            (
                "PENDING",
                count_entries::<u32, PendingWait>(e, timers::PENDING_MAP),
                MAX_PENDING,
            ),
            (
                "SLEEPERS",
                count_entries::<u64, profiler_common::Sleeper>(e, hrtimers::SLEEPERS_MAP),
                MAX_PENDING,
            ),
            (
                "REGION_NAMES",
                count_entries::<RegionKey, RegionName>(e, "REGION_NAMES"),
                MAX_REGION_NAMES,
            ),
            (
                "USDT_SPECS",
                count_entries::<u32, UsdtSpec>(e, usdt::SPECS_MAP),
                MAX_USDT_SPECS,
            ),
            (
                "SEEN_CALLBACKS",
                count_entries::<RegionKey, u64>(e, symbols::SEEN_CALLBACKS_MAP),
                MAX_REGION_NAMES,
            ),
            (
                "KVM_THREADS",
                count_entries::<u32, KvmThreadState>(e, kvm::THREADS_MAP),
                MAX_KVM_THREADS,
            ),
            (
                "KVM_PORTS",
                count_entries::<PortKey, u32>(e, kvm::PORTS_MAP),
                MAX_KVM_PORTS,
            ),
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
        let factor = stats_scale(
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

/// What the counts sampled over `on` of `elapsed` seconds are multiplied by to cover the whole
/// run; 1 when the statistics were on all along (`host_wide`: the
/// `kernel.bpf_stats_enabled` sysctl), or never.
fn stats_scale(elapsed: f64, on: f64, host_wide: bool) -> f64 {
    if host_wide || on <= 0.0 {
        1.0
    } else {
        (elapsed / on).max(1.0)
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

/// What `profiler list` shows for a VM: the plan, without attaching anything.
#[derive(Debug, Clone)]
pub struct OfferedSources {
    pub sources: VmSources,
    /// Where the symbols come from, or why there are none.
    pub symbols: String,
}

/// The plan for `vm` from what its binary offers (read through `catalog`) and whether the KVM
/// tracepoints can be used (`kvm`, see [`kvm::offered`]): what `record` will attach.
pub fn offered_sources(
    catalog: &mut ExeCatalog,
    libc_catalog: &mut LibcCatalog,
    timer_choice: TimerChoice,
    vm: &QemuProcess,
    kvm: &Result<(), String>,
) -> OfferedSources {
    let (binary, exe) = catalog.offer(vm.key.pid);
    let offer = ProcessOffer {
        binary,
        libc: libc_catalog.offer(vm.key.pid).map(|_| ()),
        timer_choice,
    };
    let plan = policy::plan(&offer, vm.identity.accel, kvm);
    OfferedSources {
        sources: plan.expected(),
        symbols: match (&exe, &offer.binary) {
            (Some(exe), _) => exe.describe_symbols(),
            (None, policy::BinaryOffer::Unreadable(why)) => why.clone(),
            (None, _) => String::new(),
        },
    }
}

#[cfg(test)]
mod stats_scale_tests {
    use super::stats_scale;

    #[test]
    fn sampled_statistics_scale_to_the_run_unless_on_all_along() {
        // On for 3 s of 30: ten times what was measured.
        assert_eq!(stats_scale(30.0, 3.0, false), 10.0);
        // The sysctl kept them on: already the whole run.
        assert_eq!(stats_scale(30.0, 3.0, true), 1.0);
        // Never on, or on longer than the run by clock skew: never below 1.
        assert_eq!(stats_scale(30.0, 0.0, false), 1.0);
        assert_eq!(stats_scale(30.0, 31.0, false), 1.0);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! Root tests on the real kernel: an attach that fails part-way leaves nothing behind.

    use std::{
        process::{Child, Command},
        sync::Arc,
    };

    use aya::maps::HashMap as BpfHashMap;
    use object::{Object as _, ObjectSegment as _};
    use profiler_common::{USDT_MAX_ARGS, UsdtArgSpec, UsdtSpec, kind};

    use super::{
        symbols::{DISPATCH_PROGRAM, SymbolSource},
        uprobes::UprobePoint,
        usdt::{self, SPECS_MAP, SiteToAttach, UsdtSource},
        *,
    };

    /// A process to attach to: `sleep`, killed on drop.
    struct Sleeper(Child);

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// (`sleep`, the file offset of its entry point: a valid uprobe site).
    fn sleeper() -> (Sleeper, u64) {
        let child = Command::new("sleep").arg("60").spawn().expect("sleep runs");
        let pid = child.id();
        // exec is done once /proc/PID/exe points at sleep and sleep is mapped: execve sets
        // the exe link before it maps the new binary, and a busy host may stop it between.
        let mapped = || {
            let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
                return false;
            };
            exe.to_string_lossy().ends_with("sleep")
                && std::fs::read_to_string(format!("/proc/{pid}/maps"))
                    .is_ok_and(|maps| maps.lines().any(|l| l.ends_with(&*exe.to_string_lossy())))
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !mapped() {
            assert!(std::time::Instant::now() < deadline, "sleep never started");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let bytes = std::fs::read(format!("/proc/{pid}/exe")).unwrap();
        let elf = object::File::parse(&*bytes).unwrap();
        let entry = elf.entry();
        let offset = elf
            .segments()
            .find_map(|s| {
                let (start, size) = (s.address(), s.size());
                let (file_off, _) = s.file_range();
                (start..start + size)
                    .contains(&entry)
                    .then(|| file_off + (entry - start))
            })
            .expect("entry point in a segment");
        (Sleeper(child), offset)
    }

    /// Our perf events and BPF links: each attached uprobe holds one of each.
    fn probe_fds() -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter(|t| {
                let t = t.to_string_lossy();
                t == "anon_inode:[perf_event]" || t == "anon_inode:bpf_link"
            })
            .count()
    }

    fn spec_entries(ebpf: &mut Ebpf) -> usize {
        let map: BpfHashMap<&MapData, u32, UsdtSpec> =
            BpfHashMap::try_from(ebpf.map(SPECS_MAP).unwrap()).unwrap();
        map.keys().count()
    }

    fn spec() -> UsdtSpec {
        UsdtSpec {
            args: [UsdtArgSpec::default(); USDT_MAX_ARGS],
            arg_count: 6,
            kind: kind::READ,
            region_arg: 1,
            name_arg: 5,
        }
    }

    /// Root tests that attach probes run one at a time: these tests count the process's
    /// perf-event descriptors, which any other attaching test would change under them.
    pub(crate) static ATTACHING: std::sync::Mutex<()> = std::sync::Mutex::new(());

    pub(crate) fn attaching() -> std::sync::MutexGuard<'static, ()> {
        ATTACHING.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn root_ebpf(test: &str) -> Option<Ebpf> {
        xtask::prereq::Prereq::new(test).root()?;
        crate::tracefs::ensure_tracefs().expect("tracefs");
        Some(Ebpf::load(EBPF_OBJECT).expect("loading the eBPF object"))
    }

    /// The symbols analysis of process `pid`'s executable.
    fn analyzed_exe(pid: u32) -> Arc<symbols::ExeSymbols> {
        Arc::new(
            symbols::analyze(
                &std::fs::read_link(format!("/proc/{pid}/exe")).unwrap(),
                &crate::elf::DebugRoots::system(),
            )
            .unwrap(),
        )
    }

    /// Two dispatch points, cookies 1 and 2.
    fn two_points(first: u64, second: u64) -> [UprobePoint; 2] {
        [
            UprobePoint {
                file_offset: first,
                cookie: 1,
            },
            UprobePoint {
                file_offset: second,
                cookie: 2,
            },
        ]
    }

    /// `n` zero-timeout `ppoll`s of this thread.
    fn zero_timeout_polls(n: u32) {
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        for _ in 0..n {
            // SAFETY: no fds, a valid timespec, no signal mask.
            unsafe { libc::ppoll(std::ptr::null_mut(), 0, &zero, std::ptr::null()) };
        }
    }

    /// This process's libc offer (with result sites), the libc source, counters and watch
    /// table, on `ebpf`.
    fn own_libc_fixture(
        ebpf: &mut Ebpf,
    ) -> (
        LibcOffer,
        LibcWaitSource,
        counters::CounterStore,
        watch_table::WatchTable,
    ) {
        let offer = LibcCatalog::default().offer(std::process::id()).unwrap();
        offer.result_points().expect("this glibc's wait results");
        let libc = LibcWaitSource::load(ebpf).unwrap();
        let counters = counters::CounterStore::open(ebpf).unwrap();
        let table = watch_table::WatchTable::open(ebpf).unwrap();
        (offer, libc, counters, table)
    }

    #[test]
    fn root_a_watched_process_is_counted_in_its_slot_in_the_overflow_hash_and_keyed() {
        use profiler_common::{WATCH_SLOTS, wait_block, wait_syscall};
        let _one_at_a_time = attaching();
        let Some(mut ebpf) = root_ebpf("root_watch_table") else {
            return;
        };
        let pid = std::process::id();
        let (offer, mut libc, mut counters, mut table) = own_libc_fixture(&mut ebpf);
        libc.attach(&mut ebpf, pid, &offer, LibcProbes::Result, 0)
            .unwrap();
        let polls = zero_timeout_polls;
        let counted = |counters: &mut counters::CounterStore, ebpf: &Ebpf| -> u64 {
            counters
                .read(ebpf)
                .unwrap()
                .iter()
                .filter(|(k, _)| {
                    k.tgid == pid && k.kind == kind::NONBLOCKING_POLL && k.id == wait_syscall::PPOLL
                })
                .map(|(_, n)| n)
                .sum()
        };
        let flags = watch_flag::WAITS_BY_LIBC_RESULT;
        polls(100);
        assert_eq!(counted(&mut counters, &ebpf), 0, "not watched yet");
        // In its own slot, counted in its wait block.
        let block = counters.wait_block(pid);
        assert_ne!(block, wait_block::NONE);
        table.set(&mut ebpf, pid, flags, block).unwrap();
        polls(1000);
        assert_eq!(counted(&mut counters, &ebpf), 1000, "in its slot");
        table.remove(&mut ebpf, pid).unwrap();
        counters.forget(&mut ebpf, pid).unwrap();
        polls(100);
        assert_eq!(counted(&mut counters, &ebpf), 0, "forgotten");
        // Its slot held by another process: in the hash, found through the slot's mark.
        let other = pid + WATCH_SLOTS;
        table.set(&mut ebpf, other, 0, wait_block::NONE).unwrap();
        let block = counters.wait_block(pid);
        table.set(&mut ebpf, pid, flags, block).unwrap();
        polls(1000);
        assert_eq!(counted(&mut counters, &ebpf), 1000, "in the overflow hash");
        table.remove(&mut ebpf, pid).unwrap();
        counters.forget(&mut ebpf, pid).unwrap();
        polls(100);
        assert_eq!(counted(&mut counters, &ebpf), 0, "overflow forgotten");
        // Without a wait block (the store was full): keyed like any counter.
        table.set(&mut ebpf, pid, flags, wait_block::NONE).unwrap();
        polls(500);
        assert_eq!(counted(&mut counters, &ebpf), 500, "keyed");
        libc.detach(&mut ebpf, pid);
        table.remove(&mut ebpf, pid).unwrap();
        table.remove(&mut ebpf, other).unwrap();
        counters.forget(&mut ebpf, pid).unwrap();
    }

    /// A budget pause: the links of the VM's generation stop counting the moment its
    /// generation moves on (their runs are closing hits), and a resume's new links count
    /// beside the old ones, still attached, without counting twice.
    #[test]
    fn root_a_paused_generations_links_count_nothing_and_a_resume_counts_once() {
        use profiler_common::{link_generation, wait_syscall};
        let _one_at_a_time = attaching();
        let Some(mut ebpf) = root_ebpf("root_link_generations") else {
            return;
        };
        let pid = std::process::id();
        let (offer, mut libc, mut counters, mut table) = own_libc_fixture(&mut ebpf);
        let polls = zero_timeout_polls;
        let count = |counters: &mut counters::CounterStore, ebpf: &Ebpf, kind: u32| -> u64 {
            counters
                .read(ebpf)
                .unwrap()
                .iter()
                .filter(|(k, _)| k.tgid == pid && k.kind == kind)
                .map(|(_, n)| n)
                .sum()
        };
        let first = link_generation::FIRST;
        table.set_generation(&mut ebpf, pid, first).unwrap();
        let block = counters.wait_block(pid);
        let flags = watch_flag::WAITS_BY_LIBC_RESULT | watch_flag::COUNT_HITS;
        table.set(&mut ebpf, pid, flags, block).unwrap();
        libc.attach(&mut ebpf, pid, &offer, LibcProbes::Result, first)
            .unwrap();
        polls(1000);
        let polled = |c: &mut counters::CounterStore, e: &Ebpf| count(c, e, kind::NONBLOCKING_POLL);
        assert_eq!(polled(&mut counters, &ebpf), 1000, "live");
        assert_eq!(count(&mut counters, &ebpf, kind::UPROBE_HIT), 1000);
        assert_eq!(count(&mut counters, &ebpf, kind::CLOSING_HIT), 0);
        // Paused, the links still attached (as while the detacher closes them).
        let paused = link_generation::next(first);
        table.set_generation(&mut ebpf, pid, paused).unwrap();
        let old = libc.take(&mut ebpf, pid);
        polls(700);
        assert_eq!(
            polled(&mut counters, &ebpf),
            1000,
            "a paused link counts nothing"
        );
        assert_eq!(count(&mut counters, &ebpf, kind::UPROBE_HIT), 1000);
        assert_eq!(count(&mut counters, &ebpf, kind::CLOSING_HIT), 700);
        // Resumed before the old links are closed: each poll counted once, by the new link.
        let live = link_generation::next(paused);
        libc.attach(&mut ebpf, pid, &offer, LibcProbes::Result, live)
            .unwrap();
        table.set_generation(&mut ebpf, pid, live).unwrap();
        polls(500);
        assert_eq!(polled(&mut counters, &ebpf), 1500, "counted once");
        assert_eq!(count(&mut counters, &ebpf, kind::UPROBE_HIT), 1500);
        assert_eq!(
            count(&mut counters, &ebpf, kind::CLOSING_HIT),
            1200,
            "the old links ran"
        );
        let ppolls = counters
            .read(&ebpf)
            .unwrap()
            .iter()
            .filter(|(k, _)| k.tgid == pid && k.id == wait_syscall::PPOLL)
            .count();
        assert!(ppolls > 0, "ppoll counters present");
        drop(old);
        polls(300);
        assert_eq!(polled(&mut counters, &ebpf), 1800);
        assert_eq!(
            count(&mut counters, &ebpf, kind::CLOSING_HIT),
            1200,
            "old links gone"
        );
        libc.detach(&mut ebpf, pid);
        table.remove(&mut ebpf, pid).unwrap();
        counters.forget(&mut ebpf, pid).unwrap();
    }

    #[test]
    fn root_ppoll_timer_marks_are_exact_in_the_thread_slot_and_in_pending() {
        use profiler_common::{MARK_SLOTS, PpollMark, mark_slot, wait_syscall};
        use std::{mem::offset_of, sync::atomic::Ordering};
        let _one_at_a_time = attaching();
        let Some(mut ebpf) = root_ebpf("root_ppoll_marks") else {
            return;
        };
        let pid = std::process::id();
        // SAFETY: no arguments.
        let tid = unsafe { libc::gettid() } as u32;
        let offer = LibcCatalog::default().offer(pid).unwrap();
        let tracefs = crate::tracefs::ensure_tracefs().unwrap();
        let mut libc = LibcWaitSource::load(&mut ebpf).unwrap();
        let mut hrtimers = hrtimers::HrtimerWaits::load(&mut ebpf, &tracefs);
        let mut counters = counters::CounterStore::open(&ebpf).unwrap();
        let mut table = watch_table::WatchTable::open(&ebpf).unwrap();
        hrtimers.acquire_starts(&mut ebpf, pid).unwrap();
        let block = counters.wait_block(pid);
        table
            .set(&mut ebpf, pid, watch_flag::WAITS_BY_LIBC_RESULT, block)
            .unwrap();
        libc.attach(&mut ebpf, pid, &offer, LibcProbes::Result, 0)
            .unwrap();
        // Timed-out ppolls (a timer) alternate with zero-timeout ones: each mark is consumed
        // by its own wait's result.
        let waits = |n: u32| {
            for _ in 0..n {
                for nanos in [200_000, 0] {
                    let timeout = libc::timespec {
                        tv_sec: 0,
                        tv_nsec: nanos,
                    };
                    // SAFETY: no fds, a valid timespec, no signal mask.
                    unsafe { libc::ppoll(std::ptr::null_mut(), 0, &timeout, std::ptr::null()) };
                }
            }
        };
        let ppolls = |counters: &mut counters::CounterStore, ebpf: &Ebpf| -> (u64, u64) {
            let counts = counters.read(ebpf).unwrap();
            let of = |kind| {
                counts
                    .iter()
                    .filter(|(k, _)| k.tgid == pid && k.kind == kind && k.id == wait_syscall::PPOLL)
                    .map(|(_, n)| n)
                    .sum()
            };
            (of(kind::TIMER), of(kind::NONBLOCKING_POLL))
        };
        waits(200);
        assert_eq!(
            ppolls(&mut counters, &ebpf),
            (200, 200),
            "in the thread's slot"
        );
        let marks =
            mapped::MappedArray::map(&ebpf, timers::MARKS_MAP, MARK_SLOTS, size_of::<PpollMark>())
                .unwrap();
        let owner = marks
            .u64_at(mark_slot(tid), offset_of!(PpollMark, owner))
            .unwrap();
        let armed = marks
            .u64_at(mark_slot(tid), offset_of!(PpollMark, armed))
            .unwrap();
        assert_eq!(owner.load(Ordering::Relaxed), PpollMark::owner_of(tid, pid));
        let ppoll_marks = timers::PpollMarks::open(&ebpf).unwrap();
        // A mark left behind (as by a wait in flight when a budget pause took the probes) is
        // disarmed on resume; the slot stays the thread's.
        armed.store(1, Ordering::Relaxed);
        ppoll_marks.disarm_threads(pid, [tid]);
        assert_eq!(armed.load(Ordering::Relaxed), 0);
        assert_eq!(owner.load(Ordering::Relaxed), PpollMark::owner_of(tid, pid));
        // Forgetting the process frees its threads' slots.
        ppoll_marks.free_process(pid);
        assert_eq!(owner.load(Ordering::Relaxed), 0);
        // The slot held by another thread: the marks go to `PENDING`, as exact.
        let other = PpollMark::owner_of(tid.wrapping_add(MARK_SLOTS), pid + 1);
        owner.store(other, Ordering::Relaxed);
        waits(200);
        assert_eq!(ppolls(&mut counters, &ebpf), (400, 400), "in PENDING");
        assert_eq!(owner.load(Ordering::Relaxed), other, "not claimed");
        // A mark left in `PENDING` is cleared on resume too, and the entry kept.
        let pending_of = |ebpf: &Ebpf| {
            aya::maps::HashMap::<_, u32, profiler_common::PendingWait>::try_from(
                ebpf.map(timers::PENDING_MAP).unwrap(),
            )
            .unwrap()
            .get(&tid, 0)
            .unwrap()
        };
        let left = profiler_common::PendingWait {
            syscall: wait_syscall::PPOLL,
            ..pending_of(&ebpf)
        };
        aya::maps::HashMap::<_, u32, profiler_common::PendingWait>::try_from(
            ebpf.map_mut(timers::PENDING_MAP).unwrap(),
        )
        .unwrap()
        .insert(tid, left, 0)
        .unwrap();
        timers::clear_pending(&mut ebpf, pid, [tid]);
        assert_eq!(pending_of(&ebpf).syscall, wait_syscall::NONE);
        owner.store(0, Ordering::Relaxed);
        libc.detach(&mut ebpf, pid);
        drop(hrtimers.release_starts(&mut ebpf, pid));
        table.remove(&mut ebpf, pid).unwrap();
        timers::forget_process(&mut ebpf, pid);
        counters.forget(&mut ebpf, pid).unwrap();
    }

    #[test]
    fn root_a_budget_pause_detaches_every_symbols_link_and_resume_brings_them_back() {
        let _one_at_a_time = attaching();
        let Some(mut ebpf) = root_ebpf("root_a_budget_pause_detaches_every_symbols_link") else {
            return;
        };
        let mut symbols = SymbolSource::load(&mut ebpf).unwrap();
        let (sleeper, entry) = sleeper();
        let pid = sleeper.0.id();
        let exe = analyzed_exe(pid);
        let before = probe_fds();
        let points = two_points(entry, entry);
        symbols
            .attach_dispatch_at(&mut ebpf, pid, &exe, &points, 0)
            .unwrap();
        let attached = probe_fds();
        assert!(attached > before);
        for _ in 0..3 {
            // The links are handed out, to be closed elsewhere; closing them detaches.
            drop(symbols.pause(&mut ebpf, pid));
            assert_eq!(probe_fds(), before, "a link survived the pause");
            assert!(!symbols.dispatch_attached(pid));
            symbols.resume(&mut ebpf, pid, 0).unwrap();
            assert_eq!(probe_fds(), attached, "resume brings back what was there");
            assert!(symbols.dispatch_attached(pid));
        }
        symbols.detach(&mut ebpf, pid);
        assert_eq!(probe_fds(), before);
    }

    #[test]
    fn the_fd_limit_is_raised_to_the_hard_limit() {
        let now = raise_fd_limit();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: a valid struct.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!((now, lim.rlim_cur), (lim.rlim_max, lim.rlim_max));
    }

    #[test]
    fn capabilities_missing_by_name() {
        let status = "Name:\tprofiler\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert!(missing_caps(0x1ff_ffff_ffff).is_empty());
        let no_bpf = 0x1ff_ffff_ffff & !(1 << 39) & !(1 << 38);
        let missing: Vec<&str> = missing_caps(no_bpf).iter().map(|m| m.0).collect();
        assert_eq!(missing, ["CAP_BPF", "CAP_PERFMON"]);
        assert_eq!(missing_caps(0).len(), 4);
        assert_eq!(parse_cap_eff("CapEff: zz"), None);
    }

    #[test]
    fn root_a_usdt_attach_that_fails_part_way_leaves_nothing() {
        let _one_at_a_time = attaching();
        let Some(mut ebpf) = root_ebpf("root_a_usdt_attach_that_fails_part_way_leaves_nothing")
        else {
            return;
        };
        let mut usdt = UsdtSource::load(&mut ebpf).unwrap();
        let (sleeper, entry) = sleeper();
        let pid = sleeper.0.id();
        let before = probe_fds();

        // The first site attaches; the second is past the end of the file.
        let site = |file_offset, semaphore_file_offset| SiteToAttach {
            file_offset,
            spec: spec(),
            semaphore_file_offset,
            semaphore_address: None,
        };
        let sites = [site(entry, None), site(1 << 40, None)];
        let err = usdt.attach_sites(&mut ebpf, pid, &sites, 0).unwrap_err();
        assert!(
            format!("{err:#}").contains("file offset 0x10000000000"),
            "{err:#}"
        );
        assert_eq!(probe_fds(), before, "a uprobe was left attached");
        assert_eq!(spec_entries(&mut ebpf), 0, "a spec was left in {SPECS_MAP}");
        assert!(!usdt.is_attached(pid));

        // The first site attaches, the second's semaphore cannot be one (an odd offset).
        let err = usdt
            .attach_sites(
                &mut ebpf,
                pid,
                &[site(entry, None), site(entry, Some(0x1001))],
                0,
            )
            .unwrap_err();
        assert!(format!("{err:#}").contains("semaphore"), "{err:#}");
        assert_eq!(probe_fds(), before);
        assert_eq!(spec_entries(&mut ebpf), 0);

        // And a good attach holds its uprobe and its spec, until detached.
        let how = usdt.attach_sites(&mut ebpf, pid, &sites[..1], 0).unwrap();
        assert_eq!(how, usdt::SemaphoreManagement::Kernel);
        assert!(probe_fds() > before);
        assert_eq!(spec_entries(&mut ebpf), 1);
        usdt.detach(&mut ebpf, pid);
        assert_eq!(probe_fds(), before);
        assert_eq!(spec_entries(&mut ebpf), 0);
    }

    #[test]
    fn root_a_symbols_attach_that_fails_part_way_leaves_nothing() {
        let _one_at_a_time = attaching();
        let Some(mut ebpf) = root_ebpf("root_a_symbols_attach_that_fails_part_way_leaves_nothing")
        else {
            return;
        };
        let mut symbols = SymbolSource::load(&mut ebpf).unwrap();
        let (sleeper, entry) = sleeper();
        let pid = sleeper.0.id();
        let exe = analyzed_exe(pid);
        let before = probe_fds();
        // The second is past the end of the file.
        let points = two_points(entry, 1 << 40);
        assert!(
            symbols
                .attach_dispatch_at(&mut ebpf, pid, &exe, &points, 0)
                .is_err()
        );
        assert_eq!(probe_fds(), before, "a {DISPATCH_PROGRAM} uprobe was left");
        assert!(!symbols.dispatch_attached(pid));
        symbols
            .attach_dispatch_at(&mut ebpf, pid, &exe, &points[..1], 0)
            .unwrap();
        assert!(symbols.dispatch_attached(pid));
        symbols.detach(&mut ebpf, pid);
        assert_eq!(probe_fds(), before);
    }
}
