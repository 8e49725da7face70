//! Probes that need QEMU's symbols: the read/write fallback on
//! `memory_region_dispatch_read/_write` (no USDT) and timer callbacks by name.
//!
//! Symbols come from the binary's own `.symtab`, or from its separate debug file (found by
//! build-id or `.gnu_debuglink`, verified) — see [`crate::elf::symbols`]. Struct offsets
//! (`MemoryRegion.name`, `QEMUTimer.cb`) come from DWARF when the binary or its debug file has
//! it; `QEMUTimer.cb` has been at offset 16 since QEMU 1.7 (`expire_time`, `timer_list`, `cb`),
//! which is the fallback.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use aya::programs::{
    UProbe,
    uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
};
use profiler_common::kind;

use crate::elf::{DebugRoots, SymbolSource, SymbolTable, load_symbols_with};

pub const DISPATCH_PROGRAM: &str = "region_dispatch";
pub const TIMER_MOD_PROGRAM: &str = "timer_mod";
pub const CALLBACK_PROGRAM: &str = "timer_callback";

const DISPATCH_READ: &str = "memory_region_dispatch_read";
const DISPATCH_WRITE: &str = "memory_region_dispatch_write";
/// Where QEMU arms timers; every `timer_mod*` variant ends in one of these.
const TIMER_MOD_FUNCTIONS: &[&str] = &["timer_mod_ns", "timer_mod_anticipate_ns"];
/// `offsetof(QEMUTimer, cb)`: `int64_t expire_time; QEMUTimerList *timer_list; QEMUTimerCB *cb`.
pub const QEMU_TIMER_CB_OFFSET: u64 = 16;

/// What a QEMU binary's symbols offer.
#[derive(Debug)]
pub struct ExeSymbols {
    pub symbols: SymbolTable,
    /// File offsets of memory_region_dispatch_read / _write.
    pub dispatch: Option<(u64, u64)>,
    /// File offsets of the timer_mod functions found.
    pub timer_mod: Vec<u64>,
    /// `offsetof(MemoryRegion, name)`, when DWARF says.
    pub region_name_offset: Option<u64>,
    pub timer_cb_offset: u64,
    /// How to get from a `MemoryRegion` to its owner's QOM type name, when DWARF says.
    pub owner_layout: Option<OwnerLayout>,
}

/// `mr->owner->class->type->name`: the offsets of each hop (from DWARF).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnerLayout {
    pub region_owner: u64,
    pub object_class: u64,
    pub class_type: u64,
    pub type_name: u64,
}

impl ExeSymbols {
    /// Whether the table has real (not just exported) symbols.
    pub fn has_full_symbols(&self) -> bool {
        !matches!(self.symbols.source(), SymbolSource::DynsymOnly { .. })
    }

    /// Where the symbols came from, for `sources`.
    pub fn describe(&self) -> String {
        match self.symbols.source() {
            SymbolSource::Symtab => "symbols".into(),
            SymbolSource::DebugFile(p) => format!("symbols ({})", p.display()),
            SymbolSource::DynsymOnly { reason } => format!("no symbols: {reason}"),
        }
    }

    /// Why read/write cannot come from symbols, if it cannot.
    pub fn dispatch_unavailable(&self) -> Option<String> {
        if !self.has_full_symbols() {
            return Some(format!("stripped QEMU without USDT probes: {STRIPPED_FIX}"));
        }
        if self.dispatch.is_none() {
            return Some(format!(
                "{DISPATCH_READ}/{DISPATCH_WRITE} not found in the symbols"
            ));
        }
        None
    }

    /// Why timers cannot be split by callback, if they cannot.
    pub fn callbacks_unavailable(&self) -> Option<String> {
        if !self.has_full_symbols() {
            return Some(format!("stripped QEMU: {STRIPPED_FIX}"));
        }
        if self.timer_mod.is_empty() {
            return Some("timer_mod_ns not found in the symbols".into());
        }
        None
    }
}

/// What fixes a stripped QEMU; where the debug file was looked for goes to `profiler list`.
pub const STRIPPED_FIX: &str = "no debug file found; install its debug symbols (Debian: \
     qemu-system-x86-dbgsym, Fedora: qemu-debuginfo) or use a QEMU built with \
     --enable-trace-backends=dtrace";

fn function_file_offset(symbols: &SymbolTable, name: &str) -> Option<u64> {
    let sym = symbols.lookup(name)?;
    symbols.vaddr_to_file_offset(sym.vaddr)
}

/// The bytes DWARF comes from: the debug file if symbols came from one, else the binary.
fn dwarf_source(exe: &Path, symbols: &SymbolTable) -> PathBuf {
    match symbols.source() {
        SymbolSource::DebugFile(p) => p.clone(),
        _ => exe.to_path_buf(),
    }
}

/// Reads a binary's symbols (and debug file) once; `exe` is its real path.
pub fn analyze(exe: &Path, roots: &DebugRoots) -> anyhow::Result<ExeSymbols> {
    let symbols = load_symbols_with(exe, roots)
        .with_context(|| format!("reading symbols of {}", exe.display()))?;
    let dispatch = function_file_offset(&symbols, DISPATCH_READ)
        .zip(function_file_offset(&symbols, DISPATCH_WRITE));
    let timer_mod = TIMER_MOD_FUNCTIONS
        .iter()
        .filter_map(|f| function_file_offset(&symbols, f))
        .collect();
    let dwarf = std::fs::read(dwarf_source(exe, &symbols)).ok();
    let member = |s: &str, m: &str| {
        dwarf
            .as_deref()
            .and_then(|b| crate::elf::dwarf::member_offset(b, s, m).ok().flatten())
    };
    let owner_layout = (|| {
        Some(OwnerLayout {
            region_owner: member("MemoryRegion", "owner")?,
            object_class: member("Object", "class")?,
            class_type: member("ObjectClass", "type")?,
            type_name: member("TypeImpl", "name")?,
        })
    })();
    Ok(ExeSymbols {
        owner_layout,
        region_name_offset: member("MemoryRegion", "name"),
        timer_cb_offset: member("QEMUTimer", "cb").unwrap_or(QEMU_TIMER_CB_OFFSET),
        symbols,
        dispatch,
        timer_mod,
    })
}

/// The symbol-based probes attached to one process.
#[derive(Debug, Default)]
pub struct SymbolAttachment {
    /// (program, link) pairs to detach.
    pub links: Vec<(&'static str, UProbeLinkId)>,
    /// Callback link-time addresses already probed.
    pub callbacks: std::collections::BTreeSet<u64>,
    pub dispatch_attached: bool,
    pub exe: Option<Arc<ExeSymbols>>,
}

fn scope(pid: u32) -> anyhow::Result<UProbeScope> {
    Ok(UProbeScope::OneProcess(
        std::num::NonZeroU32::new(pid).context("pid 0 cannot be probed")?,
    ))
}

fn attach_at(
    program: &mut UProbe,
    pid: u32,
    file_offset: u64,
    cookie: u64,
) -> anyhow::Result<UProbeLinkId> {
    program
        .attach(
            UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(file_offset),
                cookie: Some(cookie),
            },
            Path::new(&format!("/proc/{pid}/exe")),
            scope(pid)?,
        )
        .with_context(|| format!("attaching a uprobe at file offset {file_offset:#x}"))
}

/// Attaches memory_region_dispatch_read/_write for `pid`.
pub fn attach_dispatch(
    program: &mut UProbe,
    pid: u32,
    exe: &ExeSymbols,
) -> anyhow::Result<Vec<UProbeLinkId>> {
    let (read, write) = exe.dispatch.context("no dispatch functions")?;
    let name_off = exe.region_name_offset.unwrap_or(0);
    let mut links = Vec::new();
    for (offset, k) in [(read, kind::READ), (write, kind::WRITE)] {
        links.push(attach_at(
            program,
            pid,
            offset,
            ((k as u64) << 32) | name_off,
        )?);
    }
    Ok(links)
}

/// Attaches the timer_mod discovery probes for `pid`.
pub fn attach_timer_mod(
    program: &mut UProbe,
    pid: u32,
    exe: &ExeSymbols,
) -> anyhow::Result<Vec<UProbeLinkId>> {
    exe.timer_mod
        .iter()
        .map(|&offset| attach_at(program, pid, offset, exe.timer_cb_offset))
        .collect()
}

/// Attaches the callback counter at the function whose link-time address is `vaddr`.
pub fn attach_callback(
    program: &mut UProbe,
    pid: u32,
    exe: &ExeSymbols,
    vaddr: u64,
) -> anyhow::Result<UProbeLinkId> {
    let offset = exe
        .symbols
        .vaddr_to_file_offset(vaddr)
        .with_context(|| format!("callback address {vaddr:#x} is not in the binary"))?;
    attach_at(program, pid, offset, vaddr)
}

/// A callback's name from its link-time address.
pub fn callback_name(exe: &ExeSymbols, vaddr: u64) -> String {
    match exe.symbols.symbolize(vaddr) {
        Some((name, 0)) => name.to_string(),
        Some((name, off)) => format!("{name}+{off:#x}"),
        None => format!("{vaddr:#x}"),
    }
}

/// Reads the QOM type name of the device owning `region` in process `pid`'s memory; `None`
/// for regions without an owner (system containers) or when any hop cannot be read.
pub fn region_owner(mem: &std::fs::File, region: u64, layout: &OwnerLayout) -> Option<String> {
    use std::os::unix::fs::FileExt;
    let read_u64 = |addr: u64| -> Option<u64> {
        let mut buf = [0u8; 8];
        mem.read_exact_at(&mut buf, addr).ok()?;
        Some(u64::from_ne_bytes(buf)).filter(|&v| v != 0)
    };
    let owner = read_u64(region.checked_add(layout.region_owner)?)?;
    let class = read_u64(owner.checked_add(layout.object_class)?)?;
    let ty = read_u64(class.checked_add(layout.class_type)?)?;
    let name_ptr = read_u64(ty.checked_add(layout.type_name)?)?;
    let mut buf = [0u8; 64];
    let n = mem.read_at(&mut buf, name_ptr).ok()?;
    let end = buf[..n].iter().position(|&b| b == 0)?;
    Some(String::from_utf8_lossy(&buf[..end]).into_owned()).filter(|s| !s.is_empty())
}
