//! The test guest: Debian's 6.1 kernel plus a busybox initramfs with the USB / HID /
//! parport modules and the `guest-workload` binary.
//!
//! Everything comes from Debian packages (`apt-get download`, `dpkg -x`); nothing runs as
//! root except an `apt-get update` when apt knows no 6.1 kernel yet. Results are cached in
//! [`crate::cache::cache_dir`]`/guest`, keyed by the package versions and a hash of every
//! input that shapes the image (this file's source, the workload binary), so a rebuild
//! happens exactly when something changed.
//!
//! Guest protocol on ttyS0 (what the host sees in the serial log):
//!   `PROFILER-GUEST-MODULES <loaded modules...>`  once the modules are loaded
//!   `PROFILER-GUEST-READY`                         then the workload (if any) starts
//!   `PROFILER-WORKLOAD-START` / `-TIMING ...` / `-DONE ops=N` / `-ERROR ...`  from the workload

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail, ensure};
use sha2::{Digest, Sha256};

use crate::cache;

/// Printed by /init on ttyS0 once the guest is up and its modules are loaded.
pub const READY_LINE: &str = "PROFILER-GUEST-READY";
/// Printed by /init on ttyS0 just before [`READY_LINE`], followed by the loaded modules.
pub const MODULES_LINE: &str = "PROFILER-GUEST-MODULES";
/// Printed by the workload after its delay, before the first port access.
pub const WORKLOAD_START_LINE: &str = "PROFILER-WORKLOAD-START";
/// Printed by the workload when all accesses are done: `PROFILER-WORKLOAD-DONE ops=N`.
pub const WORKLOAD_DONE_LINE: &str = "PROFILER-WORKLOAD-DONE";

/// A bootable guest: pass as `-kernel` / `-initrd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Modules /init loads, in this order (dependencies are inserted before their users).
/// EHCI goes before OHCI/UHCI, as the kernel asks ("ehci_hcd should always be loaded
/// before uhci_hcd and ohci_hcd"). In Debian's 6.1 config all of these are `=m`; a module
/// that is built in or absent is skipped with a note.
const WANTED_MODULES: &[&str] = &[
    "usb-common",
    "usbcore",
    "ehci-hcd",
    "ehci-pci",
    "ohci-hcd",
    "ohci-pci",
    "uhci-hcd",
    "xhci-hcd",
    "xhci-pci",
    "hid",
    "usbhid",
    "hid-generic",
    "parport",
    "parport_pc",
];

const BUSYBOX_PACKAGE: &str = "busybox-static";
const WORKLOAD_TARGET: &str = "x86_64-unknown-linux-gnu";
/// Image directories kept besides the current one (other checkouts may still use them).
const KEEP_OLD_IMAGES: usize = 3;
/// This file's source is part of the cache key: any change to how the image is built
/// (init script, cpio writer, module list) rebuilds it.
const BUILDER_SOURCE: &str = include_str!("guest.rs");

/// `cargo xtask guest`: builds (or finds) the guest image and prints its paths.
pub fn guest_command(workspace_root: &Path) -> Result<()> {
    let image = build_guest(workspace_root)?;
    println!("kernel: {}", image.kernel.display());
    println!("initrd: {}", image.initrd.display());
    Ok(())
}

/// Builds the guest image, or returns the cached one when nothing changed. Safe to call
/// concurrently (from several tests or processes): builds are serialized by a file lock.
pub fn build_guest(workspace_root: &Path) -> Result<GuestImage> {
    let started = Instant::now();
    let guest_dir = cache::cache_subdir("guest")?;
    let workload = build_workload(workspace_root)?;
    let kernel_name = resolve_kernel_package()?;
    let [kernel, busybox]: [AptPackage; 2] =
        AptPackage::candidates(&[&kernel_name, BUSYBOX_PACKAGE])?
            .try_into()
            .map_err(|_| anyhow!("apt-cache policy: unexpected package count"))?;

    let mut key = Sha256::new();
    for part in [
        BUILDER_SOURCE.as_bytes(),
        kernel.name.as_bytes(),
        kernel.version.as_bytes(),
        busybox.version.as_bytes(),
        &workload,
    ] {
        // Length-prefixed so that no two different input lists hash alike.
        key.update((part.len() as u64).to_le_bytes());
        key.update(part);
    }
    let key = hex(&key.finalize()[..8]);
    let name = format!("{}_{}-{key}", kernel.name, file_safe(&kernel.version));
    let out = guest_dir.join(&name);
    let image = GuestImage {
        kernel: out.join("vmlinuz"),
        initrd: out.join("initrd.img"),
    };

    let _lock = lock(&guest_dir.join(".lock"))?;
    if image.kernel.is_file() && image.initrd.is_file() {
        eprintln!("xtask guest: image up to date: {}", out.display());
        touch(&out);
        return Ok(image);
    }
    eprintln!("xtask guest: building {name}");
    let debs = cache::cache_subdir("debs")?;
    remove_stale_work_dirs(&guest_dir);
    remove_stale_work_dirs(&debs);

    let kernel_deb = kernel.download(&debs)?;
    let busybox_deb = busybox.download(&debs)?;

    let work = WorkDir::new(&guest_dir)?;
    let kernel_root = work.0.join("kernel");
    let busybox_root = work.0.join("busybox");
    eprintln!("xtask guest: unpacking {}", kernel_deb.display());
    dpkg_extract(&kernel_deb, &kernel_root)?;
    dpkg_extract(&busybox_deb, &busybox_root)?;

    let vmlinuz = single_match(&kernel_root.join("boot"), "vmlinuz-")?;
    let tree = ModuleTree::open(&kernel_root)?;
    let modules = tree.resolve(WANTED_MODULES)?;
    let busybox_bin =
        fs::read(busybox_root.join("bin/busybox")).context("busybox-static has no /bin/busybox")?;

    let staging = work.0.join("image");
    fs::create_dir(&staging)?;
    fs::copy(&vmlinuz, staging.join("vmlinuz"))
        .with_context(|| format!("copying {}", vmlinuz.display()))?;
    let module_names = modules
        .iter()
        .map(|m| m.name.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    let init = init_script(&modules);
    write_initrd(
        &staging.join("initrd.img"),
        &init,
        &busybox_bin,
        &workload,
        &modules,
    )?;
    fs::write(
        staging.join("manifest.txt"),
        format!(
            "kernel package: {} {}\nbusybox: {} {}\nmodules (load order): {}\n\n/init:\n{init}",
            kernel.name, kernel.version, busybox.name, busybox.version, module_names,
        ),
    )?;
    fs::rename(&staging, &out).with_context(|| format!("moving image to {}", out.display()))?;

    prune(
        &guest_dir,
        &out,
        |n| n.starts_with("linux-image-"),
        KEEP_OLD_IMAGES,
    );
    prune(
        &debs,
        &kernel_deb,
        |n| n.ends_with(".deb") && n != file_name(&busybox_deb),
        0,
    );
    eprintln!(
        "xtask guest: built {} in {:.1}s (modules: {})",
        out.display(),
        started.elapsed().as_secs_f64(),
        module_names,
    );
    Ok(image)
}

// ---------------------------------------------------------------------------------------
// The workload binary

/// Builds `guest-workload` as a static binary and returns its bytes. Its own target dir
/// keeps the static RUSTFLAGS from invalidating the main build's cache.
fn build_workload(workspace_root: &Path) -> Result<Vec<u8>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = workspace_root.join("target").join("guest-workload");
    eprintln!("xtask guest: building guest-workload (static)");
    let status = Command::new(&cargo)
        .current_dir(workspace_root)
        .args([
            "build",
            "--release",
            "-p",
            "guest-workload",
            "--target",
            WORKLOAD_TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        // This one would take precedence over RUSTFLAGS if inherited from an outer cargo.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("running {}", Path::new(&cargo).display()))?;
    ensure!(
        status.success(),
        "building guest-workload failed ({status})"
    );
    let bin = target_dir
        .join(WORKLOAD_TARGET)
        .join("release")
        .join("guest-workload");
    let bytes = fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
    // The initramfs has no dynamic loader: an interpreter would make exec fail with ENOENT.
    ensure!(
        !Elf::parse(&bytes)?.has_interpreter()?,
        "{} is dynamically linked (expected +crt-static to produce a static binary)",
        bin.display()
    );
    Ok(bytes)
}

// ---------------------------------------------------------------------------------------
// Debian packages

struct AptPackage {
    name: String,
    version: String,
}

impl AptPackage {
    /// The versions `apt-get download` would fetch, from one `apt-cache policy` call.
    fn candidates(names: &[&str]) -> Result<Vec<Self>> {
        let policy = run_stdout(Command::new("apt-cache").arg("policy").args(names))?;
        names
            .iter()
            .map(|&name| {
                let version = policy_candidate(&policy, name)
                    .ok_or_else(|| anyhow!("apt has no installable version of {name}"))?;
                Ok(Self {
                    name: name.into(),
                    version: version.into(),
                })
            })
            .collect()
    }

    /// Downloads the .deb into `dir` (once) and returns its path.
    fn download(&self, dir: &Path) -> Result<PathBuf> {
        let deb = dir.join(format!("{}_{}.deb", self.name, file_safe(&self.version)));
        if deb.is_file() {
            return Ok(deb);
        }
        eprintln!(
            "xtask guest: apt-get download {}={}",
            self.name, self.version
        );
        let tmp = WorkDir::new(dir)?;
        run_stdout(
            Command::new("apt-get")
                .current_dir(&tmp.0)
                // As root, apt would drop to `_apt`, which cannot write here (and warns).
                .args(["-o", "APT::Sandbox::User=root", "download", "-q"])
                .arg(format!("{}={}", self.name, self.version)),
        )?;
        let got = single_match(&tmp.0, &format!("{}_", self.name))?;
        fs::rename(&got, &deb)?;
        Ok(deb)
    }
}

/// The newest `linux-image-6.1.X-N-amd64` (the generic flavour: cloud/rt kernels lack the
/// USB and parport drivers). Asks the `linux-image-amd64` metapackage first, then searches;
/// runs `apt-get update` once if apt knows none.
fn resolve_kernel_package() -> Result<String> {
    for attempt in 0..2 {
        // The metapackage names what Debian currently ships; the search covers hosts where
        // it points elsewhere (e.g. pinned to a backports kernel). Each apt-cache call costs
        // ~0.4 s here, so search only when needed.
        let depends = run_stdout(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))
            .unwrap_or_default();
        let from_meta = depends
            .lines()
            .filter_map(|l| l.trim().trim_start_matches('|').strip_prefix("Depends:"))
            .map(str::trim)
            .find(|n| kernel_abi(n).is_some());
        if let Some(name) = from_meta {
            return Ok(name.to_owned());
        }
        let search = run_stdout(Command::new("apt-cache").args([
            "search",
            "--names-only",
            r"^linux-image-6\.1\.",
        ]))?;
        let newest = search
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter_map(|n| kernel_abi(n).map(|abi| (abi, n)))
            .max();
        if let Some((_, name)) = newest {
            return Ok(name.to_owned());
        }
        if attempt == 0 {
            eprintln!("xtask guest: apt knows no linux-image-6.1 package; running apt-get update");
            run_stdout(Command::new("apt-get").args(["update", "-q"]))
                .context("apt-get update (needs root)")?;
        }
    }
    bail!("no linux-image-6.1.*-amd64 package found in apt (is this Debian bookworm?)")
}

/// The `Candidate:` of `name` in `apt-cache policy` output, which lists each package as an
/// unindented `name:` line followed by indented fields.
fn policy_candidate<'a>(policy: &'a str, name: &str) -> Option<&'a str> {
    let header = format!("{name}:");
    policy
        .lines()
        .skip_while(|l| *l != header)
        .skip(1)
        .take_while(|l| l.starts_with(' '))
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .filter(|v| *v != "(none)")
}

/// `linux-image-6.1.X-N-amd64` → `(X, N)`; anything else (cloud, rt, dbg, unsigned) → None.
fn kernel_abi(name: &str) -> Option<(u32, u32)> {
    let rest = name
        .strip_prefix("linux-image-6.1.")?
        .strip_suffix("-amd64")?;
    let (sub, abi) = rest.split_once('-')?;
    Some((sub.parse().ok()?, abi.parse().ok()?))
}

fn dpkg_extract(deb: &Path, dest: &Path) -> Result<()> {
    run_stdout(Command::new("dpkg").arg("-x").arg(deb).arg(dest)).map(drop)
}

// ---------------------------------------------------------------------------------------
// Kernel modules

struct Module {
    /// Canonical name (`-` → `_`), as /proc/modules shows it.
    name: String,
    /// Uncompressed .ko contents.
    bytes: Vec<u8>,
}

/// An unpacked `lib/modules/<version>` tree. Debian's package ships no modules.dep (its
/// postinst runs depmod), and the host may lack kmod, so dependencies are read from each
/// module's `.modinfo` `depends=` field, exactly what depmod itself uses.
struct ModuleTree {
    by_name: HashMap<String, PathBuf>,
    builtin: HashSet<String>,
}

impl ModuleTree {
    fn open(package_root: &Path) -> Result<Self> {
        let base = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|d| package_root.join(d))
            .find(|d| d.is_dir())
            .ok_or_else(|| anyhow!("kernel package has no lib/modules"))?;
        let dir = single_match(&base, "")?;
        let mut by_name = HashMap::new();
        let mut stack = vec![dir.join("kernel")];
        while let Some(d) = stack.pop() {
            for entry in fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
                let path = entry?.path();
                if path.is_dir() {
                    stack.push(path);
                } else if let Some(name) = module_name(&path) {
                    by_name.insert(name, path);
                }
            }
        }
        // modules.builtin lists built-in "modules" by path, e.g. kernel/drivers/foo/bar.ko.
        let builtin = fs::read_to_string(dir.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| module_name(Path::new(l)))
            .collect();
        Ok(Self { by_name, builtin })
    }

    /// `wanted` plus dependencies, each after what it depends on. Wanted modules that are
    /// built in or absent are skipped with a note; a missing dependency is an error.
    fn resolve(&self, wanted: &[&str]) -> Result<Vec<Module>> {
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        for want in wanted {
            let name = canonical(want);
            if self.builtin.contains(&name) {
                eprintln!("xtask guest: {want} is built into the kernel");
            } else if !self.by_name.contains_key(&name) {
                eprintln!("xtask guest: note: {want} is not in this kernel; skipped");
            } else {
                self.visit(&name, &mut seen, &mut order, &mut Vec::new())?;
            }
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut HashSet<String>,
        order: &mut Vec<Module>,
        path: &mut Vec<String>,
    ) -> Result<()> {
        if seen.contains(name) || self.builtin.contains(name) {
            return Ok(());
        }
        ensure!(
            !path.iter().any(|p| p == name),
            "module dependency cycle: {path:?} -> {name}"
        );
        let file = self
            .by_name
            .get(name)
            .ok_or_else(|| anyhow!("module {name} (needed by {path:?}) not found"))?;
        let bytes = read_module(file)?;
        let depends = modinfo_depends(&bytes)
            .with_context(|| format!("reading .modinfo of {}", file.display()))?;
        path.push(name.to_owned());
        for dep in depends {
            self.visit(&canonical(&dep), seen, order, path)?;
        }
        path.pop();
        seen.insert(name.to_owned());
        order.push(Module {
            name: name.to_owned(),
            bytes,
        });
        Ok(())
    }
}

fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

/// `.../usb-common.ko[.xz|.zst|.gz]` → `usb_common`.
fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))?;
    Some(canonical(stem))
}

/// Reads a module, decompressing it: busybox's insmod passes the file to init_module as is,
/// and the kernel only decompresses with CONFIG_MODULE_DECOMPRESS (not set in Debian 6.1,
/// whose modules are uncompressed anyway; later kernels ship .ko.xz).
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        let mut out = Vec::new();
        io::copy(
            &mut flate2::read::GzDecoder::new(File::open(path)?),
            &mut out,
        )
        .with_context(|| format!("decompressing {name}"))?;
        return Ok(out);
    } else {
        return fs::read(path).with_context(|| format!("reading {name}"));
    };
    let out = Command::new(tool)
        .args(["-dc"])
        .arg(path)
        .output()
        .with_context(|| format!("running {tool} to decompress {name}"))?;
    ensure!(out.status.success(), "{tool} -dc {name} failed");
    Ok(out.stdout)
}

/// The `depends=` list from a module's `.modinfo` section (NUL-separated `key=value`).
fn modinfo_depends(ko: &[u8]) -> Result<Vec<String>> {
    let elf = Elf::parse(ko)?;
    let modinfo = elf
        .section(".modinfo")?
        .ok_or_else(|| anyhow!("no .modinfo section"))?;
    Ok(modinfo
        .split(|&b| b == 0)
        .filter_map(|kv| kv.strip_prefix(b"depends="))
        .flat_map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|d| !d.is_empty())
        .collect())
}

/// Just enough ELF64 little-endian reading for module dependencies and static checks.
struct Elf<'a>(&'a [u8]);

impl<'a> Elf<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self> {
        ensure!(
            bytes.len() >= 64 && bytes.starts_with(b"\x7fELF") && bytes[4] == 2 && bytes[5] == 1,
            "not a 64-bit little-endian ELF file"
        );
        Ok(Self(bytes))
    }

    fn bytes(&self, off: u64, len: usize) -> Result<&'a [u8]> {
        let off = usize::try_from(off)?;
        self.0
            .get(
                off..off
                    .checked_add(len)
                    .ok_or_else(|| anyhow!("ELF offset overflow"))?,
            )
            .ok_or_else(|| anyhow!("truncated ELF file"))
    }

    fn u16(&self, off: u64) -> Result<u16> {
        Ok(u16::from_le_bytes(self.bytes(off, 2)?.try_into()?))
    }

    fn u32(&self, off: u64) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(off, 4)?.try_into()?))
    }

    fn u64(&self, off: u64) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(off, 8)?.try_into()?))
    }

    /// Whether a PT_INTERP program header asks for a dynamic loader.
    fn has_interpreter(&self) -> Result<bool> {
        const PT_INTERP: u32 = 3;
        let (phoff, phentsize, phnum) = (self.u64(0x20)?, self.u16(0x36)?, self.u16(0x38)?);
        for i in 0..u64::from(phnum) {
            if self.u32(phoff + i * u64::from(phentsize))? == PT_INTERP {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The contents of the section called `name`, if any.
    fn section(&self, name: &str) -> Result<Option<&'a [u8]>> {
        let (shoff, shentsize) = (self.u64(0x28)?, u64::from(self.u16(0x3a)?));
        let (shnum, shstrndx) = (self.u16(0x3c)?, u64::from(self.u16(0x3e)?));
        let header = |i: u64| shoff + i * shentsize;
        let strtab = self.u64(header(shstrndx) + 0x18)?;
        for i in 0..u64::from(shnum) {
            let h = header(i);
            let name_off = strtab + u64::from(self.u32(h)?);
            let rest = self.0.get(usize::try_from(name_off)?..).unwrap_or_default();
            let this = rest.split(|&b| b == 0).next().unwrap_or_default();
            if this == name.as_bytes() {
                let (off, size) = (self.u64(h + 0x18)?, self.u64(h + 0x20)?);
                return Ok(Some(self.bytes(off, usize::try_from(size)?)?));
            }
        }
        Ok(None)
    }
}

// ---------------------------------------------------------------------------------------
// The initramfs

fn init_script(modules: &[Module]) -> String {
    let names: Vec<&str> = modules.iter().map(|m| m.name.as_str()).collect();
    format!(
        r#"#!/bin/busybox sh
# PID 1 of the profiler test guest (generated by xtask/src/guest.rs).
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in {modules}; do
    insmod /lib/modules/$m.ko || echo "profiler-guest: insmod $m failed" > /dev/ttyS0
done
# One line, one write: kernel messages are less likely to split it.
echo "{MODULES_LINE} $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')" > /dev/ttyS0
echo {READY_LINE} > /dev/ttyS0
case " $(cat /proc/cmdline) " in
    *" workload="*) /bin/guest-workload > /dev/ttyS0 2>&1 & ;;
esac
# PID 1 must never exit (the kernel would panic); idle with as few wakeups as possible.
while :; do sleep 3600; done
"#,
        modules = names.join(" "),
    )
}

fn write_initrd(
    path: &Path,
    init: &str,
    busybox: &[u8],
    workload: &[u8],
    modules: &[Module],
) -> Result<()> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let gz =
        flate2::GzBuilder::new().write(io::BufWriter::new(file), flate2::Compression::default());
    let mut cpio = Cpio::new(gz);
    for dir in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "lib",
        "lib/modules",
    ] {
        cpio.dir(dir)?;
    }
    // The kernel opens /dev/console for init's stdio before /init can mount devtmpfs.
    cpio.char_dev("dev/console", 5, 1)?;
    cpio.file("init", 0o755, init.as_bytes())?;
    cpio.file("bin/busybox", 0o755, busybox)?;
    cpio.file("bin/guest-workload", 0o755, workload)?;
    for m in modules {
        cpio.file(&format!("lib/modules/{}.ko", m.name), 0o644, &m.bytes)?;
    }
    cpio.finish()?.finish()?.flush()?;
    Ok(())
}

/// A writer for the "newc" cpio format the kernel unpacks as initramfs. Written here rather
/// than with the `cpio` tool so the archive needs no staging tree, can hold device nodes
/// without root, and is byte-for-byte reproducible (all mtimes and owners are 0).
struct Cpio<W: Write> {
    out: W,
    written: usize,
    next_ino: u32,
}

impl<W: Write> Cpio<W> {
    fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    fn dir(&mut self, name: &str) -> io::Result<()> {
        self.entry(name, 0o040_755, 2, (0, 0), &[])
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, 0o100_000 | perm, 1, (0, 0), data)
    }

    fn char_dev(&mut self, name: &str, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, 0o020_600, 1, (major, minor), &[])
    }

    fn finish(mut self) -> io::Result<W> {
        self.next_ino = 0;
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[])?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let ino = self.next_ino;
        self.next_ino += 1;
        let size = u32::try_from(data.len()).map_err(io::Error::other)?;
        let namesize = u32::try_from(name.len() + 1).map_err(io::Error::other)?;
        // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
        // rdevmajor, rdevminor, namesize, check
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
            0, 0, 0, 0, 0, rdev.0, rdev.1, 0
        );
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len();
        Ok(())
    }

    /// Header+name and data are each padded to a multiple of 4 bytes.
    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - self.written % 4) % 4;
        self.put(&[0u8; 3][..n])
    }
}

// ---------------------------------------------------------------------------------------
// Small helpers

/// Runs a command (with the C locale, so its output parses), returning stdout; the error
/// includes stderr.
fn run_stdout(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {shown}"))?;
    ensure!(
        out.status.success(),
        "{shown} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim_end()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The one entry of `dir` whose name starts with `prefix`.
fn single_match(dir: &Path, prefix: &str) -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| file_name(p).starts_with(prefix))
        .collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => bail!("nothing named {prefix}* in {}", dir.display()),
        _ => bail!("several {prefix}* in {}: {found:?}", dir.display()),
    }
}

fn file_name(path: &Path) -> &str {
    path.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
}

/// Debian versions may hold `:` (epochs); keep file names plain.
fn file_safe(version: &str) -> String {
    version.replace(':', "%3a")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Exclusive lock on `path`, held until the returned file is dropped.
fn lock(path: &Path) -> Result<File> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        eprintln!(
            "xtask guest: waiting for another guest build ({})",
            path.display()
        );
        // SAFETY: as above.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error()).context("flock");
        }
    }
    Ok(file)
}

/// Marks an image as recently used, so [`prune`] keeps it.
fn touch(path: &Path) {
    let _ = File::open(path).and_then(|f| f.set_modified(SystemTime::now()));
}

/// Deletes entries of `dir` selected by `select`, except `keep` and the `keep_old` most
/// recently modified others.
fn prune(dir: &Path, keep: &Path, select: impl Fn(&str) -> bool, keep_old: usize) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut old: Vec<(SystemTime, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p != keep && select(file_name(p)))
        .map(|p| {
            (
                fs::metadata(&p)
                    .and_then(|m| m.modified())
                    .unwrap_or(UNIX_EPOCH),
                p,
            )
        })
        .collect();
    old.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
    for (_, path) in old.into_iter().skip(keep_old) {
        eprintln!("xtask guest: removing old {}", path.display());
        let _ = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
    }
}

/// Work directories left by an interrupted build (only the lock holder creates them, so
/// call this with the lock held).
fn remove_stale_work_dirs(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.filter_map(|e| e.ok()) {
            if file_name(&e.path()).starts_with(".work-") {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

/// A scratch directory inside the cache (same filesystem, so results can be renamed into
/// place atomically), removed when dropped.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new(parent: &Path) -> Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let dir = parent.join(format!(".work-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_abi_accepts_only_generic_61_flavour() {
        assert_eq!(kernel_abi("linux-image-6.1.0-56-amd64"), Some((0, 56)));
        assert_eq!(kernel_abi("linux-image-6.1.0-9-amd64"), Some((0, 9)));
        for other in [
            "linux-image-6.1.0-56-cloud-amd64",
            "linux-image-6.1.0-56-rt-amd64",
            "linux-image-6.1.0-56-amd64-dbg",
            "linux-image-6.1.0-56-amd64-unsigned",
            "linux-image-6.12.0-0-amd64",
            "linux-image-amd64",
        ] {
            assert_eq!(kernel_abi(other), None, "{other}");
        }
        // Numeric, not lexical: ABI 56 is newer than 9.
        assert!(kernel_abi("linux-image-6.1.0-56-amd64") > kernel_abi("linux-image-6.1.0-9-amd64"));
    }

    #[test]
    fn policy_candidates() {
        let policy = "busybox-static:\n  Installed: (none)\n  Candidate: 1:1.35.0-4\n  \
                      Version table:\n     1:1.35.0-4 500\nlinux-image-x:\n  Installed: (none)\n  \
                      Candidate: (none)\n";
        assert_eq!(
            policy_candidate(policy, "busybox-static"),
            Some("1:1.35.0-4")
        );
        assert_eq!(policy_candidate(policy, "linux-image-x"), None);
        assert_eq!(policy_candidate(policy, "busybox"), None);
    }

    #[test]
    fn module_names_are_canonical() {
        assert_eq!(
            module_name(Path::new("a/usb-common.ko")).as_deref(),
            Some("usb_common")
        );
        assert_eq!(
            module_name(Path::new("parport_pc.ko.xz")).as_deref(),
            Some("parport_pc")
        );
        assert_eq!(module_name(Path::new("hid.ko.zst")).as_deref(), Some("hid"));
        assert_eq!(module_name(Path::new("modules.dep")), None);
    }

    /// Builds a minimal ELF64 with a `.modinfo` section, as the kernel build lays it out.
    fn elf_with_modinfo(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.modinfo\0.shstrtab\0";
        let mut f = vec![0u8; 64];
        f[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let modinfo_off = f.len() as u64;
        f.extend_from_slice(modinfo);
        let strtab_off = f.len() as u64;
        f.extend_from_slice(shstrtab);
        let shoff = f.len() as u64;
        let section = |name: u32, off: u64, size: u64| {
            let mut h = vec![0u8; 64];
            h[0..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&off.to_le_bytes());
            h[0x20..0x28].copy_from_slice(&size.to_le_bytes());
            h
        };
        f.extend(section(0, 0, 0));
        f.extend(section(1, modinfo_off, modinfo.len() as u64));
        f.extend(section(10, strtab_off, shstrtab.len() as u64));
        f[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        f[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        f[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        f[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        f
    }

    #[test]
    fn modinfo_depends_parsed() {
        let ko = elf_with_modinfo(b"license=GPL\0depends=hid,usbcore\0name=usbhid\0");
        assert_eq!(modinfo_depends(&ko).unwrap(), ["hid", "usbcore"]);
        let ko = elf_with_modinfo(b"depends=\0name=hid\0");
        assert!(modinfo_depends(&ko).unwrap().is_empty());
        assert!(modinfo_depends(b"not an elf").is_err());
        assert!(modinfo_depends(&elf_with_modinfo(b"x")[..100]).is_err());
    }

    #[test]
    fn cpio_newc_layout() {
        let mut cpio = Cpio::new(Vec::new());
        cpio.file("init", 0o755, b"abcde").unwrap();
        let out = cpio.finish().unwrap();
        assert!(out.starts_with(b"070701"));
        // 110-byte header + "init\0" = 115, padded to 116; then 5 data bytes padded to 8.
        assert_eq!(&out[110..115], b"init\0");
        assert_eq!(&out[116..121], b"abcde");
        assert_eq!(&out[124..130], b"070701");
        assert_eq!(out.len() % 4, 0);
        let trailer = String::from_utf8_lossy(&out[124..]);
        assert!(trailer.contains("TRAILER!!!"));
        // filesize field of the first entry.
        assert_eq!(&out[54..62], b"00000005");
    }

    #[test]
    fn init_script_loads_modules_in_order() {
        let m = |n: &str| Module {
            name: n.into(),
            bytes: vec![],
        };
        let s = init_script(&[m("usb_common"), m("usbcore")]);
        assert!(s.starts_with("#!/bin/busybox sh\n"));
        assert!(s.contains("for m in usb_common usbcore; do"));
        assert!(s.contains(&format!("echo {READY_LINE} > /dev/ttyS0")));
    }
}
