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
