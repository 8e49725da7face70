//! The one place a window record is written: a window the collector closed, plus what else is
//! known of that window — the host's CPU in it (full windows), the updates the kernel maps
//! dropped while it was open, and how long a budgeted VM's uprobes were on in it (its
//! uprobe-served counts are then scaled to the window and marked estimated, or `null` when
//! the probes never saw it).

use chrono::{SecondsFormat, TimeDelta};

use crate::{
    attribution::Counts,
    record::{CpuByRole, EXIT_REASONS_KEPT, ExitCount, HostWindow, VmRef, WindowRecord},
    windows::{
        budget::{EstimateAddition, Probed, Uprobed, scale},
        collector::{ClosedWindow, RecordFrame, round3},
    },
};

/// What is known of a closed window besides its counts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WindowFacts {
    /// The host in that window (kept on full windows only).
    pub host: Option<HostWindow>,
    /// Updates any kernel map refused while the window was open.
    pub dropped_updates: u64,
    pub probed: Probed,
}

/// The record of `closed`, with `facts`; and what scaling a duty-cycled VM's counts added.
pub fn record(
    closed: &ClosedWindow,
    facts: &WindowFacts,
    frame: &RecordFrame,
) -> (WindowRecord, EstimateAddition) {
    let full = closed.reason.is_none();
    let seconds = if full {
        frame.length
    } else {
        round3((closed.to - closed.from).max(0.0))
    };
    let start = frame.wall_start + TimeDelta::microseconds((closed.from * 1e6).round() as i64);
    let id = &closed.identity;
    let counts = &closed.activity.counts;
    let mut r = WindowRecord {
        window: closed.window,
        start: start.to_rfc3339_opts(SecondsFormat::Millis, true),
        seconds,
        partial: !full,
        partial_reason: closed.reason,
        vm: VmRef {
            name: id.name.clone(),
            pid: id.pid,
            uuid: id.uuid.clone(),
            accel: id.accel,
            xen_domid: id.xen_domid,
            cmdline_devices: id.devices.clone(),
            libvirt: id.libvirt.clone(),
            started: closed.started.clone(),
            guest_memory_bytes: id.guest_memory_bytes,
        },
        timer: counts.timer,
        fd_wakeups: counts.fd_wakeups,
        read: counts.read,
        write: counts.write,
        in_kernel: counts.in_kernel,
        vcpu_wakeups: counts.vcpu_wakeups,
        vcpu_halt_polls: counts.vcpu_halt_polls,
        kvm_exits: kept_exits(&closed.activity.exits),
        cpu_seconds: counts.cpu_ticks.map(|t| frame.seconds(t)),
        cpu_by_role: cpu_by_role(counts, frame),
        resident_bytes: counts.resident_bytes,
        sources: (*closed.sources).clone(),
        devices: closed.activity.devices.clone(),
        timers: closed.activity.timers.clone(),
        host: facts.host.filter(|_| full),
        dropped_updates: facts.dropped_updates,
        estimated: false,
        probed_seconds: None,
    };
    let added = match facts.probed {
        // Probed the whole time it was seen.
        Probed::For { seconds: on, .. } if on >= r.seconds - 1e-3 => EstimateAddition::default(),
        Probed::Throughout => EstimateAddition::default(),
        Probed::For { uprobed, .. } if !uprobed.any() => EstimateAddition::default(),
        // Its probes were away the whole window (every resume of it failed past its end):
        // what they serve was not observed, so it is no count, never a 0.
        Probed::For {
            seconds: on,
            uprobed,
        } if on <= 0.0 => {
            unobserved(&mut r, uprobed);
            EstimateAddition::default()
        }
        Probed::For {
            seconds: on,
            uprobed,
        } => scale_record(&mut r, on, uprobed),
    };
    (r, added)
}

/// The first [`EXIT_REASONS_KEPT`] reasons of `exits` (most first), the rest summed as `other`.
fn kept_exits(exits: &[ExitCount]) -> Vec<ExitCount> {
    let mut kept: Vec<ExitCount> = exits.iter().take(EXIT_REASONS_KEPT).cloned().collect();
    let rest: u64 = exits.iter().skip(EXIT_REASONS_KEPT).map(|e| e.count).sum();
    if rest > 0 {
        kept.push(ExitCount {
            reason: "other".into(),
            count: rest,
        });
    }
    kept
}

/// The window's CPU time by thread role, where the threads were read at both its ends. What
/// the process used beyond its threads with a role went to its other threads.
fn cpu_by_role(counts: &Counts, frame: &RecordFrame) -> Option<CpuByRole> {
    let roles = counts.cpu_roles?;
    let process = counts.cpu_ticks?;
    Some(CpuByRole {
        vcpu: frame.seconds(roles.vcpu),
        vcpu_guest: frame.seconds(roles.vcpu_guest),
        device_model: frame.seconds(roles.device_model),
        other: frame.seconds(process.saturating_sub(roles.in_process())),
        kernel_workers: frame.seconds(roles.workers_in_process + roles.workers_outside),
        vcpu_threads: roles.vcpu_threads,
    })
}

/// Scales the uprobe-served counts of `r`, probed for `on` of its seconds, to the window;
/// returns what that added.
fn scale_record(r: &mut WindowRecord, on: f64, uprobed: Uprobed) -> EstimateAddition {
    let secs = r.seconds;
    let mut added = EstimateAddition::default();
    // Scales `n`, adding the difference to `sum`.
    let s = |n: u64, sum: &mut u64| {
        let scaled = scale(n, on, secs);
        *sum += scaled.saturating_sub(n);
        scaled
    };
    if uprobed.timer {
        r.timer = r.timer.map(|n| s(n, &mut added.timer));
        r.fd_wakeups = r.fd_wakeups.map(|n| s(n, &mut added.fd_wakeups));
    }
    if uprobed.read_write {
        r.read = r.read.map(|n| s(n, &mut added.read));
        r.write = r.write.map(|n| s(n, &mut added.write));
        for d in &mut r.devices {
            let e = added
                .devices
                .entry((d.name.clone(), d.owner.clone()))
                .or_default();
            d.read = s(d.read, &mut e.0);
            d.write = s(d.write, &mut e.1);
        }
    }
    if uprobed.callbacks {
        for t in &mut r.timers {
            let e = added.callbacks.entry(t.callback.clone()).or_default();
            t.count = s(t.count, e);
        }
    }
    r.estimated = true;
    r.probed_seconds = Some(round3(on));
    added
}

/// Blanks the counts `uprobed` serves in a record whose window the probes never saw: `null`,
/// `estimated` with `probed_seconds` 0.
fn unobserved(r: &mut WindowRecord, uprobed: Uprobed) {
    if uprobed.timer {
        r.timer = None;
        r.fd_wakeups = None;
    }
    if uprobed.read_write {
        r.read = None;
        r.write = None;
        r.devices.clear();
    }
    if uprobed.callbacks {
        r.timers.clear();
    }
    r.estimated = true;
    r.probed_seconds = Some(0.0);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{attribution::WindowCounts, record::Sources};

    /// A frame of `length`-second windows from 2026-11-22T00:00:00Z, 100 ticks a second.
    pub(crate) fn frame(length: f64) -> RecordFrame {
        RecordFrame {
            length,
            wall_start: "2026-11-22T00:00:00Z".parse().unwrap(),
            ticks_per_second: 100,
        }
    }

    /// VM `pid`'s full window `window` of `length` seconds, with nothing counted.
    pub(crate) fn closed_window(pid: u32, window: u64, length: f64) -> ClosedWindow {
        ClosedWindow {
            pid,
            identity: std::sync::Arc::new(crate::identity::fixtures::identity(
                &format!("vm-{pid}"),
                pid,
            )),
            started: None,
            sources: std::sync::Arc::new(Sources {
                timer: "libc-uprobes".into(),
                read: "usdt".into(),
                write: "usdt".into(),
                timer_callbacks: "symbols".into(),
                ..Default::default()
            }),
            window,
            from: window as f64 * length,
            to: (window + 1) as f64 * length,
            reason: None,
            activity: WindowCounts {
                counts: Counts {
                    timer: Some(0),
                    fd_wakeups: Some(0),
                    read: Some(0),
                    write: Some(0),
                    cpu_ticks: Some(0),
                    in_kernel: None,
                    ..Counts::default()
                },
                ..WindowCounts::default()
            },
        }
    }

    const TIMER_ONLY: Uprobed = Uprobed {
        timer: true,
        read_write: false,
        callbacks: false,
    };

    #[test]
    fn every_fact_lands_in_the_one_record() {
        let mut c = closed_window(7, 2, 10.0);
        c.activity.counts.timer = Some(250);
        c.activity.counts.cpu_ticks = Some(123);
        let host = HostWindow {
            cpus: 2,
            busy_cpu_seconds: 1.5,
            vms_running: 3,
            busy_source: None,
            proc_stat_busy_cpu_seconds: None,
            memory_bytes: None,
            profiler_cpu_seconds: None,
        };
        let facts = WindowFacts {
            host: Some(host),
            dropped_updates: 4,
            probed: Probed::For {
                seconds: 2.5,
                uprobed: TIMER_ONLY,
            },
        };
        let (r, added) = record(&c, &facts, &frame(10.0));
        assert_eq!(r.start, "2026-11-22T00:00:20.000Z");
        assert_eq!((r.window, r.seconds, r.partial), (2, 10.0, false));
        assert_eq!(r.cpu_seconds, Some(1.23));
        assert_eq!(r.host, Some(host));
        assert_eq!(r.dropped_updates, 4);
        assert_eq!(
            (r.timer, r.estimated, r.probed_seconds),
            (Some(1000), true, Some(2.5))
        );
        assert_eq!(added.timer, 750);
        assert_eq!(r.read, Some(0), "not uprobe-served here: not scaled");
    }

    #[test]
    fn a_partial_window_gets_no_host_and_its_own_seconds() {
        let mut c = closed_window(7, 0, 10.0);
        c.from = 3.0;
        c.reason = Some(crate::record::PartialReason::VmStarted);
        let facts = WindowFacts {
            host: Some(HostWindow {
                cpus: 2,
                busy_cpu_seconds: 1.0,
                vms_running: 1,
                busy_source: None,
                proc_stat_busy_cpu_seconds: None,
                memory_bytes: None,
                profiler_cpu_seconds: None,
            }),
            ..WindowFacts::default()
        };
        let (r, _) = record(&c, &facts, &frame(10.0));
        assert_eq!((r.seconds, r.partial, r.host), (7.0, true, None));
        assert_eq!(r.start, "2026-11-22T00:00:03.000Z");
    }

    #[test]
    fn a_window_its_probes_never_saw_has_no_counts_and_one_they_saw_all_along_is_exact() {
        let c = closed_window(7, 0, 10.0);
        let probed_for = |seconds| WindowFacts {
            probed: Probed::For {
                seconds,
                uprobed: TIMER_ONLY,
            },
            ..WindowFacts::default()
        };
        let (r, _) = record(&c, &probed_for(0.0), &frame(10.0));
        assert_eq!((r.timer, r.fd_wakeups), (None, None));
        assert_eq!((r.estimated, r.probed_seconds), (true, Some(0.0)));
        let (r, added) = record(&c, &probed_for(10.0), &frame(10.0));
        assert!(!r.estimated && added.is_empty());
    }
}

#[cfg(test)]
mod guest_tests {
    use super::{tests::*, *};
    use crate::attribution::cpu_roles::RoleTicks;

    #[test]
    fn exits_keep_the_top_reasons_and_sum_the_rest() {
        let mut c = closed_window(7, 0, 10.0);
        c.activity.exits = (0..12)
            .map(|i| ExitCount {
                reason: format!("R{i}"),
                count: 100 - i,
            })
            .collect();
        let (r, _) = record(&c, &WindowFacts::default(), &frame(10.0));
        assert_eq!(r.kvm_exits.len(), EXIT_REASONS_KEPT + 1);
        assert_eq!(r.kvm_exits[0].reason, "R0");
        let other = r.kvm_exits.last().unwrap();
        assert_eq!(
            (other.reason.as_str(), other.count),
            ("other", 92 + 91 + 90 + 89)
        );
    }

    #[test]
    fn cpu_by_role_puts_what_no_role_explains_in_other() {
        let mut c = closed_window(7, 0, 10.0);
        c.activity.counts.cpu_ticks = Some(300);
        c.activity.counts.cpu_roles = Some(RoleTicks {
            vcpu: 280,
            vcpu_guest: 1,
            device_model: 5,
            workers_in_process: 2,
            workers_outside: 14,
            vcpu_threads: 1,
        });
        let (r, _) = record(&c, &WindowFacts::default(), &frame(10.0));
        let split = r.cpu_by_role.unwrap();
        assert_eq!(r.cpu_seconds, Some(3.0));
        assert_eq!(
            (
                split.vcpu,
                split.vcpu_guest,
                split.device_model,
                split.other
            ),
            (2.8, 0.01, 0.05, 0.13)
        );
        assert_eq!((split.kernel_workers, split.vcpu_threads), (0.16, 1));
        // Threads not read at both ends: no split rather than a wrong one.
        c.activity.counts.cpu_roles = None;
        assert_eq!(
            record(&c, &WindowFacts::default(), &frame(10.0))
                .0
                .cpu_by_role,
            None
        );
    }
}
