//! What a QEMU binary's symbols offer the probes: `memory_region_dispatch_read/_write` (the
//! read/write fallback without USDT), the `timer_mod*` functions (timer callback discovery),
//! callback names, and the struct offsets DWARF gives (`MemoryRegion.name`, `QEMUTimer.cb`,
//! the `mr->owner` chain to a QOM type name).
//!
//! Symbols come from the binary's own `.symtab`, or from its separate debug file (found by
//! build-id or `.gnu_debuglink`, verified) — see [`crate::offer::elf::symbols`]. `QEMUTimer.cb`
//! has been at offset 16 since QEMU 1.7 (`expire_time`, `timer_list`, `cb`), which is the
//! fallback without DWARF.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::offer::elf::{DebugRoots, SymbolOrigin, SymbolTable, load_symbols_with};

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
        !matches!(self.symbols.source(), SymbolOrigin::DynsymOnly { .. })
    }

    /// Where the symbols came from, for `sources`.
    pub fn describe(&self) -> String {
        match self.symbols.source() {
            SymbolOrigin::Symtab => "symbols".into(),
            SymbolOrigin::DebugFile(p) => format!("symbols ({})", p.display()),
            SymbolOrigin::DynsymOnly { reason } => format!("no symbols: {reason}"),
        }
    }
}

fn function_file_offset(symbols: &SymbolTable, name: &str) -> Option<u64> {
    let sym = symbols.lookup(name)?;
    symbols.vaddr_to_file_offset(sym.vaddr)
}

/// The bytes DWARF comes from: the debug file if symbols came from one, else the binary.
fn dwarf_source(exe: &Path, symbols: &SymbolTable) -> PathBuf {
    match symbols.source() {
        SymbolOrigin::DebugFile(p) => p.clone(),
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
        dwarf.as_deref().and_then(|b| {
            crate::offer::elf::dwarf::member_offset(b, s, m)
                .ok()
                .flatten()
        })
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

/// A callback's name from its link-time address.
pub fn callback_name(exe: &ExeSymbols, vaddr: u64) -> String {
    match exe.symbols.symbolize(vaddr) {
        Some((name, 0)) => name.to_string(),
        Some((name, off)) => format!("{name}+{off:#x}"),
        None => format!("{vaddr:#x}"),
    }
}

/// Names timer callbacks by their link-time address.
pub trait CallbackNamer: Send + Sync + std::fmt::Debug {
    fn callback_name(&self, vaddr: u64) -> String;
}

impl CallbackNamer for ExeSymbols {
    fn callback_name(&self, vaddr: u64) -> String {
        callback_name(self, vaddr)
    }
}
