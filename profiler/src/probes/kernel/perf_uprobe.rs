//! uprobes opened as perf events by hand (`perf_event_open(2)` on the `uprobe` PMU, then
//! `BPF_LINK_CREATE` with `BPF_PERF_EVENT`), as libbpf does, for two things aya 0.14's
//! `UProbe::attach` cannot do:
//!
//! - **Opened disabled.** A uprobe scoped to one process is a per-task perf event of that
//!   process's main thread, and an *enabled* per-task event is scheduled in and out of the
//!   thread's perf context at every context switch, whether or not its breakpoint is ever hit.
//!   QEMU's main loop sleeps and wakes thousands of times a second, so never-hit enabled
//!   events cost it CPU that disabled ones do not (docs/probes.md and docs/benchmarks.md have
//!   the measurement). A disabled event is never scheduled, yet its
//!   program runs on every hit: the kernel registers the uprobe and applies the breakpoint to
//!   the process when the event is *opened*, and the hit runs the programs attached to the
//!   event's trace call without looking at the event's state. The end-to-end tests' exact
//!   counts are what show it on a given kernel.
//! - **USDT semaphores managed by the kernel** (`ref_ctr_offset`, below).
//!
//! A semaphore's file offset goes in `config` bits 32..63
//! (`/sys/bus/event_source/devices/uprobe/format/ref_ctr_offset`). The kernel then raises the
//! semaphore in the target process when it inserts the breakpoint and lowers it when the
//! breakpoint goes, which happens when the perf event's last reference is closed: on detach,
//! on exit, and on SIGKILL of the profiler alike (its descriptors are closed by the kernel).
//! QEMU is left as it was found whatever happens to the profiler.
//!
//! Counting is per breakpoint and per process: several tracers on the same site share one
//! increment, a stale increment from an earlier hand-raised semaphore stays underneath. The
//! kernel refuses a second registration of the same site with a *different* `ref_ctr_offset`
//! (EINVAL, "ref_ctr_offset mismatch" in the kernel log), e.g. while another tool holds the
//! site without it; callers fall back to raising the semaphore by hand then.

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
    sync::OnceLock,
};

use super::bpf_call::{BPF_LINK_CREATE, bpf_fd};

const UPROBE_PMU: &str = "/sys/bus/event_source/devices/uprobe";
/// `PERF_FLAG_FD_CLOEXEC`.
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// `perf_event_attr.disabled` (bit 0 of the flags).
const PERF_ATTR_DISABLED: u64 = 1;
/// `BPF_PERF_EVENT` (enum bpf_attach_type).
const BPF_PERF_EVENT: u32 = 41;

/// `struct perf_event_attr` up to `config2` (`PERF_ATTR_SIZE_VER1` is 72 bytes; the rest is
/// zero padding up to the 128 bytes of the 6.x headers).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    /// The flags bitfield (`disabled` is bit 0).
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    /// For a uprobe: a pointer to the path.
    config1: u64,
    /// For a uprobe: the file offset of the probe.
    config2: u64,
    _rest: [u64; 7],
}

/// `union bpf_attr`'s `link_create` with the `perf_event` member.
#[repr(C)]
struct LinkCreatePerfEvent {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    bpf_cookie: u64,
}

/// What this kernel's uprobe PMU says about its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UprobePmu {
    /// The PMU's perf type.
    pub kind: u32,
    /// Where `ref_ctr_offset` starts in `config`; `None` before Linux 4.20.
    pub ref_ctr_shift: Option<u32>,
    /// The `config` bit that makes a return probe.
    pub retprobe_bit: u32,
}

/// Reads the uprobe PMU's description from sysfs (once: it cannot change while running).
pub fn uprobe_pmu() -> io::Result<UprobePmu> {
    static PMU: OnceLock<Result<UprobePmu, String>> = OnceLock::new();
    PMU.get_or_init(|| {
        let kind: u32 = fs::read_to_string(format!("{UPROBE_PMU}/type"))
            .map_err(|e| format!("{UPROBE_PMU}/type: {e}"))?
            .trim()
            .parse()
            .map_err(|e| format!("uprobe PMU type: {e}"))?;
        let field = |name: &str| {
            fs::read_to_string(format!("{UPROBE_PMU}/format/{name}"))
                .ok()
                .and_then(|f| parse_config_field(&f))
        };
        Ok(UprobePmu {
            kind,
            ref_ctr_shift: field("ref_ctr_offset"),
            retprobe_bit: field("retprobe").unwrap_or(0),
        })
    })
    .clone()
    .map_err(io::Error::other)
}

/// `config:32-63` → 32.
fn parse_config_field(format: &str) -> Option<u32> {
    let bits = format.trim().strip_prefix("config:")?;
    bits.split('-').next()?.parse().ok()
}

/// Where a uprobe goes.
#[derive(Debug, Clone, Copy)]
pub struct UprobeSite<'a> {
    /// The file, by a path that names the inode the process maps (`/proc/PID/exe`,
    /// `/proc/PID/map_files/…`).
    pub target: &'a Path,
    pub file_offset: u64,
    /// The file offset of a USDT semaphore for the kernel to manage.
    pub ref_ctr_offset: Option<u64>,
    /// At the function's return instead of at `file_offset` itself.
    pub retprobe: bool,
}

/// One attached uprobe. Dropping it detaches the program and releases the uprobe (the kernel
/// lowers a managed semaphore).
#[derive(Debug)]
pub struct PerfUprobe {
    /// Held first so the link goes before the event it points at.
    _link: OwnedFd,
    _perf: OwnedFd,
}

/// Attaches the program `prog_fd` at `site`, scoped to process `pid` (its breakpoint goes
/// into that process only), with the BPF `cookie`. On error nothing is left attached.
pub fn attach(prog_fd: RawFd, pid: u32, site: &UprobeSite, cookie: u64) -> io::Result<PerfUprobe> {
    let pmu = uprobe_pmu()?;
    let mut config = 0;
    if let Some(offset) = site.ref_ctr_offset {
        let shift = pmu.ref_ctr_shift.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                "this kernel's uprobes have no ref_ctr_offset (Linux < 4.20)",
            )
        })?;
        if offset >= 1 << (64 - shift) || !offset.is_multiple_of(2) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("semaphore file offset {offset:#x} cannot be a ref_ctr_offset"),
            ));
        }
        config |= offset << shift;
    }
    if site.retprobe {
        config |= 1 << pmu.retprobe_bit;
    }
    let path = CString::new(site.target.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = PerfEventAttr {
        kind: pmu.kind,
        size: std::mem::size_of::<PerfEventAttr>() as u32,
        config,
        flags: PERF_ATTR_DISABLED,
        config1: path.as_ptr() as u64,
        config2: site.file_offset,
        ..PerfEventAttr::default()
    };
    // SAFETY: attr is a valid perf_event_attr prefix of the size it says; path outlives the
    // call; pid, cpu -1 (any), group -1 (none).
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const PerfEventAttr,
            pid as libc::pid_t,
            -1 as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor the kernel just gave us.
    let perf = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let mut link_attr = LinkCreatePerfEvent {
        prog_fd: prog_fd as u32,
        target_fd: perf.as_raw_fd() as u32,
        attach_type: BPF_PERF_EVENT,
        flags: 0,
        bpf_cookie: cookie,
    };
    // SAFETY: a valid bpf_attr prefix for BPF_LINK_CREATE of the size passed.
    // On an error `perf` closes here: the uprobe goes away (and a managed semaphore comes
    // back down).
    let link = unsafe { bpf_fd(BPF_LINK_CREATE, &mut link_attr) }?;
    Ok(PerfUprobe {
        _link: link,
        _perf: perf,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_the_kernels() {
        assert_eq!(std::mem::size_of::<PerfEventAttr>(), 128);
        assert_eq!(std::mem::offset_of!(PerfEventAttr, config), 8);
        assert_eq!(std::mem::offset_of!(PerfEventAttr, flags), 40);
        assert_eq!(std::mem::offset_of!(PerfEventAttr, config1), 56);
        assert_eq!(std::mem::offset_of!(PerfEventAttr, config2), 64);
        assert_eq!(std::mem::size_of::<LinkCreatePerfEvent>(), 24);
        assert_eq!(std::mem::offset_of!(LinkCreatePerfEvent, bpf_cookie), 16);
    }

    #[test]
    fn config_field_formats() {
        assert_eq!(parse_config_field("config:32-63\n"), Some(32));
        assert_eq!(parse_config_field("config:0"), Some(0));
        assert_eq!(parse_config_field("config1:0-63"), None);
        assert_eq!(parse_config_field(""), None);
    }

    #[test]
    fn this_kernel_has_ref_ctr_offset() {
        // Every kernel since 4.20 has it; the machines this project runs on are 6.x.
        match uprobe_pmu() {
            Ok(pmu) => {
                assert_eq!(pmu.ref_ctr_shift, Some(32));
                assert_eq!(pmu.retprobe_bit, 0);
            }
            Err(e) => {
                xtask::prereq::Prereq::new("this_kernel_has_ref_ctr_offset").missing::<()>(
                    &format!(
                        "no uprobe PMU readable here ({e}): a kernel without CONFIG_UPROBE_EVENTS, \
                         or no /sys mounted"
                    ),
                );
            }
        }
    }
}
