//! The `sched:sched_process_exec` tracepoint as discovery's hint (the kernel side is
//! `profiler-ebpf/src/probes/execs.rs`): the PIDs that exec'd since the last refresh. With
//! it, a refresh looks at the QEMUs it knows (their exit comes from a pidfd) and at these
//! PIDs, not at every process on the host; without it (or when the ring lost events)
//! discovery reads all of `/proc`.

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
};

/// The exec tracepoint's ring, drained each refresh.
pub struct ExecWatch {
    ring: RingBuf<MapData>,
    /// Events lost so far (all CPUs), as of the last drain.
    lost: u64,
}

impl ExecWatch {
    /// Attaches the tracepoint; `Err` (why) leaves discovery on full scans.
    pub fn attach(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        let ring = RingBuf::try_from(ebpf.take_map("EXECS").context("map EXECS missing")?)?;
        crate::probes::kernel::object::attach_tracepoint(ebpf, "sched", "sched_process_exec")?;
        Ok(Self { ring, lost: 0 })
    }

    /// The PIDs that exec'd since the last call, or `None` when some were lost (then
    /// discovery must look at everything).
    pub fn drain(&mut self, ebpf: &Ebpf) -> Option<Vec<u32>> {
        let mut pids = Vec::new();
        while let Some(item) = self.ring.next() {
            if let Some(bytes) = item.get(..4) {
                pids.push(u32::from_ne_bytes(bytes.try_into().expect("4 bytes")));
            }
        }
        let lost = crate::probes::kernel::batch::per_cpu_total(ebpf, "EXECS_LOST", 0).unwrap_or(0);
        let lost_now = lost > self.lost;
        self.lost = lost;
        (!lost_now).then_some(pids)
    }
}
