//! The wait-syscall tracepoints that classify QEMU wakeups: the timer source of last resort
//! (see `profiler-ebpf/src/probes/timers.rs` for the kernel side, and [`super::libc_waits`]
//! for the source that is preferred).
//!
//! While any `syscalls:*` tracepoint is enabled, every task on the host takes the slow
//! syscall path, so they are attached only while some watched VM is counted by them, and
//! detached when the last one goes.

use std::collections::BTreeSet;

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{TracePoint, trace_point::TracePointLinkId},
};

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

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut TracePoint> {
    Ok(ebpf
        .program_mut(name)
        .with_context(|| format!("eBPF program {name} missing from the object"))?
        .try_into()?)
}

/// The wait-syscall tracepoints, attached while some VM uses them.
#[derive(Debug, Default)]
pub struct SyscallWaits {
    /// (program, link) of every tracepoint, when attached.
    links: Vec<(String, TracePointLinkId)>,
    /// The VMs counted by them.
    users: BTreeSet<u32>,
}

impl SyscallWaits {
    /// Loads the programs (verifying them now, so a later attach cannot fail on that).
    pub fn load(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        for name in programs() {
            program(ebpf, &name)?
                .load()
                .with_context(|| format!("loading eBPF program {name}"))?;
        }
        Ok(Self::default())
    }

    /// Counts `pid`'s waits: attaches every tracepoint if none is (all or none).
    pub fn acquire(&mut self, ebpf: &mut Ebpf, pid: u32) -> anyhow::Result<()> {
        if self.links.is_empty() {
            for name in programs() {
                let attached = program(ebpf, &name).and_then(|p| {
                    p.attach("syscalls", &name)
                        .with_context(|| format!("attaching to tracepoint syscalls:{name}"))
                });
                match attached {
                    Ok(link) => self.links.push((name, link)),
                    Err(e) => {
                        self.detach_all(ebpf);
                        return Err(e);
                    }
                }
            }
        }
        self.users.insert(pid);
        Ok(())
    }

    /// Stops counting `pid`; the last user takes the tracepoint links with it, to be closed
    /// off the sampling thread (each close waits for the kernel's grace periods: seconds
    /// here, during which a perf_event_open elsewhere waits too).
    #[must_use = "closing the returned links detaches the tracepoints"]
    pub fn release(&mut self, ebpf: &mut Ebpf, pid: u32) -> Vec<super::detacher::Detach> {
        if !(self.users.remove(&pid) && self.users.is_empty()) {
            return Vec::new();
        }
        let mut taken: Vec<super::detacher::Detach> = Vec::new();
        for (name, link) in self.links.drain(..) {
            if let Ok(p) = program(ebpf, &name)
                && let Ok(link) = p.take_link(link)
            {
                taken.push(Box::new(link));
            }
        }
        taken
    }

    pub fn is_attached(&self) -> bool {
        !self.links.is_empty()
    }

    pub fn users(&self) -> usize {
        self.users.len()
    }

    pub fn detach_all(&mut self, ebpf: &mut Ebpf) {
        for (name, link) in self.links.drain(..) {
            if let Ok(p) = program(ebpf, &name) {
                let _ = p.detach(link);
            }
        }
        self.users.clear();
    }
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
