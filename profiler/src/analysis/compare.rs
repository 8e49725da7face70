//! `profiler compare BEFORE AFTER`: Project Pulsar's two tables side by side for each VM, the
//! per-window means of every count with the change, and the change per device and per timer
//! callback: "before vs after disabling USB" on one screen.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use crate::text::clean;
use crate::{
    analysis::report::{VmWindows, group_by_vm, thousands},
    record::WindowRecord,
};

/// Which VM of the first recording goes with which of the second.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub before: String,
    pub after: String,
}

impl std::str::FromStr for Pair {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (before, after) = s
            .split_once('=')
            .ok_or_else(|| format!("expected BEFORE_NAME=AFTER_NAME, got {s:?}"))?;
        Ok(Pair {
            before: before.into(),
            after: after.into(),
        })
    }
}

/// The mean of one count per full window, before and after.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MeanChange {
    pub name: String,
    /// `None`: not counted in that recording (no source), never 0.
    pub before: Option<f64>,
    pub after: Option<f64>,
    /// `(after - before) / before`, in %; `None` when either side is unknown or before is 0.
    pub change_percent: Option<f64>,
}

fn change(before: Option<f64>, after: Option<f64>) -> Option<f64> {
    match (before, after) {
        (Some(b), Some(a)) if b > 0.0 => Some((a - b) / b * 100.0),
        _ => None,
    }
}

impl MeanChange {
    fn new(name: impl Into<String>, before: Option<f64>, after: Option<f64>) -> Self {
        Self {
            name: name.into(),
            before,
            after,
            change_percent: change(before, after),
        }
    }
}

/// One pair of VMs compared.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmComparison {
    pub before: String,
    pub after: String,
    /// Window length (seconds) the means are per.
    pub window_seconds: f64,
    /// Full windows the means are over (after the settle time).
    pub before_windows: usize,
    pub after_windows: usize,
    /// timer, read, write, fd_wakeups, cpu_seconds, vcpu_wakeups, cpu_vcpu_seconds,
    /// cpu_device_model_seconds: means per full window.
    pub counts: Vec<MeanChange>,
    /// Reads + writes per full window, per device.
    pub devices: Vec<MeanChange>,
    /// Runs per full window, per timer callback.
    pub callbacks: Vec<MeanChange>,
    /// KVM exits per full window, per reason (where the kernel fires `kvm_exit`).
    pub exits: Vec<MeanChange>,
    /// The windows side by side: (interval, before (timer, read, write), after (...)).
    #[serde(skip)]
    pub rows: Vec<Row>,
}

/// One line of the side-by-side table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub index: usize,
    pub before: Option<[Option<u64>; 3]>,
    pub after: Option<[Option<u64>; 3]>,
}

/// Everything compared.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    pub vms: Vec<VmComparison>,
    /// VMs of either recording with no partner.
    pub unpaired_before: Vec<String>,
    pub unpaired_after: Vec<String>,
}

/// Full windows that start at least `settle` seconds after the VM started.
fn full<'a>(g: &VmWindows<'a>, settle: f64) -> Vec<&'a WindowRecord> {
    g.after_settle(settle)
        .into_iter()
        .filter(|w| !w.partial)
        .collect()
}

/// Mean of `f` over full windows, scaled to `window` seconds; `None` if any window lacks it.
fn mean(
    windows: &[&WindowRecord],
    window: f64,
    f: impl Fn(&WindowRecord) -> Option<f64>,
) -> Option<f64> {
    if windows.is_empty() {
        return None;
    }
    let mut sum = 0.0;
    let mut secs = 0.0;
    for w in windows {
        sum += f(w)?;
        secs += w.seconds;
    }
    Some(sum / secs * window)
}

fn per_name_means(
    windows: &[&WindowRecord],
    window: f64,
    items: impl Fn(&WindowRecord) -> Vec<(String, u64)>,
) -> BTreeMap<String, f64> {
    let secs: f64 = windows.iter().map(|w| w.seconds).sum();
    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    for w in windows {
        for (name, n) in items(w) {
            *totals.entry(name).or_default() += n;
        }
    }
    totals
        .into_iter()
        .map(|(k, n)| {
            (
                k,
                if secs > 0.0 {
                    n as f64 / secs * window
                } else {
                    0.0
                },
            )
        })
        .collect()
}

/// Means of named items before and after; an item only one side has is 0 on the other side
/// when that side's source could see it (`*_seen`), else unknown.
fn name_changes(
    before: BTreeMap<String, f64>,
    after: BTreeMap<String, f64>,
    before_seen: bool,
    after_seen: bool,
) -> Vec<MeanChange> {
    let mut names: Vec<&String> = before.keys().chain(after.keys()).collect();
    names.sort();
    names.dedup();
    let mut out: Vec<MeanChange> = names
        .into_iter()
        .map(|n| {
            let b = before.get(n).copied().or(before_seen.then_some(0.0));
            let a = after.get(n).copied().or(after_seen.then_some(0.0));
            MeanChange::new(n.clone(), b, a)
        })
        .collect();
    out.sort_by(|x, y| {
        let big = |m: &MeanChange| m.before.unwrap_or(0.0).max(m.after.unwrap_or(0.0));
        big(y).total_cmp(&big(x)).then(x.name.cmp(&y.name))
    });
    out
}

/// One figure of a window record, as a number.
type Measure = Box<dyn Fn(&WindowRecord) -> Option<f64>>;

fn compare_pair(b: &VmWindows<'_>, a: &VmWindows<'_>, settle: f64) -> VmComparison {
    let (bf, af) = (full(b, settle), full(a, settle));
    let window = bf.first().or(af.first()).map_or(30.0, |w| w.seconds);
    let count =
        |f: fn(&WindowRecord) -> Option<u64>| move |w: &WindowRecord| f(w).map(|n| n as f64);
    let role = |f: fn(&crate::record::CpuByRole) -> f64| {
        move |w: &WindowRecord| w.cpu_by_role.as_ref().map(f)
    };
    let measures: [(&str, Measure); 8] = [
        ("timer", Box::new(count(|w| w.timer))),
        ("read", Box::new(count(|w| w.read))),
        ("write", Box::new(count(|w| w.write))),
        ("fd_wakeups", Box::new(count(|w| w.fd_wakeups))),
        ("cpu_seconds", Box::new(|w: &WindowRecord| w.cpu_seconds)),
        ("vcpu_wakeups", Box::new(count(|w| w.vcpu_wakeups))),
        ("cpu_vcpu_seconds", Box::new(role(|r| r.vcpu))),
        (
            "cpu_device_model_seconds",
            Box::new(role(|r| r.device_model)),
        ),
    ];
    let counts = measures
        .iter()
        .map(|(name, f)| MeanChange::new(*name, mean(&bf, window, f), mean(&af, window, f)))
        .collect();
    let seen = |w: &[&WindowRecord], f: fn(&WindowRecord) -> bool| w.last().is_some_and(|r| f(r));
    let rw_seen = |r: &WindowRecord| !r.sources.read.starts_with("unavailable");
    let cb_seen = |r: &WindowRecord| !r.sources.timer_callbacks.starts_with("unavailable");
    let devices = name_changes(
        per_name_means(&bf, window, |w| {
            w.devices
                .iter()
                .map(|d| (d.label(), d.read + d.write))
                .collect()
        }),
        per_name_means(&af, window, |w| {
            w.devices
                .iter()
                .map(|d| (d.label(), d.read + d.write))
                .collect()
        }),
        seen(&bf, rw_seen),
        seen(&af, rw_seen),
    );
    let callbacks = name_changes(
        per_name_means(&bf, window, |w| {
            w.timers
                .iter()
                .map(|t| (t.callback.clone(), t.count))
                .collect()
        }),
        per_name_means(&af, window, |w| {
            w.timers
                .iter()
                .map(|t| (t.callback.clone(), t.count))
                .collect()
        }),
        seen(&bf, cb_seen),
        seen(&af, cb_seen),
    );
    let exits_seen = |r: &WindowRecord| !r.kvm_exits.is_empty();
    let exits = name_changes(
        per_name_means(&bf, window, exit_counts),
        per_name_means(&af, window, exit_counts),
        seen(&bf, exits_seen),
        seen(&af, exits_seen),
    );
    let triple = |w: &WindowRecord| [w.timer, w.read, w.write];
    let rows = (0..b.windows.len().max(a.windows.len()))
        .map(|i| Row {
            index: i,
            before: b.windows.get(i).map(|w| triple(w)),
            after: a.windows.get(i).map(|w| triple(w)),
        })
        .collect();
    VmComparison {
        before: b.name.to_string(),
        after: a.name.to_string(),
        window_seconds: window,
        before_windows: bf.len(),
        after_windows: af.len(),
        counts,
        devices,
        callbacks,
        exits,
        rows,
    }
}

fn exit_counts(w: &WindowRecord) -> Vec<(String, u64)> {
    w.kvm_exits
        .iter()
        .map(|e| (e.reason.clone(), e.count))
        .collect()
}

/// Compares two recordings: VMs paired by `pairs`, else by name, else (one VM on each side)
/// the one with the other. Means skip each VM's first `settle` seconds (boot).
pub fn compare(
    before: &[WindowRecord],
    after: &[WindowRecord],
    pairs: &[Pair],
    settle: f64,
) -> Comparison {
    let b = group_by_vm(before);
    let a = group_by_vm(after);
    let mut used_b = vec![false; b.len()];
    let mut used_a = vec![false; a.len()];
    let mut vms = Vec::new();
    let mut pair_up = |bi: usize, ai: usize, vms: &mut Vec<VmComparison>| {
        used_b[bi] = true;
        used_a[ai] = true;
        vms.push(compare_pair(&b[bi], &a[ai], settle));
    };
    if !pairs.is_empty() {
        for p in pairs {
            if let (Some(bi), Some(ai)) = (
                b.iter().position(|g| g.name == p.before),
                a.iter().position(|g| g.name == p.after),
            ) {
                pair_up(bi, ai, &mut vms);
            }
        }
    } else if b.len() == 1 && a.len() == 1 {
        pair_up(0, 0, &mut vms);
    } else {
        for (bi, bg) in b.iter().enumerate() {
            if let Some(ai) = a.iter().position(|ag| ag.name == bg.name) {
                pair_up(bi, ai, &mut vms);
            }
        }
    }
    let unpaired = |groups: &[VmWindows<'_>], used: &[bool]| {
        groups
            .iter()
            .zip(used)
            .filter(|(_, u)| !**u)
            .map(|(g, _)| g.name.to_string())
            .collect()
    };
    Comparison {
        unpaired_before: unpaired(&b, &used_b),
        unpaired_after: unpaired(&a, &used_a),
        vms,
    }
}

fn fmt_mean(v: Option<f64>, cpu: bool) -> String {
    match v {
        None => "n/a".into(),
        Some(v) if cpu => format!("{v:.2}"),
        Some(v) => thousands(Some(v.round() as u64)),
    }
}

fn fmt_change(c: Option<f64>) -> String {
    c.map_or("".into(), |c| format!("{c:+.0}%"))
}

/// The comparison for people.
pub fn render_text(c: &Comparison) -> String {
    let mut out = String::new();
    for vm in &c.vms {
        let _ = writeln!(
            out,
            "{} → {}  ({} → {} full windows of {} s)",
            clean(&vm.before),
            clean(&vm.after),
            vm.before_windows,
            vm.after_windows,
            vm.window_seconds
        );
        let _ = writeln!(
            out,
            "  {:<9} │ {:>9} {:>9} {:>9} │ {:>9} {:>9} {:>9}",
            "Interval", "Timer", "Read", "Write", "Timer", "Read", "Write"
        );
        let cell = |t: Option<[Option<u64>; 3]>| match t {
            None => format!("{:>9} {:>9} {:>9}", "", "", ""),
            Some([t, r, w]) => format!(
                "{:>9} {:>9} {:>9}",
                thousands(t),
                thousands(r),
                thousands(w)
            ),
        };
        for row in &vm.rows {
            let _ = writeln!(
                out,
                "  {:<9} │ {} │ {}",
                format!("{:03}", row.index),
                cell(row.before),
                cell(row.after)
            );
        }
        let _ = writeln!(
            out,
            "  per {} s window (full windows)   before      after   change",
            vm.window_seconds
        );
        for m in &vm.counts {
            if m.before.is_none() && m.after.is_none() && m.name != "read" && m.name != "write" {
                // Counted on neither side (vCPU wakeups under TCG, CPU by role in an old
                // recording): nothing to compare.
                continue;
            }
            let cpu = m.name.starts_with("cpu_");
            let _ = writeln!(
                out,
                "    {:<26} {:>10} {:>10} {:>8}",
                m.name,
                fmt_mean(m.before, cpu),
                fmt_mean(m.after, cpu),
                fmt_change(m.change_percent)
            );
        }
        for (title, list) in [
            ("devices (reads+writes)", &vm.devices),
            ("timer callbacks", &vm.callbacks),
            ("KVM exits by reason", &vm.exits),
        ] {
            if list.is_empty() {
                continue;
            }
            let _ = writeln!(out, "  {title}");
            for m in list.iter().take(12) {
                let _ = writeln!(
                    out,
                    "    {:<26} {:>10} {:>10} {:>8}",
                    clean(&m.name),
                    fmt_mean(m.before, false),
                    fmt_mean(m.after, false),
                    fmt_change(m.change_percent)
                );
            }
        }
        out.push('\n');
    }
    for (side, names) in [("before", &c.unpaired_before), ("after", &c.unpaired_after)] {
        if !names.is_empty() {
            let _ = writeln!(
                out,
                "only {side}: {} (pair with --pair BEFORE=AFTER)",
                crate::text::clean_list(names)
            );
        }
    }
    if c.vms.is_empty() {
        out.push_str("no VM pairs: name them with --pair BEFORE=AFTER\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{DeviceCount, TimerCallbackCount};

    fn w(name: &str, n: u64, timer: u64, uhci: Option<u64>) -> WindowRecord {
        let mut r = crate::record::tests::window(name, 1, n, 30.0);
        r.timer = Some(timer);
        r.fd_wakeups = Some(10);
        r.read = uhci.map(|u| u + 60);
        r.write = uhci.map(|_| 500);
        r.cpu_seconds = Some(if timer > 1000 { 1.62 } else { 0.06 });
        r.sources.read = "usdt".into();
        r.sources.write = "usdt".into();
        r.sources.timer_callbacks = "symbols".into();
        r.devices = uhci
            .map(|u| {
                vec![DeviceCount {
                    name: "uhci".into(),
                    owner: None,
                    read: u,
                    write: 0,
                }]
            })
            .unwrap_or_default();
        if timer > 1000 {
            r.timers = vec![TimerCallbackCount {
                callback: "uhci_frame_timer".into(),
                count: 29_250,
            }];
        }
        r
    }

    /// Recorded under KVM: the same boot sector with its PIT at 1,000 Hz, then at 100 Hz.
    #[test]
    fn a_kvm_guest_s_own_tick_slowed_down() {
        let text = include_str!("../../tests/fixtures/records/kvm-pit-and-seabios.jsonl");
        let (records, _) = crate::record::read_records(text.as_bytes()).unwrap();
        let pick = |name: &str| -> Vec<WindowRecord> {
            records
                .iter()
                .filter(|r| r.vm.name == name)
                .cloned()
                .collect()
        };
        let pair = "pit1000=pit100".parse::<Pair>().unwrap();
        let c = compare(&pick("pit1000"), &pick("pit100"), &[pair], 0.0);
        let vm = &c.vms[0];
        let by = |name: &str| vm.counts.iter().find(|m| m.name == name).unwrap();
        let wakeups = by("vcpu_wakeups");
        assert!(
            (wakeups.change_percent.unwrap() + 90.0).abs() < 1.0,
            "{wakeups:?}"
        );
        let vcpu_cpu = by("cpu_vcpu_seconds");
        assert!(vcpu_cpu.change_percent.unwrap() < -80.0, "{vcpu_cpu:?}");
        let text = render_text(&c);
        crate::testing::assert_contains(&text, "vcpu_wakeups");
        // Exits are not fired on that host: no list, and no row for what neither side has.
        assert!(vm.exits.is_empty());
        assert!(!text.contains("KVM exits"), "{text}");
    }

    #[test]
    fn the_pulsar_story_before_and_after_disabling_usb() {
        let before: Vec<WindowRecord> = (0..3).map(|n| w("win7", n, 57_990, Some(738))).collect();
        let after: Vec<WindowRecord> = (0..3).map(|n| w("win7", n, 267, None)).collect();
        let c = compare(&before, &after, &[], 0.0);
        assert_eq!(c.vms.len(), 1);
        let vm = &c.vms[0];
        let timer = &vm.counts[0];
        assert_eq!((timer.before, timer.after), (Some(57_990.0), Some(267.0)));
        assert!((timer.change_percent.unwrap() + 99.54).abs() < 0.01);
        // Without the device, its reads are 0 (the source could see it), not unknown.
        let uhci = vm.devices.iter().find(|d| d.name == "uhci").unwrap();
        assert_eq!(
            (uhci.before, uhci.after, uhci.change_percent),
            (Some(738.0), Some(0.0), Some(-100.0))
        );
        assert_eq!(vm.callbacks[0].name, "uhci_frame_timer");
        let text = render_text(&c);
        crate::testing::assert_contains(&text, "win7 → win7");
        crate::testing::assert_contains(&text, "57,990        267    -100%");
        assert!(
            text.contains(
                "000       │    57,990       798       500 │       267       n/a       n/a"
            ),
            "{text}"
        );
    }

    #[test]
    fn pairing_by_name_by_flag_or_the_only_two() {
        let before = vec![w("a", 0, 100, None), w("b", 0, 100, None)];
        let after = vec![w("b", 0, 50, None), w("c", 0, 10, None)];
        let c = compare(&before, &after, &[], 0.0);
        assert_eq!(c.vms.len(), 1);
        assert_eq!(
            (c.unpaired_before.clone(), c.unpaired_after.clone()),
            (vec!["a".to_string()], vec!["c".to_string()])
        );
        let c = compare(&before, &after, &["a=c".parse().unwrap()], 0.0);
        assert_eq!(
            (c.vms[0].before.as_str(), c.vms[0].after.as_str()),
            ("a", "c")
        );
        let c = compare(&before[..1], &after[1..], &[], 0.0);
        assert_eq!(
            (c.vms[0].before.as_str(), c.vms[0].after.as_str()),
            ("a", "c")
        );
        assert!("nope".parse::<Pair>().is_err());
    }

    #[test]
    fn counts_without_a_source_stay_unknown() {
        let mut before = vec![w("x", 0, 100, None)];
        before[0].read = None;
        let after = vec![w("x", 0, 100, Some(5))];
        let c = compare(&before, &after, &[], 0.0);
        let read = &c.vms[0].counts[1];
        assert_eq!((read.before, read.change_percent), (None, None));
    }
}
