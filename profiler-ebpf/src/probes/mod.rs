pub mod execs;
pub mod host_cpu;
pub mod hrtimers;
pub mod kvm;
pub mod libc_waits;
pub mod symbols;
pub mod timers;
pub mod usdt;
