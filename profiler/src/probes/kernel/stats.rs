//! Kernel BPF run-time statistics, sampled: on for one refresh in [`STATS_EVERY`], scaled to the
//! whole run (while on, the kernel times every BPF program run on the host).

use std::{os::fd::OwnedFd, time::Duration};

/// BPF statistics are on for one refresh in this many.
pub const STATS_EVERY: u64 = 10;

/// Kernel BPF run-time statistics, on for one refresh in [`STATS_EVERY`].
#[derive(Debug)]
pub struct StatsSampler {
    /// Held while statistics are on (the kernel keeps them on while any holder has one).
    fd: Option<OwnedFd>,
    refreshes: u64,
    on_since: Option<std::time::Instant>,
    on_total: Duration,
    /// The kernel refused (no CAP_SYS_ADMIN, old kernel): counts stay zero.
    refused: bool,
}

impl StatsSampler {
    pub fn start() -> Self {
        let mut s = Self {
            fd: None,
            refreshes: 0,
            on_since: None,
            on_total: Duration::ZERO,
            refused: false,
        };
        s.turn(true);
        s
    }

    fn turn(&mut self, on: bool) {
        if on && self.fd.is_none() && !self.refused {
            match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
                Ok(fd) => {
                    self.fd = Some(fd);
                    self.on_since = Some(std::time::Instant::now());
                }
                Err(_) => self.refused = true,
            }
        } else if !on && let Some(since) = self.on_since.take() {
            self.fd = None;
            self.on_total += since.elapsed();
        }
    }

    /// Once per refresh.
    pub fn tick(&mut self) {
        self.refreshes += 1;
        self.turn(self.refreshes.is_multiple_of(STATS_EVERY));
    }

    /// Seconds the statistics were on so far.
    pub fn on_seconds(&self) -> f64 {
        (self.on_total + self.on_since.map_or(Duration::ZERO, |s| s.elapsed())).as_secs_f64()
    }
}

/// What the counts sampled over `on` of `elapsed` seconds are multiplied by to cover the whole
/// run; 1 when the statistics were on all along (`host_wide`: the
/// `kernel.bpf_stats_enabled` sysctl), or never.
pub fn stats_scale(elapsed: f64, on: f64, host_wide: bool) -> f64 {
    if host_wide || on <= 0.0 {
        1.0
    } else {
        (elapsed / on).max(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::stats_scale;

    #[test]
    fn sampled_statistics_scale_to_the_run_unless_on_all_along() {
        // On for 3 s of 30: ten times what was measured.
        assert_eq!(stats_scale(30.0, 3.0, false), 10.0);
        // The sysctl kept them on: already the whole run.
        assert_eq!(stats_scale(30.0, 3.0, true), 1.0);
        // Never on, or on longer than the run by clock skew: never below 1.
        assert_eq!(stats_scale(30.0, 0.0, false), 1.0);
        assert_eq!(stats_scale(30.0, 31.0, false), 1.0);
    }
}
