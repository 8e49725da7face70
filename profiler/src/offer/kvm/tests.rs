use super::*;

const PIO: &str = include_str!("../../../tests/fixtures/tracefs/kvm_pio.format");
const MMIO: &str = include_str!("../../../tests/fixtures/tracefs/kvm_mmio.format");
const FAST: &str = include_str!("../../../tests/fixtures/tracefs/kvm_fast_mmio.format");
const EXIT: &str = include_str!("../../../tests/fixtures/tracefs/kvm_userspace_exit.format");
const WAKEUP: &str = include_str!("../../../tests/fixtures/tracefs/kvm_vcpu_wakeup.format");
const VM_EXIT: &str = include_str!("../../../tests/fixtures/tracefs/kvm_exit.format");

/// A tracefs-shaped directory with the given `events/kvm/<event>/format` files.
fn fake_tracefs(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (event, text) in files {
        let d = dir.path().join("events/kvm").join(event);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("format"), text).unwrap();
    }
    dir
}
const ALL: [(&str, &str); 4] = [
    ("kvm_pio", PIO),
    ("kvm_mmio", MMIO),
    ("kvm_fast_mmio", FAST),
    ("kvm_userspace_exit", EXIT),
];
#[test]
fn field_offsets_from_the_fixtures() {
    let dir = fake_tracefs(&ALL);
    let o = field_offsets(dir.path()).unwrap();
    let f = |offset, size, signed| KvmField {
        offset,
        size,
        signed,
    };
    assert_eq!(
        o,
        KvmFieldOffsets {
            configured: 1,
            pio_rw: f(8, 4, 0),
            pio_port: f(12, 4, 0),
            pio_count: f(20, 4, 0),
            mmio_type: f(8, 4, 0),
            mmio_gpa: f(16, 8, 0),
            fast_mmio_gpa: f(8, 8, 0),
            exit_reason: f(8, 4, 0),
            exit_errno: f(12, 4, 1),
            // No kvm_vcpu_wakeup or kvm_exit here: their fields stay empty.
            ..KvmFieldOffsets::default()
        }
    );
    // With them, their fields too.
    let both = fake_tracefs(
        &[
            ALL.as_slice(),
            &[("kvm_vcpu_wakeup", WAKEUP), ("kvm_exit", VM_EXIT)],
        ]
        .concat(),
    );
    let o = field_offsets(both.path()).unwrap();
    assert_eq!(o.wakeup_waited, f(16, 1, 0));
    assert_eq!((o.vm_exit_reason, o.vm_exit_isa), (f(8, 4, 0), f(24, 4, 0)));
}

#[test]
fn the_host_offers_wakeups_and_exits_where_its_kvm_fires_them() {
    let modules = tempfile::tempdir().unwrap();
    let tracefs = fake_tracefs(&[("kvm_vcpu_wakeup", WAKEUP), ("kvm_exit", VM_EXIT)]);
    let offer = |loaded: &[&str]| {
        for m in ["kvm_intel", "kvm_amd", "kvm_pvm"] {
            let _ = std::fs::remove_dir(modules.path().join(m));
        }
        for m in loaded {
            std::fs::create_dir(modules.path().join(m)).unwrap();
        }
        KvmOffer::of_host(tracefs.path(), modules.path())
    };
    let pvm = offer(&["kvm_pvm"]);
    assert_eq!(pvm.vcpu_wakeups, Ok(()));
    let why = pvm.exits.unwrap_err();
    assert!(
        why.contains("PVM (the kvm_pvm module), which does not fire kvm:kvm_exit"),
        "{why}"
    );
    assert_eq!(offer(&["kvm_intel"]).exits, Ok(()));
    assert_eq!(offer(&["kvm_amd"]).exits, Ok(()));
    assert!(offer(&[]).exits.is_err());
    // An older kernel without kvm_vcpu_wakeup's `waited`.
    let old = fake_tracefs(&[("kvm_exit", VM_EXIT)]);
    let why = KvmOffer::of_host(old.path(), modules.path())
        .vcpu_wakeups
        .unwrap_err();
    crate::testing::assert_contains(&why, "kvm:kvm_vcpu_wakeup does not exist");
}

#[test]
fn exit_reasons_are_named_as_the_kernel_prints_them() {
    let names = ExitReasonNames::from_format(VM_EXIT);
    assert_eq!(names.name(ISA_VMX, 12), "HLT");
    assert_eq!(names.name(ISA_VMX, 30), "IO_INSTRUCTION");
    assert_eq!(names.name(ISA_VMX, 48), "EPT_VIOLATION");
    // VMX flags in the high bits do not hide the basic reason.
    assert_eq!(names.name(ISA_VMX, 0x8000_0021), "INVALID_STATE");
    assert_eq!(names.name(ISA_SVM, 0x078), "hlt");
    assert_eq!(names.name(ISA_SVM, 0x040 + 14), "PF excp");
    assert_eq!(names.name(ISA_SVM, 0x400), "npf");
    assert_eq!(names.name(ISA_SVM, u32::MAX), "invalid_guest_state");
    assert_eq!(names.name(ISA_SVM, 0x1234), "svm:0x1234");
    assert_eq!(names.name(7, 1), "isa7:0x1");
    assert!(names.vmx.len() > 60 && names.svm.len() > 100, "{names:?}");
    // Garbage names nothing, and panics at nothing.
    assert_eq!(
        ExitReasonNames::from_format("print fmt: \"x\", __print_symbolic(, {"),
        ExitReasonNames::default()
    );
}
#[test]
fn field_offsets_name_what_is_missing() {
    let dir = fake_tracefs(&ALL[..2]);
    let err = format!("{:#}", field_offsets(dir.path()).unwrap_err());
    assert!(
        err.contains("tracepoint kvm:kvm_fast_mmio does not exist"),
        "{err}"
    );
    crate::testing::assert_contains(&err, "modprobe kvm");

    let no_gpa = MMIO.replace("u64 gpa;", "u64 addr;");
    let dir = fake_tracefs(&[ALL[0], ("kvm_mmio", &no_gpa), ALL[2], ALL[3]]);
    let err = format!("{:#}", field_offsets(dir.path()).unwrap_err());
    crate::testing::assert_contains(&err, "kvm:kvm_mmio has no field `gpa`");
    crate::testing::assert_contains(&err, "type, len, addr, val");

    let odd = PIO.replace(
        "unsigned int port;\toffset:12;\tsize:4",
        "u8 port[3];\toffset:12;\tsize:3",
    );
    let dir = fake_tracefs(&[("kvm_pio", &odd), ALL[1], ALL[2], ALL[3]]);
    let err = format!("{:#}", field_offsets(dir.path()).unwrap_err());
    assert!(
        err.contains("`port` of tracepoint kvm:kvm_pio is 3 bytes"),
        "{err}"
    );

    let cut = &EXIT[..EXIT.find("print fmt").unwrap()];
    let dir = fake_tracefs(&[ALL[0], ALL[1], ALL[2], ("kvm_userspace_exit", cut)]);
    let err = format!("{:#}", field_offsets(dir.path()).unwrap_err());
    crate::testing::assert_contains(&err, "kvm_userspace_exit/format");
    crate::testing::assert_contains(&err, "truncated");
}
