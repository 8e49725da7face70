//! The wait-syscall tracepoints that classify QEMU wakeups: the timer source of last resort
//! (see `profiler-ebpf/src/probes/timers.rs` for the kernel side, and [`super::libc_waits`]
//! for the source that is preferred).
//!
//! While any `syscalls:*` tracepoint is enabled, every task on the host takes the slow
//! syscall path, so they are attached only while some watched VM is counted by them, and
//! detached when the last one goes.

use std::{mem::offset_of, sync::atomic::Ordering};

use aya::Ebpf;
use profiler_common::{MARK_SLOTS, PpollMark};

use super::mapped::MappedArray;

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
pub type SyscallWaits = super::tracepoint_group::TracepointGroup;

/// Loads the wait-syscall programs (verifying them now, so a later attach cannot fail on
/// that).
pub fn load(ebpf: &mut Ebpf) -> anyhow::Result<SyscallWaits> {
    SyscallWaits::load(ebpf, "syscalls", programs().collect())
}

/// The per-thread wait state map (thread id -> [`profiler_common::PendingWait`]).
pub const PENDING_MAP: &str = "PENDING";

/// The libc result source's per-thread ppoll marks ([`profiler_common::PpollMark`]).
pub const MARKS_MAP: &str = "PPOLL_MARKS";

/// Drops the wait states of process `tgid`'s threads: a thread killed inside its wait never
/// reaches the exit probe that would remove its entry, and a mark left while its probes were
/// paused must not classify its next zero-timeout poll. Its threads' `PPOLL_MARKS` slots are
/// freed for other threads.
pub fn forget_process(ebpf: &mut Ebpf, tgid: u32) {
    super::batch::remove_where::<u32, profiler_common::PendingWait>(ebpf, PENDING_MAP, |_, w| {
        w.tgid == tgid
    });
    // Not mapped: the whole file has no other use for it.
    if let Ok(marks) = MappedArray::map(ebpf, MARKS_MAP, MARK_SLOTS, size_of::<PpollMark>()) {
        free_marks(&marks, tgid);
    }
}

/// Frees the `PPOLL_MARKS` slots of process `tgid`'s threads.
fn free_marks(marks: &MappedArray, tgid: u32) {
    let owner = |slot| marks.u64_at(slot, offset_of!(PpollMark, owner));
    let armed = |slot| marks.u64_at(slot, offset_of!(PpollMark, armed));
    for slot in 0..MARK_SLOTS {
        let Some(held) = owner(slot) else { break };
        let word = held.load(Ordering::Relaxed);
        if word != 0 && PpollMark::owner_tgid(word) == tgid {
            if let Some(armed) = armed(slot) {
                armed.store(0, Ordering::Relaxed);
            }
            // Only if still the same thread's (the programs claim free slots atomically).
            let _ = held.compare_exchange(word, 0, Ordering::AcqRel, Ordering::Relaxed);
        }
    }
}
