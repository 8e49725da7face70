//! Maps shared by all probes.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::bpf_get_current_pid_tgid,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, Queue},
};
use profiler_common::{
    CounterKey, MAX_COUNTERS, MAX_PENDING, MAX_REGION_NAMES, MAX_WATCHED, PendingWait, RegionKey,
    RegionName, WATCH_SLOTS, WatchEntry, counter_meta, dropped, kind, link_generation, wait_block,
    watch_flag, watch_slot,
};

/// `-EEXIST`: an insert lost a race with another CPU (not a full map).
const EEXIST: i32 = -17;

/// QEMU processes (tgids) userspace wants counted, by [`watch_slot`]: see
/// [`profiler_common::WATCH_SLOTS`]. Anything else returns after one array load.
#[map]
pub static WATCH_TABLE: Array<WatchEntry> = Array::with_max_entries(WATCH_SLOTS, BPF_F_MMAPABLE);

/// Watched processes whose `WATCH_TABLE` slot another one holds.
#[map]
pub static WATCHED: HashMap<u32, WatchEntry> = HashMap::with_max_entries(MAX_WATCHED, 0);

/// The counter store, in three maps. `COUNTER_SLOTS` maps each counter's key to its slot in
/// `COUNTER_VALUES`, where the count is (added to atomically by all CPUs: per-CPU values would
/// cost `entries × CPUs × 8` bytes, hundreds of MB on a large host at 2,000 VMs). Userspace
/// reads the values through a memory mapping of the array, without a syscall, and reads the
/// key → slot index only when `COUNTER_META[INSERTS]` says keys were added: a full read of a
/// hash map scans every bucket, a fixed cost per refresh that dominated at a few hundred VMs.
/// Slots are allocated as keys are first used: from `FREE_COUNTER_SLOTS` (slots of forgotten
/// processes, pushed back by userspace), else never-used ones (`COUNTER_META[NEXT_SLOT]`).
#[map]
pub static COUNTER_SLOTS: HashMap<CounterKey, u32> =
    HashMap::with_max_entries(MAX_COUNTERS, BPF_F_NO_PREALLOC);

#[map]
pub static COUNTER_VALUES: Array<u64> = Array::with_max_entries(MAX_COUNTERS, BPF_F_MMAPABLE);

#[map]
pub static COUNTER_META: Array<u64> = Array::with_max_entries(counter_meta::SLOTS, BPF_F_MMAPABLE);

#[map]
pub static FREE_COUNTER_SLOTS: Queue<u32> = Queue::with_max_entries(MAX_COUNTERS, 0);

/// (process, MemoryRegion pointer) -> region name, written once per region by the read/write
/// probes (USDT or symbols).
#[map]
pub static REGION_NAMES: HashMap<RegionKey, RegionName> =
    HashMap::with_max_entries(MAX_REGION_NAMES, BPF_F_NO_PREALLOC);

/// Per-thread state between a wait's entry and its return, keyed by thread id.
#[map]
pub static PENDING: HashMap<u32, PendingWait> = HashMap::with_max_entries(MAX_PENDING, 0);

/// Updates refused by a full map, per [`dropped`] slot: counts that would otherwise be lost
/// silently.
#[map]
pub static DROPPED: PerCpuArray<u64> = PerCpuArray::with_max_entries(dropped::SLOTS, 0);

/// Notes one update refused by the map of `slot`.
#[inline(always)]
pub fn note_dropped(slot: u32) {
    if let Some(value) = DROPPED.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *value += 1 };
    }
}

/// Notes a refused insert of the map of `slot` unless it only lost a race (`-EEXIST`).
#[inline(always)]
pub fn note_insert(slot: u32, result: Result<(), i32>) {
    if let Err(e) = result
        && e != EEXIST
    {
        note_dropped(slot);
    }
}

/// (tgid, tid) of the current task.
#[inline(always)]
pub fn current_ids() -> (u32, u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    ((pid_tgid >> 32) as u32, pid_tgid as u32)
}

/// Process `tgid`, if it is watched.
#[inline(always)]
pub fn watched(tgid: u32) -> Option<WatchEntry> {
    // The idle task (0) would match a free slot.
    if tgid == 0 {
        return None;
    }
    let entry = WATCH_TABLE.get_ptr(watch_slot(tgid))?;
    // SAFETY: a map value, valid for the map's life; userspace writes it through its mapping
    // (`tgid` last when it fills the slot, first when it clears it), so each field is read
    // once, volatile.
    unsafe {
        if core::ptr::read_volatile(&(*entry).tgid) == tgid {
            return Some(WatchEntry {
                tgid,
                flags: core::ptr::read_volatile(&(*entry).flags),
                wait_block: core::ptr::read_volatile(&(*entry).wait_block),
                overflow: 0,
                generation: core::ptr::read_volatile(&(*entry).generation),
                _reserved: 0,
            });
        }
        if core::ptr::read_volatile(&(*entry).overflow) == 0 {
            return None;
        }
        WATCHED.get(tgid).copied()
    }
}

#[inline(always)]
pub fn is_watched(tgid: u32) -> bool {
    watched(tgid).is_some()
}

/// Whether process `tgid` is watched (returned) and this run of the uprobe link with BPF
/// `cookie` counts for it: an unbudgeted link (generation 0) always does; a budgeted VM's link
/// only while it is of the VM's current [`link_generation`] (a paused VM's links, still being
/// closed, count their run as [`kind::CLOSING_HIT`] and nothing else). For a budgeted VM, a run
/// that counts is counted too ([`kind::UPROBE_HIT`]): the programs that call this already look
/// the process up, so the budget's bookkeeping costs an atomic add only where it is asked for.
#[inline(always)]
pub fn watched_uprobe_hit(tgid: u32, cookie: u64) -> Option<WatchEntry> {
    let watched = watched(tgid)?;
    let generation = link_generation::of(cookie);
    if generation == link_generation::SHARED {
        // Budgeted VMs have links of their own.
        return (watched.generation == 0).then_some(watched);
    }
    let counts_hits = watched.flags & watch_flag::COUNT_HITS != 0;
    if generation != 0 && generation != watched.generation {
        if counts_hits {
            count_wait(&watched, kind::CLOSING_HIT, 0);
        }
        return None;
    }
    if counts_hits {
        count_wait(&watched, kind::UPROBE_HIT, 0);
    }
    Some(watched)
}

/// Whether this run of a read/write uprobe link with BPF `cookie` counts for process `tgid`:
/// as [`watched_uprobe_hit`], but an unbudgeted process's own link (generation 0: scoped to
/// its watched process and detached when it is unwatched) counts without a lookup, and a
/// counted run is not counted again (each access it counts is one).
#[inline(always)]
pub fn read_write_link_counts(tgid: u32, cookie: u64) -> bool {
    let generation = link_generation::of(cookie);
    if generation == 0 {
        return true;
    }
    let Some(watched) = watched(tgid) else {
        return false;
    };
    if generation == link_generation::SHARED {
        return watched.generation == 0;
    }
    if generation == watched.generation {
        return true;
    }
    if watched.flags & watch_flag::COUNT_HITS != 0 {
        count_wait(&watched, kind::CLOSING_HIT, 0);
    }
    false
}

/// Adds one to wait counter (`kind`, `id`) of the watched process `watched`: in its wait block
/// when it has one (an array store), else keyed like any counter.
#[inline(always)]
pub fn count_wait(watched: &WatchEntry, kind: u32, id: u64) {
    if watched.wait_block != wait_block::NONE
        && let Some(offset) = wait_block::offset(kind, id)
        && let Some(value) = COUNTER_VALUES.get_ptr_mut(watched.wait_block.wrapping_add(offset))
    {
        return atomic_add(value, 1);
    }
    count(&CounterKey {
        tgid: watched.tgid,
        kind,
        id,
    });
}

/// Adds one to the counter `key`.
#[inline(always)]
pub fn count(key: &CounterKey) {
    add(key, 1)
}

/// Adds `n` to `*value` atomically (other CPUs add to the same counter): BPF's `lock xadd`.
#[inline(always)]
pub fn atomic_add(value: *mut u64, n: u64) {
    #[cfg(target_arch = "bpf")]
    // SAFETY: `value` is a valid, aligned map value that lives as long as the map.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({value} + 0) += {n}",
            value = in(reg) value,
            n = in(reg) n,
        );
    }
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: as above (host builds only type-check the programs).
    unsafe {
        *value += n
    };
}

/// `*value += n` atomically, returning the value before: BPF's `atomic_fetch_add` (Linux 5.12).
#[inline(always)]
fn atomic_fetch_add(value: *mut u64, n: u64) -> u64 {
    #[cfg(target_arch = "bpf")]
    // SAFETY: `value` is a valid, aligned map value that lives as long as the map.
    unsafe {
        let mut old = n;
        core::arch::asm!(
            "{old} = atomic_fetch_add((u64 *)({value} + 0), {old})",
            value = in(reg) value,
            old = inout(reg) old,
        );
        old
    }
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: as above (host builds only type-check the programs).
    unsafe {
        let old = *value;
        *value += n;
        old
    }
}

/// Stores `new` in `*value` if it holds `expected`; returns what it held: BPF's
/// `cmpxchg` (Linux 5.12).
#[inline(always)]
pub fn atomic_cmpxchg(value: *mut u64, expected: u64, new: u64) -> u64 {
    #[cfg(target_arch = "bpf")]
    // SAFETY: `value` is a valid, aligned map value that lives as long as the map.
    unsafe {
        let mut old = expected;
        core::arch::asm!(
            "r0 = cmpxchg_64({value} + 0, r0, {new})",
            value = in(reg) value,
            new = in(reg) new,
            inout("r0") old,
        );
        old
    }
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: as above (host builds only type-check the programs).
    unsafe {
        let old = *value;
        if old == expected {
            *value = new;
        }
        old
    }
}

/// The count of counter `key`, if it has a slot.
#[inline(always)]
pub fn counter(key: &CounterKey) -> Option<*mut u64> {
    // SAFETY: the slot is copied out at once.
    let slot = unsafe { COUNTER_SLOTS.get(key) }.copied()?;
    COUNTER_VALUES.get_ptr_mut(slot)
}

/// Adds `n` to the counter `key` (PIO string I/O moves `count` elements per exit).
#[inline(always)]
pub fn add(key: &CounterKey, n: u64) {
    match counter(key) {
        Some(value) => atomic_add(value, n),
        None => add_new(key, n),
    }
}

/// A slot for a new counter: a freed one, else one never used.
#[inline(always)]
fn new_slot() -> Option<u32> {
    if let Ok(Some(slot)) = FREE_COUNTER_SLOTS.pop() {
        return Some(slot);
    }
    let next = COUNTER_META.get_ptr_mut(counter_meta::NEXT_SLOT)?;
    let slot = atomic_fetch_add(next, 1);
    (slot < u64::from(MAX_COUNTERS)).then_some(slot as u32)
}

/// Creates the counter `key` with `n` (the caller found none).
#[inline(never)]
pub fn add_new(key: &CounterKey, n: u64) {
    let Some(slot) = new_slot() else {
        return note_dropped(dropped::COUNTERS);
    };
    let Some(value) = COUNTER_VALUES.get_ptr_mut(slot) else {
        return note_dropped(dropped::COUNTERS);
    };
    // A stored count, not an added one: a reused slot holds its last owner's count. Written
    // before the key points at it, so no reader sees the old count under the new key.
    // SAFETY: the slot is this program's until the insert below publishes it.
    unsafe { *value = n };
    match COUNTER_SLOTS.insert(key, slot, BPF_NOEXIST as u64) {
        Ok(()) => {
            if let Some(inserts) = COUNTER_META.get_ptr_mut(counter_meta::INSERTS) {
                atomic_add(inserts, 1);
            }
        }
        Err(e) => {
            let _ = FREE_COUNTER_SLOTS.push(slot, 0);
            // Another CPU created it first: add to theirs.
            match counter(key) {
                Some(value) if e == EEXIST => atomic_add(value, n),
                _ => note_dropped(dropped::COUNTERS),
            }
        }
    }
}
