//! `cargo xtask qemu-usdt`: the distribution's own QEMU source, built with the dtrace trace
//! backend (USDT probes) and symbols, into the cache. Debian's packaged QEMU is stripped and
//! uses the log backend, so read/write probes have nothing to attach to there.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::setup::{Apt, run};

const BUILD_DEPS: &[&str] = &[
    "systemtap-sdt-dev",
    "libglib2.0-dev",
    "libpixman-1-dev",
    "libfdt-dev",
    "libslirp-dev",
    "ninja-build",
    "meson",
    "flex",
    "bison",
    "pkg-config",
    "python3-venv",
    "dpkg-dev",
    "build-essential",
    // Firmware the source build does not ship.
    "seabios",
    "ipxe-qemu",
];

use xtask::prereq::QEMU_USDT_CONFIGURE_FLAGS as CONFIGURE_FLAGS;

const SRC_LIST: &str = "/etc/apt/sources.list.d/profiler-deb-src.sources";

/// Adds a `deb-src` twin of every Debian `deb` source (deb822 or one-line format).
fn enable_deb_src(apt: &mut Apt) -> anyhow::Result<()> {
    if Path::new(SRC_LIST).exists() {
        return Ok(());
    }
    let mut entries = Vec::new();
    for path in ["/etc/apt/sources.list.d/debian.sources"] {
        if let Ok(text) = fs::read_to_string(path) {
            for stanza in text.split("\n\n") {
                if stanza.lines().any(|l| l.trim() == "Types: deb") {
                    entries.push(stanza.replace("Types: deb", "Types: deb-src"));
                }
            }
        }
    }
    if let Ok(text) = fs::read_to_string("/etc/apt/sources.list") {
        for line in text.lines() {
            if let Some(rest) = line.trim().strip_prefix("deb ")
                && rest.contains("debian")
            {
                let mut fields = rest.split_whitespace();
                let (Some(uri), Some(suite)) = (fields.next(), fields.next()) else {
                    continue;
                };
                let components: Vec<&str> = fields.collect();
                entries.push(format!(
                    "Types: deb-src\nURIs: {uri}\nSuites: {suite}\nComponents: {}\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg",
                    components.join(" ")
                ));
            }
        }
    }
    if entries.is_empty() {
        bail!("no Debian apt source found to derive a deb-src entry from");
    }
    eprintln!("xtask qemu-usdt: adding deb-src entries in {SRC_LIST}");
    fs::write(SRC_LIST, entries.join("\n\n") + "\n")?;
    apt.force_update()
}

/// Returns the QEMU binary with USDT probes, building it when it is not cached.
pub fn qemu_usdt() -> anyhow::Result<PathBuf> {
    let dir = xtask::cache::cache_subdir("qemu-usdt")?;
    let stamp_key = CONFIGURE_FLAGS.join(" ");
    if let Some(bin) = cached(&dir, &stamp_key) {
        return Ok(bin);
    }
    if !crate::setup::is_root() {
        bail!("building QEMU with USDT needs root (apt-get build dependencies)");
    }
    let mut apt = Apt::new();
    apt.install(BUILD_DEPS)?;
    enable_deb_src(&mut apt)?;

    let src_root = dir.join("src");
    let _ = fs::remove_dir_all(&src_root);
    fs::create_dir_all(&src_root)?;
    eprintln!("xtask qemu-usdt: apt-get source qemu");
    run(Command::new("apt-get").current_dir(&src_root).args([
        "source",
        "-q",
        "--download-only",
        "qemu",
    ]))
    .or_else(|_| {
        apt.force_update()?;
        run(Command::new("apt-get").current_dir(&src_root).args([
            "source",
            "-q",
            "--download-only",
            "qemu",
        ]))
    })?;
    let dsc = fs::read_dir(&src_root)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "dsc"))
        .context("apt-get source left no .dsc")?;
    run(Command::new("dpkg-source")
        .current_dir(&src_root)
        .args(["-x", "--no-check"])
        .arg(&dsc)
        .arg("qemu"))?;
    let source = src_root.join("qemu");
    let build = source.join("build-usdt");
    fs::create_dir_all(&build)?;
    eprintln!("xtask qemu-usdt: configure {}", CONFIGURE_FLAGS.join(" "));
    run(Command::new("../configure")
        .current_dir(&build)
        .args(CONFIGURE_FLAGS))?;
    eprintln!("xtask qemu-usdt: ninja qemu-system-x86_64 (about 7 minutes on 2 cores)");
    run(Command::new("ninja")
        .current_dir(&build)
        .arg("qemu-system-x86_64"))?;
    let built = build.join("qemu-system-x86_64");
    let bin_dir = dir.join("bin");
    fs::create_dir_all(&bin_dir)?;
    let bin = bin_dir.join("qemu-system-x86_64");
    fs::copy(&built, &bin)?;
    // Keep the build tree's pc-bios for option ROMs that Debian's packages do not carry.
    let _ = Command::new("cp")
        .args(["-r"])
        .arg(source.join("pc-bios"))
        .arg(&dir)
        .status();
    fs::write(dir.join("stamp"), &stamp_key)?;
    let _ = fs::remove_dir_all(&src_root);
    eprintln!("xtask qemu-usdt: {}", bin.display());
    Ok(bin)
}

fn cached(dir: &Path, key: &str) -> Option<PathBuf> {
    let bin = dir.join("bin/qemu-system-x86_64");
    (fs::read_to_string(dir.join("stamp")).ok()? == key && bin.exists()).then_some(bin)
}
