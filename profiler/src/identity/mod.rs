//! Who each VM is: its QEMU process and command line, the libvirt domain that runs it, and
//! the memory map and well-known ports that name its devices.

pub mod cmdline;
pub mod devices;
pub mod discovery;
pub mod libvirt;
pub mod mtree;
pub mod ports;
pub mod qmp;
