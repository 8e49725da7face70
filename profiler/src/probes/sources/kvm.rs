//! KVM guest reads/writes, symbol-free: the `kvm:kvm_pio`, `kvm:kvm_mmio`,
//! `kvm:kvm_fast_mmio` and `kvm:kvm_userspace_exit` tracepoints (kernel side:
//! `profiler-ebpf/src/probes/kvm.rs`; the per-vCPU-thread state machine that tells QEMU-handled
//! from in-kernel accesses, and the kernel facts behind it: `profiler-common/src/kvm.rs`).
//!
//! This module parses the tracepoints' field layouts from tracefs (they are not ABI), hands
//! them to the programs through the `KVM_FIELDS` map, and attaches the programs
//! ([`KvmSource`]). What the counters mean is [`crate::attribution::kvm`]'s business; the
//! tests replay events through the very code the programs run
//! (`profiler_common::kvm::replay`).

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, MapData},
};
use profiler_common::kvm::{KvmField, KvmFieldOffsets, KvmThreadState, PortKey, replay};

/// The eBPF programs, each named after the `kvm:` tracepoint it attaches to.
pub const PROGRAMS: [&str; 4] = ["kvm_pio", "kvm_mmio", "kvm_fast_mmio", "kvm_userspace_exit"];
/// The config map holding [`KvmFieldOffsets`] at index 0.
pub const FIELDS_MAP: &str = "KVM_FIELDS";
/// The per-thread state map (thread id -> [`KvmThreadState`]).
pub const THREADS_MAP: &str = "KVM_THREADS";
/// The learned port classes ([`PortKey`] -> `port_class`).
pub const PORTS_MAP: &str = "KVM_PORTS";

/// True when this host can run KVM guests at all (`/dev/kvm` exists). Without it the
/// tracepoints may still exist and attach, but never fire.
pub fn kvm_available() -> bool {
    Path::new("/dev/kvm").exists()
}

/// One field of a tracefs event `format` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatField {
    pub name: String,
    /// The C declaration without the name, e.g. `unsigned int`, `u64`, `__data_loc char[]`.
    pub c_type: String,
    pub offset: usize,
    pub size: usize,
    pub signed: bool,
}

/// A parsed tracefs `events/<system>/<event>/format` file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TracepointFormat {
    pub name: Option<String>,
    pub id: Option<u32>,
    /// Common fields first, then the event's own, in file order.
    pub fields: Vec<FormatField>,
}

impl TracepointFormat {
    pub fn field(&self, name: &str) -> Option<&FormatField> {
        self.fields.iter().find(|f| f.name == name)
    }
}

fn parse_field(line_no: usize, line: &str) -> anyhow::Result<FormatField> {
    // `field:unsigned int rw;	offset:8;	size:4;	signed:0;`
    let mut parts = line.split(';').map(str::trim).filter(|p| !p.is_empty());
    let decl = parts
        .next()
        .and_then(|p| p.strip_prefix("field:"))
        .with_context(|| format!("line {line_no}: expected `field:<declaration>;`"))?
        .trim();
    let (c_type, raw_name) = decl
        .rsplit_once(char::is_whitespace)
        .with_context(|| format!("line {line_no}: field declaration `{decl}` has no name"))?;
    // `char comm[16]` names `comm`; `void *ptr` names `ptr`.
    let name = raw_name
        .trim_start_matches('*')
        .split('[')
        .next()
        .unwrap_or_default();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        bail!("line {line_no}: field declaration `{decl}` has no valid name");
    }
    let (mut offset, mut size, mut signed) = (None, None, None);
    for part in parts {
        let (key, value) = part
            .split_once(':')
            .with_context(|| format!("line {line_no}: malformed attribute `{part}` of `{name}`"))?;
        let value: usize = value.trim().parse().with_context(|| {
            format!("line {line_no}: `{key}` of field `{name}` is not a number: `{value}`")
        })?;
        match key.trim() {
            "offset" => offset = Some(value),
            "size" => size = Some(value),
            "signed" => signed = Some(value != 0),
            _ => {} // Attributes a future kernel may add.
        }
    }
    let missing = |what: &str| format!("line {line_no}: field `{name}` has no {what}");
    Ok(FormatField {
        name: name.to_string(),
        c_type: c_type.trim().to_string(),
        offset: offset.with_context(|| missing("offset"))?,
        size: size.with_context(|| missing("size"))?,
        // Kernels before 2.6.32 had no `signed`; nothing here needs them, but be lenient.
        signed: signed.unwrap_or(false),
    })
}

/// Parses a tracefs event `format` file. Errors name the line; a file without the
/// `format:` header, without fields, or cut before its `print fmt:` line is rejected.
pub fn parse_format(text: &str) -> anyhow::Result<TracepointFormat> {
    let mut out = TracepointFormat::default();
    let mut in_format = false;
    let mut complete = false;
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        if !in_format {
            if let Some(name) = trimmed.strip_prefix("name:") {
                out.name = Some(name.trim().to_string());
            } else if let Some(id) = trimmed.strip_prefix("ID:") {
                out.id = Some(id.trim().parse().with_context(|| {
                    format!("line {line_no}: event ID is not a number: `{}`", id.trim())
                })?);
            } else if trimmed == "format:" {
                in_format = true;
            } else {
                bail!("line {line_no}: not a tracefs format file: unexpected `{trimmed}`");
            }
            continue;
        }
        if trimmed.starts_with("print fmt:") {
            complete = true;
            break;
        }
        if !trimmed.starts_with("field:") {
            bail!("line {line_no}: expected a `field:` line, found `{trimmed}`");
        }
        out.fields.push(parse_field(line_no, trimmed)?);
    }
    if !in_format {
        bail!("not a tracefs format file: no `format:` line");
    }
    if out.fields.is_empty() {
        bail!("the format lists no fields");
    }
    if !complete {
        bail!("truncated format: no `print fmt:` line after the fields");
    }
    Ok(out)
}

fn read_format(tracefs: &Path, event: &str) -> anyhow::Result<TracepointFormat> {
    let path = tracefs.join("events/kvm").join(event).join("format");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "tracepoint kvm:{event} does not exist ({} not found): the kvm module is not \
             loaded (`modprobe kvm`) or the kernel was built without CONFIG_KVM",
            path.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    parse_format(&text).with_context(|| format!("parsing {}", path.display()))
}

fn kvm_field(format: &TracepointFormat, event: &str, name: &str) -> anyhow::Result<KvmField> {
    let Some(field) = format.field(name) else {
        let names: Vec<&str> = format.fields.iter().map(|f| f.name.as_str()).collect();
        bail!(
            "tracepoint kvm:{event} has no field `{name}` (it has: {}); this kernel's KVM \
             tracepoints differ from the ones the profiler knows",
            names.join(", ")
        );
    };
    if !matches!(field.size, 1 | 2 | 4 | 8) {
        bail!(
            "field `{name}` of tracepoint kvm:{event} is {} bytes; expected 1, 2, 4 or 8",
            field.size
        );
    }
    let offset = u16::try_from(field.offset)
        .ok()
        .filter(|o| usize::from(*o) + field.size <= usize::from(u16::MAX))
        .with_context(|| {
            format!(
                "field `{name}` of tracepoint kvm:{event} is at offset {}, too far",
                field.offset
            )
        })?;
    Ok(KvmField {
        offset,
        size: field.size as u8,
        signed: u8::from(field.signed),
    })
}

/// Field layout of the four tracepoints from `<tracefs>/events/kvm/*/format`. The error
/// names the missing tracepoint or field.
pub fn field_offsets(tracefs: &Path) -> anyhow::Result<KvmFieldOffsets> {
    let pio = read_format(tracefs, "kvm_pio")?;
    let mmio = read_format(tracefs, "kvm_mmio")?;
    let fast = read_format(tracefs, "kvm_fast_mmio")?;
    let exit = read_format(tracefs, "kvm_userspace_exit")?;
    Ok(KvmFieldOffsets {
        configured: 1,
        pio_rw: kvm_field(&pio, "kvm_pio", "rw")?,
        pio_port: kvm_field(&pio, "kvm_pio", "port")?,
        pio_count: kvm_field(&pio, "kvm_pio", "count")?,
        mmio_type: kvm_field(&mmio, "kvm_mmio", "type")?,
        mmio_gpa: kvm_field(&mmio, "kvm_mmio", "gpa")?,
        fast_mmio_gpa: kvm_field(&fast, "kvm_fast_mmio", "gpa")?,
        exit_reason: kvm_field(&exit, "kvm_userspace_exit", "reason")?,
        exit_errno: kvm_field(&exit, "kvm_userspace_exit", "errno")?,
    })
}

/// Writes the field layout into the config map, then loads and attaches the four programs.
/// `tracefs` is the mounted tracefs (`crate::offer::tracefs::ensure_tracefs`).
pub fn attach(ebpf: &mut Ebpf, tracefs: &Path) -> anyhow::Result<()> {
    let offsets = field_offsets(tracefs)?;
    let mut config: Array<&mut MapData, KvmFieldOffsets> = Array::try_from(
        ebpf.map_mut(FIELDS_MAP)
            .with_context(|| format!("map {FIELDS_MAP} missing from the eBPF object"))?,
    )?;
    config
        .set(0, offsets, 0)
        .with_context(|| format!("writing the KVM field layout into {FIELDS_MAP}"))?;
    for name in PROGRAMS {
        crate::probes::kernel::object::attach_tracepoint(ebpf, "kvm", name)?;
    }
    Ok(())
}

/// Drops the per-thread states and learned port classes of process `tgid` (call when it is
/// unwatched; both maps are LRU, so stale entries also age out).
pub fn forget_process(ebpf: &mut Ebpf, tgid: u32) -> anyhow::Result<()> {
    use crate::probes::kernel::batch::remove_where;
    remove_where::<u32, KvmThreadState>(ebpf, THREADS_MAP, |_, state| state.tgid == tgid);
    remove_where::<PortKey, u32>(ebpf, PORTS_MAP, |key, _| key.tgid == tgid);
    Ok(())
}

/// What the outstanding per-thread states of process `tgid` will count once settled (the last
/// access of each vCPU thread is counted at that thread's next KVM event).
pub fn outstanding_counts(ebpf: &Ebpf, tgid: u32) -> anyhow::Result<BTreeMap<(u32, u64), u64>> {
    let threads: BpfHashMap<&MapData, u32, KvmThreadState> = BpfHashMap::try_from(
        ebpf.map(THREADS_MAP)
            .with_context(|| format!("map {THREADS_MAP} missing"))?,
    )?;
    let states: Vec<KvmThreadState> = threads
        .iter()
        .filter_map(Result::ok)
        .map(|(_, s)| s)
        .collect();
    Ok(replay::outstanding(&states, tgid))
}

/// Whether the KVM tracepoints can be used on this host, as [`attach`] would find them: the
/// four tracepoints exist with the fields the programs read. For `profiler list`, which
/// attaches nothing.
pub fn offered(tracefs: &Path) -> Result<(), String> {
    field_offsets(tracefs)
        .map(|_| ())
        .map_err(|e| format!("{e:#}"))
}

/// The KVM read/write source: four tracepoint programs attached once for the whole host
/// (cheap when no KVM guest runs: the first thing each does is the watched-process lookup),
/// and the per-thread states they keep per process.
#[derive(Debug)]
pub struct KvmSource {
    /// `Err`: why the tracepoints could not be attached (the source is unavailable).
    status: Result<(), String>,
}

impl KvmSource {
    /// Attaches the programs; a failure makes the source unavailable, not the profiler.
    pub fn attach(ebpf: &mut Ebpf, tracefs: &Path) -> Self {
        Self {
            status: attach(ebpf, tracefs).map_err(|e| format!("{e:#}")),
        }
    }

    pub fn status(&self) -> &Result<(), String> {
        &self.status
    }

    /// Drops what the programs keep of process `tgid`.
    pub fn forget(&self, ebpf: &mut Ebpf, tgid: u32) {
        if self.status.is_ok() {
            let _ = forget_process(ebpf, tgid);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::attribution::kvm::{KvmCounts, kvm_counts};
    use profiler_common::kvm::{
        self as k, KVM_FAST_MMIO, KVM_MMIO_READ_IN_KERNEL, KVM_MMIO_WRITE_IN_KERNEL,
        KVM_PIO_READ_IN_KERNEL, KVM_PIO_WRITE_IN_KERNEL, KvmEvent, MMIO_WRITE,
        replay::replay_threads,
    };

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

    // ---- root: load the real object, attach on this kernel ----

    fn skip_unless_root(test: &str) -> bool {
        xtask::prereq::Prereq::new(test).root().is_none()
    }

    /// `BPF_PROG_TEST_RUN` on a program fd: Ok(retval) or Err(errno).
    fn prog_test_run(fd: std::os::fd::RawFd, ctx: &[u8]) -> Result<u32, i32> {
        // union bpf_attr, .test: prog_fd, retval, data_size_in, data_size_out, data_in,
        // data_out, repeat, duration, ctx_size_in, ctx_size_out, ctx_in, ctx_out, flags, cpu,
        // batch_size.
        #[repr(C)]
        #[derive(Default)]
        struct TestAttr {
            prog_fd: u32,
            retval: u32,
            data_size_in: u32,
            data_size_out: u32,
            data_in: u64,
            data_out: u64,
            repeat: u32,
            duration: u32,
            ctx_size_in: u32,
            ctx_size_out: u32,
            ctx_in: u64,
            ctx_out: u64,
            flags: u32,
            cpu: u32,
            batch_size: u32,
            _pad: u32,
        }
        const BPF_PROG_TEST_RUN: libc::c_long = 10;
        let mut attr = TestAttr {
            prog_fd: fd as u32,
            ctx_size_in: ctx.len() as u32,
            ctx_in: ctx.as_ptr() as u64,
            repeat: 1,
            ..Default::default()
        };
        // SAFETY: attr is a valid bpf_attr prefix that outlives the call; ctx is readable.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &mut attr as *mut TestAttr,
                std::mem::size_of::<TestAttr>(),
            )
        };
        if rc < 0 {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        } else {
            Ok(attr.retval)
        }
    }

    #[test]
    fn root_loads_and_attaches_the_kvm_programs() {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let _one_at_a_time = crate::probes::kernel::test_support::attaching();
        if skip_unless_root("root_loads_and_attaches_the_kvm_programs") {
            return;
        }
        let tracefs = crate::offer::tracefs::ensure_tracefs().expect("tracefs");
        if !tracefs.join("events/kvm").is_dir() {
            // No KVM on this host (a property of the host) skips; KVM without its
            // tracepoints is a failure under PROFILER_E2E_REQUIRE.
            let prereq = xtask::prereq::Prereq::new("root_loads_and_attaches_the_kvm_programs");
            if prereq.kvm().is_some() {
                prereq.missing::<()>(&format!(
                    "no kvm tracepoints in {} although /dev/kvm exists (a kernel built without \
                     CONFIG_KVM tracing, or the kvm module not loaded: `modprobe kvm`)",
                    tracefs.display()
                ));
            }
            return;
        }
        let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
        let mut ebpf = Ebpf::load(crate::probes::kernel::object::EBPF_OBJECT)
            .expect("loading the eBPF object");
        // The verifier accepts all four programs and perf_event attach succeeds.
        if let Err(e) = attach(&mut ebpf, &tracefs) {
            for cause in e.chain() {
                if let Some(aya::programs::ProgramError::LoadError {
                    io_error,
                    verifier_log,
                }) = cause.downcast_ref::<aya::programs::ProgramError>()
                {
                    panic!("attach: {e:#}: {io_error}\nverifier log:\n{verifier_log}");
                }
            }
            panic!("attach: {e:?}");
        }

        // The config map holds what tracefs says.
        let expected = field_offsets(&tracefs).unwrap();
        let config: Array<&MapData, KvmFieldOffsets> =
            Array::try_from(ebpf.map(FIELDS_MAP).unwrap()).unwrap();
        assert_eq!(config.get(&0, 0).unwrap(), expected);

        // forget_process() drops exactly one process's thread states.
        {
            let mut threads: BpfHashMap<&mut MapData, u32, KvmThreadState> =
                BpfHashMap::try_from(ebpf.map_mut(THREADS_MAP).unwrap()).unwrap();
            let mut state = KvmThreadState::idle(4_000_001);
            state.state = k::thread_state::PENDING;
            threads.insert(4_000_101, state, 0).unwrap();
            state.tgid = 4_000_002;
            threads.insert(4_000_102, state, 0).unwrap();
        }
        forget_process(&mut ebpf, 4_000_001).unwrap();
        let threads: BpfHashMap<&MapData, u32, KvmThreadState> =
            BpfHashMap::try_from(ebpf.map(THREADS_MAP).unwrap()).unwrap();
        let left: Vec<u32> = threads.keys().filter_map(Result::ok).collect();
        assert!(
            !left.contains(&4_000_101) && left.contains(&4_000_102),
            "{left:?}"
        );

        // BPF_PROG_TEST_RUN on a tracepoint program: report what this kernel does.
        let program: &aya::programs::TracePoint =
            ebpf.program("kvm_pio").unwrap().try_into().unwrap();
        let fd = program.fd().unwrap().as_fd().as_raw_fd();
        let record = [0u8; 32];
        match prog_test_run(fd, &record) {
            Ok(retval) => eprintln!("BPF_PROG_TEST_RUN on a tracepoint program ran: {retval}"),
            Err(errno) => eprintln!(
                "BPF_PROG_TEST_RUN on a tracepoint program is refused on this kernel: errno \
                 {errno} ({})",
                if errno == 524 {
                    "ENOTSUPP: BPF_PROG_TYPE_TRACEPOINT has no test_run".to_string()
                } else {
                    std::io::Error::from_raw_os_error(errno).to_string()
                }
            ),
        }
        for name in PROGRAMS {
            let info = ebpf.program(name).unwrap().info().unwrap();
            eprintln!(
                "{name}: loaded as {:?}, run {} times (KVM available: {})",
                info.name_as_str(),
                info.run_count(),
                kvm_available()
            );
        }
    }

    // ---- root + KVM: a real guest (SeaBIOS, no disk) against ground truth ----

    /// A tracefs instance (own ring buffer, so nothing else's tracing is disturbed) with the
    /// four kvm events enabled in `fields` format; disabled and removed on drop.
    struct TraceInstance(std::path::PathBuf);

    impl TraceInstance {
        fn new(tracefs: &Path, name: &str) -> Self {
            let dir = tracefs.join("instances").join(name);
            std::fs::create_dir(&dir).expect("creating a tracefs instance");
            let instance = Self(dir);
            let write = |rel: &str, value: &str| {
                std::fs::write(instance.0.join(rel), value)
                    .unwrap_or_else(|e| panic!("writing {value} to {rel}: {e}"));
            };
            write("options/fields", "1");
            write("options/record-tgid", "1");
            write("trace_clock", "global");
            write("buffer_size_kb", "16384");
            for event in PROGRAMS {
                write(&format!("events/kvm/{event}/enable"), "1");
            }
            instance
        }
        fn stop(&self) {
            for event in PROGRAMS {
                let _ = std::fs::write(self.0.join(format!("events/kvm/{event}/enable")), "0");
            }
        }
        fn overruns(&self) -> u64 {
            let mut total = 0;
            for cpu in std::fs::read_dir(self.0.join("per_cpu")).unwrap().flatten() {
                let stats = std::fs::read_to_string(cpu.path().join("stats")).unwrap_or_default();
                for line in stats.lines() {
                    if let Some(n) = line.strip_prefix("overrun:") {
                        total += n.trim().parse::<u64>().unwrap_or(0);
                    }
                }
            }
            total
        }
    }

    impl Drop for TraceInstance {
        fn drop(&mut self) {
            self.stop();
            let _ = std::fs::remove_dir(&self.0);
        }
    }

    /// One line of the instance's `trace` with `fields` and `record-tgid` on, e.g.
    /// ` qemu-system-x86-27851   (  27849) [000] .....  2364.33: kvm_pio: rw=0x1 (1) port=...`.
    fn parse_trace_line(line: &str) -> Option<(u32, u32, KvmEvent)> {
        let (head, rest) = line.split_once(": kvm_")?;
        let (comm_tid, after) = head.split_once('(')?;
        let tid: u32 = comm_tid.trim().rsplit_once('-')?.1.parse().ok()?;
        let tgid: u32 = after.split_once(')')?.0.trim().parse().ok()?;
        let (event, fields) = rest.split_once(':')?;
        let mut values: HashMap<&str, u64> = HashMap::new();
        for token in fields.split_whitespace() {
            if let Some((key, hex)) = token.split_once('=') {
                let hex = hex.trim_start_matches("0x");
                values.insert(key, u64::from_str_radix(hex, 16).ok()?);
            }
        }
        let event = match event {
            "pio" => KvmEvent::Pio {
                write: *values.get("rw")? != 0,
                port: *values.get("port")?,
                count: *values.get("count")? as u32,
            },
            "mmio" => KvmEvent::Mmio {
                ty: *values.get("type")? as u32,
                gpa: *values.get("gpa")?,
            },
            "fast_mmio" => KvmEvent::FastMmio {
                gpa: *values.get("gpa")?,
            },
            "userspace_exit" => KvmEvent::Exit {
                reason: *values.get("reason")? as u32,
                // A 4-byte signed field, printed as its unsigned hex.
                errno: i64::from(*values.get("errno")? as u32 as i32),
            },
            _ => return None,
        };
        Some((tgid, tid, event))
    }

    #[test]
    fn parses_tracefs_field_lines() {
        let line = " qemu-system-x86-27851   (  27849) [000] .....  2364.333612: \
                    kvm_userspace_exit: reason=0x0 (0) errno=0xfffffffc (-4)";
        assert_eq!(
            parse_trace_line(line),
            Some((
                27849,
                27851,
                KvmEvent::Exit {
                    reason: 0,
                    errno: -4
                }
            ))
        );
        let line = " qemu-system-x86-27851   (  27849) [001] .....  2364.480855: kvm_mmio: \
                    type=0x2 (2) len=0x4 (4) gpa=0xfee000f0 (4276093168) val=0x1ff (511)";
        assert_eq!(
            parse_trace_line(line),
            Some((
                27849,
                27851,
                KvmEvent::Mmio {
                    ty: MMIO_WRITE,
                    gpa: 0xfee0_00f0
                }
            ))
        );
    }

    /// Just enough QMP to start a guest created with `-S` and to quit it.
    struct Qmp {
        reader: std::io::BufReader<std::os::unix::net::UnixStream>,
        writer: std::os::unix::net::UnixStream,
    }

    impl Qmp {
        fn connect(socket: &Path) -> std::io::Result<Self> {
            use std::io::BufRead as _;
            let stream = std::os::unix::net::UnixStream::connect(socket)?;
            stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
            let mut qmp = Self {
                reader: std::io::BufReader::new(stream.try_clone()?),
                writer: stream,
            };
            let mut greeting = String::new();
            qmp.reader.read_line(&mut greeting)?;
            qmp.execute("qmp_capabilities")?;
            Ok(qmp)
        }
        fn execute(&mut self, command: &str) -> std::io::Result<()> {
            use std::io::{BufRead as _, Write as _};
            writeln!(self.writer, "{{\"execute\":\"{command}\"}}")?;
            let mut line = String::new();
            loop {
                line.clear();
                if self.reader.read_line(&mut line)? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                if line.contains("\"return\"") {
                    return Ok(());
                }
                if line.contains("\"error\"") {
                    return Err(std::io::Error::other(line.clone()));
                }
            }
        }
    }

    struct KillOnDrop(std::process::Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// (reads, writes) that QEMU's device model dispatched for guest vCPUs, per port and per
    /// MMIO page, from its own `memory_region_ops_read/write` trace events (log backend,
    /// `-D file`), e.g.
    /// `memory_region_ops_write cpu 0 mr 0x55f8 addr 0x402 value 0x53 size 1 name 'isa-debugcon'`
    /// (`addr` is absolute; ports are below 0x10000, MMIO is far above).
    #[derive(Debug, Default)]
    struct Dispatches {
        by_port: BTreeMap<u64, (u64, u64)>,
        by_page: BTreeMap<u64, (u64, u64)>,
    }

    fn qemu_dispatches(log: &str) -> Dispatches {
        let mut out = Dispatches::default();
        for line in log.lines() {
            let mut words = line.split_whitespace();
            let write = match words.next() {
                Some("memory_region_ops_read") => false,
                Some("memory_region_ops_write") => true,
                _ => continue,
            };
            let rest: Vec<&str> = words.collect();
            let value_of = |key: &str| {
                rest.iter()
                    .position(|w| *w == key)
                    .and_then(|i| rest.get(i + 1))
                    .copied()
            };
            // cpu -1: QEMU's own accesses (machine setup), not a guest's.
            if value_of("cpu").is_none_or(|cpu| cpu.starts_with('-')) {
                continue;
            }
            let Some(addr) = value_of("addr")
                .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
            else {
                continue;
            };
            let entry = if addr < 0x10000 {
                out.by_port.entry(addr).or_default()
            } else {
                out.by_page.entry(k::page_of(addr)).or_default()
            };
            if write {
                entry.1 += 1;
            } else {
                entry.0 += 1;
            }
        }
        out
    }

    /// Boots SeaBIOS (no disk: it prints, probes the hardware and stops at "No bootable
    /// device.") under KVM with an isa-debugcon at 0x402, counts with the real programs, and
    /// checks the counts against
    /// 1. the debugcon file: every byte is one guest `out 0x402` that QEMU handled;
    /// 2. QEMU's own dispatch trace: user reads/writes per port and per MMIO page, exactly
    ///    (QEMU's RTC index port 0x70 is coalesced PIO: its writes reach QEMU without an exit
    ///    and count as in-kernel), and in-kernel ports/pages never reach QEMU;
    /// 3. the same run's kvm events recorded by a tracefs instance and replayed through
    ///    `replay_threads`: identical counters.
    #[test]
    fn root_kvm_pc_guest_counts_match_ground_truth_and_replay() {
        seabios_under_kvm(
            "root_kvm_pc_guest_counts_match_ground_truth_and_replay",
            "pc",
        );
    }

    /// As the `pc` test, on `q35`: SeaBIOS then reaches PCI config space through MMCONFIG
    /// (MMIO at 0xb0000000), so user MMIO reads and writes are checked too.
    #[test]
    fn root_kvm_q35_guest_counts_match_ground_truth_and_replay() {
        let c = seabios_under_kvm(
            "root_kvm_q35_guest_counts_match_ground_truth_and_replay",
            "q35",
        );
        if let Some(c) = c {
            assert!(c.mmio_reads_user > 0 && c.mmio_writes_user > 0, "{c:?}");
        }
    }

    fn seabios_under_kvm(test: &'static str, machine: &str) -> Option<KvmCounts> {
        use std::time::{Duration, Instant};
        let _one_at_a_time = crate::probes::kernel::test_support::attaching();
        let prereq = xtask::prereq::Prereq::new(test);
        prereq.root()?;
        prereq.kvm()?;
        prereq.system_qemu()?;
        let qemu = "qemu-system-x86_64";
        let skip = |why: &str| prereq.missing(why);
        let tracefs = crate::offer::tracefs::ensure_tracefs().expect("tracefs");
        if !tracefs.join("events/kvm").is_dir() {
            return skip("no kvm tracepoints in tracefs");
        }
        let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
        let mut ebpf = Ebpf::load(crate::probes::kernel::object::EBPF_OBJECT)
            .expect("loading the eBPF object");
        attach(&mut ebpf, &tracefs).expect("attach");

        let dir = tempfile::tempdir().unwrap();
        let qmp_path = dir.path().join("qmp.sock");
        let debugcon = dir.path().join("debugcon.txt");
        let qemu_log = dir.path().join("qemu-trace.log");
        let instance = TraceInstance::new(
            &tracefs,
            &format!("profiler-kvm-test-{}-{machine}", std::process::id()),
        );
        let child = std::process::Command::new(qemu)
            .args([
                "-machine", machine, "-accel", "kvm", "-m", "64", "-smp", "2",
            ])
            .args(["-display", "none"])
            .args(["-nodefaults", "-no-reboot", "-S"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .arg("-chardev")
            .arg(format!("file,id=dbg,path={}", debugcon.display()))
            .args(["-device", "isa-debugcon,iobase=0x402,chardev=dbg"])
            .args([
                "-trace",
                "memory_region_ops_read",
                "-trace",
                "memory_region_ops_write",
            ])
            .arg("-D")
            .arg(&qemu_log)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting qemu");
        let mut qemu_child = KillOnDrop(child);
        let pid = qemu_child.0.id();

        // Watch before the vCPU runs its first instruction, then let it go.
        let mut watch_table = crate::probes::kernel::watch_table::WatchTable::open(&ebpf).unwrap();
        watch_table
            .set(&mut ebpf, pid, 1, profiler_common::wait_block::NONE)
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut qmp = loop {
            match Qmp::connect(&qmp_path) {
                Ok(qmp) => break qmp,
                Err(e) => {
                    if let Ok(Some(status)) = qemu_child.0.try_wait() {
                        let mut stderr = String::new();
                        use std::io::Read as _;
                        let _ = qemu_child
                            .0
                            .stderr
                            .take()
                            .unwrap()
                            .read_to_string(&mut stderr);
                        return skip(&format!(
                            "qemu -accel kvm exited ({status}): {}",
                            stderr.trim()
                        ));
                    }
                    assert!(Instant::now() < deadline, "no QMP: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        qmp.execute("cont").expect("QMP cont");
        // SeaBIOS is done (and idles in a halt loop) once it says so on the debugcon.
        let done = "No bootable device.";
        while !std::fs::read_to_string(&debugcon)
            .unwrap_or_default()
            .contains(done)
        {
            assert!(Instant::now() < deadline, "SeaBIOS never printed `{done}`");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        // A clean quit flushes QEMU's trace log.
        let _ = qmp.execute("quit");
        let exit_deadline = Instant::now() + Duration::from_secs(60);
        while qemu_child.0.try_wait().unwrap().is_none() && Instant::now() < exit_deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(qemu_child);
        instance.stop();

        // What the eBPF programs counted for this QEMU, plus its outstanding last access.
        let mut counted: BTreeMap<(u32, u64), u64> = BTreeMap::new();
        let counters = crate::probes::kernel::counters::CounterStore::open(&ebpf)
            .unwrap()
            .read(&ebpf)
            .unwrap();
        for (key, n) in counters {
            if key.tgid == pid && k::is_kvm_kind(key.kind) {
                *counted.entry((key.kind, key.id)).or_default() += n;
            }
        }
        let outstanding = outstanding_counts(&ebpf, pid).unwrap();
        let mut total = counted.clone();
        for (key, n) in &outstanding {
            *total.entry(*key).or_insert(0) += n;
        }
        let c = kvm_counts(&total);

        // (1) The debugcon bytes.
        let debug_bytes = std::fs::metadata(&debugcon).unwrap().len();
        assert!(
            debug_bytes > 1000,
            "SeaBIOS wrote only {debug_bytes} debugcon bytes"
        );
        assert_eq!(
            c.by_port.get(&0x402).map_or(0, |rw| rw.1),
            debug_bytes,
            "user PIO writes to 0x402 vs bytes QEMU wrote to the debugcon file"
        );

        // (2) QEMU's own dispatches, port by port and page by page.
        let dispatches = qemu_dispatches(&std::fs::read_to_string(&qemu_log).unwrap());
        let dispatched = &dispatches.by_port;
        let coalesced_rtc_index = 0x70;
        let in_kernel_of = |port: u64| {
            total
                .get(&(KVM_PIO_WRITE_IN_KERNEL, port))
                .copied()
                .unwrap_or(0)
        };
        let mut ports: Vec<u64> = dispatched.keys().chain(c.by_port.keys()).copied().collect();
        ports.sort_unstable();
        ports.dedup();
        for port in ports {
            let (reads, writes) = c.by_port.get(&port).copied().unwrap_or_default();
            let (q_reads, q_writes) = dispatched.get(&port).copied().unwrap_or_default();
            let coalesced = if port == coalesced_rtc_index {
                in_kernel_of(port)
            } else {
                0
            };
            assert_eq!(
                (reads, writes + coalesced),
                (q_reads, q_writes),
                "port {port:#x}: (user reads, user writes + coalesced) vs QEMU's dispatches"
            );
        }
        for (&(kind, port), n) in &total {
            if (kind == KVM_PIO_READ_IN_KERNEL || kind == KVM_PIO_WRITE_IN_KERNEL)
                && port != coalesced_rtc_index
            {
                assert!(
                    !dispatched.contains_key(&port),
                    "port {port:#x}: {n} in-kernel accesses, yet QEMU dispatched some"
                );
            }
        }

        let mut pages: Vec<u64> = dispatches
            .by_page
            .keys()
            .chain(c.by_page.keys())
            .copied()
            .collect();
        pages.sort_unstable();
        pages.dedup();
        for page in pages {
            assert_eq!(
                c.by_page.get(&page).copied().unwrap_or_default(),
                dispatches.by_page.get(&page).copied().unwrap_or_default(),
                "MMIO page {page:#x}: (user reads, user writes) vs QEMU's dispatches"
            );
        }
        for (&(kind, page), n) in &total {
            if kind == KVM_MMIO_READ_IN_KERNEL || kind == KVM_MMIO_WRITE_IN_KERNEL {
                assert!(
                    !dispatches.by_page.contains_key(&page),
                    "MMIO page {page:#x}: {n} in-kernel accesses, yet QEMU dispatched some"
                );
            }
        }

        // (3) The same events, recorded by tracefs and replayed through the shared step().
        assert_eq!(
            instance.overruns(),
            0,
            "the tracefs instance buffer overflowed"
        );
        let trace = std::fs::read_to_string(instance.0.join("trace")).unwrap();
        let events: Vec<(u32, KvmEvent)> = trace
            .lines()
            .filter_map(parse_trace_line)
            .filter(|(tgid, _, _)| *tgid == pid)
            .map(|(_, tid, event)| (tid, event))
            .collect();
        assert!(
            events.len() > 1000,
            "only {} kvm events recorded",
            events.len()
        );
        let replayed = replay_threads(&events);
        assert_eq!(counted, replayed.counted, "eBPF counters vs tracefs replay");
        assert_eq!(
            outstanding, replayed.outstanding,
            "outstanding states vs replay"
        );

        // The in-kernel path saw real traffic too (kernel irqchip: PIC ports, LAPIC page).
        assert!(c.in_kernel > 0 && c.pio_reads_user > 0, "{c:?}");
        eprintln!(
            "{test}: {} kvm events; user PIO reads {} writes {}, user MMIO reads {} writes {}, \
             in-kernel {}, fast MMIO {}; debugcon bytes {debug_bytes}; outstanding {outstanding:x?}",
            events.len(),
            c.pio_reads_user,
            c.pio_writes_user,
            c.mmio_reads_user,
            c.mmio_writes_user,
            c.in_kernel,
            c.fast_mmio
        );
        let in_kernel: Vec<_> = total
            .iter()
            .filter(|((kind, _), _)| {
                k::is_kvm_kind(*kind) && *kind >= KVM_PIO_READ_IN_KERNEL && *kind != KVM_FAST_MMIO
            })
            .collect();
        eprintln!("{test}: in-kernel (kind, id): {in_kernel:x?}");
        for name in PROGRAMS {
            let info = ebpf.program(name).unwrap().info().unwrap();
            let runs = info.run_count();
            eprintln!(
                "{test}: {name}: {runs} runs, {} ns per run",
                info.run_time().as_nanos() / u128::from(runs.max(1))
            );
        }
        Some(c)
    }
}
