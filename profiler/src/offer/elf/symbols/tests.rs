use std::{ffi::OsStr, fs, path::Path};

use super::*;
use crate::offer::elf::test_support::{Rng, build_demo, need_tool, own_libc, run};

#[test]
fn crc32_known_vectors() {
    assert_eq!(crc32(b""), 0);
    assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    assert_eq!(
        crc32(b"The quick brown fox jumps over the lazy dog"),
        0x414f_a339
    );
}

#[test]
fn stripped_ls_has_dynsym_build_id_and_no_debug_file() {
    let ls = Path::new("/bin/ls");
    let empty = tempfile::tempdir().unwrap();
    let table = load_symbols_with(ls, &DebugRoots::at(empty.path())).unwrap();
    let SymbolOrigin::DynsymOnly { reason } = table.source() else {
        panic!("/bin/ls should be stripped: {:?}", table.source());
    };
    // It has a build-id, so the build-id path was tried and named in the reason.
    crate::testing::assert_contains(reason, ".build-id");
    crate::testing::assert_contains(reason, "absent");
    let begin = table.lookup("_obstack_begin").expect("exported by ls");
    assert_eq!(begin.kind, SymbolKind::Function);
    assert_eq!(
        table.symbolize(begin.vaddr + 3),
        Some(("_obstack_begin", 3))
    );
    // Undefined imports are not symbols of ls.
    assert!(table.lookup("malloc").is_none());
    let search = search_debug_file(ls, &DebugRoots::at(empty.path())).unwrap();
    assert_eq!(search.found, None);
    assert_eq!(find_debug_file(ls, &DebugRoots::at(empty.path())), None);
}

#[test]
fn libc_dynsym_versions_and_symbolize() {
    // The C library this test runs with (glibc: the versions are its).
    let libc = own_libc();
    if need_tool("libc_dynsym_versions_and_symbolize", "readelf", "binutils").is_none() {
        return;
    }
    let bytes = fs::read(&libc).unwrap();
    let table = SymbolTable::from_elf_bytes(&bytes).unwrap();
    // Compare a few with readelf: default versions win over hidden ones.
    let readelf = run(
        "readelf",
        &[OsStr::new("-W"), OsStr::new("--dyn-syms"), libc.as_os_str()],
    );
    for name in ["realpath", "memcpy", "malloc", "__libc_malloc"] {
        let want = readelf
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| {
                f.len() >= 8
                    && f[6] != "UND"
                    && (f[7] == name || f[7].starts_with(&format!("{name}@@")))
            })
            .unwrap_or_else(|| panic!("readelf has no default {name}"));
        let sym = table.lookup(name).unwrap_or_else(|| panic!("{name}"));
        assert_eq!(
            sym.vaddr,
            u64::from_str_radix(want[1], 16).unwrap(),
            "{name}"
        );
        assert_eq!(sym.size, want[2].parse::<u64>().unwrap(), "{name}");
        assert_eq!(sym.kind, SymbolKind::Function);
        assert!(!sym.hidden_version);
    }
    assert_eq!(table.lookup_all("realpath").len(), 2);
    let malloc = table.lookup("malloc").unwrap();
    let (name, offset) = table.symbolize(malloc.vaddr + 5).unwrap();
    assert_eq!(offset, 5);
    assert_eq!(table.lookup(name).unwrap().vaddr, malloc.vaddr, "{name}");
    // Symbol address → file offset → back.
    let off = vaddr_to_file_offset(&bytes, malloc.vaddr).unwrap();
    assert_eq!(table.vaddr_to_file_offset(malloc.vaddr), Some(off));
    assert_eq!(file_offset_to_vaddr(&bytes, off).unwrap(), malloc.vaddr);
    assert_eq!(table.file_offset_to_vaddr(off), Some(malloc.vaddr));
    let err = vaddr_to_file_offset(&bytes, 0xffff_ffff_0000).unwrap_err();
    assert!(err.to_string().contains("PT_LOAD"), "{err}");
}

#[test]
fn unstripped_fixture_symbols() {
    let dir = tempfile::tempdir().unwrap();
    let Some(demo) = build_demo("unstripped_fixture_symbols", &dir.path().join("demo"), &[]) else {
        return;
    };
    let table = load_symbols_with(&demo, &DebugRoots::at(dir.path())).unwrap();
    assert_eq!(table.source(), &SymbolOrigin::Symtab);
    let global = table.lookup("demo_global_fn").unwrap();
    assert_eq!(global.binding, SymbolBinding::Global);
    assert_eq!(global.file, None);
    let local = table.lookup("demo_static_fn").unwrap();
    assert_eq!(local.binding, SymbolBinding::Local);
    assert_eq!(local.file.as_deref(), Some("usdt_demo_main.c"));
    assert!(local.size > 0);
    assert_eq!(
        table.symbolize(local.vaddr + local.size - 1),
        Some(("demo_static_fn", local.size - 1))
    );
    assert_eq!(
        table
            .containing_function(local.vaddr)
            .map(|s| s.name.as_str()),
        Some("demo_static_fn")
    );
    let table_obj = table.lookup("table").unwrap();
    assert_eq!(table_obj.kind, SymbolKind::Object);
    assert_eq!(table.symbolize(table_obj.vaddr + 8), Some(("table", 8)));
    assert!(table.symbolize(0).is_none());
}

/// Builds the fixture, splits it into a stripped binary and a debug file, and returns
/// (binary, debug file); `None` after saying what test `test` misses (a failure under
/// `PROFILER_E2E_REQUIRE`).
fn split_fixture(test: &str, dir: &Path, name: &str, extra: &[&str]) -> Option<(PathBuf, PathBuf)> {
    need_tool(test, "objcopy", "binutils")?;
    need_tool(test, "strip", "binutils")?;
    let bin = build_demo(test, &dir.join(name), extra)?;
    let debug = dir.join(format!("{name}.debug"));
    let os = |p: &Path| p.as_os_str().to_os_string();
    run(
        "objcopy",
        &[OsStr::new("--only-keep-debug"), &os(&bin), &os(&debug)],
    );
    run(
        "strip",
        &[
            OsStr::new("--strip-debug"),
            OsStr::new("--strip-unneeded"),
            &os(&bin),
        ],
    );
    let link = format!("--add-gnu-debuglink={}", debug.display());
    run("objcopy", &[OsStr::new(&link), &os(&bin)]);
    Some((bin, debug))
}

fn build_id_of(path: &Path) -> String {
    let bytes = fs::read(path).unwrap();
    with_elf(&bytes, |e| Ok(hex(e.build_id().expect("build-id")))).unwrap()
}

fn place_in_build_id_tree(root: &Path, id: &str, debug: &Path) -> PathBuf {
    let dest = root
        .join(".build-id")
        .join(&id[..2])
        .join(format!("{}.debug", &id[2..]));
    fs::create_dir_all(dest.parent().unwrap()).unwrap();
    fs::copy(debug, &dest).unwrap();
    dest
}

#[test]
fn stripped_binary_resolves_through_build_id_tree() {
    let work = tempfile::tempdir().unwrap();
    let bins = work.path().join("bin");
    let root = work.path().join("debugroot");
    fs::create_dir_all(&bins).unwrap();
    let test = "stripped_binary_resolves_through_build_id_tree";
    let Some((bin, debug)) = split_fixture(test, &bins, "demo", &[]) else {
        return;
    };
    // The debug file must not be found next to the binary for this test.
    let id = build_id_of(&bin);
    assert_eq!(build_id_of(&debug), id);
    let moved = place_in_build_id_tree(&root, &id, &debug);
    fs::remove_file(&debug).unwrap();

    // Stripped: only .dynsym on its own.
    let own = SymbolTable::from_elf_bytes(&fs::read(&bin).unwrap()).unwrap();
    assert!(own.lookup("demo_static_fn").is_none());

    let roots = DebugRoots::at(&root);
    assert_eq!(find_debug_file(&bin, &roots), Some(moved.clone()));
    let table = load_symbols_with(&bin, &roots).unwrap();
    assert_eq!(table.source(), &SymbolOrigin::DebugFile(moved));
    let f = table.lookup("demo_static_fn").expect("from the debug file");
    assert_eq!(f.file.as_deref(), Some("usdt_demo_main.c"));
    assert_eq!(table.symbolize(f.vaddr + 1), Some(("demo_static_fn", 1)));
    // File offsets come from the stripped binary's own segments.
    assert_eq!(
        table.vaddr_to_file_offset(f.vaddr),
        Some(vaddr_to_file_offset(&fs::read(&bin).unwrap(), f.vaddr).unwrap())
    );
}

#[test]
fn mismatching_build_id_is_rejected() {
    let work = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (work.path().join("a"), work.path().join("b"));
    let root = work.path().join("debugroot");
    fs::create_dir_all(&a_dir).unwrap();
    fs::create_dir_all(&b_dir).unwrap();
    let test = "mismatching_build_id_is_rejected";
    let Some((bin, debug)) = split_fixture(test, &a_dir, "demo", &[]) else {
        return;
    };
    // Another build (different code, so a different build-id) of the same program.
    let Some((_, other_debug)) = split_fixture(test, &b_dir, "demo", &["-DDEMO_VARIANT=1"]) else {
        return;
    };
    let id = build_id_of(&bin);
    assert_ne!(build_id_of(&other_debug), id, "variant must differ");
    // The wrong file sits at the right build-id path, and under the debuglink name.
    place_in_build_id_tree(&root, &id, &other_debug);
    fs::copy(&other_debug, &debug).unwrap();

    let roots = DebugRoots::at(&root);
    let search = search_debug_file(&bin, &roots).unwrap();
    assert_eq!(search.found, None, "{search:?}");
    let mismatches = search
        .rejected
        .iter()
        .filter(|(_, why)| why.contains("build-id mismatch"))
        .count();
    assert_eq!(mismatches, 2, "{search:?}");
    let table = load_symbols_with(&bin, &roots).unwrap();
    let SymbolOrigin::DynsymOnly { reason } = table.source() else {
        panic!("{:?}", table.source());
    };
    crate::testing::assert_contains(reason, "build-id mismatch");
    assert!(table.lookup("demo_static_fn").is_none());
}

#[test]
fn debuglink_without_build_id_checks_crc() {
    let work = tempfile::tempdir().unwrap();
    let bins = work.path().join("usr/bin");
    fs::create_dir_all(&bins).unwrap();
    let test = "debuglink_without_build_id_checks_crc";
    let Some((bin, debug)) = split_fixture(test, &bins, "demo", &["-Wl,--build-id=none"]) else {
        return;
    };
    let empty = work.path().join("empty-root");
    let roots = DebugRoots::at(&empty);
    // 1. Next to the binary.
    assert_eq!(find_debug_file(&bin, &roots), Some(debug.clone()));
    // 2. In `.debug/` next to it.
    let dot_debug = bins.join(".debug");
    fs::create_dir_all(&dot_debug).unwrap();
    let in_dot = dot_debug.join("demo.debug");
    fs::rename(&debug, &in_dot).unwrap();
    assert_eq!(find_debug_file(&bin, &roots), Some(in_dot.clone()));
    // 3. Under the global root, at the binary's directory (Fedora/Debian layout).
    let real_dir = fs::canonicalize(&bins).unwrap();
    let global = empty.join(real_dir.strip_prefix("/").unwrap());
    fs::create_dir_all(&global).unwrap();
    let in_global = global.join("demo.debug");
    fs::rename(&in_dot, &in_global).unwrap();
    assert_eq!(find_debug_file(&bin, &roots), Some(in_global.clone()));
    let table = load_symbols_with(&bin, &roots).unwrap();
    assert!(table.lookup("demo_static_fn").is_some());
    // A corrupted copy fails the CRC.
    let mut bytes = fs::read(&in_global).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&in_global, &bytes).unwrap();
    let search = search_debug_file(&bin, &roots).unwrap();
    assert_eq!(search.found, None);
    assert!(
        search
            .rejected
            .iter()
            .any(|(_, why)| why.contains("CRC mismatch")),
        "{search:?}"
    );
}

#[test]
fn qemu_usdt_build_symbols() {
    let Some(qemu) = xtask::prereq::Prereq::new("qemu_usdt_build_symbols").usdt_qemu() else {
        return;
    };
    let table = load_symbols(&qemu).unwrap();
    assert_eq!(table.source(), &SymbolOrigin::Symtab);
    for name in [
        "memory_region_dispatch_read",
        "memory_region_dispatch_write",
        "uhci_frame_timer",
        "timer_mod_ns",
    ] {
        let sym = table
            .lookup(name)
            .unwrap_or_else(|| panic!("{name} not found"));
        assert_eq!(sym.kind, SymbolKind::Function, "{name}");
        assert_eq!(table.symbolize(sym.vaddr), Some((name, 0)));
        assert_eq!(table.symbolize(sym.vaddr + 1), Some((name, 1)));
        let off = table.vaddr_to_file_offset(sym.vaddr).unwrap();
        eprintln!(
            "{name}: vaddr {:#x} size {} file offset {off:#x}",
            sym.vaddr, sym.size
        );
    }
}

#[test]
fn garbage_never_panics() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for len in [0, 3, 64, 100, 1000] {
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        assert!(SymbolTable::from_elf_bytes(&bytes).is_err());
        if len >= 64 {
            bytes[..7].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1]);
            let _ = SymbolTable::from_elf_bytes(&bytes);
        }
    }
    let real = fs::read("/bin/ls").unwrap();
    for i in 0..64 {
        let _ = SymbolTable::from_elf_bytes(&real[..i * real.len() / 64]);
    }
    for _ in 0..500 {
        let mut b = real.clone();
        for _ in 0..1 + rng.below(16) {
            let at = rng.below(b.len());
            b[at] = rng.next() as u8;
        }
        if let Ok(t) = SymbolTable::from_elf_bytes(&b) {
            let _ = t.symbolize(rng.next() % 0x40000);
        }
        let _ = with_elf(&b, |e| {
            Ok((e.build_id().is_some(), e.debuglink().is_some()))
        });
    }
}
