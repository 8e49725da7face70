//! The updates the probes dropped (a full kernel map, or program runs the kernel skipped as
//! nested), by window, so that each record says how many were lost while it was open.

use std::collections::BTreeMap;

use crate::note::Note;

/// Updates the probes dropped (a full kernel map), by window, so each closed record says how
/// many were lost while it was open.
#[derive(Debug, Default)]
pub struct DropLedger {
    /// Cumulative drops per map at the last sample.
    last: BTreeMap<&'static str, u64>,
    /// Drops per window index.
    by_window: BTreeMap<u64, u64>,
    /// The window in which drops were last said.
    said: Option<u64>,
}

impl DropLedger {
    /// Takes the cumulative drops `now` seen by a sample in `window`; says (once per window)
    /// which maps are full.
    pub fn sample(&mut self, window: u64, now: Vec<(&'static str, u64)>) -> Option<Note> {
        let mut new = Vec::new();
        for (map, total) in now {
            let before = self.last.insert(map, total).unwrap_or(0);
            if total > before {
                new.push((map, total - before));
            }
        }
        if new.is_empty() {
            return None;
        }
        *self.by_window.entry(window).or_default() += new.iter().map(|(_, n)| n).sum::<u64>();
        if self.said == Some(window) {
            return None;
        }
        self.said = Some(window);
        let (nested, full): (Vec<_>, Vec<_>) = new
            .iter()
            .partition(|(m, _)| *m == crate::probes::NESTED_RUNS);
        let mut causes = Vec::new();
        if !full.is_empty() {
            let what: Vec<String> = full.iter().map(|(m, n)| format!("{n} by {m}")).collect();
            causes.push(format!(
                "updates dropped because a kernel map is full ({}); watch fewer VMs (--vm/--pid)",
                what.join(", ")
            ));
        }
        if let Some((_, n)) = nested.first() {
            causes.push(format!(
                "{n} probe runs skipped by the kernel because another BPF program or BPF map \
                 operation held the CPU (events of any process; some may be this VM's)"
            ));
        }
        Some(Note::general(format!(
            "{}: counts are low by up to that many",
            causes.join("; ")
        )))
    }

    /// Updates dropped while `window` was open.
    pub fn in_window(&self, window: u64) -> u64 {
        self.by_window.get(&window).copied().unwrap_or(0)
    }

    /// Forgets the windows before `oldest` (their records are written).
    pub fn forget_before(&mut self, oldest: u64) {
        self.by_window = self.by_window.split_off(&oldest);
    }

    /// Cumulative drops per map at the last sample.
    pub fn totals(&self) -> Vec<(&'static str, u64)> {
        self.last.iter().map(|(m, n)| (*m, *n)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipped_nested_runs_are_said_as_such_and_counted_in_their_window() {
        use crate::probes::NESTED_RUNS;
        let mut ledger = DropLedger::default();
        assert!(
            ledger
                .sample(0, vec![("COUNTERS", 0), (NESTED_RUNS, 0)])
                .is_none()
        );
        let note = ledger
            .sample(1, vec![("COUNTERS", 0), (NESTED_RUNS, 3)])
            .expect("said")
            .to_string();
        assert!(
            note.contains("3 probe runs skipped") && !note.contains("map is full"),
            "{note}"
        );
        let both = ledger
            .sample(2, vec![("COUNTERS", 2), (NESTED_RUNS, 4)])
            .expect("said")
            .to_string();
        assert!(
            both.contains("2 by COUNTERS") && both.contains("1 probe runs skipped"),
            "{both}"
        );
        assert_eq!(ledger.in_window(1), 3);
        assert_eq!(ledger.in_window(2), 3);
    }
}
