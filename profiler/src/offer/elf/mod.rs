//! What the probes need to know about a QEMU binary, read from its ELF file without running
//! it: USDT notes (where a uprobe goes, which semaphore to raise, how to read each argument),
//! symbols (uprobe targets, timer-callback names) and separate debug files.
//!
//! Everything here is pure: it takes bytes or paths and never touches a process. Only 64-bit
//! ELF is supported (QEMU hosts are 64-bit); anything else gets a clear error.

pub mod dwarf;
pub mod symbols;
pub mod usdt;

pub use symbols::{
    DebugRoots, DebugSearch, Symbol, SymbolBinding, SymbolKind, SymbolOrigin, SymbolTable,
    file_offset_to_vaddr, find_debug_file, load_symbols, load_symbols_with, search_debug_file,
    vaddr_to_file_offset,
};
pub use usdt::{
    UsdtArg, UsdtArgLocation, UsdtProbe, X86Reg, parse_args, parse_usdt_probes,
    resolve_rip_relative,
};

use std::borrow::Cow;

use anyhow::{Context, bail};
use object::{
    Endianness,
    elf::{self, FileHeader64, SectionHeader64},
    read::elf::{FileHeader, ProgramHeader, SectionHeader, SectionTable},
};

/// One `PT_LOAD` program header: how a range of the file is mapped into memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSegment {
    pub vaddr: u64,
    pub memsz: u64,
    pub offset: u64,
    pub filesz: u64,
    /// `PF_X` / `PF_W` / `PF_R` bits.
    pub flags: u32,
}

impl LoadSegment {
    pub fn is_executable(&self) -> bool {
        self.flags & elf::PF_X != 0
    }

    pub fn is_writable(&self) -> bool {
        self.flags & elf::PF_W != 0
    }

    /// File offset of `vaddr` if it lies in the file-backed part of this segment. The
    /// zero-filled tail (`.bss`, past `p_filesz`) has no file offset a uprobe could name.
    pub fn file_offset_of(&self, vaddr: u64) -> Option<u64> {
        let delta = vaddr.checked_sub(self.vaddr)?;
        (delta < self.filesz).then(|| self.offset.checked_add(delta))?
    }

    /// Link-time virtual address of file offset `offset`, if this segment maps it.
    pub fn vaddr_of(&self, offset: u64) -> Option<u64> {
        let delta = offset.checked_sub(self.offset)?;
        (delta < self.filesz).then(|| self.vaddr.checked_add(delta))?
    }
}

/// Maps a link-time virtual address to a file offset through `segments`.
pub(crate) fn segments_vaddr_to_offset(segments: &[LoadSegment], vaddr: u64) -> Option<u64> {
    segments.iter().find_map(|s| s.file_offset_of(vaddr))
}

/// A parsed 64-bit ELF file: header, section table and load segments.
pub(crate) struct Elf<'data> {
    pub data: &'data [u8],
    pub header: &'data FileHeader64<Endianness>,
    pub endian: Endianness,
    pub sections: SectionTable<'data, FileHeader64<Endianness>>,
    pub segments: Vec<LoadSegment>,
    pub program_headers: &'data [elf::ProgramHeader64<Endianness>],
}

/// Runs `f` on the parsed ELF in `bytes`.
///
/// `object` reads headers in place and insists on their natural alignment; a slice such as
/// `&file[1..]` or an `include_bytes!` blob may not have it, so such input is copied once
/// into a fresh allocation (which the global allocator aligns to at least 8 bytes).
pub(crate) fn with_elf<T>(
    bytes: &[u8],
    f: impl FnOnce(&Elf<'_>) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let data: Cow<'_, [u8]> = if bytes.as_ptr().align_offset(8) == 0 {
        Cow::Borrowed(bytes)
    } else {
        Cow::Owned(bytes.to_vec())
    };
    let elf = Elf::parse(&data)?;
    f(&elf)
}

impl<'data> Elf<'data> {
    fn parse(data: &'data [u8]) -> anyhow::Result<Self> {
        // e_ident: magic[4], class, data, version, ... (16 bytes).
        if data.len() < 16 || data[..4] != elf::ELFMAG {
            bail!("not an ELF file (no \\x7fELF magic)");
        }
        match data[4] {
            elf::ELFCLASS64 => {}
            elf::ELFCLASS32 => bail!("32-bit ELF files are not supported (only ELF64)"),
            other => bail!("unknown ELF class {other}"),
        }
        let header = FileHeader64::<Endianness>::parse(data)
            .map_err(|e| anyhow::anyhow!("malformed ELF header: {e}"))?;
        let endian = header
            .endian()
            .map_err(|e| anyhow::anyhow!("malformed ELF header: {e}"))?;
        let sections = header
            .sections(endian, data)
            .map_err(|e| anyhow::anyhow!("malformed ELF section headers: {e}"))?;
        let program_headers = header
            .program_headers(endian, data)
            .map_err(|e| anyhow::anyhow!("malformed ELF program headers: {e}"))?;
        let segments = program_headers
            .iter()
            .filter(|ph| ph.p_type(endian) == elf::PT_LOAD)
            .map(|ph| LoadSegment {
                vaddr: ph.p_vaddr(endian),
                memsz: ph.p_memsz(endian),
                offset: ph.p_offset(endian),
                filesz: ph.p_filesz(endian),
                flags: ph.p_flags(endian),
            })
            .collect();
        Ok(Self {
            data,
            header,
            endian,
            sections,
            segments,
            program_headers,
        })
    }

    pub fn machine(&self) -> u16 {
        self.header.e_machine(self.endian)
    }

    pub fn section(&self, name: &str) -> Option<&'data SectionHeader64<Endianness>> {
        self.sections
            .section_by_name(self.endian, name.as_bytes())
            .map(|(_, s)| s)
    }

    /// Contents of `section` (empty for `SHT_NOBITS`, as in a `--only-keep-debug` file).
    pub fn section_data(
        &self,
        name: &str,
        section: &SectionHeader64<Endianness>,
    ) -> anyhow::Result<&'data [u8]> {
        section
            .data(self.endian, self.data)
            .map_err(|e| anyhow::anyhow!("section {name} lies outside the file: {e}"))
    }

    pub fn vaddr_to_file_offset(&self, vaddr: u64) -> Option<u64> {
        segments_vaddr_to_offset(&self.segments, vaddr)
    }

    /// The GNU build-id (`NT_GNU_BUILD_ID` in a note section, else in a `PT_NOTE` segment).
    /// Malformed note data yields `None` rather than an error: a build-id only helps find
    /// a debug file, and its absence is a normal outcome.
    pub fn build_id(&self) -> Option<&'data [u8]> {
        let is_build_id = |n: &Note<'data>| n.name == b"GNU" && n.n_type == elf::NT_GNU_BUILD_ID;
        // The build-id note among the notes of one section's or segment's data.
        let build_id_in = |data: Option<&'data [u8]>, align| {
            parse_notes(data?, align, self.endian)
                .ok()?
                .into_iter()
                .find(is_build_id)
        };
        let endian = self.endian;
        let from_sections = self
            .sections
            .iter()
            .filter(|s| s.sh_type(endian) == elf::SHT_NOTE)
            .find_map(|s| build_id_in(s.data(endian, self.data).ok(), s.sh_addralign(endian)));
        let note = from_sections.or_else(|| {
            self.program_headers
                .iter()
                .filter(|p| p.p_type(endian) == elf::PT_NOTE)
                .find_map(|p| build_id_in(p.data(endian, self.data).ok(), p.p_align(endian)))
        })?;
        (!note.desc.is_empty()).then_some(note.desc)
    }

    /// `.gnu_debuglink`: the debug file's name and the CRC-32 of its whole contents.
    pub fn debuglink(&self) -> Option<(&'data [u8], u32)> {
        let section = self.section(".gnu_debuglink")?;
        let data = section.data(self.endian, self.data).ok()?;
        let nul = data.iter().position(|&b| b == 0)?;
        // The name's NUL is followed by padding to a 4-byte boundary, then the CRC.
        let crc_at = (nul + 1).next_multiple_of(4);
        let crc: [u8; 4] = data.get(crc_at..crc_at + 4)?.try_into().ok()?;
        let crc = match self.endian {
            Endianness::Little => u32::from_le_bytes(crc),
            Endianness::Big => u32::from_be_bytes(crc),
        };
        (nul > 0).then_some((&data[..nul], crc))
    }
}

/// One ELF note: owner name (without its NUL), type and descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Note<'a> {
    pub name: &'a [u8],
    pub n_type: u32,
    pub desc: &'a [u8],
    /// Offset of the note header inside the note section, for error messages.
    pub offset: usize,
}

/// Splits a note section into notes. Name and descriptor are padded to 4 bytes (8 when the
/// section is 8-aligned, as `object` and binutils do). Every size is bounds-checked, so
/// garbage yields an error naming the offending offset, never a panic.
pub(crate) fn parse_notes(
    data: &[u8],
    align: u64,
    endian: Endianness,
) -> anyhow::Result<Vec<Note<'_>>> {
    let align: usize = if align == 8 { 8 } else { 4 };
    let read_u32 = |at: usize| -> Option<u32> {
        let b: [u8; 4] = data.get(at..at.checked_add(4)?)?.try_into().ok()?;
        Some(match endian {
            Endianness::Little => u32::from_le_bytes(b),
            Endianness::Big => u32::from_be_bytes(b),
        })
    };
    let mut notes = Vec::new();
    let mut at = 0usize;
    while at < data.len() {
        let header = (read_u32(at), read_u32(at + 4), read_u32(at + 8));
        let (Some(namesz), Some(descsz), Some(n_type)) = header else {
            bail!(
                "note at offset {at:#x}: truncated header ({} bytes left, 12 needed)",
                data.len() - at
            );
        };
        let name_start = at + 12;
        let name_end = name_start
            .checked_add(namesz as usize)
            .filter(|&end| end <= data.len())
            .with_context(|| {
                format!(
                    "note at offset {at:#x}: name size {namesz} runs past the end of the \
                     section ({} bytes)",
                    data.len()
                )
            })?;
        let desc_start = name_start + (namesz as usize).next_multiple_of(align);
        let desc_end = desc_start
            .checked_add(descsz as usize)
            .filter(|&end| end <= data.len())
            .with_context(|| {
                format!(
                    "note at offset {at:#x}: descriptor size {descsz} runs past the end of \
                     the section ({} bytes)",
                    data.len()
                )
            })?;
        let mut name = &data[name_start..name_end];
        if let [rest @ .., 0] = name {
            name = rest;
        }
        notes.push(Note {
            name,
            n_type,
            desc: &data[desc_start..desc_end],
            offset: at,
        });
        // The last note's padding may be cut off by the section end.
        at = desc_start + (descsz as usize).next_multiple_of(align);
    }
    Ok(notes)
}

/// Support shared by the tests of both submodules: building the USDT/symbols fixture from
/// `profiler/tests/fixtures/elf/*.c` with the system C compiler.
#[cfg(test)]
pub(crate) mod test_support {
    use std::{
        path::{Path, PathBuf},
        process::Command,
    };

    pub fn fixtures_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/elf")
    }

    /// `None` after saying what test `test` misses; a failure under `PROFILER_E2E_REQUIRE`
    /// (which `cargo xtask test` sets as root, after its set-up installed everything).
    pub fn missing<T>(test: &str, why: &str) -> Option<T> {
        xtask::prereq::Prereq::new(test).missing(why)
    }

    /// `Some` when `tool` runs; else [`missing`], naming the Debian package with it.
    pub fn need_tool(test: &str, tool: &str, package: &str) -> Option<()> {
        if have_tool(tool) {
            Some(())
        } else {
            missing(
                test,
                &format!(
                    "{tool} is not installed (Debian package {package}; `cargo xtask setup` \
                     installs it)"
                ),
            )
        }
    }

    /// Compiles the two-file USDT demo into `out` with `cc -O2 -g` plus `extra` flags.
    /// Returns `None` (after saying why; a failure under `PROFILER_E2E_REQUIRE`) when no C
    /// compiler or `<sys/sdt.h>` is installed.
    pub fn build_demo(test: &str, out: &Path, extra: &[&str]) -> Option<PathBuf> {
        need_tool(test, "cc", "build-essential")?;
        let dir = fixtures_dir();
        let o = Command::new("cc")
            .args(["-O2", "-g", "-o"])
            .arg(out)
            .arg(dir.join("usdt_demo_main.c"))
            .arg(dir.join("usdt_demo_sema.c"))
            .args(extra)
            .output()
            .expect("cc runs");
        let stderr = String::from_utf8_lossy(&o.stderr);
        if o.status.success() {
            Some(out.to_path_buf())
        } else if stderr.contains("sys/sdt.h") {
            missing(
                test,
                &format!(
                    "cannot build the USDT fixture: no <sys/sdt.h> (Debian package \
                     systemtap-sdt-dev; `cargo xtask setup` installs it): {stderr}"
                ),
            )
        } else {
            panic!("cc {extra:?} failed to build the USDT fixture: {stderr}");
        }
    }

    /// Debian's python3 (built with USDT notes): the real binary behind `/usr/bin/python3`
    /// (`python3.11` in bookworm; not a `python3` earlier on `PATH`, such as a pyenv shim),
    /// or `None` after saying why (a failure under `PROFILER_E2E_REQUIRE`).
    pub fn python3(test: &str) -> Option<PathBuf> {
        match std::fs::canonicalize("/usr/bin/python3") {
            Ok(path) => Some(path),
            Err(e) => missing(
                test,
                &format!(
                    "no /usr/bin/python3 ({e}): Debian package python3, one of QEMU's build \
                     dependencies that `cargo xtask qemu-usdt` installs"
                ),
            ),
        }
    }

    /// The C++ runtime (`libstdc++.so.6`, which has USDT notes), or `None` after saying why
    /// (a failure under `PROFILER_E2E_REQUIRE`).
    pub fn libstdcxx(test: &str) -> Option<PathBuf> {
        let found = [
            "/usr/lib/x86_64-linux-gnu",
            "/lib/x86_64-linux-gnu",
            "/usr/lib64",
            "/usr/lib",
        ]
        .iter()
        .map(|d| Path::new(d).join("libstdc++.so.6"))
        .find(|p| p.exists());
        found.or_else(|| {
            missing(
                test,
                "libstdc++.so.6 is not installed (Debian package libstdc++6, which \
                 build-essential brings; `cargo xtask setup` installs it)",
            )
        })
    }

    /// The C library this test process runs with: the `libc.so*` file `/proc/self/maps`
    /// names.
    pub fn own_libc() -> PathBuf {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let path = maps
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .find(|p| {
                p.rsplit('/')
                    .next()
                    .is_some_and(|f| f.starts_with("libc.so"))
            })
            .expect("a C library is mapped");
        PathBuf::from(path)
    }

    /// Runs a tool (objcopy, strip, readelf) and panics with its stderr on failure.
    pub fn run(tool: &str, args: &[&std::ffi::OsStr]) -> String {
        let out = Command::new(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn have_tool(tool: &str) -> bool {
        Command::new(tool).arg("--version").output().is_ok()
    }

    /// A tiny deterministic PRNG (xorshift64*) for garbage-input tests.
    pub struct Rng(pub u64);

    impl Rng {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        pub fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(name: &[u8], n_type: u32, desc: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32).to_le_bytes());
        v.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        v.extend_from_slice(&n_type.to_le_bytes());
        v.extend_from_slice(name);
        v.resize(v.len().next_multiple_of(4), 0);
        v.extend_from_slice(desc);
        v.resize(v.len().next_multiple_of(4), 0);
        v
    }

    #[test]
    fn notes_split_and_pad() {
        let mut data = note(b"GNU\0", 3, &[1, 2, 3, 4, 5]);
        data.extend(note(b"stapsdt\0", 3, b"abc"));
        let notes = parse_notes(&data, 4, Endianness::Little).unwrap();
        assert_eq!(notes.len(), 2);
        assert_eq!(notes[0].name, b"GNU");
        assert_eq!(notes[0].desc, &[1, 2, 3, 4, 5]);
        assert_eq!(notes[1].name, b"stapsdt");
        assert_eq!(notes[1].desc, b"abc");
        assert_eq!(notes[1].offset, 24);
    }

    #[test]
    fn notes_reject_truncation_and_huge_sizes() {
        let data = note(b"GNU\0", 3, &[1, 2, 3, 4]);
        for cut in 1..data.len() - 1 {
            // Cutting into padding of the last note is fine; cutting into content is not.
            let r = parse_notes(&data[..cut], 4, Endianness::Little);
            if cut < 20 {
                assert!(r.is_err(), "cut at {cut} accepted");
            }
        }
        let mut huge = data.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = parse_notes(&huge, 4, Endianness::Little).unwrap_err();
        assert!(err.to_string().contains("descriptor size"), "{err}");
        let mut huge = data;
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = parse_notes(&huge, 4, Endianness::Little).unwrap_err();
        assert!(err.to_string().contains("name size"), "{err}");
    }

    #[test]
    fn non_elf_and_32_bit_are_clear_errors() {
        let err = with_elf(b"hello", |_| Ok(())).unwrap_err();
        assert!(err.to_string().contains("not an ELF"), "{err}");
        let mut ident = vec![0x7f, b'E', b'L', b'F', 1, 1, 1];
        ident.resize(64, 0);
        let err = with_elf(&ident, |_| Ok(())).unwrap_err();
        assert!(err.to_string().contains("32-bit"), "{err}");
    }

    #[test]
    fn unaligned_input_is_accepted() {
        let bytes = std::fs::read("/bin/ls").expect("/bin/ls exists");
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(&bytes);
        let a = with_elf(&bytes, |e| Ok(e.segments.clone())).unwrap();
        let b = with_elf(&shifted[1..], |e| Ok(e.segments.clone())).unwrap();
        assert_eq!(a, b);
        assert!(!a.is_empty());
    }
}

/// The `PT_LOAD` segments of an ELF file (to map file offsets to link-time addresses).
pub fn load_segments(elf_bytes: &[u8]) -> anyhow::Result<Vec<LoadSegment>> {
    with_elf(elf_bytes, |elf| Ok(elf.segments.clone()))
}
