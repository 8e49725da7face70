//! What QEMU binaries and the kernel offer the probes, found without loading or attaching
//! anything (pure: ELF files, tracefs, `/proc` maps), and the one source policy that turns
//! those offers into the sources a VM gets: `profiler list` and the probe layer both ask here.

pub mod elf;
pub mod exe;
pub mod libc;
pub mod policy;
pub mod symbols;
pub mod tracefs;
pub mod usdt;

/// Where a uprobe goes: a file offset in a binary, and the BPF cookie its program reads there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UprobePoint {
    pub file_offset: u64,
    pub cookie: u64,
}
