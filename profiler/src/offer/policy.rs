//! Which probe source serves each count of a VM: one pure function ([`plan`]) of what the VM's
//! QEMU binary offers, the accelerator it runs under and whether the KVM tracepoints are
//! attached. `profiler list` shows the plan without attaching anything; `record`, `top` and
//! every later command attach the plan's candidates in order ([`settle`]), so both say the
//! same thing for the same VM unless an attach itself fails (and then the record says why).

use std::fmt;

use crate::{identity::cmdline::Accel, offer::kernel::KernelOffer};

/// What serves a VM's read/write counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReadWriteSource {
    /// QEMU's `qemu:memory_region_ops_read/_write` USDT probes (dtrace trace backend).
    Usdt,
    /// uprobes on `memory_region_dispatch_read/_write`, found through QEMU's symbols.
    Symbols,
    /// The `kvm:kvm_pio` / `kvm_mmio` / `kvm_fast_mmio` / `kvm_userspace_exit` tracepoints.
    KvmTracepoints,
}

impl ReadWriteSource {
    /// The name records carry in `sources.read` / `sources.write`.
    pub fn label(self) -> &'static str {
        match self {
            ReadWriteSource::Usdt => "usdt",
            ReadWriteSource::Symbols => "symbols",
            ReadWriteSource::KvmTracepoints => "kvm-tracepoints",
        }
    }
}

/// What counts a VM's timer and fd wakeups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TimerSource {
    /// uprobes on its C library's `ppoll` / `epoll_pwait` / `epoll_pwait2`, scoped to the
    /// process: nothing else on the host pays. One per wait, after the syscall instruction
    /// (with `timer:hrtimer_start` telling a ppoll's timeout from a zero-timeout poll).
    LibcUprobes,
    /// The same functions probed at entry and return: two traps per wait, for a C library
    /// whose syscall sites are not glibc's pattern.
    LibcEntryReturnUprobes,
    /// The `syscalls:sys_{enter,exit}_*` tracepoints of the wait syscalls: any QEMU, but while
    /// attached every syscall of every task on the host takes the slow path.
    SyscallTracepoints,
    /// The `timer:hrtimer_*` tracepoints of the sleep timers its waits arm, and
    /// `sched:sched_switch` for its waits without one: no trap in the QEMU, nothing for
    /// syscalls; fd wakeups only of waits that slept.
    HrtimerTracepoints,
}

impl TimerSource {
    /// The name records carry in `sources.timer`.
    pub fn label(self) -> &'static str {
        match self {
            TimerSource::LibcUprobes => "libc-uprobes",
            TimerSource::LibcEntryReturnUprobes => "libc-entry-return-uprobes",
            TimerSource::SyscallTracepoints => "syscall",
            TimerSource::HrtimerTracepoints => "hrtimer",
        }
    }
}

impl TimerSource {
    /// What it is, in the words the README's count table and `--timer-source`'s help use (a
    /// test keeps them naming `auto`'s order).
    pub fn what(self) -> &'static str {
        match self {
            TimerSource::HrtimerTracepoints => "the hrtimer tracepoints",
            TimerSource::LibcUprobes => "uprobes on the QEMU's C library",
            TimerSource::LibcEntryReturnUprobes => "entry and return uprobes",
            TimerSource::SyscallTracepoints => "the wait syscalls' tracepoints",
        }
    }

    /// How the libc source probes, if it is one.
    pub fn libc_probes(self) -> Option<crate::offer::libc::LibcProbes> {
        use crate::offer::libc::LibcProbes;
        match self {
            TimerSource::LibcUprobes => Some(LibcProbes::Result),
            TimerSource::LibcEntryReturnUprobes => Some(LibcProbes::EntryReturn),
            TimerSource::SyscallTracepoints | TimerSource::HrtimerTracepoints => None,
        }
    }
}

/// `--timer-source`'s help: what `auto` picks, in its order (a test holds it to
/// [`timer_plan`]).
pub const TIMER_SOURCE_HELP: &str = "What counts timer and fd wakeups: `auto` picks the hrtimer \
     tracepoints (`timer:hrtimer_*` and `sched:sched_switch`: no trap in QEMU, nothing on the \
     syscall path) where the kernel offers them, else uprobes on the QEMU's C library wait \
     functions (a trap per wait, only that QEMU pays), else entry and return uprobes on them, \
     else the wait syscalls' tracepoints (every syscall on the host pays while they are \
     attached)";

/// Which timer sources the user allows (`--timer-source`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TimerChoice {
    /// The hrtimer tracepoints where the kernel offers them (no trap in QEMU, nothing for
    /// syscalls), else libc uprobes where the process's C library has the wait functions,
    /// else the syscall tracepoints.
    #[default]
    Auto,
    /// libc uprobes only (a QEMU they cannot serve has no timer counts): every wait's result,
    /// a trap per wait call.
    Libc,
    /// libc uprobes at the wait functions' entry and return only (two traps per wait: to
    /// compare, or where the result sites misbehave).
    LibcEntryReturn,
    /// The syscall tracepoints for every QEMU.
    Syscall,
    /// The hrtimer tracepoints for every QEMU (what `auto` picks where they load): timer
    /// wakeups at the least cost to QEMU and the host; fd wakeups of the waits that slept
    /// (docs/events.md).
    Hrtimer,
}

/// How uprobes are linked (`--uprobe-links`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum UprobeLinkChoice {
    /// Multi-uprobe links where the kernel makes them (Linux ≥ 6.6), per-site links where it
    /// does not. Watching every VM, a QEMU binary's sites are linked once for all its VMs (a
    /// trap costs one handler however many VMs run it, and a VM's exit closes nothing); with
    /// `--vm`/`--pid` (the others would trap too) or `--max-overhead` (a pause detaches one
    /// VM's links) each VM has its own.
    #[default]
    Auto,
    /// One multi-uprobe link per QEMU binary and program, shared by its VMs, even with
    /// `--vm`/`--pid` (the binary's other QEMUs then trap without being counted); per VM
    /// under `--max-overhead`.
    PerBinary,
    /// One multi-uprobe link per VM and program: breakpoints in watched processes only, but
    /// each trap runs every VM's handler and each VM's exit waits a grace period per link.
    PerVm,
    /// One perf-event link per probe site (what older kernels get).
    PerSite,
}

/// Why a VM's QEMU gives no read/write counts without a better build.
pub const NO_USDT_REASON: &str = "this QEMU has no qemu:memory_region_ops_read/write USDT \
     probes (built without the dtrace trace backend, e.g. Debian/Ubuntu packages); use a QEMU \
     built with --enable-trace-backends=dtrace (Fedora/RHEL packages are; `cargo xtask \
     qemu-usdt` builds one)";

/// What fixes a stripped QEMU.
pub const STRIPPED_FIX: &str = "no debug file found; install its debug symbols (Debian: \
     qemu-system-x86-dbgsym, Fedora: qemu-debuginfo) or use a QEMU built with \
     --enable-trace-backends=dtrace";

/// Why no source serves a VM's read/write counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadWriteUnavailable {
    /// The QEMU binary could not be read (`/proc/PID/exe`: permission, process gone).
    ExeUnreadable(String),
    /// Its USDT notes could not be parsed.
    UsdtNotesUnreadable(String),
    /// No USDT probes, and the symbols could not be read at all.
    NoUsdtSymbolsUnreadable(String),
    /// No USDT probes and a stripped binary without a debug file.
    NoUsdtStripped,
    /// No USDT probes; symbols present but without `memory_region_dispatch_read/_write`.
    NoUsdtNoDispatch,
    /// The best source could not be attached.
    AttachFailed {
        source: ReadWriteSource,
        why: String,
    },
    /// A KVM guest whose binary offers nothing, and the KVM tracepoints are not attached.
    KvmTracepoints {
        binary: Box<ReadWriteUnavailable>,
        why: String,
    },
}

impl fmt::Display for ReadWriteUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ExeUnreadable(why) => f.write_str(why),
            Self::UsdtNotesUnreadable(why) => write!(f, "reading its USDT notes: {why}"),
            Self::NoUsdtSymbolsUnreadable(why) => write!(f, "{NO_USDT_REASON}; {why}"),
            Self::NoUsdtStripped => {
                write!(f, "stripped QEMU without USDT probes: {STRIPPED_FIX}")
            }
            Self::NoUsdtNoDispatch => f.write_str(
                "no USDT probes, and memory_region_dispatch_read/memory_region_dispatch_write \
                 not found in the symbols",
            ),
            Self::AttachFailed {
                source: ReadWriteSource::Usdt,
                why,
            } => write!(f, "attaching the USDT probes: {why}"),
            Self::AttachFailed {
                source: ReadWriteSource::Symbols,
                why,
            } => write!(f, "attaching memory_region_dispatch probes: {why}"),
            Self::AttachFailed {
                source: ReadWriteSource::KvmTracepoints,
                why,
            } => write!(f, "KVM tracepoints: {why}"),
            Self::KvmTracepoints { binary, why } => write!(f, "{binary}; KVM tracepoints: {why}"),
        }
    }
}

/// Why a VM's timer events cannot be split by QEMU callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallbacksUnavailable {
    ExeUnreadable(String),
    SymbolsUnreadable(String),
    Stripped,
    NoTimerMod,
    AttachFailed(String),
}

impl fmt::Display for CallbacksUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ExeUnreadable(why) | Self::SymbolsUnreadable(why) => f.write_str(why),
            Self::Stripped => write!(f, "stripped QEMU: {STRIPPED_FIX}"),
            Self::NoTimerMod => f.write_str("timer_mod_ns not found in the symbols"),
            Self::AttachFailed(why) => write!(f, "attaching the timer_mod probes: {why}"),
        }
    }
}

/// What a QEMU binary's file offers the probes, found without attaching anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BinaryOffer {
    /// The binary could not be read.
    Unreadable(String),
    Readable {
        /// `Ok(true)`: the `memory_region_ops_read/_write` USDT probes are there.
        usdt: Result<bool, String>,
        /// What its symbols (own or from a debug file) offer, or why they could not be read.
        symbols: Result<SymbolsOffer, String>,
    },
}

/// What a binary's symbols offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SymbolsOffer {
    /// A full symbol table (`.symtab` or a debug file), not only the exported symbols.
    pub full: bool,
    /// `memory_region_dispatch_read/_write` were found.
    pub dispatch: bool,
    /// `timer_mod_ns` (or a sibling) was found.
    pub timer_mod: bool,
}

/// Which source to try for each count of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePlan {
    /// Read/write sources to attach, best first; the first that attaches serves the counts.
    pub read_write: Vec<ReadWriteSource>,
    /// Why no read/write source is available when `read_write` is empty.
    pub read_write_none: Option<ReadWriteUnavailable>,
    /// Whether timer callbacks can be named (the `timer_mod` probes and their symbols).
    pub callbacks: Result<(), CallbacksUnavailable>,
    /// Timer sources to attach, best first.
    pub timer: Vec<TimerSource>,
    /// Why no timer source is allowed when `timer` is empty.
    pub timer_none: Option<String>,
    /// What counts the guest's own activity (vCPU wakeups, exits); host-wide, nothing to try.
    pub guest: GuestSources,
}

/// What counts a guest's own activity, which never reaches QEMU's event loop (`Err`: why not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSources {
    /// Its vCPU threads woken from a halt (`kvm:kvm_vcpu_wakeup`).
    pub vcpu_wakeups: Result<(), String>,
    /// Its VM exits by reason (`kvm:kvm_exit`).
    pub exits: Result<(), String>,
}

impl GuestSources {
    /// Under `accel` on a kernel offering `kernel`: under KVM what the kernel offers; under TCG
    /// and Xen nothing, and why.
    pub fn plan(accel: Accel, kernel: &KernelOffer) -> Self {
        let none = |why: &str| Self {
            vcpu_wakeups: Err(why.to_string()),
            exits: Err(why.to_string()),
        };
        match accel {
            Accel::Kvm => Self {
                vcpu_wakeups: kernel.guest.vcpu_wakeups.clone(),
                exits: kernel.guest.exits.clone(),
            },
            Accel::Tcg => none(
                "TCG: the guest's timers are QEMU timers (counted in `timer`), and no vCPU \
                 halts or exits in the kernel",
            ),
            Accel::Xen => none("Xen schedules this guest's vCPUs: no host thread halts for them"),
            Accel::Unknown => none("not a KVM guest as far as its open files tell"),
        }
    }
}

impl SourcePlan {
    /// The plan for a process that exited before anything was attached: nothing to try (a
    /// fallback would only cost time, the syscall tracepoints' seconds to detach above all).
    pub fn exited(self) -> Self {
        const WHY: &str = "the process exited before its probes were attached";
        Self {
            read_write: Vec::new(),
            read_write_none: Some(ReadWriteUnavailable::ExeUnreadable(WHY.into())),
            callbacks: Err(CallbacksUnavailable::ExeUnreadable(WHY.into())),
            timer: Vec::new(),
            timer_none: Some(WHY.into()),
            guest: GuestSources {
                vcpu_wakeups: Err(WHY.into()),
                exits: Err(WHY.into()),
            },
        }
    }

    /// What the plan gives when every attach succeeds: what `profiler list` shows.
    pub fn expected(&self) -> VmSources {
        // The first candidate, else the plan's reason for having none.
        fn first<S: Copy, E: Clone>(candidates: &[S], none: &Option<E>) -> Result<S, E> {
            candidates
                .first()
                .copied()
                .ok_or_else(|| none.clone().expect("a plan without candidates says why"))
        }
        VmSources {
            read_write: first(&self.read_write, &self.read_write_none),
            callbacks: self.callbacks.clone(),
            timer: first(&self.timer, &self.timer_none),
            guest: self.guest.clone(),
        }
    }
}

/// The timer sources for a process whose C library offers the wait functions (`Ok`) or not
/// (`Err`: why), on a kernel that offers `kernel`, as `choice` allows, best first. The
/// syscall tracepoints serve any process; the libc result probes need `timer:hrtimer_start`.
pub fn timer_plan(
    libc: &Result<(), String>,
    kernel: &KernelOffer,
    choice: TimerChoice,
) -> (Vec<TimerSource>, Option<String>) {
    use TimerSource::*;
    let name = |choice: TimerChoice| {
        clap::ValueEnum::to_possible_value(&choice)
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    };
    // The libc sources this process and kernel allow, best first.
    let libc_sources = || -> Vec<TimerSource> {
        if libc.is_err() {
            return Vec::new();
        }
        let results = kernel.hrtimer_start.is_ok().then_some(LibcUprobes);
        results
            .into_iter()
            .chain([LibcEntryReturnUprobes])
            .collect()
    };
    match (choice, libc) {
        (TimerChoice::Auto, _) => {
            let hrtimer = kernel.hrtimer.is_ok().then_some(HrtimerTracepoints);
            let sources = hrtimer
                .into_iter()
                .chain(libc_sources())
                .chain([SyscallTracepoints])
                .collect();
            (sources, None)
        }
        (TimerChoice::Syscall, _) => (vec![SyscallTracepoints], None),
        (TimerChoice::Libc, Ok(())) => (libc_sources(), None),
        (TimerChoice::LibcEntryReturn, Ok(())) => (vec![LibcEntryReturnUprobes], None),
        (TimerChoice::Hrtimer, _) => match &kernel.hrtimer {
            Ok(()) => (vec![HrtimerTracepoints], None),
            Err(why) => (
                Vec::new(),
                Some(format!(
                    "--timer-source {}, and the kernel does not offer its tracepoints: {why}",
                    name(choice)
                )),
            ),
        },
        (choice @ (TimerChoice::Libc | TimerChoice::LibcEntryReturn), Err(why)) => (
            Vec::new(),
            Some(format!(
                "--timer-source {}, and its C library cannot be probed: {why}",
                name(choice)
            )),
        ),
    }
}

/// The source policy: which sources can serve each count of a VM whose binary and C library
/// offer `offer`, running under `accel`, on a kernel that offers `kernel`.
///
/// Read/write, best first: USDT (exact, names every region, any accelerator) → uprobes on
/// `memory_region_dispatch_*` (same counts, needs symbols) → under KVM only, the kvm
/// tracepoints (exits to QEMU, named by port/page). Timer callbacks need symbols.
pub fn plan(offer: &ProcessOffer, accel: Accel, kernel: &KernelOffer) -> SourcePlan {
    let kvm = &kernel.kvm;
    let (timer, timer_none) = timer_plan(&offer.libc, kernel, offer.timer_choice);
    let (usdt, symbols) = match &offer.binary {
        BinaryOffer::Unreadable(why) => {
            return with_kvm(
                SourcePlan {
                    read_write: Vec::new(),
                    read_write_none: Some(ReadWriteUnavailable::ExeUnreadable(why.clone())),
                    callbacks: Err(CallbacksUnavailable::ExeUnreadable(why.clone())),
                    timer,
                    timer_none,
                    guest: GuestSources::plan(accel, kernel),
                },
                accel,
                kvm,
            );
        }
        BinaryOffer::Readable { usdt, symbols } => (usdt, symbols),
    };
    let mut read_write = Vec::new();
    if usdt == &Ok(true) {
        read_write.push(ReadWriteSource::Usdt);
    }
    let symbols_dispatch = match symbols {
        Ok(s) if s.full && s.dispatch => Ok(()),
        Ok(s) if !s.full => Err(ReadWriteUnavailable::NoUsdtStripped),
        Ok(_) => Err(ReadWriteUnavailable::NoUsdtNoDispatch),
        Err(why) => Err(ReadWriteUnavailable::NoUsdtSymbolsUnreadable(why.clone())),
    };
    if symbols_dispatch.is_ok() {
        read_write.push(ReadWriteSource::Symbols);
    }
    let read_write_none = match (usdt, symbols_dispatch) {
        (_, Ok(())) | (Ok(true), _) => None,
        // Notes that cannot be parsed say more than "no probes".
        (Err(why), _) => Some(ReadWriteUnavailable::UsdtNotesUnreadable(why.clone())),
        (Ok(false), Err(why)) => Some(why),
    };
    let callbacks = match symbols {
        Ok(s) if !s.full => Err(CallbacksUnavailable::Stripped),
        Ok(s) if !s.timer_mod => Err(CallbacksUnavailable::NoTimerMod),
        Ok(_) => Ok(()),
        Err(why) => Err(CallbacksUnavailable::SymbolsUnreadable(why.clone())),
    };
    with_kvm(
        SourcePlan {
            read_write,
            read_write_none,
            callbacks,
            timer,
            timer_none,
            guest: GuestSources::plan(accel, kernel),
        },
        accel,
        kvm,
    )
}

/// Everything the policy decides on for one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessOffer {
    /// What its QEMU binary offers.
    pub binary: BinaryOffer,
    /// Whether its C library's wait functions can be probed (`Err`: why not).
    pub libc: Result<(), String>,
    /// The timer sources the user allows.
    pub timer_choice: TimerChoice,
}

/// Adds the KVM tracepoints as the last read/write candidate of a KVM guest.
fn with_kvm(mut plan: SourcePlan, accel: Accel, kvm: &Result<(), String>) -> SourcePlan {
    if accel != Accel::Kvm {
        return plan;
    }
    match kvm {
        Ok(()) => {
            plan.read_write.push(ReadWriteSource::KvmTracepoints);
            plan.read_write_none = None;
        }
        Err(why) => {
            if let Some(binary) = plan.read_write_none.take() {
                plan.read_write_none = Some(ReadWriteUnavailable::KvmTracepoints {
                    binary: Box::new(binary),
                    why: why.clone(),
                });
            }
        }
    }
    plan
}

/// Which source serves each count of one watched VM, after attaching.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSources {
    pub read_write: Result<ReadWriteSource, ReadWriteUnavailable>,
    pub callbacks: Result<(), CallbacksUnavailable>,
    /// What counts its timer and fd wakeups (`Err`: why nothing does).
    pub timer: Result<TimerSource, String>,
    /// What counts its own activity under KVM.
    pub guest: GuestSources,
}

impl VmSources {
    /// The `sources` object of the records (strings are the record contract).
    pub fn record(&self) -> crate::record::Sources {
        let rw = match &self.read_write {
            Ok(source) => source.label().to_string(),
            Err(why) => format!("unavailable: {why}"),
        };
        crate::record::Sources {
            timer: match &self.timer {
                Ok(source) => source.label().into(),
                Err(why) => format!("unavailable: {why}"),
            },
            read: rw.clone(),
            write: rw,
            timer_callbacks: match &self.callbacks {
                Ok(()) => "symbols".into(),
                Err(why) => format!("unavailable: {why}"),
            },
            vcpu_wakeups: kvm_label(&self.guest.vcpu_wakeups),
            kvm_exits: kvm_label(&self.guest.exits),
        }
    }
}

/// `kvm-tracepoints`, or `unavailable: <why>`.
fn kvm_label(source: &Result<(), String>) -> String {
    match source {
        Ok(()) => ReadWriteSource::KvmTracepoints.label().into(),
        Err(why) => format!("unavailable: {why}"),
    }
}

/// The first of `attempts` (candidates tried in order, with their results) that attached;
/// else the first failure, as `failed` says it, or `none` when nothing was tried.
fn first_attached<S: Copy, E>(
    attempts: &[(S, Result<(), String>)],
    failed: impl FnOnce(S, &str) -> E,
    none: impl FnOnce() -> E,
) -> Result<S, E> {
    if let Some((source, _)) = attempts.iter().find(|(_, r)| r.is_ok()) {
        return Ok(*source);
    }
    match attempts.first() {
        Some((source, Err(why))) => Err(failed(*source, why)),
        _ => Err(none()),
    }
}

/// The outcome of attaching the timer candidates: the first that attached, else the first
/// failure (the plan's own reason when it had no candidate).
pub fn settle_timer(
    plan: &SourcePlan,
    attempts: &[(TimerSource, Result<(), String>)],
) -> Result<TimerSource, String> {
    first_attached(
        attempts,
        |source, why| format!("attaching the {} source: {why}", source.label()),
        || {
            plan.timer_none
                .clone()
                .expect("a plan without timer candidates says why")
        },
    )
}

/// The outcome of attaching a plan: the first candidate that attached serves the counts; if
/// none did, the first attach failure says why (the plan's own reason when it had none).
pub fn settle(
    plan: &SourcePlan,
    attempts: &[(ReadWriteSource, Result<(), String>)],
) -> Result<ReadWriteSource, ReadWriteUnavailable> {
    first_attached(
        attempts,
        |source, why| ReadWriteUnavailable::AttachFailed {
            source,
            why: why.to_string(),
        },
        || {
            plan.read_write_none
                .clone()
                .expect("a plan without candidates says why")
        },
    )
}

#[cfg(test)]
mod tests;
