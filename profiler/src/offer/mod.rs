//! What QEMU binaries and the kernel offer the probes, found without loading or attaching
//! anything (pure: ELF files, tracefs, `/proc` maps), and the one source policy that turns
//! those offers into the sources a VM gets: `profiler list` and the probe layer both ask here.

pub mod elf;
pub mod exe;
pub mod policy;
pub mod tracefs;
