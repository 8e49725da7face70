//! The hrtimer tracepoints as a timer source (`--timer-source hrtimer`; the kernel side is
//! `profiler-ebpf/src/probes/hrtimers.rs`): a watched thread's wait with a finite timeout arms
//! a sleep timer, which expires (a `timer` event) or is cancelled by an earlier wakeup (an fd
//! wakeup). A wait with an infinite timeout arms no timer: the `sched_switch` raw tracepoint
//! sees its thread go to sleep in it and come back (an fd wakeup). Other processes run one array load
//! per timer they arm and per context switch; a watched QEMU takes no trap (the libc uprobes
//! cost it one per wait call, zero-timeout polls included).
//!
//! What it needs, checked at load (otherwise the source is unavailable, with the reason):
//! the classic tracepoints with the field layout the programs read, the address of
//! `hrtimer_wakeup` in `/proc/kallsyms`, and programs that load (they read the syscall number
//! through `bpf_task_pt_regs`, Linux 5.15).

use std::path::Path;

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{Array, MapData},
};
use profiler_common::Sleeper;

use crate::probes::kernel::{
    detacher::Detach,
    tracepoint_group::{Tracepoint, TracepointGroup},
};

/// The programs, named after their tracepoints. The expiry's is a raw tracepoint: it runs
/// in the timer interrupt, where a classic tracepoint's program is skipped whenever another
/// BPF program was running on that CPU (a lost timer event). `sched_switch`'s too: it runs
/// at every context switch on the host, and a classic tracepoint builds its record first.
/// (Its raw arguments include `prev_state` since Linux 5.18; an older kernel refuses the
/// attach, as the program reads that argument, and the source is then unavailable.)
const PROGRAMS: [(Tracepoint, &str); 4] = [
    (Tracepoint::Classic("timer"), START_PROGRAM),
    (Tracepoint::Raw, "hrtimer_expire_entry"),
    (Tracepoint::Classic("timer"), "hrtimer_cancel"),
    (Tracepoint::Raw, "sched_switch"),
];
/// The one the libc result probes need (it marks a ppoll that armed its timeout).
pub const START_PROGRAM: &str = "hrtimer_start";
/// The programs that count only sleep timers, which their sleeper arms and cancels in its own
/// process context, where no other BPF program can be running: the kernel skips their runs
/// only for timers armed or cancelled in an interrupt (the tick's), never one they count, so
/// those skips are not lost counts.
pub const PROCESS_CONTEXT_PROGRAMS: [&str; 2] = [START_PROGRAM, "hrtimer_cancel"];
/// Armed sleep timers of watched threads.
pub const SLEEPERS_MAP: &str = "SLEEPERS";

/// The hrtimer tracepoints, attached while some VM uses them.
#[derive(Debug)]
pub struct HrtimerWaits {
    /// The tracepoints, or why this host cannot have them.
    group: Result<TracepointGroup, String>,
    /// `hrtimer_start` alone, for the libc result probes (the same program: while both are
    /// attached it runs twice per timer, and its map updates are idempotent), or why not.
    starts: Result<TracepointGroup, String>,
}

impl HrtimerWaits {
    /// Prepares the source; never fails the profiler: a host without it gets the reason at
    /// each attach.
    pub fn load(ebpf: &mut Ebpf, tracefs: &Path) -> Self {
        use crate::offer::kernel::{hrtimer_offered_here, hrtimer_start_offered_here};
        let starts = (|| {
            let wakeup = hrtimer_start_offered_here(tracefs).map_err(anyhow::Error::msg)?;
            let mut slot: Array<&mut MapData, u64> = Array::try_from(
                ebpf.map_mut("HRTIMER_WAKEUP")
                    .context("map HRTIMER_WAKEUP missing")?,
            )?;
            slot.set(0, wakeup, 0)?;
            TracepointGroup::load(
                ebpf,
                vec![(Tracepoint::Classic("timer"), START_PROGRAM.to_string())],
            )
        })()
        .map_err(|e| format!("{e:#}"));
        let group = match &starts {
            Err(why) => Err(why.clone()),
            Ok(_) => (|| {
                hrtimer_offered_here(tracefs).map_err(anyhow::Error::msg)?;
                let others = PROGRAMS
                    .iter()
                    .filter(|(_, name)| *name != START_PROGRAM)
                    .map(|&(kind, name)| (kind, name.to_string()))
                    .collect();
                TracepointGroup::load(ebpf, others)?;
                Ok::<_, anyhow::Error>(TracepointGroup::loaded(
                    PROGRAMS
                        .map(|(kind, name)| (kind, name.to_string()))
                        .to_vec(),
                ))
            })()
            .map_err(|e| format!("{e:#}")),
        };
        Self { group, starts }
    }

    /// Attaches `timer:hrtimer_start` alone for `pid` (the libc result probes).
    pub fn acquire_starts(&mut self, ebpf: &mut Ebpf, pid: u32) -> anyhow::Result<()> {
        match &mut self.starts {
            Ok(starts) => starts.acquire(ebpf, pid),
            Err(why) => bail!("timer:hrtimer_start is not available: {why}"),
        }
    }

    /// Stops `hrtimer_start` for `pid` (see [`TracepointGroup::release`]).
    #[must_use = "closing the returned links detaches the tracepoint"]
    pub fn release_starts(&mut self, ebpf: &mut Ebpf, pid: u32) -> Vec<Detach> {
        match &mut self.starts {
            Ok(starts) => starts.release(ebpf, pid),
            Err(_) => Vec::new(),
        }
    }

    /// Counts `pid`'s waits: attaches the tracepoints if none is (all or none).
    pub fn acquire(&mut self, ebpf: &mut Ebpf, pid: u32) -> anyhow::Result<()> {
        match &mut self.group {
            Ok(group) => group.acquire(ebpf, pid),
            Err(why) => bail!("the hrtimer tracepoints are not available: {why}"),
        }
    }

    /// Stops counting `pid`; the last user takes the links (see [`TracepointGroup::release`]).
    #[must_use = "closing the returned links detaches the tracepoints"]
    pub fn release(&mut self, ebpf: &mut Ebpf, pid: u32) -> Vec<Detach> {
        match &mut self.group {
            Ok(group) => group.release(ebpf, pid),
            Err(_) => Vec::new(),
        }
    }

    /// Whether this host can have the source (`--timer-source hrtimer`), or why not.
    pub fn status(&self) -> Result<(), String> {
        self.group.as_ref().map(|_| ()).map_err(Clone::clone)
    }

    /// Whether `timer:hrtimer_start` alone can be had (the libc result probes), or why not.
    pub fn starts_status(&self) -> Result<(), String> {
        self.starts.as_ref().map(|_| ()).map_err(Clone::clone)
    }

    pub fn is_attached(&self) -> bool {
        self.group.as_ref().is_ok_and(TracepointGroup::is_attached)
    }

    pub fn detach_all(&mut self, ebpf: &mut Ebpf) {
        if let Ok(group) = &mut self.group {
            group.detach_all(ebpf);
        }
        if let Ok(starts) = &mut self.starts {
            starts.detach_all(ebpf);
        }
    }
}

/// Drops the armed timers of process `tgid` (a thread killed in its wait has its timer
/// cancelled, which removes the entry; one left by a detach mid-wait is removed here).
pub fn forget_process(ebpf: &mut Ebpf, tgid: u32) {
    crate::probes::kernel::batch::remove_where::<u64, Sleeper>(ebpf, SLEEPERS_MAP, |_, s| {
        s.tgid == tgid
    });
}
