//! Shared set-up for the end-to-end tests: real QEMU guests, the real profiler binary, root.
#![allow(dead_code)]

use std::{
    io::Write as _,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use profiler::record::{WindowRecord, read_records};
use xtask::{
    guest::GuestImage,
    launch::{DeviceSet, GuestSpec, RunningGuest, launch},
};

pub use xtask::prereq::Prereq;

/// How long a guest may take to boot before the test calls it hung: machines of one kind
/// differ several times in speed, and a busy neighbour slows a TCG boot further.
pub const BOOT: Duration = Duration::from_secs(600);

/// How long a test waits for something that should happen within seconds (the profiler
/// attaching, a window closing, a process starting) before it calls it hung.
pub const HANG: Duration = Duration::from_secs(120);

/// Polls `done` every 50 ms until it holds; fails after `timeout` (a hang detector only).
pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether the recording at `rec` has a window record of VM `vm` yet. The profiler writes a
/// VM's first record when its first window closes, after it attached to the VM.
pub fn has_record_of(rec: &Path, vm: &str) -> bool {
    std::fs::read_to_string(rec).is_ok_and(|t| t.contains(&format!("\"name\":\"{vm}\"")))
}

/// Waits until the recording at `rec` has a record of VM `vm`: the profiler has attached.
pub fn wait_for_record_of(rec: &Path, vm: &str) {
    wait_until(
        &format!("the profiler's first record of {vm} in {}", rec.display()),
        HANG,
        || has_record_of(rec, vm),
    );
}

/// Makes the guest's workload wait for a go line on its `/dev/ttyS1` (`workload_sync`), a
/// second serial port on a Unix socket the test writes to: the workload then starts only
/// once the test knows the profiler is attached. Returns the socket's path.
pub fn add_sync_port(spec: &mut GuestSpec, dir: &Path) -> PathBuf {
    let ctl = dir.join(format!("{}.ctl", spec.name));
    let _ = std::fs::remove_file(&ctl);
    spec.extra_append.push_str(" workload_sync=/dev/ttyS1");
    spec.extra_args.extend([
        "-chardev".to_string(),
        format!("socket,id=ctl,path={},server=on,wait=off", ctl.display()),
        "-device".to_string(),
        "isa-serial,chardev=ctl".to_string(),
    ]);
    ctl
}

/// Lets the workload of `guest` (set up with [`add_sync_port`]) start its first round, once
/// it waits for it. Keep the returned connection until the workload is done.
pub fn release_workload(guest: &RunningGuest, ctl: &Path) -> UnixStream {
    guest
        .wait_for_line("PROFILER-WORKLOAD-WAITING round=0", BOOT)
        .expect("the workload waits for its go line");
    let mut go = UnixStream::connect(ctl)
        .unwrap_or_else(|e| panic!("the guest's sync port {}: {e}", ctl.display()));
    go.write_all(b"go\n").expect("go line written");
    go
}

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
    guest.wait_ready(BOOT).expect("guest boots");
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

/// The whole records written to `path` so far (the profiler may be writing the next line);
/// none if it does not exist yet.
pub fn load_so_far(path: &Path) -> Vec<WindowRecord> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    whole
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
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
/// arguments until the workload is done and `idle_windows` full windows of the VM that
/// started after it are written, and returns the recording.
pub fn record_workload(
    spec: &GuestSpec,
    image: &GuestImage,
    dir: &Path,
    extra: &[&std::ffi::OsStr],
    idle_windows: usize,
) -> Vec<WindowRecord> {
    // The workload waits for the test's go line, given once the profiler is attached.
    let mut spec = spec.clone();
    let ctl = add_sync_port(&mut spec, dir);
    let guest = launch(&spec, image, dir).expect("launch QEMU");
    let rec = recording_path(dir);
    let mut recorder = KillOnDrop(
        profiler()
            .args(["record", "--window", "5", "--vm", &spec.name])
            .args(extra)
            .arg("--output")
            .arg(&rec)
            // Inherited: the profiler's warnings show in the test output when something fails.
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start profiler"),
    );
    guest.wait_ready(BOOT).expect("guest boots");
    wait_for_record_of(&rec, &spec.name);
    let _go = release_workload(&guest, &ctl);
    guest
        .wait_for_line("PROFILER-WORKLOAD-DONE", BOOT)
        .expect("workload finishes");
    let done = chrono::Utc::now();
    wait_until(
        &format!(
            "{idle_windows} full windows of {} after its workload",
            spec.name
        ),
        HANG,
        || {
            load_so_far(&rec)
                .iter()
                .filter(|w| w.vm.name == spec.name && !w.partial)
                .filter(|w| w.start.parse::<chrono::DateTime<chrono::Utc>>().unwrap() >= done)
                .count()
                >= idle_windows
        },
    );
    // SAFETY: plain signal to our child.
    unsafe { libc::kill(recorder.0.id() as i32, libc::SIGINT) };
    assert!(recorder.0.wait().expect("profiler exits").success());
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
    // It opens /dev/kvm during start-up: give discovery a settled process.
    let fds = format!("/proc/{}/fd", child.id());
    let child = KillOnDrop(child);
    wait_until(&format!("{name} to open /dev/kvm"), HANG, || {
        std::fs::read_dir(&fds).is_ok_and(|d| {
            d.flatten()
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == Path::new("/dev/kvm")))
        })
    });
    Some(child)
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
                let deadline = std::time::Instant::now() + HANG;
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
                        "{daemon} -d: {status} (for {HANG:?})"
                    );
                    std::thread::sleep(Duration::from_millis(500));
                }
                started.push(daemon.to_string());
            }
        }
        let deadline = std::time::Instant::now() + HANG;
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
        let deadline = std::time::Instant::now() + HANG;
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
        Self::create_with(name, xml, dir, &[])
    }

    /// Creates the domain with its vCPUs paused (`virsh create --paused`) and waits for its
    /// QEMU process; [`LibvirtGuest::resume`] runs it.
    pub fn create_paused(name: &str, xml: &str, dir: &Path) -> Self {
        Self::create_with(name, xml, dir, &["--paused"])
    }

    fn create_with(name: &str, xml: &str, dir: &Path, flags: &[&str]) -> Self {
        let _ = virsh(&["destroy", name]);
        let file = dir.join(format!("{name}.xml"));
        std::fs::write(&file, xml).unwrap();
        let mut args = vec!["create", file.to_str().unwrap()];
        args.extend(flags);
        let out = virsh(&args);
        assert!(
            out.status.success(),
            "virsh create {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let pidfile = Path::new("/run/libvirt/qemu").join(format!("{name}.pid"));
        let deadline = std::time::Instant::now() + HANG;
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

    /// Runs a domain created paused.
    pub fn resume(&self) {
        let out = virsh(&["resume", &self.name]);
        assert!(
            out.status.success(),
            "virsh resume {}: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
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
