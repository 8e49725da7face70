//! From raw counters to what a VM did: totals per count, per device, per timer callback.
//!
//! The probe layer hands out counters as the kernel keeps them, `(kind, id) -> n` per process
//! ([`RawCounters`]), plus the region names its probes read. Which counters make a VM's `read`
//! depends on the source that served it (USDT and symbols count regions; the KVM tracepoints
//! count exits by port and page), and a device's name may come from QEMU itself, from its
//! owner's QOM type, or from the VM's memory map. All of that is decided here, with no I/O:
//! the names arrive as plain maps ([`VmNames`]) resolved elsewhere (`crate::attribution::names`).

pub mod cpu_roles;
pub mod kvm;
pub mod names;

use std::collections::{BTreeMap, HashMap};

use profiler_common::kind;

use crate::{
    identity::{
        mtree::MtreeMap,
        ports::{VmDevices, well_known_port_name},
    },
    offer::{
        kvm::ExitReasonNames,
        policy::{GuestSources, ReadWriteSource},
    },
    record::{DeviceCount, ExitCount, TimerCallbackCount},
};

pub use crate::probes::{RawCounters, RegionLabel};

/// A device as records and views name it: the region's name and, where known, the QOM type of
/// the device that owns it (`uhci` owned by `piix3-usb-uhci`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceKey {
    pub name: String,
    pub owner: Option<String>,
}

impl DeviceKey {
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            owner: None,
        }
    }
}

/// Cumulative (reads, writes) per device.
pub type DeviceTotals = BTreeMap<DeviceKey, (u64, u64)>;

/// Cumulative timer-callback runs per callback name.
pub type CallbackTotals = BTreeMap<String, u64>;

/// Cumulative VM exits per reason name.
pub type ExitTotals = BTreeMap<String, u64>;

/// Cumulative counters of one VM since the profiler started watching it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub timer: Option<u64>,
    pub fd_wakeups: Option<u64>,
    pub read: Option<u64>,
    pub write: Option<u64>,
    /// User + system CPU time of the QEMU process, in clock ticks (since it started).
    pub cpu_ticks: Option<u64>,
    /// KVM only: guest accesses an in-kernel device handled (never reached QEMU).
    pub in_kernel: Option<u64>,
    /// KVM only: the guest's vCPUs woken from a halt after sleeping (its own timer, an
    /// interrupt): host wakeups QEMU's event loop never sees.
    pub vcpu_wakeups: Option<u64>,
    /// KVM only: guest halts that ended while KVM still polled, before sleeping.
    pub vcpu_halt_polls: Option<u64>,
    /// The VM's threads' CPU time by role, where it was read at both ends (window boundaries).
    pub cpu_roles: Option<cpu_roles::RoleTicks>,
    /// Not a count: the QEMU's resident memory when last read (at window boundaries), bytes;
    /// a window keeps its value at the end.
    pub resident_bytes: Option<u64>,
}

fn delta(now: Option<u64>, base: Option<u64>) -> Option<u64> {
    // A counter that went backwards (reset) contributes 0 rather than wrapping. One that
    // became available since `base` (a VM first seen before it opened /dev/kvm, its sources
    // chosen again) counts from 0: every cumulative count starts there when the VM is watched.
    Some(now?.saturating_sub(base.unwrap_or(0)))
}

impl Counts {
    /// `self - base`, field by field; unavailable now stays unavailable.
    pub fn since(&self, base: &Counts) -> Counts {
        Counts {
            timer: delta(self.timer, base.timer),
            fd_wakeups: delta(self.fd_wakeups, base.fd_wakeups),
            read: delta(self.read, base.read),
            write: delta(self.write, base.write),
            cpu_ticks: delta(self.cpu_ticks, base.cpu_ticks),
            in_kernel: delta(self.in_kernel, base.in_kernel),
            vcpu_wakeups: delta(self.vcpu_wakeups, base.vcpu_wakeups),
            vcpu_halt_polls: delta(self.vcpu_halt_polls, base.vcpu_halt_polls),
            cpu_roles: match (self.cpu_roles, base.cpu_roles) {
                (Some(now), Some(base)) => Some(now.since(&base)),
                _ => None,
            },
            resident_bytes: self.resident_bytes,
        }
    }

    /// These counts with what could still be read after the VM exited: the event counters
    /// come from the kernel maps, which outlive the process; its CPU time cannot be read any
    /// more, so the last sampled value stays, and its threads are gone.
    pub fn with_final(&self, fin: &Counts) -> Counts {
        Counts {
            timer: fin.timer.or(self.timer),
            fd_wakeups: fin.fd_wakeups.or(self.fd_wakeups),
            read: fin.read.or(self.read),
            write: fin.write.or(self.write),
            cpu_ticks: fin.cpu_ticks.or(self.cpu_ticks),
            in_kernel: fin.in_kernel.or(self.in_kernel),
            vcpu_wakeups: fin.vcpu_wakeups.or(self.vcpu_wakeups),
            vcpu_halt_polls: fin.vcpu_halt_polls.or(self.vcpu_halt_polls),
            cpu_roles: None,
            resident_bytes: None,
        }
    }
}

/// Names resolved for one VM (by `crate::attribution::names`).
#[derive(Debug, Clone, Copy, Default)]
pub struct VmNames<'a> {
    /// `MemoryRegion` pointer -> QOM type of its owner device.
    pub owners: Option<&'a HashMap<u64, String>>,
    /// Callback link-time address -> function name.
    pub callbacks: Option<&'a HashMap<u64, String>>,
    /// The VM's memory map (QEMU's `info mtree -f`), naming KVM ports and pages.
    pub address_map: Option<&'a MtreeMap>,
    /// VM exit reasons' names (`kvm:kvm_exit`'s own).
    pub exit_reasons: Option<&'a ExitReasonNames>,
    /// The VM's devices, naming the well-known ISA ports of those it has when there is no
    /// memory map.
    pub devices: VmDevices<'a>,
}

/// One VM's counts, devices, callbacks and exits, cumulative.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributed {
    pub counts: Counts,
    pub devices: DeviceTotals,
    pub callbacks: CallbackTotals,
    /// VM exits by reason (KVM, where the kernel fires `kvm_exit`).
    pub exits: ExitTotals,
}

/// What one VM did between two samples of its [`Attributed`] totals.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WindowCounts {
    pub counts: Counts,
    /// Per device, busiest first, idle ones left out.
    pub devices: Vec<DeviceCount>,
    /// Per timer callback, busiest first.
    pub timers: Vec<TimerCallbackCount>,
    /// VM exits per reason, most first.
    pub exits: Vec<ExitCount>,
}

impl Attributed {
    /// These totals with what could still be read after the VM exited (`fin`).
    pub fn with_final(&self, fin: &Attributed) -> Attributed {
        let mut out = self.clone();
        out.counts = self.counts.with_final(&fin.counts);
        out.devices
            .extend(fin.devices.iter().map(|(k, v)| (k.clone(), *v)));
        out.callbacks
            .extend(fin.callbacks.iter().map(|(k, v)| (k.clone(), *v)));
        out.exits
            .extend(fin.exits.iter().map(|(k, v)| (k.clone(), *v)));
        out
    }

    /// What was done since `base`.
    pub fn since(&self, base: &Attributed) -> WindowCounts {
        WindowCounts {
            counts: self.counts.since(&base.counts),
            devices: device_deltas(&self.devices, &base.devices),
            timers: named_deltas(&self.callbacks, &base.callbacks)
                .map(|(callback, count)| TimerCallbackCount { callback, count })
                .collect(),
            exits: named_deltas(&self.exits, &base.exits)
                .map(|(reason, count)| ExitCount { reason, count })
                .collect(),
        }
    }
}

/// Per-device deltas, busiest first, zero rows dropped.
fn device_deltas(now: &DeviceTotals, base: &DeviceTotals) -> Vec<DeviceCount> {
    let mut out: Vec<DeviceCount> = now
        .iter()
        .map(|(key, (r, w))| {
            let (br, bw) = base.get(key).copied().unwrap_or_default();
            DeviceCount {
                name: key.name.clone(),
                owner: key.owner.clone(),
                read: r.saturating_sub(br),
                write: w.saturating_sub(bw),
            }
        })
        .filter(|d| d.read + d.write > 0)
        .collect();
    out.sort_by(|a, b| {
        (b.read + b.write)
            .cmp(&(a.read + a.write))
            .then(a.name.cmp(&b.name))
    });
    out
}

/// Per-name deltas, most first (then by name), zero rows dropped.
fn named_deltas(
    now: &BTreeMap<String, u64>,
    base: &BTreeMap<String, u64>,
) -> impl Iterator<Item = (String, u64)> {
    let mut out: Vec<(String, u64)> = now
        .iter()
        .map(|(name, n)| {
            let before = base.get(name).copied().unwrap_or_default();
            (name.clone(), n.saturating_sub(before))
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    out.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    out.into_iter()
}

/// Turns raw counters into counts: `timer` and `fd_wakeups` always; `read`/`write` and the
/// per-device split as `read_write` (the source that served this VM, `None`: unavailable)
/// counts them; timer runs per callback name.
pub fn attribute(
    raw: &RawCounters,
    read_write: Option<ReadWriteSource>,
    names: &VmNames<'_>,
) -> Attributed {
    let mut counts = Counts {
        timer: Some(raw.total(kind::TIMER)),
        fd_wakeups: Some(raw.total(kind::FD_WAKEUP)),
        ..Counts::default()
    };
    let devices = match read_write {
        Some(ReadWriteSource::Usdt | ReadWriteSource::Symbols) => {
            let devices = region_devices(raw, names);
            counts.read = Some(devices.values().map(|(r, _)| r).sum());
            counts.write = Some(devices.values().map(|(_, w)| w).sum());
            devices
        }
        Some(ReadWriteSource::KvmTracepoints) => {
            let k = kvm::kvm_counts(&raw.by_key);
            counts.read = Some(k.reads_user());
            counts.write = Some(k.writes_user());
            counts.in_kernel = Some(k.in_kernel);
            kvm_devices(&k, names.address_map, names.devices)
        }
        None => DeviceTotals::new(),
    };
    let mut callbacks = CallbackTotals::new();
    for (&(k, id), &n) in &raw.by_key {
        if k == kind::TIMER_CALLBACK {
            let name = names
                .callbacks
                .and_then(|c| c.get(&id))
                .cloned()
                .unwrap_or_else(|| format!("{id:#x}"));
            *callbacks.entry(name).or_default() += n;
        }
    }
    Attributed {
        counts,
        devices,
        callbacks,
        exits: ExitTotals::new(),
    }
}

/// Adds a KVM guest's own counts to `a`, as `guest` says they are served: vCPU wakeups and
/// halt polls, and exits by reason name; `None` (unknown, not zero) where nothing counts them.
pub fn add_guest(a: &mut Attributed, raw: &RawCounters, guest: &GuestSources, names: &VmNames<'_>) {
    if guest.vcpu_wakeups.is_ok() {
        a.counts.vcpu_wakeups = Some(raw.total(kind::VCPU_WAKEUP));
        a.counts.vcpu_halt_polls = Some(raw.total(kind::VCPU_HALT_POLL));
    }
    if guest.exits.is_ok() {
        for (&(k, id), &n) in &raw.by_key {
            if k == kind::KVM_EXIT {
                let (isa, reason) = ((id >> 32) as u32, id as u32);
                let name = match names.exit_reasons {
                    Some(names) => names.name(isa, reason),
                    None => format!("{isa}:{reason:#x}"),
                };
                *a.exits.entry(name).or_default() += n;
            }
        }
    }
}

/// Reads/writes per region, summed by (name, owner): several regions may share a name (e.g.
/// one per UHCI port range). Nameless subpage regions are left out: the access they dispatch
/// is counted again at the real region.
fn region_devices(raw: &RawCounters, names: &VmNames<'_>) -> DeviceTotals {
    let mut out = DeviceTotals::new();
    for (&(k, id), &n) in &raw.by_key {
        if k != kind::READ && k != kind::WRITE {
            continue;
        }
        let name = match raw.regions.get(&id) {
            Some(RegionLabel::Unnamed) => continue,
            Some(RegionLabel::Named(name)) => name.clone(),
            None => format!("region@{id:#x}"),
        };
        let key = DeviceKey {
            name,
            owner: names.owners.and_then(|o| o.get(&id)).cloned(),
        };
        let entry = out.entry(key).or_default();
        if k == kind::READ {
            entry.0 += n;
        } else {
            entry.1 += n;
        }
    }
    out
}

/// KVM exits to QEMU per port and page, named through the VM's memory map when known, else
/// (ports of devices the VM has) from the well-known PC ports, else by address.
fn kvm_devices(k: &kvm::KvmCounts, map: Option<&MtreeMap>, devices: VmDevices<'_>) -> DeviceTotals {
    let mut out = DeviceTotals::new();
    let ports = k.by_port.iter().map(|(&port, &rw)| {
        let name = if port == profiler_common::kvm::UNKNOWN_ID {
            Some("port (unknown)".to_string())
        } else {
            map.and_then(|m| m.name_for_port(port))
                .map(String::from)
                .or_else(|| well_known_port_name(port, devices))
        };
        (name.unwrap_or_else(|| format!("port {port:#x}")), rw)
    });
    let pages = k.by_page.iter().map(|(&page, &rw)| {
        let name = map.and_then(|m| m.name_for_gpa(page)).map(String::from);
        (name.unwrap_or_else(|| format!("mmio {page:#x}")), rw)
    });
    for (name, (r, w)) in ports.chain(pages) {
        let e = out.entry(DeviceKey::named(name)).or_default();
        e.0 += r;
        e.1 += w;
    }
    out
}

#[cfg(test)]
mod tests {
    use profiler_common::kvm::{KVM_PIO_READ_USER, KVM_PIO_WRITE_IN_KERNEL, KVM_PIO_WRITE_USER};

    use super::*;

    fn raw(pairs: &[((u32, u64), u64)], regions: &[(u64, RegionLabel)]) -> RawCounters {
        RawCounters {
            by_key: pairs.iter().copied().collect(),
            regions: regions.iter().cloned().collect(),
        }
    }

    #[test]
    fn timers_and_fd_wakeups_whatever_the_read_write_source() {
        let r = raw(
            &[
                ((kind::TIMER, 1), 10),
                ((kind::TIMER, 2), 5),
                ((kind::FD_WAKEUP, 1), 3),
                ((kind::NONBLOCKING_POLL, 1), 99),
                ((kind::READ, 0x10), 4),
            ],
            &[],
        );
        let a = attribute(&r, None, &VmNames::default());
        assert_eq!(
            (
                a.counts.timer,
                a.counts.fd_wakeups,
                a.counts.read,
                a.counts.write
            ),
            (Some(15), Some(3), None, None)
        );
        assert!(a.devices.is_empty());
        assert_eq!(a.counts.in_kernel, None);
    }

    #[test]
    fn regions_sum_by_name_and_owner_and_subpages_are_not_counted_twice() {
        let owners: HashMap<u64, String> = [(0x30, "qemu-xhci".to_string())].into();
        let r = raw(
            &[
                ((kind::READ, 0x10), 7),
                ((kind::READ, 0x11), 3),
                ((kind::WRITE, 0x11), 2),
                ((kind::READ, 0x20), 100),
                ((kind::WRITE, 0x30), 1),
                ((kind::READ, 0x40), 1),
            ],
            &[
                (0x10, RegionLabel::Named("uhci".into())),
                (0x11, RegionLabel::Named("uhci".into())),
                (0x20, RegionLabel::Unnamed),
                (0x30, RegionLabel::Named("operational".into())),
            ],
        );
        let names = VmNames {
            owners: Some(&owners),
            ..VmNames::default()
        };
        let a = attribute(&r, Some(ReadWriteSource::Symbols), &names);
        assert_eq!((a.counts.read, a.counts.write), (Some(11), Some(3)));
        let devices: Vec<(DeviceKey, (u64, u64))> = a.devices.into_iter().collect();
        assert_eq!(
            devices,
            [
                (
                    DeviceKey {
                        name: "operational".into(),
                        owner: Some("qemu-xhci".into())
                    },
                    (0, 1)
                ),
                (DeviceKey::named("region@0x40"), (1, 0)),
                (DeviceKey::named("uhci"), (10, 2)),
            ]
        );
    }

    #[test]
    fn kvm_exits_named_by_the_memory_map_else_by_address() {
        let map = crate::identity::mtree::parse_mtree_flat(
            "FlatView #1\n AS \"I/O\", root: io\n Root memory region: io\n  \
             0000000000000378-000000000000037f (prio 0, i/o): parallel\n",
        );
        let r = raw(
            &[
                ((KVM_PIO_READ_USER, 0x378), 100),
                ((KVM_PIO_WRITE_USER, 0x402), 5),
                ((KVM_PIO_WRITE_IN_KERNEL, 0x40), 9),
                ((KVM_PIO_READ_USER, profiler_common::kvm::UNKNOWN_ID), 1),
            ],
            &[],
        );
        let names = VmNames {
            address_map: Some(&map),
            ..VmNames::default()
        };
        let a = attribute(&r, Some(ReadWriteSource::KvmTracepoints), &names);
        assert_eq!(
            (a.counts.read, a.counts.write, a.counts.in_kernel),
            (Some(101), Some(5), Some(9))
        );
        assert_eq!(a.devices[&DeviceKey::named("parallel")], (100, 0));
        assert_eq!(a.devices[&DeviceKey::named("port 0x402")], (0, 5));
        assert_eq!(a.devices[&DeviceKey::named("port (unknown)")], (1, 0));
        // Without a map every port is by address.
        let a = attribute(
            &r,
            Some(ReadWriteSource::KvmTracepoints),
            &VmNames::default(),
        );
        assert!(a.devices.contains_key(&DeviceKey::named("port 0x378")));
    }

    #[test]
    fn callbacks_by_name_else_by_address() {
        let names: HashMap<u64, String> = [(0x1000, "uhci_frame_timer".to_string())].into();
        let r = raw(
            &[
                ((kind::TIMER_CALLBACK, 0x1000), 9000),
                ((kind::TIMER_CALLBACK, 0x2000), 3),
            ],
            &[],
        );
        let a = attribute(
            &r,
            None,
            &VmNames {
                callbacks: Some(&names),
                ..VmNames::default()
            },
        );
        assert_eq!(a.callbacks["uhci_frame_timer"], 9000);
        assert_eq!(a.callbacks["0x2000"], 3);
        assert_eq!(r.callback_ids().collect::<Vec<_>>(), [0x1000, 0x2000]);
    }
}
