//! What the screens show, computed from a [`LiveSnapshot`]: per-VM rates, ranking, filtering,
//! and the text formats. Pure functions, no terminal.

use std::{borrow::Borrow, cmp::Ordering};

use crate::{
    analysis::report::thousands,
    record::{DeviceCount, WindowRecord},
    windows::live::{LiveSnapshot, LiveVm},
};

pub use crate::text::clean;

/// `count` events over `seconds` as a rate; `None` when the count is unavailable or the span
/// is empty (there is no rate yet, which is not a rate of 0).
pub fn rate(count: Option<u64>, seconds: f64) -> Option<f64> {
    let count = count?;
    (seconds > 0.0).then(|| count as f64 / seconds)
}

/// CPU seconds used over `seconds` of wall time, as a percentage of one core.
pub fn cpu_percent(cpu_seconds: Option<f64>, seconds: f64) -> Option<f64> {
    let cpu = cpu_seconds?;
    (seconds > 0.0).then(|| cpu / seconds * 100.0)
}

/// A rate in at most 7 columns: `0`, `0.03`, `8.9`, `1,933`, `123k`, `4.5M`.
pub fn fmt_rate(v: f64) -> String {
    if !v.is_finite() || v < 0.0 {
        return "?".into();
    }
    if v == 0.0 {
        "0".into()
    } else if v < 1.0 {
        format!("{v:.2}")
    } else if v < 99.95 {
        format!("{v:.1}")
    } else if v < 99_999.5 {
        thousands(Some(v.round() as u64))
    } else if v < 999_500.0 {
        format!("{:.0}k", v / 1e3)
    } else if v < 999_950_000.0 {
        format!("{:.1}M", v / 1e6)
    } else {
        format!("{:.1}G", v / 1e9)
    }
}

/// A CPU percentage: `5.4`, `113`.
pub fn fmt_percent(v: f64) -> String {
    if v < 99.95 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// What a ranking is by.
///
/// By default, CPU: what the host pays for the VM, the process's CPU clock (exact, not
/// sampled) with its guest time. It ranks both ways a guest keeps a host busy: waking it
/// (a guest tick that wakes its vCPU a thousand times a second, a device model that polls)
/// and never letting go (a guest spinning in a PXE ROM's poll loop wakes nothing and takes a
/// core). The wakeup columns then say which it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortKey {
    #[default]
    Cpu,
    Wakeups,
    Timer,
    Vcpu,
    Read,
    Write,
    Fd,
    Name,
}

impl SortKey {
    pub const ALL: [SortKey; 8] = [
        SortKey::Cpu,
        SortKey::Wakeups,
        SortKey::Timer,
        SortKey::Vcpu,
        SortKey::Read,
        SortKey::Write,
        SortKey::Fd,
        SortKey::Name,
    ];

    /// The next key in the `s` cycle.
    pub fn next(self) -> SortKey {
        let i = Self::ALL.iter().position(|k| *k == self).unwrap_or(0);
        Self::ALL[(i + 1) % Self::ALL.len()]
    }

    pub fn label(self) -> &'static str {
        match self {
            SortKey::Wakeups => "wakeups",
            SortKey::Timer => "timer",
            SortKey::Vcpu => "vcpu",
            SortKey::Read => "read",
            SortKey::Write => "write",
            SortKey::Fd => "fd",
            SortKey::Cpu => "cpu",
            SortKey::Name => "name",
        }
    }
}

/// Per-second rates of one VM over one window; `None` = unavailable.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    /// Host wakeups: `timer + fd + vcpu`, those of them that are counted.
    pub wakeups: Option<f64>,
    pub timer: Option<f64>,
    /// vCPU wakeups from guest halts (KVM).
    pub vcpu: Option<f64>,
    pub read: Option<f64>,
    pub write: Option<f64>,
    pub fd: Option<f64>,
    pub cpu_percent: Option<f64>,
}

/// The host wakeups of a window: the counted ones of its QEMU timer, fd and vCPU wakeups;
/// `None` when none is counted.
pub fn host_wakeups(timer: Option<u64>, fd: Option<u64>, vcpu: Option<u64>) -> Option<u64> {
    [timer, fd, vcpu].into_iter().flatten().reduce(|a, b| a + b)
}

impl Rates {
    pub fn of_record(r: &WindowRecord) -> Rates {
        let s = r.seconds;
        Rates {
            wakeups: rate(host_wakeups(r.timer, r.fd_wakeups, r.vcpu_wakeups), s),
            timer: rate(r.timer, s),
            vcpu: rate(r.vcpu_wakeups, s),
            read: rate(r.read, s),
            write: rate(r.write, s),
            fd: rate(r.fd_wakeups, s),
            cpu_percent: cpu_percent(r.cpu_seconds, s),
        }
    }

    pub fn of_running(vm: &LiveVm) -> Rates {
        let s = vm.running_elapsed;
        let c = &vm.running;
        Rates {
            wakeups: rate(host_wakeups(c.timer, c.fd_wakeups, c.vcpu_wakeups), s),
            timer: rate(c.timer, s),
            vcpu: rate(c.vcpu_wakeups, s),
            read: rate(c.read, s),
            write: rate(c.write, s),
            fd: rate(c.fd_wakeups, s),
            cpu_percent: cpu_percent(vm.running_cpu_seconds, s),
        }
    }

    fn get(&self, key: SortKey) -> Option<f64> {
        match key {
            SortKey::Wakeups => self.wakeups,
            SortKey::Timer => self.timer,
            SortKey::Vcpu => self.vcpu,
            SortKey::Read => self.read,
            SortKey::Write => self.write,
            SortKey::Fd => self.fd,
            SortKey::Cpu => self.cpu_percent,
            SortKey::Name => None,
        }
    }
}

/// Which window a VM's ranking rates come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// Its last closed window.
    Closed { window: u64, partial: bool },
    /// No closed window yet: the running window so far.
    Running,
}

/// The rates a VM is ranked by: its last closed window, else its running window.
pub fn ranking_rates(vm: &LiveVm) -> (Rates, Basis) {
    match vm.history.last() {
        Some(r) => (
            Rates::of_record(r),
            Basis::Closed {
                window: r.window,
                partial: r.partial,
            },
        ),
        None => (Rates::of_running(vm), Basis::Running),
    }
}

/// One line of the ranking.
#[derive(Debug, Clone)]
pub struct VmRow<'a> {
    pub vm: &'a LiveVm,
    /// 1-based position in the ranking of all VMs (filtering does not renumber).
    pub rank: usize,
    /// Sanitized.
    pub name: String,
    pub rates: Rates,
    pub basis: Basis,
}

/// Descending by `key` with unavailable values last; by name for [`SortKey::Name`]; ties by
/// name, then PID.
fn compare(a: &VmRow<'_>, b: &VmRow<'_>, key: SortKey) -> Ordering {
    let by_name = || {
        a.name
            .to_lowercase()
            .cmp(&b.name.to_lowercase())
            .then_with(|| a.vm.key.cmp(&b.vm.key))
    };
    if key == SortKey::Name {
        return by_name();
    }
    match (a.rates.get(key), b.rates.get(key)) {
        (Some(x), Some(y)) => y.total_cmp(&x),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
    .then_with(by_name)
}

/// Does a (sanitized) VM name match the filter? Case-insensitive substring; empty matches all.
pub fn matches(name: &str, filter: &str) -> bool {
    filter.is_empty() || name.to_lowercase().contains(&filter.to_lowercase())
}

/// Every VM ranked by `key`, then those whose name matches `filter`.
pub fn ranked_rows<'a>(snapshot: &'a LiveSnapshot, key: SortKey, filter: &str) -> Vec<VmRow<'a>> {
    let mut rows: Vec<VmRow<'a>> = snapshot
        .vms
        .iter()
        .map(|vm| {
            let (rates, basis) = ranking_rates(vm);
            VmRow {
                vm,
                rank: 0,
                name: display_name(&vm.identity),
                rates,
                basis,
            }
        })
        .collect();
    rows.sort_by(|a, b| compare(a, b, key));
    for (i, r) in rows.iter_mut().enumerate() {
        r.rank = i + 1;
    }
    rows.retain(|r| matches(&r.name, filter));
    rows
}

/// A VM's name for the list: its name, and an OpenStack guest's Nova display name after it
/// (`instance-0000002a (web-frontend-01)`); sanitized.
pub fn display_name(id: &crate::identity::discovery::VmIdentity) -> String {
    match id
        .libvirt
        .as_ref()
        .and_then(|l| l.nova.as_ref()?.name.as_deref())
    {
        Some(nova) if nova != id.name => format!("{} ({})", clean(&id.name), clean(nova)),
        _ => clean(&id.name),
    }
}

/// Sum of the ranking rates over all VMs: what the host pays. A total is `None` only when no
/// VM has that count.
pub fn host_totals(snapshot: &LiveSnapshot) -> Rates {
    fn add(total: &mut Option<f64>, v: Option<f64>) {
        if let Some(v) = v {
            *total = Some(total.unwrap_or(0.0) + v);
        }
    }
    let mut t = Rates::default();
    for vm in &snapshot.vms {
        let (r, _) = ranking_rates(vm);
        add(&mut t.wakeups, r.wakeups);
        add(&mut t.timer, r.timer);
        add(&mut t.vcpu, r.vcpu);
        add(&mut t.read, r.read);
        add(&mut t.write, r.write);
        add(&mut t.fd, r.fd);
        add(&mut t.cpu_percent, r.cpu_percent);
    }
    t
}

/// The busiest device of a window by reads + writes.
pub fn top_device(r: &WindowRecord) -> Option<&DeviceCount> {
    r.devices
        .iter()
        .max_by(|a, b| {
            (a.read + a.write)
                .cmp(&(b.read + b.write))
                // Equal totals: the first listed wins (the collector lists busiest first).
                .then_with(|| b.name.cmp(&a.name))
        })
        .filter(|d| d.read + d.write > 0)
}

/// Timer rate of a closed window.
fn history_value(r: &WindowRecord) -> Option<f64> {
    cpu_percent(r.cpu_seconds, r.seconds)
}

/// The highest CPU percentage among the last `width` closed windows of every VM: the top of the
/// scale all sparklines share.
pub fn sparkline_scale(vms: &[LiveVm], width: usize) -> f64 {
    vms.iter()
        .flat_map(|vm| &vm.history[vm.history.len().saturating_sub(width)..])
        .filter_map(|r| history_value(r))
        .fold(0.0, f64::max)
}

/// CPU percentage of each of the last `width` closed windows, as block characters on a log
/// scale from 0 to `max` (shared by all VMs, so 0.2 % looks low next to 30 % yet a spike
/// still shows). A window without a CPU figure is a space; any activity is at least the second
/// bar, so it never looks like zero.
pub fn sparkline<R: Borrow<WindowRecord>>(history: &[R], width: usize, max: f64) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let top = (1.0 + max).ln();
    history[history.len().saturating_sub(width)..]
        .iter()
        .map(|r| match history_value(r.borrow()) {
            None => ' ',
            Some(v) if v <= 0.0 || top <= 0.0 => BARS[0],
            Some(v) => {
                let level = ((1.0 + v).ln() / top).clamp(0.0, 1.0);
                BARS[1 + (level * 6.0).round() as usize]
            }
        })
        .collect()
}

/// How far the running window is, 0..=1.
pub fn window_progress(snapshot: &LiveSnapshot) -> f64 {
    if snapshot.window_secs <= 0.0 {
        return 0.0;
    }
    let into = snapshot.t - snapshot.window as f64 * snapshot.window_secs;
    (into / snapshot.window_secs).clamp(0.0, 1.0)
}

/// A snapshot that only fills the channel until the collector's first refresh.
pub fn is_placeholder(snapshot: &LiveSnapshot) -> bool {
    snapshot.window_secs <= 0.0 && snapshot.vms.is_empty() && snapshot.t == 0.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tui::fixtures;

    #[test]
    fn rate_math() {
        assert_eq!(rate(Some(57_990), 30.0), Some(1_933.0));
        assert_eq!(rate(Some(267), 30.0), Some(8.9));
        assert_eq!(rate(None, 30.0), None);
        // No time covered yet: no rate, not a rate of 0.
        assert_eq!(rate(Some(5), 0.0), None);
        assert_eq!(cpu_percent(Some(1.62), 30.0), Some(5.4));
        assert_eq!(cpu_percent(None, 30.0), None);
        assert_eq!(cpu_percent(Some(1.0), 0.0), None);
    }

    #[test]
    fn rates_of_a_partial_window_use_its_own_seconds() {
        let snap = fixtures::snapshot();
        let vm = fixtures::vm(&snap, "batch-07");
        let last = vm.history.last().unwrap();
        assert!(last.partial);
        let (rates, basis) = ranking_rates(vm);
        assert_eq!(
            basis,
            Basis::Closed {
                window: last.window,
                partial: true
            }
        );
        assert_eq!(rates.timer, Some(last.timer.unwrap() as f64 / last.seconds));
    }

    #[test]
    fn running_rates_before_the_first_closed_window() {
        let snap = fixtures::snapshot();
        let vm = fixtures::vm(&snap, "fresh-boot");
        assert!(vm.history.is_empty());
        let (rates, basis) = ranking_rates(vm);
        assert_eq!(basis, Basis::Running);
        let expect = vm.running.timer.unwrap() as f64 / vm.running_elapsed;
        assert_eq!(rates.timer, Some(expect));
        assert_eq!(
            rates.cpu_percent,
            Some(vm.running_cpu_seconds.unwrap() / vm.running_elapsed * 100.0)
        );
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_rate(0.0), "0");
        assert_eq!(fmt_rate(0.033), "0.03");
        assert_eq!(fmt_rate(8.9), "8.9");
        assert_eq!(fmt_rate(99.96), "100");
        assert_eq!(fmt_rate(1_933.0), "1,933");
        assert_eq!(fmt_rate(99_999.4), "99,999");
        assert_eq!(fmt_rate(123_456.0), "123k");
        assert_eq!(fmt_rate(4_500_000.0), "4.5M");
        assert_eq!(fmt_rate(f64::NAN), "?");
        assert_eq!(fmt_percent(5.4), "5.4");
        assert_eq!(fmt_percent(113.2), "113");
    }

    fn names(rows: &[VmRow<'_>]) -> Vec<String> {
        rows.iter().map(|r| r.name.clone()).collect()
    }

    #[test]
    fn sorting_by_every_key() {
        let snap = fixtures::snapshot();
        let by = |k| names(&ranked_rows(&snap, k, ""));
        let orders = [
            (
                SortKey::Timer,
                "noisy-usb fresh-boot legacy-ubuntu quiet batch-07",
            ),
            // legacy-ubuntu has no read/write source: unavailable sorts last, never as 0.
            (
                SortKey::Read,
                "fresh-boot noisy-usb batch-07 quiet legacy-ubuntu",
            ),
            (
                SortKey::Cpu,
                "noisy-usb fresh-boot legacy-ubuntu quiet batch-07",
            ),
            // The KVM guest's vCPU wakeups count with its QEMU's timer and fd wakeups.
            (
                SortKey::Wakeups,
                "noisy-usb legacy-ubuntu fresh-boot batch-07 quiet",
            ),
            (
                SortKey::Name,
                "batch-07 fresh-boot legacy-ubuntu noisy-usb quiet",
            ),
        ];
        for (key, order) in orders {
            assert_eq!(by(key).join(" "), order, "{key:?}");
        }
        assert_eq!(by(SortKey::Write).last().unwrap(), "legacy-ubuntu");
        assert_eq!(by(SortKey::Fd)[0], "noisy-usb");
        assert_eq!(by(SortKey::Vcpu)[0], "legacy-ubuntu");
        let ranks: Vec<usize> = ranked_rows(&snap, SortKey::Timer, "")
            .iter()
            .map(|r| r.rank)
            .collect();
        assert_eq!(ranks, [1, 2, 3, 4, 5]);
    }

    /// Recorded under KVM: the guest whose only activity is its own 1 kHz PIT costs its QEMU
    /// a third of a core, all of it in its vCPU thread, and none of it reaches QEMU's event
    /// loop; it ranks first by default and by wakeups, SeaBIOS idling last.
    #[test]
    fn a_kvm_guest_s_own_timer_ranks_it_first() {
        let snap = fixtures::recorded_kvm();
        let rows = ranked_rows(&snap, SortKey::default(), "");
        assert_eq!(names(&rows), ["pit1000", "pit100", "seabios"]);
        assert_eq!(
            names(&ranked_rows(&snap, SortKey::Wakeups, "")),
            ["pit1000", "pit100", "seabios"]
        );
        let pit = &rows[0];
        assert_eq!((pit.rates.timer, pit.rates.fd), (Some(0.0), Some(0.0)));
        let vcpu = pit.rates.vcpu.unwrap();
        assert!((970.0..=1030.0).contains(&vcpu), "{vcpu}");
        assert_eq!(pit.rates.wakeups, pit.rates.vcpu);
        let last = pit.vm.history.last().unwrap();
        let split = last.cpu_by_role.unwrap();
        assert!(split.vcpu / last.cpu_seconds.unwrap() >= 0.9, "{split:?}");
    }

    #[test]
    fn sort_cycle_visits_every_key_once() {
        let mut k = SortKey::default();
        let mut seen = vec![k];
        for _ in 1..SortKey::ALL.len() {
            k = k.next();
            seen.push(k);
        }
        assert_eq!(seen, SortKey::ALL);
        assert_eq!(k.next(), SortKey::Cpu);
    }

    #[test]
    fn filtering_keeps_ranks_and_ignores_case() {
        let snap = fixtures::snapshot();
        let rows = ranked_rows(&snap, SortKey::Timer, "QUIET");
        assert_eq!(names(&rows), ["quiet"]);
        assert_eq!(rows[0].rank, 4);
        assert_eq!(ranked_rows(&snap, SortKey::Timer, "u").len(), 3);
        assert!(ranked_rows(&snap, SortKey::Timer, "nothing").is_empty());
        assert!(matches("anything", ""));
    }

    #[test]
    fn host_totals_sum_available_rates_only() {
        let snap = fixtures::snapshot();
        let t = host_totals(&snap);
        let sum = |rate: fn(&Rates) -> Option<f64>| -> f64 {
            snap.vms
                .iter()
                .filter_map(|vm| rate(&ranking_rates(vm).0))
                .sum()
        };
        assert_eq!(t.timer, Some(sum(|r| r.timer)));
        assert_eq!(t.read, Some(sum(|r| r.read)));
        assert_eq!(host_totals(&LiveSnapshot::default()).timer, None);
    }

    #[test]
    fn top_device_is_busiest_by_reads_plus_writes() {
        let mut r = (**fixtures::snapshot().vms[0].history.last().unwrap()).clone();
        r.devices = vec![
            DeviceCount {
                name: "uhci".into(),
                owner: None,
                read: 700,
                write: 0,
            },
            DeviceCount {
                name: "apic-msi".into(),
                owner: None,
                read: 0,
                write: 1_400,
            },
        ];
        assert_eq!(top_device(&r).unwrap().name, "apic-msi");
        r.devices.clear();
        assert!(top_device(&r).is_none());
    }

    #[test]
    fn sparkline_is_log_scaled_to_a_shared_maximum() {
        let mut h: Vec<WindowRecord> = fixtures::snapshot().vms[0]
            .history
            .iter()
            .map(|r| (**r).clone())
            .collect();
        h.truncate(5);
        for (r, cpu) in h
            .iter_mut()
            .zip([Some(0.0), Some(0.06), None, Some(9.3), Some(0.3)])
        {
            r.cpu_seconds = cpu;
            r.seconds = 30.0;
        }
        // 0 %, 0.2 %, n/a, 31 %, 1 % against a top of 31 %.
        assert_eq!(sparkline(&h, 8, 31.0), "▁▂ █▃");
        assert_eq!(sparkline(&h, 2, 31.0), "█▃");
        // Against a much busier neighbour (4 cores) the same windows sit lower.
        assert_eq!(sparkline(&h, 8, 400.0), "▁▂ ▅▃");
        assert_eq!(sparkline::<WindowRecord>(&[], 5, 10.0), "");
        assert_eq!(sparkline(&h[..1], 5, 0.0), "▁");
    }

    #[test]
    fn sparkline_scale_is_the_busiest_recent_window_of_any_vm() {
        let snap = fixtures::snapshot();
        let noisy = fixtures::vm(&snap, "noisy-usb");
        let expect = noisy
            .history
            .iter()
            .filter_map(|r| history_value(r))
            .fold(0.0, f64::max);
        assert_eq!(sparkline_scale(&snap.vms, 12), expect);
        assert_eq!(sparkline_scale(&[], 12), 0.0);
    }

    #[test]
    fn progress_through_the_window() {
        let mut s = fixtures::snapshot();
        s.t = 377.3;
        s.window = 12;
        s.window_secs = 30.0;
        assert!((window_progress(&s) - 17.3 / 30.0).abs() < 1e-9);
        assert_eq!(window_progress(&LiveSnapshot::default()), 0.0);
        assert!(is_placeholder(&LiveSnapshot::default()));
        assert!(!is_placeholder(&s));
    }

    #[test]
    fn clean_neutralizes_escapes_and_invisible_characters() {
        let hostile = "\x1b[2J\x1b]0;pwned\x07evil\u{202E}gnp.exe\u{200B}\u{9B}31m";
        let c = clean(hostile);
        assert!(!c.chars().any(crate::text::is_unsafe), "{c:?}");
        assert_eq!(c, "�[2J�]0;pwned�evil�gnp.exe��31m");
        assert_eq!(clean("plain-name_01 ünï"), "plain-name_01 ünï");
        let long = "x".repeat(1000);
        assert_eq!(clean(&long).chars().count(), 257);
    }
}
