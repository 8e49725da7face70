//! Attaching the wait-syscall tracepoints that classify QEMU wakeups (see
//! `profiler-ebpf/src/probes/timers.rs` for the kernel side).

use aya::Ebpf;

/// Syscalls QEMU sleeps in. Each has an enter program (remembers the timeout) and an exit
/// program (classifies the result); both are named after their tracepoint.
pub const WAIT_SYSCALLS: &[&str] = &["ppoll", "epoll_pwait", "epoll_pwait2", "io_uring_enter"];

/// Loads and attaches every wait-syscall tracepoint program.
pub fn attach(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    for syscall in WAIT_SYSCALLS {
        for phase in ["enter", "exit"] {
            super::attach_tracepoint(ebpf, "syscalls", &format!("sys_{phase}_{syscall}"))?;
        }
    }
    Ok(())
}

/// The per-thread wait state map (thread id -> [`profiler_common::PendingWait`]).
pub const PENDING_MAP: &str = "PENDING";

/// Drops the wait states of process `tgid`'s threads: a thread killed inside its wait never
/// reaches the exit probe that would remove its entry.
pub fn forget_process(ebpf: &mut Ebpf, tgid: u32) {
    use aya::maps::{HashMap as BpfHashMap, MapData};
    use profiler_common::PendingWait;
    let Some(Ok(mut map)) = ebpf
        .map_mut(PENDING_MAP)
        .map(BpfHashMap::<&mut MapData, u32, PendingWait>::try_from)
    else {
        return;
    };
    let stale: Vec<u32> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, w)| w.tgid == tgid)
        .map(|(tid, _)| tid)
        .collect();
    for tid in stale {
        let _ = map.remove(&tid);
    }
}
