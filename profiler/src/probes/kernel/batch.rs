//! Reading a whole BPF hash map in a few syscalls (`BPF_MAP_LOOKUP_BATCH`, Linux 5.6), where
//! iterating it costs two syscalls per entry: at 2,000 VMs the counters map holds tens of
//! thousands of entries, read every refresh. Kernels without batch ops fall back to iteration.

use std::{
    io,
    mem::MaybeUninit,
    os::fd::{AsFd as _, AsRawFd as _},
};

use super::bpf_call::{BPF_MAP_LOOKUP_BATCH, bpf};
use aya::{
    Pod,
    maps::{HashMap as BpfHashMap, Map, MapData},
};

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Entries fetched per syscall to begin with (grown when a hash bucket holds more).
const CHUNK: usize = 4096;

/// Every (key, value) of the hash map `map`: by batches where the kernel has them, else by
/// iteration. Entries deleted concurrently may be missed, never duplicated.
pub fn read_hash<K: Pod, V: Pod>(map: &Map) -> io::Result<Vec<(K, V)>> {
    let data = match map {
        Map::HashMap(d) | Map::LruHashMap(d) => d,
        _ => return Err(io::Error::other("not a hash map")),
    };
    match read_batched(data) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => iterate(map),
        other => other,
    }
}

/// Removes the entries of hash map `name` that `stale` picks, reading the map by batches:
/// forgetting one VM this way is a few syscalls, where iterating cost two per entry of every
/// VM (at 500 VMs, stopping the profiler spent seconds in `get_next_key`). Returns how many
/// were removed; a missing map removes nothing.
pub fn remove_where<K: Pod, V: Pod>(
    ebpf: &mut aya::Ebpf,
    name: &str,
    mut stale: impl FnMut(&K, &V) -> bool,
) -> usize {
    let Some(Ok(entries)) = ebpf.map(name).map(read_hash::<K, V>) else {
        return 0;
    };
    let keys: Vec<K> = entries
        .into_iter()
        .filter(|(k, v)| stale(k, v))
        .map(|(k, _)| k)
        .collect();
    let Some(Ok(mut map)) = ebpf
        .map_mut(name)
        .map(BpfHashMap::<&mut MapData, K, V>::try_from)
    else {
        return 0;
    };
    // Already gone (LRU eviction, a concurrent removal) is fine.
    keys.iter().filter(|k| map.remove(k).is_ok()).count()
}

fn iterate<K: Pod, V: Pod>(map: &Map) -> io::Result<Vec<(K, V)>> {
    let map: BpfHashMap<&MapData, K, V> = BpfHashMap::try_from(map).map_err(io::Error::other)?;
    Ok(map.iter().filter_map(Result::ok).collect())
}

fn read_batched<K: Pod, V: Pod>(data: &MapData) -> io::Result<Vec<(K, V)>> {
    let fd = data.fd().as_fd().as_raw_fd();
    let mut out = Vec::new();
    let mut chunk = CHUNK;
    // The kernel's cursor (a bucket index for hash maps; 8 bytes is enough for any map).
    let mut token = [0u64; 1];
    let mut started = false;
    loop {
        let mut keys: Vec<MaybeUninit<K>> = Vec::with_capacity(chunk);
        let mut values: Vec<MaybeUninit<V>> = Vec::with_capacity(chunk);
        let mut next = [0u64; 1];
        let mut attr = BatchAttr {
            in_batch: if started { token.as_ptr() as u64 } else { 0 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at buffers of `chunk` keys and values that outlive the call;
        // the kernel writes at most `count` of each.
        let err = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) }.err();
        match err.as_ref().and_then(io::Error::raw_os_error) {
            None | Some(libc::ENOENT) => {}
            // A bucket holds more entries than fit: ask for more at once.
            Some(libc::ENOSPC) if attr.count == 0 => {
                chunk *= 4;
                continue;
            }
            _ => return Err(err.expect("an error")),
        }
        let n = attr.count as usize;
        // SAFETY: the kernel filled the first `n` keys and values.
        unsafe {
            keys.set_len(n);
            values.set_len(n);
        }
        out.extend(
            keys.into_iter()
                .zip(values)
                // SAFETY: initialised above.
                .map(|(k, v)| unsafe { (k.assume_init(), v.assume_init()) }),
        );
        if err.is_some() {
            // ENOENT: that was the last batch.
            return Ok(out);
        }
        token = next;
        started = true;
    }
}

/// Slot `slot` of the per-CPU `u64` array `name`, summed over the CPUs (`None` if it cannot
/// be read): the programs' event counts that need no atomic.
pub fn per_cpu_total(ebpf: &aya::Ebpf, name: &str, slot: u32) -> Option<u64> {
    let array = aya::maps::PerCpuArray::<&MapData, u64>::try_from(ebpf.map(name)?).ok()?;
    Some(array.get(&slot, 0).ok()?.iter().sum())
}

/// Entries of the hash map `name` with keys `K` and values `V` (0 if it cannot be read).
pub fn count_entries<K: Pod, V: Pod>(ebpf: &aya::Ebpf, name: &str) -> usize {
    ebpf.map(name)
        .and_then(|m| read_hash::<K, V>(m).ok())
        .map_or(0, |entries| entries.len())
}

/// Removes every entry of process `tgid` from a map keyed by [`RegionKey`].
pub fn forget_region_keys<V: Pod>(ebpf: &mut aya::Ebpf, map: &str, tgid: u32) {
    remove_where::<profiler_common::RegionKey, V>(ebpf, map, |k, _| k.tgid == tgid);
}

#[cfg(test)]
mod tests {
    //! Root test: a real map read by batches agrees with iteration.

    use aya::maps::HashMap as BpfHashMap;
    use profiler_common::CounterKey;

    use super::*;
    use crate::probes::kernel::test_support::root_test;

    #[test]
    fn root_batched_read_agrees_with_iteration() {
        let (_one_at_a_time, mut ebpf) = root_test!("root_batched_read_agrees");
        let n = 10_000u32;
        {
            let mut map: BpfHashMap<&mut MapData, CounterKey, u32> =
                BpfHashMap::try_from(ebpf.map_mut("COUNTER_SLOTS").unwrap()).unwrap();
            for i in 0..n {
                let key = CounterKey {
                    tgid: i % 97,
                    kind: 1 + i % 8,
                    id: u64::from(i),
                };
                map.insert(key, i * 3, 0).unwrap();
            }
        }
        let map = ebpf.map("COUNTER_SLOTS").unwrap();
        let mut batched: Vec<(CounterKey, u32)> = read_batched(match map {
            Map::HashMap(d) => d,
            _ => panic!("COUNTER_SLOTS is a hash map"),
        })
        .unwrap();
        let mut iterated: Vec<(CounterKey, u32)> = iterate(map).unwrap();
        batched.sort();
        iterated.sort();
        assert_eq!(batched.len(), n as usize);
        assert_eq!(batched, iterated);
        assert!(batched.iter().all(|(k, v)| u64::from(*v) == k.id * 3));
        // And an empty map reads as empty.
        assert!(
            read_hash::<u32, profiler_common::WatchEntry>(ebpf.map("WATCHED").unwrap())
                .unwrap()
                .is_empty()
        );
    }
}
