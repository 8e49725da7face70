//! One file per probe source (kunai style): each attaches and detaches its programs for a VM
//! and owns its per-process state.

pub mod execs;
pub mod host_cpu;
pub mod hrtimers;
pub mod kvm;
pub mod libc_waits;
pub mod symbols;
pub mod syscall_waits;
pub mod usdt;
