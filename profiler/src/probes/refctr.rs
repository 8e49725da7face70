//! A uprobe whose USDT semaphore the kernel manages: what libbpf does for USDT
//! (`perf_event_open_probe` with `ref_ctr_off`), which aya 0.14 cannot do.
//!
//! The uprobe perf event is opened with the semaphore's file offset in `config` bits 32..63
//! (`/sys/bus/event_source/devices/uprobe/format/ref_ctr_offset`). The kernel then raises the
//! semaphore in the target process when it inserts the breakpoint and lowers it when the
//! breakpoint goes, which happens when the perf event's last reference is closed: on detach,
//! on exit, and on SIGKILL of the profiler alike (its descriptors are closed by the kernel).
//! QEMU is left as it was found whatever happens to the profiler. The program is attached to
//! the event with `BPF_LINK_CREATE` (`BPF_PERF_EVENT`), carrying the BPF cookie.
//!
//! Counting is per breakpoint and per process: several tracers on the same site share one
//! increment, a stale increment from an earlier hand-raised semaphore stays underneath. The
//! kernel refuses a second registration of the same site with a *different* `ref_ctr_offset`
//! (EINVAL, "ref_ctr_offset mismatch" in the kernel log), e.g. while another tool holds the
//! site without it; callers fall back to raising the semaphore by hand then.

use std::{
    ffi::CString,
    fs, io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
};

const UPROBE_PMU: &str = "/sys/bus/event_source/devices/uprobe";
/// `PERF_FLAG_FD_CLOEXEC`.
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// `BPF_LINK_CREATE` (enum bpf_cmd).
const BPF_LINK_CREATE: libc::c_long = 28;
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
    /// The flags bitfield; 0 leaves the event enabled from creation.
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

/// The uprobe PMU's type and the bit where `ref_ctr_offset` starts in `config`; `None` when
/// this kernel has no such field (before 4.20).
pub fn uprobe_pmu() -> io::Result<(u32, Option<u32>)> {
    let kind: u32 = fs::read_to_string(format!("{UPROBE_PMU}/type"))?
        .trim()
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("uprobe PMU type: {e}")))?;
    let shift = fs::read_to_string(format!("{UPROBE_PMU}/format/ref_ctr_offset"))
        .ok()
        .and_then(|f| parse_config_field(&f));
    Ok((kind, shift))
}

/// `config:32-63` → 32.
fn parse_config_field(format: &str) -> Option<u32> {
    let bits = format.trim().strip_prefix("config:")?;
    bits.split('-').next()?.parse().ok()
}

/// One probe site attached with its semaphore counted by the kernel. Dropping it detaches the
/// program and releases the uprobe (the kernel lowers the semaphore).
#[derive(Debug)]
pub struct RefCountedUprobe {
    /// Held first so the link goes before the event it points at.
    _link: OwnedFd,
    _perf: OwnedFd,
}

/// Attaches the program `prog_fd` at `file_offset` of process `pid`'s executable, with the
/// semaphore at file offset `ref_ctr_offset` managed by the kernel, and the BPF `cookie`.
pub fn attach(
    prog_fd: RawFd,
    pid: u32,
    file_offset: u64,
    ref_ctr_offset: u64,
    cookie: u64,
) -> io::Result<RefCountedUprobe> {
    let (kind, shift) = uprobe_pmu()?;
    let shift = shift.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::Unsupported,
            "this kernel's uprobes have no ref_ctr_offset (Linux < 4.20)",
        )
    })?;
    if ref_ctr_offset >= 1 << (64 - shift) || !ref_ctr_offset.is_multiple_of(2) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("semaphore file offset {ref_ctr_offset:#x} cannot be a ref_ctr_offset"),
        ));
    }
    let path = CString::new(format!("/proc/{pid}/exe")).expect("no NUL in a path");
    let attr = PerfEventAttr {
        kind,
        size: std::mem::size_of::<PerfEventAttr>() as u32,
        config: ref_ctr_offset << shift,
        config1: path.as_ptr() as u64,
        config2: file_offset,
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
    let link_attr = LinkCreatePerfEvent {
        prog_fd: prog_fd as u32,
        target_fd: perf.as_raw_fd() as u32,
        attach_type: BPF_PERF_EVENT,
        flags: 0,
        bpf_cookie: cookie,
    };
    // SAFETY: a valid bpf_attr prefix for BPF_LINK_CREATE of the size passed.
    let link = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            &link_attr as *const LinkCreatePerfEvent,
            std::mem::size_of::<LinkCreatePerfEvent>() as libc::c_uint,
        )
    };
    if link < 0 {
        // `perf` closes here: the uprobe goes away and the semaphore comes back down.
        return Err(io::Error::last_os_error());
    }
    Ok(RefCountedUprobe {
        // SAFETY: a new descriptor the kernel just gave us.
        _link: unsafe { OwnedFd::from_raw_fd(link as RawFd) },
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
            Ok((_, shift)) => assert_eq!(shift, Some(32)),
            Err(e) => eprintln!("SKIPPED: no uprobe PMU readable here: {e}"),
        }
    }
}
