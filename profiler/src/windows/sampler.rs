//! The one sampling loop every command runs (`record`, `top`, and the ones that build on
//! them): a tick every second aligned to the start, a sample per tick, the sink told of each,
//! missed ticks skipped, and at the stop a last sample plus every running window closed.
//!
//! Window boundaries are whole seconds from the start, so a one-second tick also samples
//! exactly on every boundary; a sample is labelled with its *scheduled* time, not the time the
//! thread woke, so boundaries stay exact. After a slow sample, the first missed tick is taken
//! at once under its own scheduled time and the others are skipped (not replayed back to back
//! under made-up times): the next sample simply covers more time.

use std::{future::Future, ops::ControlFlow, time::Duration};

use tokio::time::{Instant, MissedTickBehavior};

use crate::{
    identity::discovery::QemuProcess,
    note::Note,
    probes::{ProbeCost, ProbeLayer},
    record::WindowRecord,
    windows::{
        collector::{RunningWindow, VmObservation, WindowClock},
        discover::Discover,
        session::Session,
    },
};

/// How often counters are read.
pub const REFRESH: Duration = Duration::from_secs(1);

/// What a sink can ask of the session after a sample (live views need more than records).
pub trait SessionView {
    /// Running windows with each VM's command-line devices.
    fn running_with_devices(&self) -> Vec<(RunningWindow, Vec<String>)>;
    fn window_clock(&self) -> WindowClock;
    /// Probe sources attached right now.
    fn live_sources(&self) -> Vec<String>;
    fn probe_cost(&self) -> ProbeCost;
    /// The host-wide probe sources and whether they are attached.
    fn host_sources(&self) -> Vec<(&'static str, Result<(), String>)>;
    /// The QEMU processes the last sample saw (after the VM selection).
    fn processes(&self) -> &[QemuProcess];
    /// Every live VM's cumulative counts at the last sample.
    fn observations(&self) -> &[VmObservation];
    /// VMs that exited at the last sample, with their final cumulative counts.
    fn exits(&self) -> &[VmObservation];
    /// Whether any VM matched the selection so far.
    fn ever_matched(&self) -> bool;
    /// Entries and capacity of each eBPF map.
    fn map_entries(&self) -> Vec<(&'static str, usize, u32)>;
    /// Updates each eBPF map refused because it was full, since the start.
    fn dropped(&self) -> Vec<(&'static str, u64)>;
    /// Under a budget: what scaling added to each VM's closed windows so far.
    fn estimate_additions(&self) -> Vec<(u32, bool, crate::windows::budget::EstimateAddition)>;
    /// Under a budget: each budgeted VM's duty cycle and cost per hit, by pid.
    fn duty_views(&self) -> Vec<(u32, crate::windows::budget::DutyView)>;
}

impl<P: ProbeLayer, D: Discover> SessionView for Session<P, D> {
    fn running_with_devices(&self) -> Vec<(RunningWindow, Vec<String>)> {
        Session::running_with_devices(self)
    }
    fn window_clock(&self) -> WindowClock {
        Session::window_clock(self)
    }
    fn live_sources(&self) -> Vec<String> {
        Session::live_sources(self)
    }
    fn probe_cost(&self) -> ProbeCost {
        Session::probe_cost(self)
    }
    fn host_sources(&self) -> Vec<(&'static str, Result<(), String>)> {
        Session::host_sources(self)
    }
    fn processes(&self) -> &[QemuProcess] {
        Session::processes(self)
    }
    fn observations(&self) -> &[VmObservation] {
        Session::observations(self)
    }
    fn exits(&self) -> &[VmObservation] {
        Session::exits(self)
    }
    fn ever_matched(&self) -> bool {
        Session::ever_matched(self)
    }
    fn map_entries(&self) -> Vec<(&'static str, usize, u32)> {
        Session::map_entries(self)
    }
    fn dropped(&self) -> Vec<(&'static str, u64)> {
        Session::dropped(self)
    }
    fn estimate_additions(&self) -> Vec<(u32, bool, crate::windows::budget::EstimateAddition)> {
        Session::estimate_additions(self)
    }
    fn duty_views(&self) -> Vec<(u32, crate::windows::budget::DutyView)> {
        Session::duty_views(self)
    }
}

/// One sample, as a sink sees it.
pub struct Sample<'a> {
    /// Seconds since the start (the scheduled time; the stop time for the last sample).
    pub t: f64,
    /// Windows closed by this sample (for the last sample: every running window too).
    pub closed: &'a [WindowRecord],
    pub notes: &'a [Note],
    /// The first sample (t = 0).
    pub first: bool,
    /// The last sample, at the stop.
    pub last: bool,
    /// Every VM was read: the session's observations are as of `t` (otherwise as of the last
    /// sample that read them; see [`SampleSink::reads_every_vm`]).
    pub every_vm: bool,
    pub session: &'a dyn SessionView,
}

/// Where samples go. `Break` stops sampling (the last sample still comes).
pub trait SampleSink {
    fn on_sample(&mut self, sample: &Sample<'_>) -> ControlFlow<()>;
    /// Whether every refresh must read every VM (a view of the running windows); otherwise
    /// VMs are read at window boundaries and when a QEMU starts or exits, which gives the same
    /// windows for a fraction of the collector's time ([`Session::sample_changes`]).
    fn reads_every_vm(&self) -> bool {
        false
    }
}

/// Why sampling stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// `--duration` reached.
    Duration,
    /// The caller's stop future completed (Ctrl-C, SIGTERM, the UI quit).
    Requested,
    /// The sink asked to stop.
    Sink,
}

/// Samples `session` from `start` until `stop` completes, `duration` seconds have passed, or
/// the sink breaks; then takes the last sample at the stop and closes every running window.
/// Returns when sampling stopped (seconds since `start`) and why.
pub async fn run<P: ProbeLayer, D: Discover>(
    session: &mut Session<P, D>,
    start: Instant,
    duration: Option<f64>,
    stop: impl Future<Output = ()>,
    sink: &mut dyn SampleSink,
) -> anyhow::Result<(f64, StopReason)> {
    tokio::pin!(stop);
    let report = session.sample(0.0)?;
    let mut flow = sink.on_sample(&Sample {
        t: 0.0,
        closed: &report.closed,
        notes: &report.notes,
        first: true,
        last: false,
        every_vm: report.every_vm,
        session,
    });
    let mut ticks = tokio::time::interval_at(start + REFRESH, REFRESH);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let (stopped_at, reason) = loop {
        if flow.is_break() {
            break (start.elapsed().as_secs_f64(), StopReason::Sink);
        }
        tokio::select! {
            scheduled = ticks.tick() => {
                let t = (scheduled - start).as_secs_f64().round();
                let report = if sink.reads_every_vm() {
                    session.sample(t)?
                } else {
                    session.sample_changes(t)?
                };
                flow = sink.on_sample(&Sample {
                    t,
                    closed: &report.closed,
                    notes: &report.notes,
                    first: false,
                    last: false,
                    every_vm: report.every_vm,
                    session,
                });
                if duration.is_some_and(|d| t >= d) {
                    break (t, StopReason::Duration);
                }
            }
            () = &mut stop => break (start.elapsed().as_secs_f64(), StopReason::Requested),
        }
    };
    // A last sample so the running windows carry everything up to the stop.
    let mut report = session.sample_last(stopped_at)?;
    report.closed.extend(session.finish(stopped_at));
    let _ = sink.on_sample(&Sample {
        t: stopped_at,
        closed: &report.closed,
        notes: &report.notes,
        first: false,
        last: true,
        every_vm: report.every_vm,
        session,
    });
    Ok((stopped_at, reason))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use chrono::{DateTime, Utc};

    use super::*;
    use crate::{
        attribution::RawCounters,
        offer::policy::{ReadWriteUnavailable, VmSources},
        probes::{AttachedVm, NameSources},
        windows::{collector::Collector, session::VmFilter},
    };

    /// A VM whose timer counter grows by 10 a sample; sample number `slow_at` takes
    /// `slow_ms`.
    struct Ticking {
        samples: u64,
        slow_at: Option<u64>,
        slow_ms: u64,
    }

    impl ProbeLayer for Ticking {
        fn watch(&mut self, _: &QemuProcess) -> anyhow::Result<AttachedVm> {
            Ok(AttachedVm {
                sources: VmSources {
                    read_write: Err(ReadWriteUnavailable::NoUsdtStripped),
                    callbacks: Err(crate::offer::policy::CallbacksUnavailable::Stripped),
                    timer: Ok(crate::offer::policy::TimerSource::LibcUprobes),
                    guest: crate::offer::policy::GuestSources::plan(
                        crate::identity::cmdline::Accel::Tcg,
                        &crate::offer::kernel::KernelOffer::all(),
                    ),
                },
                names: NameSources::default(),
                notes: vec![Note::general("watched")],
            })
        }
        fn replan(&mut self, vm: &QemuProcess) -> anyhow::Result<AttachedVm> {
            self.watch(vm)
        }
        fn unwatch(&mut self, _: u32) -> anyhow::Result<()> {
            Ok(())
        }
        fn refresh(&mut self) -> Vec<Note> {
            Vec::new()
        }
        fn read_counters(&mut self) -> anyhow::Result<HashMap<u32, RawCounters>> {
            self.samples += 1;
            if self.slow_at == Some(self.samples) {
                // Blocks the runtime like a slow /proc scan would.
                std::thread::sleep(Duration::from_millis(self.slow_ms));
            }
            let mut c = RawCounters::default();
            c.by_key
                .insert((profiler_common::kind::TIMER, 1), 10 * self.samples);
            Ok([(7, c)].into())
        }
        fn cost(&self) -> ProbeCost {
            ProbeCost::default()
        }
    }

    struct OneVm;
    impl Discover for OneVm {
        fn scan(&mut self) -> Vec<QemuProcess> {
            vec![QemuProcess {
                ..crate::identity::fixtures::process(7, 1, "vm")
            }]
        }
    }

    #[derive(Default)]
    struct Log {
        times: Vec<f64>,
        closed: Vec<WindowRecord>,
        notes: Vec<String>,
        last_seen: bool,
    }

    impl SampleSink for Log {
        fn on_sample(&mut self, s: &Sample<'_>) -> ControlFlow<()> {
            assert!(!self.last_seen, "nothing after the last sample");
            self.times.push(s.t);
            self.closed.extend_from_slice(s.closed);
            self.notes.extend(s.notes.iter().map(ToString::to_string));
            self.last_seen = s.last;
            assert_eq!(s.first, self.times.len() == 1);
            ControlFlow::Continue(())
        }
    }

    fn session(slow_at: Option<u64>, slow_ms: u64) -> Session<Ticking, OneVm> {
        Session::with_discovery(
            Ticking {
                samples: 0,
                slow_at,
                slow_ms,
            },
            OneVm,
            Collector::new(
                2.0,
                "2026-11-22T00:00:00Z".parse::<DateTime<Utc>>().unwrap(),
                100,
            ),
            VmFilter::default(),
        )
    }

    /// Runs `s` into `log` from now for `duration` seconds.
    async fn run_for(
        s: &mut Session<Ticking, OneVm>,
        duration: Option<f64>,
        log: &mut Log,
    ) -> anyhow::Result<(f64, StopReason)> {
        run(s, Instant::now(), duration, std::future::pending(), log).await
    }

    #[tokio::test(start_paused = true)]
    async fn samples_every_second_until_the_duration_then_closes_the_running_window() {
        let mut s = session(None, 0);
        let mut log = Log::default();
        let (stopped, reason) = run_for(&mut s, Some(5.0), &mut log).await.unwrap();
        assert_eq!((stopped, reason), (5.0, StopReason::Duration));
        assert_eq!(log.times, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 5.0]);
        assert!(log.last_seen);
        assert_eq!(log.notes, ["watched"]);
        // Windows [0,2), [2,4), and [4,5) closed as partial at the stop.
        let windows: Vec<(u64, bool)> = log.closed.iter().map(|w| (w.window, w.partial)).collect();
        assert_eq!(windows, [(0, false), (1, false), (2, true)]);
    }

    /// Real time: a paused clock does not move while a sample blocks the thread.
    #[tokio::test]
    async fn a_slow_sample_skips_the_missed_ticks_instead_of_mislabelling_them() {
        // The 2nd sample (t = 1) takes 2.2 s: the ticks at t = 2 and t = 3 are missed. It
        // starts at t = 1 at the earliest, so it ends after t = 3.2 whatever the host; a host
        // late by up to 0.8 s in all (waking the runtime, running the sample) still ends it
        // before the tick at t = 4.
        let mut s = session(Some(2), 2200);
        let mut log = Log::default();
        run_for(&mut s, Some(4.0), &mut log).await.unwrap();
        // t = 2 is taken late, once; t = 3 is skipped; no label is repeated or made up.
        assert_eq!(log.times, [0.0, 1.0, 2.0, 4.0, 4.0]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_request_ends_with_a_last_sample() {
        let mut s = session(None, 0);
        let mut log = Log::default();
        let stop = tokio::time::sleep(Duration::from_millis(2500));
        let (stopped, reason) = run(&mut s, Instant::now(), None, stop, &mut log)
            .await
            .unwrap();
        assert_eq!(reason, StopReason::Requested);
        assert!((stopped - 2.5).abs() < 0.01, "{stopped}");
        assert_eq!(log.times[..3], [0.0, 1.0, 2.0]);
        assert!(log.last_seen);
        let last = log.closed.last().unwrap();
        assert!(last.partial);
    }
}
