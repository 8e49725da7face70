//! The state machine's tests, run through [`super::handle`] (the eBPF programs' code) with
//! plain maps ([`super::replay`]).

use std::collections::BTreeMap;

use super::replay::{classify, replay_threads};
use super::*;

fn pio_out(port: u64) -> KvmEvent {
    KvmEvent::Pio {
        write: true,
        port,
        count: 1,
    }
}
fn pio_in(port: u64) -> KvmEvent {
    KvmEvent::Pio {
        write: false,
        port,
        count: 1,
    }
}
fn mmio(ty: u32, gpa: u64) -> KvmEvent {
    KvmEvent::Mmio { ty, gpa }
}
fn exit(reason: u32) -> KvmEvent {
    KvmEvent::Exit { reason, errno: 0 }
}
const HLT: u32 = 5;
const EINTR: i64 = -4;

fn counts(pairs: &[((u32, u64), u64)]) -> BTreeMap<(u32, u64), u64> {
    pairs.iter().copied().collect()
}

#[test]
fn pio_read_that_exits_is_a_user_read_named_by_its_completion() {
    // kvm_fast_pio_in(): no trace, KVM_EXIT_IO; next KVM_RUN: complete_fast_pio_in()
    // traces the read with the port.
    let got = classify(&[exit(KVM_EXIT_IO), pio_in(0x3f8)]);
    assert_eq!(got, counts(&[((KVM_PIO_READ_USER, 0x3f8), 1)]));
}

#[test]
fn pio_write_that_exits_is_a_user_write_once_no_read_completion_follows() {
    // Outstanding at the end: settles as the user write it was.
    let r = replay_threads(&[(7, pio_out(0x402)), (7, exit(KVM_EXIT_IO))]);
    assert_eq!(r.counted, counts(&[]));
    assert_eq!(r.outstanding, counts(&[((KVM_PIO_WRITE_USER, 0x402), 1)]));
    assert_eq!(r.total(), r.outstanding);
    // emulator_pio_out() traces, then KVM_EXIT_IO; the next event (here another exit
    // reason) shows the exit was the write's.
    let got = classify(&[pio_out(0x378), exit(KVM_EXIT_IO), exit(HLT)]);
    assert_eq!(got, counts(&[((KVM_PIO_WRITE_USER, 0x378), 1)]));
    // Until that next event, it is outstanding (counted late, never lost).
    assert_eq!(classify(&[pio_out(0x378), exit(KVM_EXIT_IO)]), counts(&[]));
    // A serial write then an LSR read, both QEMU's: two exits.
    let got = classify(&[
        pio_out(0x3f8),
        exit(KVM_EXIT_IO),
        exit(KVM_EXIT_IO),
        pio_in(0x3fd),
    ]);
    assert_eq!(
        got,
        counts(&[
            ((KVM_PIO_READ_USER, 0x3fd), 1),
            ((KVM_PIO_WRITE_USER, 0x3f8), 1)
        ])
    );
}

#[test]
fn cmos_read_is_an_in_kernel_index_write_and_a_user_data_read() {
    // Recorded on this machine under KVM: 0x70 is a coalesced-PIO zone of QEMU's RTC, so
    // `out 0x70` never exits; the exit is `in 0x71`'s and its completion follows.
    let got = classify(&[pio_out(0x70), exit(KVM_EXIT_IO), pio_in(0x71)]);
    assert_eq!(
        got,
        counts(&[
            ((KVM_PIO_READ_USER, 0x71), 1),
            ((KVM_PIO_WRITE_IN_KERNEL, 0x70), 1)
        ])
    );
}

#[test]
fn ambiguous_out_exit_in_is_decided_by_what_the_vm_showed() {
    // No history: the PC prior. 0x21 is KVM's in-kernel PIC, so the exit was the
    // debugcon write's (SeaBIOS does exactly this).
    assert_eq!(
        classify(&[pio_out(0x402), exit(KVM_EXIT_IO), pio_in(0x21)]),
        counts(&[
            ((KVM_PIO_READ_IN_KERNEL, 0x21), 1),
            ((KVM_PIO_WRITE_USER, 0x402), 1),
        ])
    );
    // With `kernel-irqchip=split` QEMU emulates the PIC: once a read of 0x21 was seen
    // reaching QEMU, the same shape means "the kernel took 0x70, QEMU answered 0x21".
    let got = classify(&[
        exit(KVM_EXIT_IO),
        pio_in(0x21),
        pio_out(0x70),
        exit(KVM_EXIT_IO),
        pio_in(0x21),
    ]);
    assert_eq!(
        got,
        counts(&[
            ((KVM_PIO_READ_USER, 0x21), 2),
            ((KVM_PIO_WRITE_IN_KERNEL, 0x70), 1),
        ])
    );
    // Nothing known about the read port, but the written port was seen exiting: the
    // exit was the write's.
    let got = classify(&[
        pio_out(0x402),
        exit(KVM_EXIT_IO),
        exit(HLT),
        pio_out(0x402),
        exit(KVM_EXIT_IO),
        pio_in(0x1234),
    ]);
    assert_eq!(
        got,
        counts(&[
            ((KVM_PIO_READ_IN_KERNEL, 0x1234), 1),
            ((KVM_PIO_WRITE_USER, 0x402), 2),
        ])
    );
    // ...and a written port seen taken by the kernel means the read's completion.
    let got = classify(&[
        pio_out(0x70),
        pio_out(0x70),
        exit(KVM_EXIT_IO),
        pio_in(0x20),
    ]);
    assert_eq!(
        got,
        counts(&[
            ((KVM_PIO_READ_USER, 0x20), 1),
            ((KVM_PIO_WRITE_IN_KERNEL, 0x70), 2),
        ])
    );
}

#[test]
fn pio_write_followed_by_the_next_access_was_in_kernel() {
    // Two PIT writes (port 0x43, 0x40) handled in the kernel, then a serial write to QEMU.
    let got = classify(&[
        pio_out(0x43),
        pio_out(0x40),
        pio_out(0x3f8),
        exit(KVM_EXIT_IO),
        pio_out(0x3f8),
    ]);
    assert_eq!(
        got,
        counts(&[
            ((KVM_PIO_WRITE_USER, 0x3f8), 1),
            ((KVM_PIO_WRITE_IN_KERNEL, 0x40), 1),
            ((KVM_PIO_WRITE_IN_KERNEL, 0x43), 1),
        ])
    );
    // A trailing in-kernel write is still pending: not counted yet.
    assert_eq!(classify(&[pio_out(0x43)]), counts(&[]));
    // An exit for another reason settles it as in-kernel.
    assert_eq!(
        classify(&[pio_out(0x43), exit(HLT)]),
        counts(&[((KVM_PIO_WRITE_IN_KERNEL, 0x43), 1)])
    );
}

#[test]
fn string_pio_counts_elements() {
    // `rep insb` of 100 bytes from fw_cfg: one exit, QEMU dispatches 100 reads.
    let rep_in = KvmEvent::Pio {
        write: false,
        port: 0x511,
        count: 100,
    };
    assert_eq!(
        classify(&[exit(KVM_EXIT_IO), rep_in]),
        counts(&[((KVM_PIO_READ_USER, 0x511), 100)])
    );
    let rep_out = KvmEvent::Pio {
        write: true,
        port: 0x1f0,
        count: 4,
    };
    assert_eq!(
        classify(&[rep_out, exit(KVM_EXIT_IO), exit(HLT)]),
        counts(&[((KVM_PIO_WRITE_USER, 0x1f0), 4)])
    );
}

#[test]
fn traced_pio_read_with_nothing_pending_is_in_kernel() {
    let got = classify(&[pio_in(0x61), pio_in(0x61)]);
    assert_eq!(got, counts(&[((KVM_PIO_READ_IN_KERNEL, 0x61), 2)]));
}

#[test]
fn mmio_unsatisfied_read_then_exit_is_one_user_read() {
    // read_exit_mmio() traces type 0, KVM_EXIT_MMIO, then read_prepare() traces type 1
    // on completion: one read, on the page.
    let gpa = 0xfed0_00f0;
    let got = classify(&[
        mmio(MMIO_UNSATISFIED_READ, gpa),
        exit(KVM_EXIT_MMIO),
        mmio(MMIO_READ, gpa),
    ]);
    assert_eq!(got, counts(&[((KVM_MMIO_READ_USER, 0xfed0_0000), 1)]));
    // The next traced read is a new, in-kernel one (the LAPIC).
    let got = classify(&[
        mmio(MMIO_UNSATISFIED_READ, gpa),
        exit(KVM_EXIT_MMIO),
        mmio(MMIO_READ, gpa),
        mmio(MMIO_READ, 0xfee0_0030),
    ]);
    assert_eq!(
        got,
        counts(&[
            ((KVM_MMIO_READ_USER, 0xfed0_0000), 1),
            ((KVM_MMIO_READ_IN_KERNEL, 0xfee0_0000), 1),
        ])
    );
}

#[test]
fn mmio_writes_user_and_in_kernel() {
    let got = classify(&[
        mmio(MMIO_WRITE, 0xfee0_00b0), // LAPIC EOI: in-kernel
        mmio(MMIO_WRITE, 0xfebf_1010), // a device BAR: QEMU
        exit(KVM_EXIT_MMIO),
        mmio(MMIO_READ, 0xfec0_0010), // IOAPIC read: in-kernel
    ]);
    assert_eq!(
        got,
        counts(&[
            ((KVM_MMIO_WRITE_IN_KERNEL, 0xfee0_0000), 1),
            ((KVM_MMIO_WRITE_USER, 0xfebf_1000), 1),
            ((KVM_MMIO_READ_IN_KERNEL, 0xfec0_0000), 1),
        ])
    );
}

#[test]
fn a_wide_mmio_write_exits_once_per_chunk() {
    // complete_emulated_mmio() exits again for the second 8-byte chunk: QEMU sees two.
    let got = classify(&[
        mmio(MMIO_WRITE, 0xfebf_0000),
        exit(KVM_EXIT_MMIO),
        exit(KVM_EXIT_MMIO),
    ]);
    assert_eq!(got, counts(&[((KVM_MMIO_WRITE_USER, 0xfebf_0000), 2)]));
}

#[test]
fn read_modify_write_of_mmio() {
    // `or [mmio], 1` in the emulator: read goes out, completes, then the write goes out.
    let gpa = 0xfebf_0004;
    let got = classify(&[
        mmio(MMIO_UNSATISFIED_READ, gpa),
        exit(KVM_EXIT_MMIO),
        mmio(MMIO_READ, gpa),
        mmio(MMIO_WRITE, gpa),
        exit(KVM_EXIT_MMIO),
    ]);
    assert_eq!(
        got,
        counts(&[
            ((KVM_MMIO_READ_USER, 0xfebf_0000), 1),
            ((KVM_MMIO_WRITE_USER, 0xfebf_0000), 1),
        ])
    );
}

#[test]
fn fast_mmio_is_counted_separately_and_settles_what_was_pending() {
    let got = classify(&[
        KvmEvent::FastMmio { gpa: 0xfe00_3000 },
        pio_out(0x70),
        KvmEvent::FastMmio { gpa: 0xfe00_3004 },
    ]);
    assert_eq!(
        got,
        counts(&[
            ((KVM_FAST_MMIO, 0xfe00_3000), 2),
            ((KVM_PIO_WRITE_IN_KERNEL, 0x70), 1)
        ])
    );
}

#[test]
fn failed_kvm_run_changes_nothing() {
    // KVM_RUN -EINTR with a stale exit reason of IO: the write is still pending...
    let interrupted = KvmEvent::Exit {
        reason: KVM_EXIT_IO,
        errno: EINTR,
    };
    let got = classify(&[pio_out(0x3f8), interrupted, exit(KVM_EXIT_IO), exit(HLT)]);
    assert_eq!(got, counts(&[((KVM_PIO_WRITE_USER, 0x3f8), 1)]));
    // ...and a userspace PIO read still waits for its completion.
    let got = classify(&[exit(KVM_EXIT_IO), interrupted, pio_in(0x3fd)]);
    assert_eq!(got, counts(&[((KVM_PIO_READ_USER, 0x3fd), 1)]));
}

#[test]
fn a_user_read_whose_completion_never_comes_has_an_unknown_port() {
    // complete_fast_pio_in() skips the trace when userspace moved RIP.
    let got = classify(&[
        exit(KVM_EXIT_IO),
        pio_out(0x80),
        exit(KVM_EXIT_IO),
        exit(HLT),
    ]);
    assert_eq!(
        got,
        counts(&[
            ((KVM_PIO_READ_USER, UNKNOWN_ID), 1),
            ((KVM_PIO_WRITE_USER, 0x80), 1),
        ])
    );
}

#[test]
fn an_mmio_exit_without_trace_is_a_read_named_by_its_completion() {
    // TDX: tdx_emulate_mmio() exits without an unsatisfied-read trace and
    // tdx_complete_mmio_read() traces the read.
    let got = classify(&[exit(KVM_EXIT_MMIO), mmio(MMIO_READ, 0xfebf_2008)]);
    assert_eq!(got, counts(&[((KVM_MMIO_READ_USER, 0xfebf_2000), 1)]));
}

#[test]
fn mismatched_exit_settles_the_pending_access() {
    // A pending MMIO write, then an IO exit: the write was in-kernel, the exit a PIO read.
    let got = classify(&[
        mmio(MMIO_WRITE, 0xfee0_0300),
        exit(KVM_EXIT_IO),
        pio_in(0x64),
    ]);
    assert_eq!(
        got,
        counts(&[
            ((KVM_MMIO_WRITE_IN_KERNEL, 0xfee0_0000), 1),
            ((KVM_PIO_READ_USER, 0x64), 1)
        ])
    );
}

#[test]
fn vcpu_threads_are_independent() {
    // Thread 11's read completion must not resolve thread 10's write/exit ambiguity.
    let got = replay_threads(&[
        (10, pio_out(0x3f8)),
        (11, pio_out(0x43)),
        (10, exit(KVM_EXIT_IO)),
        (11, exit(KVM_EXIT_IO)),
        (11, pio_in(0x71)),
        (10, exit(HLT)),
    ])
    .counted;
    assert_eq!(
        got,
        counts(&[
            ((KVM_PIO_READ_USER, 0x71), 1),
            ((KVM_PIO_WRITE_USER, 0x3f8), 1),
            ((KVM_PIO_WRITE_IN_KERNEL, 0x43), 1),
        ])
    );
}

#[test]
fn kinds_are_in_the_reserved_range() {
    for kind in [
        KVM_PIO_READ_USER,
        KVM_PIO_WRITE_USER,
        KVM_MMIO_READ_USER,
        KVM_MMIO_WRITE_USER,
        KVM_PIO_READ_IN_KERNEL,
        KVM_PIO_WRITE_IN_KERNEL,
        KVM_MMIO_READ_IN_KERNEL,
        KVM_MMIO_WRITE_IN_KERNEL,
        KVM_FAST_MMIO,
    ] {
        assert!(is_kvm_kind(kind), "{kind}");
    }
    assert!(!is_kvm_kind(crate::kind::READ));
}

#[test]
fn a_thread_id_reused_by_another_process_starts_afresh() {
    // Process 1's vCPU thread 7 left a pending write behind; the kernel then gave tid 7 to a
    // thread of process 2, whose first event is an IO exit. It must not complete process 1's
    // write: for process 2 it is a read that went to QEMU.
    let mut store = replay::ReplayStore::default();
    handle(&mut store, 1, 7, pio_out(0x3f8));
    handle(&mut store, 2, 7, exit(KVM_EXIT_IO));
    handle(&mut store, 2, 7, pio_in(0x3fd));
    let of = |tgid: u32| -> BTreeMap<(u32, u64), u64> {
        store
            .counters
            .iter()
            .filter(|(k, _)| k.tgid == tgid)
            .map(|(k, n)| ((k.kind, k.id), *n))
            .collect()
    };
    assert_eq!(of(1), BTreeMap::new());
    assert_eq!(of(2), counts(&[((KVM_PIO_READ_USER, 0x3fd), 1)]));
}
