//! What the KVM tracepoint counters of one process mean: reads and writes QEMU handled (each
//! one an exit to userspace), by port and by page, and accesses the kernel handled itself.

use std::collections::BTreeMap;

use profiler_common::kvm as k;

/// One QEMU process's KVM read/write counts, cumulative.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvmCounts {
    /// PIO reads / writes QEMU's device model handled (each one a `KVM_EXIT_IO`).
    pub pio_reads_user: u64,
    pub pio_writes_user: u64,
    /// MMIO reads / writes QEMU handled (each one a `KVM_EXIT_MMIO`).
    pub mmio_reads_user: u64,
    pub mmio_writes_user: u64,
    /// Accesses an in-kernel device handled (LAPIC, IOAPIC, PIT, PIC, ioeventfd), PIO and
    /// MMIO; they never woke QEMU's device model.
    pub in_kernel: u64,
    /// Fast-MMIO ioeventfd writes (virtio notify), in-kernel; QEMU learns of them through an
    /// eventfd (an fd wakeup), not an exit.
    pub fast_mmio: u64,
    /// Port -> (reads, writes) QEMU handled. [`k::UNKNOWN_ID`] collects reads whose port was
    /// never traced.
    pub by_port: BTreeMap<u64, (u64, u64)>,
    /// Guest-physical page -> (reads, writes) QEMU handled.
    pub by_page: BTreeMap<u64, (u64, u64)>,
}

impl KvmCounts {
    /// Reads QEMU handled (PIO + MMIO).
    pub fn reads_user(&self) -> u64 {
        self.pio_reads_user + self.mmio_reads_user
    }
    /// Writes QEMU handled (PIO + MMIO).
    pub fn writes_user(&self) -> u64 {
        self.pio_writes_user + self.mmio_writes_user
    }
}

/// Turns one process's counters (`ProcessCounters::by_key`: (kind, id) -> count) into
/// [`KvmCounts`]; other kinds are ignored.
pub fn kvm_counts(by_key: &BTreeMap<(u32, u64), u64>) -> KvmCounts {
    // `n` accesses QEMU handled at `id`: added to `total` and to `id`'s reads (`rw` 0) or
    // writes (1).
    fn user(total: &mut u64, by: &mut BTreeMap<u64, (u64, u64)>, id: u64, n: u64, rw: u8) {
        *total += n;
        let e = by.entry(id).or_default();
        *(if rw == 0 { &mut e.0 } else { &mut e.1 }) += n;
    }
    let mut out = KvmCounts::default();
    for (&(kind, id), &n) in by_key {
        match kind {
            k::KVM_PIO_READ_USER => user(&mut out.pio_reads_user, &mut out.by_port, id, n, 0),
            k::KVM_PIO_WRITE_USER => user(&mut out.pio_writes_user, &mut out.by_port, id, n, 1),
            k::KVM_MMIO_READ_USER => user(&mut out.mmio_reads_user, &mut out.by_page, id, n, 0),
            k::KVM_MMIO_WRITE_USER => user(&mut out.mmio_writes_user, &mut out.by_page, id, n, 1),
            k::KVM_PIO_READ_IN_KERNEL
            | k::KVM_PIO_WRITE_IN_KERNEL
            | k::KVM_MMIO_READ_IN_KERNEL
            | k::KVM_MMIO_WRITE_IN_KERNEL => out.in_kernel += n,
            k::KVM_FAST_MMIO => out.fast_mmio += n,
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod ground_truth;

#[cfg(test)]
mod tests {
    use super::*;
    use k::{
        KVM_FAST_MMIO, KVM_MMIO_READ_IN_KERNEL, KVM_MMIO_READ_USER, KVM_MMIO_WRITE_USER,
        KVM_PIO_READ_USER, KVM_PIO_WRITE_IN_KERNEL, KVM_PIO_WRITE_USER,
    };

    #[test]
    fn kvm_counts_sums_kinds_and_groups_by_port_and_page() {
        let mut by_key = BTreeMap::new();
        by_key.insert((KVM_PIO_READ_USER, 0x3f8), 5);
        by_key.insert((KVM_PIO_WRITE_USER, 0x3f8), 7);
        by_key.insert((KVM_PIO_WRITE_USER, 0x378), 1);
        by_key.insert((KVM_MMIO_READ_USER, 0xfed0_0000), 3);
        by_key.insert((KVM_MMIO_WRITE_USER, 0xfebf_1000), 2);
        by_key.insert((KVM_PIO_WRITE_IN_KERNEL, 0x40), 10);
        by_key.insert((KVM_MMIO_READ_IN_KERNEL, 0xfee0_0000), 20);
        by_key.insert((KVM_FAST_MMIO, 0xfe00_3000), 4);
        by_key.insert((profiler_common::kind::TIMER, 1), 99);
        let c = kvm_counts(&by_key);
        assert_eq!(
            (
                c.pio_reads_user,
                c.pio_writes_user,
                c.mmio_reads_user,
                c.mmio_writes_user
            ),
            (5, 8, 3, 2)
        );
        assert_eq!((c.in_kernel, c.fast_mmio), (30, 4));
        assert_eq!((c.reads_user(), c.writes_user()), (8, 10));
        assert_eq!(
            c.by_port.into_iter().collect::<Vec<_>>(),
            [(0x378, (0, 1)), (0x3f8, (5, 7))]
        );
        assert_eq!(
            c.by_page.into_iter().collect::<Vec<_>>(),
            [(0xfebf_1000, (0, 2)), (0xfed0_0000, (3, 0))]
        );
        assert_eq!(kvm_counts(&BTreeMap::new()), KvmCounts::default());
    }
}
