//! Probes that need QEMU's symbols (what a binary's symbols offer: [`crate::offer::symbols`]):
//! the read/write fallback on `memory_region_dispatch_read/_write` (no USDT) and timer
//! callbacks by name (`timer_mod_ns` discovery, then a run counter per callback).

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use anyhow::Context as _;
use aya::Ebpf;
use profiler_common::{RegionKey, kind};

use crate::offer::symbols::ExeSymbols;
use crate::probes::kernel::{
    detacher::Detach,
    uprobe_multi::MultiPrograms,
    uprobes::{self, UprobeLinks, UprobePoint},
};

pub const DISPATCH_PROGRAM: &str = "region_dispatch";
pub const TIMER_MOD_PROGRAM: &str = "timer_mod";
pub const CALLBACK_PROGRAM: &str = "timer_callback";

/// How long one refresh may spend attaching newly found timer callbacks.
const CALLBACK_ATTACH_PER_REFRESH: std::time::Duration = std::time::Duration::from_millis(200);
/// (process, callback address) of every callback `timer_mod` saw armed.
pub const SEEN_CALLBACKS_MAP: &str = "SEEN_CALLBACKS";
const SEEN_CALLBACKS_ADDED_MAP: &str = "SEEN_CALLBACKS_ADDED";

/// What the symbol-based probes put their uprobes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SymbolProbes {
    /// `memory_region_dispatch_read/_write`: the read/write fallback without USDT.
    Dispatch,
    /// `timer_mod_ns` and its siblings: timer callback discovery.
    TimerMod,
}

impl SymbolProbes {
    /// Where they go in `exe`, with their cookies.
    fn points(self, exe: &ExeSymbols) -> anyhow::Result<Vec<UprobePoint>> {
        Ok(match self {
            SymbolProbes::Dispatch => {
                let (read, write) = exe
                    .dispatch
                    .context("no memory_region_dispatch functions")?;
                let name_off = exe.region_name_offset.unwrap_or(0);
                [(read, kind::READ), (write, kind::WRITE)]
                    .map(|(offset, k)| UprobePoint {
                        file_offset: offset,
                        cookie: ((k as u64) << 32) | name_off,
                    })
                    .to_vec()
            }
            SymbolProbes::TimerMod => exe
                .timer_mod
                .iter()
                .map(|&offset| UprobePoint {
                    file_offset: offset,
                    cookie: exe.timer_cb_offset,
                })
                .collect(),
        })
    }
}

/// The symbol-based probes of one process.
#[derive(Debug)]
struct SymbolProcess {
    exe: Arc<ExeSymbols>,
    /// Load bias of the executable in the process (runtime = link-time + bias).
    bias: u64,
    /// memory_region_dispatch_read/_write (the read/write fallback).
    dispatch: Option<UprobeLinks>,
    /// timer_mod_ns & co (callback discovery).
    timer_mod: Option<UprobeLinks>,
    /// One counter per callback discovered so far.
    callbacks: UprobeLinks,
    /// Callback link-time addresses tried already (attached or not).
    callbacks_tried: BTreeSet<u64>,
    /// Detached for a budget pause: (program, points) to attach again.
    paused: Vec<(&'static str, Vec<UprobePoint>)>,
    is_paused: bool,
}

impl SymbolProcess {
    fn release(self, ebpf: &mut Ebpf) {
        for links in [self.dispatch, self.timer_mod].into_iter().flatten() {
            links.detach(ebpf);
        }
        self.callbacks.detach(ebpf);
    }

    fn is_empty(&self) -> bool {
        self.dispatch.is_none()
            && self.timer_mod.is_none()
            && self.callbacks.is_empty()
            && !self.is_paused
    }
}

/// The symbol-based sources: read/write through `memory_region_dispatch_*`, and timer
/// callbacks by name (`timer_mod_ns` discovery, then a run counter per callback).
#[derive(Debug, Default)]
pub struct SymbolSource {
    processes: HashMap<u32, SymbolProcess>,
    /// The multi-uprobe copies of the programs (`None`: per-site links).
    multi: Option<Arc<MultiPrograms>>,
    /// `SEEN_CALLBACKS_ADDED` when `SEEN_CALLBACKS` was last read, and whether it holds
    /// callbacks left for a later refresh: the map is read again only then (reading it is
    /// a cost per callback of every VM).
    callbacks_added: Option<u64>,
    callbacks_left: bool,
}

impl SymbolSource {
    /// The uprobe programs of this source.
    pub const PROGRAMS: [&'static str; 3] = [DISPATCH_PROGRAM, TIMER_MOD_PROGRAM, CALLBACK_PROGRAM];

    /// Loads the three programs (attached per process later), linked through `multi` where
    /// given.
    pub fn load(ebpf: &mut Ebpf, multi: Option<Arc<MultiPrograms>>) -> anyhow::Result<Self> {
        for name in Self::PROGRAMS {
            uprobes::load(ebpf, name)?;
        }
        Ok(Self {
            processes: HashMap::new(),
            multi,
            callbacks_added: None,
            callbacks_left: false,
        })
    }

    /// `pid`'s state, made with callback links of `generation` if new.
    fn process(
        &mut self,
        pid: u32,
        exe: &Arc<ExeSymbols>,
        generation: u32,
    ) -> anyhow::Result<&mut SymbolProcess> {
        match self.processes.entry(pid) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(e) => {
                let inode = crate::offer::exe::exe_identity(pid)?.1;
                let segments = exe.symbols.segments();
                let bias = crate::offer::exe::load_bias(pid, inode, |off| {
                    segments.iter().find_map(|s| s.vaddr_of(off))
                })?;
                Ok(e.insert(SymbolProcess {
                    exe: exe.clone(),
                    bias,
                    dispatch: None,
                    timer_mod: None,
                    callbacks: UprobeLinks::empty(CALLBACK_PROGRAM, generation),
                    callbacks_tried: BTreeSet::new(),
                    paused: Vec::new(),
                    is_paused: false,
                }))
            }
        }
    }

    /// Drops the entry of a process that has nothing attached (after a failed attach).
    /// Links `program` at `points` of `pid`, as multi links where the kernel makes them.
    fn link(
        &self,
        ebpf: &mut Ebpf,
        program: &'static str,
        pid: u32,
        points: &[UprobePoint],
        generation: u32,
    ) -> anyhow::Result<UprobeLinks> {
        UprobeLinks::attach(
            ebpf,
            self.multi.as_deref(),
            program,
            pid,
            points,
            generation,
        )
    }

    fn tidy(&mut self, pid: u32) {
        if self
            .processes
            .get(&pid)
            .is_some_and(SymbolProcess::is_empty)
        {
            self.processes.remove(&pid);
        }
    }

    /// Attaches `probes` to `pid`: all of their points or none (links of `generation`, as
    /// every link of this source below).
    pub fn attach(
        &mut self,
        ebpf: &mut Ebpf,
        pid: u32,
        exe: &Arc<ExeSymbols>,
        probes: SymbolProbes,
        generation: u32,
    ) -> anyhow::Result<()> {
        let points = probes.points(exe)?;
        match probes {
            SymbolProbes::Dispatch => self.attach_dispatch_at(ebpf, pid, exe, &points, generation),
            SymbolProbes::TimerMod => self.attach_program(
                ebpf,
                pid,
                exe,
                TIMER_MOD_PROGRAM,
                &points,
                generation,
                |p| &mut p.timer_mod,
            ),
        }
    }

    /// The dispatch probes at explicit points (tests inject a failing one).
    pub fn attach_dispatch_at(
        &mut self,
        ebpf: &mut Ebpf,
        pid: u32,
        exe: &Arc<ExeSymbols>,
        points: &[UprobePoint],
        generation: u32,
    ) -> anyhow::Result<()> {
        self.attach_program(ebpf, pid, exe, DISPATCH_PROGRAM, points, generation, |p| {
            &mut p.dispatch
        })
    }

    /// Attaches `program` at `points` of `pid` (all or none) into the slot `slot` picks,
    /// replacing what was there.
    #[allow(clippy::too_many_arguments)]
    fn attach_program(
        &mut self,
        ebpf: &mut Ebpf,
        pid: u32,
        exe: &Arc<ExeSymbols>,
        program: &'static str,
        points: &[UprobePoint],
        generation: u32,
        slot: impl FnOnce(&mut SymbolProcess) -> &mut Option<UprobeLinks>,
    ) -> anyhow::Result<()> {
        let result = self
            .process(pid, exe, generation)
            .map(|_| ())
            .and_then(|()| self.link(ebpf, program, pid, points, generation));
        match result {
            Ok(links) => {
                let process = self.processes.get_mut(&pid).expect("made above");
                if let Some(old) = slot(process).replace(links) {
                    old.detach(ebpf);
                }
                Ok(())
            }
            Err(e) => {
                self.tidy(pid);
                Err(e)
            }
        }
    }

    pub fn dispatch_attached(&self, pid: u32) -> bool {
        self.processes
            .get(&pid)
            .is_some_and(|p| p.dispatch.is_some())
    }

    /// Attaches a run counter to every timer callback QEMU armed since the last refresh
    /// (`SEEN_CALLBACKS`, filled by the timer_mod probe). Returns the number attached.
    pub fn refresh_callbacks(&mut self, ebpf: &mut Ebpf) -> usize {
        // Every refresh: no VM with callback probes, no read; else one batched read (iterating
        // took two syscalls per callback of every VM).
        if self.processes.is_empty() {
            return 0;
        }
        // Read before the map: an entry added after this read shows as growth next time.
        let added = crate::probes::kernel::batch::per_cpu_total(ebpf, SEEN_CALLBACKS_ADDED_MAP, 0);
        if added.is_some() && added == self.callbacks_added && !self.callbacks_left {
            return 0;
        }
        self.callbacks_added = added;
        self.callbacks_left = false;
        let Some(Ok(seen)) = ebpf
            .map(SEEN_CALLBACKS_MAP)
            .map(crate::probes::kernel::batch::read_hash::<RegionKey, u64>)
        else {
            return 0;
        };
        let found: Vec<(u32, u64)> = seen.into_iter().map(|(k, _)| (k.tgid, k.region)).collect();
        // This refresh's new callbacks of each VM, attached as one batch: one link to close.
        let mut batches: HashMap<u32, Vec<UprobePoint>> = HashMap::new();
        for (pid, address) in found {
            let Some(process) = self.processes.get_mut(&pid) else {
                continue;
            };
            // Paused by the budget: taken up when it resumes (the map keeps it).
            if process.is_paused {
                self.callbacks_left = true;
                continue;
            }
            let vaddr = address.wrapping_sub(process.bias);
            // Remember failures too (e.g. a callback in a shared library), so they are not
            // retried every second.
            if !process.callbacks_tried.insert(vaddr) {
                continue;
            }
            let Some(offset) = process.exe.symbols.vaddr_to_file_offset(vaddr) else {
                continue;
            };
            batches.entry(pid).or_default().push(UprobePoint {
                file_offset: offset,
                cookie: vaddr,
            });
        }
        let mut attached = 0;
        let started = std::time::Instant::now();
        for (pid, points) in batches {
            let process = self.processes.get_mut(&pid).expect("found above");
            // Registering a uprobe waits for an RCU grace period per probed offset: with
            // thousands of VMs finding their callbacks at once, attaching them all in one
            // refresh would hold the sampling thread (and every window's close) for tens of
            // seconds. The rest are tried again at the next refresh.
            if started.elapsed() > CALLBACK_ATTACH_PER_REFRESH {
                for point in &points {
                    process.callbacks_tried.remove(&point.cookie);
                }
                self.callbacks_left = true;
                continue;
            }
            let multi = self.multi.as_deref();
            if process.callbacks.add(ebpf, multi, pid, &points).is_ok() {
                attached += points.len();
            }
        }
        attached
    }

    /// Takes every link of `pid` (to be closed in the background) but remembers where they
    /// were, discovered callbacks included, for [`Self::resume`] (a budget pause).
    pub fn pause(&mut self, ebpf: &mut Ebpf, pid: u32) -> Vec<Detach> {
        let Some(process) = self.processes.get_mut(&pid) else {
            return Vec::new();
        };
        if process.is_paused {
            return Vec::new();
        }
        process.is_paused = true;
        let generation = process.callbacks.generation();
        let callbacks = std::mem::replace(
            &mut process.callbacks,
            UprobeLinks::empty(CALLBACK_PROGRAM, generation),
        );
        let mut taken = Vec::new();
        for links in [
            process.dispatch.take(),
            process.timer_mod.take(),
            Some(callbacks),
        ]
        .into_iter()
        .flatten()
        {
            if !links.is_empty() {
                process
                    .paused
                    .push((links.program(), links.points().to_vec()));
            }
            taken.extend(links.take(ebpf));
        }
        taken
    }

    /// Attaches again what [`Self::pause`] detached, as links of `generation` (all or
    /// nothing).
    pub fn resume(&mut self, ebpf: &mut Ebpf, pid: u32, generation: u32) -> anyhow::Result<()> {
        let Some(process) = self.processes.get(&pid) else {
            return Ok(());
        };
        let mut made: Vec<UprobeLinks> = Vec::new();
        for (program, points) in &process.paused {
            match self.link(ebpf, program, pid, points, generation) {
                Ok(links) => made.push(links),
                Err(e) => {
                    for links in made {
                        links.detach(ebpf);
                    }
                    return Err(e);
                }
            }
        }
        let process = self.processes.get_mut(&pid).expect("looked up above");
        process.paused.clear();
        process.is_paused = false;
        process.callbacks = UprobeLinks::empty(CALLBACK_PROGRAM, generation);
        for links in made {
            match links.program() {
                DISPATCH_PROGRAM => process.dispatch = Some(links),
                TIMER_MOD_PROGRAM => process.timer_mod = Some(links),
                _ => process.callbacks = links,
            }
        }
        Ok(())
    }

    /// Every link of `pid`, to be closed in the background (the VM is gone).
    pub fn take(&mut self, ebpf: &mut Ebpf, pid: u32) -> Vec<Detach> {
        let mut taken = Vec::new();
        if let Some(process) = self.processes.remove(&pid) {
            for links in [process.dispatch, process.timer_mod, Some(process.callbacks)]
                .into_iter()
                .flatten()
            {
                taken.extend(links.take(ebpf));
            }
        }
        // Its discovered callbacks are forgotten with its other map entries
        // (`EventProbes::forget_process`), not here: at exit every VM is taken at once.
        taken
    }

    /// Detaches everything of `pid` and drops its discovered callbacks.
    pub fn detach(&mut self, ebpf: &mut Ebpf, pid: u32) {
        if let Some(process) = self.processes.remove(&pid) {
            process.release(ebpf);
        }
        crate::probes::kernel::batch::forget_region_keys::<u64>(ebpf, SEEN_CALLBACKS_MAP, pid);
    }

    pub fn detach_all(&mut self, ebpf: &mut Ebpf) {
        let pids: Vec<u32> = self.processes.keys().copied().collect();
        for pid in pids {
            self.detach(ebpf, pid);
        }
    }
}
