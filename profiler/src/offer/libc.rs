//! What a process's C library offers the libc timer source: its wait functions (`ppoll`,
//! `epoll_pwait`, `epoll_pwait2`, dynamic symbols: no debug symbols needed) and, in glibc's
//! code, the jump after each of their syscall instructions, where one probe sees a wait's
//! timeout and result at once. Read once per library file.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use profiler_common::wait_syscall;

use crate::offer::{UprobePoint, elf::SymbolTable};

/// How the libc source probes a process's wait functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LibcProbes {
    /// One uprobe on the jump after each syscall instruction: one trap per wait (needs
    /// `timer:hrtimer_start` for ppoll's timeouts, attached by the caller).
    Result,
    /// A uprobe at entry and a return probe: two traps per wait, any C library.
    EntryReturn,
}

/// The wait functions QEMU sleeps in.
const FUNCTIONS: &[&str] = &["ppoll", "epoll_pwait", "epoll_pwait2"];

/// A file mapped into a process, as `/proc/PID/maps` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedFile {
    /// Start and end of its first mapping (names it under `/proc/PID/map_files/`).
    pub start: u64,
    pub end: u64,
    /// Device (`major:minor`, hex as in maps) and inode: the file's identity.
    pub dev: String,
    pub inode: u64,
    /// The path maps shows (may end in ` (deleted)` after a package upgrade).
    pub path: String,
}

impl MappedFile {
    /// The path that reaches this exact inode from our mount namespace, even when the file
    /// was deleted or lives in a container's root: `/proc/PID/map_files/START-END`.
    pub fn reach(&self, pid: u32) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{pid}/map_files/{:x}-{:x}",
            self.start, self.end
        ))
    }
}

/// Whether a mapped file's name is a C library: glibc's `libc.so.6` (or an old
/// `libc-2.NN.so`), or musl's `libc.so` / `ld-musl-ARCH.so.1` (musl's libc is its loader).
fn is_libc_name(path: &str) -> bool {
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    let base = path.rsplit('/').next().unwrap_or(path);
    base.starts_with("libc.so")
        || (base.starts_with("libc-") && base.ends_with(".so"))
        || base.starts_with("ld-musl-")
}

/// The C library mapped in a process, from its `/proc/PID/maps` text.
pub fn find_libc(maps: &str) -> Option<MappedFile> {
    maps.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (range, _perms, _off, dev, inode) =
            (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
        // The path is the rest of the line (it may contain spaces).
        let path = f.collect::<Vec<_>>().join(" ");
        if !path.starts_with('/') || !is_libc_name(&path) {
            return None;
        }
        let (start, end) = range.split_once('-')?;
        let inode: u64 = inode.parse().ok()?;
        (inode != 0).then_some(())?;
        Some(MappedFile {
            start: u64::from_str_radix(start, 16).ok()?,
            end: u64::from_str_radix(end, 16).ok()?,
            dev: dev.to_string(),
            inode,
            path,
        })
    })
}

/// File offsets of the wait functions in one C library (`None`: not exported, e.g.
/// `epoll_pwait2` before glibc 2.35).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitFunctions {
    /// (function, entry program, file offset), for those found.
    pub found: Vec<(&'static str, u64)>,
    /// Where the result program goes: the file offsets of the jumps right after each syscall
    /// of each function found, with the function's [`wait_syscall`] as the cookie; or why
    /// this library's code is not the pattern ([`result_jumps`]).
    pub results: Result<Vec<UprobePoint>, String>,
}

/// `cmp $-4096,%rax` (glibc's check for an error return) and `cmp $-4095,%rax` (older builds,
/// followed by `jae`).
const CMP_RAX_ERRNO: [[u8; 6]; 2] = [
    [0x48, 0x3d, 0x00, 0xf0, 0xff, 0xff],
    [0x48, 0x3d, 0x01, 0xf0, 0xff, 0xff],
];
const SYSCALL: [u8; 2] = [0x0f, 0x05];

/// Offsets in `code` (one function's bytes) of the conditional jump that follows each
/// `syscall; cmp $-4096,%rax` (or `cmp $-4095,%rax`): there `rax` is the kernel's result and
/// the argument registers what the kernel got, and the kernel emulates a jump without a
/// single-step (a breakpoint on the `cmp` itself needs one, and costs several times as much).
/// Every `0f 05` byte pair in the function must be such a site; otherwise (another
/// compiler's code, musl's shared syscall stub, a pair inside another instruction) the
/// function is refused rather than half-probed: a wait through a site without a probe would
/// go uncounted.
pub fn result_jumps(code: &[u8]) -> Result<Vec<usize>, String> {
    let mut jumps = Vec::new();
    let mut pairs = 0;
    for at in 0..code.len().saturating_sub(1) {
        if code[at..at + 2] != SYSCALL {
            continue;
        }
        pairs += 1;
        let cmp = at + 2;
        let jump = cmp + 6;
        let is_cmp = code
            .get(cmp..jump)
            .is_some_and(|c| CMP_RAX_ERRNO.iter().any(|p| p == c));
        // ja/jae rel8, or ja/jae rel32.
        let is_jump = matches!(
            code.get(jump..),
            Some([0x77 | 0x73, _, ..] | [0x0f, 0x87 | 0x83, _, _, _, _, ..])
        );
        if is_cmp && is_jump {
            jumps.push(jump);
        }
    }
    if pairs == 0 {
        return Err("no syscall instruction in it (a wrapper around another function?)".into());
    }
    if jumps.len() != pairs {
        return Err(format!(
            "{} of its {pairs} syscall sites are not followed by glibc's error check",
            pairs - jumps.len()
        ));
    }
    Ok(jumps)
}

/// The result probe points of the functions `found` in a library with these `symbols`.
fn result_points(
    bytes: &[u8],
    symbols: &SymbolTable,
    found: &[(&'static str, u64)],
) -> Result<Vec<UprobePoint>, String> {
    let mut points = Vec::new();
    for &(function, offset) in found {
        let size = symbols
            .lookup(function)
            .map(|s| s.size)
            .filter(|&s| s > 0)
            .ok_or_else(|| format!("{function}: its symbol has no size"))?;
        let code = usize::try_from(offset)
            .ok()
            .and_then(|start| bytes.get(start..start.checked_add(size as usize)?))
            .ok_or_else(|| format!("{function}: its code is outside the file"))?;
        let cookie = match function {
            "ppoll" => wait_syscall::PPOLL,
            "epoll_pwait" => wait_syscall::EPOLL_PWAIT,
            _ => wait_syscall::EPOLL_PWAIT2,
        };
        for jump in result_jumps(code).map_err(|why| format!("{function}: {why}"))? {
            points.push(UprobePoint {
                file_offset: offset + jump as u64,
                cookie,
            });
        }
    }
    Ok(points)
}

impl WaitFunctions {
    /// Reads them from the library's dynamic symbols. `ppoll` is required: it is where QEMU's
    /// main loop and AioContexts sleep.
    pub fn from_elf_bytes(bytes: &[u8]) -> anyhow::Result<Self> {
        let symbols = SymbolTable::from_elf_bytes(bytes)?;
        let found: Vec<_> = FUNCTIONS
            .iter()
            .filter_map(|&function| {
                let sym = symbols.lookup(function)?;
                let offset = symbols.vaddr_to_file_offset(sym.vaddr)?;
                Some((function, offset))
            })
            .collect();
        anyhow::ensure!(
            found.iter().any(|(f, _)| *f == "ppoll"),
            "it does not export ppoll"
        );
        let results = result_points(bytes, &symbols, &found);
        Ok(Self { found, results })
    }
}

/// What a process's C library offers the libc source, read once per library file.
#[derive(Debug, Default)]
pub struct LibcCatalog {
    by_identity: HashMap<(String, u64), Result<Arc<WaitFunctions>, String>>,
}

/// A process's libc and its wait functions, ready to attach.
#[derive(Debug, Clone)]
pub struct LibcOffer {
    pub libc: MappedFile,
    pub functions: Arc<WaitFunctions>,
}

impl LibcOffer {
    /// Where the result probes go, or why this library has no such sites.
    pub fn result_points(&self) -> anyhow::Result<&[UprobePoint]> {
        self.functions
            .results
            .as_deref()
            .map_err(|why| anyhow::anyhow!("no result sites in {}: {why}", self.libc.path))
    }
}

impl LibcCatalog {
    /// `pid`'s C library and its wait functions, or why the libc source cannot serve it.
    pub fn offer(&mut self, pid: u32) -> Result<LibcOffer, String> {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .map_err(|e| format!("reading /proc/{pid}/maps: {e}"))?;
        self.offer_in(&maps, |libc| std::fs::read(libc.reach(pid)))
    }

    /// The offer of a process whose maps are `maps`; `read` reads its C library. What the
    /// library's ELF says is kept per library file; a failed read is not (the process may
    /// just have exited, and the next QEMU must not lose the source for it).
    fn offer_in(
        &mut self,
        maps: &str,
        read: impl FnOnce(&MappedFile) -> std::io::Result<Vec<u8>>,
    ) -> Result<LibcOffer, String> {
        let libc = find_libc(maps).ok_or_else(|| {
            "no C library mapped (a static QEMU?); its waits are counted by the syscall \
             tracepoints"
                .to_string()
        })?;
        let identity = (libc.dev.clone(), libc.inode);
        let functions = match self.by_identity.get(&identity) {
            Some(known) => known.clone()?,
            None => {
                let bytes = read(&libc).map_err(|e| format!("reading {}: {e}", libc.path))?;
                let parsed = WaitFunctions::from_elf_bytes(&bytes)
                    .map(Arc::new)
                    .map_err(|e| format!("{}: {e:#}", libc.path));
                self.by_identity.insert(identity, parsed.clone());
                parsed?
            }
        };
        Ok(LibcOffer { libc, functions })
    }
}

/// A path that names `libc` for people (the maps path).
pub fn describe(libc: &MappedFile) -> &Path {
    Path::new(&libc.path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c1a00000-55d0c1b00000 r--p 00000000 fe:01 1311 /usr/bin/qemu-system-x86_64
7f3a1c000000-7f3a1c021000 rw-p 00000000 00:00 0 
7f3a2d028000-7f3a2d04e000 r--p 00000000 fe:01 2233 /usr/lib/x86_64-linux-gnu/libc.so.6
7f3a2d04e000-7f3a2d1a3000 r-xp 00026000 fe:01 2233 /usr/lib/x86_64-linux-gnu/libc.so.6
7ffd1c9e0000-7ffd1ca01000 rw-p 00000000 00:00 0                          [stack]
";

    #[test]
    fn finds_glibc_and_names_its_first_mapping() {
        let libc = find_libc(MAPS).unwrap();
        assert_eq!(libc.path, "/usr/lib/x86_64-linux-gnu/libc.so.6");
        assert_eq!((libc.dev.as_str(), libc.inode), ("fe:01", 2233));
        assert_eq!(
            libc.reach(42),
            Path::new("/proc/42/map_files/7f3a2d028000-7f3a2d04e000")
        );
    }

    #[test]
    fn a_failed_read_is_not_remembered_but_what_the_elf_says_is() {
        let mut catalog = LibcCatalog::default();
        let gone = catalog.offer_in(MAPS, |_| {
            Err(std::io::Error::from_raw_os_error(libc::ENOENT))
        });
        assert!(
            gone.unwrap_err()
                .contains("reading /usr/lib/x86_64-linux-gnu/libc.so.6")
        );
        // The next process with the same library is read again; garbage is an ELF verdict,
        // kept: no third read.
        let garbage = catalog.offer_in(MAPS, |_| Ok(b"not an ELF".to_vec()));
        assert!(garbage.is_err());
        let again = catalog.offer_in(MAPS, |_| panic!("read twice"));
        assert_eq!(again.unwrap_err(), garbage.unwrap_err());
    }

    #[test]
    fn libc_names() {
        for yes in [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/lib64/libc-2.17.so",
            "/lib/ld-musl-x86_64.so.1",
            "/usr/lib/libc.so",
            "/usr/lib/x86_64-linux-gnu/libc.so.6 (deleted)",
        ] {
            assert!(is_libc_name(yes), "{yes}");
        }
        for no in [
            "/usr/lib/x86_64-linux-gnu/libcap.so.2",
            "/usr/lib/libcurl.so.4",
            "/usr/bin/qemu-system-x86_64",
            "/usr/lib/x86_64-linux-gnu/libc_malloc_debug.so.0",
        ] {
            assert!(!is_libc_name(no), "{no}");
        }
        // A deleted libc (upgraded under a running QEMU) is still found, by its old path.
        let deleted = MAPS.replace("libc.so.6\n", "libc.so.6 (deleted)\n");
        assert!(find_libc(&deleted).unwrap().path.ends_with("(deleted)"));
        assert_eq!(find_libc("7f-8f r-xp 0 00:00 0 [vdso]\n"), None);
    }

    #[test]
    fn random_maps_never_panic() {
        let mut rng = crate::offer::elf::test_support::Rng(0x11bc);
        let pieces = [
            "7f3a2d028000-7f3a2d04e000",
            "r-xp",
            "00026000",
            "fe:01",
            "2233",
            "/lib/libc.so.6",
            "-",
            " ",
            "\n",
            "zz",
            "0",
            "(deleted)",
        ];
        for _ in 0..5000 {
            let n = rng.below(24);
            let text: String = (0..n).map(|_| pieces[rng.below(pieces.len())]).collect();
            let _ = find_libc(&text);
        }
    }

    /// glibc 2.41's `epoll_pwait`, from its first syscall to the jump after its second (two
    /// sites: the single-threaded one and the cancellable one).
    const EPOLL_PWAIT_BYTES: &[u8] = &[
        0xb8, 0x19, 0x01, 0x00, 0x00, // mov $0x119,%eax
        0x0f, 0x05, // syscall
        0x48, 0x3d, 0x00, 0xf0, 0xff, 0xff, // cmp $-4096,%rax
        0x77, 0x6f, // ja
        0xc3, // ret
        0x8b, 0x7c, 0x24, 0x04, // mov 0x4(%rsp),%edi
        0x0f, 0x05, // syscall
        0x48, 0x3d, 0x00, 0xf0, 0xff, 0xff, // cmp $-4096,%rax
        0x0f, 0x87, 0x32, 0x00, 0x00, 0x00, // ja rel32
        0x89, 0xef, // mov %ebp,%edi
    ];

    #[test]
    fn result_jumps_are_the_jumps_after_each_syscall_check() {
        assert_eq!(result_jumps(EPOLL_PWAIT_BYTES), Ok(vec![13, 28]));
        // Older glibc: cmp $-4095 and jae.
        let old = [
            0x0f, 0x05, 0x48, 0x3d, 0x01, 0xf0, 0xff, 0xff, 0x73, 0x01, 0xc3,
        ];
        assert_eq!(result_jumps(&old), Ok(vec![8]));
        // A site without the check (musl's stub returns rax as is): the function is refused,
        // not half-probed.
        let mut unchecked = EPOLL_PWAIT_BYTES.to_vec();
        unchecked[22] = 0x90;
        assert_eq!(
            result_jumps(&unchecked),
            Err("1 of its 2 syscall sites are not followed by glibc's error check".into())
        );
        // The check cut off by the end of the function.
        assert!(result_jumps(&EPOLL_PWAIT_BYTES[..14]).is_err());
        assert!(result_jumps(&[0xc3]).unwrap_err().contains("no syscall"));
        assert!(result_jumps(&[]).is_err());
    }

    #[test]
    fn random_code_never_panics_and_jumps_stay_inside() {
        let mut rng = crate::offer::elf::test_support::Rng(0x5c);
        let pieces: [&[u8]; 6] = [
            &[0x0f, 0x05],
            &[0x48, 0x3d, 0x00, 0xf0, 0xff, 0xff],
            &[0x77],
            &[0x0f, 0x87],
            &[0xc3],
            &[0x00],
        ];
        for _ in 0..5000 {
            let code: Vec<u8> = (0..rng.below(12))
                .flat_map(|_| pieces[rng.below(pieces.len())].iter().copied())
                .collect();
            if let Ok(jumps) = result_jumps(&code) {
                assert!(jumps.iter().all(|&j| j + 2 <= code.len()), "{code:x?}");
            }
        }
    }

    #[test]
    fn this_machines_libc_exports_the_wait_functions() {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let Some(libc) = find_libc(&maps) else {
            eprintln!("skipped: this test binary maps no C library");
            return;
        };
        let bytes = std::fs::read(libc.path.trim_end_matches(" (deleted)")).unwrap();
        let functions = WaitFunctions::from_elf_bytes(&bytes).unwrap();
        let names: Vec<&str> = functions.found.iter().map(|f| f.0).collect();
        assert!(
            names.contains(&"ppoll") && names.contains(&"epoll_pwait"),
            "{names:?}"
        );
        // Offsets are file offsets inside the library.
        assert!(functions.found.iter().all(|f| (f.1 as usize) < bytes.len()));
        // glibc's wait functions have the result sites, at conditional jumps inside them.
        if libc.path.contains("libc.so.6") {
            let points = functions.results.as_ref().unwrap();
            assert!(points.iter().any(|p| p.cookie == wait_syscall::PPOLL));
            for p in points {
                let at = p.file_offset as usize;
                assert!(matches!(bytes[at], 0x77 | 0x73 | 0x0f), "{p:?}");
                assert_eq!(bytes[at - 8..at - 6], SYSCALL, "{p:?}");
            }
        }
        assert!(WaitFunctions::from_elf_bytes(b"not an elf").is_err());
    }
}
