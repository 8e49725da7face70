//! The counter store's userspace half (the kernel side is in `profiler-ebpf/src/maps.rs`):
//! counts live in an array the collector reads through a memory mapping, and a hash map gives
//! each counter key its slot. Reading a hash map whole scans every one of its buckets (2^19 for
//! 2,000 VMs, whatever the number of VMs), so the index is read only when the
//! programs added keys since the last read (`COUNTER_META[INSERTS]`); in between, a refresh
//! is one memory load per counter and no syscall.

use std::{collections::HashMap, sync::atomic::Ordering};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{MapData, Queue},
};
use profiler_common::{CounterKey, MAX_COUNTERS, counter_meta, wait_block};

use crate::probes::kernel::{batch, mapped::MappedArray};

/// Counter key → slot in [`VALUES_MAP`].
pub const SLOTS_MAP: &str = "COUNTER_SLOTS";
/// The counts, by slot.
pub const VALUES_MAP: &str = "COUNTER_VALUES";
/// [`counter_meta`] slots: the allocator's next slot and the index's insert count.
pub const META_MAP: &str = "COUNTER_META";
/// Slots of forgotten keys, for the programs to reuse.
pub const FREE_MAP: &str = "FREE_COUNTER_SLOTS";

/// Reads and forgets the programs' counters.
pub struct CounterStore {
    values: MappedArray,
    meta: MappedArray,
    /// Every key and its slot, as of the index read when `INSERTS` was `index_inserts`.
    index: Vec<(CounterKey, u32)>,
    index_inserts: Option<u64>,
    /// Each watched process's wait block ([`wait_block`]): its first slot.
    wait_blocks: HashMap<u32, u32>,
    /// Blocks of forgotten processes, for the next ones (never given to the programs'
    /// allocator, which takes single slots).
    free_blocks: Vec<u32>,
}

/// Entry `index` of a mapped `u64` array (0 out of range).
fn load(array: &MappedArray, index: u32) -> u64 {
    array
        .u64_at(index, 0)
        .map_or(0, |v| v.load(Ordering::Relaxed))
}

impl CounterStore {
    pub fn open(ebpf: &Ebpf) -> anyhow::Result<Self> {
        Ok(Self {
            values: MappedArray::map(ebpf, VALUES_MAP, MAX_COUNTERS, 8)?,
            meta: MappedArray::map(ebpf, META_MAP, counter_meta::SLOTS, 8)?,
            index: Vec::new(),
            index_inserts: None,
            wait_blocks: HashMap::new(),
            free_blocks: Vec::new(),
        })
    }

    /// The first slot of process `tgid`'s wait block, allocated (zeroed) at its first call:
    /// [`wait_block::NONE`] when the store is full (its wait counters are then keyed).
    pub fn wait_block(&mut self, tgid: u32) -> u32 {
        if let Some(&block) = self.wait_blocks.get(&tgid) {
            return block;
        }
        let block = match self.free_blocks.pop() {
            Some(block) => block,
            None => {
                // Taken from the never-used slots the programs also allocate from.
                let Some(next) = self.meta.u64_at(counter_meta::NEXT_SLOT, 0) else {
                    return wait_block::NONE;
                };
                let first = next.fetch_add(u64::from(wait_block::SLOTS), Ordering::Relaxed);
                if first + u64::from(wait_block::SLOTS) > u64::from(MAX_COUNTERS) {
                    return wait_block::NONE;
                }
                first as u32
            }
        };
        for offset in 0..wait_block::SLOTS {
            if let Some(value) = self.values.u64_at(block + offset, 0) {
                value.store(0, Ordering::Relaxed);
            }
        }
        self.wait_blocks.insert(tgid, block);
        block
    }

    /// Every counter and its count. Keys a program adds while this runs are seen next time.
    pub fn read(&mut self, ebpf: &Ebpf) -> anyhow::Result<Vec<(CounterKey, u64)>> {
        // Read before the index: an insert racing the index read moves it again.
        let inserts = load(&self.meta, counter_meta::INSERTS);
        if self.index_inserts != Some(inserts) {
            self.index = read_index(ebpf)?;
            self.index_inserts = Some(inserts);
        }
        let values = &self.values;
        let keyed = self
            .index
            .iter()
            .map(|&(key, slot)| (key, load(values, slot)));
        // A block's counters exist once counted, as a keyed counter does once inserted.
        let blocks = self.wait_blocks.iter().flat_map(|(&tgid, &block)| {
            (0..wait_block::SLOTS).filter_map(move |offset| {
                let (kind, id) = wait_block::counter(offset)?;
                let value = load(values, block + offset);
                (value > 0).then_some((CounterKey { tgid, kind, id }, value))
            })
        });
        Ok(keyed.chain(blocks).collect())
    }

    /// Counter slots in use as of the last read (keyed ones and whole wait blocks).
    pub fn known(&self) -> usize {
        self.index.len() + self.wait_blocks.len() * wait_block::SLOTS as usize
    }

    /// Removes process `tgid`'s counters and gives their slots back to the programs (its wait
    /// block to the next process watched). Returns how many keyed counters were removed.
    pub fn forget(&mut self, ebpf: &mut Ebpf, tgid: u32) -> anyhow::Result<usize> {
        if let Some(block) = self.wait_blocks.remove(&tgid) {
            self.free_blocks.push(block);
        }
        // Its keys added since the last read are only in the map: read it whole.
        let inserts = load(&self.meta, counter_meta::INSERTS);
        let (gone, kept): (Vec<_>, Vec<_>) = read_index(ebpf)?
            .into_iter()
            .partition(|(k, _)| k.tgid == tgid);
        self.index = kept;
        self.index_inserts = Some(inserts);
        let mut removed = Vec::with_capacity(gone.len());
        {
            let mut slots: aya::maps::HashMap<&mut MapData, CounterKey, u32> =
                aya::maps::HashMap::try_from(
                    ebpf.map_mut(SLOTS_MAP)
                        .context("map COUNTER_SLOTS missing")?,
                )?;
            for (key, slot) in gone {
                // Already gone: not ours to free again.
                if slots.remove(&key).is_ok() {
                    removed.push(slot);
                }
            }
        }
        let mut free: Queue<&mut MapData, u32> = Queue::try_from(
            ebpf.map_mut(FREE_MAP)
                .context("map FREE_COUNTER_SLOTS missing")?,
        )?;
        for &slot in &removed {
            // The queue holds every slot there is: it cannot be full.
            free.push(slot, 0)?;
        }
        Ok(removed.len())
    }
}

fn read_index(ebpf: &Ebpf) -> anyhow::Result<Vec<(CounterKey, u32)>> {
    let map = ebpf.map(SLOTS_MAP).context("map COUNTER_SLOTS missing")?;
    Ok(batch::read_hash(map)?)
}

#[cfg(test)]
mod tests {
    //! Root tests on the real maps: userspace stands in for the programs' writes (the e2e
    //! tests cover the programs).

    use super::*;
    use crate::probes::kernel::test_support::root_test;

    fn key(tgid: u32, id: u64) -> CounterKey {
        CounterKey {
            tgid,
            kind: profiler_common::kind::READ,
            id,
        }
    }

    /// What a program's first count of `key` does: a slot, its count, the key, the insert.
    fn program_insert(ebpf: &mut Ebpf, k: CounterKey, slot: u32, n: u64) {
        let mut values: aya::maps::Array<&mut MapData, u64> =
            aya::maps::Array::try_from(ebpf.map_mut(VALUES_MAP).unwrap()).unwrap();
        values.set(slot, n, 0).unwrap();
        let mut slots: aya::maps::HashMap<&mut MapData, CounterKey, u32> =
            aya::maps::HashMap::try_from(ebpf.map_mut(SLOTS_MAP).unwrap()).unwrap();
        slots.insert(k, slot, 0).unwrap();
        let mut meta: aya::maps::Array<&mut MapData, u64> =
            aya::maps::Array::try_from(ebpf.map_mut(META_MAP).unwrap()).unwrap();
        let inserts = meta.get(&counter_meta::INSERTS, 0).unwrap();
        meta.set(counter_meta::INSERTS, inserts + 1, 0).unwrap();
    }

    fn set_value(ebpf: &mut Ebpf, slot: u32, n: u64) {
        let mut values: aya::maps::Array<&mut MapData, u64> =
            aya::maps::Array::try_from(ebpf.map_mut(VALUES_MAP).unwrap()).unwrap();
        values.set(slot, n, 0).unwrap();
    }

    #[test]
    fn root_counts_read_through_the_mapping_and_slots_come_back() {
        let (_one_at_a_time, mut ebpf) = root_test!("root_counter_store");
        let mut store = CounterStore::open(&ebpf).unwrap();
        assert!(store.read(&ebpf).unwrap().is_empty());
        program_insert(&mut ebpf, key(10, 1), 0, 5);
        program_insert(&mut ebpf, key(10, 2), 1, 7);
        program_insert(&mut ebpf, key(11, 1), 2, 9);
        let mut counts = store.read(&ebpf).unwrap();
        counts.sort();
        assert_eq!(
            counts,
            vec![(key(10, 1), 5), (key(10, 2), 7), (key(11, 1), 9)]
        );
        // A count moving is seen through the mapping, without reading the index again.
        set_value(&mut ebpf, 1, 70);
        let mut counts = store.read(&ebpf).unwrap();
        counts.sort();
        assert_eq!(counts[1], (key(10, 2), 70));
        // Forgetting a process frees its slots for the programs, and only its.
        assert_eq!(store.forget(&mut ebpf, 10).unwrap(), 2);
        assert_eq!(store.read(&ebpf).unwrap(), vec![(key(11, 1), 9)]);
        let mut free: Queue<&mut MapData, u32> =
            Queue::try_from(ebpf.map_mut(FREE_MAP).unwrap()).unwrap();
        let mut freed = vec![free.pop(0).unwrap(), free.pop(0).unwrap()];
        freed.sort();
        assert_eq!(freed, vec![0, 1]);
        assert!(free.pop(0).is_err(), "only the forgotten process's slots");
    }

    #[test]
    fn root_wait_blocks_read_as_counters_and_are_reused_zeroed() {
        use profiler_common::{kind, wait_syscall};
        let (_one_at_a_time, mut ebpf) = root_test!("root_wait_blocks");
        let mut store = CounterStore::open(&ebpf).unwrap();
        // Taken from the never-used slots, after the programs' own.
        program_insert(&mut ebpf, key(10, 1), 0, 5);
        let mut meta: aya::maps::Array<&mut MapData, u64> =
            aya::maps::Array::try_from(ebpf.map_mut(META_MAP).unwrap()).unwrap();
        meta.set(counter_meta::NEXT_SLOT, 1, 0).unwrap();
        let block = store.wait_block(20);
        assert_eq!(block, 1);
        assert_eq!(store.wait_block(20), block, "one block per process");
        assert_eq!(store.wait_block(21), 1 + wait_block::SLOTS);
        // Counted where the programs count: only counters that moved are read.
        let timer = wait_block::offset(kind::TIMER, wait_syscall::EPOLL_PWAIT).unwrap();
        set_value(&mut ebpf, block + timer, 3);
        let mut counts = store.read(&ebpf).unwrap();
        counts.sort();
        let timer_key = CounterKey {
            tgid: 20,
            kind: kind::TIMER,
            id: wait_syscall::EPOLL_PWAIT,
        };
        assert_eq!(counts, vec![(key(10, 1), 5), (timer_key, 3)]);
        // A forgotten process's block goes to the next one, zeroed.
        store.forget(&mut ebpf, 20).unwrap();
        assert_eq!(store.wait_block(22), block);
        assert_eq!(store.read(&ebpf).unwrap(), vec![(key(10, 1), 5)]);
    }
}
