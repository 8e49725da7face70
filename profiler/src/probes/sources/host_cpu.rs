//! The host's busy time from the scheduler where no cgroup v1 `cpuacct` hierarchy gives it
//! (the kernel side is `profiler-ebpf/src/probes/host_cpu.rs`): every CPU's time in its idle
//! task, kept at each context switch, where `/proc/stat`'s is sampled at the tick.

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
    programs::RawTracePoint,
};
use profiler_common::CpuIdle;

const PROGRAM: &str = "sched_switch_idle";
const MAP: &str = "CPU_IDLE";

/// The idle-time program, attached for the profiler's life.
#[derive(Debug)]
pub struct HostCpuSource {
    /// `Err`: why the host's busy time comes from `/proc/stat` instead.
    status: Result<(), String>,
}

impl HostCpuSource {
    /// Loads and attaches the program; a failure leaves `/proc/stat` as the host's figure.
    pub fn attach(ebpf: &mut Ebpf) -> Self {
        let mut attach = || -> anyhow::Result<()> {
            let program: &mut RawTracePoint = ebpf
                .program_mut(PROGRAM)
                .with_context(|| format!("eBPF program {PROGRAM} missing from the object"))?
                .try_into()?;
            {
                use crate::probes::kernel::object::{load_interrupted, retry_interrupted};
                retry_interrupted(|| program.load(), load_interrupted)
            }
            .context("loading the idle-time program")?;
            program
                .attach("sched_switch")
                .context("attaching to raw tracepoint sched_switch")?;
            Ok(())
        };
        let status = attach().map_err(|e| format!("{e:#}"));
        if status.is_ok() {
            switch_every_cpu();
        }
        Self { status }
    }

    /// Not attached: the root `cpuacct` cgroup gives the host's busy time instead.
    pub fn not_needed() -> Self {
        Self {
            status: Err(
                "not needed: the root cpuacct cgroup gives the scheduler's runtimes".into(),
            ),
        }
    }

    pub fn status(&self) -> &Result<(), String> {
        &self.status
    }

    /// The busy nanoseconds of every online CPU so far, from an arbitrary origin (only
    /// differences mean something); `None` while some CPU has not switched tasks since the
    /// program was attached (its idle time is not known yet), or when unavailable.
    pub fn busy_ns(&self, ebpf: &Ebpf) -> Option<u64> {
        self.status.as_ref().ok()?;
        let map = PerCpuArray::<&MapData, CpuIdle>::try_from(ebpf.map(MAP)?).ok()?;
        let per_cpu = map.get(&0, 0).ok()?;
        let now = monotonic_ns();
        let online = aya::util::online_cpus().ok()?;
        busy_ns(now, online.iter().map(|&cpu| per_cpu.get(cpu as usize)))
    }
}

/// Makes every online CPU switch tasks once (a thread pinned to it sleeps a moment), so that
/// each one's idle time is known from the first sample, not from whenever an idle CPU would
/// next switch.
fn switch_every_cpu() {
    let cpus = aya::util::online_cpus().unwrap_or_default();
    let threads: Vec<_> = cpus
        .into_iter()
        .map(|cpu| {
            std::thread::spawn(move || {
                // SAFETY: a zeroed cpu_set_t with one CPU set, for this thread only.
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu as usize, &mut set);
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock `bpf_ktime_get_ns` reads.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The CPUs' busy time up to `now`: each CPU's elapsed time less its idle time, from the
/// monotonic clock's origin.
fn busy_ns<'a>(now: u64, cpus: impl Iterator<Item = Option<&'a CpuIdle>>) -> Option<u64> {
    let mut busy = 0u64;
    for cpu in cpus {
        busy += now.saturating_sub(cpu?.idle_until(now)?);
    }
    Some(busy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_is_elapsed_less_idle_with_a_running_idle_period_counted() {
        let idle = |idle_ns, last_switch, idle_now| CpuIdle {
            idle_ns,
            last_switch,
            idle_task: 0xffff_8880_0000_1000,
            idle_now,
        };
        // CPU 0 idle 600 of its first 900 ns, busy since; CPU 1 idle since 500 (and 200 before).
        let cpus = [idle(600, 900, 0), idle(200, 500, 1)];
        assert_eq!(
            busy_ns(1000, cpus.iter().map(Some)),
            Some((1000 - 600) + (1000 - 700))
        );
        // A CPU that has not switched since the program was attached: not known yet.
        let unknown = CpuIdle::default();
        assert_eq!(
            busy_ns(1000, [Some(&cpus[0]), Some(&unknown)].into_iter()),
            None
        );
        assert_eq!(busy_ns(1000, [Some(&cpus[0]), None].into_iter()), None);
    }
}
