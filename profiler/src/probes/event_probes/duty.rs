//! The overhead budget's duty cycle: a pause takes a VM's uprobe links (they stop counting at
//! once: their generation is no longer current) and a resume attaches new ones beside them.

use std::time::Duration;

use profiler_common::{link_generation, watch_flag};

use crate::{
    offer::{
        libc::LibcProbes,
        policy::{ReadWriteSource, VmSources},
    },
    probes::{kernel::detacher, sources::syscall_waits},
};

use super::{EventProbes, Served};

impl EventProbes {
    /// Pauses (`on == false`) or resumes the uprobes serving `pid`: [`ProbeLayer::set_probing`].
    pub(super) fn set_duty(&mut self, pid: u32, on: bool) -> anyhow::Result<Duration> {
        let Some(served) = self.served.get(&pid).cloned() else {
            return Ok(Duration::ZERO);
        };
        if served.paused != on {
            return Ok(Duration::ZERO);
        }
        let generation = self.watch_table.generation(pid);
        if !on {
            // Its links stop counting at once (each run until it is closed, a grace period
            // later in the background, counts as a closing hit and nothing else).
            self.watch_table.set_generation(
                &mut self.ebpf,
                pid,
                link_generation::next(generation),
            )?;
            let items = self.pause_uprobes(pid, &served.sources);
            self.detacher.submit(pid, items);
            if let Some(s) = self.served.get_mut(&pid) {
                s.paused = true;
            }
            return Ok(Duration::ZERO);
        }
        // New links of the next generation, beside the old ones still being closed (those no
        // longer count); they count once every one of them is in.
        let live = link_generation::next(generation);
        let started = std::time::Instant::now();
        let attaching = self.detacher.hold();
        let resumed = self.resume_uprobes(pid, &served, live);
        drop(attaching);
        if let Err(e) = resumed {
            // Half a resume is no resume: leave it paused and say why.
            let items = self.pause_uprobes(pid, &served.sources);
            self.detacher.submit(pid, items);
            return Err(e);
        }
        self.watch_table.set_generation(&mut self.ebpf, pid, live)?;
        if let Some(s) = self.served.get_mut(&pid) {
            s.paused = false;
        }
        Ok(started.elapsed())
    }
    /// Takes the uprobe links serving `pid` for the detacher (a budget pause); counters and
    /// tracepoints stay.
    pub(super) fn pause_uprobes(&mut self, pid: u32, sources: &VmSources) -> Vec<detacher::Detach> {
        let mut items = Vec::new();
        if let Ok(Some(how)) = sources.timer.as_ref().map(|t| t.libc_probes()) {
            items.extend(self.libc.take(&mut self.ebpf, pid));
            if how == LibcProbes::Result {
                // `timer:hrtimer_start` is host-wide and stays attached: without the flag its
                // program returns at the watch-table load for this VM's timers, which would
                // otherwise cost it a good part of a small budget while its probes are away.
                let _ = self.set_watch_flags(pid, 0);
            }
        }
        items.extend(self.usdt.take(&mut self.ebpf, pid));
        items.extend(self.symbols.pause(&mut self.ebpf, pid));
        items
    }
    /// Attaches again what served `pid` before its pause, as links of `generation`.
    pub(super) fn resume_uprobes(
        &mut self,
        pid: u32,
        served: &Served,
        generation: u32,
    ) -> anyhow::Result<()> {
        if let Ok(how) = served.sources.timer.as_ref().map(|t| t.libc_probes())
            && let (Some(how), Some(libc)) = (how, &served.libc)
        {
            // A ppoll's timer mark (or an entry) left while the probes were away must not
            // classify the thread's next wait.
            let tids = syscall_waits::thread_ids(pid);
            self.ppoll_marks.disarm_threads(pid, tids.iter().copied());
            syscall_waits::clear_pending(&mut self.ebpf, pid, tids);
            self.libc
                .attach(&mut self.ebpf, pid, libc, how, generation)?;
            if how == LibcProbes::Result {
                // Marks again (a wait in flight meanwhile is at worst one misclassified).
                self.set_watch_flags(pid, watch_flag::WAITS_BY_LIBC_RESULT)?;
            }
        }
        if served.sources.read_write == Ok(ReadWriteSource::Usdt) {
            self.attach_read_write(
                ReadWriteSource::Usdt,
                pid,
                served.exe.as_deref(),
                generation,
            )
            .map_err(anyhow::Error::msg)?;
        }
        // Dispatch, timer_mod and every callback discovered so far, as they were.
        self.symbols.resume(&mut self.ebpf, pid, generation)
    }
}
