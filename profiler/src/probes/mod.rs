//! The probe layer: what the kernel counts for each watched VM, handed out as raw counters.
//!
//! Its folders draw its layers: [`kernel`] is the plumbing every source shares (the eBPF
//! object, per-process uprobes opened by hand, all-or-nothing links, the detacher, tracepoint
//! groups, the counter store and the watch table); [`sources`] has one file per probe source
//! (hrtimers, libc waits, syscall waits, USDT, symbols, KVM, execs), each owning its links and
//! per-process state; [`EventProbes`] attaches what the source policy ([`crate::offer::policy`])
//! picks for each VM. What the counters mean is decided above, by [`crate::attribution`].
//!
//! [`ProbeLayer`] is the seam the session works through, so the session is tested on fake
//! counters (`crate::windows::session` tests) and this layer on the real kernel (root tests).

mod event_probes;
pub mod host;
pub mod kernel;
pub mod sources;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use profiler_common::kind;

pub use self::event_probes::EventProbes;
use crate::{
    identity::discovery::QemuProcess,
    note::Note,
    offer::{
        policy::{TimerChoice, VmSources},
        symbols::{CallbackNamer, ExeSymbols, OwnerLayout},
    },
};

/// The name a read/write probe read for a `MemoryRegion`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegionLabel {
    Named(String),
    /// A region without a name: one of QEMU's subpages, which dispatch the same access again
    /// to the real region (seen by the symbols source only).
    Unnamed,
}

/// One process's counters as the probes keep them, cumulative since it was first watched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawCounters {
    /// (kind, id) -> count, summed over CPUs. Kinds: `profiler_common::kind` and the KVM
    /// kinds of `profiler_common::kvm`.
    pub by_key: BTreeMap<(u32, u64), u64>,
    /// `MemoryRegion` pointer -> its name, for read/write ids.
    pub regions: HashMap<u64, RegionLabel>,
}

impl RawCounters {
    /// Total of one kind over all ids.
    pub fn total(&self, kind: u32) -> u64 {
        self.by_key
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|(_, n)| n)
            .sum()
    }

    /// The region ids the read/write probes counted.
    pub fn region_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.by_key
            .keys()
            .filter(|(k, _)| *k == kind::READ || *k == kind::WRITE)
            .map(|&(_, id)| id)
    }

    /// The timer callback addresses counted.
    pub fn callback_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.by_key
            .keys()
            .filter(|(k, _)| *k == kind::TIMER_CALLBACK)
            .map(|&(_, id)| id)
    }
}

/// What the probe layer knows that names can be resolved from, for one VM.
#[derive(Debug, Clone, Default)]
pub struct NameSources {
    /// Timer callback names (QEMU's symbols), when callbacks are counted.
    pub callbacks: Option<Arc<dyn CallbackNamer>>,
    /// How to follow `mr->owner` to a QOM type name (QEMU's DWARF).
    pub owner_layout: Option<OwnerLayout>,
    /// Fetch the VM's memory map over QMP: its reads/writes are counted by port and page.
    pub address_map: bool,
    /// The names of VM exit reasons, as this kernel's `kvm:kvm_exit` prints them.
    pub exit_reasons: Option<Arc<crate::offer::kvm::ExitReasonNames>>,
}

impl NameSources {
    pub fn from_symbols(
        symbols: Option<&Arc<ExeSymbols>>,
        callbacks: bool,
        address_map: bool,
    ) -> Self {
        Self {
            callbacks: symbols
                .filter(|_| callbacks)
                .map(|s| s.clone() as Arc<dyn CallbackNamer>),
            owner_layout: symbols.and_then(|s| s.owner_layout),
            address_map,
            exit_reasons: None,
        }
    }
}

/// What one uprobe hit cost the profiler's own thread at start-up, seconds of its CPU.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HitCost {
    /// In a tight loop of zero-timeout polls: hot caches, the least a trap costs.
    pub tight: f64,
    /// On polls that slept first, as most of QEMU's do: cold caches, dearer (and noisier: a
    /// slowed try can make it several times the tight figure).
    pub after_sleep: f64,
}

impl HitCost {
    /// The figure to start from: the larger.
    pub fn start(&self) -> f64 {
        self.tight.max(self.after_sleep)
    }
}

/// The profiler's own cost in the kernel, from BPF run-time statistics.
///
/// While statistics are on, the kernel times every BPF program run on the host (two clock
/// reads per run: a sizeable share of a USDT event's cost, `xtask bench events`), so
/// the profiler turns them on for one refresh in [`kernel::stats::STATS_EVERY`] and scales what it measured
/// to the whole run: an estimate from a 1-in-10 sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProbeCost {
    pub run_count: u64,
    pub run_time: Duration,
}

/// The [`ProbeLayer::dropped`] entry of program runs the kernel skipped as nested (see
/// [`kernel::prog_info`]); the others are maps.
pub const NESTED_RUNS: &str = "nested runs";

/// What watching one VM attached: the sources that serve it, what its names come from, and
/// why a source the policy picked could not be used.
#[derive(Debug, Clone)]
pub struct AttachedVm {
    pub sources: VmSources,
    /// What its devices and callbacks can be named from.
    pub names: NameSources,
    /// Why a source the policy picked could not be used, and the like.
    pub notes: Vec<Note>,
}

/// The probes as the session sees them.
pub trait ProbeLayer {
    /// Starts counting `vm`'s events from zero, attaching the sources the policy picks.
    fn watch(&mut self, vm: &QemuProcess) -> anyhow::Result<AttachedVm>;
    /// Chooses `vm`'s sources again (its accelerator turned out different from what it was
    /// when first seen: QEMU opens `/dev/kvm` while it starts), keeping its counters.
    fn replan(&mut self, vm: &QemuProcess) -> anyhow::Result<AttachedVm>;
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
    fn uprobe_hit_cost(&mut self) -> anyhow::Result<HitCost> {
        anyhow::bail!("this probe layer cannot measure uprobe costs")
    }
    /// The PIDs that exec'd since the last call, for discovery (`None`: not watched, or
    /// some were lost).
    fn take_execs(&mut self) -> Option<Vec<u32>> {
        None
    }
    /// The host's busy nanoseconds (all CPUs) from the scheduler's idle time, from an
    /// arbitrary origin; `None` when not measured (then `/proc/stat` is the figure).
    fn host_busy_ns(&self) -> Option<u64> {
        None
    }
}

/// What the user chose about the probes.
#[derive(Debug, Clone, Default)]
pub struct ProbeOptions {
    /// Where QEMU debug files are searched.
    pub debug_roots: crate::offer::elf::DebugRoots,
    /// Which timer sources may be used.
    pub timer_choice: TimerChoice,
    /// `--max-overhead`: percent of a core each VM's uprobes may cost (applied by the session).
    pub max_overhead: Option<f64>,
    /// How uprobes are linked.
    pub uprobe_links: crate::offer::policy::UprobeLinkChoice,
    /// `--vm`/`--pid` select some VMs: links per binary would trap in the others too.
    pub selective: bool,
}
