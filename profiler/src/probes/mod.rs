//! The probe layer: loads the eBPF object, attaches each VM's sources as the source policy
//! picks them, keeps the watched-process set current and hands out raw counters.
//!
//! One module per source family (kunai style), each owning its attach/detach and per-process
//! state: [`timers`] (wait-syscall tracepoints), [`usdt`] (QEMU's memory_region_ops probes),
//! [`symbols`] (memory_region_dispatch and timer callbacks), [`kvm`] (the kvm tracepoints).
//! [`policy`] decides which source serves which count; [`exe`] reads what each binary offers.
//! What the counters mean is decided outside, by `crate::attribution`.
//!
//! [`ProbeLayer`] is the seam the session works through, so the session is tested on fake
//! counters (`crate::session` tests) and this layer on the real kernel (root tests).

pub mod exe;
pub mod kvm;
pub mod policy;
pub mod refctr;
pub mod symbols;
pub mod timers;
pub mod uprobes;
pub mod usdt;

use std::{
    collections::{HashMap, HashSet},
    os::fd::OwnedFd,
    time::Duration,
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap},
};
use profiler_common::{CounterKey, RegionKey, RegionName, UNNAMED_REGION_MARK};

use self::{
    exe::{ExeAnalysis, ExeCatalog},
    kvm::KvmSource,
    policy::{ReadWriteSource, VmSources},
    symbols::SymbolSource,
    usdt::UsdtSource,
};
use crate::{
    attribution::{RawCounters, RegionLabel},
    discovery::QemuProcess,
    names::{NameSources, Note},
};

/// The compiled eBPF object, embedded at build time by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler"));

/// The profiler's own cost in the kernel, from BPF run-time statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProbeCost {
    pub run_count: u64,
    pub run_time: Duration,
}

/// What watching one VM gave.
#[derive(Debug, Clone)]
pub struct WatchedVm {
    pub sources: VmSources,
    /// What its devices and callbacks can be named from.
    pub names: NameSources,
    /// Why a source the policy picked could not be used, and the like.
    pub notes: Vec<Note>,
}

/// The probes as the session sees them.
pub trait ProbeLayer {
    /// Starts counting `vm`'s events from zero, attaching the sources the policy picks.
    fn watch(&mut self, vm: &QemuProcess) -> anyhow::Result<WatchedVm>;
    /// Chooses `vm`'s sources again (its accelerator turned out different from what it was
    /// when first seen: QEMU opens `/dev/kvm` while it starts), keeping its counters.
    fn replan(&mut self, vm: &QemuProcess) -> anyhow::Result<WatchedVm>;
    /// Stops counting process `pid` and drops its counters (read them first).
    fn unwatch(&mut self, pid: u32) -> anyhow::Result<()>;
    /// Per-refresh upkeep before reading (attach counters to newly seen timer callbacks).
    fn refresh(&mut self) -> Vec<Note>;
    /// Cumulative counters of every watched process.
    fn read_counters(&mut self) -> anyhow::Result<HashMap<u32, RawCounters>>;
    /// The probes' own run count and run time so far.
    fn cost(&self) -> ProbeCost;
    /// The host-wide sources and whether they are attached (`Err`: why not).
    fn host_sources(&self) -> Vec<(&'static str, Result<(), String>)> {
        Vec::new()
    }
    /// Entries in each eBPF map now, and its capacity: (map, entries, max entries).
    fn map_entries(&self) -> Vec<(&'static str, usize, u32)> {
        Vec::new()
    }
}

/// Entries of the hash map `name` with keys `K` and values `V` (0 if it cannot be read).
fn count_entries<K: aya::Pod, V: aya::Pod>(ebpf: &Ebpf, name: &str) -> usize {
    match ebpf.map(name).map(BpfHashMap::<&MapData, K, V>::try_from) {
        Some(Ok(map)) => map.keys().filter(Result::is_ok).count(),
        _ => 0,
    }
}

/// Capabilities the profiler uses: (number, name, what for).
const NEEDED_CAPS: &[(u32, &str, &str)] = &[
    (39, "CAP_BPF", "loading eBPF programs and maps"),
    (38, "CAP_PERFMON", "attaching tracepoints and uprobes"),
    (
        21,
        "CAP_SYS_ADMIN",
        "mounting tracefs, BPF run-time statistics",
    ),
    (19, "CAP_SYS_PTRACE", "reading QEMU's executable and memory"),
];

/// The effective capability set from `/proc/self/status` (`CapEff:` in hex).
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

/// The capabilities of `NEEDED_CAPS` missing from `effective`, by name and purpose.
pub fn missing_caps(effective: u64) -> Vec<(&'static str, &'static str)> {
    NEEDED_CAPS
        .iter()
        .filter(|(bit, _, _)| effective & (1 << bit) == 0)
        .map(|(_, name, why)| (*name, *why))
        .collect()
}

/// Checks the privileges loading eBPF needs, with an error a person can act on: which
/// capabilities are missing and what each is for.
pub fn check_privileges() -> anyhow::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let Some(effective) = parse_cap_eff(&status) else {
        bail!("cannot read this process's capabilities from /proc/self/status");
    };
    let missing = missing_caps(effective);
    if missing.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = missing
        .iter()
        .map(|(name, why)| format!("{name} ({why})"))
        .collect();
    // SAFETY: geteuid has no preconditions.
    let who = if unsafe { libc::geteuid() } == 0 {
        "running as root, but without"
    } else {
        "not root, and without"
    };
    bail!(
        "recording needs root or these capabilities: {who} {}. Run it with sudo (or grant the \
         capabilities, e.g. in a systemd unit's AmbientCapabilities).",
        list.join(", ")
    );
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

/// The real probes: the eBPF object and every source family.
pub struct EventProbes {
    ebpf: Ebpf,
    catalog: ExeCatalog,
    watched: HashSet<u32>,
    usdt: UsdtSource,
    symbols: SymbolSource,
    kvm: KvmSource,
    /// Said while attaching, handed out with the watch that caused it.
    pending_notes: Vec<Note>,
    /// Keeps BPF run-time statistics enabled while we run (None: kernel refused).
    _stats: Option<OwnedFd>,
}

impl EventProbes {
    /// Loads the programs and attaches the host-wide ones (timers, KVM); debug files are
    /// searched under `debug_roots`.
    pub fn load(debug_roots: crate::elf::DebugRoots) -> anyhow::Result<Self> {
        check_privileges()?;
        let tracefs = crate::tracefs::ensure_tracefs()?;
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
        let mut ebpf = Ebpf::load(EBPF_OBJECT).context("loading the eBPF object")?;
        timers::attach(&mut ebpf)?;
        let usdt = UsdtSource::load(&mut ebpf)?;
        let symbols = SymbolSource::load(&mut ebpf)?;
        // KVM tracepoints are cheap when no KVM guest runs; their absence is not fatal.
        let kvm = KvmSource::attach(&mut ebpf, &tracefs);
        Ok(Self {
            ebpf,
            catalog: ExeCatalog::new(debug_roots),
            watched: HashSet::new(),
            usdt,
            symbols,
            kvm,
            pending_notes: Vec::new(),
            _stats: stats,
        })
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

    /// Attaches one read/write source to `pid` (all or nothing).
    fn attach_read_write(
        &mut self,
        source: ReadWriteSource,
        pid: u32,
        exe: Option<&ExeAnalysis>,
    ) -> Result<(), String> {
        let result = match source {
            ReadWriteSource::Usdt => match exe.map(|e| &e.usdt) {
                Some(Ok(Some(usdt))) => self.usdt.attach(&mut self.ebpf, pid, usdt).map(|how| {
                    if how == usdt::SemaphoreManagement::ByHand {
                        self.pending_notes.push(Note::general(format!(
                            "pid {pid}: another tracer holds QEMU's USDT sites without a \
                             kernel-managed semaphore; the profiler raises the semaphores by \
                             hand, and a SIGKILL of the profiler would leave them raised"
                        )));
                    }
                }),
                _ => Err(anyhow::anyhow!("no USDT probes")),
            },
            ReadWriteSource::Symbols => match exe.map(|e| &e.symbols) {
                Some(Ok(symbols)) => self.symbols.attach_dispatch(&mut self.ebpf, pid, symbols),
                _ => Err(anyhow::anyhow!("no symbols")),
            },
            // Attached host-wide at load; the plan only offers it when that worked.
            ReadWriteSource::KvmTracepoints => Ok(()),
        };
        result.map_err(|e| format!("{e:#}"))
    }

    /// Attaches what the source policy picks for `vm` (all or nothing per source) and says
    /// which source serves each count.
    fn attach_planned(&mut self, vm: &QemuProcess) -> anyhow::Result<WatchedVm> {
        let pid = vm.key.pid;
        let name = &vm.identity.name;
        let (offer, exe) = self.catalog.offer(pid);
        let plan = policy::plan(&offer, vm.identity.accel, self.kvm.status());
        let mut attempts = Vec::new();
        for &source in &plan.read_write {
            let result = self.attach_read_write(source, pid, exe.as_deref());
            let attached = result.is_ok();
            attempts.push((source, result));
            if attached {
                break;
            }
        }
        let read_write = policy::settle(&plan, &attempts);
        let mut notes: Vec<Note> = attempts
            .iter()
            .filter_map(|(source, r)| r.as_ref().err().map(|why| (source, why)))
            .map(|(source, why)| {
                Note::vm(name, format!("{} source not used: {why}", source.label()))
            })
            .collect();
        let symbols = exe.as_ref().and_then(|e| e.symbols.as_ref().ok());
        let callbacks = match (&plan.callbacks, symbols) {
            (Ok(()), Some(symbols)) => self
                .symbols
                .attach_timers(&mut self.ebpf, pid, symbols)
                .map_err(|e| policy::CallbacksUnavailable::AttachFailed(format!("{e:#}"))),
            (Err(why), _) => Err(why.clone()),
            (Ok(()), None) => Err(policy::CallbacksUnavailable::SymbolsUnreadable(
                "no symbols".into(),
            )),
        };
        if let Err(why @ policy::CallbacksUnavailable::AttachFailed(_)) = &callbacks {
            notes.push(Note::vm(name, why.to_string()));
        }
        notes.append(&mut self.pending_notes);
        let names = NameSources::from_symbols(
            symbols,
            callbacks.is_ok(),
            read_write == Ok(ReadWriteSource::KvmTracepoints),
        );
        Ok(WatchedVm {
            sources: VmSources {
                read_write,
                callbacks,
            },
            names,
            notes,
        })
    }

    /// Detaches every per-process probe and lowers the USDT semaphores (also done on drop).
    pub fn detach_all(&mut self) {
        self.usdt.detach_all(&mut self.ebpf);
        self.symbols.detach_all(&mut self.ebpf);
    }
}

impl ProbeLayer for EventProbes {
    fn watch(&mut self, vm: &QemuProcess) -> anyhow::Result<WatchedVm> {
        let pid = vm.key.pid;
        self.forget_counters(pid)?;
        self.watched_map()?.insert(pid, 1, 0)?;
        self.watched.insert(pid);
        self.attach_planned(vm)
    }

    fn replan(&mut self, vm: &QemuProcess) -> anyhow::Result<WatchedVm> {
        // The per-process probes go and the plan's come; the kernel's counters stay (the kvm
        // tracepoint programs counted the process all along).
        self.usdt.detach(&mut self.ebpf, vm.key.pid);
        self.symbols.detach(&mut self.ebpf, vm.key.pid);
        self.attach_planned(vm)
    }

    fn unwatch(&mut self, pid: u32) -> anyhow::Result<()> {
        if self.watched.remove(&pid) {
            // Already gone is fine: the process may have been removed concurrently.
            let _ = self.watched_map()?.remove(&pid);
        }
        self.usdt.detach(&mut self.ebpf, pid);
        self.symbols.detach(&mut self.ebpf, pid);
        forget_region_keys::<RegionName>(&mut self.ebpf, "REGION_NAMES", pid);
        timers::forget_process(&mut self.ebpf, pid);
        self.kvm.forget(&mut self.ebpf, pid);
        self.forget_counters(pid)
    }

    fn refresh(&mut self) -> Vec<Note> {
        self.symbols.refresh_callbacks(&mut self.ebpf);
        Vec::new()
    }

    fn read_counters(&mut self) -> anyhow::Result<HashMap<u32, RawCounters>> {
        let map = self.counters_map()?;
        let mut out: HashMap<u32, RawCounters> = HashMap::new();
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
                    c.regions.insert(key.region, region_label(&name));
                }
            }
        }
        Ok(out)
    }

    fn map_entries(&self) -> Vec<(&'static str, usize, u32)> {
        use profiler_common::{
            MAX_COUNTERS, MAX_PENDING, MAX_REGION_NAMES, MAX_USDT_SPECS, MAX_WATCHED, PendingWait,
            UsdtSpec,
            kvm::{KvmThreadState, MAX_KVM_PORTS, MAX_KVM_THREADS, PortKey},
        };
        let counters = match self
            .ebpf
            .map("COUNTERS")
            .map(PerCpuHashMap::<&MapData, CounterKey, u64>::try_from)
        {
            Some(Ok(map)) => map.keys().filter(Result::is_ok).count(),
            _ => 0,
        };
        let e = &self.ebpf;
        vec![
            ("COUNTERS", counters, MAX_COUNTERS),
            (
                "WATCHED",
                count_entries::<u32, u32>(e, "WATCHED"),
                MAX_WATCHED,
            ),
            (
                "PENDING",
                count_entries::<u32, PendingWait>(e, timers::PENDING_MAP),
                MAX_PENDING,
            ),
            (
                "REGION_NAMES",
                count_entries::<RegionKey, RegionName>(e, "REGION_NAMES"),
                MAX_REGION_NAMES,
            ),
            (
                "USDT_SPECS",
                count_entries::<u32, UsdtSpec>(e, usdt::SPECS_MAP),
                MAX_USDT_SPECS,
            ),
            (
                "SEEN_CALLBACKS",
                count_entries::<RegionKey, u64>(e, symbols::SEEN_CALLBACKS_MAP),
                MAX_REGION_NAMES,
            ),
            (
                "KVM_THREADS",
                count_entries::<u32, KvmThreadState>(e, kvm::THREADS_MAP),
                MAX_KVM_THREADS,
            ),
            (
                "KVM_PORTS",
                count_entries::<PortKey, u32>(e, kvm::PORTS_MAP),
                MAX_KVM_PORTS,
            ),
        ]
    }

    fn host_sources(&self) -> Vec<(&'static str, Result<(), String>)> {
        vec![
            ("syscall-tracepoints", Ok(())),
            ("kvm-tracepoints", self.kvm.status().clone()),
        ]
    }

    fn cost(&self) -> ProbeCost {
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

fn region_label(name: &RegionName) -> RegionLabel {
    if name.name[0] == UNNAMED_REGION_MARK {
        return RegionLabel::Unnamed;
    }
    let len = name
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(name.name.len());
    RegionLabel::Named(String::from_utf8_lossy(&name.name[..len]).into_owned())
}

impl Drop for EventProbes {
    fn drop(&mut self) {
        self.detach_all();
    }
}

/// What `profiler list` shows for a VM: the plan, without attaching anything.
#[derive(Debug, Clone)]
pub struct OfferedSources {
    pub sources: VmSources,
    /// Where the symbols come from, or why there are none.
    pub symbols: String,
}

/// The plan for `vm` from what its binary offers (read through `catalog`) and whether the KVM
/// tracepoints can be used (`kvm`, see [`kvm::offered`]): what `record` will attach.
pub fn offered_sources(
    catalog: &mut ExeCatalog,
    vm: &QemuProcess,
    kvm: &Result<(), String>,
) -> OfferedSources {
    let (offer, exe) = catalog.offer(vm.key.pid);
    let plan = policy::plan(&offer, vm.identity.accel, kvm);
    OfferedSources {
        sources: plan.expected(),
        symbols: match (&exe, &offer) {
            (Some(exe), _) => exe.describe_symbols(),
            (None, policy::BinaryOffer::Unreadable(why)) => why.clone(),
            (None, _) => String::new(),
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! Root tests on the real kernel: an attach that fails part-way leaves nothing behind.

    use std::{
        process::{Child, Command},
        sync::Arc,
    };

    use object::{Object as _, ObjectSegment as _};
    use profiler_common::{USDT_MAX_ARGS, UsdtArgSpec, UsdtSpec, kind};

    use super::{
        symbols::{DISPATCH_PROGRAM, SymbolSource},
        uprobes::UprobePoint,
        usdt::{self, SPECS_MAP, SiteToAttach, UsdtSource},
        *,
    };

    /// A process to attach to: `sleep`, killed on drop.
    struct Sleeper(Child);

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// (`sleep`, the file offset of its entry point: a valid uprobe site).
    fn sleeper() -> (Sleeper, u64) {
        let child = Command::new("sleep").arg("60").spawn().expect("sleep runs");
        let pid = child.id();
        // exec has happened once /proc/PID/exe points at sleep.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !std::fs::read_link(format!("/proc/{pid}/exe"))
            .is_ok_and(|p| p.to_string_lossy().ends_with("sleep"))
        {
            assert!(std::time::Instant::now() < deadline, "sleep never started");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let bytes = std::fs::read(format!("/proc/{pid}/exe")).unwrap();
        let elf = object::File::parse(&*bytes).unwrap();
        let entry = elf.entry();
        let offset = elf
            .segments()
            .find_map(|s| {
                let (start, size) = (s.address(), s.size());
                let (file_off, _) = s.file_range();
                (start..start + size)
                    .contains(&entry)
                    .then(|| file_off + (entry - start))
            })
            .expect("entry point in a segment");
        (Sleeper(child), offset)
    }

    /// Our perf events and BPF links: each attached uprobe holds one of each.
    fn probe_fds() -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter(|t| {
                let t = t.to_string_lossy();
                t == "anon_inode:[perf_event]" || t == "anon_inode:bpf_link"
            })
            .count()
    }

    fn spec_entries(ebpf: &mut Ebpf) -> usize {
        let map: BpfHashMap<&MapData, u32, UsdtSpec> =
            BpfHashMap::try_from(ebpf.map(SPECS_MAP).unwrap()).unwrap();
        map.keys().count()
    }

    fn spec() -> UsdtSpec {
        UsdtSpec {
            args: [UsdtArgSpec::default(); USDT_MAX_ARGS],
            arg_count: 6,
            kind: kind::READ,
            region_arg: 1,
            name_arg: 5,
        }
    }

    /// Root tests that attach probes run one at a time: these tests count the process's
    /// perf-event descriptors, which any other attaching test would change under them.
    pub(crate) static ATTACHING: std::sync::Mutex<()> = std::sync::Mutex::new(());

    pub(crate) fn attaching() -> std::sync::MutexGuard<'static, ()> {
        ATTACHING.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn root_ebpf(test: &str) -> Option<Ebpf> {
        xtask::prereq::Prereq::new(test).root()?;
        crate::tracefs::ensure_tracefs().expect("tracefs");
        Some(Ebpf::load(EBPF_OBJECT).expect("loading the eBPF object"))
    }

    #[test]
    fn capabilities_missing_by_name() {
        let status = "Name:\tprofiler\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert!(missing_caps(0x1ff_ffff_ffff).is_empty());
        let no_bpf = 0x1ff_ffff_ffff & !(1 << 39) & !(1 << 38);
        let missing: Vec<&str> = missing_caps(no_bpf).iter().map(|m| m.0).collect();
        assert_eq!(missing, ["CAP_BPF", "CAP_PERFMON"]);
        assert_eq!(missing_caps(0).len(), 4);
        assert_eq!(parse_cap_eff("CapEff: zz"), None);
    }

    #[test]
    fn root_a_usdt_attach_that_fails_part_way_leaves_nothing() {
        let _one_at_a_time = attaching();
        let Some(mut ebpf) = root_ebpf("root_a_usdt_attach_that_fails_part_way_leaves_nothing")
        else {
            return;
        };
        let mut usdt = UsdtSource::load(&mut ebpf).unwrap();
        let (sleeper, entry) = sleeper();
        let pid = sleeper.0.id();
        let before = probe_fds();

        // The first site attaches; the second is past the end of the file.
        let site = |file_offset, semaphore_file_offset| SiteToAttach {
            file_offset,
            spec: spec(),
            semaphore_file_offset,
            semaphore_address: None,
        };
        let sites = [site(entry, None), site(1 << 40, None)];
        let err = usdt.attach_sites(&mut ebpf, pid, &sites).unwrap_err();
        assert!(
            format!("{err:#}").contains("file offset 0x10000000000"),
            "{err:#}"
        );
        assert_eq!(probe_fds(), before, "a uprobe was left attached");
        assert_eq!(spec_entries(&mut ebpf), 0, "a spec was left in {SPECS_MAP}");
        assert!(!usdt.is_attached(pid));

        // The first site attaches, the second's semaphore cannot be one (an odd offset).
        let err = usdt
            .attach_sites(
                &mut ebpf,
                pid,
                &[site(entry, None), site(entry, Some(0x1001))],
            )
            .unwrap_err();
        assert!(format!("{err:#}").contains("semaphore"), "{err:#}");
        assert_eq!(probe_fds(), before);
        assert_eq!(spec_entries(&mut ebpf), 0);

        // And a good attach holds its uprobe and its spec, until detached.
        let how = usdt.attach_sites(&mut ebpf, pid, &sites[..1]).unwrap();
        assert_eq!(how, usdt::SemaphoreManagement::Kernel);
        assert!(probe_fds() > before);
        assert_eq!(spec_entries(&mut ebpf), 1);
        usdt.detach(&mut ebpf, pid);
        assert_eq!(probe_fds(), before);
        assert_eq!(spec_entries(&mut ebpf), 0);
    }

    #[test]
    fn root_a_symbols_attach_that_fails_part_way_leaves_nothing() {
        let _one_at_a_time = attaching();
        let Some(mut ebpf) = root_ebpf("root_a_symbols_attach_that_fails_part_way_leaves_nothing")
        else {
            return;
        };
        let mut symbols = SymbolSource::load(&mut ebpf).unwrap();
        let (sleeper, entry) = sleeper();
        let pid = sleeper.0.id();
        let exe = Arc::new(
            symbols::analyze(
                &std::fs::read_link(format!("/proc/{pid}/exe")).unwrap(),
                &crate::elf::DebugRoots::system(),
            )
            .unwrap(),
        );
        let before = probe_fds();
        let points = [
            UprobePoint {
                file_offset: entry,
                cookie: 1,
            },
            UprobePoint {
                file_offset: 1 << 40,
                cookie: 2,
            },
        ];
        assert!(
            symbols
                .attach_dispatch_at(&mut ebpf, pid, &exe, &points)
                .is_err()
        );
        assert_eq!(probe_fds(), before, "a {DISPATCH_PROGRAM} uprobe was left");
        assert!(!symbols.dispatch_attached(pid));
        symbols
            .attach_dispatch_at(&mut ebpf, pid, &exe, &points[..1])
            .unwrap();
        assert!(symbols.dispatch_attached(pid));
        symbols.detach(&mut ebpf, pid);
        assert_eq!(probe_fds(), before);
    }
}
