//! The host's busy time, exactly: each CPU's time in its idle task, kept at every context
//! switch. `/proc/stat` samples the task running at each tick, so a device model that runs
//! in bursts shorter than a tick is mostly seen as idle there (docs/capacity.md).
//!
//! The task switched out is the current one: it is the idle task when its PID is 0, which is
//! also when this CPU's idle task (`prev`) is learnt; a switch whose `next` is that task
//! starts an idle period. Nothing else is read: no task field offsets, any kernel.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, raw_tracepoint},
    maps::PerCpuArray,
    programs::RawTracePointContext,
};
use profiler_common::CpuIdle;

#[map]
pub static CPU_IDLE: PerCpuArray<CpuIdle> = PerCpuArray::with_max_entries(1, 0);

/// Raw tracepoint arguments: `bool preempt`, `struct task_struct *prev`, `*next`, ...
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch_idle(ctx: RawTracePointContext) -> i32 {
    let Some(cpu) = CPU_IDLE.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let prev: u64 = ctx.arg(1);
    let next: u64 = ctx.arg(2);
    let switched_out_idle = bpf_get_current_pid_tgid() as u32 == 0;
    // SAFETY: this CPU's slot, written by this CPU only (preemption is off in the scheduler).
    unsafe {
        if switched_out_idle {
            if (*cpu).last_switch != 0 {
                (*cpu).idle_ns += now.saturating_sub((*cpu).last_switch);
            }
            (*cpu).idle_task = prev;
        }
        let idle_task = (*cpu).idle_task;
        (*cpu).idle_now = u64::from(idle_task != 0 && next == idle_task);
        (*cpu).last_switch = now;
    }
    0
}
