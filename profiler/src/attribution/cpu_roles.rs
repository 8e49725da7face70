//! Where a VM's CPU time goes: its threads' CPU time, read now and then, summed by role into
//! cumulative totals that windows take deltas of like any other count.

use std::collections::HashMap;

use crate::identity::threads::{KernelWorkerSample, ThreadRole, ThreadSample};

/// CPU clock ticks one VM's threads spent, by role, since the profiler first read them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoleTicks {
    /// vCPU threads (their guest time included).
    pub vcpu: u64,
    /// The part of `vcpu` the kernel accounted as guest time.
    pub vcpu_guest: u64,
    /// The main loop and iothreads.
    pub device_model: u64,
    /// Kernel workers that are threads of the QEMU process (part of its CPU time).
    pub workers_in_process: u64,
    /// Kernel threads outside the process that work for it (`kvm-pit/PID`): not part of its
    /// CPU time.
    pub workers_outside: u64,
    /// vCPU threads seen at the last read.
    pub vcpu_threads: u32,
}

impl RoleTicks {
    /// The ticks spent between `base` and `self` (thread counts are `self`'s).
    pub fn since(&self, base: &RoleTicks) -> RoleTicks {
        RoleTicks {
            vcpu: self.vcpu.saturating_sub(base.vcpu),
            vcpu_guest: self.vcpu_guest.saturating_sub(base.vcpu_guest),
            device_model: self.device_model.saturating_sub(base.device_model),
            workers_in_process: self
                .workers_in_process
                .saturating_sub(base.workers_in_process),
            workers_outside: self.workers_outside.saturating_sub(base.workers_outside),
            vcpu_threads: self.vcpu_threads,
        }
    }

    /// The ticks of the process's threads with a known role: what is left of the process's
    /// CPU time is its other threads', living and exited.
    pub fn in_process(&self) -> u64 {
        self.vcpu + self.device_model + self.workers_in_process
    }
}

/// One VM's threads as last read: each thread's role and CPU time, and the totals so far.
#[derive(Debug, Default)]
pub struct ThreadLedger {
    threads: HashMap<u32, (ThreadRole, bool, u64, u64)>,
    workers: HashMap<u32, u64>,
    totals: RoleTicks,
    read_before: bool,
}

impl ThreadLedger {
    /// Roles known for good, by thread: the next read need not ask again.
    pub fn settled_roles(&self) -> HashMap<u32, ThreadRole> {
        self.threads
            .iter()
            .filter(|(_, (_, settled, _, _))| *settled)
            .map(|(tid, (role, _, _, _))| (*tid, *role))
            .collect()
    }

    /// Adds what each thread spent since the last read; returns the totals. The first read only
    /// sets where counting starts. A thread first seen after that started since the last read,
    /// so all its time is new.
    pub fn update(
        &mut self,
        threads: &[ThreadSample],
        workers: &[KernelWorkerSample],
    ) -> RoleTicks {
        let first = !self.read_before;
        self.read_before = true;
        let mut seen = HashMap::with_capacity(threads.len());
        for t in threads {
            let (before, guest_before) = match self.threads.get(&t.tid) {
                Some((_, _, ticks, guest)) => (*ticks, *guest),
                None if first => (t.ticks, t.guest_ticks),
                None => (0, 0),
            };
            let spent = t.ticks.saturating_sub(before);
            match t.role {
                ThreadRole::Vcpu => {
                    self.totals.vcpu += spent;
                    self.totals.vcpu_guest += t.guest_ticks.saturating_sub(guest_before);
                }
                ThreadRole::DeviceModel => self.totals.device_model += spent,
                ThreadRole::KernelWorker => self.totals.workers_in_process += spent,
                ThreadRole::Other => {}
            }
            seen.insert(t.tid, (t.role, t.settled, t.ticks, t.guest_ticks));
        }
        self.threads = seen;
        self.totals.vcpu_threads = threads
            .iter()
            .filter(|t| t.role == ThreadRole::Vcpu)
            .count() as u32;
        let mut seen = HashMap::with_capacity(workers.len());
        for w in workers {
            let before = match self.workers.get(&w.tid) {
                Some(ticks) => *ticks,
                None if first => w.ticks,
                None => 0,
            };
            self.totals.workers_outside += w.ticks.saturating_sub(before);
            seen.insert(w.tid, w.ticks);
        }
        self.workers = seen;
        self.totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread(tid: u32, role: ThreadRole, ticks: u64, guest_ticks: u64) -> ThreadSample {
        ThreadSample {
            tid,
            role,
            settled: true,
            ticks,
            guest_ticks,
        }
    }

    #[test]
    fn counting_starts_at_the_first_read_and_adds_deltas_by_role() {
        let mut ledger = ThreadLedger::default();
        let worker = |ticks| KernelWorkerSample {
            owner: 1,
            tid: 9,
            ticks,
        };
        let first = ledger.update(
            &[
                thread(1, ThreadRole::DeviceModel, 500, 0),
                thread(2, ThreadRole::Vcpu, 9000, 40),
            ],
            &[worker(70)],
        );
        assert_eq!(
            first,
            RoleTicks {
                vcpu_threads: 1,
                ..RoleTicks::default()
            }
        );
        let second = ledger.update(
            &[
                thread(1, ThreadRole::DeviceModel, 510, 0),
                thread(2, ThreadRole::Vcpu, 9300, 41),
                // Started since the last read: all of it is new.
                thread(3, ThreadRole::KernelWorker, 4, 0),
                thread(4, ThreadRole::Other, 50, 0),
                thread(5, ThreadRole::Vcpu, 20, 0),
            ],
            &[worker(84)],
        );
        assert_eq!(
            second,
            RoleTicks {
                vcpu: 320,
                vcpu_guest: 1,
                device_model: 10,
                workers_in_process: 4,
                workers_outside: 14,
                vcpu_threads: 2,
            }
        );
        assert_eq!(second.in_process(), 334);
        // A thread that exited takes its last counted ticks along; the totals never go back.
        let third = ledger.update(&[thread(1, ThreadRole::DeviceModel, 511, 0)], &[]);
        assert_eq!(third.vcpu, 320);
        assert_eq!(third.device_model, 11);
        assert_eq!(third.vcpu_threads, 0);
        assert_eq!(third.since(&second).device_model, 1);
        assert_eq!(third.since(&second).vcpu, 0);
    }

    #[test]
    fn only_settled_roles_are_kept() {
        let mut ledger = ThreadLedger::default();
        let mut unsure = thread(7, ThreadRole::Other, 1, 0);
        unsure.settled = false;
        ledger.update(&[thread(2, ThreadRole::Vcpu, 1, 0), unsure], &[]);
        assert_eq!(
            ledger.settled_roles(),
            HashMap::from([(2, ThreadRole::Vcpu)])
        );
    }
}
