//! Finding QEMU processes in procfs and telling who they are.
//!
//! A VM is one QEMU process. Its identity comes from the command line, from libvirt's state
//! files when present, else `pid N`. A VM is keyed by (pid, start time) so that a PID reused by
//! a new QEMU is a new VM.

pub use crate::identity::procfs::{
    HostCpu, HostCpuReader, parse_mem_total, parse_proc_stat, parse_statm_resident,
};
use std::{
    collections::{HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use crate::identity::{
    cmdline::{Accel, ParsedCmdline, is_qemu_binary, parse_cmdline},
    libvirt::LibvirtDomain,
};

/// Identifies one QEMU process over its lifetime: a PID alone is reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VmKey {
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/PID/stat` field 22).
    pub start_ticks: u64,
}

/// Who a VM is, for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmIdentity {
    /// `-name`, else the libvirt domain name, else `pid N`.
    pub name: String,
    pub pid: u32,
    pub uuid: Option<String>,
    pub xen_domid: Option<u32>,
    pub accel: Accel,
    /// The emulated devices its command line creates, the machine's defaults included
    /// ([`crate::identity::cmdline::effective_devices`]).
    #[serde(default)]
    pub devices: Vec<String>,
    /// The libvirt domain this process runs, when libvirt started it.
    #[serde(default)]
    pub libvirt: Option<LibvirtDomain>,
    /// The guest's RAM as configured (`-m`, else QEMU's default), bytes.
    #[serde(default)]
    pub guest_memory_bytes: Option<u64>,
}

/// A QEMU process found on the host.
#[derive(Debug, Clone)]
pub struct QemuProcess {
    pub key: VmKey,
    /// Shared: a refresh hands every process out again, and copying each VM's strings every
    /// second was a measurable share of the collector's cost at hundreds of VMs.
    pub identity: Arc<VmIdentity>,
    pub cmdline: Arc<ParsedCmdline>,
    /// The executable, as `/proc/PID/exe` points to it (may end in " (deleted)"); shared
    /// like the identity.
    pub exe: Arc<Path>,
    pub cpu: CpuTicks,
}

/// CPU time of a process (all its threads, user and system), in clock ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTicks(pub u64);

impl CpuTicks {
    pub fn total(self) -> u64 {
        self.0
    }

    /// From nanoseconds of CPU time.
    pub fn from_nanos(ns: u64) -> Self {
        Self((u128::from(ns) * u128::from(clock_ticks_per_second()) / 1_000_000_000) as u64)
    }
}

/// The fields of `/proc/PID/stat` the profiler needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub start_ticks: u64,
    pub cpu: CpuTicks,
}

/// Parses `/proc/PID/stat`. The command name (field 2) is in parentheses and may itself contain
/// spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_stat(content: &str) -> Option<ProcStat> {
    let after_comm = &content[content.rfind(')')? + 1..];
    // after_comm starts at field 3 (state); fields 14, 15 and 22 are wanted, nothing after.
    let mut fields = after_comm.split_whitespace().skip(14 - 3);
    // The next wanted field, `skip` fields after the last one taken.
    let mut field = |skip: usize| -> Option<u64> { fields.nth(skip)?.parse().ok() };
    let user = field(0)?;
    let system = field(0)?;
    let start_ticks = field(22 - 16)?;
    Some(ProcStat {
        cpu: CpuTicks(user + system),
        start_ticks,
    })
}

/// When the host booted, on the wall clock: the origin of processes' start ticks (which the
/// kernel counts on the boot-time clock, suspend included).
pub fn boot_time() -> Option<chrono::DateTime<chrono::Utc>> {
    let read = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec to write into.
        (unsafe { libc::clock_gettime(clock, &mut ts) } == 0)
            .then(|| chrono::TimeDelta::new(ts.tv_sec, ts.tv_nsec as u32))
            .flatten()
    };
    let since_boot = read(libc::CLOCK_BOOTTIME)?;
    let now = chrono::DateTime::UNIX_EPOCH + read(libc::CLOCK_REALTIME)?;
    Some(now - since_boot)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

/// The accelerator a running QEMU really uses: an open `/dev/kvm` (or its `kvm-vm` inode) means
/// KVM, Xen's privcmd/evtchn devices or a `-xen-domid` mean Xen, otherwise TCG. `fd_targets`
/// are the `readlink` results of `/proc/PID/fd/*`; without them (no permission) the command
/// line decides.
pub fn detect_accel(parsed: &ParsedCmdline, fd_targets: Option<&[String]>) -> Accel {
    if parsed.xen_domid.is_some() {
        return Accel::Xen;
    }
    match fd_targets {
        Some(targets) => {
            if targets
                .iter()
                .any(|t| t == "/dev/kvm" || t.starts_with("anon_inode:kvm-vm"))
            {
                Accel::Kvm
            } else if targets.iter().any(|t| t.starts_with("/dev/xen/")) {
                Accel::Xen
            } else {
                Accel::Tcg
            }
        }
        None => match parsed.requested_accels.as_slice() {
            // `accel=kvm:tcg` falls back to TCG without KVM; only the fds could tell.
            [one] => *one,
            [] => Accel::Tcg,
            _ => Accel::Unknown,
        },
    }
}

fn read_fd_targets(proc_pid: &Path) -> Option<Vec<String>> {
    let entries = fs::read_dir(proc_pid.join("fd")).ok()?;
    Some(
        entries
            .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
            .map(|t| t.to_string_lossy().into_owned())
            .collect(),
    )
}

/// The domains libvirt's QEMU driver runs, by QEMU pid: from its live status files
/// (`/run/libvirt/qemu/NAME.xml`, with uuid, Nova metadata and device aliases), else from its
/// pid files (`NAME.pid`, the name only). Unreadable or malformed files are skipped.
pub fn libvirt_domains(run_dir: &Path) -> HashMap<u32, LibvirtDomain> {
    let mut domains = HashMap::new();
    let Ok(entries) = fs::read_dir(run_dir) else {
        return domains;
    };
    let mut pid_files = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("xml") => {
                // A status file is small; a huge one is not libvirt's.
                let Ok(meta) = fs::metadata(&path) else {
                    continue;
                };
                if meta.len() > MAX_STATUS_BYTES {
                    continue;
                }
                if let Ok(text) = fs::read_to_string(&path)
                    && let Ok(domain) = crate::identity::libvirt::parse_status(&text)
                    && let Some(pid) = domain.pid
                {
                    domains.insert(pid, domain);
                }
            }
            Some("pid") => pid_files.push(path),
            _ => {}
        }
    }
    for path in pid_files {
        let (Some(name), Ok(content)) = (
            path.file_stem().and_then(|s| s.to_str()),
            fs::read_to_string(&path),
        ) else {
            continue;
        };
        if let Ok(pid) = content.trim().parse() {
            domains.entry(pid).or_insert_with(|| LibvirtDomain {
                pid: Some(pid),
                name: name.to_string(),
                ..LibvirtDomain::default()
            });
        }
    }
    domains
}

/// Largest libvirt status file read (they are tens of KB; qemuCaps makes some ~100 KB).
const MAX_STATUS_BYTES: u64 = 8 << 20;

/// Splits `/proc/PID/cmdline` (NUL-separated) into argv.
pub fn split_cmdline(raw: &[u8]) -> Vec<String> {
    raw.split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Where discovery looks; tests point it at fake trees.
#[derive(Debug, Clone)]
pub struct HostPaths {
    pub proc_root: PathBuf,
    pub libvirt_run: PathBuf,
    /// Known processes' CPU time from the kernel's process CPU clock, their exit from a
    /// pidfd ([`ProcessClock`]), instead of re-reading `stat`: true for the live `/proc`,
    /// false for fake trees (whose PIDs are not processes).
    pub process_clocks: bool,
}

impl HostPaths {
    /// A fake `/proc` tree and libvirt run directory (tests).
    pub fn fake(proc_root: PathBuf, libvirt_run: PathBuf) -> Self {
        Self {
            proc_root,
            libvirt_run,
            process_clocks: false,
        }
    }
}

impl Default for HostPaths {
    fn default() -> Self {
        Self {
            proc_root: PathBuf::from("/proc"),
            libvirt_run: PathBuf::from("/run/libvirt/qemu"),
            process_clocks: true,
        }
    }
}

/// A known process's CPU clock and a pidfd that says when it has exited.
///
/// Producing `/proc/PID/stat` is dear for the kernel (52 formatted fields, memory counters,
/// locks) and was a third of the collector's time at hundreds of VMs; reading the process's
/// CPU clock (`clock_gettime` of `CLOCK_PROCESS_CPUTIME_ID` for another process, allowed for
/// any process) is several times cheaper (docs/benchmarks.md, "Figures behind the design").
/// The clock is addressed by PID number, so the pidfd,
/// bound to the process itself, is polled after the read: still running then means the PID
/// was this process when the clock was read.
#[derive(Debug)]
pub struct ProcessClock {
    pid: u32,
    pidfd: std::os::fd::OwnedFd,
}

impl ProcessClock {
    /// `None` when the process is gone or pidfds are not available (then `stat` is read).
    pub fn open(pid: u32) -> Option<Self> {
        use std::os::fd::FromRawFd as _;
        // SAFETY: pidfd_open takes a PID and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: a descriptor just returned to us and owned by nothing else.
        let pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
        Some(Self { pid, pidfd })
    }

    /// The process's CPU time so far (all threads); `None` if the PID has no process.
    /// Confirm with an [`ExitWatch`] after reading.
    pub fn read(&self) -> Option<CpuTicks> {
        // The kernel's encoding of a process CPU clock (what clock_getcpuclockid returns):
        // the negated PID shifted left by 3, CPUCLOCK_SCHED (2), process-wide.
        let clock = ((!(self.pid as libc::clockid_t)) << 3) | 2;
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: ts is a valid timespec to write to.
        if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
            return None;
        }
        Some(CpuTicks::from_nanos(
            (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64,
        ))
    }
}

/// The exits of the QEMUs read through a [`ProcessClock`]: their pidfds in one epoll set, so
/// a refresh learns which exited in one call that costs nothing per running VM (a `poll`
/// over every pidfd was a twelfth of the collector's time at 500 VMs). A pidfd leaves the
/// set when its [`ProcessClock`] is dropped (its last descriptor closed).
#[derive(Debug)]
struct ExitWatch {
    epoll: std::os::fd::OwnedFd,
}

impl ExitWatch {
    fn new() -> Option<Self> {
        use std::os::fd::FromRawFd as _;
        // SAFETY: epoll_create1 takes flags and returns a new descriptor or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        Some(Self {
            // SAFETY: a descriptor just returned to us and owned by nothing else.
            epoll: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Watches `clock`'s process for its exit; `false` if the kernel refused.
    fn add(&mut self, clock: &ProcessClock) -> bool {
        use std::os::fd::AsRawFd as _;
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: u64::from(clock.pid),
        };
        // SAFETY: both descriptors are open; `event` is valid for the call.
        let ret = unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                clock.pidfd.as_raw_fd(),
                &mut event,
            )
        };
        ret == 0
    }

    /// The PIDs among the watched processes that have exited (their pidfds readable): the
    /// watched processes not listed were still running when this returned. `None` if the
    /// kernel would not say.
    fn exited(&mut self) -> Option<HashSet<u32>> {
        use std::os::fd::AsRawFd as _;
        let mut exited = HashSet::new();
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
        loop {
            // SAFETY: `events` has room for `len` events; a zero timeout never blocks.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    0,
                )
            };
            if n < 0 {
                return None;
            }
            let n = n as usize;
            exited.extend(events[..n].iter().map(|e| e.u64 as u32));
            // Exited pidfds stay ready until closed: a full batch may hide more; asking again
            // with more room returns them all.
            if n < events.len() {
                return Some(exited);
            }
            events.resize(events.len() * 4, libc::epoll_event { events: 0, u64: 0 });
        }
    }
}

/// A process's command line and executable, if either names a QEMU binary.
fn looks_like_qemu(dir: &Path) -> Result<(Vec<String>, PathBuf), NotQemu> {
    let argv = split_cmdline(&fs::read(dir.join("cmdline")).map_err(|_| NotQemu::Other)?);
    let exe = fs::read_link(dir.join("exe")).unwrap_or_default();
    if argv.is_empty() && exe.as_os_str().is_empty() {
        return Err(NotQemu::NoCommandLine);
    }
    let argv0_is_qemu = argv.first().is_some_and(|a| is_qemu_binary(a));
    let exe_is_qemu = is_qemu_binary(&exe.to_string_lossy());
    if !(argv0_is_qemu || exe_is_qemu) {
        return Err(NotQemu::Other);
    }
    Ok((argv, exe))
}

/// Reads one process; `None` if it is not QEMU or vanished while being read.
pub fn read_qemu_process(
    paths: &HostPaths,
    pid: u32,
    libvirt: &HashMap<u32, LibvirtDomain>,
) -> Option<QemuProcess> {
    look_at_process(paths, pid, libvirt).ok()
}

/// What a process that is not QEMU turned out to be.
enum NotQemu {
    /// An empty command line and no executable: a kernel thread (or a zombie). Neither execs
    /// into QEMU in practice, so discovery looks at it again only now and then.
    NoCommandLine,
    Other,
}

fn look_at_process(
    paths: &HostPaths,
    pid: u32,
    libvirt: &HashMap<u32, LibvirtDomain>,
) -> Result<QemuProcess, NotQemu> {
    let dir = paths.proc_root.join(pid.to_string());
    let (argv, exe) = looks_like_qemu(&dir)?;
    let stat = fs::read_to_string(dir.join("stat"))
        .ok()
        .and_then(|text| parse_stat(&text))
        .ok_or(NotQemu::Other)?;
    let cmdline = parse_cmdline(&argv);
    let accel = detect_accel(&cmdline, read_fd_targets(&dir).as_deref());
    let domain = libvirt.get(&pid).cloned();
    let name = cmdline
        .name
        .clone()
        .or_else(|| domain.as_ref().map(|d| d.name.clone()))
        .unwrap_or_else(|| format!("pid {pid}"));
    let uuid = cmdline
        .uuid
        .clone()
        .or_else(|| domain.as_ref().and_then(|d| d.uuid.clone()));
    Ok(QemuProcess {
        key: VmKey {
            pid,
            start_ticks: stat.start_ticks,
        },
        identity: Arc::new(VmIdentity {
            name,
            pid,
            uuid,
            xen_domid: cmdline.xen_domid,
            accel,
            devices: crate::identity::cmdline::effective_devices(&cmdline),
            libvirt: domain,
            guest_memory_bytes: Some(
                cmdline
                    .memory_bytes
                    .unwrap_or(crate::identity::cmdline::DEFAULT_GUEST_MEMORY),
            ),
        }),
        cmdline: Arc::new(cmdline),
        exe: exe.into(),
        cpu: stat.cpu,
    })
}

/// Every QEMU process on the host, by PID.
pub fn scan_qemu_processes(paths: &HostPaths) -> Vec<QemuProcess> {
    scan_qemu_processes_cached(paths, &mut DiscoveryCache::default())
}

/// What discovery learned about each QEMU process, so that a refresh re-reads only its
/// `stat` (CPU time) instead of its command line, executable and every open fd.
#[derive(Debug)]
pub struct DiscoveryCache {
    /// By PID: the process as last read, and how many full reads it has had.
    known: HashMap<u32, KnownProcess>,
    /// Kernel threads (no command line, no executable) by PID, with the refreshes left
    /// before they are looked at again: a large host has hundreds, and reading each one's
    /// command line every refresh was a tenth of the collector's time.
    no_command_line: HashMap<u32, u32>,
    /// The exits of the known processes with a clock (`None` if epoll is refused: then
    /// processes are read through `stat`).
    exits: Option<ExitWatch>,
    /// The processes the last scan found gone, with their CPU time as last read while they
    /// ran ([`take_exit_cpu`]).
    exit_cpu: HashMap<u32, CpuTicks>,
    /// Calls of [`qemus_unchanged`] so far: whose clocks it reads.
    clock_turn: u64,
}

impl Default for DiscoveryCache {
    fn default() -> Self {
        Self {
            known: HashMap::new(),
            no_command_line: HashMap::new(),
            exits: ExitWatch::new(),
            exit_cpu: HashMap::new(),
            clock_turn: 0,
        }
    }
}

/// Refreshes between two looks at a process without a command line (a PID reused by a
/// QEMU within one refresh would be found this much later).
const NO_COMMAND_LINE_RECHECK: u32 = 30;

/// A QEMU process discovery has read, with its `stat` file kept open: a refresh re-reads it
/// with one `pread` instead of open, read, close (at 2,000 VMs, 4,000 syscalls a second
/// fewer). A kept handle stays bound to the process it was opened for: once that process
/// is gone, reading it fails, so a reused PID is never read through it.
#[derive(Debug)]
struct KnownProcess {
    process: QemuProcess,
    reads: u8,
    stat: Option<fs::File>,
    /// Once settled, on the live `/proc`: CPU time from here instead of `stat`.
    clock: Option<ProcessClock>,
}

impl KnownProcess {
    fn read_stat(&mut self, paths: &HostPaths, pid: u32) -> Option<ProcStat> {
        use std::os::unix::fs::FileExt as _;
        if self.stat.is_none() {
            self.stat = fs::File::open(paths.proc_root.join(pid.to_string()).join("stat")).ok();
        }
        let file = self.stat.as_ref()?;
        let mut buf = [0u8; 1024];
        let n = file.read_at(&mut buf, 0).ok()?;
        parse_stat(std::str::from_utf8(&buf[..n]).ok()?)
    }
}

/// Full reads of a new process before its identity is trusted: QEMU opens `/dev/kvm` during
/// start-up, so the accelerator can change in the first moments.
const FULL_READS: u8 = 3;

/// Every QEMU process on the host, re-reading only `stat` for processes already known.
/// Other processes cost what [`scan_qemu_processes`] costs (their command line); only
/// positives are remembered, since a process that is not QEMU yet may exec into QEMU under
/// the same PID and start time (libvirt forks, then execs).
pub fn scan_qemu_processes_cached(
    paths: &HostPaths,
    cache: &mut DiscoveryCache,
) -> Vec<QemuProcess> {
    let Ok(entries) = fs::read_dir(&paths.proc_root) else {
        return Vec::new();
    };
    let pids = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok());
    scan_pids(paths, cache, pids, None)
}

/// Like [`scan_qemu_processes_cached`], but looks only at the QEMUs already known and at the
/// PIDs in `execs` (the processes that exec'd since the last scan: a new QEMU is always one
/// of them), not at every process on the host. A known QEMU's exit must show without a look
/// at `/proc`: only for [`HostPaths::process_clocks`] (pidfds); otherwise a full scan.
pub fn scan_qemu_processes_hinted(
    paths: &HostPaths,
    cache: &mut DiscoveryCache,
    execs: &[u32],
) -> Vec<QemuProcess> {
    if !paths.process_clocks {
        return scan_qemu_processes_cached(paths, cache);
    }
    let execs: HashSet<u32> = execs.iter().copied().collect();
    let mut pids: Vec<u32> = cache.known.keys().chain(&execs).copied().collect();
    pids.sort_unstable();
    pids.dedup();
    scan_pids(paths, cache, pids.into_iter(), Some(&execs))
}

/// Whether the QEMUs are still those the last scan returned, as far as one look at the exits
/// and at the processes that exec'd can tell, without reading each QEMU: every known QEMU is
/// settled and watched for its exit, none has exited, none exec'd, and no process in `execs`
/// is a new QEMU. `false` whenever it cannot tell (no pidfds, a QEMU still settling).
pub fn qemus_unchanged(paths: &HostPaths, cache: &mut DiscoveryCache, execs: &[u32]) -> bool {
    if !paths.process_clocks
        || cache.exits.is_none()
        || cache.known.values().any(|k| k.clock.is_none())
    {
        return false;
    }
    // Their CPU time, each one's every [`CLOCK_READ_EVERY`] calls, kept only if none had
    // exited by the end (a clock read after an exit is not trusted): a VM that exits before
    // the next boundary keeps its CPU time up to that many refreshes before its exit.
    cache.clock_turn = cache.clock_turn.wrapping_add(1);
    let turn = cache.clock_turn;
    let cpu: Vec<(u32, Option<CpuTicks>)> = cache
        .known
        .iter()
        .filter(|(pid, _)| (u64::from(**pid) + turn).is_multiple_of(CLOCK_READ_EVERY))
        .map(|(pid, k)| (*pid, k.clock.as_ref().and_then(ProcessClock::read)))
        .collect();
    let exits = cache.exits.as_mut().expect("checked above");
    if exits.exited().is_none_or(|exited| !exited.is_empty()) {
        return false;
    }
    for (pid, cpu) in cpu {
        if let (Some(cpu), Some(known)) = (cpu, cache.known.get_mut(&pid)) {
            known.process.cpu = cpu;
        }
    }
    execs.iter().all(|pid| {
        !cache.known.contains_key(pid)
            && looks_like_qemu(&paths.proc_root.join(pid.to_string())).is_err()
    })
}

/// Calls of [`qemus_unchanged`] between two reads of one QEMU's CPU clock: reading every
/// VM's each second was most of the cost of a refresh between boundaries at 2,000 VMs
/// (docs/benchmarks.md).
const CLOCK_READ_EVERY: u64 = 2;

/// The CPU time of `pid`, found gone by the last scan, as last read while it ran.
pub fn take_exit_cpu(cache: &mut DiscoveryCache, pid: u32) -> Option<CpuTicks> {
    cache.exit_cpu.remove(&pid)
}

/// Looks at `pids`: every process (`execs` is `None`: a full scan) or the known QEMUs and
/// the PIDs that exec'd.
fn scan_pids(
    paths: &HostPaths,
    cache: &mut DiscoveryCache,
    pids: impl Iterator<Item = u32>,
    execs: Option<&HashSet<u32>>,
) -> Vec<QemuProcess> {
    let mut libvirt: Option<HashMap<u32, LibvirtDomain>> = None;
    // What each known process had used as last read while it ran, for those that are gone.
    let before: Vec<(u32, CpuTicks)> = cache
        .known
        .iter()
        .map(|(pid, k)| (*pid, k.process.cpu))
        .collect();
    // Rebuilt each refresh: sized as last time, so that they do not grow (rehash) again.
    let mut seen = HashMap::with_capacity(cache.known.len());
    let mut no_command_line = HashMap::with_capacity(cache.no_command_line.len());
    for pid in pids {
        let mut reads = 1;
        // A known QEMU that exec'd runs another program now: looked at anew.
        let exec_d = execs.is_some_and(|e| e.contains(&pid));
        if let Some(mut known) = cache.known.remove(&pid)
            && !exec_d
        {
            // Settled, with a clock: the exit check follows, for all of them at once.
            if let Some(cpu) = known.clock.as_ref().and_then(ProcessClock::read) {
                known.process.cpu = cpu;
                seen.insert(pid, known);
                continue;
            }
            // Same process (a reused PID has another start time, and a kept handle of the
            // old one reads nothing), identity settled.
            if let Some(stat) = known.read_stat(paths, pid)
                && stat.start_ticks == known.process.key.start_ticks
            {
                if known.reads >= FULL_READS {
                    known.process.cpu = stat.cpu;
                    if paths.process_clocks && known.clock.is_none() {
                        // Opened after the stat read confirmed the start time: the pidfd is
                        // this process's. Its stat handle is no longer needed.
                        known.clock = ProcessClock::open(pid);
                        if let Some(cpu) = known.clock.as_ref().and_then(ProcessClock::read)
                            && let Some(exits) = cache.exits.as_mut()
                            && exits.add(known.clock.as_ref().expect("opened above"))
                        {
                            known.process.cpu = cpu;
                            known.stat = None;
                        } else {
                            known.clock = None;
                        }
                    }
                    seen.insert(pid, known);
                    continue;
                }
                reads = known.reads + 1;
            }
        }
        if execs.is_none()
            && let Some(left) = cache.no_command_line.get(&pid)
            && *left > 0
        {
            no_command_line.insert(pid, left - 1);
            continue;
        }
        let libvirt = libvirt.get_or_insert_with(|| libvirt_domains(&paths.libvirt_run));
        match look_at_process(paths, pid, libvirt) {
            Ok(process) => {
                seen.insert(
                    pid,
                    KnownProcess {
                        process,
                        reads,
                        stat: None,
                        clock: None,
                    },
                );
            }
            Err(NotQemu::NoCommandLine) => {
                no_command_line.insert(pid, NO_COMMAND_LINE_RECHECK);
            }
            Err(NotQemu::Other) => {}
        }
    }
    // Clocks read above were of the right process only if it was still running after.
    if let Some(exits) = cache.exits.as_mut() {
        match exits.exited() {
            Some(exited) => {
                for pid in exited {
                    if seen.get(&pid).is_some_and(|k| k.clock.is_some()) {
                        seen.remove(&pid);
                    }
                }
            }
            // Nothing known: read them through `stat` from now on.
            None => seen.values_mut().for_each(|k| k.clock = None),
        }
    }
    // Processes not seen any more have exited: forgotten (and their handles closed, which
    // takes their pidfds out of the epoll set) with the old maps.
    cache.exit_cpu = before
        .into_iter()
        .filter(|(pid, _)| !seen.contains_key(pid))
        .collect();
    cache.known = seen;
    // A hinted scan did not visit the kernel threads: their countdowns stay.
    if execs.is_none() {
        cache.no_command_line = no_command_line;
    }
    let mut found: Vec<QemuProcess> = cache.known.values().map(|k| k.process.clone()).collect();
    found.sort_by_key(|p| p.key.pid);
    found
}

/// CPU ticks and start time of a process, if it still exists.
pub fn read_stat(paths: &HostPaths, pid: u32) -> Option<ProcStat> {
    parse_stat(&fs::read_to_string(paths.proc_root.join(pid.to_string()).join("stat")).ok()?)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod garbage_tests {
    use super::*;
    use crate::identity::cmdline::parse_cmdline;

    /// Command lines and stat files are set by whoever starts a process: random bytes must
    /// never panic the parsers.
    #[test]
    fn random_input_never_panics() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b"-=,:()0123456789abcdefguestnamexendomidaccelkvmtcg \x00\x1b\xff";
        for _ in 0..2000 {
            let len = (next() % 200) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            let argv = split_cmdline(&bytes);
            let mut with_qemu = vec!["qemu-system-x86_64".to_string()];
            with_qemu.extend(argv);
            let _ = parse_cmdline(&with_qemu);
            let _ = parse_stat(&String::from_utf8_lossy(&bytes));
            let _ = detect_accel(&parse_cmdline(&with_qemu), None);
        }
    }
}
