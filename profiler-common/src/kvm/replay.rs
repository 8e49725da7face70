//! [`handle`] run over plain maps instead of the eBPF maps: what the kernel counts for a
//! sequence of events, for tests (here and in the profiler's root tests, which compare the
//! eBPF counters with a replay of the same run's events recorded by tracefs).

use std::collections::BTreeMap;

use super::{KvmEvent, KvmStore, KvmThreadState, PortKey, handle, port_class, settle};
use crate::CounterKey;

/// The maps [`handle`] works on, as the eBPF programs' maps would hold them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayStore {
    pub threads: BTreeMap<u32, KvmThreadState>,
    pub ports: BTreeMap<PortKey, u32>,
    pub counters: BTreeMap<CounterKey, u64>,
}

impl KvmStore for ReplayStore {
    fn thread(&self, tid: u32) -> Option<KvmThreadState> {
        self.threads.get(&tid).copied()
    }
    fn put_thread(&mut self, tid: u32, state: KvmThreadState) {
        self.threads.insert(tid, state);
    }
    fn drop_thread(&mut self, tid: u32) {
        self.threads.remove(&tid);
    }
    fn port_class(&self, key: PortKey) -> u32 {
        self.ports.get(&key).copied().unwrap_or(port_class::UNKNOWN)
    }
    fn learn_port(&mut self, key: PortKey, class: u32) {
        self.ports.insert(key, class);
    }
    fn count(&mut self, key: CounterKey, n: u64) {
        *self.counters.entry(key).or_insert(0) += n;
    }
}

/// Counters from replaying events of one process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replay {
    /// What the eBPF counters would hold: (kind, id) -> count.
    pub counted: BTreeMap<(u32, u64), u64>,
    /// What the states still outstanding at the end will count ([`outstanding`]).
    pub outstanding: BTreeMap<(u32, u64), u64>,
}

impl Replay {
    /// `counted` plus `outstanding`: the final counts once every thread has settled.
    pub fn total(&self) -> BTreeMap<(u32, u64), u64> {
        let mut out = self.counted.clone();
        for (key, n) in &self.outstanding {
            *out.entry(*key).or_insert(0) += n;
        }
        out
    }
}

/// What the outstanding thread states of process `tgid` will count once settled: the last
/// access of each vCPU thread is counted at that thread's next KVM event, so add these when
/// the process is gone to lose nothing.
pub fn outstanding<'a>(
    threads: impl IntoIterator<Item = &'a KvmThreadState>,
    tgid: u32,
) -> BTreeMap<(u32, u64), u64> {
    let mut out = BTreeMap::new();
    for state in threads {
        let counted = settle(*state);
        if state.tgid == tgid && counted.kind != 0 {
            *out.entry((counted.kind, counted.id)).or_insert(0) += u64::from(counted.n);
        }
    }
    out
}

/// Replays interleaved events of several vCPU threads (thread id, event) of one process
/// through [`handle`], the function the eBPF programs run.
pub fn replay_threads(events: &[(u32, KvmEvent)]) -> Replay {
    const TGID: u32 = 1;
    let mut store = ReplayStore::default();
    for &(tid, event) in events {
        handle(&mut store, TGID, tid, event);
    }
    Replay {
        counted: store
            .counters
            .iter()
            .filter(|(k, _)| k.tgid == TGID)
            .map(|(k, n)| ((k.kind, k.id), *n))
            .collect(),
        outstanding: outstanding(store.threads.values(), TGID),
    }
}

/// The counters [`replay_threads`] leaves for a single vCPU thread, without the outstanding
/// last access (as the eBPF counters hold them).
pub fn classify(events: &[KvmEvent]) -> BTreeMap<(u32, u64), u64> {
    let tagged: std::vec::Vec<(u32, KvmEvent)> = events.iter().map(|&e| (1, e)).collect();
    replay_threads(&tagged).counted
}
