//! The watched processes, as the programs find them (the kernel side is `watched()` in
//! `profiler-ebpf/src/maps.rs`): slot `tgid % WATCH_SLOTS` of the memory-mapped `WATCH_TABLE`
//! array, written here with atomic stores, or the `WATCHED` hash for a process whose slot
//! another one holds (that slot's `overflow` word then says to look there).

use std::{
    collections::HashMap,
    mem::offset_of,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
};
use profiler_common::{WATCH_SLOTS, WatchEntry, watch_slot};

use crate::probes::kernel::mapped::MappedArray;

pub const TABLE_MAP: &str = "WATCH_TABLE";
pub const OVERFLOW_MAP: &str = "WATCHED";

/// Where a watched process is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// In its own slot.
    Table,
    /// In the hash: its slot is another's.
    Overflow,
}

/// Which process holds each slot and how many others of that slot overflowed: the placement
/// decisions, apart from the maps.
#[derive(Debug, Default)]
pub struct Placement {
    places: HashMap<u32, Place>,
    holders: HashMap<u32, u32>,
    overflowed: HashMap<u32, u32>,
}

impl Placement {
    /// Where `tgid` goes (or already is).
    pub fn place(&mut self, tgid: u32) -> Place {
        if let Some(&place) = self.places.get(&tgid) {
            return place;
        }
        let slot = watch_slot(tgid);
        let place =
            if let std::collections::hash_map::Entry::Vacant(free) = self.holders.entry(slot) {
                free.insert(tgid);
                Place::Table
            } else {
                *self.overflowed.entry(slot).or_default() += 1;
                Place::Overflow
            };
        self.places.insert(tgid, place);
        place
    }

    /// Removes `tgid`: where it was, and for an overflowed one whether its slot has no other
    /// overflowed process left.
    pub fn remove(&mut self, tgid: u32) -> Option<(Place, bool)> {
        let place = self.places.remove(&tgid)?;
        let slot = watch_slot(tgid);
        match place {
            Place::Table => {
                self.holders.remove(&slot);
                Some((place, false))
            }
            Place::Overflow => {
                let left = self.overflowed.get_mut(&slot).map_or(0, |n| {
                    *n -= 1;
                    *n
                });
                if left == 0 {
                    self.overflowed.remove(&slot);
                }
                Some((place, left == 0))
            }
        }
    }

    pub fn len(&self) -> usize {
        self.places.len()
    }

    pub fn is_empty(&self) -> bool {
        self.places.is_empty()
    }
}

/// The watched processes, kept where the programs look.
pub struct WatchTable {
    table: MappedArray,
    placement: Placement,
    /// Budgeted processes' [`profiler_common::link_generation`]s (0 for the others).
    generations: HashMap<u32, u32>,
}

impl WatchTable {
    pub fn open(ebpf: &Ebpf) -> anyhow::Result<Self> {
        Ok(Self {
            table: MappedArray::map(ebpf, TABLE_MAP, WATCH_SLOTS, size_of::<WatchEntry>())?,
            placement: Placement::default(),
            generations: HashMap::new(),
        })
    }

    fn word(&self, slot: u32, offset: usize) -> anyhow::Result<&AtomicU32> {
        self.table
            .u32_at(slot, offset)
            .with_context(|| format!("{TABLE_MAP} slot {slot}"))
    }

    /// Watches `tgid` with `flags` and wait block `wait_block`, or updates them.
    pub fn set(
        &mut self,
        ebpf: &mut Ebpf,
        tgid: u32,
        flags: u32,
        wait_block: u32,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(tgid != 0, "process 0 cannot be watched");
        let slot = watch_slot(tgid);
        let generation = self.generation(tgid);
        match self.placement.place(tgid) {
            Place::Table => {
                self.word(slot, offset_of!(WatchEntry, flags))?
                    .store(flags, Ordering::Relaxed);
                self.word(slot, offset_of!(WatchEntry, wait_block))?
                    .store(wait_block, Ordering::Relaxed);
                self.word(slot, offset_of!(WatchEntry, generation))?
                    .store(generation, Ordering::Relaxed);
                // Last: a program that sees the process sees its flags and block.
                self.word(slot, offset_of!(WatchEntry, tgid))?
                    .store(tgid, Ordering::Release);
            }
            Place::Overflow => {
                let entry = WatchEntry {
                    tgid,
                    flags,
                    wait_block,
                    generation,
                    ..WatchEntry::default()
                };
                if let Err(e) = overflow_map(ebpf)?.insert(tgid, entry, 0) {
                    self.placement.remove(tgid);
                    return Err(e).context("map WATCHED");
                }
                // After the entry: a program sent to the hash finds it.
                self.word(slot, offset_of!(WatchEntry, overflow))?
                    .store(1, Ordering::Release);
            }
        }
        Ok(())
    }

    /// The [`profiler_common::link_generation`] whose uprobe links count for `tgid` (0: not
    /// budgeted).
    pub fn generation(&self, tgid: u32) -> u32 {
        self.generations.get(&tgid).copied().unwrap_or(0)
    }

    /// Makes `generation` the one whose links count for `tgid` (kept for a process not
    /// placed yet: [`Self::set`] writes it).
    pub fn set_generation(
        &mut self,
        ebpf: &mut Ebpf,
        tgid: u32,
        generation: u32,
    ) -> anyhow::Result<()> {
        self.generations.insert(tgid, generation);
        let slot = watch_slot(tgid);
        match self.placement.places.get(&tgid) {
            None => {}
            Some(Place::Table) => self
                .word(slot, offset_of!(WatchEntry, generation))?
                .store(generation, Ordering::Release),
            Some(Place::Overflow) => {
                let mut map = overflow_map(ebpf)?;
                let mut entry = map.get(&tgid, 0).context("map WATCHED")?;
                entry.generation = generation;
                map.insert(tgid, entry, 0).context("map WATCHED")?;
            }
        }
        Ok(())
    }

    /// Stops watching `tgid` (nothing if it was not).
    pub fn remove(&mut self, ebpf: &mut Ebpf, tgid: u32) -> anyhow::Result<()> {
        self.generations.remove(&tgid);
        let slot = watch_slot(tgid);
        match self.placement.remove(tgid) {
            None => {}
            Some((Place::Table, _)) => self
                .word(slot, offset_of!(WatchEntry, tgid))?
                .store(0, Ordering::Release),
            Some((Place::Overflow, last)) => {
                // Already gone is fine.
                let _ = overflow_map(ebpf)?.remove(&tgid);
                if last {
                    self.word(slot, offset_of!(WatchEntry, overflow))?
                        .store(0, Ordering::Release);
                }
            }
        }
        Ok(())
    }

    /// Processes watched.
    pub fn len(&self) -> usize {
        self.placement.len()
    }

    pub fn is_empty(&self) -> bool {
        self.placement.is_empty()
    }
}

fn overflow_map(ebpf: &mut Ebpf) -> anyhow::Result<BpfHashMap<&mut MapData, u32, WatchEntry>> {
    Ok(BpfHashMap::try_from(
        ebpf.map_mut(OVERFLOW_MAP).context("map WATCHED missing")?,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_has_one_holder_and_counts_its_overflow() {
        let mut p = Placement::default();
        let (a, b, c) = (7, 7 + WATCH_SLOTS, 7 + 2 * WATCH_SLOTS);
        assert_eq!(p.place(a), Place::Table);
        assert_eq!(p.place(a), Place::Table, "placed once");
        assert_eq!(p.place(b), Place::Overflow);
        assert_eq!(p.place(c), Place::Overflow);
        assert_eq!(p.place(8), Place::Table);
        assert_eq!(p.len(), 4);
        // The slot's overflow word stays until its last overflowed process goes.
        assert_eq!(p.remove(b), Some((Place::Overflow, false)));
        assert_eq!(p.remove(c), Some((Place::Overflow, true)));
        assert_eq!(p.remove(c), None);
        // A freed slot takes the next process of its slot.
        assert_eq!(p.remove(a), Some((Place::Table, false)));
        assert_eq!(p.place(b), Place::Table);
    }

    #[test]
    fn random_placements_keep_one_holder_per_slot() {
        // Random watch/unwatch sequences over a few crowded slots: every watched process is in
        // exactly one place, each slot has at most one holder, and the overflow counts match.
        let mut next = crate::testing::xorshift();
        let mut p = Placement::default();
        let mut watched = std::collections::HashSet::new();
        for _ in 0..5000 {
            let tgid = 1 + (next() % 4) as u32 + WATCH_SLOTS * (next() % 5) as u32;
            if next().is_multiple_of(2) {
                p.place(tgid);
                watched.insert(tgid);
            } else {
                assert_eq!(p.remove(tgid).is_some(), watched.remove(&tgid));
            }
            assert_eq!(p.len(), watched.len());
            for slot in 1..=4 {
                let of_slot: Vec<_> = watched.iter().filter(|t| watch_slot(**t) == slot).collect();
                let held = of_slot
                    .iter()
                    .filter(|t| p.places[**t] == Place::Table)
                    .count();
                assert!(held <= 1);
                assert_eq!(
                    p.overflowed.get(&slot).copied().unwrap_or(0) as usize,
                    of_slot.len() - held
                );
            }
        }
    }
}
