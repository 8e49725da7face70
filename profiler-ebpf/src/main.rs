//! eBPF programs of the QEMU device-model event profiler.
//!
//! One module per concern (kunai style): `probes::timers` classifies QEMU's wait syscalls into
//! timer and fd wakeups. Counting happens here, in shared maps added to atomically; userspace
//! diffs the maps once per refresh.
#![no_std]
// Atomic adds to shared counters (`lock *(u64 *)(r + 0) += n`): the BPF target has no
// compare-and-swap, so core's atomics offer no fetch_add there.
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]
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
