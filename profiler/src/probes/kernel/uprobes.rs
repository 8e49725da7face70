//! uprobe links of one program in one process, made all at once or not at all (libbpf's
//! `bpf_link` discipline): what an attach made is undone when a later step of it fails.
//!
//! One multi-uprobe link for all the points of an attach where the kernel makes them
//! ([`uprobe_multi`]: its release waits one grace period, not one per point), else one perf
//! link per point ([`perf_uprobe`]).

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{ProbeKind, UProbe},
};

use profiler_common::link_generation;

use crate::probes::kernel::{
    perf_uprobe::{self, PerfUprobe, UprobeSite},
    shared_links::SharedPoint,
    uprobe_multi::{self, MultiPrograms, MultiUprobe},
};

/// Loads the uprobe program `name` (once, at start-up).
pub fn load(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<()> {
    let program = program(ebpf, name)?;
    super::object::retry_interrupted(|| program.load(), super::object::load_interrupted)
        .with_context(|| format!("loading eBPF program {name}"))
}

pub fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut UProbe> {
    Ok(ebpf
        .program_mut(name)
        .with_context(|| format!("eBPF program {name} missing from the object"))?
        .try_into()?)
}

/// The descriptor of the loaded uprobe program `name`, to attach it by hand
/// ([`perf_uprobe`]).
pub fn program_fd(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<std::os::fd::RawFd> {
    Ok(program(ebpf, name)?
        .fd()
        .with_context(|| format!("eBPF program {name} not loaded"))?
        .as_fd()
        .as_raw_fd())
}

pub use crate::offer::UprobePoint;

/// One kernel link: a multi-uprobe link holding several points, or one point's perf link
/// (opened disabled, by hand: aya's enabled per-task events would cost the process at every
/// context switch).
#[derive(Debug)]
pub enum UprobeLink {
    Multi(MultiUprobe),
    PerSite(PerfUprobe),
    /// A binary-wide link other VMs of the binary may hold too ([`super::shared_links`]).
    Shared(std::sync::Arc<MultiUprobe>),
}

/// Links of one program in one process.
#[derive(Debug)]
pub struct UprobeLinks {
    program: &'static str,
    links: Vec<UprobeLink>,
    /// Where each link is, to attach them again after a pause.
    points: Vec<UprobePoint>,
    /// The [`profiler_common::link_generation`] every link carries in its cookie.
    generation: u32,
}

impl UprobeLinks {
    /// No links yet; those added will carry `generation`.
    pub fn empty(program: &'static str, generation: u32) -> Self {
        Self {
            program,
            links: Vec::new(),
            points: Vec::new(),
            generation,
        }
    }

    /// The [`profiler_common::link_generation`] of the links.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The points attached.
    pub fn points(&self) -> &[UprobePoint] {
        &self.points
    }

    pub fn program(&self) -> &'static str {
        self.program
    }

    /// Attaches `program` at every point of `pid`'s executable, each point carrying
    /// `generation` in its cookie: one multi-uprobe link when `multi` has the program, else a
    /// link per point, scoped to that process (its breakpoints go into that process only).
    /// An unbudgeted VM (generation 0) shares binary-wide links instead where `multi`
    /// [shares](MultiPrograms::shares). On error, nothing is left attached.
    pub fn attach(
        ebpf: &mut Ebpf,
        multi: Option<&MultiPrograms>,
        program: &'static str,
        pid: u32,
        points: &[UprobePoint],
        generation: u32,
    ) -> anyhow::Result<Self> {
        let mut made = Self::empty(program, generation);
        let exe = format!("/proc/{pid}/exe");
        made.add_in(ebpf, multi, pid, Path::new(&exe), points, true)?;
        Ok(made)
    }

    /// [`Self::attach`] at file offsets of `target`, a file mapped in `pid` (a shared
    /// library, named through `/proc/PID/map_files` so it is the inode the process maps),
    /// scoped to that process whatever `multi` shares: every process maps the C library.
    pub fn attach_in(
        ebpf: &mut Ebpf,
        multi: Option<&MultiPrograms>,
        program: &'static str,
        pid: u32,
        target: &Path,
        points: &[UprobePoint],
        generation: u32,
    ) -> anyhow::Result<Self> {
        let mut made = Self::empty(program, generation);
        made.add_in(ebpf, multi, pid, target, points, false)?;
        Ok(made)
    }

    /// Attaches more points in `pid`'s executable, as one link where the kernel makes multi
    /// links (so a batch of timer callbacks found in one refresh costs one grace period when
    /// it goes); on error nothing is added.
    pub fn add(
        &mut self,
        ebpf: &mut Ebpf,
        multi: Option<&MultiPrograms>,
        pid: u32,
        points: &[UprobePoint],
    ) -> anyhow::Result<()> {
        self.add_in(
            ebpf,
            multi,
            pid,
            Path::new(&format!("/proc/{pid}/exe")),
            points,
            true,
        )
    }

    fn add_in(
        &mut self,
        ebpf: &mut Ebpf,
        multi: Option<&MultiPrograms>,
        pid: u32,
        target: &Path,
        points: &[UprobePoint],
        share: bool,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(pid != 0, "pid 0 cannot be probed");
        if points.is_empty() {
            return Ok(());
        }
        let retprobe = matches!(program(ebpf, self.program)?.kind(), ProbeKind::Return);
        let shared = multi.filter(|m| {
            share && self.generation == 0 && m.shares() && m.fd(self.program).is_some()
        });
        let generation = match shared {
            Some(_) => link_generation::SHARED,
            None => self.generation,
        };
        let cookies: Vec<u64> = points
            .iter()
            .map(|p| link_generation::tag(p.cookie, generation))
            .collect();
        let offsets: Vec<u64> = points.iter().map(|p| p.file_offset).collect();
        if let Some(multi) = shared {
            let at: Vec<SharedPoint> = offsets
                .iter()
                .zip(&cookies)
                .map(|(&offset, &cookie)| SharedPoint {
                    offset,
                    cookie,
                    ref_ctr_offset: 0,
                })
                .collect();
            let links = multi
                .link_shared(self.program, target, &at, retprobe)
                .with_context(|| {
                    format!(
                        "attaching uprobes at file offsets {} of {} (binary-wide links)",
                        uprobe_multi::offsets_text(&offsets),
                        target.display()
                    )
                })?;
            self.links.extend(links.into_iter().map(UprobeLink::Shared));
            self.points.extend_from_slice(points);
            return Ok(());
        }
        let made: Vec<UprobeLink> = match multi.and_then(|m| m.fd(self.program)) {
            Some(prog_fd) => {
                let link =
                    uprobe_multi::link(prog_fd, target, &offsets, None, &cookies, pid, retprobe)
                        .with_context(|| {
                            format!(
                                "attaching uprobes at file offsets {} of {} (one multi-uprobe \
                                 link)",
                                uprobe_multi::offsets_text(&offsets),
                                target.display()
                            )
                        })?;
                vec![UprobeLink::Multi(link)]
            }
            None => {
                let prog_fd = program_fd(ebpf, self.program)?;
                let mut made = Vec::with_capacity(points.len());
                for (&file_offset, &cookie) in offsets.iter().zip(&cookies) {
                    let site = UprobeSite {
                        target,
                        file_offset,
                        ref_ctr_offset: None,
                        retprobe,
                    };
                    // On error `made` drops: what this call attached goes.
                    let link =
                        perf_uprobe::attach(prog_fd, pid, &site, cookie).with_context(|| {
                            format!(
                                "attaching a uprobe at file offset {file_offset:#x} of {}",
                                target.display()
                            )
                        })?;
                    made.push(UprobeLink::PerSite(link));
                }
                made
            }
        };
        self.links.extend(made);
        self.points.extend_from_slice(points);
        Ok(())
    }

    /// Kernel links held (a multi link counts once, whatever its points).
    pub fn len(&self) -> usize {
        self.links.len()
    }

    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// The links themselves, to be closed elsewhere (closing one detaches it: see
    /// [`crate::probes::kernel::detacher`]).
    pub fn take(self, _ebpf: &mut Ebpf) -> Vec<crate::probes::kernel::detacher::Detach> {
        self.links
            .into_iter()
            .map(|link| Box::new(link) as crate::probes::kernel::detacher::Detach)
            .collect()
    }

    /// Detaches every link (a process that already exited is fine).
    pub fn detach(self, _ebpf: &mut Ebpf) {
        drop(self.links);
    }
}
