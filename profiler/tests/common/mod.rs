//! Shared set-up for the end-to-end tests: real QEMU guests, the real profiler binary, root.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use profiler::record::{WindowRecord, read_records};
use xtask::{
    guest::GuestImage,
    launch::{DeviceSet, GuestSpec, RunningGuest, launch},
};

pub use xtask::prereq::Prereq;

/// Root and the test guest image, or `None` after saying why (a failure under
/// `PROFILER_E2E_REQUIRE`, which `cargo xtask test` sets as root).
pub fn e2e_guest_image(test: &str) -> Option<GuestImage> {
    let p = Prereq::new(test);
    p.root()?;
    p.guest_image()
}

pub fn run_dir(test: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("profiler-e2e-{test}-"))
        .tempdir()
        .expect("temp dir")
}

pub fn boot(name: &str, devices: DeviceSet, image: &GuestImage, dir: &Path) -> RunningGuest {
    let guest = launch(&GuestSpec::new(name, devices), image, dir).expect("launch QEMU");
    guest
        .wait_ready(Duration::from_secs(180))
        .expect("guest boots");
    guest
}

pub fn profiler() -> Command {
    Command::new(env!("CARGO_BIN_EXE_profiler"))
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run profiler");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn load(path: &Path) -> Vec<WindowRecord> {
    let f = std::fs::File::open(path).expect("recording exists");
    let (records, warnings) = read_records(std::io::BufReader::new(f)).expect("valid recording");
    assert!(warnings.is_empty(), "{warnings:?}");
    records
}

pub fn of<'a>(records: &'a [WindowRecord], name: &str) -> Vec<&'a WindowRecord> {
    records.iter().filter(|r| r.vm.name == name).collect()
}

pub fn recording_path(dir: &Path) -> PathBuf {
    dir.join("recording.jsonl")
}

/// The QEMU built with USDT probes (`cargo xtask qemu-usdt`), or `None` after saying why (a
/// failure under `PROFILER_E2E_REQUIRE`).
pub fn usdt_qemu(test: &str) -> Option<PathBuf> {
    Prereq::new(test).usdt_qemu()
}

/// Boots `spec` (whose guest runs a port workload), records it with `extra` profiler
/// arguments until the workload is done plus `tail`, and returns the recording.
pub fn record_workload(
    spec: &GuestSpec,
    image: &GuestImage,
    dir: &Path,
    extra: &[&std::ffi::OsStr],
    tail: Duration,
) -> Vec<WindowRecord> {
    let guest = launch(spec, image, dir).expect("launch QEMU");
    let rec = recording_path(dir);
    // Recording starts before the guest boots, so the workload (delayed after the ready line)
    // runs while the probes are attached.
    let mut recorder = profiler()
        .args(["record", "--window", "5", "--vm", &spec.name])
        .args(extra)
        .arg("--output")
        .arg(&rec)
        // Inherited: the profiler's warnings show in the test output when something fails.
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("start profiler");
    guest
        .wait_ready(Duration::from_secs(180))
        .expect("guest boots");
    guest
        .wait_for_line("PROFILER-WORKLOAD-DONE", Duration::from_secs(120))
        .expect("workload finishes");
    std::thread::sleep(tail);
    // SAFETY: plain signal to our child.
    unsafe { libc::kill(recorder.id() as i32, libc::SIGINT) };
    assert!(recorder.wait().expect("profiler exits").success());
    load(&rec)
}

/// Reads and writes of device `name` summed over `windows`.
pub fn device_total(windows: &[&WindowRecord], name: &str) -> (u64, u64) {
    windows
        .iter()
        .flat_map(|w| &w.devices)
        .filter(|d| d.name == name)
        .fold((0, 0), |(r, w), d| (r + d.read, w + d.write))
}

fn sh(cmd: &mut Command) {
    let status = cmd.status().expect("tool runs");
    assert!(status.success(), "{cmd:?}: {status}");
}

/// GNU build-id of an ELF file, as hex, from `readelf -n`.
fn build_id(path: &Path) -> String {
    let out = Command::new("readelf")
        .arg("-n")
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .expect("binary has a build-id")
        .trim()
        .to_string()
}

/// A copy of the USDT QEMU with its symbols, DWARF and USDT notes removed, and its debug file
/// in `<dir>/debug/.build-id/NN/REST.debug` — what a distribution ships, minus the probes.
pub fn stripped_qemu_with_debug_file(qemu: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    // Named like QEMU so discovery recognises it.
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    let bin = dir.join("bin/qemu-system-x86_64");
    let debug = dir.join("qemu.debug");
    sh(Command::new("objcopy")
        .arg("--only-keep-debug")
        .arg(qemu)
        .arg(&debug));
    sh(Command::new("objcopy")
        .args([
            "--strip-debug",
            "--strip-unneeded",
            "--remove-section=.note.stapsdt",
        ])
        .arg(qemu)
        .arg(&bin));
    let id = build_id(&bin);
    let root = dir.join("debug");
    let tree = root.join(".build-id").join(&id[..2]);
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::rename(&debug, tree.join(format!("{}.debug", &id[2..]))).unwrap();
    (bin, root)
}

/// A child process killed (and reaped) on drop.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Debian's stripped QEMU under KVM with no QMP socket (as under libvirt): SeaBIOS idles
/// looking for a boot device.
pub fn kvm_guest_without_qmp(name: &str) -> Option<KillOnDrop> {
    let p = Prereq::new(name);
    p.root()?;
    p.kvm()?;
    p.system_qemu()?;
    let child = std::process::Command::new("qemu-system-x86_64")
        .args(["-machine", "pc,accel=kvm", "-m", "32"])
        .args(["-display", "none", "-monitor", "none", "-nic", "none"])
        .arg("-name")
        .arg(format!("guest={name}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("qemu starts");
    // It opens /dev/kvm during start-up; give discovery a settled process.
    std::thread::sleep(Duration::from_secs(1));
    Some(KillOnDrop(child))
}

/// A real libvirtd (Debian's packages, no systemd): `virtlogd -d` and `libvirtd -d` are
/// started when not running, and stopped on drop if this started them. `None` (after saying
/// why; a failure under `PROFILER_E2E_REQUIRE`) when libvirt is not installed.
pub struct Libvirtd {
    started: Vec<String>,
}

impl Libvirtd {
    const SOCKET: &'static str = "/run/libvirt/libvirt-sock";

    pub fn start(test: &str) -> Option<Self> {
        let p = Prereq::new(test);
        p.root()?;
        p.tool("libvirtd")?;
        p.tool("virtlogd")?;
        p.tool("virsh")?;
        // Running means answering: a daemon stopped earlier can linger as a zombie in a
        // container whose init does not reap, and pgrep would still find it.
        let mut started = Vec::new();
        if !virsh(&["version"]).status.success() {
            for (daemon, socket) in [
                ("virtlogd", "/run/libvirt/virtlogd-sock"),
                ("libvirtd", Self::SOCKET),
            ] {
                if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                    continue;
                }
                // A stale socket of a daemon that is gone.
                let _ = std::fs::remove_file(socket);
                // An instance stopped by the previous test may still hold its pidfile lock
                // while it shuts down; the new one then exits 1 at once. Try again briefly.
                let deadline = std::time::Instant::now() + Duration::from_secs(20);
                loop {
                    let status = std::process::Command::new(daemon)
                        .arg("-d")
                        .status()
                        .unwrap_or_else(|e| panic!("{daemon} -d: {e}"));
                    if status.success() {
                        break;
                    }
                    assert!(
                        std::time::Instant::now() < deadline,
                        "{daemon} -d: {status} (for 20 s)"
                    );
                    std::thread::sleep(Duration::from_millis(500));
                }
                started.push(daemon.to_string());
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !virsh(&["version"]).status.success() {
            assert!(
                std::time::Instant::now() < deadline,
                "libvirtd did not answer on {}",
                Self::SOCKET
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Some(Self { started })
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        for daemon in self.started.iter().rev() {
            let _ = std::process::Command::new("pkill")
                .args(["-TERM", "-x", daemon])
                .status();
        }
        // Let them finish shutting down (a zombie counts as gone: nothing may reap it here),
        // so the next test's daemons do not find the pidfile still locked.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline && self.started.iter().any(|d| live_process(d)) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Whether a process named `comm` runs (not a zombie).
fn live_process(comm: &str) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|e| {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            return false;
        };
        let Some((head, tail)) = stat.rsplit_once(") ") else {
            return false;
        };
        head.split_once(" (").is_some_and(|(_, name)| name == comm) && !tail.starts_with('Z')
    })
}

/// `virsh -c qemu:///system ARGS`.
pub fn virsh(args: &[&str]) -> Output {
    std::process::Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .output()
        .expect("virsh runs")
}

/// A transient libvirt domain (`virsh create`), destroyed on drop.
pub struct LibvirtGuest {
    pub name: String,
    pub pid: u32,
}

impl LibvirtGuest {
    /// Creates the domain from `xml` and waits for its QEMU process.
    pub fn create(name: &str, xml: &str, dir: &Path) -> Self {
        let _ = virsh(&["destroy", name]);
        let file = dir.join(format!("{name}.xml"));
        std::fs::write(&file, xml).unwrap();
        let out = virsh(&["create", file.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "virsh create {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let pidfile = Path::new("/run/libvirt/qemu").join(format!("{name}.pid"));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let pid = loop {
            if let Some(pid) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break pid;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no {}",
                pidfile.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        Self {
            name: name.into(),
            pid,
        }
    }

    /// The domain's uuid, as libvirt says.
    pub fn uuid(&self) -> String {
        String::from_utf8_lossy(&virsh(&["domuuid", &self.name]).stdout)
            .trim()
            .to_string()
    }
}

impl Drop for LibvirtGuest {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
    }
}

/// Where libvirt's QEMU (user libvirt-qemu) can read the test guest and write its serial log.
pub fn libvirt_images(image: &GuestImage) -> (PathBuf, PathBuf, PathBuf) {
    let dir = Path::new("/var/lib/libvirt/images/profiler-e2e");
    std::fs::create_dir_all(dir).unwrap();
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initrd.img");
    std::fs::copy(&image.kernel, &kernel).unwrap();
    std::fs::copy(&image.initrd, &initrd).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    for f in [&kernel, &initrd] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    (dir.to_path_buf(), kernel, initrd)
}
