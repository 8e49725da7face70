//! What each QEMU binary offers the probes, read once per binary (a QEMU binary is tens of
//! MB; a host runs hundreds of VMs from a handful of binaries). Used by `profiler list`
//! (nothing attached) and by the probe layer (which attaches what the policy picks), so both
//! read the same facts.

use std::{collections::HashMap, os::unix::fs::MetadataExt as _, path::PathBuf, sync::Arc};

use anyhow::{Context as _, bail};

use crate::offer::{
    elf::{DebugRoots, LoadSegment, SymbolTable},
    policy::{BinaryOffer, SymbolsOffer},
    symbols::{self, ExeSymbols},
    usdt::{self, RegionOpsSites},
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

/// Where `exe` (by inode) is mapped in `pid`, as the load bias to add to link-time addresses.
pub fn load_bias(
    pid: u32,
    exe_inode: u64,
    offset_to_vaddr: impl Fn(u64) -> Option<u64>,
) -> anyhow::Result<u64> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .with_context(|| format!("reading /proc/{pid}/maps"))?;
    parse_load_bias(&maps, exe_inode, offset_to_vaddr)
}

/// `/proc/PID/maps` lines: `start-end perms offset dev inode path`. The bias is the first
/// mapping of the binary minus the link-time address of its file offset.
pub fn parse_load_bias(
    maps: &str,
    inode: u64,
    offset_to_vaddr: impl Fn(u64) -> Option<u64>,
) -> anyhow::Result<u64> {
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(_perms), Some(off), Some(_dev), Some(ino)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        if ino.parse::<u64>().ok() != Some(inode) {
            continue;
        }
        let start = range
            .split('-')
            .next()
            .and_then(|s| u64::from_str_radix(s, 16).ok());
        let off = u64::from_str_radix(off, 16).ok();
        if let (Some(start), Some(off)) = (start, off)
            && let Some(vaddr) = offset_to_vaddr(off)
        {
            return Ok(start.wrapping_sub(vaddr & !0xfff));
        }
    }
    bail!("the QEMU binary (inode {inode}) is not mapped in the process")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_bias_from_maps() {
        let maps = "\
55d0c8a00000-55d0c8c85000 r--p 00000000 fe:01 1234 /usr/bin/qemu-system-x86_64
55d0c8c85000-55d0c9130000 r-xp 00285000 fe:01 1234 /usr/bin/qemu-system-x86_64
7f0000000000-7f0000001000 r--p 00000000 fe:01 999 /usr/lib/libc.so.6
";
        let bias = parse_load_bias(maps, 1234, Some).unwrap();
        assert_eq!(bias, 0x55d0c8a00000);
        assert!(parse_load_bias(maps, 42, Some).is_err());
        // A non-PIE binary linked at 0x400000: bias 0.
        let maps = "00400000-00452000 r-xp 00000000 08:02 173521 /usr/bin/qemu-kvm\n";
        assert_eq!(
            parse_load_bias(maps, 173521, |_| Some(0x400000)).unwrap(),
            0
        );
    }
}
