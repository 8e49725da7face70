//! The record schema: one JSON line per VM per closed window.
//!
//! This is a contract: later versions add fields but never rename or remove one. A count that
//! could not be observed is `null` (with the reason in `sources`), never 0.

use std::io::BufRead;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::identity::cmdline::Accel;

/// Why a window covers less than the full window length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartialReason {
    /// The VM appeared after the window started.
    VmStarted,
    /// The VM exited before the window ended.
    VmExited,
    /// The profiler stopped (duration reached, Ctrl-C, SIGTERM) before the window ended.
    ProfilerStopped,
}

/// The VM a record belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRef {
    /// `-name`, else the libvirt domain name, else `pid N`.
    pub name: String,
    pub pid: u32,
    pub uuid: Option<String>,
    pub accel: Accel,
    #[serde(default)]
    pub xen_domid: Option<u32>,
    /// The emulated devices its command line creates: `-device` drivers, `opt:value`
    /// shorthands (`usb`, `serial:file:/x`), and `default:<opt>` for what the machine creates
    /// by default (`default:parallel`). Absent in recordings made before it existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmdline_devices: Vec<String>,
    /// The libvirt domain (name, uuid) and, for OpenStack guests, the Nova instance (display
    /// name, project, user, flavor); absent for VMs libvirt did not start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt: Option<crate::identity::libvirt::LibvirtDomain>,
    /// When its QEMU process started (RFC 3339, UTC, to the clock tick): what `capacity`'s
    /// settle time counts from. Absent in recordings made before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<String>,
    /// The guest's RAM as configured (`-m`, else QEMU's default), bytes. Absent in
    /// recordings made before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_memory_bytes: Option<u64>,
}

/// The host during one window, on the records of VMs that ran through all of it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HostWindow {
    /// Online CPUs.
    pub cpus: u32,
    /// CPU time the whole host spent busy (not idle) in the window, summed over CPUs.
    pub busy_cpu_seconds: f64,
    /// QEMU processes the profiler watched at the window's end.
    pub vms_running: u32,
    /// Where `busy_cpu_seconds` comes from; absent in recordings made before it existed
    /// (which took `/proc/stat`'s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busy_source: Option<BusySource>,
    /// `/proc/stat`'s busy time over the same window, beside a `sched_switch` figure: the
    /// tick-sampled figure it replaces, kept to show the difference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proc_stat_busy_cpu_seconds: Option<f64>,
    /// The host's memory (`MemTotal`), bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// The profiler's own CPU time in the window (part of `busy_cpu_seconds`; `capacity`
    /// leaves it out: it is the measurement's, not the VMs').
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profiler_cpu_seconds: Option<f64>,
}

/// How the host's busy time was measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BusySource {
    /// The scheduler's runtime of every task (the root cgroup v1 `cpuacct.usage`): exact, in
    /// the clock processes' CPU time is kept in, so never below what they used.
    Cpuacct,
    /// Every CPU's wall-clock time outside its idle task, kept at each context switch (where
    /// no `cpuacct` hierarchy is mounted). A task's runtime also counts the path that wakes it
    /// from idle, so this can read a little below the tasks' sum (docs/capacity.md).
    SchedSwitch,
    /// `/proc/stat`'s non-idle time: sampled at the timer tick, so work in bursts shorter
    /// than a tick is mostly counted as idle.
    ProcStat,
}

/// Which probe source produced each count, or `unavailable: <reason>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sources {
    pub timer: String,
    pub read: String,
    pub write: String,
    /// What splits `timer` by QEMU callback (`timers`): `symbols`, or `unavailable: <why>`.
    #[serde(default)]
    pub timer_callbacks: String,
    /// What counts `vcpu_wakeups` and `vcpu_halt_polls` (KVM: `kvm-tracepoints`), or
    /// `unavailable: <why>`. Empty in recordings made before it existed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vcpu_wakeups: String,
    /// What counts `kvm_exits`, or `unavailable: <why>` (this host's KVM may not fire
    /// `kvm:kvm_exit`). Empty in older recordings.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kvm_exits: String,
}

/// Reads and writes of one emulated device (a QEMU MemoryRegion or a named port range).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCount {
    /// The region's name, as QEMU names it (`uhci`, `parallel`, `operational`, ...).
    pub name: String,
    /// The QOM type of the device that owns the region (`qemu-xhci`, `usb-ehci`, ...), when
    /// QEMU's debug info lets the profiler follow `mr->owner`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    pub read: u64,
    pub write: u64,
}

impl DeviceCount {
    /// `name (owner)`, or just the name when the owner is unknown or says nothing more.
    pub fn label(&self) -> String {
        match &self.owner {
            Some(owner) if *owner != self.name => format!("{} ({owner})", self.name),
            _ => self.name.clone(),
        }
    }
}

/// Runs of one QEMU timer callback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerCallbackCount {
    pub callback: String,
    pub count: u64,
}

/// VM exits for one reason (`kvm:kvm_exit`'s own name for it: `HLT`, `IO_INSTRUCTION`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitCount {
    pub reason: String,
    pub count: u64,
}

/// Where one VM's CPU time went in a window, in CPU seconds. The QEMU process's own time
/// (`cpu_seconds`) is `vcpu + device_model + other` plus the kernel workers that are its
/// threads; `kernel_workers` also holds kernel threads outside it (`kvm-pit/PID`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CpuByRole {
    /// vCPU threads: running the guest, and the host work its exits and halts cause.
    pub vcpu: f64,
    /// The part of `vcpu` the kernel accounted as guest time.
    pub vcpu_guest: f64,
    /// The main loop and iothreads: QEMU's device model.
    pub device_model: f64,
    /// The process's other threads (RCU, thread-pool workers, VNC, ...), exited ones too.
    pub other: f64,
    /// Kernel threads that work for this VM alone: vhost, the in-kernel PIT, NX recovery.
    pub kernel_workers: f64,
    /// vCPU threads at the window's end.
    pub vcpu_threads: u32,
}

/// How many of a window's exit reasons a record keeps by name; the rest are summed as `other`.
pub const EXIT_REASONS_KEPT: usize = 8;

/// One VM's events in one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowRecord {
    /// Window number, from 0 at the profiler's start.
    pub window: u64,
    /// When this record's coverage starts (RFC 3339, UTC): the window's start, or the moment
    /// the VM was first seen for a window it started in.
    pub start: String,
    /// Seconds covered: the window length, or less for a partial window.
    pub seconds: f64,
    pub partial: bool,
    #[serde(default)]
    pub partial_reason: Option<PartialReason>,
    pub vm: VmRef,
    /// Wakeups of QEMU's event loop by an expired deadline.
    pub timer: Option<u64>,
    /// Wakeups of QEMU's event loop by a ready file descriptor.
    pub fd_wakeups: Option<u64>,
    /// Guest reads of emulated devices handled by QEMU.
    pub read: Option<u64>,
    /// Guest writes to emulated devices handled by QEMU.
    pub write: Option<u64>,
    /// KVM tracepoint source only: guest accesses an in-kernel device (LAPIC, IOAPIC, PIT,
    /// ioeventfd, coalesced MMIO/PIO) handled without waking QEMU. Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_kernel: Option<u64>,
    /// KVM: times a vCPU thread was woken after sleeping in a guest halt (the guest's own
    /// timer or an interrupt): host wakeups QEMU's event loop never sees. `null` under TCG
    /// and Xen, with the reason in `sources.vcpu_wakeups`.
    #[serde(default)]
    pub vcpu_wakeups: Option<u64>,
    /// KVM: guest halts that ended while KVM still polled, before its vCPU thread slept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_halt_polls: Option<u64>,
    /// KVM, where the kernel fires `kvm:kvm_exit`: VM exits by reason, most first (the first
    /// [`EXIT_REASONS_KEPT`], the rest as `other`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kvm_exits: Vec<ExitCount>,
    /// User + system CPU time the QEMU process used in the window.
    pub cpu_seconds: Option<f64>,
    /// Where the VM's CPU time went, by thread role; absent where its threads were not read at
    /// both ends of the window (a VM that exited, a recording made before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_by_role: Option<CpuByRole>,
    /// The QEMU process's resident memory at the window's end (its own and the guest RAM the
    /// guest has touched), bytes; absent where it was not read then (as `cpu_by_role`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resident_bytes: Option<u64>,
    pub sources: Sources,
    /// Per-device breakdown of `read`/`write`, busiest first (empty when no source names
    /// devices).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceCount>,
    /// Timer events by QEMU callback, busiest first (empty without symbols).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timers: Vec<TimerCallbackCount>,
    /// The host in this window (full windows only; for capacity planning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostWindow>,
    /// Updates the probes could not store in this window because a kernel map was full (any
    /// VM's: this VM's counts may be low by up to this many). Absent when none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped_updates: u64,
    /// The counts that come from uprobes were measured for only `probed_seconds` of the
    /// window (`--max-overhead` duty-cycled the probes) and scaled to the whole window.
    /// Absent when exact.
    #[serde(default, skip_serializing_if = "is_false")]
    pub estimated: bool,
    /// Seconds of the window the uprobes were on, when `estimated`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probed_seconds: Option<f64>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl WindowRecord {
    pub fn to_json_line(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string(self).expect("WindowRecord serializes")
    }
}

/// Reads a recording (JSON lines). Blank lines are skipped; a malformed line is an error that
/// names its line number. A truncated last line (the recorder was killed mid-write) is
/// skipped with a warning rather than losing the whole file.
pub fn read_records(reader: impl BufRead) -> anyhow::Result<(Vec<WindowRecord>, Vec<String>)> {
    let mut records = Vec::new();
    let mut warnings = Vec::new();
    let lines: Vec<String> = reader
        .lines()
        .collect::<Result<_, _>>()
        .context("reading recording")?;
    let last = lines.len();
    for (i, line) in lines.iter().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match serde_json::from_str::<WindowRecord>(line) {
            Ok(r) => records.push(r),
            Err(e) if i + 1 == last && e.is_eof() => {
                warnings.push(format!("line {}: truncated last record skipped", i + 1));
            }
            Err(e) => anyhow::bail!("line {}: not a window record: {e}", i + 1),
        }
    }
    Ok((records, warnings))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The one window record tests start from: VM `name` (pid `pid`, TCG) in the full window
    /// `window` of `seconds` seconds, starting `window × seconds` after
    /// 2026-11-22T00:00:00Z; timer and fd wakeups counted (0) by the syscall source, reads and
    /// writes unavailable, no CPU, devices or callbacks. Tests set what they look at.
    pub(crate) fn window(name: &str, pid: u32, window: u64, seconds: f64) -> WindowRecord {
        let start = chrono::DateTime::parse_from_rfc3339("2026-11-22T00:00:00Z").unwrap()
            + chrono::TimeDelta::milliseconds((window as f64 * seconds * 1000.0) as i64);
        WindowRecord {
            window,
            start: start
                .to_utc()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            seconds,
            partial: false,
            partial_reason: None,
            vm: VmRef {
                name: name.into(),
                pid,
                uuid: None,
                accel: Accel::Tcg,
                xen_domid: None,
                cmdline_devices: Vec::new(),
                libvirt: None,
                started: None,
                guest_memory_bytes: None,
            },
            timer: Some(0),
            fd_wakeups: Some(0),
            read: None,
            write: None,
            in_kernel: None,
            vcpu_wakeups: None,
            vcpu_halt_polls: None,
            kvm_exits: Vec::new(),
            cpu_seconds: None,
            cpu_by_role: None,
            resident_bytes: None,
            sources: Sources {
                timer: "syscall".into(),
                read: "unavailable: test fixture".into(),
                write: "unavailable: test fixture".into(),
                timer_callbacks: "unavailable: test fixture".into(),
                ..Default::default()
            },
            devices: Vec::new(),
            timers: Vec::new(),
            host: None,
            dropped_updates: 0,
            estimated: false,
            probed_seconds: None,
        }
    }

    /// The README's example window: the demo's noisy guest, 30 s.
    pub(crate) fn sample() -> WindowRecord {
        let mut r = window("noisy", 1234, 0, 30.0);
        r.timer = Some(57990);
        r.fd_wakeups = Some(611);
        r.cpu_seconds = Some(1.62);
        r
    }

    #[test]
    fn round_trip() {
        let r = sample();
        let line = r.to_json_line();
        assert_eq!(serde_json::from_str::<WindowRecord>(&line).unwrap(), r);
    }

    #[test]
    fn schema_field_names_are_the_contract() {
        let v: serde_json::Value = serde_json::from_str(&sample().to_json_line()).unwrap();
        for key in [
            "window",
            "start",
            "seconds",
            "partial",
            "vm",
            "timer",
            "fd_wakeups",
            "read",
            "write",
            "cpu_seconds",
            "sources",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["vm"]["accel"], "tcg");
        assert_eq!(v["vm"]["uuid"], serde_json::Value::Null);
        assert_eq!(v["read"], serde_json::Value::Null);
        assert_eq!(v["sources"]["timer"], "syscall");
    }

    #[test]
    fn reads_the_issue_example_line() {
        let line = r#"{"window":0,"start":"2026-11-22T00:00:00Z","seconds":30.0,"partial":false,"vm":{"name":"noisy","pid":1234,"uuid":null,"accel":"tcg"},"timer":57990,"fd_wakeups":611,"read":null,"write":null,"cpu_seconds":1.62,"sources":{"timer":"syscall","read":"unavailable: x","write":"unavailable: x"}}"#;
        let (records, warnings) = read_records(line.as_bytes()).unwrap();
        assert_eq!(records.len(), 1);
        assert!(warnings.is_empty());
        assert_eq!(records[0].timer, Some(57990));
        // Written before the guest's own counts existed: unknown, not zero.
        let r = &records[0];
        assert_eq!(
            (r.vcpu_wakeups, r.vcpu_halt_polls, r.cpu_by_role),
            (None, None, None)
        );
        assert!(r.kvm_exits.is_empty() && r.sources.vcpu_wakeups.is_empty());
    }

    /// Under TCG `vcpu_wakeups` is written as `null` (with its reason in `sources`); the
    /// other guest counts are left out where there are none.
    #[test]
    fn vcpu_wakeups_is_always_written() {
        let v: serde_json::Value = serde_json::from_str(&sample().to_json_line()).unwrap();
        assert_eq!(v["vcpu_wakeups"], serde_json::Value::Null);
        assert!(v.get("vcpu_wakeups").is_some());
        for absent in ["vcpu_halt_polls", "kvm_exits", "cpu_by_role"] {
            assert!(v.get(absent).is_none(), "{absent}");
        }
    }

    #[test]
    fn truncated_tail_is_skipped_garbage_is_an_error() {
        let full = sample().to_json_line();
        let text = format!("{full}\n\n{}", &full[..20]);
        let (records, warnings) = read_records(text.as_bytes()).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(warnings.len(), 1);
        let err = read_records(format!("{full}\nnot json\n{full}\n").as_bytes()).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }
}
