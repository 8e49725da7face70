//! `cargo xtask setup`: installs what building and testing need, idempotently.
//!
//! On Debian as root it installs what is missing; anywhere else it says what is missing and
//! how to get it, instead of failing halfway.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// LLVM majors bpf-linker 0.13 can be built against (its `llvm-N` features), newest first.
const BPF_LINKER_LLVMS: &[u32] = &[23, 22, 21];
const BPF_LINKER_VERSION: &str = "0.13";

/// Debian packages every task needs, besides LLVM for bpf-linker.
const PACKAGES: &[&str] = &[
    // Test guests and their initramfs.
    "qemu-system-x86",
    "cpio",
    // The TUI end-to-end test drives a real terminal.
    "tmux",
    // Building bpf-linker against the system LLVM.
    "libzstd-dev",
    "zlib1g-dev",
    "build-essential",
    // ELF tests compare with readelf and make stripped copies (objcopy, strip), and compile
    // a USDT test program (<sys/sdt.h>).
    "binutils",
    "systemtap-sdt-dev",
    // `profiler serve` is tested against a real Prometheus server, and its alerting rules
    // and exposition with promtool.
    "prometheus",
    // Guests as operators run them: a real libvirtd (started by the tests, no systemd).
    "libvirt-daemon-system",
    "libvirt-clients",
    "libvirt-daemon-driver-qemu",
    // `xtask bench` compares the profiler's cost with bpftrace's on the same probes.
    "bpftrace",
];

fn say(msg: &str) {
    eprintln!("xtask setup: {msg}");
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn is_debian() -> bool {
    Path::new("/etc/debian_version").exists() && which("apt-get")
}

pub fn which(program: &str) -> bool {
    succeeds(Command::new("sh").args(["-c", &format!("command -v {program}")]))
}

fn package_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn package_available(pkg: &str) -> bool {
    output(Command::new("apt-cache").args(["policy", pkg])).is_some_and(|s| {
        s.lines()
            .any(|l| l.trim_start().starts_with("Candidate:") && !l.contains("(none)"))
    })
}

/// Runs `apt-get update` at most once per setup.
pub struct Apt {
    updated: bool,
}

impl Apt {
    pub fn new() -> Self {
        Self { updated: false }
    }

    /// `apt-get update` even if it already ran (after adding a source).
    pub fn force_update(&mut self) -> anyhow::Result<()> {
        self.updated = false;
        self.update()
    }

    fn update(&mut self) -> anyhow::Result<()> {
        if !self.updated {
            say("apt-get update");
            run(Command::new("apt-get").args(["update", "-q"]))?;
            self.updated = true;
        }
        Ok(())
    }

    pub fn install(&mut self, packages: &[&str]) -> anyhow::Result<()> {
        let missing: Vec<&str> = packages
            .iter()
            .copied()
            .filter(|p| !package_installed(p))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        self.update()?;
        say(&format!("apt-get install {}", missing.join(" ")));
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    }
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// The newest LLVM bpf-linker supports that apt can provide (installed or installable).
fn pick_llvm(apt: &mut Apt) -> anyhow::Result<u32> {
    if let Some(v) = BPF_LINKER_LLVMS
        .iter()
        .copied()
        .find(|v| package_installed(&format!("llvm-{v}-dev")))
    {
        return Ok(v);
    }
    apt.update()?;
    BPF_LINKER_LLVMS
        .iter()
        .copied()
        .find(|v| package_available(&format!("llvm-{v}-dev")))
        .with_context(|| {
            format!(
                "no llvm-N-dev package for N in {BPF_LINKER_LLVMS:?} is available from apt; \
                 bpf-linker {BPF_LINKER_VERSION} needs one of them"
            )
        })
}

fn nightly_has_rust_src() -> bool {
    output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .is_some_and(|s| s.lines().any(|l| l.starts_with("rust-src")))
}

/// Gives `/dev/kvm` the group and mode Debian's udev rule gives it (`root:kvm 0660`) where no
/// udev ran to apply it: libvirt's QEMU runs as `libvirt-qemu`, a member of `kvm`, and fails
/// with "Could not access KVM kernel module: Permission denied" on a `root:root 0600` node.
/// Containers and minimal hosts without udev come up that way.
fn kvm_device_for_the_kvm_group() -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let dev = Path::new("/dev/kvm");
    let Ok(meta) = std::fs::metadata(dev) else {
        return Ok(());
    };
    let Some(kvm_gid) = xtask::prereq::kvm_gid() else {
        return Ok(());
    };
    if xtask::prereq::kvm_open_to_group(&meta, kvm_gid) {
        return Ok(());
    }
    say("/dev/kvm: root:kvm 0660, as udev's rule sets it (no udev applied it here)");
    std::os::unix::fs::chown(dev, None, Some(kvm_gid)).context("chgrp kvm /dev/kvm")?;
    std::fs::set_permissions(
        dev,
        std::fs::Permissions::from_mode((meta.mode() & 0o7777) | 0o660),
    )
    .context("chmod g+rw /dev/kvm")
}

pub fn setup(_root: &Path) -> anyhow::Result<()> {
    let root = is_root();
    let debian = is_debian();
    if !(root && debian) {
        let mut missing = Vec::new();
        for tool in ["qemu-system-x86_64", "cpio", "tmux", "bpf-linker"] {
            if !which(tool) {
                missing.push(tool);
            }
        }
        if !nightly_has_rust_src() {
            missing.push("rust-src for the nightly toolchain");
        }
        if missing.is_empty() {
            say(
                "everything needed is installed (cannot check package versions: not root on Debian)",
            );
            return Ok(());
        }
        bail!(
            "missing: {}. Automatic set-up needs root on Debian/Ubuntu ({}); install them by \
             hand: rustup component add rust-src --toolchain nightly; apt-get install \
             qemu-system-x86 cpio tmux llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev; \
             LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --no-default-features \
             --features llvm-22",
            missing.join(", "),
            if root {
                "this is not Debian"
            } else {
                "not running as root"
            }
        );
    }

    let mut apt = Apt::new();
    apt.install(PACKAGES)?;
    kvm_device_for_the_kvm_group()?;

    if !nightly_has_rust_src() {
        say("rustup component add rust-src --toolchain nightly");
        if !succeeds(Command::new("rustup").args(["toolchain", "list"]))
            || !output(Command::new("rustup").args(["toolchain", "list"]))
                .is_some_and(|s| s.contains("nightly"))
        {
            run(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]))?;
        }
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    if which("bpf-linker") {
        say("bpf-linker is installed");
    } else {
        let llvm = pick_llvm(&mut apt)?;
        apt.install(&[&format!("llvm-{llvm}-dev"), &format!("libpolly-{llvm}-dev")])?;
        say(&format!(
            "cargo install bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm} (a few minutes)"
        ));
        // Without LLVM_PREFIX, llvm-sys finds the distribution's default llvm-config (another
        // major) and fails to link -lLLVM.
        run(Command::new("cargo")
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--version",
                &format!("^{BPF_LINKER_VERSION}"),
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm}"),
            ])
            .env("LLVM_PREFIX", format!("/usr/lib/llvm-{llvm}")))?;
    }
    say("done");
    Ok(())
}
