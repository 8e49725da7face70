//! Function and object symbols of a binary, from its own `.symtab`/`.dynsym` or from a
//! separate debug file, and the search for that debug file (GNU build-id and
//! `.gnu_debuglink`, as gdb does).
//!
//! Uses: uprobe targets by name (`memory_region_dispatch_read`, `timer_mod_ns`), names for
//! timer-callback addresses read from `QEMUTimer.cb`, and the addresses of the statics
//! that RIP-relative USDT arguments read.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context;
use object::{
    elf,
    read::elf::{SectionHeader as _, Sym as _},
};

use super::{Elf, LoadSegment, segments_vaddr_to_offset, with_elf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SymbolKind {
    /// `STT_FUNC` or `STT_GNU_IFUNC`.
    Function,
    /// `STT_OBJECT`.
    Object,
}

/// Ordered by preference when several definitions share a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SymbolBinding {
    Global,
    Weak,
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    pub name: String,
    /// Link-time virtual address.
    pub vaddr: u64,
    pub size: u64,
    pub kind: SymbolKind,
    pub binding: SymbolBinding,
    /// Source file of a local symbol (the preceding `STT_FILE` in `.symtab`); tells apart
    /// same-named statics such as `seq_iter.6`.
    pub file: Option<Arc<str>>,
    /// A non-default symbol version (`realpath@GLIBC_2.2.5` next to `realpath@@GLIBC_2.3`):
    /// `.dynsym` gives both the same name, and lookups prefer the default one.
    pub hidden_version: bool,
}

impl Symbol {
    fn contains(&self, vaddr: u64) -> bool {
        vaddr == self.vaddr || vaddr.wrapping_sub(self.vaddr) < self.size
    }

    /// Lookup preference: global over weak over local, default version over hidden.
    fn rank(&self) -> (SymbolBinding, bool) {
        (self.binding, self.hidden_version)
    }
}

/// Where a [`SymbolTable`]'s symbols came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SymbolOrigin {
    /// The binary's own `.symtab` (unstripped), plus `.dynsym`.
    Symtab,
    /// A separate debug file's `.symtab`, plus the binary's `.dynsym`.
    DebugFile(PathBuf),
    /// Only `.dynsym` (exported symbols): stripped and no debug file found. `reason` says
    /// where the debug file was looked for.
    DynsymOnly { reason: String },
}

impl fmt::Display for SymbolOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SymbolOrigin::Symtab => write!(f, "from the binary's .symtab"),
            SymbolOrigin::DebugFile(p) => write!(f, "from debug file {}", p.display()),
            SymbolOrigin::DynsymOnly { reason } => {
                write!(f, "exported symbols only: {reason}")
            }
        }
    }
}

/// Function and object symbols by name and by address.
#[derive(Debug, Clone)]
pub struct SymbolTable {
    /// Sorted by address.
    symbols: Vec<Symbol>,
    by_name: HashMap<String, Vec<usize>>,
    /// Largest symbol size: bounds the backwards scan in address lookups.
    max_size: u64,
    segments: Vec<LoadSegment>,
    source: SymbolOrigin,
}

impl SymbolTable {
    /// The symbols in one ELF file's own `.symtab` and `.dynsym` (no debug-file search).
    pub fn from_elf_bytes(bytes: &[u8]) -> anyhow::Result<Self> {
        with_elf(bytes, |elf| {
            let mut symbols = read_symbols(elf, elf::SHT_SYMTAB)?;
            let source = if symbols.iter().any(|s| s.kind == SymbolKind::Function) {
                SymbolOrigin::Symtab
            } else {
                SymbolOrigin::DynsymOnly {
                    reason: "no .symtab (debug-file search not attempted)".into(),
                }
            };
            symbols.extend(read_symbols(elf, elf::SHT_DYNSYM)?);
            Ok(Self::new(symbols, elf.segments.clone(), source))
        })
    }

    fn new(mut symbols: Vec<Symbol>, segments: Vec<LoadSegment>, source: SymbolOrigin) -> Self {
        // `.symtab` comes first, so dedup keeps its copy (the one with a file for locals).
        let mut seen = HashSet::new();
        symbols.retain(|s| seen.insert((s.name.clone(), s.vaddr, s.hidden_version)));
        symbols.sort_by(|a, b| {
            (a.vaddr, a.kind, a.rank(), &a.name).cmp(&(b.vaddr, b.kind, b.rank(), &b.name))
        });
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, s) in symbols.iter().enumerate() {
            by_name.entry(s.name.clone()).or_default().push(i);
        }
        let max_size = symbols.iter().map(|s| s.size).max().unwrap_or(0);
        Self {
            symbols,
            by_name,
            max_size,
            segments,
            source,
        }
    }

    pub fn source(&self) -> &SymbolOrigin {
        &self.source
    }

    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// All symbols, by address.
    pub fn iter(&self) -> impl Iterator<Item = &Symbol> {
        self.symbols.iter()
    }

    /// The binary's `PT_LOAD` segments (for runtime-address ↔ vaddr conversions).
    pub fn segments(&self) -> &[LoadSegment] {
        &self.segments
    }

    /// Every definition named `name`.
    pub fn lookup_all(&self, name: &str) -> Vec<&Symbol> {
        self.by_name
            .get(name)
            .map(|ids| ids.iter().map(|&i| &self.symbols[i]).collect())
            .unwrap_or_default()
    }

    /// The definition of `name`: the best-ranked one (global, then weak, then local; default
    /// version before hidden), provided that rank has a single address. Same-named statics
    /// at different addresses give `None` rather than a guess (see [`Self::lookup_all`]):
    /// a uprobe on the wrong function would count the wrong thing silently.
    pub fn lookup(&self, name: &str) -> Option<&Symbol> {
        let all = self.lookup_all(name);
        let best = all.iter().map(|s| s.rank()).min()?;
        let mut top = all.into_iter().filter(|s| s.rank() == best);
        let first = top.next()?;
        top.all(|s| s.vaddr == first.vaddr).then_some(first)
    }

    /// The symbol containing `vaddr` and the offset into it, e.g. a timer callback address
    /// (converted to a link-time vaddr) → `("uhci_frame_timer", 0)`.
    pub fn symbolize(&self, vaddr: u64) -> Option<(&str, u64)> {
        self.containing(vaddr, |_| true)
            .map(|s| (s.name.as_str(), vaddr - s.vaddr))
    }

    /// The function containing `vaddr`.
    pub fn containing_function(&self, vaddr: u64) -> Option<&Symbol> {
        self.containing(vaddr, |s| s.kind == SymbolKind::Function)
    }

    /// The tightest symbol containing `vaddr` (sized before zero-sized, then by rank).
    fn containing(&self, vaddr: u64, filter: impl Fn(&Symbol) -> bool) -> Option<&Symbol> {
        let end = self.symbols.partition_point(|s| s.vaddr <= vaddr);
        self.symbols[..end]
            .iter()
            .rev()
            .take_while(|s| vaddr - s.vaddr <= self.max_size)
            .filter(|s| filter(s) && s.contains(vaddr))
            .min_by_key(|s| (s.size == 0, s.size, s.kind, s.rank(), &s.name))
    }

    /// File offset of a link-time vaddr (uprobe attach offset).
    pub fn vaddr_to_file_offset(&self, vaddr: u64) -> Option<u64> {
        segments_vaddr_to_offset(&self.segments, vaddr)
    }

    /// Link-time vaddr of a file offset; with `/proc/PID/maps` (runtime address − mapping
    /// start + mapping offset = file offset) this turns runtime addresses into vaddrs.
    pub fn file_offset_to_vaddr(&self, offset: u64) -> Option<u64> {
        self.segments.iter().find_map(|s| s.vaddr_of(offset))
    }
}

/// Defined function and object symbols of one symbol table (`SHT_SYMTAB` or `SHT_DYNSYM`).
fn read_symbols(elf: &Elf<'_>, sh_type: u32) -> anyhow::Result<Vec<Symbol>> {
    let what = if sh_type == elf::SHT_SYMTAB {
        ".symtab"
    } else {
        ".dynsym"
    };
    let table = elf
        .sections
        .symbols(elf.endian, elf.data, sh_type)
        .map_err(|e| anyhow::anyhow!("malformed {what}: {e}"))?;
    let strings = table.strings();
    // `.gnu.version` parallels `.dynsym`; bit 15 marks a hidden (non-default) version.
    let versym: &[u8] = if sh_type == elf::SHT_DYNSYM {
        elf.sections
            .iter()
            .find(|s| s.sh_type(elf.endian) == elf::SHT_GNU_VERSYM)
            .and_then(|s| s.data(elf.endian, elf.data).ok())
            .unwrap_or_default()
    } else {
        &[]
    };
    let hidden = |index: usize| -> bool {
        let Some(b) = versym.get(index * 2..index * 2 + 2) else {
            return false;
        };
        let v = match elf.endian {
            object::Endianness::Little => u16::from_le_bytes([b[0], b[1]]),
            object::Endianness::Big => u16::from_be_bytes([b[0], b[1]]),
        };
        v & elf::VERSYM_HIDDEN != 0
    };

    let mut file: Option<Arc<str>> = None;
    let mut out = Vec::new();
    for (index, sym) in table.enumerate() {
        let st_type = sym.st_type();
        if st_type == elf::STT_FILE {
            let name = sym.name(elf.endian, strings).unwrap_or_default();
            file = (!name.is_empty()).then(|| String::from_utf8_lossy(name).into());
            continue;
        }
        let kind = match st_type {
            elf::STT_FUNC | elf::STT_GNU_IFUNC => SymbolKind::Function,
            elf::STT_OBJECT => SymbolKind::Object,
            _ => continue,
        };
        let shndx = sym.st_shndx(elf.endian);
        if shndx == elf::SHN_UNDEF || shndx == elf::SHN_ABS {
            continue;
        }
        let Ok(name) = sym.name(elf.endian, strings) else {
            continue;
        };
        if name.is_empty() {
            continue;
        }
        let binding = match sym.st_bind() {
            elf::STB_LOCAL => SymbolBinding::Local,
            elf::STB_WEAK => SymbolBinding::Weak,
            _ => SymbolBinding::Global,
        };
        out.push(Symbol {
            name: String::from_utf8_lossy(name).into_owned(),
            vaddr: sym.st_value(elf.endian),
            size: sym.st_size(elf.endian),
            kind,
            binding,
            file: (binding == SymbolBinding::Local)
                .then(|| file.clone())
                .flatten(),
            hidden_version: hidden(index.0),
        });
    }
    Ok(out)
}

/// File offset of link-time `vaddr` in the ELF file `elf_bytes`, through its `PT_LOAD`
/// program headers (`vaddr - p_vaddr + p_offset`).
pub fn vaddr_to_file_offset(elf_bytes: &[u8], vaddr: u64) -> anyhow::Result<u64> {
    with_elf(elf_bytes, |elf| {
        elf.vaddr_to_file_offset(vaddr).with_context(|| {
            format!("address {vaddr:#x} is not in any file-backed PT_LOAD segment")
        })
    })
}

/// Link-time vaddr of file offset `offset` in the ELF file `elf_bytes`.
pub fn file_offset_to_vaddr(elf_bytes: &[u8], offset: u64) -> anyhow::Result<u64> {
    with_elf(elf_bytes, |elf| {
        elf.segments
            .iter()
            .find_map(|s| s.vaddr_of(offset))
            .with_context(|| format!("file offset {offset:#x} is not in any PT_LOAD segment"))
    })
}

/// Where separate debug files are looked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebugRoots {
    /// Global debug directories (normally `/usr/lib/debug`): searched for
    /// `.build-id/NN/REST.debug` and for `<binary's dir>/<debuglink name>` beneath them.
    /// Debian `-dbgsym` and Fedora `-debuginfo` packages both install there.
    pub debug_dirs: Vec<PathBuf>,
    /// A debuginfod client cache (`<cache>/<build-id>/debuginfo`); never downloads.
    pub debuginfod_cache: Option<PathBuf>,
}

impl DebugRoots {
    /// `/usr/lib/debug`, and the debuginfod cache (`$DEBUGINFOD_CACHE_PATH`, else
    /// `$XDG_CACHE_HOME/debuginfod_client`, else `~/.cache/debuginfod_client`).
    pub fn system() -> Self {
        let env = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let debuginfod_cache = env("DEBUGINFOD_CACHE_PATH")
            .or_else(|| env("XDG_CACHE_HOME").map(|c| c.join("debuginfod_client")))
            .or_else(|| env("HOME").map(|h| h.join(".cache/debuginfod_client")));
        Self {
            debug_dirs: vec![PathBuf::from("/usr/lib/debug")],
            debuginfod_cache,
        }
    }

    /// Only `dir` as the global debug directory (tests, or a sysroot's).
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self {
            debug_dirs: vec![dir.into()],
            debuginfod_cache: None,
        }
    }
}

impl Default for DebugRoots {
    fn default() -> Self {
        Self::system()
    }
}

/// Outcome of a debug-file search: the file found, and every candidate looked at with the
/// reason it was not used (so "no symbols" can be explained to the user).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DebugSearch {
    pub found: Option<PathBuf>,
    pub rejected: Vec<(PathBuf, String)>,
}

impl DebugSearch {
    /// One line: "looked for X (absent), Y (build-id mismatch)".
    pub fn summary(&self) -> String {
        if self.rejected.is_empty() {
            return "no build-id or .gnu_debuglink to look for a debug file by".into();
        }
        let tried: Vec<String> = self
            .rejected
            .iter()
            .map(|(p, why)| format!("{} ({why})", p.display()))
            .collect();
        format!("no debug file: {}", tried.join(", "))
    }
}

/// The verified separate debug file of `binary`, if one is installed.
pub fn find_debug_file(binary: &Path, roots: &DebugRoots) -> Option<PathBuf> {
    search_debug_file(binary, roots).ok()?.found
}

/// Looks for `binary`'s debug file; errors only when `binary` itself is unreadable.
pub fn search_debug_file(binary: &Path, roots: &DebugRoots) -> anyhow::Result<DebugSearch> {
    let bytes = std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    with_elf(&bytes, |elf| Ok(search(binary, elf, roots).0))
        .with_context(|| format!("reading {}", binary.display()))
}

/// How a candidate was found, which decides how it is verified.
enum Via {
    BuildId,
    DebugLink { crc: u32 },
}

/// The search proper; also returns the found file's bytes so they are read once.
fn search(binary: &Path, elf: &Elf<'_>, roots: &DebugRoots) -> (DebugSearch, Option<Vec<u8>>) {
    let build_id = elf.build_id();
    let mut candidates: Vec<(PathBuf, Via)> = Vec::new();
    if let Some(id) = build_id.filter(|id| id.len() >= 2) {
        let hex = hex(id);
        for dir in &roots.debug_dirs {
            let path = dir
                .join(".build-id")
                .join(&hex[..2])
                .join(format!("{}.debug", &hex[2..]));
            candidates.push((path, Via::BuildId));
        }
        if let Some(cache) = &roots.debuginfod_cache {
            candidates.push((cache.join(&hex).join("debuginfo"), Via::BuildId));
        }
    }
    let real = std::fs::canonicalize(binary).unwrap_or_else(|_| binary.to_path_buf());
    if let Some((name, crc)) = elf.debuglink() {
        let name = Path::new(std::ffi::OsStr::new(
            &String::from_utf8_lossy(name).into_owned(),
        ))
        .to_path_buf();
        // A debuglink is a bare file name; anything with a directory part is not trusted.
        if name.components().count() == 1 {
            let dir = real.parent().unwrap_or(Path::new("/"));
            candidates.push((dir.join(&name), Via::DebugLink { crc }));
            candidates.push((dir.join(".debug").join(&name), Via::DebugLink { crc }));
            let relative = dir.strip_prefix("/").unwrap_or(dir);
            for root in &roots.debug_dirs {
                candidates.push((root.join(relative).join(&name), Via::DebugLink { crc }));
            }
        }
    }

    let mut result = DebugSearch::default();
    for (path, via) in candidates {
        match check_candidate(&path, &real, build_id, &via) {
            Ok(bytes) => {
                result.found = Some(path);
                return (result, Some(bytes));
            }
            Err(why) => result.rejected.push((path, why)),
        }
    }
    (result, None)
}

/// Reads a candidate debug file and verifies it belongs to the binary.
fn check_candidate(
    path: &Path,
    binary_real: &Path,
    build_id: Option<&[u8]>,
    via: &Via,
) -> Result<Vec<u8>, String> {
    if !path.exists() {
        return Err("absent".into());
    }
    if std::fs::canonicalize(path).is_ok_and(|p| p == binary_real) {
        return Err("is the binary itself".into());
    }
    let bytes = std::fs::read(path).map_err(|e| format!("unreadable: {e}"))?;
    let theirs = with_elf(&bytes, |e| Ok(e.build_id().map(<[u8]>::to_vec)))
        .map_err(|e| format!("not a usable ELF file: {e:#}"))?;
    match (via, build_id, theirs.as_deref()) {
        (_, Some(ours), Some(theirs)) if ours == theirs => Ok(bytes),
        (_, Some(_), Some(theirs)) => Err(format!("build-id mismatch (has {})", hex(theirs))),
        (Via::BuildId, _, None) => Err("has no build-id".into()),
        (Via::BuildId, None, Some(_)) => Err("binary has no build-id".into()),
        // Without two build-ids to compare, the debuglink CRC decides (as in gdb).
        (Via::DebugLink { crc }, _, _) => {
            let actual = crc32(&bytes);
            if actual == *crc {
                Ok(bytes)
            } else {
                Err(format!(
                    "CRC mismatch (has {actual:#010x}, debuglink says {crc:#010x})"
                ))
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// CRC-32 (IEEE 802.3, reflected, as zlib and `.gnu_debuglink` use).
pub(crate) fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !data.iter().fold(!0u32, |crc, &b| {
        TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8)
    })
}

/// The symbols of `binary`, looking for a debug file in the system locations.
pub fn load_symbols(binary: &Path) -> anyhow::Result<SymbolTable> {
    load_symbols_with(binary, &DebugRoots::system())
}

/// The symbols of `binary`: its own `.symtab` if it has one, else the `.symtab` of its
/// verified debug file, else only its exported `.dynsym` symbols (the table's
/// [`SymbolOrigin`] says which, and why). `.dynsym` is always included.
pub fn load_symbols_with(binary: &Path, roots: &DebugRoots) -> anyhow::Result<SymbolTable> {
    let bytes = std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    with_elf(&bytes, |elf| {
        let dynsym = read_symbols(elf, elf::SHT_DYNSYM)?;
        // A `.symtab` without functions counts as stripped (`strip --strip-unneeded` can
        // leave a few section/object symbols behind).
        let mut symbols = read_symbols(elf, elf::SHT_SYMTAB)?;
        if symbols.iter().any(|s| s.kind == SymbolKind::Function) {
            symbols.extend(dynsym);
            return Ok(SymbolTable::new(
                symbols,
                elf.segments.clone(),
                SymbolOrigin::Symtab,
            ));
        }
        let (search, debug_bytes) = search(binary, elf, roots);
        if let (Some(path), Some(debug_bytes)) = (search.found.clone(), debug_bytes) {
            let mut symbols = with_elf(&debug_bytes, |debug| read_symbols(debug, elf::SHT_SYMTAB))
                .with_context(|| format!("reading symbols of {}", path.display()))?;
            symbols.extend(dynsym);
            // The binary's segments: they are what gets mapped and probed.
            return Ok(SymbolTable::new(
                symbols,
                elf.segments.clone(),
                SymbolOrigin::DebugFile(path),
            ));
        }
        let reason = format!("{} is stripped; {}", binary.display(), search.summary());
        Ok(SymbolTable::new(
            dynsym,
            elf.segments.clone(),
            SymbolOrigin::DynsymOnly { reason },
        ))
    })
    .with_context(|| format!("reading symbols of {}", binary.display()))
}

#[cfg(test)]
mod tests;
