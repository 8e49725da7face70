//! Attaching the wait-syscall tracepoints that classify QEMU wakeups (see
//! `profiler-ebpf/src/probes/timers.rs` for the kernel side).

use anyhow::Context as _;
use aya::{Ebpf, programs::TracePoint};

/// Syscalls QEMU sleeps in. Each has an enter program (remembers the timeout) and an exit
/// program (classifies the result); both are named after their tracepoint.
pub const WAIT_SYSCALLS: &[&str] = &["ppoll", "epoll_pwait", "epoll_pwait2", "io_uring_enter"];

/// Loads and attaches every wait-syscall tracepoint program.
pub fn attach(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    for syscall in WAIT_SYSCALLS {
        for phase in ["enter", "exit"] {
            let name = format!("sys_{phase}_{syscall}");
            let program: &mut TracePoint = ebpf
                .program_mut(&name)
                .with_context(|| format!("eBPF program {name} missing from the object"))?
                .try_into()?;
            program
                .load()
                .with_context(|| format!("loading eBPF program {name}"))?;
            program
                .attach("syscalls", &name)
                .with_context(|| format!("attaching to tracepoint syscalls:{name}"))?;
        }
    }
    Ok(())
}
