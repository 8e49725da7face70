//! Loading the eBPF programs, keeping the watched-process set current, and reading counters.
//!
//! One file per probe family (kunai style); this module owns the shared maps.

pub mod timers;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    os::fd::OwnedFd,
    time::Duration,
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap},
};
use profiler_common::{CounterKey, kind};

/// The compiled eBPF object, embedded at build time by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler"));

/// Counters of one QEMU process, cumulative since it was first watched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessCounters {
    /// (kind, id) -> count, summed over CPUs.
    pub by_key: BTreeMap<(u32, u64), u64>,
}

impl ProcessCounters {
    /// Total of one kind over all ids.
    pub fn total(&self, kind: u32) -> u64 {
        self.by_key
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|(_, v)| v)
            .sum()
    }
    pub fn timer(&self) -> u64 {
        self.total(kind::TIMER)
    }
    pub fn fd_wakeups(&self) -> u64 {
        self.total(kind::FD_WAKEUP)
    }
}

/// The profiler's own cost in the kernel, from BPF run-time statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProbeCost {
    pub run_count: u64,
    pub run_time: Duration,
}

/// The loaded and attached eBPF programs.
pub struct EventProbes {
    ebpf: Ebpf,
    watched: HashSet<u32>,
    /// Keeps BPF run-time statistics enabled while we run (None: kernel refused).
    _stats: Option<OwnedFd>,
}

/// Checks the privileges loading eBPF needs, with an error a person can act on.
pub fn check_privileges() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "recording needs root: loading eBPF programs and attaching tracepoints needs \
             CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN (for tracefs). Run it with sudo."
        );
    }
    Ok(())
}

impl EventProbes {
    /// Loads the programs and attaches the timer probes.
    pub fn load() -> anyhow::Result<Self> {
        check_privileges()?;
        crate::tracefs::ensure_tracefs()?;
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
        let mut ebpf = Ebpf::load(EBPF_OBJECT).context("loading the eBPF object")?;
        timers::attach(&mut ebpf)?;
        Ok(Self {
            ebpf,
            watched: HashSet::new(),
            _stats: stats,
        })
    }

    fn watched_map(&mut self) -> anyhow::Result<BpfHashMap<&mut MapData, u32, u32>> {
        Ok(BpfHashMap::try_from(
            self.ebpf
                .map_mut("WATCHED")
                .context("map WATCHED missing")?,
        )?)
    }

    fn counters_map(&mut self) -> anyhow::Result<PerCpuHashMap<&mut MapData, CounterKey, u64>> {
        Ok(PerCpuHashMap::try_from(
            self.ebpf
                .map_mut("COUNTERS")
                .context("map COUNTERS missing")?,
        )?)
    }

    /// Starts counting events of process `tgid`, from zero.
    pub fn watch(&mut self, tgid: u32) -> anyhow::Result<()> {
        if self.watched.contains(&tgid) {
            return Ok(());
        }
        self.forget_counters(tgid)?;
        self.watched_map()?.insert(tgid, 1, 0)?;
        self.watched.insert(tgid);
        Ok(())
    }

    /// Stops counting process `tgid` and drops its counters. Read them first.
    pub fn unwatch(&mut self, tgid: u32) -> anyhow::Result<()> {
        if self.watched.remove(&tgid) {
            // Already gone is fine: the process may have been removed concurrently.
            let _ = self.watched_map()?.remove(&tgid);
        }
        self.forget_counters(tgid)
    }

    fn forget_counters(&mut self, tgid: u32) -> anyhow::Result<()> {
        let mut map = self.counters_map()?;
        let stale: Vec<CounterKey> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.tgid == tgid)
            .collect();
        for key in stale {
            let _ = map.remove(&key);
        }
        Ok(())
    }

    /// Cumulative counters of every watched process.
    pub fn read_counters(&mut self) -> anyhow::Result<HashMap<u32, ProcessCounters>> {
        let map = self.counters_map()?;
        let mut out: HashMap<u32, ProcessCounters> = HashMap::new();
        for entry in map.iter() {
            // A key deleted between iteration steps is skipped, not fatal.
            let Ok((key, per_cpu)) = entry else { continue };
            let sum: u64 = per_cpu.iter().copied().sum();
            *out.entry(key.tgid)
                .or_default()
                .by_key
                .entry((key.kind, key.id))
                .or_default() += sum;
        }
        Ok(out)
    }

    /// Run count and run time of all our programs so far.
    pub fn cost(&self) -> ProbeCost {
        let mut cost = ProbeCost::default();
        for (_, program) in self.ebpf.programs() {
            if let Ok(info) = program.info() {
                cost.run_count += info.run_count();
                cost.run_time += info.run_time();
            }
        }
        cost
    }
}
