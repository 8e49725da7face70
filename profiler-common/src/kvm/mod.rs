//! KVM guest PIO / MMIO accesses from the kernel's `kvm:` tracepoints ("KVM, symbol-free").
//!
//! Four tracepoints fire in a QEMU vCPU thread (inside its `KVM_RUN` ioctl):
//! `kvm:kvm_pio`, `kvm:kvm_mmio`, `kvm:kvm_fast_mmio` and `kvm:kvm_userspace_exit`. None of
//! them says by itself whether QEMU's device model handled the access; the order of events on
//! one vCPU thread does. [`step`] is that per-thread state machine. It is shared code: the eBPF
//! programs (`profiler-ebpf/src/probes/kvm.rs`) run [`handle`] on every event with the eBPF maps as
//! its [`KvmStore`], and the tests ([`replay`], `tests.rs` next to this file) run the very same
//! [`handle`] with plain maps, so the tested logic is the logic the kernel runs.
//!
//! When each tracepoint fires (Linux x86, `arch/x86/kvm/x86.c` unless noted; checked against
//! the 6.x sources, after Paolo Bonzini's 2022 PIO rework that went into 6.0):
//!
//! - `kvm_pio` write (`rw` = 1): `emulator_pio_out()` traces *before* trying the in-kernel PIO
//!   bus in `emulator_pio_in_out()`. If no in-kernel device (PIT, PIC, ioeventfd, ...) takes
//!   it, `emulator_pio_in_out()` fills `run->io` and the vCPU exits with `KVM_EXIT_IO`.
//! - `kvm_pio` read (`rw` = 0): `emulator_pio_in()` traces only when the in-kernel bus
//!   handled it. Otherwise the exit (`KVM_EXIT_IO`) comes *first*, with no trace, and the
//!   read is traced by `complete_emulator_pio_in()` when the next `KVM_RUN` completes it
//!   (from `complete_fast_pio_in()` or `emulator_pio_in_emulated()`), after QEMU supplied the
//!   data.
//! - `kvm_mmio` read (`type` = 1): `vcpu_mmio_read()` traces each chunk an in-kernel device
//!   (LAPIC, IOAPIC, ioeventfd/MMIO bus) handled; `read_prepare()` traces again when an MMIO
//!   read that went to userspace completes (`mmio_read_completed`, on the next `KVM_RUN`).
//! - `kvm_mmio` unsatisfied read (`type` = 0): `read_exit_mmio()`, called from
//!   `emulator_read_write()` when no in-kernel device took the read; the vCPU then exits
//!   with `KVM_EXIT_MMIO`.
//! - `kvm_mmio` write (`type` = 2): `write_mmio()` traces *before* `vcpu_mmio_write()` tries
//!   the in-kernel devices; if none takes it, `emulator_read_write()` sets up `KVM_EXIT_MMIO`.
//!   An access wider than 8 bytes or split over two MMIO pages exits once per chunk/fragment
//!   (`complete_emulated_mmio()`), with a single trace.
//! - `kvm_fast_mmio`: `handle_ept_misconfig()` (`arch/x86/kvm/vmx/vmx.c`) after a write to a
//!   zero-length ioeventfd on `KVM_FAST_MMIO_BUS` (virtio notify): always in-kernel, the
//!   device model learns of it through an eventfd, not an exit.
//! - `kvm_userspace_exit(reason, errno)`: `kvm_vcpu_ioctl()` (`virt/kvm/kvm_main.c`) when
//!   `KVM_RUN` returns. With `errno` != 0 (EINTR: a signal or `immediate_exit`) the reason is
//!   whatever `run->exit_reason` held before: stale, so such exits are ignored.
//!
//! Hence, per vCPU thread:
//! - unsatisfied MMIO read / MMIO write traced, then an `MMIO` exit: QEMU handled it;
//! - PIO / MMIO write traced, then anything but an exit: an in-kernel device handled it;
//! - read traced with nothing pending: in-kernel;
//! - an `IO` exit with nothing pending: a PIO read went to QEMU; the `kvm_pio` read that
//!   follows is its completion and names the port;
//! - PIO write traced, then an `IO` exit, then anything but a PIO read: the write went to
//!   QEMU (KVM traces nothing when it completes a userspace `out`);
//! - PIO write traced, then an `IO` exit, then a PIO read: ambiguous. Either the write went
//!   to QEMU and the guest's next `in` hit an in-kernel device, or the kernel took the write
//!   and the exit is the read's, whose completion this is. Both happen on real KVM (the root
//!   ground-truth test sees them): QEMU's RTC index port 0x70 is a coalesced-PIO zone, so the CMOS read
//!   `out 0x70; in 0x71` traces write 0x70, `IO` exit, read 0x71 with 0x71 in QEMU; and
//!   SeaBIOS's `out 0x402` (debugcon, QEMU) followed by `in 0x21` (PIC, in-kernel) traces the
//!   same shape the other way round. The four tracepoints cannot tell (on VMX/SVM
//!   `kvm_entry` could, but it does not fire under PVM), so the VM's own unambiguous events
//!   decide: who handled reads of that port, else writes of the written port, as learned per
//!   (process, port, direction) ([`lesson`], `KVM_PORTS`), else a prior (KVM's in-kernel PC
//!   ports, [`pc_in_kernel_port`]). Only the attribution (port, direction) can be wrong, and
//!   only before the VM showed how it handles that port; the number of QEMU exits is exact;
//! - further `MMIO` exits after a userspace MMIO access: its further chunks (QEMU sees each);
//!   the `kvm_mmio` read after a userspace MMIO read is its completion, not a new access.
//!
//! PIO counts add the tracepoint's `count` (string I/O moves many elements per exit; QEMU
//! dispatches each, as `qemu:memory_region_ops_*` would count them); MMIO counts one per
//! exit. Coalesced MMIO/PIO writes (QEMU replays them from a ring at its next exit, without
//! an exit of their own) count as in-kernel: they never woke QEMU. An outstanding access is
//! counted at the thread's next KVM event, so counts lag by at most one event per vCPU
//! (`settle` says what it will count; userspace adds it when a process goes away).
//!
//! Verified end to end on Linux 6.18 with KVM (the `kvm_pvm` module): SeaBIOS guests on the
//! `pc` and `q35` machines, counts equal to QEMU's own per-port / per-page dispatch trace
//! (root tests in `profiler/src/probes/kvm.rs`).

/// `KVM_EXIT_IO` (include/uapi/linux/kvm.h).
pub const KVM_EXIT_IO: u32 = 2;
/// `KVM_EXIT_MMIO` (include/uapi/linux/kvm.h).
pub const KVM_EXIT_MMIO: u32 = 6;

/// `kvm_mmio` `type` values (`KVM_TRACE_MMIO_*`, include/trace/events/kvm.h).
pub const MMIO_UNSATISFIED_READ: u32 = 0;
pub const MMIO_READ: u32 = 1;
pub const MMIO_WRITE: u32 = 2;

// Counter kinds ([`crate::CounterKey::kind`]); 20..=29 are reserved for KVM. The id is the
// port for PIO and the guest-physical page (`gpa & !0xfff`) for MMIO.

/// Guest PIO read elements (`in`, `ins`) that QEMU handled (through a `KVM_EXIT_IO`).
/// id: port.
pub const KVM_PIO_READ_USER: u32 = 20;
/// Guest PIO write elements (`out`, `outs`) that QEMU handled. id: port.
pub const KVM_PIO_WRITE_USER: u32 = 21;
/// A guest MMIO read that QEMU handled (a `KVM_EXIT_MMIO` exit; one per exit). id: page.
pub const KVM_MMIO_READ_USER: u32 = 22;
/// A guest MMIO write that QEMU handled (one per exit). id: page.
pub const KVM_MMIO_WRITE_USER: u32 = 23;
/// Guest PIO read elements an in-kernel device handled (PIC, PIT, ELCR). id: port.
pub const KVM_PIO_READ_IN_KERNEL: u32 = 24;
/// Guest PIO write elements the kernel took (PIC, PIT, ELCR, an ioeventfd, a coalesced-PIO
/// zone such as QEMU's RTC index port 0x70). id: port.
pub const KVM_PIO_WRITE_IN_KERNEL: u32 = 25;
/// A guest MMIO read an in-kernel device handled (LAPIC, IOAPIC). id: page.
pub const KVM_MMIO_READ_IN_KERNEL: u32 = 26;
/// A guest MMIO write the kernel took (LAPIC, IOAPIC, an ioeventfd, a coalesced-MMIO zone).
/// id: page.
pub const KVM_MMIO_WRITE_IN_KERNEL: u32 = 27;
/// A write to a fast-MMIO ioeventfd (`kvm_fast_mmio`, e.g. virtio queue notify), always
/// in-kernel. id: page.
pub const KVM_FAST_MMIO: u32 = 28;

/// True for the counter kinds reserved for KVM (20..=29).
pub fn is_kvm_kind(kind: u32) -> bool {
    (20..=29).contains(&kind)
}

/// Counter id of a userspace read whose port/address was never traced (e.g. the completion
/// trace did not come because userspace moved RIP, or an SEV-ES guest).
pub const UNKNOWN_ID: u64 = u64::MAX;

/// Guest-physical page of an MMIO address (the MMIO counter id).
#[inline(always)]
pub const fn page_of(gpa: u64) -> u64 {
    gpa & !0xfff
}

/// Where one tracepoint field lives in the raw record, as tracefs `format` says.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct KvmField {
    pub offset: u16,
    /// 1, 2, 4 or 8.
    pub size: u8,
    /// Non-zero: sign-extend the value (tracefs `signed:1`).
    pub signed: u8,
}

/// Field layout of the kvm tracepoints, parsed by userspace from tracefs and stored in the
/// eBPF config map (tracepoint layouts are not ABI). The four of the access state machine are
/// required; `kvm_vcpu_wakeup`'s and `kvm_exit`'s fields have size 0 where the kernel lacks
/// them (their programs then count nothing).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct KvmFieldOffsets {
    /// Non-zero once userspace filled it in; the programs do nothing before.
    pub configured: u32,
    pub pio_rw: KvmField,
    pub pio_port: KvmField,
    pub pio_count: KvmField,
    pub mmio_type: KvmField,
    pub mmio_gpa: KvmField,
    pub fast_mmio_gpa: KvmField,
    pub exit_reason: KvmField,
    pub exit_errno: KvmField,
    /// `kvm_vcpu_wakeup`: `waited` (slept, rather than ended while halt-polling).
    pub wakeup_waited: KvmField,
    /// `kvm_exit`: `exit_reason` and `isa` (1 VMX, 2 SVM).
    pub vm_exit_reason: KvmField,
    pub vm_exit_isa: KvmField,
}

/// States of [`KvmThreadState::state`].
pub mod thread_state {
    /// Nothing outstanding.
    pub const IDLE: u32 = 0;
    /// An access was traced (PIO write, MMIO write, MMIO unsatisfied read); whether QEMU or
    /// the kernel handles it is decided by the next event. `kind` is the userspace kind it
    /// becomes on an exit, `id` its port/page, `n` its element count.
    pub const PENDING: u32 = 1;
    /// A userspace MMIO access (`kind`, `id`) was counted; more `MMIO` exits are its further
    /// chunks, and for a read the next `kvm_mmio` read is its completion.
    pub const USER_MMIO: u32 = 2;
    /// An exit to userspace came with nothing pending: a read (`kind`) went to QEMU and its
    /// address comes with the completion trace on the next `KVM_RUN`.
    pub const AWAIT_READ: u32 = 3;
    /// A PIO write (`id`, `n`) was traced, then an `IO` exit came. Either the write went to
    /// QEMU, or the kernel took it (an in-kernel device, a coalesced-PIO zone) and the exit
    /// belongs to a PIO read, whose completion trace is then the very next event. A next
    /// event that is not a PIO read decides for the write; a PIO read is decided with
    /// [`super::PortHints`].
    pub const OUT_THEN_IO_EXIT: u32 = 4;
}

/// Per-vCPU-thread state, keyed by thread id in the eBPF map. `tgid` lets userspace drop a
/// process's entries.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct KvmThreadState {
    pub tgid: u32,
    /// One of [`thread_state`].
    pub state: u32,
    pub kind: u32,
    /// Element count of the outstanding access (`kvm_pio` `count`; 1 for MMIO).
    pub n: u32,
    pub id: u64,
}

impl KvmThreadState {
    pub const fn idle(tgid: u32) -> Self {
        Self {
            tgid,
            state: thread_state::IDLE,
            kind: 0,
            n: 0,
            id: 0,
        }
    }
    const fn with(self, state: u32, kind: u32, n: u32, id: u64) -> Self {
        Self {
            tgid: self.tgid,
            state,
            kind,
            n,
            id,
        }
    }
}

/// One tracepoint hit, decoded.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum KvmEvent {
    /// `kvm:kvm_pio`; `count` elements (more than 1 for string I/O, `rep ins`/`outs`).
    Pio { write: bool, port: u64, count: u32 },
    /// `kvm:kvm_mmio`; `ty` is one of the `MMIO_*` types.
    Mmio { ty: u32, gpa: u64 },
    /// `kvm:kvm_fast_mmio`.
    FastMmio { gpa: u64 },
    /// `kvm:kvm_userspace_exit`.
    Exit { reason: u32, errno: i64 },
}

/// A counter increment of `n` for (`kind`, `id`); `kind` 0 means none.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Counted {
    pub kind: u32,
    pub n: u32,
    pub id: u64,
}

impl Counted {
    pub const NONE: Counted = Counted {
        kind: 0,
        n: 0,
        id: 0,
    };
    const fn of(kind: u32, id: u64, n: u32) -> Self {
        Self { kind, n, id }
    }
}

/// Who handles one direction of one port in one VM, learned from unambiguous events.
pub mod port_class {
    pub const UNKNOWN: u32 = 0;
    pub const IN_KERNEL: u32 = 1;
    pub const USER: u32 = 2;
}

/// Key of the learned port classes: (QEMU process, port, direction).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey {
    pub tgid: u32,
    pub port: u32,
    /// 1 for writes, 0 for reads.
    pub write: u32,
}

/// What is known, for the ambiguous `out W; IO exit; in Y` (see
/// [`thread_state::OUT_THEN_IO_EXIT`]), about reads of Y and writes to W: [`port_class`]
/// values.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PortHints {
    pub read_y: u32,
    pub write_w: u32,
}

impl PortHints {
    pub const UNKNOWN: PortHints = PortHints {
        read_y: port_class::UNKNOWN,
        write_w: port_class::UNKNOWN,
    };
}

/// The ports whose classes [`step`] needs for this event: `Some((y, w))` only for a PIO read
/// right after `out W; IO exit`. Look up `PortKey { port: y, write: 0 }` and
/// `PortKey { port: w, write: 1 }` and pass them as [`PortHints`].
#[inline(always)]
pub fn hint_ports(s: &KvmThreadState, event: &KvmEvent) -> Option<(u64, u64)> {
    match *event {
        KvmEvent::Pio {
            write: false, port, ..
        } if s.state == thread_state::OUT_THEN_IO_EXIT => Some((port, s.id)),
        _ => None,
    }
}

/// KVM's in-kernel PIO devices with QEMU's default `kernel-irqchip=on` (PIC, PIT + speaker
/// port, ELCR): the prior for an ambiguous read when nothing was learned yet.
#[inline(always)]
pub fn pc_in_kernel_port(port: u64) -> bool {
    matches!(
        port,
        0x20 | 0x21 | 0xa0 | 0xa1 | 0x40..=0x43 | 0x61 | 0x4d0 | 0x4d1
    )
}

/// What a counted PIO access teaches about its port: (port, write, [`port_class`]).
#[inline(always)]
pub fn lesson(c: Counted) -> Option<(u32, bool, u32)> {
    if c.id == UNKNOWN_ID {
        return None;
    }
    let (write, class) = match c.kind {
        KVM_PIO_READ_USER => (false, port_class::USER),
        KVM_PIO_WRITE_USER => (true, port_class::USER),
        KVM_PIO_READ_IN_KERNEL => (false, port_class::IN_KERNEL),
        KVM_PIO_WRITE_IN_KERNEL => (true, port_class::IN_KERNEL),
        _ => return None,
    };
    Some((c.id as u32, write, class))
}

/// Result of one [`step`]: the thread's next state and up to two counter increments.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub next: KvmThreadState,
    pub counts: [Counted; 2],
    /// The counts follow from the events alone (not from hints): learn from them
    /// ([`lesson`]).
    pub definite: bool,
}

/// What an outstanding state amounts to when an unrelated event follows it; also what it
/// counts if nothing follows (the thread idles or exits: a write to QEMU would have exited at
/// once, and a read completion comes first thing in the next `KVM_RUN`).
#[inline(always)]
pub fn settle(s: KvmThreadState) -> Counted {
    if s.state == thread_state::PENDING {
        // No exit to userspace followed: the kernel took it.
        if s.kind == KVM_PIO_WRITE_USER {
            Counted::of(KVM_PIO_WRITE_IN_KERNEL, s.id, s.n)
        } else if s.kind == KVM_MMIO_WRITE_USER {
            Counted::of(KVM_MMIO_WRITE_IN_KERNEL, s.id, s.n)
        } else {
            Counted::of(KVM_MMIO_READ_IN_KERNEL, s.id, s.n)
        }
    } else if s.state == thread_state::OUT_THEN_IO_EXIT {
        // No read completion followed the exit: it was the write's.
        Counted::of(KVM_PIO_WRITE_USER, s.id, s.n)
    } else if s.state == thread_state::AWAIT_READ {
        // The read reached QEMU but its completion trace never came.
        Counted::of(s.kind, UNKNOWN_ID, 1)
    } else {
        Counted::NONE
    }
}

const NOTHING: [Counted; 2] = [Counted::NONE, Counted::NONE];

const fn sure(next: KvmThreadState, counts: [Counted; 2]) -> Step {
    Step {
        next,
        counts,
        definite: true,
    }
}

/// Advances one vCPU thread's state by one event (see the module docs for the kernel facts
/// behind each branch). Pure; runs both in the eBPF programs and in userspace tests.
/// `hints` matter only when [`hint_ports`] asks for them; pass [`PortHints::UNKNOWN`]
/// otherwise.
#[inline(always)]
pub fn step(s: KvmThreadState, event: KvmEvent, hints: PortHints) -> Step {
    let idle = KvmThreadState::idle(s.tgid);
    match event {
        KvmEvent::Exit { reason, errno } => {
            if errno != 0 {
                // KVM_RUN failed (EINTR): run->exit_reason is stale and nothing completed.
                return sure(s, NOTHING);
            }
            if reason != KVM_EXIT_IO && reason != KVM_EXIT_MMIO {
                return sure(idle, [settle(s), Counted::NONE]);
            }
            let pio = reason == KVM_EXIT_IO;
            if s.state == thread_state::PENDING && (s.kind == KVM_PIO_WRITE_USER) == pio {
                if pio {
                    // The write's exit, or a read's after the kernel took the write.
                    return sure(
                        s.with(thread_state::OUT_THEN_IO_EXIT, s.kind, s.n, s.id),
                        NOTHING,
                    );
                }
                // The traced MMIO access went to QEMU (an unsatisfied read always exits).
                return sure(
                    s.with(thread_state::USER_MMIO, s.kind, 1, s.id),
                    [Counted::of(s.kind, s.id, 1), Counted::NONE],
                );
            }
            if s.state == thread_state::USER_MMIO && !pio {
                // Another chunk / fragment of the same MMIO access.
                return sure(s, [Counted::of(s.kind, s.id, 1), Counted::NONE]);
            }
            // Nothing (matching) pending: a read went to QEMU, its address still to come.
            let kind = if pio {
                KVM_PIO_READ_USER
            } else {
                KVM_MMIO_READ_USER
            };
            sure(
                s.with(thread_state::AWAIT_READ, kind, 1, 0),
                [settle(s), Counted::NONE],
            )
        }
        KvmEvent::Pio { write, port, count } => {
            let n = if count == 0 { 1 } else { count };
            if !write && s.state == thread_state::AWAIT_READ && s.kind == KVM_PIO_READ_USER {
                // complete_emulator_pio_in(): QEMU's answer to the read that exited.
                return sure(
                    idle,
                    [Counted::of(KVM_PIO_READ_USER, port, n), Counted::NONE],
                );
            }
            if !write && s.state == thread_state::OUT_THEN_IO_EXIT {
                // `out W; IO exit; in Y`: W to QEMU and Y in the kernel, or the kernel took W
                // and this is the completion of Y's exit. Decide by what this VM's events
                // showed about Y's reads, else about W's writes, else by the PC prior.
                let y_in_kernel = if hints.read_y != port_class::UNKNOWN {
                    hints.read_y == port_class::IN_KERNEL
                } else if hints.write_w != port_class::UNKNOWN {
                    hints.write_w == port_class::USER
                } else {
                    pc_in_kernel_port(port)
                };
                let counts = if y_in_kernel {
                    [
                        Counted::of(KVM_PIO_WRITE_USER, s.id, s.n),
                        Counted::of(KVM_PIO_READ_IN_KERNEL, port, n),
                    ]
                } else {
                    [
                        Counted::of(KVM_PIO_WRITE_IN_KERNEL, s.id, s.n),
                        Counted::of(KVM_PIO_READ_USER, port, n),
                    ]
                };
                return Step {
                    next: idle,
                    counts,
                    definite: false,
                };
            }
            if write {
                sure(
                    s.with(thread_state::PENDING, KVM_PIO_WRITE_USER, n, port),
                    [settle(s), Counted::NONE],
                )
            } else {
                sure(
                    idle,
                    [settle(s), Counted::of(KVM_PIO_READ_IN_KERNEL, port, n)],
                )
            }
        }
        KvmEvent::Mmio { ty, gpa } => {
            let page = page_of(gpa);
            if ty == MMIO_READ && s.kind == KVM_MMIO_READ_USER {
                if s.state == thread_state::USER_MMIO {
                    // read_prepare(): completion of a read already counted at its exit.
                    return sure(idle, NOTHING);
                }
                if s.state == thread_state::AWAIT_READ {
                    // Completion of a read that exited without an unsatisfied-read trace.
                    return sure(
                        idle,
                        [Counted::of(KVM_MMIO_READ_USER, page, 1), Counted::NONE],
                    );
                }
            }
            let first = settle(s);
            if ty == MMIO_UNSATISFIED_READ {
                sure(
                    s.with(thread_state::PENDING, KVM_MMIO_READ_USER, 1, page),
                    [first, Counted::NONE],
                )
            } else if ty == MMIO_WRITE {
                sure(
                    s.with(thread_state::PENDING, KVM_MMIO_WRITE_USER, 1, page),
                    [first, Counted::NONE],
                )
            } else if ty == MMIO_READ {
                sure(idle, [first, Counted::of(KVM_MMIO_READ_IN_KERNEL, page, 1)])
            } else {
                // Unknown type from a future kernel: settle, count nothing.
                sure(idle, [first, Counted::NONE])
            }
        }
        KvmEvent::FastMmio { gpa } => sure(
            idle,
            [settle(s), Counted::of(KVM_FAST_MMIO, page_of(gpa), 1)],
        ),
    }
}

/// Where [`handle`] keeps its state and counts: the eBPF maps (`KVM_THREADS`, `KVM_PORTS`,
/// `COUNTERS`) in the kernel, plain maps in [`replay`]. Generic so the one glue function below is
/// the code both run.
pub trait KvmStore {
    /// The state stored for thread `tid`, whatever process it was stored for.
    fn thread(&self, tid: u32) -> Option<KvmThreadState>;
    fn put_thread(&mut self, tid: u32, state: KvmThreadState);
    fn drop_thread(&mut self, tid: u32);
    /// The learned [`port_class`] of `key`; [`port_class::UNKNOWN`] when none was learned.
    fn port_class(&self, key: PortKey) -> u32;
    fn learn_port(&mut self, key: PortKey, class: u32);
    /// Adds `n` to the counter `key`.
    fn count(&mut self, key: crate::CounterKey, n: u64);
}

#[inline(always)]
fn port_key(tgid: u32, port: u64, write: bool) -> PortKey {
    PortKey {
        tgid,
        port: port as u32,
        write: write as u32,
    }
}

/// Runs one tracepoint event of thread `tid` of process `tgid` through the thread's state
/// machine: loads its state (a reused thread id of another process starts afresh), looks up
/// the port hints [`step`] asks for, stores what the VM taught about its ports, counts, and
/// stores the next state (idle threads keep no entry).
#[inline(always)]
pub fn handle<S: KvmStore>(store: &mut S, tgid: u32, tid: u32, event: KvmEvent) {
    let prev = match store.thread(tid) {
        Some(state) if state.tgid == tgid => state,
        _ => KvmThreadState::idle(tgid),
    };
    let hints = match hint_ports(&prev, &event) {
        Some((y, w)) => PortHints {
            read_y: store.port_class(port_key(tgid, y, false)),
            write_w: store.port_class(port_key(tgid, w, true)),
        },
        None => PortHints::UNKNOWN,
    };
    let out = step(prev, event, hints);
    for counted in out.counts {
        if out.definite
            && let Some((port, write, class)) = lesson(counted)
        {
            let key = port_key(tgid, port as u64, write);
            if store.port_class(key) != class {
                store.learn_port(key, class);
            }
        }
        if counted.kind != 0 {
            store.count(
                crate::CounterKey {
                    tgid,
                    kind: counted.kind,
                    id: counted.id,
                },
                counted.n as u64,
            );
        }
    }
    if out.next.state == thread_state::IDLE {
        if prev.state != thread_state::IDLE {
            store.drop_thread(tid);
        }
    } else if out.next != prev {
        store.put_thread(tid, out.next);
    }
}

/// Maximum vCPU threads with KVM state at once (LRU: exited threads' entries age out).
pub const MAX_KVM_THREADS: u32 = 16384;
/// Maximum learned (process, port, direction) classes (LRU).
pub const MAX_KVM_PORTS: u32 = 65536;

#[cfg(any(test, feature = "user"))]
pub mod replay;

#[cfg(test)]
mod tests;

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::KvmField {}
    unsafe impl aya::Pod for super::KvmFieldOffsets {}
    unsafe impl aya::Pod for super::KvmThreadState {}
    unsafe impl aya::Pod for super::PortKey {}
}
