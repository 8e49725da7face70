//! Attaching QEMU's `qemu:memory_region_ops_read/_write` USDT probes to one QEMU process.
//!
//! aya has no USDT support, so this does what libbpf's usdt.c does: the probe sites come from
//! the binary's `.note.stapsdt` ([`crate::offer::elf::usdt`]); a uprobe is attached at each site's
//! file offset, scoped to the process, with a BPF cookie that indexes the argument layout in
//! `USDT_SPECS`.
//!
//! **Semaphores.** QEMU guards these probe sites with USDT semaphores: the site only runs while
//! the semaphore (a `u16` in QEMU's data segment) is non-zero. The sites are attached with the
//! semaphore managed by the kernel (uprobe `ref_ctr_offset`, see [`crate::probes::kernel::perf_uprobe`]), so it is
//! lowered however the profiler ends, SIGKILL included. Only when the kernel refuses that form
//! (another tracer holds a site without it) are plain uprobes used and the semaphore raised
//! through `/proc/PID/mem`, lowered on drop.

use std::{
    collections::HashMap,
    fs::{self, File, OpenOptions},
    os::unix::fs::FileExt,
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
};
use profiler_common::{USDT_MAX_ARGS, UsdtArgSpec, UsdtSpec, kind, link_generation, usdt_arg};

use crate::offer::elf::usdt::{UsdtArg, UsdtArgLocation, UsdtProbe, parse_usdt_probes};
use crate::{
    offer::exe::UsdtBinary,
    probes::kernel::{
        perf_uprobe::{self, PerfUprobe, UprobeSite},
        uprobes::{self, UprobeLinks, UprobePoint},
    },
};

pub const PROGRAM: &str = "usdt_memory_region_ops";
/// Argument specs by BPF cookie.
pub const SPECS_MAP: &str = "USDT_SPECS";
pub const PROVIDER: &str = "qemu";
pub const READ_PROBE: &str = "memory_region_ops_read";
pub const WRITE_PROBE: &str = "memory_region_ops_write";
/// `(int cpu_index, void *mr, u64 addr, u64 value, unsigned size, const char *name)`.
const REGION_ARG: u32 = 1;
const NAME_ARG: u32 = 5;

/// The read/write probe sites of one QEMU executable.
#[derive(Debug, Clone)]
pub struct RegionOpsSites {
    pub read: Vec<UsdtProbe>,
    pub write: Vec<UsdtProbe>,
}

/// Finds the memory_region_ops sites in a QEMU binary; `Ok(None)` when it has none.
pub fn find_region_ops_sites(elf_bytes: &[u8]) -> anyhow::Result<Option<RegionOpsSites>> {
    let probes = parse_usdt_probes(elf_bytes)?;
    let pick = |name: &str| -> Vec<UsdtProbe> {
        probes
            .iter()
            .filter(|p| p.provider == PROVIDER && p.name == name)
            .cloned()
            .collect()
    };
    let (read, write) = (pick(READ_PROBE), pick(WRITE_PROBE));
    if read.is_empty() || write.is_empty() {
        return Ok(None);
    }
    Ok(Some(RegionOpsSites { read, write }))
}

/// Resolves a RIP-relative operand (`symbol+offset`) to its runtime address.
pub type RipResolver<'a> = dyn Fn(&str, i64) -> anyhow::Result<u64> + 'a;

/// Turns a parsed USDT argument into the eBPF side's fetch instructions. RIP-relative operands
/// (`8@seq_iter.6(%rip)`) are resolved here, in userspace, to an absolute runtime address the
/// eBPF side reads; indexed operands (`(%rax,%rbx,8)`) are refused.
pub fn arg_spec(arg: &UsdtArg, rip: &RipResolver<'_>) -> anyhow::Result<UsdtArgSpec> {
    let bitshift = 64 - 8 * u8::min(arg.size, 8);
    let base = UsdtArgSpec {
        signed: arg.signed as u8,
        bitshift,
        ..UsdtArgSpec::default()
    };
    Ok(match &arg.location {
        UsdtArgLocation::Register { reg } => UsdtArgSpec {
            arg_type: usdt_arg::REG,
            reg_off: reg.pt_regs_offset() as u16,
            ..base
        },
        UsdtArgLocation::Memory { base: reg, offset } => UsdtArgSpec {
            arg_type: usdt_arg::REG_DEREF,
            reg_off: reg.pt_regs_offset() as u16,
            val_off: *offset as u64,
            ..base
        },
        UsdtArgLocation::Constant(v) => UsdtArgSpec {
            arg_type: usdt_arg::CONST,
            val_off: *v as u64,
            ..base
        },
        UsdtArgLocation::RipRelative { symbol, offset } => UsdtArgSpec {
            arg_type: usdt_arg::ABS_DEREF,
            val_off: rip(symbol, *offset)?,
            ..base
        },
        other => bail!("USDT operand {other:?} is not supported"),
    })
}

/// The eBPF-side spec of one probe site.
pub fn site_spec(
    site: &UsdtProbe,
    counter_kind: u32,
    rip: &RipResolver<'_>,
) -> anyhow::Result<UsdtSpec> {
    let args = site.parsed_args()?;
    if args.len() <= NAME_ARG as usize || args.len() > USDT_MAX_ARGS {
        bail!(
            "{}:{} has {} arguments ({}), expected 6",
            site.provider,
            site.name,
            args.len(),
            site.raw_args
        );
    }
    let mut spec = UsdtSpec {
        args: [UsdtArgSpec::default(); USDT_MAX_ARGS],
        arg_count: args.len() as u32,
        kind: counter_kind,
        region_arg: REGION_ARG,
        name_arg: NAME_ARG,
    };
    for i in [REGION_ARG as usize, NAME_ARG as usize] {
        spec.args[i] = arg_spec(&args[i], rip)
            .with_context(|| format!("argument {i} of {}:{}", site.provider, site.name))?;
    }
    Ok(spec)
}

/// Where `exe` (by inode) is mapped in `pid`, as the load bias to add to link-time addresses.
pub fn load_bias(
    pid: u32,
    exe_inode: u64,
    offset_to_vaddr: impl Fn(u64) -> Option<u64>,
) -> anyhow::Result<u64> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps"))
        .with_context(|| format!("reading /proc/{pid}/maps"))?;
    parse_load_bias(&maps, exe_inode, offset_to_vaddr)
}

/// `/proc/PID/maps` lines: `start-end perms offset dev inode path`. The bias is the first
/// mapping of the binary minus the link-time address of its file offset.
pub fn parse_load_bias(
    maps: &str,
    inode: u64,
    offset_to_vaddr: impl Fn(u64) -> Option<u64>,
) -> anyhow::Result<u64> {
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(_perms), Some(off), Some(_dev), Some(ino)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        if ino.parse::<u64>().ok() != Some(inode) {
            continue;
        }
        let start = range
            .split('-')
            .next()
            .and_then(|s| u64::from_str_radix(s, 16).ok());
        let off = u64::from_str_radix(off, 16).ok();
        if let (Some(start), Some(off)) = (start, off)
            && let Some(vaddr) = offset_to_vaddr(off)
        {
            return Ok(start.wrapping_sub(vaddr & !0xfff));
        }
    }
    bail!("the QEMU binary (inode {inode}) is not mapped in the process")
}

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
    Kernel(Vec<PerfUprobe>),
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
}

impl UsdtSource {
    /// Loads the program (attached per process later).
    pub fn load(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        uprobes::load(ebpf, PROGRAM)?;
        Ok(Self {
            attached: HashMap::new(),
            next_cookie: 1,
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
                let rip = |symbol: &str, offset: i64| -> anyhow::Result<u64> {
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
        let result = (|| -> anyhow::Result<SemaphoreManagement> {
            let mut cookies = Vec::new();
            for site in sites {
                let id = self.next_cookie;
                self.next_cookie = self.next_cookie.wrapping_add(1).max(1);
                specs_map(ebpf)?.insert(id, site.spec, 0)?;
                made.cookies.push(id);
                cookies.push(link_generation::tag(
                    profiler_common::usdt_cookie::encode(id, &site.spec),
                    generation,
                ));
            }
            match attach_kernel_managed(ebpf, pid, sites, &cookies) {
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
                    let links = UprobeLinks::attach(ebpf, PROGRAM, pid, &points, generation)?;
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
    pub fn take(
        &mut self,
        ebpf: &mut Ebpf,
        pid: u32,
    ) -> Vec<crate::probes::kernel::detacher::Detach> {
        let Some(attachment) = self.attached.remove(&pid) else {
            return Vec::new();
        };
        let mut taken: Vec<crate::probes::kernel::detacher::Detach> = Vec::new();
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
/// made is dropped, which detaches it, on the first error).
fn attach_kernel_managed(
    ebpf: &mut Ebpf,
    pid: u32,
    sites: &[SiteToAttach],
    cookies: &[u64],
) -> Result<Vec<PerfUprobe>, KernelAttachError> {
    let prog_fd = uprobes::program_fd(ebpf, PROGRAM).map_err(KernelAttachError::Failed)?;
    let exe = std::path::PathBuf::from(format!("/proc/{pid}/exe"));
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
            Ok(uprobe) => made.push(uprobe),
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

#[cfg(test)]
mod tests {
    use profiler_common::kind;

    use super::*;
    use crate::offer::elf::usdt::parse_args;

    #[test]
    fn specs_for_qemu_memory_region_ops() {
        // The argument spec of QEMU 7.2's memory_region_ops_read (Debian source, dtrace).
        let args = parse_args("-4@%edi 8@%rsi 8@%rdx 8@%rcx 4@%r8d 8@%r9").unwrap();
        let no_rip = |_: &str, _: i64| -> anyhow::Result<u64> { anyhow::bail!("no symbols") };
        let mr = arg_spec(&args[1], &no_rip).unwrap();
        assert_eq!(mr.arg_type, usdt_arg::REG);
        assert_eq!(mr.reg_off, 104); // rsi in struct pt_regs
        assert_eq!(mr.bitshift, 0);
        let name = arg_spec(&args[5], &no_rip).unwrap();
        assert_eq!(name.reg_off, 64); // r9
        let cpu = arg_spec(&args[0], &no_rip).unwrap();
        assert_eq!((cpu.signed, cpu.bitshift, cpu.reg_off), (1, 32, 112)); // edi
        let deref = arg_spec(&parse_args("-4@-20(%rbp)").unwrap()[0], &no_rip).unwrap();
        assert_eq!(deref.arg_type, usdt_arg::REG_DEREF);
        assert_eq!(deref.val_off as i64, -20);
        let constant = arg_spec(&parse_args("4@$7").unwrap()[0], &no_rip).unwrap();
        assert_eq!((constant.arg_type, constant.val_off), (usdt_arg::CONST, 7));
        let rip = parse_args("8@seq_iter.6+8(%rip)").unwrap();
        assert!(arg_spec(&rip[0], &no_rip).is_err());
        // Resolved in userspace to symbol + offset + load bias; the eBPF side reads it.
        let resolve = |sym: &str, off: i64| -> anyhow::Result<u64> {
            assert_eq!(sym, "seq_iter.6");
            Ok((0x55d0_0000_0000u64 + 0xe4b000).wrapping_add(off as u64))
        };
        let abs = arg_spec(&rip[0], &resolve).unwrap();
        assert_eq!(abs.arg_type, usdt_arg::ABS_DEREF);
        assert_eq!(abs.val_off, 0x55d0_00e4_b008);
        assert!(arg_spec(&parse_args("8@(%rax,%rbx,8)").unwrap()[0], &resolve).is_err());
    }

    #[test]
    fn load_bias_from_maps() {
        let maps = "\
55d0c8a00000-55d0c8c85000 r--p 00000000 fe:01 1234 /usr/bin/qemu-system-x86_64
55d0c8c85000-55d0c9130000 r-xp 00285000 fe:01 1234 /usr/bin/qemu-system-x86_64
7f0000000000-7f0000001000 r--p 00000000 fe:01 999 /usr/lib/libc.so.6
";
        let bias = parse_load_bias(maps, 1234, Some).unwrap();
        assert_eq!(bias, 0x55d0c8a00000);
        assert!(parse_load_bias(maps, 42, Some).is_err());
        // A non-PIE binary linked at 0x400000: bias 0.
        let maps = "00400000-00452000 r-xp 00000000 08:02 173521 /usr/bin/qemu-kvm\n";
        assert_eq!(
            parse_load_bias(maps, 173521, |_| Some(0x400000)).unwrap(),
            0
        );
    }

    #[test]
    fn qemu_with_usdt_has_one_site_each() {
        let Some(path) = xtask::prereq::Prereq::new("qemu_with_usdt_has_one_site_each").usdt_qemu()
        else {
            return;
        };
        let bytes = fs::read(&path).unwrap();
        let sites = find_region_ops_sites(&bytes)
            .unwrap()
            .expect("probes present");
        assert_eq!((sites.read.len(), sites.write.len()), (1, 1));
        let no_rip = |_: &str, _: i64| -> anyhow::Result<u64> { anyhow::bail!("no symbols") };
        for site in sites.read.iter().chain(&sites.write) {
            site_spec(site, kind::READ, &no_rip).unwrap();
            assert!(site.semaphore.is_some());
        }
    }
}
