//! Who each VM is: its QEMU process and command line, the libvirt domain that runs it, and
//! the memory map and well-known ports that name its devices.

pub mod cmdline;
pub mod devices;
pub mod discovery;
pub mod libvirt;
pub mod mtree;
pub mod ports;
pub mod procfs;
pub mod qmp;
pub mod threads;

#[cfg(test)]
pub(crate) mod fixtures {
    //! The VM tests start from: a TCG QEMU named and numbered as the test says.

    use super::{
        cmdline::{Accel, ParsedCmdline},
        discovery::{CpuTicks, QemuProcess, VmIdentity, VmKey},
    };

    /// VM `name` (process `pid`, TCG, no uuid, devices or libvirt domain).
    pub(crate) fn identity(name: &str, pid: u32) -> VmIdentity {
        VmIdentity {
            name: name.into(),
            pid,
            uuid: None,
            xen_domid: None,
            accel: Accel::Tcg,
            devices: Vec::new(),
            libvirt: None,
            guest_memory_bytes: None,
        }
    }

    /// Its QEMU process, started at `start_ticks`, no CPU used yet.
    pub(crate) fn process(pid: u32, start_ticks: u64, name: &str) -> QemuProcess {
        QemuProcess {
            key: VmKey { pid, start_ticks },
            identity: identity(name, pid).into(),
            cmdline: ParsedCmdline::default().into(),
            exe: std::path::Path::new("/usr/bin/qemu-system-x86_64").into(),
            cpu: CpuTicks::default(),
        }
    }
}
