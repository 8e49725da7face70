pub mod execs;
pub mod hrtimers;
pub mod kvm;
pub mod libc_waits;
pub mod symbols;
pub mod timers;
pub mod usdt;
