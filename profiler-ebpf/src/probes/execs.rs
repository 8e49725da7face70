//! Processes that exec'd, for discovery: a QEMU starts with an exec (libvirt forks, then
//! execs), so after its first full look at `/proc` the profiler only needs to look at these
//! PIDs and at the QEMUs it knows, instead of every process every second.

use aya_ebpf::{
    macros::{map, tracepoint},
    maps::{PerCpuArray, RingBuf},
    programs::TracePointContext,
};

use crate::maps::current_ids;

/// PIDs (tgids, as u32) that exec'd since userspace last drained it.
#[map]
pub static EXECS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Exec events the ring could not take (slot 0): userspace then looks at all of `/proc`.
#[map]
pub static EXECS_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[tracepoint]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    let (tgid, _) = current_ids();
    // Padded to 8 bytes, the ring's record alignment.
    let record = u64::from(tgid);
    if EXECS.output::<u64>(record, 0).is_err()
        && let Some(lost) = EXECS_LOST.get_ptr_mut(0)
    {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *lost += 1 };
    }
    0
}
