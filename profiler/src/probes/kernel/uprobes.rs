//! uprobe links of one program in one process, made all at once or not at all (libbpf's
//! `bpf_link` discipline): what an attach made is undone when a later step of it fails.

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

use crate::probes::kernel::perf_uprobe::{self, PerfUprobe, UprobeSite};

/// Loads the uprobe program `name` (once, at start-up).
pub fn load(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<()> {
    program(ebpf, name)?
        .load()
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

/// Links of one program in one process.
#[derive(Debug)]
pub struct UprobeLinks {
    program: &'static str,
    /// Opened disabled, by hand ([`perf_uprobe`]): aya's enabled per-task events would cost
    /// the process at every context switch.
    links: Vec<PerfUprobe>,
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

    /// Attaches `program` at every point of `pid`'s executable, scoped to that process (its
    /// breakpoints go into that process only), each link carrying `generation` in its cookie.
    /// On error, the links made so far are detached.
    pub fn attach(
        ebpf: &mut Ebpf,
        program: &'static str,
        pid: u32,
        points: &[UprobePoint],
        generation: u32,
    ) -> anyhow::Result<Self> {
        Self::attach_in(
            ebpf,
            program,
            pid,
            Path::new(&format!("/proc/{pid}/exe")),
            points,
            generation,
        )
    }

    /// [`Self::attach`] at file offsets of `target`, a file mapped in `pid` (a shared
    /// library, named through `/proc/PID/map_files` so it is the inode the process maps).
    pub fn attach_in(
        ebpf: &mut Ebpf,
        program: &'static str,
        pid: u32,
        target: &Path,
        points: &[UprobePoint],
        generation: u32,
    ) -> anyhow::Result<Self> {
        let mut made = Self::empty(program, generation);
        for point in points {
            if let Err(e) = made.add_in(ebpf, pid, target, *point) {
                made.detach(ebpf);
                return Err(e);
            }
        }
        Ok(made)
    }

    /// Attaches one more point in `pid`'s executable; on error nothing is added.
    pub fn add(&mut self, ebpf: &mut Ebpf, pid: u32, point: UprobePoint) -> anyhow::Result<()> {
        self.add_in(ebpf, pid, Path::new(&format!("/proc/{pid}/exe")), point)
    }

    fn add_in(
        &mut self,
        ebpf: &mut Ebpf,
        pid: u32,
        target: &Path,
        point: UprobePoint,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(pid != 0, "pid 0 cannot be probed");
        let retprobe = matches!(program(ebpf, self.program)?.kind(), ProbeKind::Return);
        let prog_fd = program_fd(ebpf, self.program)?;
        let site = UprobeSite {
            target,
            file_offset: point.file_offset,
            ref_ctr_offset: None,
            retprobe,
        };
        let cookie = link_generation::tag(point.cookie, self.generation);
        let link = perf_uprobe::attach(prog_fd, pid, &site, cookie).with_context(|| {
            format!(
                "attaching a uprobe at file offset {:#x} of {}",
                point.file_offset,
                target.display()
            )
        })?;
        self.links.push(link);
        self.points.push(point);
        Ok(())
    }

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
