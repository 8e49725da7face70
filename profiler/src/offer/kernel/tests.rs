use super::*;

const PIO: &str = include_str!("../../../tests/fixtures/tracefs/kvm_pio.format");
const MMIO: &str = include_str!("../../../tests/fixtures/tracefs/kvm_mmio.format");
const FAST: &str = include_str!("../../../tests/fixtures/tracefs/kvm_fast_mmio.format");
const EXIT: &str = include_str!("../../../tests/fixtures/tracefs/kvm_userspace_exit.format");

fn field(format: &TracepointFormat, name: &str) -> (usize, usize, bool) {
    let f = format.field(name).expect(name);
    (f.offset, f.size, f.signed)
}

#[test]
fn parses_kvm_pio_format_of_this_kernel() {
    let f = parse_format(PIO).unwrap();
    assert_eq!(f.name.as_deref(), Some("kvm_pio"));
    assert!(f.id.is_some());
    let names: Vec<&str> = f.fields.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "common_type",
            "common_flags",
            "common_preempt_count",
            "common_pid",
            "rw",
            "port",
            "size",
            "count",
            "val"
        ]
    );
    assert_eq!(field(&f, "rw"), (8, 4, false));
    assert_eq!(field(&f, "port"), (12, 4, false));
    assert_eq!(field(&f, "common_pid"), (4, 4, true));
    assert_eq!(f.field("port").unwrap().c_type, "unsigned int");
}

#[test]
fn parses_kvm_mmio_fast_mmio_and_userspace_exit_formats() {
    let mmio = parse_format(MMIO).unwrap();
    assert_eq!(field(&mmio, "type"), (8, 4, false));
    assert_eq!(field(&mmio, "len"), (12, 4, false));
    assert_eq!(field(&mmio, "gpa"), (16, 8, false));
    assert_eq!(field(&mmio, "val"), (24, 8, false));
    let fast = parse_format(FAST).unwrap();
    assert_eq!(fast.name.as_deref(), Some("kvm_fast_mmio"));
    assert_eq!(field(&fast, "gpa"), (8, 8, false));
    let exit = parse_format(EXIT).unwrap();
    assert_eq!(field(&exit, "reason"), (8, 4, false));
    assert_eq!(field(&exit, "errno"), (12, 4, true));
    assert_eq!(exit.field("reason").unwrap().c_type, "__u32");
}

#[test]
fn array_and_data_loc_field_names() {
    let text = "name: x\nID: 1\nformat:\n\tfield:char comm[16];\toffset:8;\tsize:16;\t\
                signed:1;\n\tfield:__data_loc char[] name;\toffset:24;\tsize:4;\tsigned:1;\n\n\
                print fmt: \"\"\n";
    let f = parse_format(text).unwrap();
    assert_eq!(field(&f, "comm"), (8, 16, true));
    assert_eq!(f.field("name").unwrap().c_type, "__data_loc char[]");
    let text = "format:\n\tfield:void *ptr;\toffset:8;\tsize:8;\tsigned:0;\nprint fmt: \"\"\n";
    assert_eq!(field(&parse_format(text).unwrap(), "ptr"), (8, 8, false));
}

#[test]
fn truncated_formats_are_rejected() {
    // Cut inside the `gpa` line, and cut cleanly between lines before `print fmt:`.
    let cut = &MMIO[..MMIO.find("offset:16").unwrap() + "offset:1".len()];
    let err = parse_format(cut).unwrap_err();
    assert!(
        format!("{err:#}").contains("field `gpa` has no size"),
        "{err:#}"
    );
    let mid = &MMIO[..MMIO.find("\tfield:u64 gpa").unwrap()];
    let err = parse_format(mid).unwrap_err();
    assert!(format!("{err:#}").contains("truncated"), "{err:#}");
    let half_attr = &PIO[..PIO
        .find("size:4;\tsigned:0;\n\tfield:unsigned int port")
        .unwrap()
        + 2];
    let err = parse_format(half_attr).unwrap_err();
    assert!(
        format!("{err:#}").contains("malformed attribute `si`"),
        "{err:#}"
    );
    let header_only = &PIO[..PIO.find("format:").unwrap() + "format:\n".len()];
    assert!(parse_format(header_only).is_err());
}

#[test]
fn garbage_is_rejected_with_a_line_number() {
    assert!(parse_format("").is_err());
    let err = parse_format("\u{7f}ELF\u{2}\u{1}\u{1}garbage\n").unwrap_err();
    assert!(format!("{err:#}").contains("line 1"), "{err:#}");
    let err = parse_format("name: x\nID: twelve\nformat:\n").unwrap_err();
    assert!(format!("{err:#}").contains("line 2"), "{err:#}");
    let bad_offset = PIO.replace("offset:12;", "offset:twelve;");
    let err = parse_format(&bad_offset).unwrap_err();
    assert!(
        format!("{err:#}").contains("`offset` of field `port` is not a number"),
        "{err:#}"
    );
    let junk_line = PIO.replace("\tfield:unsigned int val;", "\tjunk");
    let err = parse_format(&junk_line).unwrap_err();
    assert!(
        format!("{err:#}").contains("expected a `field:` line"),
        "{err:#}"
    );
    let no_name = PIO.replace("field:unsigned int rw;", "field:rw;");
    assert!(parse_format(&no_name).is_err());
}

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
        }
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
    assert!(err.contains("modprobe kvm"), "{err}");

    let no_gpa = MMIO.replace("u64 gpa;", "u64 addr;");
    let dir = fake_tracefs(&[ALL[0], ("kvm_mmio", &no_gpa), ALL[2], ALL[3]]);
    let err = format!("{:#}", field_offsets(dir.path()).unwrap_err());
    assert!(err.contains("kvm:kvm_mmio has no field `gpa`"), "{err}");
    assert!(err.contains("type, len, addr, val"), "{err}");

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
    assert!(err.contains("kvm_userspace_exit/format"), "{err}");
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn kallsyms_lookup() {
    let text = "ffffffff814204b0 t hrtimer_wakeup\n\
                ffffffff81420500 T hrtimer_wakeup_other\n\
                ffffffffc0001000 t hrtimer_wakeup\t[some_module]\n";
    assert_eq!(
        kallsyms_address(text, "hrtimer_wakeup"),
        Some(0xffffffff814204b0)
    );
    assert_eq!(kallsyms_address(text, "hrtimer"), None);
    // kptr_restrict: zeros.
    assert_eq!(
        kallsyms_address("0000000000000000 t hrtimer_wakeup\n", "hrtimer_wakeup"),
        None
    );
    assert_eq!(
        kallsyms_address("garbage\n\n x y\n", "hrtimer_wakeup"),
        None
    );
}

#[test]
fn kernel_releases() {
    assert_eq!(release_version("6.18.44-fc-v1300"), Some((6, 18)));
    assert_eq!(release_version("5.15.0-91-generic\n"), Some((5, 15)));
    assert_eq!(release_version("garbage"), None);
    assert!(release_version("5.18.0").unwrap() >= HRTIMER_MIN_RELEASE);
    assert!(release_version("5.17.15").unwrap() < HRTIMER_MIN_RELEASE);
}

/// A tracefs with the hrtimer events' formats as this kernel has them.
fn hrtimer_tracefs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (event, fields) in [
        (
            "hrtimer_start",
            "\tfield:void * hrtimer;\toffset:8;\tsize:8;\tsigned:0;\n\
             \tfield:void * function;\toffset:16;\tsize:8;\tsigned:0;\n",
        ),
        (
            "hrtimer_cancel",
            "\tfield:void * hrtimer;\toffset:8;\tsize:8;\tsigned:0;\n",
        ),
    ] {
        let at = dir.path().join("events/timer").join(event);
        std::fs::create_dir_all(&at).unwrap();
        let text = format!(
            "name: {event}\nID: 1\nformat:\n\tfield:unsigned short common_type;\t\
             offset:0;\tsize:2;\tsigned:0;\n\n{fields}\nprint fmt: \"\"\n"
        );
        std::fs::write(at.join("format"), text).unwrap();
    }
    dir
}

#[test]
fn the_hrtimer_sources_need_the_release_the_layout_and_hrtimer_wakeup() {
    let tracefs = hrtimer_tracefs();
    let kallsyms = "ffffffff8142de30 t hrtimer_wakeup\n";
    assert_eq!(
        hrtimer_offered(tracefs.path(), kallsyms, "6.18.44"),
        Ok(0xffffffff8142de30)
    );
    // An older kernel: no hrtimer source, but hrtimer_start still marks for the libc probes.
    let old = hrtimer_offered(tracefs.path(), kallsyms, "5.15.0").unwrap_err();
    assert!(old.contains("Linux 5.15 has no `prev_state`"), "{old}");
    assert!(hrtimer_start_offered(tracefs.path(), kallsyms).is_ok());
    // kptr_restrict: neither.
    let hidden = "0000000000000000 t hrtimer_wakeup\n";
    let why = hrtimer_start_offered(tracefs.path(), hidden).unwrap_err();
    assert!(why.contains("kptr_restrict"), "{why}");
    assert!(hrtimer_offered(tracefs.path(), hidden, "6.18.44").is_err());
    // A field moved: refused, naming it.
    let moved = hrtimer_tracefs();
    let format = moved.path().join("events/timer/hrtimer_start/format");
    let text = std::fs::read_to_string(&format)
        .unwrap()
        .replace("offset:16", "offset:24");
    std::fs::write(&format, text).unwrap();
    let why = hrtimer_start_offered(moved.path(), kallsyms).unwrap_err();
    assert!(why.contains("`function` at offset 24"), "{why}");
}
