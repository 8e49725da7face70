//! The floor under any uprobe timer source: an empty BPF program (`r0 = 0; exit`) at the libc
//! result sites of one process, attached exactly as the profiler attaches its own (a per-process
//! uprobe perf event per site, opened disabled, with the program linked by
//! `BPF_LINK_CREATE`; profiler/src/probes/perf_uprobe.rs). What it costs the process is the
//! breakpoint trap and the kernel's uprobe and BPF dispatch, with no program work, no map and
//! no `hrtimer_start` mark: what no program at those sites can go below.
//!
//! The kernel structs below repeat profiler/src/probes/perf_uprobe.rs's: xtask cannot depend on
//! the profiler crate (the profiler's end-to-end tests depend on xtask).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use anyhow::Context as _;

/// `BPF_PROG_LOAD`, `BPF_LINK_CREATE` (enum bpf_cmd).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
/// `BPF_PROG_TYPE_KPROBE`: uprobe programs are kprobe programs.
const BPF_PROG_TYPE_KPROBE: u32 = 2;
/// `BPF_PERF_EVENT` (enum bpf_attach_type).
const BPF_PERF_EVENT: u32 = 41;
/// `PERF_FLAG_FD_CLOEXEC`.
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// `perf_event_attr.disabled`: as the profiler opens them (an enabled per-task event is
/// scheduled at every context switch of the task; a disabled one still runs its program).
const PERF_ATTR_DISABLED: u64 = 1;

/// `mov r0, 0; exit`.
const EMPTY_PROGRAM: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];

/// `union bpf_attr` for `BPF_PROG_LOAD`, up to `kern_version` (the rest zero).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    _rest: [u32; 27],
}

/// `union bpf_attr`'s `link_create` for a perf event.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    bpf_cookie: u64,
    _rest: [u64; 13],
}

/// `struct perf_event_attr`, as far as a uprobe needs (zero up to 128 bytes).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
    config2: u64,
    _rest: [u64; 7],
}

fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a zero-padded `union bpf_attr` prefix of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, size_of::<T>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor the kernel just returned.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The empty program on each of `sites` (file offsets in `library`) of process `pid`, attached
/// while this lives.
pub struct EmptyProgramUprobes {
    /// (link, perf event) per site: the link closes before its event.
    _attached: Vec<(OwnedFd, OwnedFd)>,
    _program: OwnedFd,
}

impl EmptyProgramUprobes {
    pub fn attach(pid: u32, library: &Path, sites: &[u64]) -> anyhow::Result<Self> {
        let license = CString::new("GPL").expect("no NUL");
        let load = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_KPROBE,
            insn_cnt: EMPTY_PROGRAM.len() as u32,
            insns: EMPTY_PROGRAM.as_ptr() as u64,
            license: license.as_ptr() as u64,
            ..ProgLoadAttr::default()
        };
        let program = bpf(BPF_PROG_LOAD, &load).context("loading the empty program")?;
        let kind: u32 = std::fs::read_to_string("/sys/bus/event_source/devices/uprobe/type")
            .context("the uprobe PMU")?
            .trim()
            .parse()
            .context("the uprobe PMU's type")?;
        let path = CString::new(library.as_os_str().as_bytes())?;
        let mut attached = Vec::new();
        for &site in sites {
            let attr = PerfEventAttr {
                kind,
                size: size_of::<PerfEventAttr>() as u32,
                flags: PERF_ATTR_DISABLED,
                config1: path.as_ptr() as u64,
                config2: site,
                ..PerfEventAttr::default()
            };
            // SAFETY: a valid perf_event_attr of the size it says; `path` outlives the call;
            // this process, any CPU, no group.
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
                return Err(io::Error::last_os_error())
                    .with_context(|| format!("a uprobe at {}:{site:#x}", library.display()));
            }
            // SAFETY: a new descriptor the kernel just returned.
            let event = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            let link = LinkCreateAttr {
                prog_fd: program.as_raw_fd() as u32,
                target_fd: event.as_raw_fd() as u32,
                attach_type: BPF_PERF_EVENT,
                ..LinkCreateAttr::default()
            };
            let link = bpf(BPF_LINK_CREATE, &link).context("linking the empty program")?;
            attached.push((link, event));
        }
        Ok(Self {
            _attached: attached,
            _program: program,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte at file offset `offset` of `library` as this process sees it in memory.
    fn mapped_byte(library: &Path, offset: u64) -> u8 {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let address = maps
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let (range, file_off) = (f[0], u64::from_str_radix(f[2], 16).ok()?);
                let (start, end) = range.split_once('-')?;
                let (start, end) = (
                    u64::from_str_radix(start, 16).ok()?,
                    u64::from_str_radix(end, 16).ok()?,
                );
                (f.get(5) == Some(&library.to_str()?)
                    && f[1].contains('x')
                    && (file_off..file_off + (end - start)).contains(&offset))
                .then(|| start + offset - file_off)
            })
            .expect("the site is mapped executable");
        // SAFETY: an address inside a mapped, readable text segment of this process.
        unsafe { *(address as *const u8) }
    }

    /// Root: the floor really puts a breakpoint at each site of the process, and takes it away.
    #[test]
    fn root_the_empty_program_breaks_at_every_site_and_leaves_nothing() {
        let prereq = xtask::prereq::Prereq::new("root_the_empty_program_breaks_at_every_site");
        if prereq.root().is_none() {
            return;
        }
        let pid = std::process::id();
        let library = super::super::watched::mapped_libc(pid).unwrap();
        let sites = super::super::watched::libc_result_sites(&library).unwrap();
        let before: Vec<u8> = sites.iter().map(|&s| mapped_byte(&library, s)).collect();
        assert!(before.iter().all(|&b| b != 0xcc), "{before:x?}");
        let floor = EmptyProgramUprobes::attach(pid, &library, &sites).unwrap();
        for &site in &sites {
            assert_eq!(mapped_byte(&library, site), 0xcc, "no int3 at {site:#x}");
        }
        drop(floor);
        let after: Vec<u8> = sites.iter().map(|&s| mapped_byte(&library, s)).collect();
        assert_eq!(before, after);
    }

    #[test]
    fn the_attrs_have_the_kernels_sizes() {
        // The kernel takes any size of `union bpf_attr` as long as what it does not know is
        // zero; the fields used must be at the kernel's offsets.
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, kern_version), 40);
        assert_eq!(size_of::<LinkCreateAttr>(), 128);
        assert_eq!(size_of::<PerfEventAttr>(), 128);
    }
}
