pub mod kvm;
pub mod symbols;
pub mod timers;
pub mod usdt;
