//! The timer source that taxes nothing but QEMU: uprobes on its C library's wait functions
//! (`ppoll`, `epoll_pwait`, `epoll_pwait2`), scoped to each QEMU process (see
//! `profiler-ebpf/src/probes/libc_waits.rs` for the kernel side).
//!
//! Why not the `syscalls:*` tracepoints: enabling any of them moves every task of the host
//! onto the slow syscall path, so every syscall of every process pays while the profiler runs.
//! A uprobe scoped to one process puts its breakpoint in that process's memory only; other
//! processes mapping the same libc run it untouched. The functions are dynamic symbols, so no
//! debug symbols are needed. The tracepoints stay as the fallback (a static QEMU, a libc
//! without these symbols, an attach that fails), attached only while some VM needs them.

use std::collections::HashMap;

use anyhow::Context as _;
use aya::Ebpf;

use crate::{
    offer::libc::{LibcOffer, LibcProbes},
    probes::kernel::{
        uprobe_multi::MultiPrograms,
        uprobes::{self, UprobeLinks, UprobePoint},
    },
};

/// Entry programs, each remembering its function's timeout class.
pub const PPOLL_PROGRAM: &str = "libc_ppoll";
pub const EPOLL_PWAIT_PROGRAM: &str = "libc_epoll_pwait";
pub const EPOLL_PWAIT2_PROGRAM: &str = "libc_epoll_pwait2";
/// The return program shared by all three: classifies the result.
pub const RETURN_PROGRAM: &str = "libc_wait_return";
/// The one program of the result probes (after each syscall instruction).
pub const RESULT_PROGRAM: &str = "libc_wait_result";

/// The wait functions and their entry programs.
const FUNCTIONS: &[(&str, &str)] = &[
    ("ppoll", PPOLL_PROGRAM),
    ("epoll_pwait", EPOLL_PWAIT_PROGRAM),
    ("epoll_pwait2", EPOLL_PWAIT2_PROGRAM),
];

/// The entry program of wait function `function`.
fn entry_program(function: &str) -> &'static str {
    FUNCTIONS
        .iter()
        .find(|(f, _)| *f == function)
        .map_or(PPOLL_PROGRAM, |(_, program)| program)
}

/// The libc uprobes of every process they serve.
#[derive(Debug, Default)]
pub struct LibcWaitSource {
    processes: HashMap<u32, Vec<UprobeLinks>>,
    /// The multi-uprobe copies of the programs (`None`: per-site links).
    multi: Option<std::sync::Arc<MultiPrograms>>,
}

impl LibcWaitSource {
    /// The uprobe programs of this source.
    pub fn programs() -> Vec<&'static str> {
        let mut all: Vec<&'static str> = FUNCTIONS.iter().map(|(_, p)| *p).collect();
        all.extend([RETURN_PROGRAM, RESULT_PROGRAM]);
        all
    }

    /// Loads the entry and return programs (attached per process later), linked through
    /// `multi` where given.
    pub fn load(
        ebpf: &mut Ebpf,
        multi: Option<std::sync::Arc<MultiPrograms>>,
    ) -> anyhow::Result<Self> {
        for program in Self::programs() {
            uprobes::load(ebpf, program)?;
        }
        Ok(Self {
            processes: HashMap::new(),
            multi,
        })
    }

    /// Attaches the probes of `how` to the wait functions of `pid`'s libc, as links of
    /// `generation`: all of them, or none. The result probes are one after each syscall of
    /// each wait function; entry and return, a probe at each end of each.
    pub fn attach(
        &mut self,
        ebpf: &mut Ebpf,
        pid: u32,
        offer: &LibcOffer,
        how: LibcProbes,
        generation: u32,
    ) -> anyhow::Result<()> {
        self.detach(ebpf, pid);
        let target = offer.libc.reach(pid);
        let multi = self.multi.as_deref();
        let made = match how {
            LibcProbes::Result => {
                let points = offer.result_points()?;
                vec![
                    UprobeLinks::attach_in(
                        ebpf,
                        multi,
                        RESULT_PROGRAM,
                        pid,
                        &target,
                        points,
                        generation,
                    )
                    .with_context(|| format!("the wait results in {}", offer.libc.path))?,
                ]
            }
            LibcProbes::EntryReturn => {
                let mut made: Vec<UprobeLinks> = Vec::new();
                for &(function, offset) in &offer.functions.found {
                    let point = [UprobePoint {
                        file_offset: offset,
                        cookie: 0,
                    }];
                    let attach = |ebpf: &mut Ebpf, program| {
                        UprobeLinks::attach_in(
                            ebpf, multi, program, pid, &target, &point, generation,
                        )
                    };
                    let result = attach(ebpf, entry_program(function)).and_then(|entry| {
                        made.push(entry);
                        attach(ebpf, RETURN_PROGRAM)
                    });
                    match result {
                        Ok(ret) => made.push(ret),
                        Err(e) => {
                            for links in made {
                                links.detach(ebpf);
                            }
                            return Err(e)
                                .with_context(|| format!("{function} in {}", offer.libc.path));
                        }
                    }
                }
                made
            }
        };
        self.processes.insert(pid, made);
        Ok(())
    }

    pub fn is_attached(&self, pid: u32) -> bool {
        self.processes.contains_key(&pid)
    }

    pub fn detach(&mut self, ebpf: &mut Ebpf, pid: u32) {
        for links in self.processes.remove(&pid).into_iter().flatten() {
            links.detach(ebpf);
        }
    }

    /// `pid`'s links, to be closed in the background (a budget pause).
    pub fn take(
        &mut self,
        ebpf: &mut Ebpf,
        pid: u32,
    ) -> Vec<crate::probes::kernel::detacher::Detach> {
        self.processes
            .remove(&pid)
            .into_iter()
            .flatten()
            .flat_map(|links| links.take(ebpf))
            .collect()
    }

    pub fn detach_all(&mut self, ebpf: &mut Ebpf) {
        let pids: Vec<u32> = self.processes.keys().copied().collect();
        for pid in pids {
            self.detach(ebpf, pid);
        }
    }
}
