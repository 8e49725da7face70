//! Timer vs fd wakeups from the sleep timers of QEMU's waits (`--timer-source hrtimer`).
//!
//! A wait syscall with a finite timeout (`ppoll`, `epoll_pwait`, `epoll_pwait2`) arms an
//! on-stack hrtimer whose function is `hrtimer_wakeup`, in the waiting thread's context
//! (`timer:hrtimer_start`). The timer then either expires (`timer:hrtimer_expire_entry`, in
//! interrupt context: the deadline woke the thread, a `timer` event) or is cancelled while
//! still queued (`timer:hrtimer_cancel`: something else woke it first, an fd, counted as an
//! fd wakeup). A wait with an infinite timeout arms no timer: its thread going to sleep in
//! the wait (the `sched_switch` raw tracepoint: switched out in `TASK_INTERRUPTIBLE`, not
//! preempted, no timer armed) and being switched in again is one fd wakeup. Nothing runs for other syscalls; other processes
//! pay one array load per context switch and per timer armed. What is not seen: a wait that
//! returns without sleeping (a zero timeout, or an fd ready at entry).
//!
//! The libc source's result probes use `hrtimer_start` too (`WAITS_BY_LIBC_RESULT`): it marks
//! a thread whose `ppoll` armed a sleep timer, which is what tells a timed-out ppoll from a
//! zero-timeout one (see `libc_waits.rs`).
//!
//! Tracepoint layouts (tracefs `events/timer/*/format`, checked by userspace at load):
//! `hrtimer_start`: hrtimer @8, function @16; `hrtimer_cancel`: hrtimer @8.
//! `hrtimer_expire_entry` and `sched_switch` are raw tracepoints (their arguments).

use aya_ebpf::{
    helpers::{
        bpf_get_current_task, bpf_get_current_task_btf, bpf_probe_read_kernel, bpf_task_pt_regs,
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap},
    programs::{RawTracePointContext, TracePointContext},
};
use profiler_common::{
    MAX_PENDING, Sleeper, THREAD_WAIT_SLOTS, ThreadWait, dropped, kind, thread_wait,
    thread_wait_slot, wait_syscall, watch_flag,
};

use super::timers::mark_ppoll_timer;
use crate::maps::{count_wait, current_ids, note_insert, watched};

const HRTIMER: usize = 8;
const START_FUNCTION: usize = 16;
/// `prev_state` (the raw task state) of a task that went to sleep interruptibly.
const TASK_INTERRUPTIBLE: u64 = 1;
/// `offsetof(struct pt_regs, orig_ax)` on x86-64: the number of the syscall in progress.
const PT_REGS_ORIG_AX: usize = 120;
/// x86-64 syscall numbers of the waits QEMU's event loops make with a timeout.
const NR_PPOLL: u64 = 271;
const NR_EPOLL_PWAIT: u64 = 281;
const NR_EPOLL_PWAIT2: u64 = 441;

/// The address of the kernel's `hrtimer_wakeup` (slot 0), written by userspace from
/// `/proc/kallsyms`: the function of every sleep timer.
#[map]
pub static HRTIMER_WAKEUP: Array<u64> = Array::with_max_entries(1, 0);

/// Armed sleep timers of watched threads in a wait syscall, by the timer's address.
#[map]
pub static SLEEPERS: HashMap<u64, Sleeper> = HashMap::with_max_entries(MAX_PENDING, 0);

/// Each watched thread's wait (by [`thread_wait_slot`] of its task struct): armed sleep
/// timer, or asleep without one.
#[map]
pub static THREAD_WAITS: Array<ThreadWait> = Array::with_max_entries(THREAD_WAIT_SLOTS, 0);

/// The slot of the task at `task`, if it holds that task.
#[inline(always)]
fn thread_wait(task: u64) -> Option<*mut ThreadWait> {
    let slot = THREAD_WAITS.get_ptr_mut(thread_wait_slot(task))?;
    // SAFETY: a map value, valid for the map's life; other CPUs write it, so read once.
    (unsafe { core::ptr::read_volatile(&(*slot).task) } == task).then_some(slot)
}

/// Fills `task`'s slot (`task` last, so a reader never sees it with another's fields).
#[inline(always)]
fn set_thread_wait(task: u64, tgid: u32, state: u32, syscall: u32) {
    if let Some(slot) = THREAD_WAITS.get_ptr_mut(thread_wait_slot(task)) {
        // SAFETY: as in thread_wait.
        unsafe {
            core::ptr::write_volatile(&mut (*slot).task, 0);
            core::ptr::write_volatile(&mut (*slot).tgid, tgid);
            core::ptr::write_volatile(&mut (*slot).state, state);
            core::ptr::write_volatile(&mut (*slot).syscall, syscall);
            core::ptr::write_volatile(&mut (*slot).task, task);
        }
    }
}

/// Frees `slot`.
#[inline(always)]
fn clear_thread_wait(slot: *mut ThreadWait) {
    // SAFETY: a slot returned by thread_wait.
    unsafe { core::ptr::write_volatile(&mut (*slot).task, 0) }
}

/// The current task's `struct task_struct *`.
#[inline(always)]
fn current_task() -> u64 {
    // SAFETY: a helper of tracing programs; the address is only compared, never dereferenced.
    unsafe { bpf_get_current_task() }
}

/// The wait syscall the current task is in, if it is one QEMU's event loops wait in.
#[inline(always)]
fn current_wait_syscall() -> Option<u32> {
    Some(match current_syscall()? {
        NR_PPOLL => wait_syscall::PPOLL,
        NR_EPOLL_PWAIT => wait_syscall::EPOLL_PWAIT,
        NR_EPOLL_PWAIT2 => wait_syscall::EPOLL_PWAIT2,
        _ => return None,
    } as u32)
}

/// The syscall the current task is in (`orig_ax` of its user registers), if readable.
#[inline(always)]
fn current_syscall() -> Option<u64> {
    // SAFETY: helpers of tracing programs; the task's saved registers are read with
    // bpf_probe_read_kernel, which validates the address.
    unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const u8;
        bpf_probe_read_kernel(regs.add(PT_REGS_ORIG_AX) as *const u64).ok()
    }
}

#[tracepoint]
pub fn hrtimer_start(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current_ids();
    let Some(flags) = watched(tgid).map(|w| w.flags) else {
        return 0;
    };
    if flags & (watch_flag::WAITS_BY_HRTIMER | watch_flag::WAITS_BY_LIBC_RESULT) == 0 {
        return 0;
    }
    // SAFETY: fields of the tracepoint record at the offsets userspace checked.
    let (timer, function) = unsafe {
        (
            ctx.read_at::<u64>(HRTIMER).unwrap_or(0),
            ctx.read_at::<u64>(START_FUNCTION).unwrap_or(0),
        )
    };
    // Only sleep timers: an interrupt can arm other timers while this task is current.
    if timer == 0 || HRTIMER_WAKEUP.get(0).copied() != Some(function) {
        return 0;
    }
    // Only the event loops' waits: futex and nanosleep timeouts arm the same kind of timer.
    let Some(syscall) = current_wait_syscall() else {
        return 0;
    };
    if flags & watch_flag::WAITS_BY_LIBC_RESULT != 0 {
        // The libc result probe counts this wait; it only needs to know that a ppoll armed
        // its timer (libc_waits.rs: a ppoll's 0 is otherwise ambiguous).
        if syscall == wait_syscall::PPOLL as u32 {
            mark_ppoll_timer(tgid, tid);
        }
        return 0;
    }
    let task = current_task();
    let sleeper = Sleeper {
        tgid,
        syscall,
        task,
    };
    note_insert(dropped::SLEEPERS, SLEEPERS.insert(timer, sleeper, 0));
    // Its sleep is this timer's to count, not sched_switch's.
    set_thread_wait(task, tgid, thread_wait::ARMED, syscall);
    0
}

/// Counts the end of the armed sleep timer at `timer` as `kind`, if it is one of ours.
#[inline(always)]
fn ended(timer: u64, kind: u32) -> u32 {
    // SAFETY: the value is copied out before the entry is removed.
    let Some(sleeper) = (unsafe { SLEEPERS.get(timer) }).copied() else {
        return 0;
    };
    let _ = SLEEPERS.remove(timer);
    if let Some(slot) = thread_wait(sleeper.task) {
        // SAFETY: a slot of this thread.
        if unsafe { core::ptr::read_volatile(&(*slot).state) } == thread_wait::ARMED {
            clear_thread_wait(slot);
        }
    }
    // Its wait block, if the process is still watched (else the key: a late count of a
    // process just forgotten).
    let watched = watched(sleeper.tgid).unwrap_or(profiler_common::WatchEntry {
        tgid: sleeper.tgid,
        wait_block: profiler_common::wait_block::NONE,
        ..Default::default()
    });
    count_wait(&watched, kind, u64::from(sleeper.syscall));
    0
}

/// A raw tracepoint, not a classic one: the expiry runs in the timer interrupt, which can
/// land while another BPF program (a USDT probe of a vCPU thread, `hrtimer_start`) runs on
/// that CPU. The kernel then skips a classic tracepoint's program (one "BPF program active"
/// flag per CPU for them all) and the timer event would be lost; a raw tracepoint's program
/// is skipped only when it interrupts itself. Argument 0 is the `struct hrtimer *`.
#[raw_tracepoint(tracepoint = "hrtimer_expire_entry")]
pub fn hrtimer_expire_entry(ctx: RawTracePointContext) -> i32 {
    ended(ctx.arg::<u64>(0), kind::TIMER);
    0
}

#[tracepoint]
pub fn hrtimer_cancel(ctx: TracePointContext) -> u32 {
    // SAFETY: field of the tracepoint record at the offset userspace checked.
    let timer = unsafe { ctx.read_at::<u64>(HRTIMER).unwrap_or(0) };
    ended(timer, kind::FD_WAKEUP)
}

/// A watched thread asleep in a wait without a sleep timer (an infinite timeout) that is
/// switched in again was woken by an fd (or a signal): one fd wakeup. The switch-out of a
/// watched thread in a wait syscall, asleep with no timer armed, marks it.
///
/// A raw tracepoint: it runs at every context switch on the host, and a classic one would
/// first build the event's record (two task names, pids, priorities) for every one of them.
/// Arguments: `bool preempt`, `struct task_struct *prev` (the current task), `*next`,
/// `unsigned int prev_state` (Linux 5.18+: an older kernel has three and refuses to attach a
/// program that reads a fourth).
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch(ctx: RawTracePointContext) -> i32 {
    let next: u64 = ctx.arg(2);
    if next != 0
        && let Some(slot) = thread_wait(next)
    {
        // SAFETY: a slot of this task; copied out before it is freed.
        let (state, tgid, syscall) = unsafe {
            (
                core::ptr::read_volatile(&(*slot).state),
                core::ptr::read_volatile(&(*slot).tgid),
                core::ptr::read_volatile(&(*slot).syscall),
            )
        };
        // Switched in: its sleep is over either way (an armed timer's expiry or cancel is
        // counted by the timer, and clearing here keeps a skipped one from blinding the
        // thread's next infinite wait).
        clear_thread_wait(slot);
        if state == thread_wait::ASLEEP
            && let Some(watched) = watched(tgid)
        {
            count_wait(&watched, kind::FD_WAKEUP, u64::from(syscall));
        }
    }
    // Preempted with its state already set is not asleep: it runs again without a wakeup.
    let preempt: u64 = ctx.arg(0);
    let prev_state: u64 = ctx.arg(3);
    if preempt & 0xff != 0 || prev_state & 0xffff_ffff != TASK_INTERRUPTIBLE {
        return 0;
    }
    // The task switched out is the current one.
    let (tgid, _) = current_ids();
    let Some(flags) = watched(tgid).map(|w| w.flags) else {
        return 0;
    };
    if flags & watch_flag::WAITS_BY_HRTIMER == 0 {
        return 0;
    }
    let task: u64 = ctx.arg(1);
    if let Some(slot) = thread_wait(task) {
        // SAFETY: a slot of this task.
        if unsafe { core::ptr::read_volatile(&(*slot).state) } == thread_wait::ARMED {
            return 0;
        }
    }
    if let Some(syscall) = current_wait_syscall() {
        set_thread_wait(task, tgid, thread_wait::ASLEEP, syscall);
    }
    0
}
