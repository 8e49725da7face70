//! KVM guests, symbol-free: their reads/writes from the `kvm:kvm_pio`, `kvm:kvm_mmio`,
//! `kvm:kvm_fast_mmio` and `kvm:kvm_userspace_exit` tracepoints, and the guest's own activity
//! from `kvm:kvm_vcpu_wakeup` (vCPUs woken from a halt) and `kvm:kvm_exit` (exits by reason)
//! (kernel side:
//! `profiler-ebpf/src/probes/kvm.rs`; the per-vCPU-thread state machine that tells QEMU-handled
//! from in-kernel accesses, and the kernel facts behind it: `profiler-common/src/kvm.rs`).
//!
//! This module parses the tracepoints' field layouts from tracefs (they are not ABI), hands
//! them to the programs through the `KVM_FIELDS` map, and attaches the programs
//! ([`KvmSource`]). What the counters mean is [`crate::attribution::kvm`]'s business; the
//! tests replay events through the very code the programs run
//! (`profiler_common::kvm::replay`).

use std::{collections::BTreeMap, path::Path};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, MapData},
};
use profiler_common::kvm::{KvmFieldOffsets, KvmThreadState, PortKey, replay};

use crate::offer::kvm::{ExitReasonNames, KvmOffer};

/// The eBPF programs, each named after the `kvm:` tracepoint it attaches to.
pub const PROGRAMS: [&str; 4] = ["kvm_pio", "kvm_mmio", "kvm_fast_mmio", "kvm_userspace_exit"];
/// The config map holding [`KvmFieldOffsets`] at index 0.
pub const FIELDS_MAP: &str = "KVM_FIELDS";
/// The per-thread state map (thread id -> [`KvmThreadState`]).
pub const THREADS_MAP: &str = "KVM_THREADS";
/// The learned port classes ([`PortKey`] -> `port_class`).
pub const PORTS_MAP: &str = "KVM_PORTS";

/// Writes the field layout into the config map, then loads and attaches the four programs.
/// `tracefs` is the mounted tracefs (`crate::offer::tracefs::ensure_tracefs`).
pub fn attach(ebpf: &mut Ebpf, tracefs: &Path) -> anyhow::Result<()> {
    let offsets = crate::offer::kvm::field_offsets(tracefs)?;
    let mut config: Array<&mut MapData, KvmFieldOffsets> = Array::try_from(
        ebpf.map_mut(FIELDS_MAP)
            .with_context(|| format!("map {FIELDS_MAP} missing from the eBPF object"))?,
    )?;
    config
        .set(0, offsets, 0)
        .with_context(|| format!("writing the KVM field layout into {FIELDS_MAP}"))?;
    for name in PROGRAMS {
        crate::probes::kernel::object::attach_tracepoint(ebpf, "kvm", name)?;
    }
    Ok(())
}

/// Drops the per-thread states and learned port classes of process `tgid` (call when it is
/// unwatched; both maps are LRU, so stale entries also age out).
pub fn forget_process(ebpf: &mut Ebpf, tgid: u32) -> anyhow::Result<()> {
    use crate::probes::kernel::batch::remove_where;
    remove_where::<u32, KvmThreadState>(ebpf, THREADS_MAP, |_, state| state.tgid == tgid);
    remove_where::<PortKey, u32>(ebpf, PORTS_MAP, |key, _| key.tgid == tgid);
    Ok(())
}

/// What the outstanding per-thread states of process `tgid` will count once settled (the last
/// access of each vCPU thread is counted at that thread's next KVM event).
pub fn outstanding_counts(ebpf: &Ebpf, tgid: u32) -> anyhow::Result<BTreeMap<(u32, u64), u64>> {
    let threads: BpfHashMap<&MapData, u32, KvmThreadState> = BpfHashMap::try_from(
        ebpf.map(THREADS_MAP)
            .with_context(|| format!("map {THREADS_MAP} missing"))?,
    )?;
    let states: Vec<KvmThreadState> = threads
        .iter()
        .filter_map(Result::ok)
        .map(|(_, s)| s)
        .collect();
    Ok(replay::outstanding(&states, tgid))
}

/// The programs of a KVM guest's own activity: vCPU wakeups, VM exits.
const GUEST_PROGRAMS: [&str; 2] = ["kvm_vcpu_wakeup", "kvm_exit"];

/// The KVM sources: four tracepoint programs of the read/write source and two of the guest's
/// own activity, attached once for the whole host (cheap when no KVM guest runs: the first
/// thing each does is the watched-process lookup), and the per-thread states they keep per
/// process.
#[derive(Debug)]
pub struct KvmSource {
    /// `Err`: why the tracepoints could not be attached (the source is unavailable).
    status: Result<(), String>,
    /// What the guest's own counts have: the kernel's offer, where their programs attached.
    guest: KvmOffer,
    /// The names of exit reasons, as this kernel's `kvm_exit` prints them.
    exit_reasons: std::sync::Arc<ExitReasonNames>,
}

impl KvmSource {
    /// Attaches the programs; a failure makes a source unavailable, not the profiler.
    pub fn attach(ebpf: &mut Ebpf, tracefs: &Path) -> Self {
        let status = attach(ebpf, tracefs).map_err(|e| format!("{e:#}"));
        let offer = KvmOffer::of_host(tracefs, Path::new("/sys/module"));
        let mut attached = |offered: Result<(), String>, program: &str| {
            status.clone()?;
            offered?;
            crate::probes::kernel::object::attach_tracepoint(ebpf, "kvm", program)
                .map_err(|e| format!("{e:#}"))
        };
        let [wakeup, exit] = GUEST_PROGRAMS;
        let vcpu_wakeups = attached(offer.vcpu_wakeups, wakeup);
        let exits = attached(offer.exits, exit);
        Self {
            status,
            guest: KvmOffer {
                vcpu_wakeups,
                exits,
            },
            exit_reasons: std::sync::Arc::new(ExitReasonNames::of_host(tracefs)),
        }
    }

    pub fn status(&self) -> &Result<(), String> {
        &self.status
    }

    /// What the guest's own counts have here.
    pub fn guest(&self) -> &KvmOffer {
        &self.guest
    }

    /// The names of exit reasons.
    pub fn exit_reasons(&self) -> std::sync::Arc<ExitReasonNames> {
        self.exit_reasons.clone()
    }

    /// Drops what the programs keep of process `tgid`.
    pub fn forget(&self, ebpf: &mut Ebpf, tgid: u32) {
        if self.status.is_ok() {
            let _ = forget_process(ebpf, tgid);
        }
    }
}

#[cfg(test)]
mod tests {
    use profiler_common::kvm as k;

    use super::*;
    use crate::offer::kvm::{field_offsets, kvm_available};

    // ---- root: load the real object, attach on this kernel ----

    fn skip_unless_root(test: &str) -> bool {
        xtask::prereq::Prereq::new(test).root().is_none()
    }

    /// `BPF_PROG_TEST_RUN` on a program fd: Ok(retval) or Err(errno).
    fn prog_test_run(fd: std::os::fd::RawFd, ctx: &[u8]) -> Result<u32, i32> {
        // union bpf_attr, .test: prog_fd, retval, data_size_in, data_size_out, data_in,
        // data_out, repeat, duration, ctx_size_in, ctx_size_out, ctx_in, ctx_out, flags, cpu,
        // batch_size.
        #[repr(C)]
        #[derive(Default)]
        struct TestAttr {
            prog_fd: u32,
            retval: u32,
            data_size_in: u32,
            data_size_out: u32,
            data_in: u64,
            data_out: u64,
            repeat: u32,
            duration: u32,
            ctx_size_in: u32,
            ctx_size_out: u32,
            ctx_in: u64,
            ctx_out: u64,
            flags: u32,
            cpu: u32,
            batch_size: u32,
            _pad: u32,
        }
        let mut attr = TestAttr {
            prog_fd: fd as u32,
            ctx_size_in: ctx.len() as u32,
            ctx_in: ctx.as_ptr() as u64,
            repeat: 1,
            ..Default::default()
        };
        // SAFETY: attr is a valid bpf_attr prefix that outlives the call; ctx is readable.
        use crate::probes::kernel::bpf_call::{BPF_PROG_TEST_RUN, bpf};
        match unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr) } {
            Ok(_) => Ok(attr.retval),
            Err(e) => Err(e.raw_os_error().unwrap_or(0)),
        }
    }

    #[test]
    fn root_loads_and_attaches_the_kvm_programs() {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let _one_at_a_time = crate::probes::kernel::test_support::attaching();
        if skip_unless_root("root_loads_and_attaches_the_kvm_programs") {
            return;
        }
        let tracefs = crate::offer::tracefs::ensure_tracefs().expect("tracefs");
        if !tracefs.join("events/kvm").is_dir() {
            // No KVM on this host (a property of the host) skips; KVM without its
            // tracepoints is a failure under PROFILER_E2E_REQUIRE.
            let prereq = xtask::prereq::Prereq::new("root_loads_and_attaches_the_kvm_programs");
            if prereq.kvm().is_some() {
                prereq.missing::<()>(&format!(
                    "no kvm tracepoints in {} although /dev/kvm exists (a kernel built without \
                     CONFIG_KVM tracing, or the kvm module not loaded: `modprobe kvm`)",
                    tracefs.display()
                ));
            }
            return;
        }
        let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
        let mut ebpf = Ebpf::load(crate::probes::kernel::object::EBPF_OBJECT)
            .expect("loading the eBPF object");
        // The verifier accepts all four programs and perf_event attach succeeds.
        if let Err(e) = attach(&mut ebpf, &tracefs) {
            for cause in e.chain() {
                if let Some(aya::programs::ProgramError::LoadError {
                    io_error,
                    verifier_log,
                }) = cause.downcast_ref::<aya::programs::ProgramError>()
                {
                    panic!("attach: {e:#}: {io_error}\nverifier log:\n{verifier_log}");
                }
            }
            panic!("attach: {e:?}");
        }

        // The config map holds what tracefs says.
        let expected = field_offsets(&tracefs).unwrap();
        let config: Array<&MapData, KvmFieldOffsets> =
            Array::try_from(ebpf.map(FIELDS_MAP).unwrap()).unwrap();
        assert_eq!(config.get(&0, 0).unwrap(), expected);

        // forget_process() drops exactly one process's thread states.
        {
            let mut threads: BpfHashMap<&mut MapData, u32, KvmThreadState> =
                BpfHashMap::try_from(ebpf.map_mut(THREADS_MAP).unwrap()).unwrap();
            let mut state = KvmThreadState::idle(4_000_001);
            state.state = k::thread_state::PENDING;
            threads.insert(4_000_101, state, 0).unwrap();
            state.tgid = 4_000_002;
            threads.insert(4_000_102, state, 0).unwrap();
        }
        forget_process(&mut ebpf, 4_000_001).unwrap();
        let threads: BpfHashMap<&MapData, u32, KvmThreadState> =
            BpfHashMap::try_from(ebpf.map(THREADS_MAP).unwrap()).unwrap();
        let left: Vec<u32> = threads.keys().filter_map(Result::ok).collect();
        assert!(
            !left.contains(&4_000_101) && left.contains(&4_000_102),
            "{left:?}"
        );

        // BPF_PROG_TEST_RUN on a tracepoint program: report what this kernel does.
        let program: &aya::programs::TracePoint =
            ebpf.program("kvm_pio").unwrap().try_into().unwrap();
        let fd = program.fd().unwrap().as_fd().as_raw_fd();
        let record = [0u8; 32];
        match prog_test_run(fd, &record) {
            Ok(retval) => eprintln!("BPF_PROG_TEST_RUN on a tracepoint program ran: {retval}"),
            Err(errno) => eprintln!(
                "BPF_PROG_TEST_RUN on a tracepoint program is refused on this kernel: errno \
                 {errno} ({})",
                if errno == 524 {
                    "ENOTSUPP: BPF_PROG_TYPE_TRACEPOINT has no test_run".to_string()
                } else {
                    std::io::Error::from_raw_os_error(errno).to_string()
                }
            ),
        }
        for name in PROGRAMS {
            let info = ebpf.program(name).unwrap().info().unwrap();
            eprintln!(
                "{name}: loaded as {:?}, run {} times (KVM available: {})",
                info.name_as_str(),
                info.run_count(),
                kvm_available()
            );
        }
    }
}
