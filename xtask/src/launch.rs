//! Boots test guests in QEMU: used by `cargo xtask demo` and by the profiler's end-to-end
//! tests (the profiler crate dev-depends on this crate).
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use xtask::launch::{DeviceSet, GuestSpec, find_workspace_root, launch};
//! let image = xtask::guest::build_guest(&find_workspace_root())?;
//! let mut spec = GuestSpec::new("noisy-1", DeviceSet::Noisy);
//! spec.extra_append = "workload=inb:0x378:1000".into();
//! let guest = launch(&spec, &image, std::path::Path::new("/tmp/run"))?;
//! guest.wait_ready(Duration::from_secs(60))?;
//! guest.wait_for_line("PROFILER-WORKLOAD-DONE ops=1000", Duration::from_secs(60))?;
//! # Ok(()) }
//! ```

use std::ffi::OsString;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::guest::{GuestImage, READY_LINE};

/// Firmware directories passed with `-L` when present: a QEMU built from source looks only
/// in its own install prefix, where Debian's SeaBIOS / option ROMs are not.
pub const FIRMWARE_DIRS: &[&str] = &[
    "/usr/share/seabios",
    "/usr/share/qemu",
    "/usr/lib/ipxe/qemu",
];

/// Kernel command line every guest gets; [`GuestSpec::extra_append`] is added after it.
/// `panic=-1` with `-no-reboot` makes a guest panic end QEMU at once instead of hanging.
pub const BASE_APPEND: &str = "console=ttyS0 quiet panic=-1";

/// Which emulated devices the guest gets: the Pulsar before/after pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSet {
    /// QEMU's default `pc` devices (VGA, parallel port, floppy, IDE CD-ROM) plus a UHCI
    /// controller with a USB tablet, whose 1 kHz frame timer keeps QEMU busy.
    Noisy,
    /// No parallel port, no VGA, no USB: the "disabled emulation" configuration.
    Quiet,
}

impl DeviceSet {
    /// The QEMU arguments that select this device set. Both use `-nic none`: the default
    /// e1000 wants an iPXE option ROM that a QEMU built from source may not find, and an
    /// idle NIC adds no timer wakeups, so it would not change the comparison.
    pub fn qemu_args(self) -> &'static [&'static str] {
        match self {
            DeviceSet::Noisy => &["-nic", "none", "-usb", "-device", "usb-tablet"],
            DeviceSet::Quiet => &["-nic", "none", "-parallel", "none", "-vga", "none"],
        }
    }
}

/// What to boot. Build with [`GuestSpec::new`] and adjust the public fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSpec {
    /// `-name guest=NAME`, and the stem of the serial / QMP / log files. Letters, digits,
    /// `.`, `_`, `-` only.
    pub name: String,
    pub devices: DeviceSet,
    /// Appended to [`BASE_APPEND`], e.g. `workload=inb:0x378:100000 workload_delay=2`.
    pub extra_append: String,
    /// Appended to QEMU's arguments, after everything else.
    pub extra_args: Vec<String>,
    /// The QEMU binary (default `qemu-system-x86_64` from `PATH`).
    pub qemu: PathBuf,
    pub memory_mb: u32,
    /// `-machine pc,accel=...`: `tcg` (default), or `kvm` where /dev/kvm exists.
    pub accel: String,
}

impl GuestSpec {
    pub fn new(name: impl Into<String>, devices: DeviceSet) -> Self {
        Self {
            name: name.into(),
            devices,
            extra_append: String::new(),
            extra_args: Vec::new(),
            qemu: PathBuf::from("qemu-system-x86_64"),
            memory_mb: 256,
            accel: "tcg".into(),
        }
    }

    /// The full QEMU argument list (without the binary). Pure, so it can be shown to users.
    pub fn qemu_args(&self, image: &GuestImage, run_dir: &Path) -> Result<Vec<OsString>> {
        ensure!(
            !self.name.is_empty()
                && self
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
            "guest name {:?} must be non-empty and use only letters, digits, '.', '_', '-'",
            self.name
        );
        let files = GuestFiles::new(&self.name, run_dir)?;
        let append = match self.extra_append.trim() {
            "" => BASE_APPEND.to_owned(),
            extra => format!("{BASE_APPEND} {extra}"),
        };
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |a: &str| args.push(a.into());
        push("-machine");
        push(&format!("pc,accel={}", self.accel));
        for a in ["-display", "none", "-monitor", "none", "-no-reboot"] {
            push(a);
        }
        push("-m");
        push(&self.memory_mb.to_string());
        push("-name");
        push(&format!("guest={}", self.name));
        for a in self.devices.qemu_args() {
            push(a);
        }
        for dir in FIRMWARE_DIRS.iter().filter(|d| Path::new(d).is_dir()) {
            push("-L");
            push(dir);
        }
        push("-append");
        push(&append);
        args.extend(["-kernel".into(), image.kernel.clone().into()]);
        args.extend(["-initrd".into(), image.initrd.clone().into()]);
        let mut serial = OsString::from("file:");
        serial.push(&files.serial);
        args.extend(["-serial".into(), serial]);
        let mut qmp = OsString::from("unix:");
        qmp.push(&files.qmp);
        qmp.push(",server=on,wait=off");
        args.extend(["-qmp".into(), qmp]);
        args.extend(self.extra_args.iter().map(OsString::from));
        Ok(args)
    }
}

/// Where a guest's files go inside the run directory.
struct GuestFiles {
    serial: PathBuf,
    qmp: PathBuf,
    log: PathBuf,
}

impl GuestFiles {
    fn new(name: &str, run_dir: &Path) -> Result<Self> {
        // QEMU splits `-qmp unix:PATH,server=on` at commas.
        ensure!(
            !run_dir.as_os_str().to_string_lossy().contains(','),
            "run directory {} contains a ',', which QEMU's option parser would split",
            run_dir.display()
        );
        let qmp = run_dir.join(format!("{name}.qmp"));
        // sockaddr_un.sun_path is 108 bytes including the NUL.
        ensure!(
            qmp.as_os_str().len() < 108,
            "QMP socket path {} is longer than a Unix socket allows (107 bytes); use a \
             shorter run directory (e.g. under /tmp)",
            qmp.display()
        );
        Ok(Self {
            serial: run_dir.join(format!("{name}.serial")),
            qmp,
            log: run_dir.join(format!("{name}.qemu.log")),
        })
    }
}

/// A QEMU process booting or running a guest. Dropping it stops QEMU (SIGTERM, then
/// SIGKILL after 2 s) and reaps it. `Sync`, so tests can share one guest.
#[derive(Debug)]
pub struct RunningGuest {
    name: String,
    pid: u32,
    child: Mutex<Child>,
    files_serial: PathBuf,
    files_qmp: PathBuf,
    files_log: PathBuf,
}

/// Starts QEMU for `spec` with files (`NAME.serial`, `NAME.qmp`, `NAME.qemu.log`) in
/// `run_dir`, which is created. Returns at once; use [`RunningGuest::wait_ready`].
pub fn launch(spec: &GuestSpec, image: &GuestImage, run_dir: &Path) -> Result<RunningGuest> {
    fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let args = spec.qemu_args(image, run_dir)?;
    spawn_qemu(&spec.name, &spec.qemu, &args, run_dir)
}

/// Starts `qemu` with `args` as guest `name`, its files (`NAME.serial`, `NAME.qmp`,
/// `NAME.qemu.log`) in `run_dir`, which is created; stale ones are removed first.
pub(crate) fn spawn_qemu(
    name: &str,
    qemu: &Path,
    args: &[OsString],
    run_dir: &Path,
) -> Result<RunningGuest> {
    fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let files = GuestFiles::new(name, run_dir)?;
    for stale in [&files.serial, &files.qmp, &files.log] {
        // An old serial log would satisfy wait_ready before this guest printed anything.
        match fs::remove_file(stale) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing stale {}", stale.display()));
            }
            _ => {}
        }
    }
    let log =
        File::create(&files.log).with_context(|| format!("creating {}", files.log.display()))?;
    let child = Command::new(qemu)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", qemu.display()))?;
    Ok(RunningGuest {
        name: name.to_string(),
        pid: child.id(),
        child: Mutex::new(child),
        files_serial: files.serial,
        files_qmp: files.qmp,
        files_log: files.log,
    })
}

impl RunningGuest {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// QEMU's process id (the VM's identity for the profiler).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The guest's ttyS0, as written by QEMU.
    pub fn serial_log(&self) -> PathBuf {
        self.files_serial.clone()
    }

    /// QEMU's QMP socket (server; QEMU creates it shortly after start).
    pub fn qmp_socket(&self) -> PathBuf {
        self.files_qmp.clone()
    }

    /// QEMU's own stdout and stderr.
    pub fn qemu_log(&self) -> PathBuf {
        self.files_log.clone()
    }

    /// The serial log so far (empty before QEMU created it), `\r` removed.
    pub fn serial_text(&self) -> String {
        read_lossy(&self.files_serial).replace('\r', "")
    }

    /// QEMU's exit status if it has exited (and reaps it), else `None`.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>> {
        Ok(self.child().try_wait()?)
    }

    /// Waits until a line of the serial log contains `needle`. Fails early if QEMU exits,
    /// and on timeout; both errors include the tails of the serial and QEMU logs.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            // Check for exit first, then read: a line written just before exiting counts.
            let exited = self.try_wait()?;
            if self.serial_text().lines().any(|l| l.contains(needle)) {
                return Ok(());
            }
            if let Some(status) = exited {
                bail!(
                    "QEMU for guest {} (pid {}) exited ({status}) before printing {needle:?}{}",
                    self.name,
                    self.pid,
                    self.diagnostics()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "guest {} (pid {}) did not print {needle:?} within {timeout:?}{}",
                    self.name,
                    self.pid,
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for /init's [`READY_LINE`]: modules loaded, workload (if any) started.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        self.wait_for_line(READY_LINE, timeout)
    }

    fn child(&self) -> MutexGuard<'_, Child> {
        // A panic while holding the lock leaves the Child itself intact.
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn diagnostics(&self) -> String {
        format!(
            "\n--- {} (last 30 lines) ---\n{}\n--- {} (last 30 lines) ---\n{}",
            self.files_serial.display(),
            tail(&self.serial_text(), 30),
            self.files_log.display(),
            tail(&read_lossy(&self.files_log), 30),
        )
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        // Only signal a process we have not reaped: its pid cannot have been reused.
        if let Ok(None) = child.try_wait() {
            // SIGTERM first so QEMU exits cleanly (removes its QMP socket, flushes logs).
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(2);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
        }
        let _ = child.wait();
        let _ = fs::remove_file(&self.files_qmp);
    }
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The last `n` lines, with control characters (terminal escapes) made visible.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| {
            l.replace('\r', "")
                .chars()
                .map(|c| if c.is_control() && c != '\t' { '?' } else { c })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The profiler workspace root: the nearest ancestor with a `Cargo.toml` containing
/// `[workspace]` and with `xtask/guest-workload`, searched from `$CARGO_MANIFEST_DIR` (set by `cargo run` / `cargo test`), then the current
/// directory, then this crate's own source location.
pub fn find_workspace_root() -> PathBuf {
    let starts = [
        std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from),
        std::env::current_dir().ok(),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR"))),
    ];
    for start in starts.into_iter().flatten() {
        for dir in start.ancestors() {
            // The guest-workload check skips unrelated workspaces (e.g. a crate that uses
            // this one from elsewhere).
            let is_workspace = fs::read_to_string(dir.join("Cargo.toml"))
                .is_ok_and(|t| t.lines().any(|l| l.trim() == "[workspace]"));
            if is_workspace && dir.join("xtask/guest-workload/Cargo.toml").is_file() {
                return dir.to_path_buf();
            }
        }
    }
    // xtask lives at <root>/xtask.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> GuestImage {
        GuestImage {
            kernel: "/k/vmlinuz".into(),
            initrd: "/k/initrd.img".into(),
        }
    }

    fn args(spec: &GuestSpec) -> Vec<String> {
        spec.qemu_args(&image(), Path::new("/tmp/run"))
            .unwrap()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    fn has_pair(args: &[String], a: &str, b: &str) -> bool {
        args.windows(2).any(|w| w[0] == a && w[1] == b)
    }

    #[test]
    fn noisy_args() {
        let mut spec = GuestSpec::new("vm1", DeviceSet::Noisy);
        spec.extra_append = "workload=inb:0x378:10".into();
        spec.extra_args = vec!["-smp".into(), "1".into()];
        let a = args(&spec);
        assert!(has_pair(&a, "-machine", "pc,accel=tcg"));
        assert!(has_pair(&a, "-device", "usb-tablet"));
        assert!(a.contains(&"-usb".to_owned()));
        assert!(!a.contains(&"-parallel".to_owned()));
        assert!(has_pair(&a, "-m", "256"));
        assert!(has_pair(&a, "-name", "guest=vm1"));
        assert!(has_pair(
            &a,
            "-append",
            "console=ttyS0 quiet panic=-1 workload=inb:0x378:10"
        ));
        assert!(has_pair(&a, "-serial", "file:/tmp/run/vm1.serial"));
        assert!(has_pair(
            &a,
            "-qmp",
            "unix:/tmp/run/vm1.qmp,server=on,wait=off"
        ));
        assert!(has_pair(&a, "-kernel", "/k/vmlinuz"));
        assert_eq!(&a[a.len() - 2..], ["-smp", "1"]);
    }

    #[test]
    fn quiet_args() {
        let a = args(&GuestSpec::new("q", DeviceSet::Quiet));
        assert!(has_pair(&a, "-parallel", "none"));
        assert!(has_pair(&a, "-vga", "none"));
        assert!(has_pair(&a, "-nic", "none"));
        assert!(!a.iter().any(|x| x.contains("usb")));
        assert!(has_pair(&a, "-append", BASE_APPEND));
    }

    #[test]
    fn rejects_bad_names_and_paths() {
        let img = image();
        for name in ["", "a b", "a,b", "a/b", "é"] {
            let spec = GuestSpec::new(name, DeviceSet::Quiet);
            assert!(spec.qemu_args(&img, Path::new("/tmp")).is_err(), "{name:?}");
        }
        let spec = GuestSpec::new("ok", DeviceSet::Quiet);
        assert!(spec.qemu_args(&img, Path::new("/tmp/a,b")).is_err());
        assert!(
            spec.qemu_args(&img, &Path::new("/tmp").join("x".repeat(120)))
                .is_err()
        );
    }

    #[test]
    fn tail_keeps_last_lines_and_hides_escapes() {
        assert_eq!(tail("a\nb\r\nc\x1b[0m\n", 2), "b\nc?[0m");
        assert_eq!(tail("", 5), "");
    }

    #[test]
    fn workspace_root_has_workspace_manifest() {
        let root = find_workspace_root();
        assert!(root.join("xtask").is_dir(), "{}", root.display());
    }
}
