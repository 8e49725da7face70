//! The host's busy CPU per window: read at every sample, and the difference between two
//! consecutive window boundaries belongs to the window between them. The scheduler's runtime
//! of every task (root `cpuacct`: exact, and in the clock processes' CPU time is kept in),
//! else each CPU's time outside its idle task (the probes' `sched_switch` program), else
//! `/proc/stat` (sampled at the tick).

use crate::{
    identity::discovery::HostCpu,
    record::{BusySource, HostWindow},
    windows::collector::{WindowClock, round3},
};

/// Tolerance for comparing sample times with window boundaries.
const EPSILON: f64 = 1e-6;

/// What one sample read of the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostReading {
    /// `/proc/stat`.
    pub stat: Option<HostCpu>,
    /// Nanoseconds every task ran, from the root `cpuacct` cgroup.
    pub runtime_ns: Option<u64>,
    /// Busy nanoseconds of all CPUs from the scheduler's idle time (arbitrary origin).
    pub busy_ns: Option<u64>,
    /// The host's memory (`MemTotal`), bytes.
    pub memory_bytes: Option<u64>,
    /// The profiler's own CPU time so far, nanoseconds.
    pub own_cpu_ns: Option<u64>,
}

/// The host at window boundaries.
#[derive(Debug)]
pub struct HostWindows {
    clock: WindowClock,
    ticks_per_second: u64,
    /// The last boundary sampled: (window that starts there, the host then).
    last_boundary: Option<(u64, HostReading)>,
}

impl HostWindows {
    pub fn new(clock: WindowClock, ticks_per_second: u64) -> Self {
        Self {
            clock,
            ticks_per_second: ticks_per_second.max(1),
            last_boundary: None,
        }
    }

    /// A sample at `t` read `now` with `vms` VMs watched. On a window boundary whose previous
    /// boundary was read too, returns the window that just ended and the host in it: its busy
    /// time from the first source both ends have (see the module).
    pub fn sample(&mut self, t: f64, now: HostReading, vms: usize) -> Option<(u64, HostWindow)> {
        let index = self.clock.index_at(t);
        if (t - self.clock.start_of(index)).abs() > EPSILON {
            return None;
        }
        let Some(stat) = now.stat else {
            self.last_boundary = None;
            return None;
        };
        let ended = self
            .last_boundary
            .filter(|(prev, _)| prev + 1 == index)
            .and_then(|(prev, then)| {
                let ticks = stat.busy_ticks.saturating_sub(then.stat?.busy_ticks);
                let proc_stat = round3(ticks as f64 / self.ticks_per_second as f64);
                let seconds = |a: Option<u64>, b: Option<u64>| {
                    a.zip(b)
                        .map(|(a, b)| round3(b.saturating_sub(a) as f64 / 1e9))
                };
                let exact = seconds(then.runtime_ns, now.runtime_ns)
                    .map(|s| (s, BusySource::Cpuacct))
                    .or_else(|| {
                        seconds(then.busy_ns, now.busy_ns).map(|s| (s, BusySource::SchedSwitch))
                    });
                let (busy, source) = exact.unwrap_or((proc_stat, BusySource::ProcStat));
                let host = HostWindow {
                    cpus: stat.cpus,
                    busy_cpu_seconds: busy,
                    vms_running: vms as u32,
                    busy_source: Some(source),
                    proc_stat_busy_cpu_seconds: exact.map(|_| proc_stat),
                    memory_bytes: now.memory_bytes,
                    profiler_cpu_seconds: seconds(then.own_cpu_ns, now.own_cpu_ns),
                };
                Some((prev, host))
            });
        self.last_boundary = Some((index, now));
        ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_busy_cpu_goes_to_the_window_between_consecutive_boundaries() {
        let mut h = HostWindows::new(WindowClock::new(10.0), 100);
        let cpu = |busy| HostReading {
            stat: Some(HostCpu {
                busy_ticks: busy,
                cpus: 2,
            }),
            ..HostReading::default()
        };
        assert_eq!(h.sample(0.0, cpu(1000), 1), None);
        assert_eq!(h.sample(5.0, cpu(1100), 1), None, "not a boundary");
        assert_eq!(
            h.sample(10.0, cpu(1350), 1),
            Some((
                0,
                HostWindow {
                    cpus: 2,
                    busy_cpu_seconds: 3.5,
                    vms_running: 1,
                    busy_source: Some(BusySource::ProcStat),
                    proc_stat_busy_cpu_seconds: None,
                    memory_bytes: None,
                    profiler_cpu_seconds: None,
                }
            ))
        );
        // A boundary without a reading breaks the chain: the next window gets nothing.
        assert_eq!(h.sample(20.0, HostReading::default(), 1), None);
        assert_eq!(h.sample(30.0, cpu(2000), 1), None);
        assert!(h.sample(40.0, cpu(2100), 1).is_some());
    }
}

#[cfg(test)]
mod sched_tests {
    use super::*;

    /// The scheduler's figure where both boundaries have it, `/proc/stat`'s kept beside it;
    /// `/proc/stat`'s alone where one end lacks it.
    #[test]
    fn the_scheduler_s_busy_time_wins_where_both_ends_have_it() {
        let mut h = HostWindows::new(WindowClock::new(10.0), 100);
        let read = |ticks, ns: Option<u64>| HostReading {
            stat: Some(HostCpu {
                busy_ticks: ticks,
                cpus: 2,
            }),
            busy_ns: ns,
            memory_bytes: Some(24 << 30),
            ..HostReading::default()
        };
        h.sample(0.0, read(0, Some(1_000_000_000)), 2);
        let (_, w) = h.sample(10.0, read(39, Some(11_400_000_000)), 2).unwrap();
        assert_eq!(w.busy_cpu_seconds, 10.4);
        assert_eq!(w.busy_source, Some(BusySource::SchedSwitch));
        assert_eq!(w.proc_stat_busy_cpu_seconds, Some(0.39));
        assert_eq!(w.memory_bytes, Some(24 << 30));
        let (_, w) = h.sample(20.0, read(80, None), 2).unwrap();
        assert_eq!(w.busy_source, Some(BusySource::ProcStat));
        assert_eq!(
            (w.busy_cpu_seconds, w.proc_stat_busy_cpu_seconds),
            (0.41, None)
        );
    }
}
