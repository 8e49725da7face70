//! Test guests for KVM on machines whose KVM runs only firmware-level guests (this project's
//! test hosts have PVM, which runs SeaBIOS and real-mode code but not the Linux test guest):
//! a 512-byte boot sector that SeaBIOS runs from an IDE disk. It prints a line to the debug
//! console (port 0xe9), then either sets the PIT to a rate and halts between its interrupts
//! (a guest whose only activity is its own timer: its vCPU is woken exactly that often), or
//! masks every interrupt and halts for good (nothing armed).
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use xtask::boot_sector::{BootSector, BootSectorGuest};
//! let spec = BootSectorGuest::new("pit-1k", BootSector::Pit { hz: 1000 });
//! let guest = spec.launch(std::path::Path::new("/tmp/run"))?;
//! guest.wait_for_line(&spec.ready_line(), std::time::Duration::from_secs(60))?;
//! # Ok(()) }
//! ```

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::launch::{RunningGuest, spawn_qemu};

/// The PIT's input clock, Hz.
const PIT_HZ: f64 = 1_193_182.0;

/// What the boot sector does once it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootSector {
    /// Sets PIT channel 0 to `hz` (rate generator), unmasks only its interrupt, and halts
    /// between interrupts (the BIOS's IRQ 0 handler acknowledges each).
    Pit { hz: u32 },
    /// Masks every interrupt and halts: no timer armed, nothing wakes it.
    Halt,
}

impl BootSector {
    /// `pit-1000hz`, `halt`: the image's file name stem.
    pub fn name(self) -> String {
        match self {
            BootSector::Pit { hz } => format!("pit-{hz}hz"),
            BootSector::Halt => "halt".into(),
        }
    }

    /// The line it prints to the debug console when it starts its loop.
    pub fn ready_line(self) -> String {
        format!("PROFILER-BOOT-SECTOR {}", self.name())
    }

    /// The PIT divisor for `hz` (the rate it really gets is `PIT_HZ / divisor`).
    pub fn pit_divisor(hz: u32) -> u16 {
        (PIT_HZ / f64::from(hz.max(19))).round().min(65_535.0) as u16
    }

    /// The 512 bytes: real-mode code loaded at 0000:7C00, its message, the 0x55AA signature.
    pub fn bytes(self) -> [u8; 512] {
        let mut code: Vec<u8> = vec![
            0xFA, // cli
            0x31, 0xC0, // xor ax, ax
            0x8E, 0xD8, // mov ds, ax
            0xFC, // cld
            0xBE, 0x00, 0x00, // mov si, message (patched below)
            0xAC, // print: lodsb
            0x84, 0xC0, // test al, al
            0x74, 0x04, // jz done
            0xE6, 0xE9, // out 0xe9, al
            0xEB, 0xF7, // jmp print
        ];
        match self {
            BootSector::Pit { hz } => {
                let [lo, hi] = Self::pit_divisor(hz).to_le_bytes();
                code.extend([
                    0xB0, 0x36, // mov al, 0x36: channel 0, lo/hi, rate generator
                    0xE6, 0x43, // out 0x43, al
                    0xB8, lo, hi, // mov ax, divisor
                    0xE6, 0x40, // out 0x40, al
                    0x88, 0xE0, // mov al, ah
                    0xE6, 0x40, // out 0x40, al
                    0xB0, 0xFE, // mov al, 0xfe: IRQ 0 only
                ]);
            }
            BootSector::Halt => code.extend([0xB0, 0xFF]), // mov al, 0xff: nothing
        }
        code.extend([
            0xE6, 0x21, // out 0x21, al: master PIC mask
            0xB0, 0xFF, // mov al, 0xff
            0xE6, 0xA1, // out 0xa1, al: slave PIC masked
            0xFB, // sti
            0xF4, // halt: hlt
            0xEB, 0xFD, // jmp halt
        ]);
        let message = 0x7C00 + code.len() as u16;
        code[7..9].copy_from_slice(&message.to_le_bytes());
        code.extend(self.ready_line().bytes());
        code.extend([b'\n', 0]);
        let mut sector = [0u8; 512];
        sector[..code.len()].copy_from_slice(&code);
        sector[510] = 0x55;
        sector[511] = 0xAA;
        sector
    }

    /// The disk image, written once into the xtask cache (`boot-sectors/NAME.img`).
    pub fn image(self) -> Result<PathBuf> {
        let dir = crate::cache::cache_subdir("boot-sectors")?;
        let path = dir.join(format!("{}.img", self.name()));
        let bytes = self.bytes();
        if std::fs::read(&path).ok().as_deref() != Some(&bytes[..]) {
            let tmp = dir.join(format!(".{}.img.tmp", self.name()));
            std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("renaming to {}", path.display()))?;
        }
        Ok(path)
    }
}

/// What SeaBIOS prints to its debug port when it has nothing to boot and waits, halting
/// between its own 18.2 Hz timer interrupts.
pub const SEABIOS_IDLE_LINE: &str = "No bootable device.";

/// A boot-sector guest to launch under KVM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSectorGuest {
    /// `-name`, and the stem of its files in the run directory.
    pub name: String,
    /// `None`: no disk; SeaBIOS idles at "No bootable device".
    pub sector: Option<BootSector>,
    /// `-name ...,debug-threads=on` (what libvirt sets): QEMU names its threads.
    pub thread_names: bool,
    /// The QEMU binary (default `qemu-system-x86_64` from `PATH`).
    pub qemu: PathBuf,
    /// `-machine pc,accel=...`.
    pub accel: String,
}

impl BootSectorGuest {
    pub fn new(name: impl Into<String>, sector: BootSector) -> Self {
        Self {
            sector: Some(sector),
            ..Self::seabios(name)
        }
    }

    /// SeaBIOS with nothing to boot: it waits, halting between its timer interrupts.
    pub fn seabios(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            sector: None,
            thread_names: true,
            qemu: PathBuf::from("qemu-system-x86_64"),
            accel: "kvm".into(),
        }
    }

    /// The line its debug console shows once it runs what it is there to run.
    pub fn ready_line(&self) -> String {
        self.sector
            .map_or_else(|| SEABIOS_IDLE_LINE.to_string(), BootSector::ready_line)
    }

    /// QEMU's arguments, given the image (`None`: no disk) and the debug console's file. No
    /// NIC: SeaBIOS would otherwise run the iPXE ROM, which polls its NIC forever.
    pub fn qemu_args(&self, image: Option<&Path>, debugcon: &Path) -> Vec<OsString> {
        let name = if self.thread_names {
            format!("guest={},debug-threads=on", self.name)
        } else {
            format!("guest={}", self.name)
        };
        let mut console = OsString::from("file:");
        console.push(debugcon);
        let mut args: Vec<OsString> = [
            "-machine",
            &format!("pc,accel={}", self.accel),
            "-m",
            "16",
            "-name",
            &name,
            "-display",
            "none",
            "-monitor",
            "none",
            "-nic",
            "none",
        ]
        .map(OsString::from)
        .to_vec();
        for dir in crate::launch::FIRMWARE_DIRS
            .iter()
            .filter(|d| Path::new(d).is_dir())
        {
            args.extend(["-L".into(), OsString::from(dir)]);
        }
        match image {
            Some(image) => {
                let mut drive = OsString::from("file=");
                drive.push(image);
                // Guests share the cached image: their writes (none) go to a temporary file.
                drive.push(",format=raw,if=ide,snapshot=on");
                args.extend(["-drive".into(), drive]);
            }
            // SeaBIOS's own log goes to port 0x402.
            None => args.extend(["-global".into(), "isa-debugcon.iobase=0x402".into()]),
        }
        args.extend(["-debugcon".into(), console]);
        args
    }

    /// Starts it with its files in `run_dir`; the debug console is the guest's "serial" log
    /// ([`RunningGuest::wait_for_line`] with [`Self::ready_line`]).
    pub fn launch(&self, run_dir: &Path) -> Result<RunningGuest> {
        let image = self.sector.map(BootSector::image).transpose()?;
        let debugcon = run_dir.join(format!("{}.serial", self.name));
        spawn_qemu(
            &self.name,
            &self.qemu,
            &self.qemu_args(image.as_deref(), &debugcon),
            run_dir,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pit_sector_programs_the_divisor_and_ends_with_the_signature() {
        let s = BootSector::Pit { hz: 1000 }.bytes();
        assert_eq!(&s[510..], &[0x55, 0xAA]);
        assert_eq!(BootSector::pit_divisor(1000), 1193);
        assert_eq!(BootSector::pit_divisor(100), 11932);
        // mov ax, 1193 follows the mode byte's out.
        let at = s.windows(3).position(|w| w == [0xB8, 0xA9, 0x04]);
        assert!(at.is_some(), "{s:?}");
        let text = String::from_utf8_lossy(&s);
        assert!(text.contains("PROFILER-BOOT-SECTOR pit-1000hz\n"));
        // The message pointer points at the message.
        let ptr = u16::from_le_bytes([s[7], s[8]]) as usize - 0x7C00;
        assert!(s[ptr..].starts_with(b"PROFILER-BOOT-SECTOR"));
    }

    #[test]
    fn a_halt_sector_masks_every_interrupt() {
        let s = BootSector::Halt.bytes();
        assert!(s.windows(4).any(|w| w == [0xB0, 0xFF, 0xE6, 0x21]));
        assert!(
            !s.windows(2).any(|w| w == [0xE6, 0x43]),
            "never touches the PIT"
        );
        assert_eq!(BootSector::Halt.name(), "halt");
    }

    #[test]
    fn args_name_the_threads_like_libvirt_and_add_no_nic() {
        let g = BootSectorGuest::new("pit", BootSector::Pit { hz: 100 });
        let args: Vec<String> = g
            .qemu_args(
                Some(Path::new("/c/pit-100hz.img")),
                Path::new("/r/pit.serial"),
            )
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let text = args.join(" ");
        assert!(text.contains("-name guest=pit,debug-threads=on"), "{text}");
        assert!(text.contains("-nic none"), "{text}");
        assert!(text.contains("-machine pc,accel=kvm"), "{text}");
        assert!(
            text.contains("-drive file=/c/pit-100hz.img,format=raw,if=ide,snapshot=on"),
            "{text}"
        );
        let idle = BootSectorGuest::seabios("bios");
        let args: Vec<String> = idle
            .qemu_args(None, Path::new("/r/bios.serial"))
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(!args.contains(&"-drive".to_string()), "{args:?}");
        assert_eq!(idle.ready_line(), SEABIOS_IDLE_LINE);
    }
}
