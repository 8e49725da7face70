pub mod timers;
pub mod usdt;
