//! Device classes: which regions, owner types, ports and timer callbacks are a VM's USB,
//! serial, parallel, ... emulation, and what operators do to disable it. One table, shown by
//! `profiler check --list-classes` and documented in docs/check.md; `check` judges records
//! by it and `ports` names a KVM guest's well-known ports from it.

/// What an operator changes to disable a class, and what that was measured to bring.
#[derive(Debug, Clone, Copy)]
pub struct Remedy {
    /// The QEMU command-line change.
    pub qemu: &'static str,
    /// The libvirt domain XML change.
    pub libvirt: &'static str,
    /// The reduction this tool measured on such guests, with where the measurement is written
    /// down (docs/check.md); empty when none was measured.
    pub measured: &'static str,
}

/// One class of emulated device.
#[derive(Debug, Clone, Copy)]
pub struct DeviceClass {
    /// The name used with `--quiet`.
    pub id: &'static str,
    pub title: &'static str,
    /// QEMU region names (`info mtree` / USDT / `mr->name`); `*` at either end is a wildcard.
    pub regions: &'static [&'static str],
    /// QOM types of the owning device; `*` at either end is a wildcard.
    pub owners: &'static [&'static str],
    /// Timer callbacks that run for this class.
    pub callbacks: &'static [&'static str],
    /// Fixed ISA I/O ports (first, last), for KVM guests whose ports are named by address.
    pub ports: &'static [(u64, u64)],
    /// Command-line devices that create it (`-device` drivers, `opt:value` shorthands);
    /// `*` at either end is a wildcard.
    pub cmdline: &'static [&'static str],
    /// The `default:<marker>` that [`crate::identity::cmdline::effective_devices`] emits when the
    /// machine creates such a device by default.
    pub default_marker: Option<&'static str>,
    pub remedy: Remedy,
}

impl DeviceClass {
    /// Whether a device (a region `name`, the QOM type of its `owner`) belongs to this class.
    pub fn has_device(&self, name: &str, owner: Option<&str>) -> bool {
        let base = base_name(name);
        self.regions.iter().any(|p| matches(p, base))
            || owner.is_some_and(|o| self.owners.iter().any(|p| matches(p, o)))
            || port_of(name)
                .is_some_and(|port| self.ports.iter().any(|&(a, b)| (a..=b).contains(&port)))
    }

    pub fn has_callback(&self, callback: &str) -> bool {
        self.callbacks.contains(&callback)
    }

    /// Whether the command line (with the machine's defaults, see
    /// [`crate::identity::cmdline::effective_devices`]) creates such a device.
    pub fn configured_by(&self, devices: &[String]) -> Option<String> {
        devices
            .iter()
            .find(|d| {
                self.cmdline.iter().any(|p| matches(p, d))
                    || self
                        .default_marker
                        .is_some_and(|m| d.strip_prefix("default:") == Some(m))
            })
            .cloned()
    }
}

/// `rtc @0000000000000001` (an alias at an offset) → `rtc`.
fn base_name(name: &str) -> &str {
    name.split(" @").next().unwrap_or(name)
}

/// `port 0x378` (a KVM port named by address) → 0x378; also `name (port 0x378, …)`.
fn port_of(name: &str) -> Option<u64> {
    let rest = &name[name.find("port 0x")? + "port 0x".len()..];
    let hex: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
    u64::from_str_radix(&hex, 16).ok()
}

/// `abc` exact, `abc*` prefix, `*abc` suffix, `*abc*` substring.
fn matches(pattern: &str, s: &str) -> bool {
    match (pattern.strip_prefix('*'), pattern.strip_suffix('*')) {
        (Some(_), Some(_)) => s.contains(&pattern[1..pattern.len() - 1]),
        (Some(suffix), None) => s.ends_with(suffix),
        (None, Some(prefix)) => s.starts_with(prefix),
        (None, None) => s == pattern,
    }
}

/// Every class `profiler check` knows.
pub const CLASSES: &[DeviceClass] = &[
    DeviceClass {
        id: "usb",
        title: "USB controllers (UHCI, OHCI, EHCI, xHCI) and their devices",
        regions: &[
            "uhci",
            "ohci",
            "ehci",
            "xhci",
            "capabilities",
            "operational",
            "runtime",
            "doorbell",
            "ports",
        ],
        owners: &[
            "piix3-usb-uhci",
            "piix4-usb-uhci",
            "ich9-usb-uhci*",
            "vt82c686b-usb-uhci",
            "pci-ohci",
            "sysbus-ohci",
            "usb-ehci",
            "ich9-usb-ehci*",
            "qemu-xhci",
            "nec-usb-xhci",
        ],
        callbacks: &[
            "uhci_frame_timer",
            "ohci_frame_boundary",
            "ehci_work_timer",
            "ehci_frame_timer",
            "xhci_mfwrap_timer",
            "usb_tablet_poll",
        ],
        ports: &[],
        cmdline: &[
            "usb",
            "usb-*",
            "*-usb-*",
            "qemu-xhci",
            "nec-usb-xhci",
            "pci-ohci",
            "sysbus-ohci",
        ],
        default_marker: None,
        remedy: Remedy {
            qemu: "drop `-usb` and `-device usb-tablet` (no USB), or put the tablet on xHCI: \
                   `-device qemu-xhci -device usb-tablet`",
            libvirt: "<controller type='usb' model='none'/> and no <input type='tablet' \
                      bus='usb'/>, or <controller type='usb' model='qemu-xhci'/>",
            measured: MEASURED_USB,
        },
    },
    DeviceClass {
        id: "serial",
        title: "16550 serial ports",
        regions: &["serial"],
        owners: &["isa-serial", "pci-serial*"],
        callbacks: &["fifo_timeout_int", "serial_update_msl", "serial_xmit"],
        ports: &[
            (0x3f8, 0x3ff),
            (0x2f8, 0x2ff),
            (0x3e8, 0x3ef),
            (0x2e8, 0x2ef),
        ],
        cmdline: &["serial:*", "isa-serial", "pci-serial*"],
        default_marker: Some("serial"),
        remedy: Remedy {
            qemu: "`-serial none` (and no `-device isa-serial`)",
            libvirt: "remove <serial> and <console type='pty'> (keep a virtio console if one is \
                      needed)",
            measured: "",
        },
    },
    DeviceClass {
        id: "parallel",
        title: "parallel port",
        regions: &["parallel"],
        owners: &["isa-parallel"],
        callbacks: &[],
        ports: &[(0x378, 0x37f), (0x278, 0x27f), (0x3bc, 0x3be)],
        cmdline: &["parallel:*", "isa-parallel"],
        default_marker: Some("parallel"),
        remedy: Remedy {
            qemu: "`-parallel none`",
            libvirt: "remove <parallel> (libvirt adds none by default)",
            measured: MEASURED_PARALLEL,
        },
    },
    DeviceClass {
        id: "ide",
        title: "IDE/ATAPI controllers and CD-ROM drives",
        regions: &["ide", "piix-bmdma", "bmdma"],
        owners: &["piix3-ide", "piix4-ide", "ide-*"],
        callbacks: &["ide_sector_read_cb", "ide_dma_cb"],
        ports: &[
            (0x1f0, 0x1f7),
            (0x170, 0x177),
            (0x3f6, 0x3f6),
            (0x376, 0x376),
        ],
        cmdline: &["cdrom:*", "ide-cd", "ide-hd", "ide-drive"],
        default_marker: None,
        remedy: Remedy {
            qemu: "no `-cdrom`/`-device ide-cd`; disks on virtio-blk/virtio-scsi",
            libvirt: "remove <disk device='cdrom'>; <target bus='virtio'/> or 'scsi' for disks",
            measured: "",
        },
    },
    DeviceClass {
        id: "floppy",
        title: "floppy controller",
        regions: &["fdc"],
        owners: &["isa-fdc"],
        callbacks: &["fdctrl_result_timer"],
        ports: &[(0x3f0, 0x3f5), (0x3f7, 0x3f7)],
        cmdline: &["isa-fdc", "floppy"],
        default_marker: Some("floppy"),
        remedy: Remedy {
            qemu: "the `pc` machine always has the controller; the `q35` machine has none",
            libvirt: "<os><type machine='q35'>, and no <disk device='floppy'>",
            measured: "",
        },
    },
    DeviceClass {
        id: "vga",
        title: "VGA and display devices",
        regions: &[
            "vga",
            "vga-lowmem",
            "vga ioports remapped",
            "vga.mmio",
            "vbe",
            "bochs dispi interface",
            "qemu extended regs",
            "edid",
        ],
        owners: &[
            "VGA",
            "cirrus-vga",
            "isa-vga",
            "bochs-display",
            "virtio-vga",
            "qxl-vga",
        ],
        callbacks: &["gui_update", "vga_update_display"],
        ports: &[
            (0x3b4, 0x3b5),
            (0x3ba, 0x3ba),
            (0x3c0, 0x3cf),
            (0x3d4, 0x3d5),
            (0x3da, 0x3da),
        ],
        cmdline: &[
            "vga:*",
            "VGA",
            "cirrus-vga",
            "qxl-vga",
            "virtio-vga",
            "bochs-display",
        ],
        default_marker: Some("vga"),
        remedy: Remedy {
            qemu: "`-vga none` (headless guests), or `-nographic`",
            libvirt: "<video><model type='none'/></video>",
            measured: "",
        },
    },
    DeviceClass {
        id: "hpet",
        title: "HPET",
        regions: &["hpet"],
        owners: &["hpet"],
        callbacks: &["hpet_timer"],
        ports: &[],
        cmdline: &[],
        default_marker: None,
        remedy: Remedy {
            qemu: "`-machine pc,hpet=off` (guests then use the PIT/TSC/kvmclock)",
            libvirt: "<clock><timer name='hpet' present='no'/></clock>",
            measured: "",
        },
    },
    DeviceClass {
        id: "rtc",
        title: "MC146818 RTC (CMOS)",
        regions: &["rtc", "rtc-index"],
        owners: &["mc146818rtc"],
        callbacks: &[
            "rtc_update_timer",
            "rtc_periodic_timer",
            "rtc_coalesced_timer",
        ],
        ports: &[(0x70, 0x71)],
        cmdline: &[],
        default_marker: None,
        remedy: Remedy {
            qemu: "built into every PC machine; a guest that polls it (old Windows) needs a \
                   paravirtual clock (kvmclock / Hyper-V enlightenments)",
            libvirt: "<clock offset='utc'><timer name='rtc' tickpolicy='catchup'/></clock>; \
                      Windows: <hyperv><stimer state='on'/></hyperv>",
            measured: "",
        },
    },
    DeviceClass {
        id: "pit",
        title: "i8254 PIT and PC speaker",
        regions: &["pit", "pcspk"],
        owners: &["isa-pit", "kvm-pit", "isa-pcspk"],
        callbacks: &["pit_irq_timer"],
        ports: &[(0x40, 0x43), (0x61, 0x61)],
        cmdline: &[],
        default_marker: None,
        remedy: Remedy {
            qemu: "built in; guests that tick from it benefit from `-machine pc,pit=off` only \
                   with a paravirtual clock",
            libvirt: "<clock><timer name='pit' tickpolicy='delay'/></clock>",
            measured: "",
        },
    },
    DeviceClass {
        id: "ps2",
        title: "i8042 keyboard/mouse controller",
        regions: &["i8042-data", "i8042-cmd"],
        owners: &["i8042"],
        callbacks: &["ps2_mouse_event"],
        ports: &[(0x60, 0x60), (0x64, 0x64)],
        cmdline: &[],
        default_marker: None,
        remedy: Remedy {
            qemu: "`-machine pc,i8042=off` (QEMU ≥ 7.0) when no PS/2 input is used",
            libvirt: "<features><ps2 state='off'/></features>",
            measured: "",
        },
    },
];

/// What this tool measured for USB: `cargo xtask bench remedies` (docs/benchmarks.md).
pub const MEASURED_USB: &str = "a USB tablet on UHCI: 942 timer events/s and 5.7 % of a core \
     (uhci_frame_timer 931/s); the same tablet on xHCI: 9/s and 0.5 %; no USB: 9/s and 0.5 % \
     (TCG test guests side by side, `cargo xtask bench remedies`, docs/benchmarks.md)";
/// What this tool measured for the parallel port: `cargo xtask bench remedies`.
pub const MEASURED_PARALLEL: &str = "a Linux guest's driver touched it 297 times, all at boot, \
     none after; `-parallel none` removes those (`cargo xtask bench remedies`, \
     docs/benchmarks.md)";

/// The class named `id`.
pub fn class(id: &str) -> Option<&'static DeviceClass> {
    CLASSES.iter().find(|c| c.id == id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_by_name_owner_and_port() {
        let usb = class("usb").unwrap();
        assert!(usb.has_device("uhci", None));
        assert!(usb.has_device("operational", Some("qemu-xhci")));
        assert!(usb.has_device("capabilities", Some("ich9-usb-ehci1")));
        assert!(!usb.has_device("hpet", Some("hpet")));
        let rtc = class("rtc").unwrap();
        assert!(rtc.has_device("rtc @0000000000000001", None));
        let parallel = class("parallel").unwrap();
        assert!(parallel.has_device("port 0x37a", None));
        assert!(!parallel.has_device("port 0x3f8", None));
        assert!(class("serial").unwrap().has_device("port 0x3f8", None));
        assert!(usb.has_callback("uhci_frame_timer"));
        assert!(!usb.has_callback("apic_timer"));
    }

    #[test]
    fn configured_by_the_command_line_or_the_machine() {
        let devices: Vec<String> = ["usb", "usb-tablet", "serial:file", "default:parallel"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            class("usb").unwrap().configured_by(&devices).as_deref(),
            Some("usb")
        );
        assert_eq!(
            class("serial").unwrap().configured_by(&devices).as_deref(),
            Some("serial:file")
        );
        assert_eq!(
            class("parallel")
                .unwrap()
                .configured_by(&devices)
                .as_deref(),
            Some("default:parallel")
        );
        assert_eq!(class("vga").unwrap().configured_by(&devices), None);
        assert!(
            class("usb")
                .unwrap()
                .configured_by(&["piix3-usb-uhci".to_string()])
                .is_some()
        );
    }

    #[test]
    fn ids_are_unique_and_lowercase() {
        let mut ids: Vec<&str> = CLASSES.iter().map(|c| c.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), CLASSES.len());
        assert!(ids.iter().all(|i| {
            i.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        }));
    }
}
