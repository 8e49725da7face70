use super::*;

const FULL: SymbolsOffer = SymbolsOffer {
    full: true,
    dispatch: true,
    timer_mod: true,
};
const STRIPPED: SymbolsOffer = SymbolsOffer {
    full: false,
    dispatch: false,
    timer_mod: false,
};

/// The plan for a binary, with a libc that offers the wait functions and the default
/// timer choice.
fn plan(offer: &BinaryOffer, accel: Accel, kernel: &KernelOffer) -> SourcePlan {
    super::plan(
        &ProcessOffer {
            binary: offer.clone(),
            libc: Ok(()),
            timer_choice: TimerChoice::Auto,
        },
        accel,
        kernel,
    )
}

fn readable(usdt: bool, symbols: SymbolsOffer) -> BinaryOffer {
    BinaryOffer::Readable {
        usdt: Ok(usdt),
        symbols: Ok(symbols),
    }
}

fn kvm_ok() -> KernelOffer {
    KernelOffer::all()
}

fn kvm_missing() -> KernelOffer {
    KernelOffer {
        kvm: Err("tracepoint kvm:kvm_pio does not exist".into()),
        ..KernelOffer::all()
    }
}

use ReadWriteSource::*;

#[test]
fn usdt_first_then_symbols_then_kvm_tracepoints_for_kvm_guests() {
    let p = plan(&readable(true, FULL), Accel::Tcg, &kvm_ok());
    assert_eq!(p.read_write, [Usdt, Symbols]);
    assert_eq!(p.callbacks, Ok(()));
    let p = plan(&readable(true, FULL), Accel::Kvm, &kvm_ok());
    assert_eq!(p.read_write, [Usdt, Symbols, KvmTracepoints]);
    let p = plan(&readable(false, STRIPPED), Accel::Kvm, &kvm_ok());
    assert_eq!(p.read_write, [KvmTracepoints]);
    assert_eq!(p.expected().read_write, Ok(KvmTracepoints));
    assert_eq!(p.callbacks, Err(CallbacksUnavailable::Stripped));
}

#[test]
fn stripped_tcg_guest_is_unavailable_with_the_fix() {
    let p = plan(&readable(false, STRIPPED), Accel::Tcg, &kvm_ok());
    assert!(p.read_write.is_empty());
    let sources = p.expected().record();
    assert!(
        sources
            .read
            .starts_with("unavailable: stripped QEMU without USDT probes"),
        "{sources:?}"
    );
    assert!(sources.read.contains("qemu-system-x86-dbgsym"));
    assert_eq!(sources.read, sources.write);
    assert!(
        sources
            .timer_callbacks
            .starts_with("unavailable: stripped QEMU")
    );
    // Xen and unknown accelerators never get the KVM tracepoints.
    for accel in [Accel::Xen, Accel::Unknown] {
        assert!(
            plan(&readable(false, STRIPPED), accel, &kvm_ok())
                .read_write
                .is_empty()
        );
    }
}

#[test]
fn kvm_guest_without_tracepoints_says_both_reasons() {
    let p = plan(&readable(false, STRIPPED), Accel::Kvm, &kvm_missing());
    let why = p.expected().read_write.unwrap_err().to_string();
    assert!(why.starts_with("stripped QEMU without USDT"), "{why}");
    assert!(why.ends_with("KVM tracepoints: tracepoint kvm:kvm_pio does not exist"));
}

#[test]
fn debug_file_symbols_serve_reads_and_callbacks() {
    let p = plan(&readable(false, FULL), Accel::Tcg, &kvm_ok());
    assert_eq!(p.read_write, [Symbols]);
    let s = p.expected().record();
    assert_eq!(
        (s.read.as_str(), s.timer_callbacks.as_str()),
        ("symbols", "symbols")
    );
    let partial = SymbolsOffer {
        dispatch: false,
        ..FULL
    };
    let p = plan(&readable(false, partial), Accel::Tcg, &kvm_ok());
    assert_eq!(
        p.expected().read_write,
        Err(ReadWriteUnavailable::NoUsdtNoDispatch)
    );
    assert_eq!(p.callbacks, Ok(()));
    let no_timer = SymbolsOffer {
        timer_mod: false,
        ..FULL
    };
    assert_eq!(
        plan(&readable(true, no_timer), Accel::Tcg, &kvm_ok()).callbacks,
        Err(CallbacksUnavailable::NoTimerMod)
    );
}

#[test]
fn unreadable_binaries_and_notes() {
    let p = plan(
        &BinaryOffer::Unreadable("cannot read /proc/7/exe (EACCES); run as root".into()),
        Accel::Tcg,
        &kvm_ok(),
    );
    let s = p.expected().record();
    assert_eq!(
        s.read,
        "unavailable: cannot read /proc/7/exe (EACCES); run as root"
    );
    // An unreadable KVM guest binary still has the kernel's view.
    let p = plan(&BinaryOffer::Unreadable("x".into()), Accel::Kvm, &kvm_ok());
    assert_eq!(p.read_write, [KvmTracepoints]);

    let bad_notes = BinaryOffer::Readable {
        usdt: Err("note 3 is truncated".into()),
        symbols: Ok(STRIPPED),
    };
    let why = plan(&bad_notes, Accel::Tcg, &kvm_ok())
        .expected()
        .read_write
        .unwrap_err();
    assert_eq!(
        why.to_string(),
        "reading its USDT notes: note 3 is truncated"
    );
    let no_symbols = BinaryOffer::Readable {
        usdt: Ok(false),
        symbols: Err("reading symbols of /x: not an ELF file".into()),
    };
    let p = plan(&no_symbols, Accel::Tcg, &kvm_ok());
    let why = p.expected().read_write.unwrap_err().to_string();
    assert!(
        why.starts_with(NO_USDT_REASON) && why.ends_with("not an ELF file"),
        "{why}"
    );
    assert_eq!(
        p.callbacks,
        Err(CallbacksUnavailable::SymbolsUnreadable(
            "reading symbols of /x: not an ELF file".into()
        ))
    );
}

#[test]
fn settle_takes_the_first_candidate_that_attached() {
    let p = plan(&readable(true, FULL), Accel::Kvm, &kvm_ok());
    assert_eq!(settle(&p, &[(Usdt, Ok(()))]), Ok(Usdt));
    assert_eq!(
        settle(&p, &[(Usdt, Err("EPERM".into())), (Symbols, Ok(()))]),
        Ok(Symbols)
    );
    let all_failed = [
        (Usdt, Err("EPERM".into())),
        (Symbols, Err("EINVAL".into())),
        (KvmTracepoints, Err("gone".into())),
    ];
    let why = settle(&p, &all_failed).unwrap_err();
    assert_eq!(why.to_string(), "attaching the USDT probes: EPERM");
    let none = plan(&readable(false, STRIPPED), Accel::Tcg, &kvm_ok());
    assert_eq!(
        settle(&none, &[]),
        Err(ReadWriteUnavailable::NoUsdtStripped)
    );
}

#[test]
fn a_process_gone_before_the_attach_tries_nothing_and_says_so() {
    let p = plan(&readable(true, FULL), Accel::Kvm, &kvm_ok()).exited();
    assert!(p.read_write.is_empty() && p.timer.is_empty());
    let sources = p.expected();
    let why = "the process exited before its probes were attached";
    assert_eq!(sources.read_write.unwrap_err().to_string(), why);
    assert_eq!(sources.callbacks.unwrap_err().to_string(), why);
    assert_eq!(sources.timer.unwrap_err(), why);
    assert_eq!(settle_timer(&p, &[]), Err(why.to_string()));
}

#[test]
fn labels_are_the_record_contract() {
    assert_eq!(Usdt.label(), "usdt");
    assert_eq!(Symbols.label(), "symbols");
    assert_eq!(KvmTracepoints.label(), "kvm-tracepoints");
    let s = VmSources {
        read_write: Ok(Usdt),
        callbacks: Ok(()),
        timer: Ok(TimerSource::LibcUprobes),
        guest: GuestSources::plan(Accel::Kvm, &KernelOffer::all()),
    }
    .record();
    assert_eq!(
        (s.timer.as_str(), s.read.as_str(), s.write.as_str()),
        ("libc-uprobes", "usdt", "usdt")
    );
    assert_eq!(TimerSource::SyscallTracepoints.label(), "syscall");
}

#[test]
fn timer_source_hrtimer_first_then_libc_then_syscall_tracepoints() {
    use TimerSource::*;
    let no_libc: Result<(), String> = Err("no C library mapped".into());
    assert_eq!(
        timer_plan(&Ok(()), &KernelOffer::all(), TimerChoice::Auto).0,
        [
            HrtimerTracepoints,
            LibcUprobes,
            LibcEntryReturnUprobes,
            SyscallTracepoints
        ]
    );
    assert_eq!(
        timer_plan(&no_libc, &KernelOffer::all(), TimerChoice::Auto).0,
        [HrtimerTracepoints, SyscallTracepoints]
    );
    assert_eq!(
        timer_plan(&Ok(()), &KernelOffer::all(), TimerChoice::Syscall).0,
        [SyscallTracepoints]
    );
    assert_eq!(
        timer_plan(&Ok(()), &KernelOffer::all(), TimerChoice::Libc).0,
        [LibcUprobes, LibcEntryReturnUprobes]
    );
    assert_eq!(
        timer_plan(&Ok(()), &KernelOffer::all(), TimerChoice::LibcEntryReturn).0,
        [LibcEntryReturnUprobes]
    );
    assert_eq!(LibcEntryReturnUprobes.label(), "libc-entry-return-uprobes");
    assert_eq!(
        timer_plan(&no_libc, &KernelOffer::all(), TimerChoice::LibcEntryReturn)
            .1
            .as_deref(),
        Some(
            "--timer-source libc-entry-return, and its C library cannot be probed: no C \
             library mapped"
        )
    );
    // The hrtimer tracepoints serve any process, only when asked for, without fallback
    // (a silent switch would change what fd_wakeups means).
    for libc in [Ok(()), no_libc.clone()] {
        assert_eq!(
            timer_plan(&libc, &KernelOffer::all(), TimerChoice::Hrtimer),
            (vec![HrtimerTracepoints], None)
        );
    }
    assert_eq!(HrtimerTracepoints.label(), "hrtimer");
    // A kernel that refuses them: auto goes on to the libc uprobes, and asking for them says
    // why there is no timer source.
    // Without hrtimer_wakeup's address neither the hrtimer source nor the libc result probes
    // (their hrtimer_start marks) can serve: auto goes on to entry and return uprobes.
    let hidden: Result<(), String> = Err("hrtimer_wakeup has no address".into());
    let refused = KernelOffer {
        hrtimer: hidden.clone(),
        hrtimer_start: hidden,
        ..KernelOffer::all()
    };
    assert_eq!(
        timer_plan(&Ok(()), &refused, TimerChoice::Auto).0,
        [LibcEntryReturnUprobes, SyscallTracepoints]
    );
    assert_eq!(
        timer_plan(&Ok(()), &refused, TimerChoice::Libc).0,
        [LibcEntryReturnUprobes]
    );
    assert_eq!(
        timer_plan(&no_libc, &refused, TimerChoice::Auto).0,
        [SyscallTracepoints]
    );
    // An older kernel: no hrtimer source (sched_switch's prev_state), the result probes stay.
    let old_kernel = KernelOffer {
        hrtimer: Err("Linux 5.15 has no `prev_state`".into()),
        ..KernelOffer::all()
    };
    assert_eq!(
        timer_plan(&Ok(()), &old_kernel, TimerChoice::Auto).0,
        [LibcUprobes, LibcEntryReturnUprobes, SyscallTracepoints]
    );
    let (none, why) = timer_plan(&Ok(()), &refused, TimerChoice::Hrtimer);
    assert!(none.is_empty());
    assert_eq!(
        why.as_deref(),
        Some(
            "--timer-source hrtimer, and the kernel does not offer its tracepoints: \
             hrtimer_wakeup has no address"
        )
    );
    let (none, why) = timer_plan(&no_libc, &KernelOffer::all(), TimerChoice::Libc);
    assert!(none.is_empty());
    assert_eq!(
        why.as_deref(),
        Some("--timer-source libc, and its C library cannot be probed: no C library mapped")
    );

    // The plan carries them, an unreadable binary included; list shows the first.
    let offer = ProcessOffer {
        binary: BinaryOffer::Unreadable("gone".into()),
        libc: no_libc.clone(),
        timer_choice: TimerChoice::Libc,
    };
    let p = super::plan(&offer, Accel::Tcg, &kvm_ok());
    assert!(
        p.expected()
            .record()
            .timer
            .starts_with("unavailable: --timer-source libc")
    );
    let p = plan(&readable(true, FULL), Accel::Tcg, &kvm_ok());
    assert_eq!(p.expected().timer, Ok(HrtimerTracepoints));
    // What list shows on a kernel without them is what record attaches first.
    let without_hrtimer = KernelOffer {
        hrtimer: Err("Linux 5.15 has no `prev_state`".into()),
        ..KernelOffer::all()
    };
    let q = plan(&readable(true, FULL), Accel::Tcg, &without_hrtimer);
    assert_eq!(q.expected().timer, Ok(LibcUprobes));
    assert_eq!(q.timer.first(), Some(&LibcUprobes));

    // Settling: the first that attached; else the first failure, named.
    assert_eq!(
        settle_timer(
            &p,
            &[
                (LibcUprobes, Err("EINVAL".into())),
                (SyscallTracepoints, Ok(()))
            ]
        ),
        Ok(SyscallTracepoints)
    );
    assert_eq!(
        settle_timer(&p, &[(LibcUprobes, Err("EINVAL".into()))]),
        Err("attaching the libc-uprobes source: EINVAL".into())
    );
}
