//! What each QEMU binary offers the probes, read once per binary (a QEMU binary is tens of
//! MB; a host runs hundreds of VMs from a handful of binaries). Used by `profiler list`
//! (nothing attached) and by the probe layer (which attaches what the policy picks), so both
//! read the same facts.

use std::{collections::HashMap, os::unix::fs::MetadataExt as _, path::PathBuf, sync::Arc};

use anyhow::Context as _;

use crate::offer::elf::{DebugRoots, LoadSegment, SymbolTable};
use crate::{
    offer::policy::{BinaryOffer, SymbolsOffer},
    probes::sources::{
        symbols::{self, ExeSymbols},
        usdt::{self, RegionOpsSites},
    },
};

/// The USDT side of a binary: its probe sites, and what resolving their operands needs.
#[derive(Debug)]
pub struct UsdtBinary {
    pub sites: RegionOpsSites,
    pub segments: Vec<LoadSegment>,
    /// The binary's own symbols, for RIP-relative USDT operands (None: stripped).
    pub symbols: Option<SymbolTable>,
}

/// Everything read from one QEMU binary.
#[derive(Debug)]
pub struct ExeAnalysis {
    /// `Ok(None)`: no memory_region_ops USDT probes. `Err`: the notes could not be parsed.
    pub usdt: Result<Option<Arc<UsdtBinary>>, String>,
    /// The symbols (own or from a debug file), or why they could not be read.
    pub symbols: Result<Arc<ExeSymbols>, String>,
}

impl ExeAnalysis {
    /// The facts the source policy decides on.
    pub fn offer(&self) -> BinaryOffer {
        BinaryOffer::Readable {
            usdt: self
                .usdt
                .as_ref()
                .map(Option::is_some)
                .map_err(Clone::clone),
            symbols: self
                .symbols
                .as_ref()
                .map(|s| SymbolsOffer {
                    full: s.has_full_symbols(),
                    dispatch: s.dispatch.is_some(),
                    timer_mod: !s.timer_mod.is_empty(),
                })
                .map_err(Clone::clone),
        }
    }

    /// Where the symbols come from, or why there are none (for `profiler list`).
    pub fn describe_symbols(&self) -> String {
        match &self.symbols {
            Ok(s) => s.describe(),
            Err(why) => why.clone(),
        }
    }
}

/// The identity of a process's executable (device, inode), to analyse each binary once.
pub fn exe_identity(pid: u32) -> anyhow::Result<(u64, u64)> {
    let meta = std::fs::metadata(format!("/proc/{pid}/exe"))
        .with_context(|| format!("stat /proc/{pid}/exe"))?;
    Ok((meta.dev(), meta.ino()))
}

/// Binary analyses by (device, inode).
#[derive(Debug)]
pub struct ExeCatalog {
    roots: DebugRoots,
    by_identity: HashMap<(u64, u64), Arc<ExeAnalysis>>,
}

impl ExeCatalog {
    /// Debug files are searched under `roots`.
    pub fn new(roots: DebugRoots) -> Self {
        Self {
            roots,
            by_identity: HashMap::new(),
        }
    }

    /// The analysis of `pid`'s executable; `Err` says why it cannot be read.
    pub fn analyze(&mut self, pid: u32) -> Result<Arc<ExeAnalysis>, String> {
        let identity = exe_identity(pid).map_err(|e| unreadable(pid, &format!("{e:#}")))?;
        if let Some(found) = self.by_identity.get(&identity) {
            return Ok(found.clone());
        }
        let bytes = std::fs::read(format!("/proc/{pid}/exe"))
            .map_err(|e| unreadable(pid, &e.to_string()))?;
        let usdt = read_usdt(&bytes);
        // The real path lets the .gnu_debuglink search look next to the binary; a deleted or
        // unreachable binary is still readable through /proc/PID/exe.
        let path = std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from(format!("/proc/{pid}/exe")));
        let symbols = symbols::analyze(&path, &self.roots)
            .map(Arc::new)
            .map_err(|e| format!("{e:#}"));
        let analysis = Arc::new(ExeAnalysis { usdt, symbols });
        self.by_identity.insert(identity, analysis.clone());
        Ok(analysis)
    }

    /// The policy's input for `pid`, unreadable binaries included.
    pub fn offer(&mut self, pid: u32) -> (BinaryOffer, Option<Arc<ExeAnalysis>>) {
        match self.analyze(pid) {
            Ok(a) => (a.offer(), Some(a)),
            Err(why) => (BinaryOffer::Unreadable(why), None),
        }
    }
}

fn unreadable(pid: u32, why: &str) -> String {
    format!("cannot read /proc/{pid}/exe ({why}); run as root")
}

fn read_usdt(bytes: &[u8]) -> Result<Option<Arc<UsdtBinary>>, String> {
    let Some(sites) = usdt::find_region_ops_sites(bytes).map_err(|e| format!("{e:#}"))? else {
        return Ok(None);
    };
    let segments = crate::offer::elf::load_segments(bytes).map_err(|e| format!("{e:#}"))?;
    let symbols = SymbolTable::from_elf_bytes(bytes).ok();
    Ok(Some(Arc::new(UsdtBinary {
        sites,
        segments,
        symbols,
    })))
}
