//! The USDT QEMU stand-in (`standin.c`): built with the system's C compiler into the xtask
//! cache as a file named `qemu-system-x86_64` (rebuilt when its source changes), and fleets of
//! it for the benchmarks that need hundreds of VMs with the probes a USDT QEMU gets.

use std::{
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use anyhow::Context as _;
use sha2::{Digest as _, Sha256};

const SOURCE: &str = include_str!("standin.c");

/// The stand-in binary, built once per source.
pub fn standin() -> anyhow::Result<PathBuf> {
    let hash = format!("{:x}", Sha256::digest(SOURCE.as_bytes()));
    let dir = xtask::cache::cache_subdir(&format!("standin/{}", &hash[..16]))?;
    let bin = dir.join("qemu-system-x86_64");
    if bin.exists() {
        return Ok(bin);
    }
    let src = dir.join("standin.c");
    std::fs::write(&src, SOURCE)?;
    let tmp = dir.join("qemu-system-x86_64.tmp");
    let out = Command::new("cc")
        .args(["-O2", "-g", "-o"])
        .arg(&tmp)
        .arg(&src)
        .output()
        .context("running cc (apt install gcc systemtap-sdt-dev)")?;
    anyhow::ensure!(
        out.status.success(),
        "building the QEMU stand-in: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&tmp, &bin)?;
    Ok(bin)
}

/// Stand-ins, killed on drop.
pub struct StandinFleet(Vec<Child>);

impl StandinFleet {
    /// `n` stand-ins named `PREFIX-NNNN`, each waking every `period_ms`.
    pub fn start(n: usize, prefix: &str, period_ms: u64) -> anyhow::Result<Self> {
        let bin = standin()?;
        let mut fleet = Self(Vec::with_capacity(n));
        for i in 0..n {
            fleet
                .0
                .push(spawn(&bin, &format!("{prefix}-{i:04}"), period_ms)?);
        }
        Ok(fleet)
    }

    /// Kills the oldest stand-in (a VM exit) and starts one named `name` in its stead.
    pub fn replace_oldest(&mut self, name: &str, period_ms: u64) -> anyhow::Result<()> {
        if !self.0.is_empty() {
            let mut oldest = self.0.remove(0);
            let _ = oldest.kill();
            let _ = oldest.wait();
        }
        self.0.push(spawn(&standin()?, name, period_ms)?);
        Ok(())
    }
}

/// One stand-in named `name` (`-name guest=NAME`), waking every `period_ms`.
fn spawn(bin: &std::path::Path, name: &str, period_ms: u64) -> anyhow::Result<Child> {
    let mut cmd = Command::new(bin);
    cmd.args(["-name", &format!("guest={name}")])
        .args(["--period-ms", &period_ms.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // An interrupted bench leaves no fleet behind.
    super::die_with_parent(&mut cmd, libc::SIGKILL);
    // arg0 as QEMU's own.
    cmd.arg0("qemu-system-x86_64");
    cmd.spawn().context("starting a QEMU stand-in")
}

impl Drop for StandinFleet {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}
