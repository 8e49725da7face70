//! Timer vs fd wakeups of QEMU's event loops, counted at its C library's wait functions
//! (`ppoll`, `epoll_pwait`, `epoll_pwait2`) by uprobes scoped to each QEMU process: only QEMU
//! pays, where the `syscalls:*` tracepoints move every task of the host onto the slow
//! syscall path. Same semantics as `timers.rs`: the entry remembers the timeout's class, the
//! return classifies the result.
//!
//! Two ways to attach, one trap per wait or two:
//!
//! - **At the result** ([`libc_wait_result`], the default): one uprobe on the conditional
//!   jump right after each `syscall` instruction of the function (glibc's
//!   `syscall; cmp $-4096,%rax; ja error`). There `rax` is the kernel's raw result and every
//!   argument register still holds what the kernel was given (the `syscall` instruction
//!   clobbers only `rcx` and `r11`), so the result and the timeout are both at hand: one trap
//!   per wait, and a jump is emulated by the kernel (no single-step). The one ambiguity is a
//!   `ppoll` returning 0: the kernel wrote the remaining time (0) over glibc's copy of the
//!   timeout, so a zero-timeout poll and an expired timed wait look alike. A timed wait armed
//!   a sleep timer on its way, so `timer:hrtimer_start` (in the thread's own context) marks the
//!   thread in `PENDING`, and that mark says "timer".
//! - **At entry and return** (`libc_ppoll`… + [`libc_wait_return`]): two traps per wait (the
//!   return probe's entry breakpoint and its return trampoline); the fallback for a C library
//!   whose syscall sites are not the pattern above (musl, another glibc build).
//!
//! glibc returns -1 with errno on error (a wait error, as the syscall's negative return is).

use aya_ebpf::{
    EbpfContext as _,
    helpers::bpf_get_attach_cookie,
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use profiler_common::{kind, link_generation, timeout_class, wait_syscall};

use super::timers::{classify, millis_class, remember, take_ppoll_timer_mark, timespec_class};
use crate::maps::{count_wait, current_ids, watched_uprobe_hit};

/// The kind of the wait that just returned `ret` (the raw kernel result), `syscall` being one
/// of [`wait_syscall`], with timeout class `timeout` (unknown for a ppoll) and whether the
/// thread armed a sleep timer in it (`armed`). `None`: nothing to count.
#[inline(always)]
fn result_kind(ret: i64, timeout: u32, armed: bool) -> Option<u32> {
    if ret > 0 {
        Some(kind::FD_WAKEUP)
    } else if ret < 0 {
        Some(kind::WAIT_ERROR)
    } else if armed {
        Some(kind::TIMER)
    } else {
        match timeout {
            timeout_class::FINITE => Some(kind::TIMER),
            timeout_class::ZERO => Some(kind::NONBLOCKING_POLL),
            _ => None,
        }
    }
}

/// After the `syscall` instruction of `ppoll`, `epoll_pwait` or `epoll_pwait2` (the cookie
/// says which, as a [`wait_syscall`]).
#[uprobe]
pub fn libc_wait_result(ctx: ProbeContext) -> u32 {
    let (tgid, tid) = current_ids();
    // SAFETY: the helper only reads the attach cookie.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let Some(watched) = watched_uprobe_hit(tgid, cookie) else {
        return 0;
    };
    let syscall = link_generation::strip(cookie);
    // SAFETY: the registers are this probe hit's pt_regs (the program's context).
    let (ret, rdx, r10) = unsafe {
        let regs = &*ctx.regs;
        (regs.rax as i64, regs.rdx, regs.r10)
    };
    // The mark of a sleep timer armed in this ppoll, consumed whatever the result. Only
    // ppolls are marked (the epoll waits' timeouts are in the registers): no lookup for those.
    let armed = syscall == wait_syscall::PPOLL && take_ppoll_timer_mark(tgid, tid);
    let timeout = match syscall {
        // The timespec the kernel got (glibc's copy) now holds the time left: not the
        // timeout, except that NULL is still NULL (an infinite wait cannot return 0 anyway).
        wait_syscall::PPOLL if rdx == 0 => timeout_class::INFINITE,
        wait_syscall::PPOLL => timeout_class::ZERO,
        wait_syscall::EPOLL_PWAIT => millis_class(r10 as u32 as i32),
        wait_syscall::EPOLL_PWAIT2 => timespec_class(r10),
        _ => return 0,
    };
    // A ppoll that returned 0 without arming a timer had a zero timeout.
    if let Some(kind) = result_kind(ret, timeout, armed) {
        count_wait(&watched, kind, syscall);
    }
    0
}

/// The BPF cookie of the entry link that runs (its [`link_generation`]).
#[inline(always)]
fn link_cookie(ctx: &ProbeContext) -> u64 {
    // SAFETY: the helper only reads the attach cookie.
    unsafe { bpf_get_attach_cookie(ctx.as_ptr()) }
}

/// `int ppoll(struct pollfd *fds, nfds_t nfds, const struct timespec *tmo_p, const sigset_t *)`.
#[uprobe]
pub fn libc_ppoll(ctx: ProbeContext) -> u32 {
    let (tgid, tid) = current_ids();
    if watched_uprobe_hit(tgid, link_cookie(&ctx)).is_none() {
        return 0;
    }
    let tsp: u64 = ctx.arg(2).unwrap_or(0);
    remember(tgid, tid, wait_syscall::PPOLL, timespec_class(tsp))
}

/// `int epoll_pwait(int epfd, struct epoll_event *events, int maxevents, int timeout, …)`.
#[uprobe]
pub fn libc_epoll_pwait(ctx: ProbeContext) -> u32 {
    let (tgid, tid) = current_ids();
    if watched_uprobe_hit(tgid, link_cookie(&ctx)).is_none() {
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
    if watched_uprobe_hit(tgid, link_cookie(&ctx)).is_none() {
        return 0;
    }
    let tsp: u64 = ctx.arg(3).unwrap_or(0);
    remember(tgid, tid, wait_syscall::EPOLL_PWAIT2, timespec_class(tsp))
}

/// The return of any of them.
#[uretprobe]
pub fn libc_wait_return(ctx: RetProbeContext) -> u32 {
    let (tgid, tid) = current_ids();
    // SAFETY: the helper only reads the attach cookie.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let Some(watched) = watched_uprobe_hit(tgid, cookie) else {
        return 0;
    };
    let ret: u64 = ctx.ret();
    classify(&watched, tid, ret as i32 as i64)
}
