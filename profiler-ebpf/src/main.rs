//! eBPF programs of the QEMU device-model event profiler.
//!
//! One module per concern (kunai style): `probes::timers` classifies QEMU's wait syscalls into
//! timer and fd wakeups. Counting happens here, in per-CPU maps; userspace diffs the maps once
//! per refresh.
#![no_std]
#![no_main]

mod maps;
mod probes;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
