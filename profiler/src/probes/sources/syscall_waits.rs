//! The wait-syscall tracepoints that classify QEMU wakeups: the timer source of last resort
//! (see `profiler-ebpf/src/probes/timers.rs` for the kernel side, and [`crate::probes::sources::libc_waits`]
//! for the source that is preferred).
//!
//! While any `syscalls:*` tracepoint is enabled, every task on the host takes the slow
//! syscall path, so they are attached only while some watched VM is counted by them, and
//! detached when the last one goes.

use std::{mem::offset_of, sync::atomic::Ordering};

use aya::Ebpf;
use profiler_common::{MARK_SLOTS, PendingWait, PpollMark, wait_syscall};

use crate::probes::kernel::mapped::MappedArray;

/// Syscalls QEMU sleeps in. Each has an enter program (remembers the timeout) and an exit
/// program (classifies the result); both are named after their tracepoint.
pub const WAIT_SYSCALLS: &[&str] = &["ppoll", "epoll_pwait", "epoll_pwait2", "io_uring_enter"];

fn programs() -> impl Iterator<Item = String> {
    WAIT_SYSCALLS.iter().flat_map(|syscall| {
        ["enter", "exit"]
            .into_iter()
            .map(move |phase| format!("sys_{phase}_{syscall}"))
    })
}

/// The wait-syscall tracepoints, attached while some VM uses them.
pub type SyscallWaits = crate::probes::kernel::tracepoint_group::TracepointGroup;

/// Loads the wait-syscall programs (verifying them now, so a later attach cannot fail on
/// that).
pub fn load(ebpf: &mut Ebpf) -> anyhow::Result<SyscallWaits> {
    SyscallWaits::load(
        ebpf,
        programs()
            .map(|p| {
                (
                    crate::probes::kernel::tracepoint_group::Tracepoint::Classic("syscalls"),
                    p,
                )
            })
            .collect(),
    )
}

/// The per-thread wait state map (thread id -> [`profiler_common::PendingWait`]).
pub const PENDING_MAP: &str = "PENDING";

/// The libc result source's per-thread ppoll marks ([`profiler_common::PpollMark`]).
pub const MARKS_MAP: &str = "PPOLL_MARKS";

/// Drops the `PENDING` entries of process `tgid`'s threads: a thread killed inside its wait
/// never reaches the exit probe that would remove its entry. (A scan of the map: on exit or
/// unwatch only.)
pub fn forget_process(ebpf: &mut Ebpf, tgid: u32) {
    crate::probes::kernel::batch::remove_where::<u32, PendingWait>(ebpf, PENDING_MAP, |_, w| {
        w.tgid == tgid
    });
}

/// The libc result source's `PPOLL_MARKS`, mapped once for the profiler's life: freeing a
/// process's slots and disarming its threads' marks are then loads and stores, with no
/// mapping, fault or syscall per call.
pub struct PpollMarks {
    marks: MappedArray,
}

impl PpollMarks {
    pub fn open(ebpf: &Ebpf) -> anyhow::Result<Self> {
        Ok(Self {
            marks: MappedArray::map(ebpf, MARKS_MAP, MARK_SLOTS, size_of::<PpollMark>())?,
        })
    }

    /// Frees the slots of process `tgid`'s threads for other threads (it is no longer
    /// watched). A scan of every slot, so the slots of its threads that exited earlier are
    /// found too.
    pub fn free_process(&self, tgid: u32) {
        for slot in 0..MARK_SLOTS {
            let Some(held) = self.owner(slot) else { break };
            let word = held.load(Ordering::Relaxed);
            if word != 0 && PpollMark::owner_tgid(word) == tgid {
                self.disarm(slot);
                // Only if still the same thread's (the programs claim free slots atomically).
                let _ = held.compare_exchange(word, 0, Ordering::AcqRel, Ordering::Relaxed);
            }
        }
    }

    /// Disarms the marks of threads `tids` of process `tgid` (its probes resume after a
    /// pause): a mark left by a wait in flight when the probes went must not classify the
    /// thread's next zero-timeout poll. One slot per thread; the slots stay claimed.
    pub fn disarm_threads(&self, tgid: u32, tids: impl IntoIterator<Item = u32>) {
        for tid in tids {
            let slot = profiler_common::mark_slot(tid);
            if self
                .owner(slot)
                .is_some_and(|o| o.load(Ordering::Relaxed) == PpollMark::owner_of(tid, tgid))
            {
                self.disarm(slot);
            }
        }
    }

    fn owner(&self, slot: u32) -> Option<&std::sync::atomic::AtomicU64> {
        self.marks.u64_at(slot, offset_of!(PpollMark, owner))
    }

    fn disarm(&self, slot: u32) {
        if let Some(armed) = self.marks.u64_at(slot, offset_of!(PpollMark, armed)) {
            armed.store(0, Ordering::Relaxed);
        }
    }
}

/// Empties the `PENDING` entries of threads `tids` of process `tgid` (its probes resume after
/// a pause): a wait entered before the pause whose return went unseen, or a libc result
/// source's mark (the fallback of a thread without its own `PPOLL_MARKS` slot), must not
/// classify the thread's next wait. One lookup per thread, not a scan of the map; the entry
/// stays, emptied, as the programs keep it for reuse.
pub fn clear_pending(ebpf: &mut Ebpf, tgid: u32, tids: impl IntoIterator<Item = u32>) {
    let Some(Ok(mut pending)) = ebpf
        .map_mut(PENDING_MAP)
        .map(aya::maps::HashMap::<_, u32, PendingWait>::try_from)
    else {
        return;
    };
    for tid in tids {
        if let Ok(wait) = pending.get(&tid, 0)
            && wait.tgid == tgid
            && wait.syscall != wait_syscall::NONE
        {
            let cleared = PendingWait {
                syscall: wait_syscall::NONE,
                ..wait
            };
            let _ = pending.insert(tid, cleared, 0);
        }
    }
}

/// The thread ids of process `pid` now (`/proc/PID/task`); none if it is gone.
pub fn thread_ids(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}
