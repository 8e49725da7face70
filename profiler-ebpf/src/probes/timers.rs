//! Timer vs fd wakeups of QEMU's event loops.
//!
//! QEMU sleeps in `ppoll` (glib main loop, AioContext), `epoll_pwait`/`epoll_pwait2`
//! (fdmon-epoll) or `io_uring_enter` (fdmon-io_uring). On entry we classify the timeout
//! argument and remember it per thread; on exit the result says what woke the thread:
//! 0 after a finite non-zero timeout is a timer (a QEMU deadline expired), > 0 is an fd.
//!
//! Syscall tracepoint layout (see tracefs `events/syscalls/*/format`): arguments are u64s
//! from offset 16; `ret` of `sys_exit_*` is at offset 16.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    helpers::bpf_probe_read_user,
    macros::{map, tracepoint},
    maps::Array,
    programs::TracePointContext,
};
use profiler_common::{
    MARK_SLOTS, PendingWait, PpollMark, WatchEntry, dropped, kind, mark_slot, timeout_class,
    wait_syscall, watch_flag,
};

use crate::maps::{PENDING, atomic_cmpxchg, count_wait, current_ids, note_insert, watched};

const ARGS: usize = 16;
const RET: usize = 16;
/// io_uring_enter flag: wait for `min_complete` completions.
const IORING_ENTER_GETEVENTS: u64 = 1;

#[inline(always)]
fn arg(ctx: &TracePointContext, n: usize) -> u64 {
    // SAFETY: reads within the tracepoint record, whose layout is fixed for syscall events.
    unsafe { ctx.read_at::<u64>(ARGS + 8 * n).unwrap_or(0) }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct KernelTimespec {
    tv_sec: i64,
    tv_nsec: i64,
}

/// Class of a `struct __kernel_timespec *` timeout (ppoll, epoll_pwait2).
#[inline(always)]
pub fn timespec_class(ptr: u64) -> u32 {
    if ptr == 0 {
        return timeout_class::INFINITE;
    }
    // SAFETY: bpf_probe_read_user validates the user pointer.
    match unsafe { bpf_probe_read_user(ptr as *const KernelTimespec) } {
        Ok(ts) if ts.tv_sec == 0 && ts.tv_nsec == 0 => timeout_class::ZERO,
        Ok(ts) if ts.tv_sec < 0 => timeout_class::INFINITE,
        Ok(_) => timeout_class::FINITE,
        Err(_) => timeout_class::UNKNOWN,
    }
}

/// Class of an `int timeout` in milliseconds (epoll_pwait).
#[inline(always)]
pub fn millis_class(timeout_ms: i32) -> u32 {
    if timeout_ms < 0 {
        timeout_class::INFINITE
    } else if timeout_ms == 0 {
        timeout_class::ZERO
    } else {
        timeout_class::FINITE
    }
}

/// Process `tgid` if the syscall tracepoints count it (it may be watched through its libc's
/// wait functions instead).
#[inline(always)]
fn counts_syscalls(tgid: u32) -> Option<WatchEntry> {
    watched(tgid).filter(|w| w.flags & watch_flag::WAITS_BY_SYSCALL != 0)
}

/// Remembers the current thread's wait; callers have checked that its process is watched.
#[inline(always)]
pub fn remember(tgid: u32, tid: u32, syscall: u64, timeout: u32) -> u32 {
    let pending = PendingWait {
        syscall,
        timeout,
        tgid,
    };
    note_insert(dropped::PENDING, PENDING.insert(tid, pending, 0));
    0
}

/// The libc result source's marks of a `ppoll` that armed its sleep timer, one slot per
/// thread ([`profiler_common::MARK_SLOTS`]): marking and consuming are an array load and a
/// store where a `PENDING` entry costs a hash lookup each, on every ppoll.
/// Freed by userspace when the process is forgotten (`forget_process`).
#[map]
pub static PPOLL_MARKS: Array<PpollMark> = Array::with_max_entries(MARK_SLOTS, BPF_F_MMAPABLE);

/// Marks the current thread's `ppoll` as having armed its sleep timer, for the libc result
/// probe ([`take_ppoll_timer_mark`]): in the thread's `PPOLL_MARKS` slot if it holds it or
/// can claim it, else in its `PENDING` entry, created once and then rewritten in place (a
/// hash insert and delete take the bucket's lock with interrupts disabled). `PENDING` entries
/// of exited processes are dropped by userspace (`forget_process`).
#[inline(always)]
pub fn mark_ppoll_timer(tgid: u32, tid: u32) {
    let owner = PpollMark::owner_of(tid, tgid);
    if let Some(mark) = PPOLL_MARKS.get_ptr_mut(mark_slot(tid)) {
        // SAFETY: a map value, valid for the map's life. Only its owner writes `armed`; the
        // owner word is claimed atomically, and cleared by userspace only for a forgotten
        // process (a store racing that lands in a free slot, whose next claim rewrites it).
        unsafe {
            let held = core::ptr::read_volatile(&(*mark).owner);
            if held == owner || (held == 0 && atomic_cmpxchg(&raw mut (*mark).owner, 0, owner) == 0)
            {
                core::ptr::write_volatile(&mut (*mark).armed, 1);
                return;
            }
        }
    }
    match PENDING.get_ptr_mut(tid) {
        // SAFETY: a preallocated map value, valid memory for the map's life; only this thread
        // writes its own entry. Userspace deletes a process's entries when it has exited or
        // before its paused uprobes are attached again; a store racing that delete lands in a
        // freed element, at worst one misclassified wait.
        Some(pending) => unsafe {
            *pending = PendingWait {
                syscall: wait_syscall::PPOLL,
                timeout: timeout_class::FINITE,
                tgid,
            }
        },
        None => {
            remember(tgid, tid, wait_syscall::PPOLL, timeout_class::FINITE);
        }
    }
}

/// Whether the current thread's `ppoll` armed its sleep timer ([`mark_ppoll_timer`]); the
/// mark is consumed, the slot or entry kept.
#[inline(always)]
pub fn take_ppoll_timer_mark(tgid: u32, tid: u32) -> bool {
    if let Some(mark) = PPOLL_MARKS.get_ptr(mark_slot(tid)) {
        let mark = mark.cast_mut();
        // SAFETY: as in `mark_ppoll_timer`.
        unsafe {
            if core::ptr::read_volatile(&(*mark).owner) == PpollMark::owner_of(tid, tgid) {
                let armed = core::ptr::read_volatile(&(*mark).armed) != 0;
                if armed {
                    core::ptr::write_volatile(&mut (*mark).armed, 0);
                }
                return armed;
            }
        }
    }
    let Some(pending) = PENDING.get_ptr_mut(tid) else {
        return false;
    };
    // SAFETY: as in `mark_ppoll_timer`.
    unsafe {
        if (*pending).syscall != wait_syscall::PPOLL {
            return false;
        }
        (*pending).syscall = wait_syscall::NONE;
    }
    true
}

#[inline(always)]
fn classify_exit(ctx: &TracePointContext) -> u32 {
    let (tgid, tid) = current_ids();
    let Some(watched) = counts_syscalls(tgid) else {
        return 0;
    };
    // SAFETY: fixed syscall exit layout.
    let ret = unsafe { ctx.read_at::<i64>(RET).unwrap_or(-1) };
    classify(&watched, tid, ret)
}

/// Classifies the return value `ret` of the current thread's wait (remembered at its entry):
/// 0 after a finite timeout is a timer, > 0 an fd. Shared with the libc uprobes.
#[inline(always)]
pub fn classify(watched: &WatchEntry, tid: u32, ret: i64) -> u32 {
    // SAFETY: the value is copied out before the entry is removed.
    let Some(pending) = (unsafe { PENDING.get(tid) }).copied() else {
        // Entered before we started watching: the timeout is unknown, skip it.
        return 0;
    };
    let _ = PENDING.remove(tid);
    // A consumed ppoll-timer mark of the libc result probes (`mark_ppoll_timer`).
    if pending.syscall == wait_syscall::NONE {
        return 0;
    }
    let kind = if pending.syscall == wait_syscall::IO_URING_ENTER {
        if pending.timeout != timeout_class::IO_URING_GETEVENTS {
            return 0;
        }
        kind::IO_URING_WAIT
    } else if ret > 0 {
        kind::FD_WAKEUP
    } else if ret < 0 {
        kind::WAIT_ERROR
    } else {
        match pending.timeout {
            timeout_class::FINITE => kind::TIMER,
            timeout_class::ZERO => kind::NONBLOCKING_POLL,
            // An infinite wait cannot return 0; an unreadable timeout is not guessed at.
            _ => return 0,
        }
    };
    count_wait(watched, kind, pending.syscall);
    0
}

#[tracepoint]
pub fn sys_enter_ppoll(ctx: TracePointContext) -> u32 {
    // ppoll(ufds, nfds, tsp, sigmask, sigsetsize)
    let tsp = arg(&ctx, 2);
    let (tgid, tid) = current_ids();
    if counts_syscalls(tgid).is_none() {
        return 0;
    }
    remember(tgid, tid, wait_syscall::PPOLL, timespec_class(tsp))
}

#[tracepoint]
pub fn sys_exit_ppoll(ctx: TracePointContext) -> u32 {
    classify_exit(&ctx)
}

#[tracepoint]
pub fn sys_enter_epoll_pwait(ctx: TracePointContext) -> u32 {
    // epoll_pwait(epfd, events, maxevents, int timeout_ms, sigmask, sigsetsize)
    let (tgid, tid) = current_ids();
    if counts_syscalls(tgid).is_none() {
        return 0;
    }
    let class = millis_class(arg(&ctx, 3) as i32);
    remember(tgid, tid, wait_syscall::EPOLL_PWAIT, class)
}

#[tracepoint]
pub fn sys_exit_epoll_pwait(ctx: TracePointContext) -> u32 {
    classify_exit(&ctx)
}

#[tracepoint]
pub fn sys_enter_epoll_pwait2(ctx: TracePointContext) -> u32 {
    // epoll_pwait2(epfd, events, maxevents, const struct __kernel_timespec *timeout, ...)
    let tsp = arg(&ctx, 3);
    let (tgid, tid) = current_ids();
    if counts_syscalls(tgid).is_none() {
        return 0;
    }
    remember(tgid, tid, wait_syscall::EPOLL_PWAIT2, timespec_class(tsp))
}

#[tracepoint]
pub fn sys_exit_epoll_pwait2(ctx: TracePointContext) -> u32 {
    classify_exit(&ctx)
}

#[tracepoint]
pub fn sys_enter_io_uring_enter(ctx: TracePointContext) -> u32 {
    // io_uring_enter(fd, to_submit, min_complete, flags, argp, argsz)
    let (tgid, tid) = current_ids();
    if counts_syscalls(tgid).is_none() {
        return 0;
    }
    let min_complete = arg(&ctx, 2) as u32;
    let flags = arg(&ctx, 3);
    let class = if flags & IORING_ENTER_GETEVENTS != 0 && min_complete > 0 {
        timeout_class::IO_URING_GETEVENTS
    } else {
        timeout_class::IO_URING_SUBMIT_ONLY
    };
    remember(tgid, tid, wait_syscall::IO_URING_ENTER, class)
}

#[tracepoint]
pub fn sys_exit_io_uring_enter(ctx: TracePointContext) -> u32 {
    classify_exit(&ctx)
}
