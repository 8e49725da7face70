//! Timer vs fd wakeups of QEMU's event loops, counted at its C library's wait functions
//! (`ppoll`, `epoll_pwait`, `epoll_pwait2`) by uprobes scoped to each QEMU process: only QEMU
//! pays, where the `syscalls:*` tracepoints move every task of the host onto the slow
//! syscall path. Same semantics as `timers.rs`: the entry remembers the timeout's class, the
//! return classifies the result.
//!
//! glibc returns -1 with errno on error (a wait error, as the syscall's negative return is).

use aya_ebpf::{
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use profiler_common::wait_syscall;

use super::timers::{classify, millis_class, remember, timespec_class};
use crate::maps::{current_ids, watched_uprobe_hit};

/// `int ppoll(struct pollfd *fds, nfds_t nfds, const struct timespec *tmo_p, const sigset_t *)`.
#[uprobe]
pub fn libc_ppoll(ctx: ProbeContext) -> u32 {
    let (tgid, tid) = current_ids();
    if !watched_uprobe_hit(tgid) {
        return 0;
    }
    let tsp: u64 = ctx.arg(2).unwrap_or(0);
    remember(tgid, tid, wait_syscall::PPOLL, timespec_class(tsp))
}

/// `int epoll_pwait(int epfd, struct epoll_event *events, int maxevents, int timeout, …)`.
#[uprobe]
pub fn libc_epoll_pwait(ctx: ProbeContext) -> u32 {
    let (tgid, tid) = current_ids();
    if !watched_uprobe_hit(tgid) {
        return 0;
    }
    let timeout: u64 = ctx.arg(3).unwrap_or(0);
    remember(
        tgid,
        tid,
        wait_syscall::EPOLL_PWAIT,
        millis_class(timeout as u32 as i32),
    )
}

/// `int epoll_pwait2(int epfd, struct epoll_event *events, int maxevents,
/// const struct timespec *timeout, …)`.
#[uprobe]
pub fn libc_epoll_pwait2(ctx: ProbeContext) -> u32 {
    let (tgid, tid) = current_ids();
    if !watched_uprobe_hit(tgid) {
        return 0;
    }
    let tsp: u64 = ctx.arg(3).unwrap_or(0);
    remember(tgid, tid, wait_syscall::EPOLL_PWAIT2, timespec_class(tsp))
}

/// The return of any of them.
#[uretprobe]
pub fn libc_wait_return(ctx: RetProbeContext) -> u32 {
    let (tgid, tid) = current_ids();
    if !watched_uprobe_hit(tgid) {
        return 0;
    }
    let ret: u64 = ctx.ret();
    classify(tgid, tid, ret as i32 as i64)
}
