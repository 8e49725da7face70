//! Attaching what the source policy picks for a VM, all or nothing per source, and the shared
//! tracepoint groups its timer source may need.

use anyhow::Context as _;
use profiler_common::watch_flag;

use crate::{
    identity::discovery::QemuProcess,
    note::Note,
    offer::{
        exe::ExeAnalysis,
        kernel::KernelOffer,
        libc::{LibcOffer, LibcProbes},
        policy::{self, ProcessOffer, ReadWriteSource, TimerSource, VmSources},
    },
    probes::{
        AttachedVm, NameSources,
        sources::{symbols::SymbolProbes, usdt},
    },
};

use super::{EventProbes, Served, SharedWaits, process_alive};

impl EventProbes {
    /// Attaches one read/write source to `pid`, as links of `generation` (all or nothing).
    pub(super) fn attach_read_write(
        &mut self,
        source: ReadWriteSource,
        pid: u32,
        exe: Option<&ExeAnalysis>,
        generation: u32,
    ) -> Result<(), String> {
        let result = match source {
            ReadWriteSource::Usdt => match exe.map(|e| &e.usdt) {
                Some(Ok(Some(usdt))) => self
                    .usdt
                    .attach(&mut self.ebpf, pid, usdt, generation)
                    .map(|how| {
                        if how == usdt::SemaphoreManagement::ByHand {
                            self.pending_notes.push(Note::general(format!(
                                "pid {pid}: another tracer holds QEMU's USDT sites without a \
                             kernel-managed semaphore; the profiler raises the semaphores by \
                             hand, and a SIGKILL of the profiler would leave them raised"
                            )));
                        }
                    }),
                _ => Err(anyhow::anyhow!("no USDT probes")),
            },
            ReadWriteSource::Symbols => match exe.map(|e| &e.symbols) {
                Some(Ok(symbols)) => self.symbols.attach(
                    &mut self.ebpf,
                    pid,
                    symbols,
                    SymbolProbes::Dispatch,
                    generation,
                ),
                _ => Err(anyhow::anyhow!("no symbols")),
            },
            // Attached host-wide at load; the plan only offers it when that worked.
            ReadWriteSource::KvmTracepoints => Ok(()),
        };
        result.map_err(|e| format!("{e:#}"))
    }
    /// Attaches what the source policy picks for `vm` (all or nothing per source) and says
    /// which source serves each count.
    pub(super) fn attach_planned(&mut self, vm: &QemuProcess) -> anyhow::Result<AttachedVm> {
        let pid = vm.key.pid;
        let name = &vm.identity.name;
        let _attaching = self.detacher.hold();
        let (binary, exe) = self.catalog.offer(pid);
        let libc = self.libc_catalog.offer(pid);
        let offer = ProcessOffer {
            binary,
            libc: libc.as_ref().map(|_| ()).map_err(Clone::clone),
            timer_choice: self.timer_choice,
        };
        let kernel = KernelOffer {
            hrtimer: self.hrtimer_waits.status(),
            hrtimer_start: self.hrtimer_waits.starts_status(),
            kvm: self.kvm.status().clone(),
            guest: self.kvm.guest().clone(),
        };
        let mut plan = policy::plan(&offer, vm.identity.accel, &kernel);
        if !process_alive(pid) {
            // Gone while it was being looked at: nothing to attach (its exit is recorded).
            plan = plan.exited();
        }
        let libc = libc.ok();
        let timer = self.attach_timer(&plan, pid, libc.as_ref(), name);
        let mut attempts = Vec::new();
        for &source in &plan.read_write {
            let generation = self.watch_table.generation(pid);
            let result = self.attach_read_write(source, pid, exe.as_deref(), generation);
            let attached = result.is_ok();
            attempts.push((source, result));
            if attached || !process_alive(pid) {
                break;
            }
        }
        let read_write = policy::settle(&plan, &attempts);
        let (timer, mut notes) = timer;
        notes.extend(
            attempts
                .iter()
                .filter_map(|(source, r)| r.as_ref().err().map(|why| (source, why)))
                .map(|(source, why)| {
                    Note::vm(name, format!("{} source not used: {why}", source.label()))
                }),
        );
        let symbols = exe.as_ref().and_then(|e| e.symbols.as_ref().ok());
        let callbacks = match (&plan.callbacks, symbols) {
            (Ok(()), Some(symbols)) => self
                .symbols
                .attach(
                    &mut self.ebpf,
                    pid,
                    symbols,
                    SymbolProbes::TimerMod,
                    self.watch_table.generation(pid),
                )
                .map_err(|e| policy::CallbacksUnavailable::AttachFailed(format!("{e:#}"))),
            (Err(why), _) => Err(why.clone()),
            (Ok(()), None) => Err(policy::CallbacksUnavailable::SymbolsUnreadable(
                "no symbols".into(),
            )),
        };
        if let Err(why @ policy::CallbacksUnavailable::AttachFailed(_)) = &callbacks {
            notes.push(Note::vm(name, why.to_string()));
        }
        notes.append(&mut self.pending_notes);
        let mut names = NameSources::from_symbols(
            symbols,
            callbacks.is_ok(),
            read_write == Ok(ReadWriteSource::KvmTracepoints),
        );
        if plan.guest.exits.is_ok() {
            names.exit_reasons = Some(self.kvm.exit_reasons());
        }
        let sources = VmSources {
            read_write,
            callbacks,
            timer,
            guest: plan.guest.clone(),
        };
        self.served.insert(
            pid,
            Served {
                sources: sources.clone(),
                exe: exe.clone(),
                libc,
                paused: false,
            },
        );
        Ok(AttachedVm {
            sources,
            names,
            notes,
        })
    }
    /// Attaches the plan's timer candidates to `pid` in order until one serves it; says which
    /// (or why none), with a note for each candidate that failed.
    pub(super) fn attach_timer(
        &mut self,
        plan: &policy::SourcePlan,
        pid: u32,
        libc: Option<&LibcOffer>,
        name: &str,
    ) -> (Result<TimerSource, String>, Vec<Note>) {
        let mut attempts = Vec::new();
        for &source in &plan.timer {
            let result = match source {
                TimerSource::LibcUprobes | TimerSource::LibcEntryReturnUprobes => match libc {
                    Some(offer) => self.attach_libc(source, pid, offer),
                    None => Err(anyhow::anyhow!("no C library offer")),
                },
                TimerSource::SyscallTracepoints => {
                    self.acquire_shared(SharedWaits::Syscall, pid, watch_flag::WAITS_BY_SYSCALL)
                }
                TimerSource::HrtimerTracepoints => {
                    self.acquire_shared(SharedWaits::Hrtimer, pid, watch_flag::WAITS_BY_HRTIMER)
                }
            }
            .map_err(|e| format!("{e:#}"));
            let attached = result.is_ok();
            attempts.push((source, result));
            // A VM that exited meanwhile needs no fallback (and the tracepoints' attach and
            // detach would stall sampling for seconds).
            if attached || !process_alive(pid) {
                break;
            }
        }
        let notes = attempts
            .iter()
            .filter_map(|(source, r)| r.as_ref().err().map(|why| (source, why)))
            .map(|(source, why)| {
                Note::vm(
                    name,
                    format!("{} timer source not used: {why}", source.label()),
                )
            })
            .collect();
        (policy::settle_timer(plan, &attempts), notes)
    }
    pub(super) fn set_watch_flags(&mut self, pid: u32, flags: u32) -> anyhow::Result<()> {
        let flags = flags | self.base_flags;
        let wait_block = self.counters.wait_block(pid);
        self.watch_table.set(&mut self.ebpf, pid, flags, wait_block)
    }
    /// Stops counting `pid` by shared tracepoints; the last user's links are closed in the
    /// background.
    pub(super) fn release_shared(&mut self, shared: SharedWaits, pid: u32) {
        let links = match shared {
            SharedWaits::Syscall => self.syscall_waits.release(&mut self.ebpf, pid),
            SharedWaits::Hrtimer => self.hrtimer_waits.release(&mut self.ebpf, pid),
            SharedWaits::HrtimerStarts => self.hrtimer_waits.release_starts(&mut self.ebpf, pid),
        };
        if !links.is_empty() {
            self.detacher.submit(shared.job(), links);
        }
    }
    /// Counts `pid` by shared tracepoints (their programs act on `flags`), attaching them for
    /// their first user.
    pub(super) fn acquire_shared(
        &mut self,
        shared: SharedWaits,
        pid: u32,
        flags: u32,
    ) -> anyhow::Result<()> {
        // Links still being closed from their last user would count twice.
        self.detacher.wait_for(shared.job());
        match shared {
            SharedWaits::Syscall => self.syscall_waits.acquire(&mut self.ebpf, pid),
            SharedWaits::Hrtimer => self.hrtimer_waits.acquire(&mut self.ebpf, pid),
            SharedWaits::HrtimerStarts => self.hrtimer_waits.acquire_starts(&mut self.ebpf, pid),
        }?;
        self.set_watch_flags(pid, flags)
            .inspect_err(|_| self.release_shared(shared, pid))
    }
    /// The libc source for `pid`, probed as `source` says: the result probes also need
    /// `timer:hrtimer_start` (it marks a ppoll that armed its timeout). All or nothing.
    pub(super) fn attach_libc(
        &mut self,
        source: TimerSource,
        pid: u32,
        offer: &LibcOffer,
    ) -> anyhow::Result<()> {
        let how = source.libc_probes().context("not a libc source")?;
        if how == LibcProbes::Result {
            // Checked first: no tracepoint is attached for a library without result sites.
            offer.result_points()?;
            self.acquire_shared(
                SharedWaits::HrtimerStarts,
                pid,
                watch_flag::WAITS_BY_LIBC_RESULT,
            )
            .context("timer:hrtimer_start (tells a ppoll's timeout from a zero timeout)")?;
        }
        let generation = self.watch_table.generation(pid);
        self.libc
            .attach(&mut self.ebpf, pid, offer, how, generation)
            .inspect_err(|_| {
                if how == LibcProbes::Result {
                    self.release_shared(SharedWaits::HrtimerStarts, pid);
                    // Back to no source flags (the process stays watched: the next candidate
                    // sets its own).
                    let _ = self.set_watch_flags(pid, 0);
                }
            })
    }
    /// Stops counting `pid`'s waits, whichever source did.
    pub(super) fn detach_timer(&mut self, pid: u32) {
        self.libc.detach(&mut self.ebpf, pid);
        self.release_shared(SharedWaits::Syscall, pid);
        self.release_shared(SharedWaits::Hrtimer, pid);
        self.release_shared(SharedWaits::HrtimerStarts, pid);
        if self.watched.contains(&pid) {
            let _ = self.set_watch_flags(pid, 0);
        }
    }
}
