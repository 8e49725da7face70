//! Where a session's QEMU processes come from: the [`Discover`] seam, and [`ProcDiscovery`],
//! the host's procfs behind it (tests put fake processes there).

use std::collections::HashMap;

use crate::identity::{
    discovery::{
        CpuTicks, DiscoveryCache, HostCpu, HostPaths, QemuProcess, scan_qemu_processes_cached,
        scan_qemu_processes_hinted,
    },
    threads::{KernelWorkerSample, KernelWorkers, ThreadRole, ThreadSample, read_threads},
};

/// Where QEMU processes come from.
pub trait Discover {
    /// Every QEMU process running now.
    fn scan(&mut self) -> Vec<QemuProcess>;
    /// The same, told which PIDs exec'd since the last scan (`None`: not known), so that it
    /// need not look at every process.
    fn scan_hinted(&mut self, execs: Option<Vec<u32>>) -> Vec<QemuProcess> {
        let _ = execs;
        self.scan()
    }
    /// Whether the QEMU processes are those the last scan returned, told which PIDs exec'd
    /// since (`false`: changed, or it cannot tell without a scan).
    fn unchanged(&mut self, execs: Option<&[u32]>) -> bool {
        let _ = execs;
        false
    }
    /// The CPU time of `pid`, which the last scan found gone, as last read while it ran
    /// (`None`: not known; its last sample's stands).
    fn exit_cpu(&mut self, pid: u32) -> Option<CpuTicks> {
        let _ = pid;
        None
    }
    /// The host's CPU time so far (`None`: not known).
    fn host_cpu(&mut self) -> Option<HostCpu> {
        None
    }
    /// The host's memory, bytes (`None`: not known).
    fn host_memory(&mut self) -> Option<u64> {
        None
    }
    /// Nanoseconds every task on the host ran so far, from the root `cpuacct` cgroup (`None`:
    /// not mounted).
    fn host_runtime_ns(&mut self) -> Option<u64> {
        None
    }
    /// The threads of process `pid` with their roles, reusing the `settled` ones (`None`: not
    /// known).
    fn threads(
        &mut self,
        pid: u32,
        settled: &HashMap<u32, ThreadRole>,
    ) -> Option<Vec<ThreadSample>> {
        let _ = (pid, settled);
        None
    }
    /// The kernel threads that work for some VM, now.
    fn kernel_workers(&mut self) -> Vec<KernelWorkerSample> {
        Vec::new()
    }
    /// Process `pid`'s resident memory, bytes (`None`: not known).
    fn resident_bytes(&mut self, pid: u32) -> Option<u64> {
        let _ = pid;
        None
    }
}

/// The host's procfs (and libvirt's state files).
#[derive(Debug, Default)]
pub struct ProcDiscovery {
    paths: HostPaths,
    cache: DiscoveryCache,
    /// Refreshes since the last full scan.
    since_full: u32,
    host_cpu: crate::identity::discovery::HostCpuReader,
    kernel_workers: KernelWorkers,
    memory_total: Option<u64>,
    cpuacct: crate::identity::procfs::CpuacctReader,
}

/// A hinted scan trusts the exec hints and pidfds; every this many scans, one looks at all of
/// `/proc` anyway (a process the hints missed would be found this much later).
const FULL_SCAN_EVERY: u32 = 30;

impl Discover for ProcDiscovery {
    fn scan(&mut self) -> Vec<QemuProcess> {
        self.since_full = 0;
        scan_qemu_processes_cached(&self.paths, &mut self.cache)
    }
    fn scan_hinted(&mut self, execs: Option<Vec<u32>>) -> Vec<QemuProcess> {
        match execs {
            // The first scan is a full one (since_full starts at 0 only after it).
            Some(execs) if self.since_full > 0 && self.since_full < FULL_SCAN_EVERY => {
                self.since_full += 1;
                scan_qemu_processes_hinted(&self.paths, &mut self.cache, &execs)
            }
            _ => {
                let found = self.scan();
                self.since_full = 1;
                found
            }
        }
    }
    fn unchanged(&mut self, execs: Option<&[u32]>) -> bool {
        // A full scan is due at the same pace whether refreshes scan or not.
        let unchanged = execs.is_some_and(|execs| {
            self.since_full > 0
                && self.since_full < FULL_SCAN_EVERY
                && crate::identity::discovery::qemus_unchanged(&self.paths, &mut self.cache, execs)
        });
        if unchanged {
            self.since_full += 1;
        }
        unchanged
    }
    fn exit_cpu(&mut self, pid: u32) -> Option<CpuTicks> {
        crate::identity::discovery::take_exit_cpu(&mut self.cache, pid)
    }
    fn host_cpu(&mut self) -> Option<HostCpu> {
        self.host_cpu.read(&self.paths.proc_root)
    }
    fn host_runtime_ns(&mut self) -> Option<u64> {
        self.cpuacct.read(&self.paths.proc_root)
    }
    fn host_memory(&mut self) -> Option<u64> {
        // Constant while the host runs: read once.
        if self.memory_total.is_none() {
            self.memory_total = std::fs::read_to_string(self.paths.proc_root.join("meminfo"))
                .ok()
                .and_then(|t| crate::identity::discovery::parse_mem_total(&t));
        }
        self.memory_total
    }
    fn threads(
        &mut self,
        pid: u32,
        settled: &HashMap<u32, ThreadRole>,
    ) -> Option<Vec<ThreadSample>> {
        read_threads(&self.paths.proc_root, pid, settled)
    }
    fn kernel_workers(&mut self) -> Vec<KernelWorkerSample> {
        self.kernel_workers.read(&self.paths.proc_root)
    }
    fn resident_bytes(&mut self, pid: u32) -> Option<u64> {
        let statm = std::fs::read_to_string(self.paths.proc_root.join(format!("{pid}/statm")));
        crate::identity::discovery::parse_statm_resident(&statm.ok()?)
    }
}
