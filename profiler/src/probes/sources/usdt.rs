//! Attaching QEMU's `qemu:memory_region_ops_read/_write` USDT probes to one QEMU process.
//!
//! aya has no USDT support, so this does what libbpf's usdt.c does: the probe sites and their
//! argument specs come from the binary ([`crate::offer::usdt`]); a uprobe is attached at each
//! site's file offset, scoped to the process, with a BPF cookie that indexes the argument
//! layout in `USDT_SPECS`.
//!
//! **Semaphores.** QEMU guards these probe sites with USDT semaphores: the site only runs while
//! the semaphore (a `u16` in QEMU's data segment) is non-zero. The sites are attached with the
//! semaphore managed by the kernel (uprobe `ref_ctr_offset`, see [`crate::probes::kernel::perf_uprobe`]), so it is
//! lowered however the profiler ends, SIGKILL included. Only when the kernel refuses that form
//! (another tracer holds a site without it) are plain uprobes used and the semaphore raised
//! through `/proc/PID/mem`, lowered on drop.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    os::unix::fs::FileExt,
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
};
use profiler_common::{UsdtSpec, kind, link_generation};

use crate::{
    offer::{
        exe::{UsdtBinary, load_bias},
        usdt::site_spec,
    },
    probes::kernel::{
        detacher::Detach,
        perf_uprobe::{self, UprobeSite},
        shared_links::{FileId, SharedPoint},
        uprobe_multi::{self, MultiPrograms},
        uprobes::{self, UprobeLink, UprobeLinks, UprobePoint},
    },
};

pub const PROGRAM: &str = "usdt_memory_region_ops";
/// Argument specs by BPF cookie.
pub const SPECS_MAP: &str = "USDT_SPECS";
/// A USDT semaphore raised in a live process; lowered on drop.
#[derive(Debug)]
struct RaisedSemaphore {
    mem: File,
    addr: u64,
}

impl RaisedSemaphore {
    fn raise(pid: u32, addr: u64) -> anyhow::Result<Self> {
        let mem = OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .with_context(|| format!("opening /proc/{pid}/mem to raise a USDT semaphore"))?;
        adjust(&mem, addr, 1).with_context(|| format!("raising the semaphore at {addr:#x}"))?;
        Ok(Self { mem, addr })
    }
}

/// Adds `delta` to the `u16` at `addr`, saturating (other tracers may hold it too).
fn adjust(mem: &File, addr: u64, delta: i32) -> std::io::Result<()> {
    let mut buf = [0u8; 2];
    mem.read_exact_at(&mut buf, addr)?;
    let value = (u16::from_ne_bytes(buf) as i32 + delta).clamp(0, u16::MAX as i32) as u16;
    mem.write_all_at(&value.to_ne_bytes(), addr)
}

impl Drop for RaisedSemaphore {
    fn drop(&mut self) {
        // Fails harmlessly (ESRCH/EIO) when the process has exited.
        let _ = adjust(&self.mem, self.addr, -1);
    }
}

/// How the sites of one process are attached.
#[derive(Debug)]
enum SiteLinks {
    /// Uprobes with a kernel-managed semaphore ([`perf_uprobe`]): nothing to undo by hand, and
    /// nothing left raised if the profiler is killed.
    Kernel(Vec<UprobeLink>),
    /// aya uprobes and semaphores raised through `/proc/PID/mem`: the fallback when the kernel
    /// refuses the managed form (another tracer holds a site without it). A SIGKILL of the
    /// profiler leaves these semaphores raised.
    ByHand {
        links: UprobeLinks,
        semaphores: Vec<RaisedSemaphore>,
    },
}

/// The read/write probes attached to one QEMU process: spec cookies in `USDT_SPECS` and the
/// sites' links.
#[derive(Debug)]
struct UsdtAttachment {
    cookies: Vec<u32>,
    sites: Option<SiteLinks>,
}

impl UsdtAttachment {
    /// Undoes everything, in reverse order: the sites first (semaphores down, uprobes gone),
    /// then the specs they looked up.
    fn release(self, ebpf: &mut Ebpf) {
        match self.sites {
            Some(SiteLinks::Kernel(uprobes)) => drop(uprobes),
            Some(SiteLinks::ByHand { links, semaphores }) => {
                drop(semaphores);
                links.detach(ebpf);
            }
            None => {}
        }
        forget_specs(ebpf, &self.cookies);
    }
}

fn specs_map(ebpf: &mut Ebpf) -> anyhow::Result<BpfHashMap<&mut MapData, u32, UsdtSpec>> {
    Ok(BpfHashMap::try_from(
        ebpf.map_mut(SPECS_MAP)
            .with_context(|| format!("map {SPECS_MAP} missing"))?,
    )?)
}

fn forget_specs(ebpf: &mut Ebpf, cookies: &[u32]) {
    if let Ok(mut map) = specs_map(ebpf) {
        for cookie in cookies {
            let _ = map.remove(cookie);
        }
    }
}

/// One probe site to attach: its file offset, its argument spec, and its semaphore (file
/// offset for the kernel, runtime address for the by-hand fallback).
#[derive(Debug, Clone, Copy)]
pub struct SiteToAttach {
    pub file_offset: u64,
    pub spec: UsdtSpec,
    pub semaphore_file_offset: Option<u64>,
    pub semaphore_address: Option<u64>,
    /// Its spec is the same in every process of the binary (no operand at an address that
    /// moves with where the process is loaded): a binary-wide link can serve it.
    pub process_independent: bool,
}

/// How a process's USDT semaphores are managed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SemaphoreManagement {
    /// By the kernel (uprobe `ref_ctr_offset`).
    Kernel,
    /// By the profiler, through `/proc/PID/mem`.
    ByHand,
}

/// The USDT read/write source: the `usdt_memory_region_ops` program and its attachments, one
/// per watched QEMU process.
#[derive(Debug, Default)]
pub struct UsdtSource {
    attached: HashMap<u32, UsdtAttachment>,
    next_cookie: u32,
    /// Spec ids of the sites binary-wide links serve, by binary and site; kept while the
    /// links are (the profiler's life).
    shared_specs: HashMap<(FileId, u64), u32>,
    /// The multi-uprobe copy of the program (`None`: per-site links).
    multi: Option<std::sync::Arc<MultiPrograms>>,
}

impl UsdtSource {
    /// Loads the program (attached per process later), linked through `multi` where given.
    pub fn load(
        ebpf: &mut Ebpf,
        multi: Option<std::sync::Arc<MultiPrograms>>,
    ) -> anyhow::Result<Self> {
        uprobes::load(ebpf, PROGRAM)?;
        Ok(Self {
            attached: HashMap::new(),
            next_cookie: 1,
            shared_specs: HashMap::new(),
            multi,
        })
    }

    /// The sites of `exe` as mapped in `pid`: specs, file offsets, semaphores.
    pub fn resolve(pid: u32, exe: &UsdtBinary) -> anyhow::Result<Vec<SiteToAttach>> {
        let inode = crate::offer::exe::exe_identity(pid)?.1;
        let bias = load_bias(pid, inode, |off| {
            exe.segments.iter().find_map(|s| s.vaddr_of(off))
        })?;
        let mut sites = Vec::new();
        for (list, k) in [
            (&exe.sites.read, kind::READ),
            (&exe.sites.write, kind::WRITE),
        ] {
            for site in list {
                let moves = std::cell::Cell::new(false);
                let rip = |symbol: &str, offset: i64| -> anyhow::Result<u64> {
                    moves.set(true);
                    let symbols = exe
                        .symbols
                        .as_ref()
                        .context("a RIP-relative operand needs the binary's symbols")?;
                    let vaddr = crate::offer::elf::resolve_rip_relative(
                        symbols,
                        symbol,
                        offset,
                        Some(site.pc),
                    )?;
                    Ok(vaddr.wrapping_add(bias))
                };
                sites.push(SiteToAttach {
                    file_offset: site.pc_file_offset,
                    spec: site_spec(site, k, &rip)?,
                    semaphore_file_offset: site.semaphore_file_offset,
                    semaphore_address: site.semaphore.map(|sem| bias.wrapping_add(sem)),
                    process_independent: !moves.get(),
                });
            }
        }
        Ok(sites)
    }

    /// Attaches `exe`'s read/write probes to process `pid`, as links of `generation`. All or
    /// nothing: on any error, every spec, uprobe and semaphore this call made is undone.
    pub fn attach(
        &mut self,
        ebpf: &mut Ebpf,
        pid: u32,
        exe: &UsdtBinary,
        generation: u32,
    ) -> anyhow::Result<SemaphoreManagement> {
        let sites = Self::resolve(pid, exe)?;
        self.attach_sites(ebpf, pid, &sites, generation)
    }

    /// [`Self::attach`] with the sites resolved: specs into `USDT_SPECS` under fresh cookies,
    /// then the sites with kernel-managed semaphores; if the kernel refuses that form, aya
    /// uprobes and semaphores raised by hand, last, so the sites fire only once every uprobe
    /// is in.
    pub fn attach_sites(
        &mut self,
        ebpf: &mut Ebpf,
        pid: u32,
        sites: &[SiteToAttach],
        generation: u32,
    ) -> anyhow::Result<SemaphoreManagement> {
        if let Some(a) = self.attached.get(&pid) {
            return Ok(match a.sites {
                Some(SiteLinks::ByHand { .. }) => SemaphoreManagement::ByHand,
                _ => SemaphoreManagement::Kernel,
            });
        }
        let mut made = UsdtAttachment {
            cookies: Vec::new(),
            sites: None,
        };
        // Unbudgeted, where links are shared and every site's spec is the binary's.
        let shared = match &self.multi {
            Some(m) if m.shares() && generation == 0 => sites
                .iter()
                .all(|s| s.process_independent)
                .then(|| FileId::of(std::path::Path::new(&format!("/proc/{pid}/exe"))))
                .transpose()?,
            _ => None,
        };
        let result = (|| -> anyhow::Result<SemaphoreManagement> {
            let mut cookies = Vec::new();
            for site in sites {
                let known =
                    shared.and_then(|file| self.shared_specs.get(&(file, site.file_offset)));
                let id = match known {
                    Some(&id) => id,
                    None => {
                        let id = self.next_cookie;
                        self.next_cookie = self.next_cookie.wrapping_add(1).max(1);
                        specs_map(ebpf)?.insert(id, site.spec, 0)?;
                        match shared {
                            Some(file) => {
                                self.shared_specs.insert((file, site.file_offset), id);
                            }
                            None => made.cookies.push(id),
                        }
                        id
                    }
                };
                cookies.push(link_generation::tag(
                    profiler_common::usdt_cookie::encode(id, &site.spec),
                    if shared.is_some() {
                        link_generation::SHARED
                    } else {
                        generation
                    },
                ));
            }
            let multi = self.multi.as_deref();
            match attach_kernel_managed(ebpf, multi, pid, sites, &cookies, shared.is_some()) {
                Ok(uprobes) => {
                    made.sites = Some(SiteLinks::Kernel(uprobes));
                    Ok(SemaphoreManagement::Kernel)
                }
                // The kernel refuses a site already registered with another ref_ctr_offset
                // (EINVAL): attach as such tools do.
                Err(KernelAttachError::Refused) => {
                    let points: Vec<UprobePoint> = sites
                        .iter()
                        .zip(&cookies)
                        .map(|(site, &cookie)| UprobePoint {
                            file_offset: site.file_offset,
                            cookie,
                        })
                        .collect();
                    // Scoped to the process: its semaphores are raised in it alone.
                    let links = UprobeLinks::attach_in(
                        ebpf,
                        self.multi.as_deref(),
                        PROGRAM,
                        pid,
                        std::path::Path::new(&format!("/proc/{pid}/exe")),
                        &points,
                        generation,
                    )?;
                    made.sites = Some(SiteLinks::ByHand {
                        links,
                        semaphores: Vec::new(),
                    });
                    for addr in sites.iter().filter_map(|s| s.semaphore_address) {
                        let raised = RaisedSemaphore::raise(pid, addr)?;
                        if let Some(SiteLinks::ByHand { semaphores, .. }) = &mut made.sites {
                            semaphores.push(raised);
                        }
                    }
                    Ok(SemaphoreManagement::ByHand)
                }
                Err(KernelAttachError::Failed(e)) => Err(e),
            }
        })();
        match result {
            Ok(how) => {
                self.attached.insert(pid, made);
                Ok(how)
            }
            Err(e) => {
                made.release(ebpf);
                Err(e)
            }
        }
    }

    pub fn is_attached(&self, pid: u32) -> bool {
        self.attached.contains_key(&pid)
    }

    /// Detaches the sites of `pid` (the kernel or the profiler lowers the semaphores) and
    /// drops its specs.
    pub fn detach(&mut self, ebpf: &mut Ebpf, pid: u32) {
        if let Some(attachment) = self.attached.remove(&pid) {
            attachment.release(ebpf);
        }
    }

    pub fn detach_all(&mut self, ebpf: &mut Ebpf) {
        for (_, attachment) in self.attached.drain() {
            attachment.release(ebpf);
        }
    }

    /// `pid`'s sites, to be closed in the background (a budget pause); its specs go now (the
    /// hot path does not need them, and a site whose spec is gone counts nothing).
    pub fn take(&mut self, ebpf: &mut Ebpf, pid: u32) -> Vec<Detach> {
        let Some(attachment) = self.attached.remove(&pid) else {
            return Vec::new();
        };
        let mut taken: Vec<Detach> = Vec::new();
        match attachment.sites {
            Some(SiteLinks::Kernel(uprobes)) => {
                taken.extend(uprobes.into_iter().map(|u| Box::new(u) as _));
            }
            Some(SiteLinks::ByHand { links, semaphores }) => {
                taken.extend(semaphores.into_iter().map(|s| Box::new(s) as _));
                taken.extend(links.take(ebpf));
            }
            None => {}
        }
        forget_specs(ebpf, &attachment.cookies);
        taken
    }
}

/// Why the kernel-managed attach did not happen.
enum KernelAttachError {
    /// The kernel refused the managed form (EINVAL from `perf_event_open` on a guarded site):
    /// worth the by-hand fallback.
    Refused,
    Failed(anyhow::Error),
}

/// Attaches every site with its semaphore managed by the kernel; all or nothing (what was
/// made is dropped, which detaches it, on the first error). One multi-uprobe link where
/// `multi` has the program, else a perf link per site.
fn attach_kernel_managed(
    ebpf: &mut Ebpf,
    multi: Option<&MultiPrograms>,
    pid: u32,
    sites: &[SiteToAttach],
    cookies: &[u64],
    shared: bool,
) -> Result<Vec<UprobeLink>, KernelAttachError> {
    let exe = std::path::PathBuf::from(format!("/proc/{pid}/exe"));
    if let Some(multi) = multi.filter(|m| m.fd(PROGRAM).is_some()) {
        let prog_fd = multi.fd(PROGRAM).expect("checked");
        let offsets: Vec<u64> = sites.iter().map(|s| s.file_offset).collect();
        let semaphores: Vec<u64> = sites
            .iter()
            .map(|s| s.semaphore_file_offset.unwrap_or(0))
            .collect();
        // A semaphore is a 16-bit counter: the kernel takes only even offsets.
        if let Some(odd) = semaphores.iter().find(|r| !r.is_multiple_of(2)) {
            return Err(KernelAttachError::Failed(anyhow::anyhow!(
                "semaphore file offset {odd:#x} cannot be a ref_ctr_offset"
            )));
        }
        if shared {
            let points: Vec<SharedPoint> = (0..offsets.len())
                .map(|i| SharedPoint {
                    offset: offsets[i],
                    cookie: cookies[i],
                    ref_ctr_offset: semaphores[i],
                })
                .collect();
            return match multi.link_shared(PROGRAM, &exe, &points, false) {
                Ok(links) => Ok(links.into_iter().map(UprobeLink::Shared).collect()),
                Err(e)
                    if e.downcast_ref::<std::io::Error>()
                        .and_then(std::io::Error::raw_os_error)
                        == Some(libc::EINVAL)
                        && semaphores.iter().any(|&r| r != 0) =>
                {
                    Err(KernelAttachError::Refused)
                }
                Err(e) => Err(KernelAttachError::Failed(e.context(format!(
                    "attaching USDT sites at file offsets {} of /proc/{pid}/exe (binary-wide \
                     links)",
                    uprobe_multi::offsets_text(&offsets)
                )))),
            };
        }
        return match uprobe_multi::link(
            prog_fd,
            &exe,
            &offsets,
            Some(&semaphores),
            cookies,
            pid,
            false,
        ) {
            Ok(link) => Ok(vec![UprobeLink::Multi(link)]),
            Err(e)
                if e.raw_os_error() == Some(libc::EINVAL) && semaphores.iter().any(|&r| r != 0) =>
            {
                Err(KernelAttachError::Refused)
            }
            Err(e) => Err(KernelAttachError::Failed(anyhow::Error::new(e).context(
                format!(
                    "attaching USDT sites at file offsets {} of /proc/{pid}/exe (one multi-uprobe \
                 link)",
                    uprobe_multi::offsets_text(&offsets)
                ),
            ))),
        };
    }
    let prog_fd = uprobes::program_fd(ebpf, PROGRAM).map_err(KernelAttachError::Failed)?;
    let mut made = Vec::with_capacity(sites.len());
    for (site, &cookie) in sites.iter().zip(cookies) {
        let ref_ctr = site.semaphore_file_offset.unwrap_or(0);
        let uprobe_site = UprobeSite {
            target: &exe,
            file_offset: site.file_offset,
            ref_ctr_offset: site.semaphore_file_offset,
            retprobe: false,
        };
        match perf_uprobe::attach(prog_fd, pid, &uprobe_site, cookie) {
            Ok(uprobe) => made.push(UprobeLink::PerSite(uprobe)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && ref_ctr != 0 => {
                return Err(KernelAttachError::Refused);
            }
            Err(e) => {
                return Err(KernelAttachError::Failed(anyhow::Error::new(e).context(
                    format!(
                        "attaching a uprobe at file offset {:#x} of /proc/{pid}/exe (semaphore at \
                     file offset {ref_ctr:#x})",
                        site.file_offset
                    ),
                )));
            }
        }
    }
    Ok(made)
}
