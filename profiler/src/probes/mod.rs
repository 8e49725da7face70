//! Loading the eBPF programs, keeping the watched-process set current, and reading counters.
//!
//! One file per probe family (kunai style); this module owns the shared maps.

pub mod kvm;
pub mod symbols;
pub mod timers;
pub mod usdt;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    os::fd::OwnedFd,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap},
    programs::UProbe,
};
use profiler_common::{CounterKey, RegionKey, RegionName, UNNAMED_REGION_MARK, UsdtSpec, kind};

use crate::elf::LoadSegment;

/// The compiled eBPF object, embedded at build time by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler"));

/// Counters of one QEMU process, cumulative since it was first watched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessCounters {
    /// (kind, id) -> count, summed over CPUs.
    pub by_key: BTreeMap<(u32, u64), u64>,
    /// MemoryRegion pointer -> name, for read/write ids.
    pub region_names: HashMap<u64, String>,
    /// Callback link-time address -> function name, for timer-callback ids.
    pub callback_names: HashMap<u64, String>,
    /// MemoryRegion pointer -> QOM type of its owner device, where known.
    pub region_owners: HashMap<u64, String>,
    /// Nameless regions seen by the symbols source: QEMU subpages, which dispatch the same
    /// access again to the real region; left out of read/write counts.
    pub unnamed_regions: HashSet<u64>,
}

impl ProcessCounters {
    /// Total of one kind over all ids (reads/writes of unnamed subpage regions excluded).
    pub fn total(&self, kind: u32) -> u64 {
        let region_kind = kind == kind::READ || kind == kind::WRITE;
        self.by_key
            .iter()
            .filter(|((k, id), _)| {
                *k == kind && !(region_kind && self.unnamed_regions.contains(id))
            })
            .map(|(_, v)| v)
            .sum()
    }
    pub fn timer(&self) -> u64 {
        self.total(kind::TIMER)
    }
    pub fn fd_wakeups(&self) -> u64 {
        self.total(kind::FD_WAKEUP)
    }
    /// Cumulative (reads, writes) per device name. Regions are keyed by pointer in the
    /// kernel; several regions may share a name (e.g. one per UHCI port range), so they are
    /// summed by name here.
    pub fn devices(&self) -> BTreeMap<String, (u64, u64)> {
        let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for (&(k, id), &n) in &self.by_key {
            if (k != kind::READ && k != kind::WRITE) || self.unnamed_regions.contains(&id) {
                continue;
            }
            let name = self
                .region_names
                .get(&id)
                .cloned()
                .unwrap_or_else(|| format!("region@{id:#x}"));
            let key = crate::collector::device_key(
                &name,
                self.region_owners.get(&id).map(String::as_str),
            );
            let entry = out.entry(key).or_default();
            if k == kind::READ {
                entry.0 += n;
            } else {
                entry.1 += n;
            }
        }
        out
    }

    /// Reads/writes QEMU handled, as the read/write source `source` counts them.
    pub fn reads_writes(&self, source: &ReadWriteSource) -> (Option<u64>, Option<u64>) {
        match source {
            ReadWriteSource::Usdt | ReadWriteSource::Symbols => {
                (Some(self.total(kind::READ)), Some(self.total(kind::WRITE)))
            }
            ReadWriteSource::KvmTracepoints => {
                let k = kvm::kvm_counts(&self.by_key);
                (Some(k.reads_user()), Some(k.writes_user()))
            }
            ReadWriteSource::Unavailable(_) => (None, None),
        }
    }

    /// Per-device (reads, writes) for `source`; KVM ports and pages are named through
    /// `names` (QEMU's `info mtree -f`) when known, else by address.
    pub fn devices_for(
        &self,
        source: &ReadWriteSource,
        names: Option<&crate::mtree::MtreeMap>,
    ) -> BTreeMap<String, (u64, u64)> {
        match source {
            ReadWriteSource::Usdt | ReadWriteSource::Symbols => self.devices(),
            ReadWriteSource::KvmTracepoints => {
                let k = kvm::kvm_counts(&self.by_key);
                let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
                let ports = k.by_port.iter().map(|(&port, &rw)| {
                    let name = if port == u64::MAX {
                        Some("port (unknown)".to_string())
                    } else {
                        names.and_then(|n| n.name_for_port(port)).map(String::from)
                    };
                    (name.unwrap_or_else(|| format!("port {port:#x}")), rw)
                });
                let pages = k.by_page.iter().map(|(&page, &rw)| {
                    let name = names.and_then(|n| n.name_for_gpa(page)).map(String::from);
                    (name.unwrap_or_else(|| format!("mmio {page:#x}")), rw)
                });
                for (name, (r, w)) in ports.chain(pages) {
                    let e = out.entry(name).or_default();
                    e.0 += r;
                    e.1 += w;
                }
                out
            }
            ReadWriteSource::Unavailable(_) => BTreeMap::new(),
        }
    }

    /// Accesses an in-kernel KVM device handled (never reached QEMU).
    pub fn kvm_in_kernel(&self) -> u64 {
        kvm::kvm_counts(&self.by_key).in_kernel
    }

    /// Cumulative runs per timer callback name.
    pub fn callbacks(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for (&(k, id), &n) in &self.by_key {
            if k == kind::TIMER_CALLBACK {
                let name = self
                    .callback_names
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| format!("{id:#x}"));
                *out.entry(name).or_default() += n;
            }
        }
        out
    }
}

/// What a QEMU binary offers the read/write probe, parsed once per executable.
#[derive(Debug)]
struct ExeProbes {
    sites: usdt::RegionOpsSites,
    segments: Vec<LoadSegment>,
    /// The binary's own symbols, for RIP-relative USDT operands (None: stripped).
    symbols: Option<crate::elf::SymbolTable>,
}

/// Which source serves a process's read/write counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadWriteSource {
    Usdt,
    /// uprobes on memory_region_dispatch_read/_write, found through symbols.
    Symbols,
    /// kvm:kvm_pio / kvm_mmio / kvm_userspace_exit tracepoints (KVM guests).
    KvmTracepoints,
    Unavailable(String),
}

impl ReadWriteSource {
    pub fn is_available(&self) -> bool {
        !matches!(self, ReadWriteSource::Unavailable(_))
    }

    pub fn label(&self) -> String {
        match self {
            ReadWriteSource::Usdt => "usdt".into(),
            ReadWriteSource::Symbols => "symbols".into(),
            ReadWriteSource::KvmTracepoints => "kvm-tracepoints".into(),
            ReadWriteSource::Unavailable(why) => format!("unavailable: {why}"),
        }
    }
}

/// Why a binary without the USDT probes cannot give read/write counts, and what would fix it.
pub const NO_USDT_REASON: &str = "this QEMU has no qemu:memory_region_ops_read/write USDT \
     probes (built without the dtrace trace backend, e.g. Debian/Ubuntu packages); use a QEMU \
     built with --enable-trace-backends=dtrace (Fedora/RHEL packages are; `cargo xtask \
     qemu-usdt` builds one)";

/// The profiler's own cost in the kernel, from BPF run-time statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProbeCost {
    pub run_count: u64,
    pub run_time: Duration,
}

/// The loaded and attached eBPF programs.
pub struct EventProbes {
    ebpf: Ebpf,
    watched: HashSet<u32>,
    /// Parsed USDT sites per executable (device, inode); `Err` holds why not.
    exe_probes: HashMap<(u64, u64), Result<Arc<ExeProbes>, String>>,
    usdt: HashMap<u32, usdt::UsdtAttachment>,
    rw_sources: HashMap<u32, ReadWriteSource>,
    next_spec_id: u32,
    debug_roots: crate::elf::DebugRoots,
    /// Symbols per executable (device, inode); `Err` holds why not.
    exe_symbols: HashMap<(u64, u64), Result<Arc<symbols::ExeSymbols>, String>>,
    symbol_probes: HashMap<u32, SymbolProbes>,
    /// Owner type per (process, region), resolved once (None: no owner or unreadable).
    region_owners: HashMap<(u32, u64), Option<String>>,
    /// Whether the KVM tracepoints are attached (Err: why not).
    kvm_status: Result<(), String>,
    /// Keeps BPF run-time statistics enabled while we run (None: kernel refused).
    _stats: Option<OwnedFd>,
}

/// The symbol-based probes of one process.
#[derive(Debug)]
struct SymbolProbes {
    exe: Arc<symbols::ExeSymbols>,
    bias: u64,
    attachment: symbols::SymbolAttachment,
    /// Why timer callbacks cannot be named (None: they can).
    callbacks_unavailable: Option<String>,
}

/// Loads the tracepoint program `name` and attaches it to `category:name`.
pub fn attach_tracepoint(ebpf: &mut Ebpf, category: &str, name: &str) -> anyhow::Result<()> {
    let program: &mut aya::programs::TracePoint = ebpf
        .program_mut(name)
        .with_context(|| format!("eBPF program {name} missing from the object"))?
        .try_into()?;
    program
        .load()
        .with_context(|| format!("loading eBPF program {name}"))?;
    program
        .attach(category, name)
        .with_context(|| format!("attaching to tracepoint {category}:{name}"))?;
    Ok(())
}

/// Removes every entry of process `tgid` from a map keyed by [`RegionKey`].
fn forget_region_keys<V: aya::Pod>(ebpf: &mut Ebpf, map: &str, tgid: u32) {
    if let Some(Ok(mut map)) = ebpf
        .map_mut(map)
        .map(BpfHashMap::<&mut MapData, RegionKey, V>::try_from)
    {
        let stale: Vec<RegionKey> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.tgid == tgid)
            .collect();
        for k in stale {
            let _ = map.remove(&k);
        }
    }
}

/// Checks the privileges loading eBPF needs, with an error a person can act on.
pub fn check_privileges() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "recording needs root: loading eBPF programs and attaching tracepoints needs \
             CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN (for tracefs). Run it with sudo."
        );
    }
    Ok(())
}

impl EventProbes {
    /// Loads the programs and attaches the timer probes.
    pub fn load() -> anyhow::Result<Self> {
        Self::load_with(crate::elf::DebugRoots::system())
    }

    /// Loads the programs; debug files are searched under `debug_roots`.
    pub fn load_with(debug_roots: crate::elf::DebugRoots) -> anyhow::Result<Self> {
        check_privileges()?;
        let tracefs = crate::tracefs::ensure_tracefs()?;
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
        let mut ebpf = Ebpf::load(EBPF_OBJECT).context("loading the eBPF object")?;
        timers::attach(&mut ebpf)?;
        let program: &mut UProbe = ebpf
            .program_mut(usdt::PROGRAM)
            .context("eBPF program usdt_memory_region_ops missing")?
            .try_into()?;
        program
            .load()
            .context("loading the USDT read/write program")?;
        for name in [
            symbols::DISPATCH_PROGRAM,
            symbols::TIMER_MOD_PROGRAM,
            symbols::CALLBACK_PROGRAM,
        ] {
            let program: &mut UProbe = ebpf
                .program_mut(name)
                .with_context(|| format!("eBPF program {name} missing"))?
                .try_into()?;
            program
                .load()
                .with_context(|| format!("loading eBPF program {name}"))?;
        }
        // KVM tracepoints are cheap when no KVM guest runs; their absence is not fatal.
        let kvm_status = kvm::attach(&mut ebpf, &tracefs).map_err(|e| format!("{e:#}"));
        Ok(Self {
            kvm_status,
            debug_roots,
            exe_symbols: HashMap::new(),
            symbol_probes: HashMap::new(),
            region_owners: HashMap::new(),
            ebpf,
            watched: HashSet::new(),
            exe_probes: HashMap::new(),
            usdt: HashMap::new(),
            rw_sources: HashMap::new(),
            next_spec_id: 1,
            _stats: stats,
        })
    }

    /// Parses (once per binary) what the process's QEMU executable offers.
    fn exe_probes(&mut self, pid: u32) -> Result<(Arc<ExeProbes>, u64), String> {
        let (dev, ino) = usdt::exe_inode(pid).map_err(|e| format!("{e:#}"))?;
        let entry = self.exe_probes.entry((dev, ino)).or_insert_with(|| {
            let bytes = std::fs::read(format!("/proc/{pid}/exe"))
                .map_err(|e| format!("reading /proc/{pid}/exe: {e}"))?;
            let sites = usdt::find_region_ops_sites(&bytes)
                .map_err(|e| format!("reading its USDT notes: {e:#}"))?
                .ok_or_else(|| NO_USDT_REASON.to_string())?;
            let segments = crate::elf::load_segments(&bytes).map_err(|e| format!("{e:#}"))?;
            let symbols = crate::elf::SymbolTable::from_elf_bytes(&bytes).ok();
            Ok(Arc::new(ExeProbes {
                sites,
                segments,
                symbols,
            }))
        });
        entry.clone().map(|p| (p, ino))
    }

    fn attach_usdt(&mut self, pid: u32) -> ReadWriteSource {
        let (exe, inode) = match self.exe_probes(pid) {
            Ok(found) => found,
            Err(why) => return ReadWriteSource::Unavailable(why),
        };
        match self.try_attach_usdt(pid, &exe, inode) {
            Ok(attachment) => {
                self.usdt.insert(pid, attachment);
                ReadWriteSource::Usdt
            }
            Err(e) => ReadWriteSource::Unavailable(format!("attaching the USDT probes: {e:#}")),
        }
    }

    fn try_attach_usdt(
        &mut self,
        pid: u32,
        exe: &ExeProbes,
        inode: u64,
    ) -> anyhow::Result<usdt::UsdtAttachment> {
        let bias = usdt::load_bias(pid, inode, |off| {
            exe.segments.iter().find_map(|s| s.vaddr_of(off))
        })?;
        // One spec per site, in the kernel map under a fresh cookie.
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
                    let vaddr =
                        crate::elf::resolve_rip_relative(symbols, symbol, offset, Some(site.pc))?;
                    Ok(vaddr.wrapping_add(bias))
                };
                let spec = usdt::site_spec(site, k, &rip)?;
                let cookie = self.next_spec_id;
                self.next_spec_id += 1;
                let mut map = BpfHashMap::<&mut MapData, u32, UsdtSpec>::try_from(
                    self.ebpf
                        .map_mut("USDT_SPECS")
                        .context("map USDT_SPECS missing")?,
                )?;
                map.insert(cookie, spec, 0)?;
                sites.push((site.pc_file_offset, cookie));
            }
        }
        let semaphores: Vec<u64> = exe
            .sites
            .read
            .iter()
            .chain(&exe.sites.write)
            .filter_map(|s| s.semaphore)
            .map(|sem| bias.wrapping_add(sem))
            .collect();
        let result = self
            .uprobe(usdt::PROGRAM)
            .and_then(|program| usdt::attach(program, pid, &sites, &semaphores));
        if result.is_err() {
            let cookies: Vec<u32> = sites.iter().map(|&(_, c)| c).collect();
            self.forget_specs(&cookies);
        }
        result
    }

    fn forget_specs(&mut self, ids: &[u32]) {
        if let Some(Ok(mut map)) = self
            .ebpf
            .map_mut("USDT_SPECS")
            .map(BpfHashMap::<&mut MapData, u32, UsdtSpec>::try_from)
        {
            for id in ids {
                let _ = map.remove(id);
            }
        }
    }

    fn detach_usdt(&mut self, pid: u32) {
        let Some(attachment) = self.usdt.remove(&pid) else {
            return;
        };
        let (links, spec_ids) = attachment.release();
        if let Some(Ok(program)) = self
            .ebpf
            .program_mut(usdt::PROGRAM)
            .map(<&mut UProbe>::try_from)
        {
            for link in links {
                let _ = program.detach(link);
            }
        }
        self.forget_specs(&spec_ids);
        forget_region_keys::<RegionName>(&mut self.ebpf, "REGION_NAMES", pid);
    }

    /// Which source serves `tgid`'s read/write counts (after [`Self::watch`]).
    pub fn read_write_source(&self, tgid: u32) -> ReadWriteSource {
        self.rw_sources
            .get(&tgid)
            .cloned()
            .unwrap_or_else(|| ReadWriteSource::Unavailable("not watched".into()))
    }

    fn watched_map(&mut self) -> anyhow::Result<BpfHashMap<&mut MapData, u32, u32>> {
        Ok(BpfHashMap::try_from(
            self.ebpf
                .map_mut("WATCHED")
                .context("map WATCHED missing")?,
        )?)
    }

    fn counters_map(&mut self) -> anyhow::Result<PerCpuHashMap<&mut MapData, CounterKey, u64>> {
        Ok(PerCpuHashMap::try_from(
            self.ebpf
                .map_mut("COUNTERS")
                .context("map COUNTERS missing")?,
        )?)
    }

    /// Starts counting events of process `tgid` (running under `accel`), from zero.
    pub fn watch(&mut self, tgid: u32, accel: crate::cmdline::Accel) -> anyhow::Result<()> {
        if self.watched.contains(&tgid) {
            return Ok(());
        }
        self.forget_counters(tgid)?;
        self.watched_map()?.insert(tgid, 1, 0)?;
        self.watched.insert(tgid);
        let mut source = self.attach_usdt(tgid);
        if let ReadWriteSource::Unavailable(why) = &source
            && why != NO_USDT_REASON
        {
            // The binary has the probes but they could not be used: say why, once.
            eprintln!("profiler: pid {tgid}: USDT probes not used: {why}");
        }
        let symbol_source = self.attach_symbols(tgid, !source.is_available());
        if !source.is_available() {
            source = match symbol_source {
                Ok(()) => ReadWriteSource::Symbols,
                Err(symbols_why) => match source {
                    ReadWriteSource::Unavailable(usdt_why) if usdt_why == NO_USDT_REASON => {
                        ReadWriteSource::Unavailable(symbols_why)
                    }
                    other => other,
                },
            };
        }
        // KVM guests without USDT or symbols: the kernel's view of the exits to QEMU.
        if !source.is_available() && accel == crate::cmdline::Accel::Kvm {
            source = match &self.kvm_status {
                Ok(()) => ReadWriteSource::KvmTracepoints,
                Err(why) => match source {
                    ReadWriteSource::Unavailable(prev) => {
                        ReadWriteSource::Unavailable(format!("{prev}; KVM tracepoints: {why}"))
                    }
                    other => other,
                },
            };
        }
        self.rw_sources.insert(tgid, source);
        Ok(())
    }

    fn symbols_of(&mut self, pid: u32) -> Result<Arc<symbols::ExeSymbols>, String> {
        let (dev, ino) = usdt::exe_inode(pid).map_err(|e| format!("{e:#}"))?;
        let roots = &self.debug_roots;
        self.exe_symbols
            .entry((dev, ino))
            .or_insert_with(|| {
                // The real path lets the .gnu_debuglink search look next to the binary; a
                // deleted or unreachable binary is still readable through /proc/PID/exe.
                let link = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
                let path = link
                    .filter(|p| p.exists())
                    .unwrap_or_else(|| format!("/proc/{pid}/exe").into());
                symbols::analyze(&path, roots)
                    .map(Arc::new)
                    .map_err(|e| format!("{e:#}"))
            })
            .clone()
    }

    /// Attaches the symbol-based probes: timer_mod discovery always (callback names), the
    /// dispatch read/write fallback when `want_dispatch`. Err: why dispatch is unavailable.
    fn attach_symbols(&mut self, pid: u32, want_dispatch: bool) -> Result<(), String> {
        let exe = self.symbols_of(pid)?;
        let inode = usdt::exe_inode(pid).map_err(|e| format!("{e:#}"))?.1;
        let segments = exe.symbols.segments().to_vec();
        let bias = usdt::load_bias(pid, inode, |off| {
            segments.iter().find_map(|s| s.vaddr_of(off))
        })
        .map_err(|e| format!("{e:#}"))?;
        let mut probes = SymbolProbes {
            exe: exe.clone(),
            bias,
            attachment: symbols::SymbolAttachment::default(),
            callbacks_unavailable: None,
        };
        match exe.callbacks_unavailable() {
            None => {
                let program = self.uprobe(symbols::TIMER_MOD_PROGRAM);
                match program.and_then(|p| symbols::attach_timer_mod(p, pid, &exe)) {
                    Ok(links) => probes
                        .attachment
                        .links
                        .extend(links.into_iter().map(|l| (symbols::TIMER_MOD_PROGRAM, l))),
                    Err(e) => probes.callbacks_unavailable = Some(format!("{e:#}")),
                }
            }
            Some(why) => probes.callbacks_unavailable = Some(why),
        }
        let mut result = Ok(());
        if want_dispatch {
            result = match exe.dispatch_unavailable() {
                Some(why) => Err(why),
                None => {
                    let program = self.uprobe(symbols::DISPATCH_PROGRAM);
                    match program.and_then(|p| symbols::attach_dispatch(p, pid, &exe)) {
                        Ok(links) => {
                            probes.attachment.dispatch_attached = true;
                            probes
                                .attachment
                                .links
                                .extend(links.into_iter().map(|l| (symbols::DISPATCH_PROGRAM, l)));
                            Ok(())
                        }
                        Err(e) => Err(format!("attaching memory_region_dispatch probes: {e:#}")),
                    }
                }
            };
        }
        self.symbol_probes.insert(pid, probes);
        result
    }

    fn uprobe(&mut self, name: &str) -> anyhow::Result<&mut UProbe> {
        Ok(self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("eBPF program {name} missing"))?
            .try_into()?)
    }

    /// Attaches a run counter to every timer callback QEMU armed since the last refresh.
    pub fn refresh_callbacks(&mut self) {
        let Some(Ok(seen)) = self
            .ebpf
            .map("SEEN_CALLBACKS")
            .map(BpfHashMap::<&MapData, RegionKey, u64>::try_from)
        else {
            return;
        };
        let found: Vec<(u32, u64)> = seen
            .keys()
            .filter_map(Result::ok)
            .map(|k| (k.tgid, k.region))
            .collect();
        for (pid, address) in found {
            let Some(probes) = self.symbol_probes.get(&pid) else {
                continue;
            };
            let vaddr = address.wrapping_sub(probes.bias);
            if probes.attachment.callbacks.contains(&vaddr) {
                continue;
            }
            let exe = probes.exe.clone();
            let link = self
                .uprobe(symbols::CALLBACK_PROGRAM)
                .and_then(|p| symbols::attach_callback(p, pid, &exe, vaddr));
            let probes = self.symbol_probes.get_mut(&pid).expect("checked above");
            // Remember failures too (e.g. a callback in a shared library), so they are not
            // retried every second.
            probes.attachment.callbacks.insert(vaddr);
            if let Ok(link) = link {
                probes
                    .attachment
                    .links
                    .push((symbols::CALLBACK_PROGRAM, link));
            }
        }
    }

    /// Why `tgid`'s timers cannot be split by callback; None when they are.
    pub fn callbacks_unavailable(&self, tgid: u32) -> Option<String> {
        match self.symbol_probes.get(&tgid) {
            Some(p) => p.callbacks_unavailable.clone(),
            None => Some("no QEMU symbols could be read".into()),
        }
    }

    fn detach_symbols(&mut self, pid: u32) {
        let Some(probes) = self.symbol_probes.remove(&pid) else {
            return;
        };
        for (program, link) in probes.attachment.links {
            if let Ok(p) = self.uprobe(program) {
                let _ = p.detach(link);
            }
        }
        forget_region_keys::<u64>(&mut self.ebpf, "SEEN_CALLBACKS", pid);
    }

    /// Stops counting process `tgid` and drops its counters. Read them first.
    pub fn unwatch(&mut self, tgid: u32) -> anyhow::Result<()> {
        if self.watched.remove(&tgid) {
            // Already gone is fine: the process may have been removed concurrently.
            let _ = self.watched_map()?.remove(&tgid);
        }
        self.detach_usdt(tgid);
        self.detach_symbols(tgid);
        self.region_owners.retain(|(pid, _), _| *pid != tgid);
        if self.kvm_status.is_ok() {
            let _ = kvm::forget_process(&mut self.ebpf, tgid);
        }
        self.rw_sources.remove(&tgid);
        self.forget_counters(tgid)
    }

    fn forget_counters(&mut self, tgid: u32) -> anyhow::Result<()> {
        let mut map = self.counters_map()?;
        let stale: Vec<CounterKey> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.tgid == tgid)
            .collect();
        for key in stale {
            let _ = map.remove(&key);
        }
        Ok(())
    }

    /// Cumulative counters of every watched process.
    pub fn read_counters(&mut self) -> anyhow::Result<HashMap<u32, ProcessCounters>> {
        let map = self.counters_map()?;
        let mut out: HashMap<u32, ProcessCounters> = HashMap::new();
        for entry in map.iter() {
            // A key deleted between iteration steps is skipped, not fatal.
            let Ok((key, per_cpu)) = entry else { continue };
            let sum: u64 = per_cpu.iter().copied().sum();
            *out.entry(key.tgid)
                .or_default()
                .by_key
                .entry((key.kind, key.id))
                .or_default() += sum;
        }
        if let Some(Ok(names)) = self
            .ebpf
            .map("REGION_NAMES")
            .map(BpfHashMap::<&MapData, RegionKey, RegionName>::try_from)
        {
            for (key, name) in names.iter().filter_map(Result::ok) {
                if let Some(c) = out.get_mut(&key.tgid) {
                    if name.name[0] == UNNAMED_REGION_MARK
                        && self
                            .symbol_probes
                            .get(&key.tgid)
                            .is_some_and(|p| p.attachment.dispatch_attached)
                    {
                        c.unnamed_regions.insert(key.region);
                        continue;
                    }
                    let len = name
                        .name
                        .iter()
                        .position(|&b| b == 0)
                        .unwrap_or(name.name.len());
                    c.region_names.insert(
                        key.region,
                        String::from_utf8_lossy(&name.name[..len]).into_owned(),
                    );
                }
            }
        }
        for (pid, c) in out.iter_mut() {
            let Some(probes) = self.symbol_probes.get(pid) else {
                continue;
            };
            if let Some(layout) = &probes.exe.owner_layout {
                let regions: Vec<u64> = c.region_names.keys().copied().collect();
                let mut mem = None;
                for region in regions {
                    let owner = self.region_owners.entry((*pid, region)).or_insert_with(|| {
                        let mem = mem.get_or_insert_with(|| {
                            std::fs::File::open(format!("/proc/{pid}/mem")).ok()
                        });
                        mem.as_ref()
                            .and_then(|m| symbols::region_owner(m, region, layout))
                    });
                    if let Some(owner) = owner {
                        c.region_owners.insert(region, owner.clone());
                    }
                }
            }
            for &(k, id) in c.by_key.keys() {
                if k == kind::TIMER_CALLBACK {
                    c.callback_names
                        .insert(id, symbols::callback_name(&probes.exe, id));
                }
            }
        }
        Ok(out)
    }

    /// Detaches every USDT probe and lowers its semaphores (also done on drop).
    pub fn detach_all(&mut self) {
        let pids: Vec<u32> = self.usdt.keys().copied().collect();
        for pid in pids {
            self.detach_usdt(pid);
        }
        let pids: Vec<u32> = self.symbol_probes.keys().copied().collect();
        for pid in pids {
            self.detach_symbols(pid);
        }
    }

    /// Run count and run time of all our programs so far.
    pub fn cost(&self) -> ProbeCost {
        let mut cost = ProbeCost::default();
        for (_, program) in self.ebpf.programs() {
            if let Ok(info) = program.info() {
                cost.run_count += info.run_count();
                cost.run_time += info.run_time();
            }
        }
        cost
    }
}

impl Drop for EventProbes {
    fn drop(&mut self) {
        self.detach_all();
    }
}
