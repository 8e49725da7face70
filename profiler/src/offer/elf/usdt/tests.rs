use std::{collections::BTreeMap, path::Path, process::Command};

use super::*;
use crate::offer::elf::{
    symbols::SymbolTable,
    test_support::{Rng, build_demo, libstdcxx, need_tool, own_libc, python3},
};

fn qemu_usdt() -> Option<std::path::PathBuf> {
    xtask::prereq::Prereq::new("elf::usdt::tests (USDT QEMU)").usdt_qemu()
}

fn arg(size: u8, signed: bool, location: UsdtArgLocation) -> UsdtArg {
    UsdtArg {
        size,
        signed,
        location,
    }
}

fn reg(reg: X86Reg) -> UsdtArgLocation {
    UsdtArgLocation::Register { reg }
}

#[test]
fn pt_regs_offsets_match_kernel_layout() {
    // arch/x86/include/asm/ptrace.h, x86_64: 21 unsigned longs in this order.
    let layout = [
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
        "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss",
    ];
    for reg in X86Reg::ALL {
        let index = layout.iter().position(|&n| n == reg.name()).unwrap();
        assert_eq!(reg.pt_regs_offset(), index * 8, "{reg:?}");
    }
}

#[test]
fn register_names_of_every_width() {
    let cases = [
        ("rax", X86Reg::Rax, 8),
        ("eax", X86Reg::Rax, 4),
        ("ax", X86Reg::Rax, 2),
        ("al", X86Reg::Rax, 1),
        ("sil", X86Reg::Rsi, 1),
        ("dil", X86Reg::Rdi, 1),
        ("bpl", X86Reg::Rbp, 1),
        ("spl", X86Reg::Rsp, 1),
        ("esp", X86Reg::Rsp, 4),
        ("r8", X86Reg::R8, 8),
        ("r8d", X86Reg::R8, 4),
        ("r8w", X86Reg::R8, 2),
        ("r8b", X86Reg::R8, 1),
        ("r15l", X86Reg::R15, 1),
        ("r12d", X86Reg::R12, 4),
        ("rip", X86Reg::Rip, 8),
    ];
    for (name, reg, width) in cases {
        assert_eq!(X86Reg::from_name(name), Some((reg, width)), "{name}");
    }
    for bad in ["r16", "r7", "r8x", "xmm0", "", "r", "rax2", "e8d"] {
        assert_eq!(X86Reg::from_name(bad), None, "{bad}");
    }
}

#[test]
fn parses_qemu_memory_region_ops_spec() {
    let args = parse_args("-4@%edi 8@%rsi 8@%rdx 8@%rcx 4@%r8d 8@%r9").unwrap();
    assert_eq!(
        args,
        vec![
            arg(4, true, reg(X86Reg::Rdi)),
            arg(8, false, reg(X86Reg::Rsi)),
            arg(8, false, reg(X86Reg::Rdx)),
            arg(8, false, reg(X86Reg::Rcx)),
            arg(4, false, reg(X86Reg::R8)),
            arg(8, false, reg(X86Reg::R9)),
        ]
    );
}

#[test]
fn parses_memory_rip_relative_indexed_and_constants() {
    let cases: &[(&str, UsdtArg)] = &[
        (
            "8@seq_iter.6(%rip)",
            arg(
                8,
                false,
                UsdtArgLocation::RipRelative {
                    symbol: "seq_iter.6".into(),
                    offset: 0,
                },
            ),
        ),
        (
            "8@foo+16(%rip)",
            arg(
                8,
                false,
                UsdtArgLocation::RipRelative {
                    symbol: "foo".into(),
                    offset: 16,
                },
            ),
        ),
        (
            "-8@16+table(%rip)",
            arg(
                8,
                true,
                UsdtArgLocation::RipRelative {
                    symbol: "table".into(),
                    offset: 16,
                },
            ),
        ),
        (
            "4@bar-0x10(%rip)",
            arg(
                4,
                false,
                UsdtArgLocation::RipRelative {
                    symbol: "bar".into(),
                    offset: -16,
                },
            ),
        ),
        (
            "-4@112(%rsp)",
            arg(
                4,
                true,
                UsdtArgLocation::Memory {
                    base: X86Reg::Rsp,
                    offset: 112,
                },
            ),
        ),
        (
            "8@-0x18(%rbp)",
            arg(
                8,
                false,
                UsdtArgLocation::Memory {
                    base: X86Reg::Rbp,
                    offset: -24,
                },
            ),
        ),
        (
            "8@(%rax)",
            arg(
                8,
                false,
                UsdtArgLocation::Memory {
                    base: X86Reg::Rax,
                    offset: 0,
                },
            ),
        ),
        (
            "-4@8(%rax,%rbx,4)",
            arg(
                4,
                true,
                UsdtArgLocation::Indexed {
                    base: Some(X86Reg::Rax),
                    index: X86Reg::Rbx,
                    scale: 4,
                    offset: 8,
                },
            ),
        ),
        (
            "8@(,%rcx,8)",
            arg(
                8,
                false,
                UsdtArgLocation::Indexed {
                    base: None,
                    index: X86Reg::Rcx,
                    scale: 8,
                    offset: 0,
                },
            ),
        ),
        (
            "2@(%r12,%r13)",
            arg(
                2,
                false,
                UsdtArgLocation::Indexed {
                    base: Some(X86Reg::R12),
                    index: X86Reg::R13,
                    scale: 1,
                    offset: 0,
                },
            ),
        ),
        ("-4@$-7", arg(4, true, UsdtArgLocation::Constant(-7))),
        ("4@$0x10", arg(4, false, UsdtArgLocation::Constant(16))),
        ("-1@%cl", arg(1, true, reg(X86Reg::Rcx))),
        // No size prefix (old sdt.h): the register's own width.
        ("%r9w", arg(2, false, reg(X86Reg::R9))),
    ];
    for (spec, want) in cases {
        let got = parse_args(spec).unwrap_or_else(|e| panic!("{spec}: {e:#}"));
        assert_eq!(got, vec![want.clone()], "{spec}");
    }
    assert_eq!(parse_args("").unwrap(), vec![]);
    assert_eq!(parse_args("  ").unwrap(), vec![]);
}

#[test]
fn rejects_unsupported_and_malformed_specs_clearly() {
    let cases = [
        ("8f@%xmm0", "floating-point"),
        ("16@%rax", "size"),
        ("3@%rax", "size"),
        ("4@%xmm1", "register"),
        ("1@%ah", "high-byte"),
        ("8@%fs:8", "segment"),
        ("8@foo", "absolute"),
        ("8@0x1234", "absolute"),
        ("8@$foo", "immediate"),
        ("8@8(%rax", "')'"),
        ("8@foo(%rax)", "only supported with %rip"),
        ("8@8(%rax,%rsp,2)", "index"),
        ("8@8(%rax,%rbx,3)", "scale"),
        ("8@8(%rax,%rbx,4,5)", "parts"),
        ("8@", "empty operand"),
        ("8@foo++1(%rip)", "displacement"),
        ("8@1+2(%rip)", "displacement"),
    ];
    for (spec, needle) in cases {
        let err = format!("{:#}", parse_args(spec).unwrap_err());
        assert!(err.contains(needle), "{spec}: {err}");
    }
    // The failing argument is named by position.
    let err = format!("{:#}", parse_args("8@%rdi 4@%xmm1").unwrap_err());
    crate::testing::assert_contains(&err, "argument 1");
}

#[test]
fn extend_sign_and_zero() {
    let signed = arg(4, true, reg(X86Reg::Rdi));
    assert_eq!(signed.extend(0xdead_beef_ffff_fffe), (-2i64) as u64);
    let unsigned = arg(4, false, reg(X86Reg::Rdi));
    assert_eq!(unsigned.extend(0xdead_beef_ffff_fffe), 0xffff_fffe);
    let byte = arg(1, true, reg(X86Reg::Rax));
    assert_eq!(byte.extend(0x80), (-128i64) as u64);
    assert_eq!(arg(8, true, reg(X86Reg::Rax)).extend(u64::MAX), u64::MAX);
}

#[test]
fn parse_int_edges() {
    assert_eq!(parse_int("-9223372036854775808"), Some(i64::MIN));
    assert_eq!(parse_int("9223372036854775808"), None);
    assert_eq!(parse_int("0xfffffffffffffff8"), Some(-8));
    assert_eq!(parse_int("0x"), None);
    assert_eq!(parse_int("-"), None);
    assert_eq!(parse_int("1_0"), None);
}

/// One probe as `readelf -n` prints it.
#[derive(Debug, PartialEq, Eq)]
struct ReadelfProbe {
    provider: String,
    name: String,
    pc: u64,
    base: u64,
    semaphore: u64,
    args: String,
}

/// `readelf -n`'s probes, or `None` after saying why (a failure under
/// `PROFILER_E2E_REQUIRE`) when binutils is not installed.
fn readelf_probes(test: &str, path: &Path) -> Option<Vec<ReadelfProbe>> {
    need_tool(test, "readelf", "binutils")?;
    let out = Command::new("readelf")
        .args(["-n", "--wide"])
        .arg(path)
        .output()
        .expect("readelf runs");
    assert!(
        out.status.success(),
        "readelf -n {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = |s: &str| u64::from_str_radix(s.trim().trim_end_matches(','), 16).unwrap();
    let mut probes = Vec::new();
    let mut current: Option<ReadelfProbe> = None;
    for line in text.lines().map(str::trim) {
        // With --wide, "Provider:" shares the line with the note header.
        if let Some((_, p)) = line.split_once("Provider: ") {
            current = Some(ReadelfProbe {
                provider: p.to_string(),
                name: String::new(),
                pc: 0,
                base: 0,
                semaphore: 0,
                args: String::new(),
            });
        } else if let Some(n) = line.strip_prefix("Name: ") {
            current.as_mut().unwrap().name = n.to_string();
        } else if let Some(loc) = line.strip_prefix("Location: ") {
            // "0x..., Base: 0x..., Semaphore: 0x..."
            let fields: Vec<&str> = loc.split(", ").collect();
            let p = current.as_mut().unwrap();
            p.pc = hex(fields[0].trim_start_matches("0x"));
            p.base = hex(fields[1].trim_start_matches("Base: 0x"));
            p.semaphore = hex(fields[2].trim_start_matches("Semaphore: 0x"));
        } else if let Some(a) = line.strip_prefix("Arguments:") {
            let mut p = current.take().unwrap();
            p.args = a.trim().to_string();
            probes.push(p);
        }
    }
    Some(probes)
}

/// Compares every probe with `readelf -n` (without readelf: only the parse, after
/// saying so; a failure under `PROFILER_E2E_REQUIRE`), and checks each site is a `nop`
/// in the file and each semaphore a zero-initialised u16 in the file.
fn check_against_readelf(test: &str, path: &Path) -> Vec<UsdtProbe> {
    let bytes = std::fs::read(path).unwrap();
    let probes = parse_usdt_probes(&bytes).unwrap();
    let Some(expected) = readelf_probes(test, path) else {
        return probes;
    };
    assert_eq!(
        probes.len(),
        expected.len(),
        "{}: probe count",
        path.display()
    );
    for (got, want) in probes.iter().zip(&expected) {
        let id = format!("{}: {}:{}", path.display(), want.provider, want.name);
        assert_eq!(got.provider, want.provider, "{id}");
        assert_eq!(got.name, want.name, "{id}");
        // No prelink on this machine: the note's base equals .stapsdt.base, no shift.
        assert_eq!(got.pc, want.pc, "{id}");
        assert_eq!(got.semaphore.unwrap_or(0), want.semaphore, "{id}");
        assert_eq!(got.raw_args, want.args, "{id}");
        assert_eq!(
            bytes[got.pc_file_offset as usize], 0x90,
            "{id}: site is not a nop"
        );
        if let Some(off) = got.semaphore_file_offset {
            let off = off as usize;
            assert_eq!(&bytes[off..off + 2], &[0, 0], "{id}: semaphore not zero");
        }
    }
    probes
}

#[test]
fn python_matches_readelf_with_file_offsets() {
    // Debian's python3 (3.11 in bookworm) is a non-PIE executable at 0x400000 with
    // semaphores in .probes, so file offsets differ from vaddrs: a real test of the
    // conversion.
    let test = "python_matches_readelf_with_file_offsets";
    let Some(python) = python3(test) else {
        return;
    };
    let path = python.as_path();
    let probes = check_against_readelf(test, path);
    assert!(!probes.is_empty());
    let gc_start = probes
        .iter()
        .find(|p| p.provider == "python" && p.name == "gc__start")
        .expect("python:gc__start");
    assert!(gc_start.semaphore.is_some());
    assert!(gc_start.args_error.is_none(), "{:?}", gc_start.args_error);
    for p in &probes {
        assert!(p.args_error.is_none(), "{}: {:?}", p.name, p.args_error);
        // Mapped through PT_LOAD, not assumed equal.
        let expected =
            crate::offer::elf::vaddr_to_file_offset(&std::fs::read(path).unwrap(), p.pc).unwrap();
        assert_eq!(p.pc_file_offset, expected);
    }
}

#[test]
fn libstdcxx_shared_library_matches_readelf() {
    let test = "libstdcxx_shared_library_matches_readelf";
    let Some(path) = libstdcxx(test) else {
        return;
    };
    let probes = check_against_readelf(test, &path);
    assert!(probes.iter().any(|p| p.provider == "libstdcxx"));
    assert!(probes.iter().all(|p| p.args_error.is_none()));
}

#[test]
fn libc_has_no_probes_on_this_machine_or_matches_readelf() {
    // Debian bookworm's glibc is built without systemtap notes (checked with readelf);
    // where it has them, they must match readelf. The C library this test runs with.
    check_against_readelf(
        "libc_has_no_probes_on_this_machine_or_matches_readelf",
        &own_libc(),
    );
}

#[test]
fn demo_fixture_probes_semaphores_and_rip_relative_args() {
    let test = "demo_fixture_probes_semaphores_and_rip_relative_args";
    let dir = tempfile::tempdir().unwrap();
    let Some(path) = build_demo(test, &dir.path().join("demo"), &[]) else {
        return;
    };
    let probes = check_against_readelf(test, &path);
    let by_name: BTreeMap<&str, &UsdtProbe> = probes.iter().map(|p| (p.name.as_str(), p)).collect();
    assert_eq!(
        by_name.keys().copied().collect::<Vec<_>>(),
        ["consts", "guarded", "indexed", "local", "regs"]
    );
    assert!(probes.iter().all(|p| p.provider == "demo"));

    assert_eq!(
        by_name["consts"].args,
        vec![
            arg(4, true, UsdtArgLocation::Constant(5)),
            arg(4, true, UsdtArgLocation::Constant(-7))
        ]
    );
    assert!(
        by_name["regs"]
            .args
            .iter()
            .all(|a| matches!(a.location, UsdtArgLocation::Register { .. })),
        "{:?}",
        by_name["regs"].raw_args
    );
    assert!(by_name["regs"].semaphore.is_none());

    let guarded = by_name["guarded"];
    let sema = guarded.semaphore.expect("guarded probe has a semaphore");
    let symbols = SymbolTable::from_elf_bytes(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(
        symbols.lookup("demo_guarded_semaphore").map(|s| s.vaddr),
        Some(sema)
    );

    // `counter` is a static in both files: the probe's pc picks the right one.
    let local = by_name["local"];
    let UsdtArgLocation::RipRelative { symbol, offset } = &local.args[0].location else {
        panic!("local arg 0 not RIP-relative: {}", local.raw_args);
    };
    assert_eq!(symbol, "counter");
    let counters = symbols.lookup_all("counter");
    assert_eq!(counters.len(), 2);
    assert!(symbols.lookup("counter").is_none(), "ambiguous local");
    let err = resolve_rip_relative(&symbols, "counter", 0, None).unwrap_err();
    assert!(err.to_string().contains("ambiguous"), "{err}");
    let main_counter = counters
        .iter()
        .find(|s| s.file.as_deref() == Some("usdt_demo_main.c"))
        .unwrap();
    let sema_counter = counters
        .iter()
        .find(|s| s.file.as_deref() == Some("usdt_demo_sema.c"))
        .unwrap();
    assert_eq!(
        resolve_rip_relative(&symbols, symbol, *offset, Some(local.pc)).unwrap(),
        main_counter.vaddr
    );
    let UsdtArgLocation::RipRelative { symbol, offset } = &guarded.args[1].location else {
        panic!("guarded arg 1 not RIP-relative: {}", guarded.raw_args);
    };
    assert_eq!(
        resolve_rip_relative(&symbols, symbol, *offset, Some(guarded.pc)).unwrap(),
        sema_counter.vaddr
    );
    // `16+table(%rip)`: table[2] of a long table.
    let UsdtArgLocation::RipRelative { symbol, offset } = &local.args[1].location else {
        panic!("local arg 1 not RIP-relative: {}", local.raw_args);
    };
    assert_eq!((symbol.as_str(), *offset), ("table", 16));
    assert_eq!(
        resolve_rip_relative(&symbols, symbol, *offset, Some(local.pc)).unwrap(),
        symbols.lookup("table").unwrap().vaddr + 16
    );
    let err = resolve_rip_relative(&symbols, "no_such_symbol", 0, None).unwrap_err();
    assert!(err.to_string().contains("not in the symbol table"), "{err}");
}

/// Offset of the first stapsdt note's descriptor in the file.
fn first_note_desc(bytes: &[u8]) -> usize {
    with_elf(bytes, |elf| {
        let section = elf.section(".note.stapsdt").unwrap();
        let start = section.sh_offset(elf.endian) as usize;
        let namesz = u32::from_le_bytes(bytes[start..start + 4].try_into().unwrap());
        Ok(start + 12 + (namesz as usize).next_multiple_of(4))
    })
    .unwrap()
}

#[test]
fn prelink_shift_moves_pc_and_semaphore() {
    let Some(path) = python3("prelink_shift_moves_pc_and_semaphore") else {
        return;
    };
    let mut bytes = std::fs::read(path).unwrap();
    let before = parse_usdt_probes(&bytes).unwrap();
    // Pretend the note was written when .stapsdt.base sat 0x10 higher: every address
    // must then move 0x10 down, as after a prelink that moved the object.
    let desc = first_note_desc(&bytes);
    let base = u64::from_le_bytes(bytes[desc + 8..desc + 16].try_into().unwrap());
    bytes[desc + 8..desc + 16].copy_from_slice(&(base + 0x10).to_le_bytes());
    let after = parse_usdt_probes(&bytes).unwrap();
    assert_eq!(after[0].pc, before[0].pc - 0x10);
    assert_eq!(after[0].pc_file_offset, before[0].pc_file_offset - 0x10);
    assert_eq!(
        after[0].semaphore,
        before[0].semaphore.map(|s| s - 0x10),
        "semaphore shifted too"
    );
    assert_eq!(after[1..], before[1..]);
}

#[test]
fn malformed_notes_are_clear_errors() {
    let Some(path) = python3("malformed_notes_are_clear_errors") else {
        return;
    };
    let bytes = std::fs::read(path).unwrap();
    let desc = first_note_desc(&bytes);
    let header = desc - 12 - 8; // "stapsdt\0" is 8 bytes
    let descsz = u32::from_le_bytes(bytes[header + 4..header + 8].try_into().unwrap());

    let mutate = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = bytes.clone();
        f(&mut b);
        format!("{:#}", parse_usdt_probes(&b).unwrap_err())
    };
    // Huge descriptor size.
    let err = mutate(&|b| b[header + 4..header + 8].copy_from_slice(&u32::MAX.to_le_bytes()));
    crate::testing::assert_contains(&err, "descriptor size");
    // Descriptor too short for the three addresses and strings.
    let err = with_elf(&bytes, |elf| parse_note(elf, &bytes[desc..desc + 26], None))
        .unwrap_err()
        .to_string();
    crate::testing::assert_contains(&err, "too short");
    // Strings without NULs.
    let err = mutate(&|b| {
        for x in &mut b[desc + 24..desc + descsz as usize] {
            if *x == 0 {
                *x = b'x';
            }
        }
    });
    crate::testing::assert_contains(&err, "NUL");
    // pc outside every segment.
    let err = mutate(&|b| b[desc..desc + 8].copy_from_slice(&0xdead_0000_0000u64.to_le_bytes()));
    crate::testing::assert_contains(&err, "not in any file-backed PT_LOAD");
    assert!(err.contains("python:"), "names the probe: {err}");
    // pc in a data segment.
    let err = mutate(&|b| {
        let sema: [u8; 8] = b[desc + 16..desc + 24].try_into().unwrap();
        b[desc..desc + 8].copy_from_slice(&sema);
    });
    crate::testing::assert_contains(&err, "non-executable");
    // Semaphore in the read-only text.
    let err = mutate(&|b| {
        let pc: [u8; 8] = b[desc..desc + 8].try_into().unwrap();
        b[desc + 16..desc + 24].copy_from_slice(&pc);
    });
    crate::testing::assert_contains(&err, "read-only");
    // Invalid UTF-8 in the provider.
    let err = mutate(&|b| b[desc + 24] = 0xff);
    crate::testing::assert_contains(&err, "UTF-8");
}

#[test]
fn not_x86_64_is_a_clear_error() {
    let mut bytes = std::fs::read("/bin/ls").unwrap();
    bytes[18..20].copy_from_slice(&elf::EM_AARCH64.to_le_bytes());
    let err = format!("{:#}", parse_usdt_probes(&bytes).unwrap_err());
    crate::testing::assert_contains(&err, "only supported in x86_64");
}

#[test]
fn binary_without_notes_has_no_probes() {
    let bytes = std::fs::read("/bin/ls").unwrap();
    assert_eq!(parse_usdt_probes(&bytes).unwrap(), vec![]);
}

#[test]
fn garbage_never_panics() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for len in [0, 1, 4, 16, 63, 64, 65, 200, 4096] {
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        assert!(parse_usdt_probes(&bytes).is_err());
        let mut with_magic = bytes.clone();
        if len >= 64 {
            with_magic[..7].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1]);
            let _ = parse_usdt_probes(&with_magic);
        }
    }
    let Some(python) = python3("elf::usdt garbage_never_panics") else {
        return;
    };
    let real = std::fs::read(python).unwrap();
    // Truncations at many points, including inside the notes at the end of the file.
    let note_start = first_note_desc(&real) - 20;
    let mut cuts: Vec<usize> = (0..64).map(|i| i * real.len() / 64).collect();
    cuts.extend((note_start..note_start + 700).step_by(7));
    for cut in cuts {
        let _ = parse_usdt_probes(&real[..cut.min(real.len())]);
    }
    // Random byte flips in the note section and the headers.
    for _ in 0..2000 {
        let mut b = real.clone();
        for _ in 0..1 + rng.below(8) {
            let at = if rng.below(2) == 0 {
                note_start + rng.below(700.min(real.len() - note_start))
            } else {
                rng.below(64)
            };
            b[at] = rng.next() as u8;
        }
        let _ = parse_usdt_probes(&b);
    }
}

#[test]
fn qemu_usdt_build_matches_readelf() {
    let Some(path) = qemu_usdt() else {
        return;
    };
    let probes = check_against_readelf("qemu_usdt_build_matches_readelf", &path);
    let bytes = std::fs::read(&path).unwrap();
    let symbols = SymbolTable::from_elf_bytes(&bytes).unwrap();
    for which in ["memory_region_ops_read", "memory_region_ops_write"] {
        let sites: Vec<_> = probes
            .iter()
            .filter(|p| p.provider == "qemu" && p.name == which)
            .collect();
        assert!(!sites.is_empty(), "qemu:{which} missing");
        for p in sites {
            let sema = p.semaphore.expect("QEMU's dtrace probes are guarded");
            let sema_off = p.semaphore_file_offset.unwrap();
            eprintln!(
                "qemu:{which} pc {:#x} (file {:#x}) semaphore {sema:#x} (file {sema_off:#x}) \
                 args {}",
                p.pc, p.pc_file_offset, p.raw_args
            );
            // (int cpu_index, void *mr, u64 addr, u64 value, unsigned size, char *name)
            let args = p.parsed_args().unwrap();
            assert_eq!(args.len(), 6, "{}", p.raw_args);
            assert!(args[0].signed && args[0].size == 4, "{}", p.raw_args);
            assert!(
                args.iter()
                    .all(|a| matches!(a.location, UsdtArgLocation::Register { .. })),
                "{}",
                p.raw_args
            );
            // Computed through PT_LOAD: in this build .data's offset != its vaddr.
            assert_eq!(
                Some(sema_off),
                symbols.vaddr_to_file_offset(sema),
                "semaphore offset"
            );
        }
    }
    let failed: Vec<_> = probes.iter().filter(|p| p.args_error.is_some()).collect();
    for p in &failed {
        eprintln!(
            "unparsed: {}:{} {} ({:?})",
            p.provider, p.name, p.raw_args, p.args_error
        );
    }
    assert!(
        failed.is_empty(),
        "{} probes with unparsed args",
        failed.len()
    );
    // Every RIP-relative operand resolves to a symbol.
    let mut rip = 0;
    for p in &probes {
        for a in &p.args {
            if let UsdtArgLocation::RipRelative { symbol, offset } = &a.location {
                rip += 1;
                resolve_rip_relative(&symbols, symbol, *offset, Some(p.pc))
                    .unwrap_or_else(|e| panic!("{}:{} {}: {e:#}", p.provider, p.name, p.raw_args));
            }
        }
    }
    eprintln!(
        "{} probes, {rip} RIP-relative operands resolved",
        probes.len()
    );
}
