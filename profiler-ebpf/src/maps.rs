//! Maps shared by all probes.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_get_current_pid_tgid,
    macros::map,
    maps::{HashMap, PerCpuHashMap},
};
use profiler_common::{
    CounterKey, MAX_COUNTERS, MAX_PENDING, MAX_REGION_NAMES, MAX_WATCHED, PendingWait, RegionKey,
    RegionName,
};

/// QEMU processes (tgids) userspace wants counted. Anything else returns at the first lookup,
/// so other processes pay one hash lookup per traced syscall.
#[map]
pub static WATCHED: HashMap<u32, u32> = HashMap::with_max_entries(MAX_WATCHED, 0);

/// Event counters, per CPU so the hot path needs no atomics.
#[map]
pub static COUNTERS: PerCpuHashMap<CounterKey, u64> =
    PerCpuHashMap::with_max_entries(MAX_COUNTERS, 0);

/// (process, MemoryRegion pointer) -> region name, written once per region by the read/write
/// probes (USDT or symbols).
#[map]
pub static REGION_NAMES: HashMap<RegionKey, RegionName> =
    HashMap::with_max_entries(MAX_REGION_NAMES, 0);

/// Per-thread state between a wait syscall's entry and its exit, keyed by thread id.
#[map]
pub static PENDING: HashMap<u32, PendingWait> = HashMap::with_max_entries(MAX_PENDING, 0);

/// (tgid, tid) of the current task.
#[inline(always)]
pub fn current_ids() -> (u32, u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    ((pid_tgid >> 32) as u32, pid_tgid as u32)
}

#[inline(always)]
pub fn is_watched(tgid: u32) -> bool {
    // SAFETY: the value is only checked for presence.
    unsafe { WATCHED.get(tgid).is_some() }
}

/// Adds one to the counter `key` on this CPU.
#[inline(always)]
pub fn count(key: &CounterKey) {
    add(key, 1)
}

/// Adds `n` to the counter `key` on this CPU (PIO string I/O moves `count` elements per exit).
#[inline(always)]
pub fn add(key: &CounterKey, n: u64) {
    match COUNTERS.get_ptr_mut(key) {
        // SAFETY: per-CPU value, only this CPU writes it while this program runs.
        Some(value) => unsafe { *value += n },
        None => {
            // A concurrent insert on another CPU is harmless: per-CPU slots are separate, and a
            // lost race (EEXIST) is retried through the pointer path.
            if COUNTERS.insert(key, n, BPF_NOEXIST as u64).is_err()
                && let Some(value) = COUNTERS.get_ptr_mut(key)
            {
                unsafe { *value += n };
            }
        }
    }
}
