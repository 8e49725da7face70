//! The host's busy CPU per window: read at every sample, and the difference between two
//! consecutive window boundaries belongs to the window between them.

use crate::{identity::discovery::HostCpu, record::HostWindow, windows::collector::WindowClock};

/// Tolerance for comparing sample times with window boundaries.
const EPSILON: f64 = 1e-6;

/// The host's CPU at window boundaries.
#[derive(Debug)]
pub struct HostWindows {
    clock: WindowClock,
    ticks_per_second: u64,
    /// The last boundary sampled: (window that starts there, host CPU then).
    last_boundary: Option<(u64, HostCpu)>,
}

impl HostWindows {
    pub fn new(clock: WindowClock, ticks_per_second: u64) -> Self {
        Self {
            clock,
            ticks_per_second: ticks_per_second.max(1),
            last_boundary: None,
        }
    }

    /// A sample at `t` read `cpu` with `vms` VMs watched. On a window boundary whose previous
    /// boundary was read too, returns the window that just ended and the host in it.
    pub fn sample(
        &mut self,
        t: f64,
        cpu: Option<HostCpu>,
        vms: usize,
    ) -> Option<(u64, HostWindow)> {
        let index = self.clock.index_at(t);
        if (t - self.clock.start_of(index)).abs() > EPSILON {
            return None;
        }
        let Some(cpu) = cpu else {
            self.last_boundary = None;
            return None;
        };
        let ended = self
            .last_boundary
            .filter(|(prev, _)| prev + 1 == index)
            .map(|(prev, then)| {
                let busy = cpu.busy_ticks.saturating_sub(then.busy_ticks) as f64
                    / self.ticks_per_second as f64;
                let host = HostWindow {
                    cpus: cpu.cpus,
                    busy_cpu_seconds: (busy * 1000.0).round() / 1000.0,
                    vms_running: vms as u32,
                };
                (prev, host)
            });
        self.last_boundary = Some((index, cpu));
        ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_busy_cpu_goes_to_the_window_between_consecutive_boundaries() {
        let mut h = HostWindows::new(WindowClock::new(10.0), 100);
        let cpu = |busy| {
            Some(HostCpu {
                busy_ticks: busy,
                cpus: 2,
            })
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
                    vms_running: 1
                }
            ))
        );
        // A boundary without a reading breaks the chain: the next window gets nothing.
        assert_eq!(h.sample(20.0, None, 1), None);
        assert_eq!(h.sample(30.0, cpu(2000), 1), None);
        assert!(h.sample(40.0, cpu(2100), 1).is_some());
    }
}
