//! What a test needs from the machine (root, the test guest, the USDT QEMU, KVM, a tool),
//! found one way for every test of the workspace.
//!
//! A test asks with [`Prereq::new`] and gets `None` (after saying why) when something is
//! missing. With `PROFILER_E2E_REQUIRE` set (`cargo xtask test` as root sets it) a missing
//! prerequisite fails the test instead, so CI cannot pass by skipping. Host properties that no
//! set-up step provides (`/dev/kvm`) skip even then.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use crate::guest::GuestImage;

/// The configure flags of the USDT QEMU build; also its cache stamp.
pub const QEMU_USDT_CONFIGURE_FLAGS: &[&str] = &[
    "--target-list=x86_64-softmmu",
    "--enable-trace-backends=dtrace",
    "--disable-docs",
    "--disable-werror",
    "--disable-gtk",
    "--disable-sdl",
    "--disable-vnc",
    "--disable-opengl",
    "--disable-spice",
    "--disable-xen",
];

/// Where `cargo xtask qemu-usdt` keeps the USDT QEMU (in the cache directory, which honours
/// `PROFILER_CACHE_DIR`).
pub fn qemu_usdt_dir() -> PathBuf {
    crate::cache::cache_dir().join("qemu-usdt")
}

/// The USDT QEMU if it has been built with the current flags (never builds).
pub fn built_qemu_usdt() -> Option<PathBuf> {
    let dir = qemu_usdt_dir();
    let bin = dir.join("bin/qemu-system-x86_64");
    let stamp = fs::read_to_string(dir.join("stamp")).ok()?;
    (stamp == QEMU_USDT_CONFIGURE_FLAGS.join(" ") && bin.is_file()).then_some(bin)
}

/// Whether prerequisites must be there (`PROFILER_E2E_REQUIRE` is set).
pub fn required() -> bool {
    std::env::var_os("PROFILER_E2E_REQUIRE").is_some()
}

/// The prerequisites of one test.
#[derive(Debug, Clone)]
pub struct Prereq {
    test: String,
}

impl Prereq {
    pub fn new(test: &str) -> Self {
        Self {
            test: test.to_string(),
        }
    }

    /// `None` after saying why; a failure under `PROFILER_E2E_REQUIRE`.
    pub fn missing<T>(&self, why: &str) -> Option<T> {
        if required() {
            panic!("{}: {why} (PROFILER_E2E_REQUIRE is set)", self.test);
        }
        eprintln!("SKIPPED {}: {why}", self.test);
        None
    }

    /// Skipped whatever `PROFILER_E2E_REQUIRE` says: the host lacks something no set-up
    /// step can provide.
    pub fn host_lacks<T>(&self, why: &str) -> Option<T> {
        eprintln!("SKIPPED {}: {why}", self.test);
        None
    }

    /// Root (eBPF, QEMU's memory, tracefs).
    pub fn root(&self) -> Option<()> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            Some(())
        } else {
            self.missing("needs root (eBPF); run `sudo -E cargo xtask test`")
        }
    }

    /// The test guest (kernel + initramfs) `cargo xtask test` builds, from
    /// `PROFILER_GUEST_KERNEL` / `PROFILER_GUEST_INITRD`.
    pub fn guest_image(&self) -> Option<GuestImage> {
        match (
            std::env::var_os("PROFILER_GUEST_KERNEL"),
            std::env::var_os("PROFILER_GUEST_INITRD"),
        ) {
            (Some(kernel), Some(initrd)) => Some(GuestImage {
                kernel: kernel.into(),
                initrd: initrd.into(),
            }),
            _ => self.missing(
                "PROFILER_GUEST_KERNEL/INITRD not set; run `cargo xtask test`, which builds the \
                 guest",
            ),
        }
    }

    /// The QEMU built with USDT probes and symbols: `PROFILER_QEMU_USDT`, else the one in the
    /// cache.
    pub fn usdt_qemu(&self) -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("PROFILER_QEMU_USDT") {
            let p = PathBuf::from(p);
            return if p.is_file() {
                Some(p)
            } else {
                self.missing(&format!(
                    "PROFILER_QEMU_USDT={} does not exist",
                    p.display()
                ))
            };
        }
        built_qemu_usdt().or_else(|| {
            self.missing(&format!(
                "no USDT QEMU in {} (built by `cargo xtask qemu-usdt`)",
                qemu_usdt_dir().display()
            ))
        })
    }

    /// A command on `PATH` (installed by `cargo xtask setup`).
    pub fn tool(&self, name: &str) -> Option<()> {
        let found = std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|d| is_executable(&d.join(name))))
            .unwrap_or(false);
        if found {
            Some(())
        } else {
            self.missing(&format!(
                "{name} is not installed (`cargo xtask setup` installs it)"
            ))
        }
    }

    /// `/dev/kvm` (a property of the host).
    pub fn kvm(&self) -> Option<()> {
        if Path::new("/dev/kvm").exists() {
            Some(())
        } else {
            self.host_lacks("no /dev/kvm on this host")
        }
    }

    /// `/dev/kvm` open to the `kvm` group, as libvirt's QEMU (user `libvirt-qemu`, group
    /// `kvm`) needs it: udev's rule sets that, and `cargo xtask setup` where no udev ran.
    pub fn kvm_for_the_kvm_group(&self) -> Option<()> {
        self.kvm()?;
        let open = kvm_gid()
            .zip(fs::metadata("/dev/kvm").ok())
            .is_some_and(|(gid, meta)| kvm_open_to_group(&meta, gid));
        if open {
            Some(())
        } else {
            self.missing(
                "/dev/kvm is not read-write for the kvm group, so libvirt's QEMU cannot use it \
                 (`cargo xtask setup` sets root:kvm 0660 as udev would)",
            )
        }
    }

    /// Debian's QEMU (`qemu-system-x86_64` on `PATH`) runs.
    pub fn system_qemu(&self) -> Option<()> {
        let runs = Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if runs {
            Some(())
        } else {
            self.missing("qemu-system-x86_64 is not installed (`cargo xtask setup` installs it)")
        }
    }
}

/// The `kvm` group's id (from `/etc/group`: Debian's packages create it there).
pub fn kvm_gid() -> Option<u32> {
    fs::read_to_string("/etc/group")
        .ok()?
        .lines()
        .find_map(|l| {
            let mut fields = l.split(':');
            (fields.next() == Some("kvm")).then(|| fields.nth(1)?.parse().ok())?
        })
}

/// Whether the `/dev/kvm` node (`meta`) is read-write for group `gid`, as udev's rule leaves it.
pub fn kvm_open_to_group(meta: &fs::Metadata, gid: u32) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    meta.gid() == gid && meta.mode() & 0o060 == 0o060
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
