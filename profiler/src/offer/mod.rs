//! What QEMU binaries and the kernel offer the probes, found without loading or attaching
//! anything (pure: ELF files, tracefs, `/proc` maps), and the one source policy that turns
//! those offers into the sources a VM gets: `profiler list` and the probe layer both ask here.

pub mod elf;
pub mod exe;
pub mod kernel;
pub mod kvm;
pub mod libc;
pub mod policy;
pub mod symbols;
pub mod tracefs;
pub mod usdt;

use crate::{
    identity::discovery::QemuProcess,
    offer::{
        exe::ExeCatalog,
        libc::LibcCatalog,
        policy::{ProcessOffer, TimerChoice, VmSources},
    },
};

/// Where a uprobe goes: a file offset in a binary, and the BPF cookie its program reads there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UprobePoint {
    pub file_offset: u64,
    pub cookie: u64,
}

/// What `profiler list` shows for a VM: the plan, without attaching anything.
#[derive(Debug, Clone)]
pub struct OfferedSources {
    pub sources: VmSources,
    /// Where the symbols come from, or why there are none.
    pub symbols: String,
}

/// The plan for `vm` from what its binary and C library offer (read through the catalogs)
/// and what the kernel offers: what `record` will attach.
pub fn offered_sources(
    catalog: &mut ExeCatalog,
    libc_catalog: &mut LibcCatalog,
    timer_choice: TimerChoice,
    vm: &QemuProcess,
    kernel: &kernel::KernelOffer,
) -> OfferedSources {
    let (binary, exe) = catalog.offer(vm.key.pid);
    let offer = ProcessOffer {
        binary,
        libc: libc_catalog.offer(vm.key.pid).map(|_| ()),
        timer_choice,
    };
    let plan = policy::plan(&offer, vm.identity.accel, kernel);
    OfferedSources {
        sources: plan.expected(),
        symbols: match (&exe, &offer.binary) {
            (Some(exe), _) => exe.describe_symbols(),
            (None, policy::BinaryOffer::Unreadable(why)) => why.clone(),
            (None, _) => String::new(),
        },
    }
}
