//! The wait-syscall tracepoints that classify QEMU wakeups: the timer source of last resort
//! (see `profiler-ebpf/src/probes/timers.rs` for the kernel side, and [`super::libc_waits`]
//! for the source that is preferred).
//!
//! While any `syscalls:*` tracepoint is enabled, every task on the host takes the slow
//! syscall path, so they are attached only while some watched VM is counted by them, and
//! detached when the last one goes.

use aya::Ebpf;

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

/// Drops the wait states of process `tgid`'s threads: a thread killed inside its wait never
/// reaches the exit probe that would remove its entry.
pub fn forget_process(ebpf: &mut Ebpf, tgid: u32) {
    super::batch::remove_where::<u32, profiler_common::PendingWait>(ebpf, PENDING_MAP, |_, w| {
        w.tgid == tgid
    });
}
