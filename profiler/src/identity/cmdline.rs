//! Parsing a QEMU command line: VM identity, accelerator, emulated devices, QMP sockets.
//!
//! Pure functions over `argv`; no I/O. Command lines come from `/proc/PID/cmdline` and are set
//! by whoever started QEMU, so nothing here trusts them beyond splitting strings.

use serde::{Deserialize, Serialize};

/// The accelerator a VM runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
    Xen,
    /// Neither the command line nor the process's open files tell.
    Unknown,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
            Accel::Xen => "xen",
            Accel::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a QMP monitor listens, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QmpEndpoint {
    Unix(String),
    Tcp { host: String, port: u16 },
}

/// What a QEMU command line says about its VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParsedCmdline {
    /// `-name guest=NAME` or `-name NAME`.
    pub name: Option<String>,
    pub uuid: Option<String>,
    pub xen_domid: Option<u32>,
    /// Accelerators asked for, in order of preference (`-accel`, `-machine accel=a:b`,
    /// `-enable-kvm`, `-xen-domid`).
    pub requested_accels: Vec<Accel>,
    /// `-machine` type (`pc`, `q35`, `xenfv`, ...), when given.
    pub machine: Option<String>,
    /// Emulated devices named on the command line: `-device` drivers and the shorthand options
    /// (`-usb`, `-serial`, `-parallel`, `-vga`, `-nic`, `-cdrom`, ...), in order.
    pub devices: Vec<String>,
    /// QMP monitors (`-qmp`, or `-chardev socket` + `-mon mode=control`).
    pub qmp: Vec<QmpEndpoint>,
    /// `-nodefaults`: no default serial, parallel, VGA, ... devices.
    #[serde(default)]
    pub nodefaults: bool,
    /// Default devices turned off with `-<opt> none` (`serial`, `parallel`, `vga`, ...).
    #[serde(default)]
    pub disabled: Vec<String>,
    /// `-m`: the guest's RAM, bytes (`None`: not given, QEMU's default).
    #[serde(default)]
    pub memory_bytes: Option<u64>,
}

/// The guest RAM QEMU gives an x86 machine without `-m`.
pub const DEFAULT_GUEST_MEMORY: u64 = 128 << 20;

/// `-m`'s size: `512` (MiB), `512M`, `4G`, `4096m`, `size=4G,slots=2,maxmem=8G`.
pub fn parse_memory_size(value: &str) -> Option<u64> {
    let size = opt_value(value, "size", Some("size"))?;
    let size = size.trim();
    let (digits, unit) = match size.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => size.split_at(i),
        None => (size, "M"),
    };
    let n: f64 = digits.parse().ok()?;
    let scale: u64 = match unit.to_ascii_uppercase().trim_end_matches(['B', 'I']) {
        "K" => 1 << 10,
        "M" | "" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return None,
    };
    Some((n * scale as f64) as u64)
}

/// Shorthand options whose device the `pc` and `q35` machines create by default.
const DEFAULT_DEVICE_OPTIONS: &[&str] = &["serial", "parallel", "vga"];

/// The devices a VM really has, as far as its command line tells: the explicit ones, then
/// `default:<opt>` for each device the machine creates by default (a serial port, a parallel
/// port, VGA unless `-nodefaults` or `-<opt> none`; the floppy controller the `pc` machine
/// always has).
pub fn effective_devices(p: &ParsedCmdline) -> Vec<String> {
    let mut out = p.devices.clone();
    let pc_like =
        |m: &str| m == "pc" || m.starts_with("pc-i440fx") || m.starts_with("pc-q35") || m == "q35";
    let machine = p.machine.as_deref().unwrap_or("pc");
    if !pc_like(machine) {
        return out;
    }
    if !p.nodefaults {
        for opt in DEFAULT_DEVICE_OPTIONS {
            let explicit = p.devices.iter().any(|d| d.starts_with(&format!("{opt}:")));
            if !explicit && !p.disabled.iter().any(|d| d == opt) {
                out.push(format!("default:{opt}"));
            }
        }
    }
    if machine == "pc" || machine.starts_with("pc-i440fx") {
        out.push("default:floppy".into());
    }
    out
}

/// Splits a QemuOpts string (`a=b,c=d`) into key/value pairs. A doubled comma is a literal
/// comma. The first element may be a bare value (the option's implied key).
pub fn split_opts(s: &str) -> Vec<(Option<String>, String)> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                current.push(',');
            } else {
                parts.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    parts.push(current);
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (Some(k.to_string()), v.to_string()),
            None => (None, p),
        })
        .collect()
}

/// Looks up `key` in a QemuOpts string; `implied` names the key a leading bare value has.
fn opt_value(s: &str, key: &str, implied: Option<&str>) -> Option<String> {
    split_opts(s).into_iter().find_map(|(k, v)| match k {
        Some(k) if k == key => Some(v),
        None if implied == Some(key) => Some(v),
        _ => None,
    })
}

fn parse_accel_name(s: &str) -> Accel {
    match s {
        "kvm" => Accel::Kvm,
        "tcg" => Accel::Tcg,
        "xen" => Accel::Xen,
        _ => Accel::Unknown,
    }
}

/// Options that take an argument; used to step over values we do not interpret.
const OPTIONS_WITH_ARG: &[&str] = &[
    "name",
    "uuid",
    "xen-domid",
    "accel",
    "machine",
    "M",
    "device",
    "usbdevice",
    "serial",
    "parallel",
    "vga",
    "nic",
    "net",
    "netdev",
    "cdrom",
    "drive",
    "blockdev",
    "qmp",
    "qmp-pretty",
    "chardev",
    "mon",
    "monitor",
    "m",
    "smp",
    "cpu",
    "kernel",
    "initrd",
    "append",
    "L",
    "bios",
    "display",
    "vnc",
    "spice",
    "object",
    "global",
    "smbios",
    "boot",
    "rtc",
    "pidfile",
    "runas",
    "sandbox",
    "msg",
    "overcommit",
    "audiodev",
    "hda",
    "hdb",
    "hdc",
    "hdd",
    "fda",
    "fdb",
    "numa",
    "fsdev",
    "virtfs",
    "incoming",
    "loadvm",
    "D",
    "d",
    "trace",
    "k",
    "icount",
    "action",
    "add-fd",
    "fw_cfg",
    "xen-attach",
    "xen-domid-restrict",
    "debugcon",
    "gdb",
    "semihosting-config",
    "watchdog-action",
    "plugin",
    "compat",
    "machine-type",
    "smp-opts",
    "tpmdev",
    "iscsi",
    "set",
    "sd",
    "mtdblock",
    "pflash",
    "option-rom",
    "g",
    "soundhw",
    "watchdog",
    "mem-path",
    "echr",
    "chroot",
    "cpu-throttle",
    "run-with",
];

/// Parses QEMU's argv (argv[0] included).
pub fn parse_cmdline(argv: &[String]) -> ParsedCmdline {
    let mut parsed = ParsedCmdline::default();
    // chardev id -> socket endpoint, resolved against -mon afterwards.
    let mut socket_chardevs: Vec<(String, QmpEndpoint)> = Vec::new();
    let mut control_monitors: Vec<String> = Vec::new();

    let mut i = 1;
    while i < argv.len() {
        let raw = &argv[i];
        i += 1;
        let Some(opt) = raw.strip_prefix("--").or_else(|| raw.strip_prefix('-')) else {
            // A bare argument is a disk image (`qemu-system-x86_64 disk.img`).
            continue;
        };
        // `-opt=value` is accepted by QEMU for long options too.
        let (opt, inline_value) = match opt.split_once('=') {
            Some((o, v)) if OPTIONS_WITH_ARG.contains(&o) => (o, Some(v.to_string())),
            _ => (opt, None),
        };
        let takes_arg = OPTIONS_WITH_ARG.contains(&opt);
        let value = if takes_arg {
            match inline_value {
                Some(v) => Some(v),
                None => {
                    let v = argv.get(i).cloned();
                    i += 1;
                    v
                }
            }
        } else {
            None
        };
        let value_str = value.as_deref().unwrap_or("");
        match opt {
            "name" => {
                parsed.name = opt_value(value_str, "guest", Some("guest")).filter(|n| !n.is_empty())
            }
            "uuid" => parsed.uuid = Some(value_str.to_string()).filter(|u| !u.is_empty()),
            "m" => parsed.memory_bytes = parse_memory_size(value_str),
            "xen-domid" => {
                parsed.xen_domid = value_str.parse().ok();
                parsed.requested_accels.push(Accel::Xen);
            }
            "enable-kvm" => parsed.requested_accels.push(Accel::Kvm),
            "accel" => {
                if let Some(a) = opt_value(value_str, "accel", Some("accel")) {
                    parsed.requested_accels.push(parse_accel_name(&a));
                }
            }
            "machine" | "M" => {
                if let Some(t) = opt_value(value_str, "type", Some("type")) {
                    if t.starts_with("xenfv") || t == "xenpv" {
                        parsed.requested_accels.push(Accel::Xen);
                    }
                    parsed.machine = Some(t);
                }
                if let Some(list) = opt_value(value_str, "accel", None) {
                    parsed
                        .requested_accels
                        .extend(list.split(':').map(parse_accel_name));
                }
            }
            "device" => {
                // libvirt ≥ 8 passes -device as JSON.
                let driver = if value_str.starts_with('{') {
                    serde_json::from_str::<serde_json::Value>(value_str)
                        .ok()
                        .and_then(|v| v.get("driver")?.as_str().map(str::to_string))
                } else {
                    opt_value(value_str, "driver", Some("driver"))
                };
                if let Some(driver) = driver {
                    parsed.devices.push(driver);
                }
            }
            "usb" => parsed.devices.push("usb".to_string()),
            "usbdevice" => parsed.devices.push(format!("usb-{value_str}")),
            "serial" | "parallel" | "vga" | "nic" | "cdrom" | "soundhw" | "watchdog"
                if value_str != "none" =>
            {
                // The backend or model only: `-serial file:/var/log/x` is `serial:file` (a
                // path says nothing about the device, and may say too much about the host).
                let kind = if opt == "cdrom" {
                    "image"
                } else {
                    value_str.split([':', ',']).next().unwrap_or(value_str)
                };
                parsed.devices.push(format!("{opt}:{kind}"));
            }
            "serial" | "parallel" | "vga" | "nic" => parsed.disabled.push(opt.to_string()),
            "nodefaults" => parsed.nodefaults = true,
            "qmp" | "qmp-pretty" => {
                if let Some(ep) = parse_chardev_spec(value_str) {
                    parsed.qmp.push(ep);
                }
            }
            "chardev" => {
                let opts = split_opts(value_str);
                let backend = opts.first().and_then(|(k, v)| match k {
                    None => Some(v.clone()),
                    Some(k) if k == "backend" => Some(v.clone()),
                    _ => None,
                });
                let id = opt_value(value_str, "id", None);
                if let (Some(backend), Some(id)) = (backend, id)
                    && backend == "socket"
                {
                    if let Some(path) = opt_value(value_str, "path", None) {
                        socket_chardevs.push((id, QmpEndpoint::Unix(path)));
                    } else if let (Some(host), Some(port)) = (
                        opt_value(value_str, "host", None),
                        opt_value(value_str, "port", None).and_then(|p| p.parse().ok()),
                    ) {
                        socket_chardevs.push((id, QmpEndpoint::Tcp { host, port }));
                    }
                }
            }
            "mon" => {
                let mode = opt_value(value_str, "mode", None);
                if mode.as_deref() == Some("control")
                    && let Some(chardev) = opt_value(value_str, "chardev", Some("chardev"))
                {
                    control_monitors.push(chardev);
                }
            }
            _ => {}
        }
    }
    for chardev in control_monitors {
        if let Some((_, ep)) = socket_chardevs.iter().find(|(id, _)| *id == chardev) {
            parsed.qmp.push(ep.clone());
        }
    }
    parsed
}

/// Parses a `-qmp` value: `unix:PATH[,server...]` or `tcp:HOST:PORT[,server...]`.
fn parse_chardev_spec(s: &str) -> Option<QmpEndpoint> {
    let main = split_opts(s).into_iter().next().map(|(k, v)| match k {
        Some(k) => format!("{k}={v}"),
        None => v,
    })?;
    if let Some(path) = main.strip_prefix("unix:") {
        return Some(QmpEndpoint::Unix(path.to_string()));
    }
    if let Some(rest) = main.strip_prefix("tcp:") {
        let (host, port) = rest.rsplit_once(':')?;
        return Some(QmpEndpoint::Tcp {
            host: if host.is_empty() {
                "127.0.0.1".into()
            } else {
                host.into()
            },
            port: port.parse().ok()?,
        });
    }
    None
}

/// Whether a process is a QEMU system emulator, from its executable and argv[0] names.
pub fn is_qemu_binary(name: &str) -> bool {
    let base = name.rsplit('/').next().unwrap_or(name);
    let base = base.strip_suffix(" (deleted)").unwrap_or(base);
    base.starts_with("qemu-system-") || base == "qemu-kvm" || base == "qemu-dm" || base == "kvm"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    /// A libvirt-started guest, as in /var/log/libvirt/qemu/NAME.log on Debian 12 (libvirt 9).
    const LIBVIRT: &[&str] = &[
        "/usr/bin/qemu-system-x86_64",
        "-name",
        "guest=web01,debug-threads=on",
        "-S",
        "-object",
        "{\"qom-type\":\"secret\",\"id\":\"masterKey0\",\"format\":\"raw\",\"file\":\"/var/lib/libvirt/qemu/domain-3-web01/master-key.aes\"}",
        "-machine",
        "pc-q35-7.2,usb=off,vmport=off,dump-guest-core=off,memory-backend=pc.ram",
        "-accel",
        "kvm",
        "-cpu",
        "host,migratable=on",
        "-m",
        "2048",
        "-object",
        "{\"qom-type\":\"memory-backend-ram\",\"id\":\"pc.ram\",\"size\":2147483648}",
        "-overcommit",
        "mem-lock=off",
        "-smp",
        "2,sockets=2,cores=1,threads=1",
        "-uuid",
        "5b1f4a0e-2c55-4b43-9a5f-0e3c9d6a7d11",
        "-no-user-config",
        "-nodefaults",
        "-chardev",
        "socket,id=charmonitor,fd=31,server=on,wait=off",
        "-mon",
        "chardev=charmonitor,id=monitor,mode=control",
        "-rtc",
        "base=utc,driftfix=slew",
        "-global",
        "kvm-pit.lost_tick_policy=delay",
        "-no-hpet",
        "-no-shutdown",
        "-boot",
        "strict=on",
        "-device",
        "{\"driver\":\"pcie-root-port\",\"port\":16,\"chassis\":1,\"id\":\"pci.1\",\"bus\":\"pcie.0\",\"multifunction\":true,\"addr\":\"0x2\"}",
        "-device",
        "qemu-xhci,p2=15,p3=15,id=usb,bus=pci.2,addr=0x0",
        "-device",
        "usb-tablet,id=input0,bus=usb.0,port=1",
        "-audiodev",
        "{\"id\":\"audio1\",\"driver\":\"none\"}",
        "-vnc",
        "127.0.0.1:0,audiodev=audio1",
        "-device",
        "virtio-vga,id=video0,max_outputs=1,bus=pcie.0,addr=0x1",
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-msg",
        "timestamp=on",
    ];

    #[test]
    fn libvirt_guest() {
        let p = parse_cmdline(&argv(LIBVIRT));
        assert_eq!(p.name.as_deref(), Some("web01"));
        assert_eq!(
            p.uuid.as_deref(),
            Some("5b1f4a0e-2c55-4b43-9a5f-0e3c9d6a7d11")
        );
        assert_eq!(p.requested_accels, vec![Accel::Kvm]);
        assert_eq!(p.machine.as_deref(), Some("pc-q35-7.2"));
        assert_eq!(
            p.devices,
            vec!["pcie-root-port", "qemu-xhci", "usb-tablet", "virtio-vga"]
        );
        // The monitor is passed as an fd, so there is no socket path to connect to.
        assert!(p.qmp.is_empty());
    }

    #[test]
    fn openstack_nova_guest() {
        // Nova via libvirt: the name is the instance name, the uuid the Nova instance uuid.
        let p = parse_cmdline(&argv(&[
            "/usr/libexec/qemu-kvm",
            "-name",
            "guest=instance-0000002a,debug-threads=on",
            "-machine",
            "pc-i440fx-rhel7.6.0,accel=kvm,usb=off,dump-guest-core=off",
            "-cpu",
            "Skylake-Server-IBRS",
            "-m",
            "4096",
            "-uuid",
            "8f2a2c4c-6a0f-4b0e-bb4d-3c1f5b0f2e9a",
            "-smbios",
            "type=1,manufacturer=RDO,product=OpenStack Compute,version=20.6.0,serial=8f2a2c4c,uuid=8f2a2c4c-6a0f-4b0e-bb4d-3c1f5b0f2e9a,family=Virtual Machine",
            "-chardev",
            "socket,id=charmonitor,path=/var/lib/libvirt/qemu/domain-7-instance-0000002a/monitor.sock,server=on,wait=off",
            "-mon",
            "chardev=charmonitor,id=monitor,mode=control",
            "-device",
            "piix3-usb-uhci,id=usb,bus=pci.0,addr=0x1.0x2",
            "-device",
            "usb-tablet,id=input0,bus=usb.0,port=1",
            "-device",
            "cirrus-vga,id=video0,bus=pci.0,addr=0x2",
        ]));
        assert_eq!(p.name.as_deref(), Some("instance-0000002a"));
        assert_eq!(
            p.uuid.as_deref(),
            Some("8f2a2c4c-6a0f-4b0e-bb4d-3c1f5b0f2e9a")
        );
        assert_eq!(p.requested_accels, vec![Accel::Kvm]);
        assert_eq!(
            p.devices,
            vec!["piix3-usb-uhci", "usb-tablet", "cirrus-vga"]
        );
        assert_eq!(
            p.qmp,
            vec![QmpEndpoint::Unix(
                "/var/lib/libvirt/qemu/domain-7-instance-0000002a/monitor.sock".into()
            )]
        );
    }

    #[test]
    fn xen_device_model() {
        // libxl's upstream device model for an HVM guest.
        let p = parse_cmdline(&argv(&[
            "/usr/lib/xen/bin/qemu-system-i386",
            "-xen-domid",
            "12",
            "-chardev",
            "socket,id=libxl-cmd,path=/var/run/xen/qmp-libxl-12,server,nowait",
            "-no-shutdown",
            "-mon",
            "chardev=libxl-cmd,mode=control",
            "-chardev",
            "socket,id=libxenstat-cmd,path=/var/run/xen/qmp-libxenstat-12,server,nowait",
            "-mon",
            "chardev=libxenstat-cmd,mode=control",
            "-nodefaults",
            "-no-user-config",
            "-name",
            "win7-pool-03",
            "-vnc",
            "127.0.0.1:0,to=99",
            "-display",
            "none",
            "-serial",
            "pty",
            "-device",
            "cirrus-vga,vgamem_mb=8",
            "-boot",
            "order=cda",
            "-usb",
            "-usbdevice",
            "tablet",
            "-smp",
            "2,maxcpus=2",
            "-net",
            "none",
            "-machine",
            "xenfv",
            "-m",
            "2040",
        ]));
        assert_eq!(p.name.as_deref(), Some("win7-pool-03"));
        assert_eq!(p.xen_domid, Some(12));
        assert_eq!(p.requested_accels, vec![Accel::Xen, Accel::Xen]);
        assert_eq!(p.machine.as_deref(), Some("xenfv"));
        assert_eq!(
            p.devices,
            vec!["serial:pty", "cirrus-vga", "usb", "usb-tablet"]
        );
        assert_eq!(p.qmp.len(), 2);
        assert_eq!(
            p.qmp[0],
            QmpEndpoint::Unix("/var/run/xen/qmp-libxl-12".into())
        );
    }

    #[test]
    fn plain_command_lines() {
        let p = parse_cmdline(&argv(&[
            "qemu-system-x86_64",
            "-machine",
            "pc,accel=kvm:tcg",
            "-name",
            "noisy",
            "-qmp",
            "unix:/run/noisy.qmp,server=on,wait=off",
            "-usb",
            "-device",
            "usb-tablet",
            "-parallel",
            "none",
            "disk.img",
        ]));
        assert_eq!(p.name.as_deref(), Some("noisy"));
        assert_eq!(p.requested_accels, vec![Accel::Kvm, Accel::Tcg]);
        assert_eq!(p.devices, vec!["usb", "usb-tablet"]);
        assert_eq!(p.qmp, vec![QmpEndpoint::Unix("/run/noisy.qmp".into())]);

        let p = parse_cmdline(&argv(&["qemu-kvm", "--enable-kvm", "--name=db,process=db"]));
        assert_eq!(p.name.as_deref(), Some("db"));
        assert_eq!(p.requested_accels, vec![Accel::Kvm]);

        let p = parse_cmdline(&argv(&[
            "qemu-system-x86_64",
            "-qmp",
            "tcp:localhost:4444,server",
        ]));
        assert_eq!(
            p.qmp,
            vec![QmpEndpoint::Tcp {
                host: "localhost".into(),
                port: 4444
            }]
        );
    }

    #[test]
    fn names_with_commas_and_garbage() {
        let p = parse_cmdline(&argv(&[
            "qemu-system-x86_64",
            "-name",
            "guest=a,,b,debug-threads=on",
        ]));
        assert_eq!(p.name.as_deref(), Some("a,b"));
        // A name with control characters is kept verbatim; display code sanitizes it.
        let p = parse_cmdline(&argv(&["qemu-system-x86_64", "-name", "evil\x1b[2J"]));
        assert_eq!(p.name.as_deref(), Some("evil\x1b[2J"));
        // Truncated command lines do not panic.
        let p = parse_cmdline(&argv(&["qemu-system-x86_64", "-name"]));
        assert_eq!(p.name, None);
        let p = parse_cmdline(&argv(&["qemu-system-x86_64", "-xen-domid", "x"]));
        assert_eq!(p.xen_domid, None);
        assert_eq!(parse_cmdline(&[]), ParsedCmdline::default());
    }

    #[test]
    fn qemu_binary_names() {
        assert!(is_qemu_binary("/usr/bin/qemu-system-x86_64"));
        assert!(is_qemu_binary("/usr/libexec/qemu-kvm"));
        assert!(is_qemu_binary("/usr/bin/qemu-system-x86_64 (deleted)"));
        assert!(!is_qemu_binary("/usr/bin/qemu-img"));
        assert!(!is_qemu_binary("/usr/bin/qemu-x86_64")); // user-mode emulation, no devices
        assert!(!is_qemu_binary("bash"));
    }

    #[test]
    fn effective_devices_add_the_machine_defaults() {
        let argv = |s: &str| -> Vec<String> { s.split_whitespace().map(String::from).collect() };
        let p = parse_cmdline(&argv(
            "qemu-system-x86_64 -usb -device usb-tablet -serial file:/x",
        ));
        assert_eq!(
            effective_devices(&p),
            [
                "usb",
                "usb-tablet",
                "serial:file",
                "default:parallel",
                "default:vga",
                "default:floppy"
            ]
        );
        let p = parse_cmdline(&argv(
            "qemu-system-x86_64 -machine q35 -parallel none -vga none",
        ));
        assert_eq!(p.disabled, ["parallel", "vga"]);
        assert_eq!(effective_devices(&p), ["default:serial"]);
        let p = parse_cmdline(&argv(
            "qemu-system-x86_64 -nodefaults -machine pc,accel=kvm",
        ));
        assert!(p.nodefaults);
        assert_eq!(effective_devices(&p), ["default:floppy"]);
        let p = parse_cmdline(&argv("qemu-system-x86_64 -machine microvm"));
        assert!(effective_devices(&p).is_empty());
    }
}
