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
