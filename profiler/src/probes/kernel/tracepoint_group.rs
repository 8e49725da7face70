//! A set of host-wide tracepoint programs shared by the VMs that need them: attached when the
//! first user comes (all or none), detached when the last one goes. The wait-syscall
//! tracepoints tax every syscall on the host while attached, the hrtimer ones every timer and
//! context switch, so neither stays attached for nobody.

use std::collections::BTreeSet;

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{
        RawTracePoint, TracePoint, raw_trace_point::RawTracePointLinkId,
        trace_point::TracePointLinkId,
    },
};

use super::object::{load_interrupted, retry_interrupted};

/// How a program of the group attaches to its tracepoint (of the same name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracepoint {
    /// A classic tracepoint of this category (`timer`, `sched`, `syscalls`): the program reads
    /// the event's record.
    Classic(&'static str),
    /// A raw tracepoint: the program gets the tracepoint's arguments, and the kernel skips it
    /// only when it would interrupt itself (a classic one is skipped while any BPF program
    /// runs on that CPU).
    Raw,
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    Ok(ebpf
        .program_mut(name)
        .with_context(|| format!("eBPF program {name} missing from the object"))?
        .try_into()?)
}

/// An attached program's link.
#[derive(Debug)]
enum GroupLink {
    Classic(TracePointLinkId),
    Raw(RawTracePointLinkId),
}

/// Tracepoints, each `(kind, name)` served by the program of the same name.
#[derive(Debug)]
pub struct TracepointGroup {
    programs: Vec<(Tracepoint, String)>,
    /// (program, link) of every tracepoint, when attached.
    links: Vec<(String, GroupLink)>,
    /// The VMs counted by them.
    users: BTreeSet<u32>,
}

impl TracepointGroup {
    /// Loads the programs (verifying them now, so a later attach cannot fail on that).
    pub fn load(ebpf: &mut Ebpf, programs: Vec<(Tracepoint, String)>) -> anyhow::Result<Self> {
        for (kind, name) in &programs {
            match kind {
                Tracepoint::Classic(_) => {
                    let program = program::<TracePoint>(ebpf, name)?;
                    retry_interrupted(|| program.load(), load_interrupted)
                }
                Tracepoint::Raw => {
                    let program = program::<RawTracePoint>(ebpf, name)?;
                    retry_interrupted(|| program.load(), load_interrupted)
                }
            }
            .with_context(|| format!("loading eBPF program {name}"))?;
        }
        Ok(Self::loaded(programs))
    }

    /// A group of programs another group already loaded (one program, two sets of users).
    pub fn loaded(programs: Vec<(Tracepoint, String)>) -> Self {
        Self {
            programs,
            links: Vec::new(),
            users: BTreeSet::new(),
        }
    }

    /// Counts `pid`: attaches every tracepoint if none is (all or none).
    pub fn acquire(&mut self, ebpf: &mut Ebpf, pid: u32) -> anyhow::Result<()> {
        if self.links.is_empty() {
            for (kind, name) in self.programs.clone() {
                let attached = match kind {
                    Tracepoint::Classic(category) => program::<TracePoint>(ebpf, &name)
                        .and_then(|p| {
                            p.attach(category, &name).with_context(|| {
                                format!("attaching to tracepoint {category}:{name}")
                            })
                        })
                        .map(GroupLink::Classic),
                    Tracepoint::Raw => program::<RawTracePoint>(ebpf, &name)
                        .and_then(|p| {
                            p.attach(&name)
                                .with_context(|| format!("attaching to raw tracepoint {name}"))
                        })
                        .map(GroupLink::Raw),
                };
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
    pub fn release(
        &mut self,
        ebpf: &mut Ebpf,
        pid: u32,
    ) -> Vec<crate::probes::kernel::detacher::Detach> {
        if !(self.users.remove(&pid) && self.users.is_empty()) {
            return Vec::new();
        }
        let mut taken: Vec<crate::probes::kernel::detacher::Detach> = Vec::new();
        for (name, link) in self.links.drain(..) {
            match link {
                GroupLink::Classic(link) => {
                    if let Ok(p) = program::<TracePoint>(ebpf, &name)
                        && let Ok(link) = p.take_link(link)
                    {
                        taken.push(Box::new(link));
                    }
                }
                GroupLink::Raw(link) => {
                    if let Ok(p) = program::<RawTracePoint>(ebpf, &name)
                        && let Ok(link) = p.take_link(link)
                    {
                        taken.push(Box::new(link));
                    }
                }
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
            match link {
                GroupLink::Classic(link) => {
                    if let Ok(p) = program::<TracePoint>(ebpf, &name) {
                        let _ = p.detach(link);
                    }
                }
                GroupLink::Raw(link) => {
                    if let Ok(p) = program::<RawTracePoint>(ebpf, &name) {
                        let _ = p.detach(link);
                    }
                }
            }
        }
        self.users.clear();
    }
}
