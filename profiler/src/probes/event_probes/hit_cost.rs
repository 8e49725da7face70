//! What one uprobe hit costs the probed thread on this host, measured at start-up in the
//! profiler's own thread: the overhead budget's first figure.

use profiler_common::{link_generation, watch_flag};

use crate::{offer::libc::LibcProbes, probes::HitCost};

use super::EventProbes;

impl EventProbes {
    /// What one uprobe hit costs a thread here: this process's own `ppoll`s, timed without
    /// and with the libc wait probes (the programs run in full: this process is watched as a
    /// budgeted VM). Two kinds of call: zero-timeout polls in a tight loop (a hit with hot
    /// caches: the floor), and polls that sleep 50 µs first (a hit after a sleep, as most of
    /// QEMU's are: cold caches and TLB make it several times dearer on nested virtualization,
    /// and a budget computed from the hot figure did not hold; the budget starts from the
    /// larger). Both
    /// by thread CPU time (preemption and the sleep are not costs), three interleaved tries of
    /// each; each kind's cost is its fastest probed try minus its fastest bare try, so a try
    /// an interrupt or a busy neighbour slowed drops out on either side. (The difference of
    /// each try's pair, once taken instead, varied tenfold between runs: one slowed bare try
    /// made the budget think a hit nearly free, and a VM never paused never teaches it
    /// otherwise.)
    pub(super) fn measure_uprobe_hit_cost(&mut self) -> anyhow::Result<HitCost> {
        const TIGHT_CALLS: u32 = 5000;
        const SLEEPING_CALLS: u32 = 600;
        let pid = std::process::id();
        let offer = self
            .libc_catalog
            .offer(pid)
            .map_err(|why| anyhow::anyhow!("measuring the uprobe cost: {why}"))?;
        let time_calls = |calls: u32, nanos: i64| {
            let timeout = libc::timespec {
                tv_sec: 0,
                tv_nsec: nanos,
            };
            let now = || {
                let mut ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: a valid clock id and a pointer to a timespec.
                unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
                ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
            };
            let start = now();
            for _ in 0..calls {
                // SAFETY: no fds, a valid timespec, no signal mask.
                unsafe { libc::ppoll(std::ptr::null_mut(), 0, &timeout, std::ptr::null()) };
            }
            (now() - start) / f64::from(calls)
        };
        let _attaching = self.detacher.hold();
        // Watched as a budgeted VM is, so each hit runs the whole program (remember, classify,
        // the hit count), not only the early return of an unwatched process.
        let wait_block = self.counters.wait_block(pid);
        let generation = link_generation::FIRST;
        self.watch_table
            .set_generation(&mut self.ebpf, pid, generation)?;
        self.watch_table
            .set(&mut self.ebpf, pid, watch_flag::COUNT_HITS, wait_block)?;
        // The probes the libc source would use here: one hit per call at the result, two at
        // entry and return.
        let (how, hits) = match offer.result_points() {
            Ok(_) => (LibcProbes::Result, 1.0),
            Err(_) => (LibcProbes::EntryReturn, 2.0),
        };
        // Fastest (tight, sleeping) per call, bare and probed.
        let mut bare = (f64::INFINITY, f64::INFINITY);
        let mut probed = (f64::INFINITY, f64::INFINITY);
        let fastest = |best: &mut (f64, f64), tight: f64, sleeping: f64| {
            best.0 = best.0.min(tight);
            best.1 = best.1.min(sleeping);
        };
        let mut result = Ok(());
        for _ in 0..3 {
            fastest(
                &mut bare,
                time_calls(TIGHT_CALLS, 0),
                time_calls(SLEEPING_CALLS, 50_000),
            );
            if let Err(e) = self
                .libc
                .attach(&mut self.ebpf, pid, &offer, how, generation)
            {
                result = Err(e);
                break;
            }
            fastest(
                &mut probed,
                time_calls(TIGHT_CALLS, 0),
                time_calls(SLEEPING_CALLS, 50_000),
            );
            self.libc.detach(&mut self.ebpf, pid);
        }
        self.watch_table.remove(&mut self.ebpf, pid)?;
        self.forget_counters(pid)?;
        result?;
        Ok(HitCost {
            tight: ((probed.0 - bare.0) / hits).max(1e-9),
            after_sleep: ((probed.1 - bare.1) / hits).max(1e-9),
        })
    }
}
