//! The fixed ISA I/O ports of QEMU's PC machines, for KVM guests whose accesses are counted by
//! port (the kvm tracepoints) when QEMU's own memory map (`info mtree -f` over QMP) is not at
//! hand — the usual case under libvirt, which holds the monitor. A port is named only when the
//! VM has such a device (its command line, the machine's defaults, libvirt's devices), and
//! the name says it was taken from a well-known address: `serial (serial0, port 0x3f8,
//! well-known)`. Region names are QEMU's own (as `info mtree` shows them on a `pc` machine).

use crate::identity::{devices::class, libvirt::LibvirtDomain};

/// When a port range belongs to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Present {
    /// Every PC machine has it (RTC, PIT, i8042, fw_cfg, PCI config, ...).
    Always,
    /// When the VM has a device of this `profiler check` class.
    Class(&'static str),
}

/// One well-known port range: QEMU's region name, and which instance it is (COM1 = 0).
#[derive(Debug, Clone, Copy)]
struct WellKnown {
    first: u64,
    last: u64,
    region: &'static str,
    present: Present,
    /// Serial/parallel port index (libvirt's `<target port='N'/>`).
    index: Option<u32>,
}

const fn wk(first: u64, last: u64, region: &'static str, present: Present) -> WellKnown {
    WellKnown {
        first,
        last,
        region,
        present,
        index: None,
    }
}

const fn indexed(
    first: u64,
    last: u64,
    region: &'static str,
    class: &'static str,
    index: u32,
) -> WellKnown {
    WellKnown {
        first,
        last,
        region,
        present: Present::Class(class),
        index: Some(index),
    }
}

use Present::{Always, Class};

const TABLE: &[WellKnown] = &[
    indexed(0x3f8, 0x3ff, "serial", "serial", 0),
    indexed(0x2f8, 0x2ff, "serial", "serial", 1),
    indexed(0x3e8, 0x3ef, "serial", "serial", 2),
    indexed(0x2e8, 0x2ef, "serial", "serial", 3),
    indexed(0x378, 0x37f, "parallel", "parallel", 0),
    indexed(0x278, 0x27f, "parallel", "parallel", 1),
    indexed(0x3bc, 0x3be, "parallel", "parallel", 2),
    wk(0x70, 0x70, "rtc-index", Always),
    wk(0x71, 0x71, "rtc", Always),
    wk(0x40, 0x43, "pit", Always),
    wk(0x61, 0x61, "pcspk", Always),
    wk(0x60, 0x60, "i8042-data", Always),
    wk(0x64, 0x64, "i8042-cmd", Always),
    wk(0x20, 0x21, "pic", Always),
    wk(0xa0, 0xa1, "pic", Always),
    wk(0x4d0, 0x4d1, "elcr", Always),
    wk(0x80, 0x80, "ioport80", Always),
    wk(0x92, 0x92, "port92", Always),
    wk(0xb2, 0xb3, "apm-io", Always),
    wk(0x510, 0x511, "fwcfg", Always),
    wk(0x514, 0x51b, "fwcfg.dma", Always),
    wk(0xcf8, 0xcfb, "pci-conf-idx", Always),
    wk(0xcfc, 0xcff, "pci-conf-data", Always),
    wk(0x600, 0x603, "acpi-evt", Always),
    wk(0x604, 0x605, "acpi-cnt", Always),
    wk(0x608, 0x60b, "acpi-tmr", Always),
    wk(0x3f1, 0x3f5, "fdc", Class("floppy")),
    wk(0x3f7, 0x3f7, "fdc", Class("floppy")),
    wk(0x1f0, 0x1f7, "ide", Class("ide")),
    wk(0x170, 0x177, "ide", Class("ide")),
    wk(0x3f6, 0x3f6, "ide", Class("ide")),
    wk(0x376, 0x376, "ide", Class("ide")),
    wk(0x3b4, 0x3b5, "vga", Class("vga")),
    wk(0x3ba, 0x3ba, "vga", Class("vga")),
    wk(0x3c0, 0x3cf, "vga", Class("vga")),
    wk(0x3d4, 0x3d5, "vga", Class("vga")),
    wk(0x3da, 0x3da, "vga", Class("vga")),
];

/// What a VM has, to decide which well-known ports are its devices.
#[derive(Debug, Clone, Copy, Default)]
pub struct VmDevices<'a> {
    /// [`crate::identity::cmdline::effective_devices`].
    pub cmdline: &'a [String],
    pub libvirt: Option<&'a LibvirtDomain>,
}

impl VmDevices<'_> {
    /// Whether the VM has the `index`th device of `class_id` (COM2 is serial index 1): libvirt
    /// says by its `<target port='N'/>`; a command line by how many such devices it creates.
    fn has_index(&self, class_id: &str, index: u32) -> bool {
        if let Some(l) = self.libvirt
            && l.devices.iter().any(|d| d.kind == class_id)
        {
            return l
                .devices
                .iter()
                .any(|d| d.kind == class_id && d.index.unwrap_or(0) == index);
        }
        let Some(c) = class(class_id) else {
            return false;
        };
        let count = self
            .cmdline
            .iter()
            .filter(|d| c.configured_by(std::slice::from_ref(d)).is_some())
            .count();
        (index as usize) < count
    }

    fn has(&self, class_id: &str) -> bool {
        let from_cmdline = class(class_id).is_some_and(|c| c.configured_by(self.cmdline).is_some());
        let from_libvirt = self
            .libvirt
            .is_some_and(|l| l.devices.iter().any(|d| d.kind == class_id));
        from_cmdline || from_libvirt
    }

    fn alias(&self, kind: &str, index: u32) -> Option<&str> {
        self.libvirt?
            .devices
            .iter()
            .find(|d| d.kind == kind && d.index == Some(index))?
            .alias
            .as_deref()
    }
}

/// The name of I/O port `port` of a VM with `devices`, from the well-known PC table, marked as
/// such; `None` when the port is not a well-known one of a device the VM has.
pub fn well_known_port_name(port: u64, devices: VmDevices<'_>) -> Option<String> {
    let w = TABLE.iter().find(|w| (w.first..=w.last).contains(&port))?;
    let present = match (w.present, w.index) {
        (Always, _) => true,
        (Class(c), Some(i)) => devices.has_index(c, i),
        (Class(c), None) => devices.has(c),
    };
    if !present {
        return None;
    }
    let alias = match (w.present, w.index) {
        (Class(kind), Some(i)) => devices.alias(kind, i),
        _ => None,
    };
    Some(match alias {
        Some(alias) => format!("{} ({alias}, port {port:#x}, well-known)", w.region),
        None => format!("{} (port {port:#x}, well-known)", w.region),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::libvirt::LibvirtDevice;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn ports_of_devices_the_vm_has() {
        let cmdline = strings(&["isa-serial", "default:parallel", "default:floppy"]);
        let d = VmDevices {
            cmdline: &cmdline,
            libvirt: None,
        };
        assert_names(
            d,
            &[
                (0x3f8, Some("serial (port 0x3f8, well-known)")),
                (0x37a, Some("parallel (port 0x37a, well-known)")),
                (0x71, Some("rtc (port 0x71, well-known)")),
                // No VGA on this VM, and 0x1234 is nothing well known.
                (0x3d4, None),
                (0x1234, None),
            ],
        );
        assert!(
            well_known_port_name(0x3f5, d).is_some(),
            "the pc machine's floppy"
        );
        // Without a parallel port, its ports stay by address.
        let none = VmDevices::default();
        assert_eq!(well_known_port_name(0x378, none), None);
        assert!(well_known_port_name(0x70, none).is_some());
    }

    #[test]
    fn libvirt_devices_and_aliases() {
        let domain = LibvirtDomain {
            name: "d".into(),
            devices: vec![
                LibvirtDevice {
                    kind: "serial".into(),
                    index: Some(0),
                    alias: Some("serial0".into()),
                    model: Some("isa-serial".into()),
                },
                LibvirtDevice {
                    kind: "parallel".into(),
                    index: Some(0),
                    alias: Some("parallel0".into()),
                    model: None,
                },
            ],
            ..LibvirtDomain::default()
        };
        let d = VmDevices {
            cmdline: &[],
            libvirt: Some(&domain),
        };
        assert_names(
            d,
            &[
                (0x3fd, Some("serial (serial0, port 0x3fd, well-known)")),
                (0x378, Some("parallel (parallel0, port 0x378, well-known)")),
                // COM2 and LPT2 are probed by firmware but not configured: by address.
                (0x2f8, None),
                (0x278, None),
            ],
        );
    }

    fn assert_names(d: VmDevices<'_>, cases: &[(u64, Option<&str>)]) {
        crate::testing::assert_maps(
            |port| well_known_port_name(port, d),
            &cases
                .iter()
                .map(|&(port, want)| (port, want.map(String::from)))
                .collect::<Vec<_>>(),
        );
    }
}
