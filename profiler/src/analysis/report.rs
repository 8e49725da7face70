//! `profiler report`: recordings rendered as Project Pulsar tables, one per VM.

use std::fmt::Write as _;

use crate::record::{PartialReason, WindowRecord};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Table,
    Csv,
    Markdown,
}

/// All windows of one VM, in window order.
#[derive(Debug)]
pub struct VmWindows<'a> {
    pub name: &'a str,
    pub pid: u32,
    pub accel: &'a str,
    pub uuid: Option<&'a str>,
    pub windows: Vec<&'a WindowRecord>,
}

/// Seconds since the epoch of an RFC 3339 time.
pub fn epoch_secs(rfc3339: &str) -> Option<f64> {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .ok()
        .map(|t| t.timestamp_millis() as f64 / 1000.0)
}

impl<'a> VmWindows<'a> {
    /// When the VM started (seconds since the epoch): its process's start where the records
    /// say it (`vm.started`), else the start of its first window (a VM already running then
    /// is taken as starting with the recording).
    pub fn started(&self) -> Option<f64> {
        let first = self.windows.first()?;
        first
            .vm
            .started
            .as_deref()
            .and_then(epoch_secs)
            .or_else(|| epoch_secs(&first.start))
    }

    /// Whether [`Self::started`] is the process's start, not its first window's.
    pub fn start_known(&self) -> bool {
        self.windows.first().is_some_and(|w| w.vm.started.is_some())
    }

    /// Its windows that start at least `settle` seconds after it started (boot left out).
    pub fn after_settle(&self, settle: f64) -> Vec<&'a WindowRecord> {
        let started = self.started();
        self.windows
            .iter()
            .copied()
            .filter(|w| match (started, epoch_secs(&w.start)) {
                (Some(started), Some(s)) => s - started >= settle - 1e-3,
                _ => true,
            })
            .collect()
    }
}

/// Groups records by VM (name + pid), in order of first appearance.
pub fn group_by_vm(records: &[WindowRecord]) -> Vec<VmWindows<'_>> {
    let mut groups: Vec<VmWindows<'_>> = Vec::new();
    for r in records {
        match groups
            .iter_mut()
            .find(|g| g.name == r.vm.name && g.pid == r.vm.pid)
        {
            Some(g) => g.windows.push(r),
            None => groups.push(VmWindows {
                name: &r.vm.name,
                pid: r.vm.pid,
                accel: r.vm.accel.as_str(),
                uuid: r.vm.uuid.as_deref(),
                windows: vec![r],
            }),
        }
    }
    for g in &mut groups {
        g.windows.sort_by_key(|w| w.window);
    }
    groups
}

/// `1234567` -> `1,234,567`; `None` -> `n/a`.
pub fn thousands(n: Option<u64>) -> String {
    let Some(n) = n else {
        return "n/a".into();
    };
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn cpu(c: Option<f64>) -> String {
    c.map_or("n/a".into(), |c| format!("{c:.2}"))
}

fn reason_text(r: &WindowRecord) -> String {
    let why = match r.partial_reason {
        Some(PartialReason::VmStarted) => "VM started mid-window",
        Some(PartialReason::VmExited) => "VM exited mid-window",
        Some(PartialReason::ProfilerStopped) => "profiler stopped mid-window",
        None => "partial",
    };
    format!("{why}, {:.1} s covered", r.seconds)
}

fn interval(r: &WindowRecord) -> String {
    format!("{:03}{}", r.window, if r.partial { "*" } else { "" })
}

/// Renders a report of `records` in `format`.
pub fn render(records: &[WindowRecord], format: ReportFormat) -> String {
    let groups = group_by_vm(records);
    match format {
        ReportFormat::Table => render_table(&groups),
        ReportFormat::Markdown => render_markdown(&groups),
        ReportFormat::Csv => render_csv(records),
    }
}

fn heading(g: &VmWindows<'_>) -> String {
    let mut h = format!("VM {} (pid {}, {})", clean(g.name), g.pid, clean(g.accel));
    if let Some(u) = g.uuid {
        let _ = write!(h, " uuid {}", clean(u));
    }
    h
}

fn sources_line(g: &VmWindows<'_>) -> Vec<String> {
    let Some(last) = g.windows.last() else {
        return Vec::new();
    };
    let mut lines = vec![format!("timer source: {}", clean(&last.sources.timer))];
    if last.sources.read == last.sources.write {
        lines.push(format!("read/write source: {}", clean(&last.sources.read)));
    } else {
        lines.push(format!("read source: {}", clean(&last.sources.read)));
        lines.push(format!("write source: {}", clean(&last.sources.write)));
    }
    lines
}

const HEADERS: [&str; 5] = [
    "30 Secs Interval",
    "Timer Events",
    "Read Events",
    "Write Events",
    "CPU s",
];

fn headers(window_secs: f64) -> [String; 5] {
    let mut h = HEADERS.map(String::from);
    h[0] = format!("{} Secs Interval", window_secs.round() as u64);
    h
}

fn rows(g: &VmWindows<'_>) -> Vec<[String; 5]> {
    g.windows
        .iter()
        .map(|w| {
            // Counts scaled from a duty-cycled share of the window (`--max-overhead`).
            let count = |v: Option<u64>| {
                let text = thousands(v);
                if w.estimated && v.is_some() {
                    format!("~{text}")
                } else {
                    text
                }
            };
            [
                interval(w),
                count(w.timer),
                count(w.read),
                count(w.write),
                cpu(w.cpu_seconds),
            ]
        })
        .collect()
}

/// The window length a group was recorded with (its full windows; else its longest).
fn window_secs(g: &VmWindows<'_>) -> f64 {
    g.windows
        .iter()
        .find(|w| !w.partial)
        .or_else(|| {
            g.windows
                .iter()
                .max_by(|a, b| a.seconds.total_cmp(&b.seconds))
        })
        .map_or(30.0, |w| w.seconds)
}

/// Reads/writes per device summed over the VM's windows, busiest first.
fn device_totals(g: &VmWindows<'_>) -> Vec<(String, u64, u64)> {
    let mut totals: Vec<(String, u64, u64)> = Vec::new();
    for d in g.windows.iter().flat_map(|w| &w.devices) {
        let label = d.label();
        match totals.iter_mut().find(|t| t.0 == label) {
            Some(t) => {
                t.1 += d.read;
                t.2 += d.write;
            }
            None => totals.push((label, d.read, d.write)),
        }
    }
    totals.sort_by(|a, b| (b.1 + b.2).cmp(&(a.1 + a.2)).then(a.0.cmp(&b.0)));
    totals
}

/// Counts per name (what `names` lists of each window) summed over the VM's windows, most
/// first.
fn named_totals(
    g: &VmWindows<'_>,
    names: fn(&WindowRecord) -> Vec<(&str, u64)>,
) -> Vec<(String, u64)> {
    let mut totals: Vec<(String, u64)> = Vec::new();
    for (name, n) in g.windows.iter().flat_map(|w| names(w)) {
        match totals.iter_mut().find(|t| t.0 == name) {
            Some(t) => t.1 += n,
            None => totals.push((name.to_string(), n)),
        }
    }
    totals.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    totals
}

fn callbacks_of(w: &WindowRecord) -> Vec<(&str, u64)> {
    w.timers
        .iter()
        .map(|t| (t.callback.as_str(), t.count))
        .collect()
}

fn exits_of(w: &WindowRecord) -> Vec<(&str, u64)> {
    w.kvm_exits
        .iter()
        .map(|e| (e.reason.as_str(), e.count))
        .collect()
}

/// What a KVM guest did itself, beyond its QEMU: its vCPU wakeups, and where its CPU went by
/// thread role (every record that says).
fn guest_lines(g: &VmWindows<'_>) -> Vec<String> {
    let mut lines = Vec::new();
    let secs = covered_seconds(g).max(1e-9);
    let sum = |f: fn(&WindowRecord) -> Option<u64>| -> Option<u64> {
        g.windows.iter().filter_map(|w| f(w)).reduce(|a, b| a + b)
    };
    if let Some(wakeups) = sum(|w| w.vcpu_wakeups) {
        let polls = sum(|w| w.vcpu_halt_polls).unwrap_or(0);
        lines.push(format!(
            "vCPU wakeups from guest halts: {} ({:.1}/s), halt polls: {}",
            thousands(Some(wakeups)),
            wakeups as f64 / secs,
            thousands(Some(polls))
        ));
    } else if let Some(last) = g.windows.last()
        && let Some(why) = last.sources.vcpu_wakeups.strip_prefix("unavailable: ")
    {
        lines.push(format!("vCPU wakeups: n/a ({})", clean(why)));
    }
    let split: Vec<_> = g.windows.iter().filter_map(|w| w.cpu_by_role).collect();
    if !split.is_empty() {
        let total = |f: fn(&crate::record::CpuByRole) -> f64| split.iter().map(f).sum::<f64>();
        lines.push(format!(
            "CPU by thread role ({} windows): vCPU {:.2} s (guest time {:.2} s), device model \
             {:.2} s, other {:.2} s; kernel workers {:.2} s",
            split.len(),
            total(|r| r.vcpu),
            total(|r| r.vcpu_guest),
            total(|r| r.device_model),
            total(|r| r.other),
            total(|r| r.kernel_workers),
        ));
    }
    lines
}

fn covered_seconds(g: &VmWindows<'_>) -> f64 {
    g.windows.iter().map(|w| w.seconds).sum()
}

/// Rows of the per-device table: name, reads, writes, reads/s, writes/s.
fn device_rows(g: &VmWindows<'_>) -> Vec<[String; 5]> {
    let secs = covered_seconds(g).max(1e-9);
    device_totals(g)
        .into_iter()
        .map(|(name, r, w)| {
            [
                clean(&name),
                thousands(Some(r)),
                thousands(Some(w)),
                format!("{:.1}", r as f64 / secs),
                format!("{:.1}", w as f64 / secs),
            ]
        })
        .collect()
}

/// Rows of a per-name table: name, count, count/s.
fn named_rows(g: &VmWindows<'_>, names: fn(&WindowRecord) -> Vec<(&str, u64)>) -> Vec<[String; 3]> {
    let secs = covered_seconds(g).max(1e-9);
    named_totals(g, names)
        .into_iter()
        .map(|(name, n)| {
            [
                clean(&name),
                thousands(Some(n)),
                format!("{:.1}", n as f64 / secs),
            ]
        })
        .collect()
}

/// Left-aligned first column, right-aligned others, two spaces apart.
fn aligned<const N: usize>(head: [&str; N], rows: &[[String; N]], indent: &str) -> String {
    let widths: Vec<usize> = (0..N)
        .map(|c| {
            rows.iter()
                .map(|r| r[c].chars().count())
                .chain([head[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let head: [String; N] = head.map(String::from);
    for row in std::iter::once(&head).chain(rows) {
        let mut l = format!("{indent}{:<w$}", row[0], w = widths[0]);
        for c in 1..N {
            let _ = write!(l, "  {:>w$}", row[c], w = widths[c]);
        }
        let _ = writeln!(out, "{}", l.trim_end());
    }
    out
}

fn footnotes(g: &VmWindows<'_>) -> Vec<String> {
    let mut notes: Vec<String> = g
        .windows
        .iter()
        .filter(|w| w.partial)
        .map(|w| format!("{:03}: {}", w.window, reason_text(w)))
        .collect();
    let estimated = g.windows.iter().filter(|w| w.estimated).count();
    if estimated > 0 {
        notes.push(format!(
            "~: estimated — {estimated} window(s) counted by uprobes for part of the window only \
             (--max-overhead) and scaled"
        ));
    }
    notes
}

fn render_table(groups: &[VmWindows<'_>]) -> String {
    let mut out = String::new();
    if groups.is_empty() {
        out.push_str("no windows recorded\n");
    }
    for (i, g) in groups.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let _ = writeln!(out, "{}", heading(g));
        let head = headers(window_secs(g));
        let body = rows(g);
        let widths: Vec<usize> = (0..5)
            .map(|c| {
                body.iter()
                    .map(|r| r[c].len())
                    .chain([head[c].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &[String; 5]| {
            let mut l = format!("{:<w$}", cells[0], w = widths[0]);
            for c in 1..5 {
                let _ = write!(l, "  {:>w$}", cells[c], w = widths[c]);
            }
            l
        };
        let _ = writeln!(out, "{}", line(&head));
        for r in &body {
            let _ = writeln!(out, "{}", line(r));
        }
        for f in footnotes(g) {
            let _ = writeln!(out, "  * {f}");
        }
        for s in sources_line(g).into_iter().chain(guest_lines(g)) {
            let _ = writeln!(out, "  {s}");
        }
        let devices = device_rows(g);
        if !devices.is_empty() {
            out.push('\n');
            out.push_str(&aligned(
                ["Device", "Reads", "Writes", "Reads/s", "Writes/s"],
                &devices,
                "  ",
            ));
        }
        for (head, names) in [
            (
                "Timer callback",
                callbacks_of as fn(&WindowRecord) -> Vec<(&str, u64)>,
            ),
            ("KVM exit reason", exits_of),
        ] {
            let rows = named_rows(g, names);
            if !rows.is_empty() {
                out.push('\n');
                out.push_str(&aligned([head, "Runs", "Runs/s"], &rows, "  "));
            }
        }
    }
    out
}

fn md_escape(s: &str) -> String {
    clean(s).replace('|', "\\|")
}

fn render_markdown(groups: &[VmWindows<'_>]) -> String {
    let mut out = String::new();
    for g in groups {
        let _ = writeln!(out, "### {}\n", md_escape(&heading(g)));
        let head = headers(window_secs(g));
        let _ = writeln!(out, "| {} |", head.join(" | "));
        let _ = writeln!(out, "|---|---:|---:|---:|---:|");
        for r in rows(g) {
            let _ = writeln!(out, "| {} |", r.join(" | "));
        }
        out.push('\n');
        for f in footnotes(g) {
            let _ = writeln!(out, "\\* {f}  ");
        }
        for s in sources_line(g).into_iter().chain(guest_lines(g)) {
            let _ = writeln!(out, "{}  ", md_escape(&s));
        }
        out.push('\n');
        md_breakdown(
            &mut out,
            &["Device", "Reads", "Writes", "Reads/s", "Writes/s"],
            device_rows(g),
        );
        md_breakdown(
            &mut out,
            &["Timer callback", "Runs", "Runs/s"],
            named_rows(g, callbacks_of),
        );
        md_breakdown(
            &mut out,
            &["KVM exit reason", "Exits", "Exits/s"],
            named_rows(g, exits_of),
        );
    }
    out
}

/// A Markdown table of `rows` (the first column a name, escaped; the others right-aligned
/// numbers) under `header`, and a blank line; nothing when there are no rows.
fn md_breakdown<const N: usize>(out: &mut String, header: &[&str; N], rows: Vec<[String; N]>) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(out, "|---|{}", "---:|".repeat(N - 1));
    for mut r in rows {
        r[0] = md_escape(&r[0]);
        let _ = writeln!(out, "| {} |", r.join(" | "));
    }
    out.push('\n');
}

use crate::text::clean;
use crate::text::csv_field;

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

fn render_csv(records: &[WindowRecord]) -> String {
    let mut out = String::from(
        "vm,pid,uuid,accel,interval,start,seconds,partial,partial_reason,timer,fd_wakeups,read,write,\
         cpu_seconds,vcpu_wakeups,vcpu_halt_polls,in_kernel,cpu_vcpu_seconds,\
         cpu_device_model_seconds,cpu_other_seconds,cpu_kernel_workers_seconds\n",
    );
    for r in records {
        let reason = r
            .partial_reason
            .map(|p| {
                serde_json::to_value(p)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        let role = |f: fn(&crate::record::CpuByRole) -> f64| opt(r.cpu_by_role.as_ref().map(f));
        let _ = writeln!(
            out,
            "{},{},{},{},{:03},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            csv_field(&r.vm.name),
            r.vm.pid,
            csv_field(r.vm.uuid.as_deref().unwrap_or("")),
            r.vm.accel,
            r.window,
            csv_field(&r.start),
            r.seconds,
            r.partial,
            reason,
            opt(r.timer),
            opt(r.fd_wakeups),
            opt(r.read),
            opt(r.write),
            opt(r.cpu_seconds),
            opt(r.vcpu_wakeups),
            opt(r.vcpu_halt_polls),
            opt(r.in_kernel),
            role(|c| c.vcpu),
            role(|c| c.device_model),
            role(|c| c.other),
            role(|c| c.kernel_workers),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(
        name: &str,
        pid: u32,
        window: u64,
        timer: u64,
        partial: Option<PartialReason>,
    ) -> WindowRecord {
        let mut r = crate::record::tests::window(name, pid, window, 5.0);
        if partial.is_some() {
            (r.seconds, r.partial, r.partial_reason) = (2.5, true, partial);
        }
        r.timer = Some(timer);
        r.fd_wakeups = Some(3);
        r.cpu_seconds = Some(0.5);
        r.sources.read = "unavailable: why".into();
        r.sources.write = "unavailable: why".into();
        r
    }

    fn recording() -> Vec<WindowRecord> {
        vec![
            rec("noisy", 10, 0, 9_650, None),
            rec("quiet", 11, 0, 44, None),
            rec("noisy", 10, 1, 1_234_567, None),
            rec("quiet", 11, 1, 45, None),
            rec("noisy", 10, 2, 4_000, Some(PartialReason::ProfilerStopped)),
        ]
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(Some(0)), "0");
        assert_eq!(thousands(Some(999)), "999");
        assert_eq!(thousands(Some(1000)), "1,000");
        assert_eq!(thousands(Some(1_234_567)), "1,234,567");
        assert_eq!(thousands(None), "n/a");
    }

    #[test]
    fn table() {
        let out = render(&recording(), ReportFormat::Table);
        let expected = "\
VM noisy (pid 10, tcg)
5 Secs Interval  Timer Events  Read Events  Write Events  CPU s
000                     9,650          n/a           n/a   0.50
001                 1,234,567          n/a           n/a   0.50
002*                    4,000          n/a           n/a   0.50
  * 002: profiler stopped mid-window, 2.5 s covered
  timer source: syscall
  read/write source: unavailable: why

VM quiet (pid 11, tcg)
5 Secs Interval  Timer Events  Read Events  Write Events  CPU s
000                        44          n/a           n/a   0.50
001                        45          n/a           n/a   0.50
  timer source: syscall
  read/write source: unavailable: why
";
        assert_eq!(out, expected);
    }

    #[test]
    fn per_device_and_callback_tables() {
        let mut records = recording();
        records[0].devices = vec![crate::record::DeviceCount {
            name: "uhci".into(),
            owner: None,
            read: 246,
            write: 0,
        }];
        records[2].devices = vec![
            crate::record::DeviceCount {
                name: "parallel".into(),
                owner: None,
                read: 100_000,
                write: 0,
            },
            crate::record::DeviceCount {
                name: "uhci".into(),
                owner: None,
                read: 250,
                write: 1,
            },
        ];
        records[2].timers = vec![crate::record::TimerCallbackCount {
            callback: "uhci_frame_timer".into(),
            count: 9750,
        }];
        let out = render(&records, ReportFormat::Table);
        // Covered: 5 + 5 + 2.5 s.
        assert!(
            out.contains(
                "  Device      Reads  Writes  Reads/s  Writes/s
  parallel  100,000       0   8000.0       0.0
  uhci          496       1     39.7       0.1
"
            ),
            "{out}"
        );
        crate::testing::assert_contains(&out, "  uhci_frame_timer  9,750   780.0");
        let md = render(&records, ReportFormat::Markdown);
        assert!(
            md.contains("| parallel | 100,000 | 0 | 8000.0 | 0.0 |"),
            "{md}"
        );
    }

    #[test]
    fn markdown() {
        let out = render(&recording(), ReportFormat::Markdown);
        assert!(out.contains("### VM noisy (pid 10, tcg)"));
        assert!(
            out.contains("| 5 Secs Interval | Timer Events | Read Events | Write Events | CPU s |")
        );
        assert!(out.contains("| 001 | 1,234,567 | n/a | n/a | 0.50 |"));
    }

    #[test]
    fn csv() {
        let out = render(&recording(), ReportFormat::Csv);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 6);
        assert_eq!(
            lines[5],
            "noisy,10,,tcg,002,2026-11-22T00:00:10.000Z,2.5,true,profiler_stopped,4000,3,,,0.5,,,,,,,"
        );
    }

    /// Windows recorded under KVM: the guest's own wakeups, its CPU by role, in every format.
    #[test]
    fn a_kvm_guest_s_own_counts() {
        let text = include_str!("../../tests/fixtures/records/kvm-pit-and-seabios.jsonl");
        let (records, _) = crate::record::read_records(text.as_bytes()).unwrap();
        let table = render(&records, ReportFormat::Table);
        assert!(
            table.contains("vCPU wakeups from guest halts: 29,749 (991.6/s), halt polls: 0"),
            "{table}"
        );
        assert!(
            table.contains("CPU by thread role (3 windows): vCPU 9.81 s"),
            "{table}"
        );
        let md = render(&records, ReportFormat::Markdown);
        crate::testing::assert_contains(&md, "vCPU wakeups from guest halts: 29,749");
        let csv = render(&records, ReportFormat::Csv);
        let first = csv.lines().nth(1).unwrap();
        assert!(
            first.ends_with(",3.27,9883,0,9998,3.24,0,0.03,0.19"),
            "{first}"
        );
    }

    #[test]
    fn hostile_names_are_defused() {
        let mut r = rec("=cmd|x\x1b[2J", 1, 0, 1, None);
        r.vm.name = "=cmd\x1b[2J,x".into();
        let table = render(std::slice::from_ref(&r), ReportFormat::Table);
        assert!(!table.contains('\x1b'));
        let csv = render(&[r], ReportFormat::Csv);
        crate::testing::assert_contains(&csv, "\"'=cmd\u{FFFD}[2J,x\"");
    }
}
