//! The counter store's userspace half (the kernel side is in `profiler-ebpf/src/maps.rs`):
//! counts live in an array the collector reads through a memory mapping, and a hash map gives
//! each counter key its slot. Reading a hash map whole scans every one of its buckets (2^19 for
//! 2,000 VMs: ~0.7 ms here, whatever the number of VMs), so the index is read only when the
//! programs added keys since the last read (`COUNTER_META[INSERTS]`); in between, a refresh
//! is one memory load per counter and no syscall.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{Map, MapData, Queue},
};
use profiler_common::{CounterKey, MAX_COUNTERS, counter_meta};

use super::batch;

/// Counter key → slot in [`VALUES_MAP`].
pub const SLOTS_MAP: &str = "COUNTER_SLOTS";
/// The counts, by slot.
pub const VALUES_MAP: &str = "COUNTER_VALUES";
/// [`counter_meta`] slots: the allocator's next slot and the index's insert count.
pub const META_MAP: &str = "COUNTER_META";
/// Slots of forgotten keys, for the programs to reuse.
pub const FREE_MAP: &str = "FREE_COUNTER_SLOTS";

/// A read-only, shared mapping of a `BPF_F_MMAPABLE` array of `u64`.
struct MappedArray {
    base: NonNull<AtomicU64>,
    entries: u32,
    bytes: usize,
}

// SAFETY: the mapping is plain shared memory, read only with atomic loads; it stays valid
// until `Drop` unmaps it.
unsafe impl Send for MappedArray {}
unsafe impl Sync for MappedArray {}

impl MappedArray {
    fn map(ebpf: &Ebpf, name: &str, entries: u32) -> anyhow::Result<Self> {
        let Some(Map::Array(data)) = ebpf.map(name) else {
            anyhow::bail!("map {name} missing or not an array");
        };
        let page = 4096;
        let bytes = (entries as usize * 8).div_ceil(page) * page;
        // SAFETY: a fresh shared read-only mapping of the map's fd; the kernel checks the
        // length against the array and that the map was created mmapable.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error()).with_context(|| format!("mmap of map {name}"));
        }
        Ok(Self {
            base: NonNull::new(ptr.cast()).context("mmap returned NULL")?,
            entries,
            bytes,
        })
    }

    /// Entry `index` as the programs last wrote it (0 out of range).
    fn load(&self, index: u32) -> u64 {
        if index >= self.entries {
            return 0;
        }
        // SAFETY: in range of the mapping; the programs write these words atomically.
        unsafe { self.base.add(index as usize).as_ref() }.load(Ordering::Relaxed)
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped; nothing borrows it past `self`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

/// Reads and forgets the programs' counters.
pub struct CounterStore {
    values: MappedArray,
    meta: MappedArray,
    /// Every key and its slot, as of the index read when `INSERTS` was `index_inserts`.
    index: Vec<(CounterKey, u32)>,
    index_inserts: Option<u64>,
}

impl CounterStore {
    pub fn open(ebpf: &Ebpf) -> anyhow::Result<Self> {
        Ok(Self {
            values: MappedArray::map(ebpf, VALUES_MAP, MAX_COUNTERS)?,
            meta: MappedArray::map(ebpf, META_MAP, counter_meta::SLOTS)?,
            index: Vec::new(),
            index_inserts: None,
        })
    }

    /// Every counter and its count. Keys a program adds while this runs are seen next time.
    pub fn read(&mut self, ebpf: &Ebpf) -> anyhow::Result<Vec<(CounterKey, u64)>> {
        // Read before the index: an insert racing the index read moves it again.
        let inserts = self.meta.load(counter_meta::INSERTS);
        if self.index_inserts != Some(inserts) {
            self.index = read_index(ebpf)?;
            self.index_inserts = Some(inserts);
        }
        Ok(self
            .index
            .iter()
            .map(|&(key, slot)| (key, self.values.load(slot)))
            .collect())
    }

    /// Counters known as of the last read.
    pub fn known(&self) -> usize {
        self.index.len()
    }

    /// Removes process `tgid`'s counters and gives their slots back to the programs. Returns
    /// how many were removed.
    pub fn forget(&mut self, ebpf: &mut Ebpf, tgid: u32) -> anyhow::Result<usize> {
        // Its keys added since the last read are only in the map: read it whole.
        let inserts = self.meta.load(counter_meta::INSERTS);
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
        let _one_at_a_time = super::super::tests::attaching();
        let Some(mut ebpf) = super::super::tests::root_ebpf("root_counter_store") else {
            return;
        };
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
}
