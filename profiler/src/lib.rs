//! QEMU device-model event profiler: per-VM timer, fd, read and write events of QEMU
//! processes, counted by eBPF probes and bucketed into fixed windows.
//!
//! Pure logic (command-line parsing, windowing, reports) is I/O-free and unit-tested; the
//! probe and session layers do the I/O.

pub mod analysis;
pub mod attribution;
pub mod budget;
pub mod cli;
pub mod cmdline;
pub mod collector;
pub mod commands;
pub mod discovery;
pub mod elf;
#[doc(hidden)]
pub mod fuzz_targets;
pub mod libvirt;
pub mod live;
pub mod metrics;
pub mod mtree;
pub mod names;
pub mod output;
pub mod plot;
pub mod ports;
pub mod probes;
pub mod qmp;
pub mod record;
pub mod report;
pub mod sampler;
pub mod session;
pub mod text;
pub mod tracefs;
pub mod tui;
