//! QEMU device-model event profiler: per-VM timer, fd, read and write events of QEMU
//! processes, counted by eBPF probes and bucketed into fixed windows.
//!
//! Pure logic (command-line parsing, windowing, reports) is I/O-free and unit-tested; the
//! probe and session layers do the I/O.

pub mod analysis;
pub mod attribution;
pub mod cli;
pub mod commands;
#[doc(hidden)]
pub mod fuzz_targets;
pub mod identity;
pub mod note;
pub mod offer;
pub mod outputs;
pub mod probes;
pub mod record;
#[cfg(test)]
pub mod testing;
pub mod text;
pub mod tui;
pub mod windows;
