//! Processes named like QEMU that wake from `ppoll` with a known timeout: real processes going
//! through the profiler's real code path (discovery, probes, windowing), for scale benchmarks
//! where real guests would not fit on the machine.

use std::{
    os::unix::process::CommandExt as _,
    process::{Child, Command, Stdio},
};

use anyhow::Context as _;

/// `xtask qemu-like --timeout-ms N`: loops in `ppoll` with no fds and an N ms timeout, so
/// each wakeup is one timer event, N per second known in advance.
pub fn qemu_like_main(args: &[String]) -> anyhow::Result<()> {
    let ms: i64 = match args.iter().position(|a| a == "--timeout-ms") {
        Some(i) => args
            .get(i + 1)
            .context("--timeout-ms needs a value")?
            .parse()?,
        None => 10,
    };
    let ts = libc::timespec {
        tv_sec: ms / 1000,
        tv_nsec: (ms % 1000) * 1_000_000,
    };
    loop {
        // SAFETY: no fds; a valid timespec; a NULL signal mask.
        unsafe { libc::ppoll(std::ptr::null_mut(), 0, &ts, std::ptr::null()) };
    }
}

/// QEMU-like processes, killed on drop.
pub struct QemuLikeFleet(Vec<Child>);

impl QemuLikeFleet {
    /// Starts `n` processes named `qemu-system-x86_64` (argv[0]) with `-name guest=PREFIX-NNN`.
    pub fn start(n: usize, prefix: &str, timeout_ms: u64) -> anyhow::Result<Self> {
        let names: Vec<String> = (0..n).map(|i| format!("{prefix}-{i:04}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        Self::start_named(&names, timeout_ms)
    }

    /// One process per name in `names` (`-name guest=NAME`).
    pub fn start_named(names: &[&str], timeout_ms: u64) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut fleet = Self(Vec::with_capacity(names.len()));
        for name in names {
            let mut cmd = Command::new(&exe);
            cmd.arg0("qemu-system-x86_64")
                .args(["qemu-like", "--timeout-ms", &timeout_ms.to_string()])
                .args(["-name", &format!("guest={name}")])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            // An interrupted bench leaves no fleet behind.
            super::die_with_parent(&mut cmd, libc::SIGKILL);
            fleet
                .0
                .push(cmd.spawn().context("starting a QEMU-like process")?);
        }
        Ok(fleet)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn pids(&self) -> Vec<u32> {
        self.0.iter().map(Child::id).collect()
    }
}

impl Drop for QemuLikeFleet {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}
