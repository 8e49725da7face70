//! Multi-uprobe links (`BPF_TRACE_UPROBE_MULTI`, Linux ≥ 6.6), made by hand as libbpf makes
//! them: one link holds every probed offset of one file, for one process, and closing it
//! removes them all behind one grace period, where a per-site perf link waits for one each
//! (seconds per VM when a VM has dozens of sites; docs/benchmarks.md, `bench teardown`).
//!
//! aya 0.14 can neither load a program for such a link nor make one. A program linked this
//! way must be loaded with `expected_attach_type = BPF_TRACE_UPROBE_MULTI`, which the kernel
//! then refuses on a perf event: so each uprobe program is loaded a second time here, from
//! the same object, relocated against the maps of the `Ebpf` that loaded the first copy (the
//! counts land in the same maps). The per-site links stay the fallback
//! ([`crate::probes::kernel::perf_uprobe`]) where the kernel makes no multi links.

use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    io,
    os::{
        fd::{AsFd as _, AsRawFd as _, OwnedFd, RawFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use super::bpf_call::{BPF_LINK_CREATE, BPF_PROG_LOAD, bpf_fd};
use anyhow::Context as _;
use aya::{Ebpf, maps::Map};

/// `BPF_PROG_LOAD`, `BPF_LINK_CREATE` (enum bpf_cmd).
/// `BPF_PROG_TYPE_KPROBE` (uprobes are kprobe-typed programs).
const BPF_PROG_TYPE_KPROBE: u32 = 2;
/// `BPF_TRACE_UPROBE_MULTI` (enum bpf_attach_type).
const BPF_TRACE_UPROBE_MULTI: u32 = 48;
/// `BPF_F_UPROBE_MULTI_RETURN`: the probes fire at the functions' returns.
const BPF_F_UPROBE_MULTI_RETURN: u32 = 1;

/// `union bpf_attr` for `BPF_PROG_LOAD`, up to `expected_attach_type` (the rest zero).
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
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    _rest: [u64; 8],
}

/// `union bpf_attr`'s `link_create` with the `uprobe_multi` member.
#[repr(C)]
struct LinkCreateUprobeMulti {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    path: u64,
    offsets: u64,
    ref_ctr_offsets: u64,
    cookies: u64,
    cnt: u32,
    multi_flags: u32,
    pid: u32,
    _pad: u32,
}

/// The multi-link copies of some uprobe programs, by program name.
#[derive(Debug, Default)]
pub struct MultiPrograms {
    fds: HashMap<String, OwnedFd>,
    /// Binary-wide links for unbudgeted VMs, where asked for (`None`: each VM links its own).
    shared: Option<std::sync::Mutex<super::shared_links::SharedLinks<MultiUprobe>>>,
}

/// The map data of any kind of map (aya keeps every kind's in the same struct).
fn map_fd(map: &Map) -> RawFd {
    macro_rules! fd {
        ($($variant:ident),*) => {
            match map {
                $(Map::$variant(data) => data.fd().as_fd().as_raw_fd(),)*
            }
        };
    }
    fd!(
        Array,
        ArrayOfMaps,
        BloomFilter,
        CgroupArray,
        CgroupStorage,
        CgrpStorage,
        CpuMap,
        DevMap,
        DevMapHash,
        HashMap,
        HashOfMaps,
        InodeStorage,
        LpmTrie,
        LruHashMap,
        PerCpuArray,
        PerCpuCgroupStorage,
        PerCpuHashMap,
        PerCpuLruHashMap,
        PerfEventArray,
        ProgramArray,
        Queue,
        ReusePortSockArray,
        RingBuf,
        SockHash,
        SockMap,
        SkStorage,
        Stack,
        StackTraceMap,
        Unsupported,
        XskMap
    )
}

impl MultiPrograms {
    /// Loads a multi-link copy of each of `programs` from `object`, relocated against the
    /// maps `ebpf` created from the same object (call it before any map is taken out of
    /// `ebpf`). `Err`: this kernel (or this object) gives no multi links.
    pub fn load(ebpf: &Ebpf, object: &[u8], programs: &[&str]) -> anyhow::Result<Self> {
        let mut obj = aya_obj::Object::parse(object).context("parsing the eBPF object")?;
        let fds: HashMap<&str, RawFd> =
            ebpf.maps().map(|(name, map)| (name, map_fd(map))).collect();
        let maps: Vec<(String, RawFd, aya_obj::Map)> = obj
            .maps
            .iter()
            .filter_map(|(name, map)| Some((name.clone(), *fds.get(name.as_str())?, map.clone())))
            .collect();
        let text_sections: HashSet<usize> =
            obj.functions.keys().map(|(section, _)| *section).collect();
        obj.relocate_maps(
            maps.iter().map(|(name, fd, map)| (name.as_str(), *fd, map)),
            &text_sections,
        )
        .context("relocating the maps of the multi-link programs")?;
        obj.relocate_calls(&text_sections)
            .context("relocating the calls of the multi-link programs")?;
        let mut loaded = HashMap::new();
        for &name in programs {
            let program = obj
                .programs
                .get(name)
                .with_context(|| format!("eBPF program {name} missing from the object"))?;
            let function = obj
                .functions
                .get(&program.function_key())
                .with_context(|| format!("eBPF program {name} has no code"))?;
            let insns = &function.instructions;
            // bpf_insn is the kernel's 8-byte instruction.
            let fd = load_program(name, insns.as_ptr().cast(), insns.len(), &program.license)
                .with_context(|| format!("loading {name} for multi-uprobe links"))?;
            loaded.insert(name.to_string(), fd);
        }
        let this = Self {
            fds: loaded,
            shared: None,
        };
        if let Some(fd) = this.fds.values().next() {
            probe_kernel(fd.as_raw_fd())?;
        }
        Ok(this)
    }

    /// The multi-link copy of `program`.
    pub fn fd(&self, program: &str) -> Option<RawFd> {
        self.fds.get(program).map(|fd| fd.as_raw_fd())
    }

    /// Links QEMU binaries once for all their unbudgeted VMs ([`super::shared_links`]).
    pub fn shared_per_binary(mut self) -> Self {
        self.shared = Some(Default::default());
        self
    }

    /// Whether unbudgeted VMs share binary-wide links.
    pub fn shares(&self) -> bool {
        self.shared.is_some()
    }

    /// The binary-wide links of `program` holding `points` of `target` ([`Self::shares`]).
    pub fn link_shared(
        &self,
        program: &str,
        target: &Path,
        points: &[super::shared_links::SharedPoint],
        retprobe: bool,
    ) -> anyhow::Result<Vec<std::sync::Arc<MultiUprobe>>> {
        let shared = self
            .shared
            .as_ref()
            .context("binary-wide links not asked for")?;
        let prog_fd = self
            .fd(program)
            .with_context(|| format!("no multi-link copy of {program}"))?;
        // A poisoned lock still holds every link made.
        let mut shared = shared.lock().unwrap_or_else(|e| e.into_inner());
        shared.link(program, target, points, |new| {
            let offsets: Vec<u64> = new.iter().map(|p| p.offset).collect();
            let cookies: Vec<u64> = new.iter().map(|p| p.cookie).collect();
            let ref_ctrs: Vec<u64> = new.iter().map(|p| p.ref_ctr_offset).collect();
            let semaphores = ref_ctrs.iter().any(|&r| r != 0).then_some(&ref_ctrs[..]);
            Ok(link(
                prog_fd, target, &offsets, semaphores, &cookies, 0, retprobe,
            )?)
        })
    }

    /// Binary-wide links made so far.
    pub fn shared_links(&self) -> usize {
        self.shared
            .as_ref()
            .map_or(0, |s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
    }
}

/// Whether this kernel makes multi-uprobe links, asked with a program of its own (`r0 = 0;
/// exit`): for `profiler list`, which loads nothing else.
pub fn offered() -> Result<(), String> {
    const RETURN_0: [u64; 2] = [0xb7, 0x95];
    let license = CString::new("GPL").expect("no NUL");
    let fd =
        load_program("probe_multi", RETURN_0.as_ptr(), RETURN_0.len(), &license).map_err(|e| {
            format!("this kernel loads no program for multi-uprobe links (Linux ≥ 6.6 does): {e}")
        })?;
    probe_kernel(fd.as_raw_fd()).map_err(|e| format!("{e:#}"))
}

/// `BPF_PROG_LOAD` of a kprobe-typed program for multi-uprobe links, from `count` 8-byte
/// instructions at `insns`.
fn load_program(
    name: &str,
    insns: *const u64,
    count: usize,
    license: &CString,
) -> io::Result<OwnedFd> {
    let mut prog_name = [0u8; 16];
    for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_KPROBE,
        insn_cnt: count as u32,
        insns: insns as u64,
        license: license.as_ptr() as u64,
        prog_name,
        expected_attach_type: BPF_TRACE_UPROBE_MULTI,
        ..ProgLoadAttr::default()
    };
    // SAFETY: a valid bpf_attr prefix for BPF_PROG_LOAD; the instructions and the license
    // outlive the call.
    super::object::retry_interrupted(
        || unsafe { bpf_fd(BPF_PROG_LOAD, &mut attr) },
        |e| e.raw_os_error() == Some(libc::EAGAIN),
    )
}

/// libbpf's probe: a multi-uprobe link on `/` (a directory) fails with `EBADF` where the
/// kernel has them, with something else (`EINVAL`, `EOPNOTSUPP`) where it has not.
fn probe_kernel(prog_fd: RawFd) -> anyhow::Result<()> {
    match link(prog_fd, Path::new("/"), &[0], None, &[0], 0, false) {
        Ok(_) => anyhow::bail!("the kernel accepted a multi-uprobe link on `/`"),
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => Ok(()),
        Err(e) => Err(e).context("this kernel makes no multi-uprobe links (Linux ≥ 6.6 does)"),
    }
}

/// `0x1060, 0x10000000000, …`: the first offsets of a link, for its errors.
pub fn offsets_text(offsets: &[u64]) -> String {
    let mut text: Vec<String> = offsets.iter().take(8).map(|o| format!("{o:#x}")).collect();
    if offsets.len() > 8 {
        text.push(format!("… ({} in all)", offsets.len()));
    }
    text.join(", ")
}

/// One multi-uprobe link: closing it detaches every one of its probes. Its descriptor lives
/// in a table of its own ([`super::link_tables`]).
#[derive(Debug)]
pub struct MultiUprobe {
    _link: super::link_tables::KeptFd,
}

/// Links `prog_fd` at `offsets` of `target`, scoped to process `pid` (its breakpoints go into
/// that process only; 0: every process mapping it), each offset with its cookie and, where
/// given, the USDT semaphore the kernel raises while it is attached. All or nothing.
pub fn link(
    prog_fd: RawFd,
    target: &Path,
    offsets: &[u64],
    ref_ctr_offsets: Option<&[u64]>,
    cookies: &[u64],
    pid: u32,
    retprobe: bool,
) -> io::Result<MultiUprobe> {
    if offsets.is_empty()
        || cookies.len() != offsets.len()
        || ref_ctr_offsets.is_some_and(|r| r.len() != offsets.len())
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a multi-uprobe link needs one cookie (and semaphore) per offset",
        ));
    }
    let path = CString::new(target.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = LinkCreateUprobeMulti {
        prog_fd: prog_fd as u32,
        target_fd: 0,
        attach_type: BPF_TRACE_UPROBE_MULTI,
        flags: 0,
        path: path.as_ptr() as u64,
        offsets: offsets.as_ptr() as u64,
        ref_ctr_offsets: ref_ctr_offsets.map_or(0, |r| r.as_ptr() as u64),
        cookies: cookies.as_ptr() as u64,
        cnt: offsets.len() as u32,
        multi_flags: if retprobe {
            BPF_F_UPROBE_MULTI_RETURN
        } else {
            0
        },
        pid,
        _pad: 0,
    };
    // SAFETY: a valid bpf_attr prefix for BPF_LINK_CREATE of the size passed; the path and
    // the arrays outlive the call (the kernel copies them).
    let fd = unsafe { bpf_fd(BPF_LINK_CREATE, &mut attr) }?;
    Ok(MultiUprobe {
        _link: super::link_tables::keep(fd),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_the_kernels() {
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, license), 16);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, kern_version), 40);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, prog_name), 48);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, expected_attach_type), 68);
        assert_eq!(std::mem::size_of::<LinkCreateUprobeMulti>(), 64);
        assert_eq!(std::mem::offset_of!(LinkCreateUprobeMulti, path), 16);
        assert_eq!(std::mem::offset_of!(LinkCreateUprobeMulti, cookies), 40);
        assert_eq!(std::mem::offset_of!(LinkCreateUprobeMulti, cnt), 48);
        assert_eq!(std::mem::offset_of!(LinkCreateUprobeMulti, pid), 56);
    }

    #[test]
    fn a_link_needs_one_cookie_per_offset() {
        let e = link(-1, Path::new("/"), &[1, 2], None, &[0], 0, false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(link(-1, Path::new("/"), &[], None, &[], 0, false).is_err());
    }
}
