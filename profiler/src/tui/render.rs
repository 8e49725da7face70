//! Drawing the screens. Every string that came from outside (VM names, uuids, devices,
//! callbacks, source descriptions) goes through [`clean`] before it reaches a widget. The list
//! and header are drawn here, a VM's detail view in `detail.rs`.

mod detail;

use ratatui::{
    Frame,
    layout::{Alignment, Constraint, Layout, Rect},
    style::{Modifier, Style},
    symbols,
    text::{Line, Span, Text},
    widgets::{
        Block, Borders, Cell, Clear, HighlightSpacing, LineGauge, Paragraph, Row, Table,
        TableState, Wrap,
    },
};

use crate::{
    analysis::report::thousands,
    record::WindowRecord,
    tui::{
        app::{App, View},
        model::{
            Basis, Rates, SortKey, VmRow, clean, fmt_percent, fmt_rate, host_totals,
            is_placeholder, sparkline, sparkline_scale, top_device, window_progress,
        },
    },
    windows::live::{LiveSnapshot, LiveVm},
};

/// Below this height the header shrinks to its first line.
const FULL_HEADER_MIN_HEIGHT: u16 = 12;
/// The detail view puts the window table beside the device tables from this width.
const DETAIL_SIDE_BY_SIDE_MIN_WIDTH: u16 = 72;
const HIGHLIGHT_SYMBOL: &str = ">";
/// Before the name of a VM whose QEMU has exited (its windows stay until they scroll away).
const EXITED_MARK: &str = "✕ ";
/// Marks a count scaled from a duty-cycled share of its window (`--max-overhead`).
pub const ESTIMATED_MARK: &str = "~";

fn dim() -> Style {
    Style::new().add_modifier(Modifier::DIM)
}

fn label(s: &str) -> Span<'static> {
    Span::styled(s.to_string(), Style::new().bold().cyan())
}

fn key_hint(key: &str, what: &str) -> Vec<Span<'static>> {
    vec![
        Span::styled(key.to_string(), Style::new().bold().cyan()),
        Span::raw(format!(" {what}  ")),
    ]
}

/// A value, or a dimmed `n/a` when its count is unavailable.
fn value_span(v: Option<f64>, fmt: fn(f64) -> String) -> Span<'static> {
    match v {
        Some(v) => Span::raw(fmt(v)),
        None => Span::styled("n/a", dim()),
    }
}

fn count_span(v: Option<u64>) -> Span<'static> {
    match v {
        Some(_) => Span::raw(thousands(v)),
        None => Span::styled("n/a", dim()),
    }
}

fn cpu_seconds_span(v: Option<f64>) -> Span<'static> {
    match v {
        Some(v) => Span::raw(format!("{v:.2}")),
        None => Span::styled("n/a", dim()),
    }
}

fn right(span: Span<'static>) -> Cell<'static> {
    Cell::from(Line::from(span).alignment(Alignment::Right))
}

impl App {
    /// Draws the whole screen for the current state.
    pub fn render(&self, frame: &mut Frame) {
        let area = frame.area();
        if area.is_empty() {
            return;
        }
        let header_height = if area.height >= FULL_HEADER_MIN_HEIGHT {
            4
        } else {
            1
        };
        // The status line (the newest note) only when there is something to say.
        let status_height = u16::from(!self.shown.notes.is_empty() && area.height >= 6);
        let [header, body, status, footer] = Layout::vertical([
            Constraint::Length(header_height),
            Constraint::Fill(1),
            Constraint::Length(status_height),
            Constraint::Length(1),
        ])
        .areas(area);
        self.render_header(frame, header);
        match self.view {
            View::List => self.render_list(frame, body),
            View::Detail(_) => self.render_detail(frame, body),
        }
        self.render_status(frame, status);
        self.render_footer(frame, footer);
        if self.help {
            render_help(frame, area);
        }
    }

    fn render_header(&self, frame: &mut Frame, area: Rect) {
        if area.is_empty() {
            return;
        }
        let s = &self.shown;
        let line = |i: u16| Rect {
            y: area.y + i,
            height: 1,
            ..area
        };
        let status_width = if self.paused { 8 } else { 0 };
        let [gauge_area, status_area] =
            Layout::horizontal([Constraint::Fill(1), Constraint::Length(status_width)])
                .areas(line(0));

        let narrow = gauge_area.width < 40;
        let gauge_label = if is_placeholder(s) {
            Line::from(vec![
                Span::styled("profiler top", Style::new().bold()),
                Span::raw(if narrow {
                    " waiting… "
                } else {
                    "  waiting for the first sample… "
                }),
            ])
        } else {
            let into = window_progress(s) * s.window_secs;
            if narrow {
                Line::from(vec![
                    Span::styled(format!("w{:03} ", s.window), Style::new().bold()),
                    Span::raw(format!("{into:.0}/{}s ", s.window_secs)),
                ])
            } else {
                Line::from(vec![
                    Span::styled(format!("window {:03} ", s.window), Style::new().bold()),
                    Span::raw(format!("{into:4.1}/{} s ", s.window_secs)),
                ])
            }
        };
        frame.render_widget(
            LineGauge::default()
                .ratio(window_progress(s))
                .label(gauge_label)
                .filled_symbol(symbols::line::THICK_HORIZONTAL)
                .filled_style(Style::new().cyan())
                .unfilled_style(dim()),
            gauge_area,
        );
        if self.paused {
            frame.render_widget(
                Paragraph::new(Span::styled(
                    " PAUSED ",
                    Style::new().bold().black().on_yellow(),
                ))
                .alignment(Alignment::Right),
                status_area,
            );
        }
        if area.height < 4 {
            return;
        }

        let t = host_totals(s);
        let mut host = vec![label("host"), Span::raw(format!("  {} VMs", s.vms.len()))];
        for (name, v, fmt, unit) in [
            ("CPU", t.cpu_percent, fmt_percent as fn(f64) -> String, "%"),
            ("wakeups", t.wakeups, fmt_rate, "/s"),
            ("(vCPU", t.vcpu, fmt_rate, ")"),
            ("read", t.read, fmt_rate, "/s"),
            ("write", t.write, fmt_rate, "/s"),
        ] {
            // The vCPU wakeups are part of the wakeups: said in parentheses after them, where
            // some VM has them.
            let sep = if name.starts_with('(') { " " } else { " · " };
            if sep == " " && v.is_none() {
                continue;
            }
            host.push(Span::raw(format!("{sep}{name} ")));
            host.push(value_span(v, fmt));
            if v.is_some() {
                host.push(Span::raw(unit));
            }
        }
        frame.render_widget(Line::from(host), line(1));

        let probes = if s.live_sources.is_empty() {
            Span::styled("none attached", Style::new().red())
        } else {
            Span::raw(crate::text::clean_list(&s.live_sources))
        };
        frame.render_widget(
            Line::from(vec![label("probes"), Span::raw("  "), probes]),
            line(2),
        );

        frame.render_widget(Line::from(cost_spans(s)), line(3));
    }

    fn render_list(&self, frame: &mut Frame, area: Rect) {
        let rows = self.rows();
        let total = self.shown.vms.len();
        let mut title = vec![Span::raw(match self.sort {
            SortKey::Name => " ranked by name".to_string(),
            SortKey::Cpu => " ranked by CPU%".to_string(),
            key => format!(" ranked by {}/s", key.label()),
        })];
        title.push(Span::raw(" · last closed window "));
        if !self.filter.is_empty() {
            title.push(Span::styled(
                format!(
                    "· {} of {total} VMs match “{}” ",
                    rows.len(),
                    clean(&self.filter)
                ),
                Style::new().yellow(),
            ));
        }
        let block = Block::new()
            .borders(Borders::TOP)
            .border_style(dim())
            .title(Line::from(title));
        let inner = block.inner(area);
        frame.render_widget(block, area);

        if rows.is_empty() {
            let text = if is_placeholder(&self.shown) {
                "waiting for the first sample…".to_string()
            } else if total == 0 {
                "no QEMU processes found".to_string()
            } else {
                format!("no VM name matches “{}” (Esc clears)", clean(&self.filter))
            };
            frame.render_widget(
                Paragraph::new(Span::styled(text, dim())).wrap(Wrap { trim: true }),
                inner,
            );
            return;
        }

        let columns = list_columns(inner.width, total);
        let header = Row::new(columns.iter().map(|(col, _)| {
            let style = if col.sort_key() == Some(self.sort) {
                Style::new().bold().underlined()
            } else {
                Style::new().bold()
            };
            let line = Line::styled(col.header(), style);
            Cell::from(if col.right_aligned() {
                line.alignment(Alignment::Right)
            } else {
                line
            })
        }));
        let scale = columns
            .iter()
            .find(|(c, _)| *c == Col::History)
            .map_or(0.0, |(_, w)| {
                sparkline_scale(&self.shown.vms, usize::from(*w))
            });
        let body = rows.iter().map(|row| list_row(row, &columns, scale));
        let table = Table::new(body, columns.iter().map(|(_, w)| Constraint::Length(*w)))
            .header(header)
            .column_spacing(1)
            .highlight_symbol(HIGHLIGHT_SYMBOL)
            .highlight_spacing(HighlightSpacing::Always)
            .row_highlight_style(Style::new().reversed());
        let mut state = TableState::default().with_selected(self.selected_position(&rows));
        frame.render_stateful_widget(table, inner, &mut state);
    }

    /// The newest note, with how long ago it was said and how many came before it.
    fn render_status(&self, frame: &mut Frame, area: Rect) {
        let Some((t, note)) = self.shown.notes.last() else {
            return;
        };
        if area.is_empty() {
            return;
        }
        let age = (self.shown.t - t).max(0.0);
        let mut spans = vec![
            Span::styled("note ", Style::new().bold().yellow()),
            Span::styled(format!("{age:.0} s ago "), dim()),
        ];
        let earlier = self.shown.notes.len() - 1;
        if earlier > 0 {
            spans.push(Span::styled(format!("(+{earlier} earlier) "), dim()));
        }
        spans.push(Span::raw(clean(&note.to_string())));
        frame.render_widget(Line::from(spans), area);
    }

    fn render_footer(&self, frame: &mut Frame, area: Rect) {
        let mut spans = Vec::new();
        if self.editing_filter {
            spans.push(Span::styled("/", Style::new().bold().yellow()));
            spans.push(Span::raw(clean(&self.filter)));
            spans.push(Span::styled("▏", Style::new().yellow()));
            spans.push(Span::raw("  "));
            spans.extend(key_hint("Enter", "apply"));
            spans.extend(key_hint("Esc", "clear"));
        } else {
            match self.view {
                View::List => {
                    if !self.filter.is_empty() {
                        spans.push(Span::styled(
                            format!("filter “{}”", clean(&self.filter)),
                            Style::new().yellow(),
                        ));
                        spans.push(Span::raw("  "));
                        spans.extend(key_hint("Esc", "clear"));
                    }
                    spans.extend(key_hint("q", "quit"));
                    spans.extend(key_hint("↑↓", "select"));
                    spans.extend(key_hint("Enter", "detail"));
                    spans.extend(key_hint("s", &format!("sort:{}", self.sort.label())));
                    spans.extend(key_hint("/", "filter"));
                }
                View::Detail(_) => {
                    spans.extend(key_hint("Esc", "back"));
                    spans.extend(key_hint("↑↓", "older/newer windows"));
                    spans.extend(key_hint("q", "quit"));
                }
            }
            spans.extend(key_hint("p", if self.paused { "resume" } else { "pause" }));
            spans.extend(key_hint("?", "help"));
        }
        frame.render_widget(Line::from(spans), area);
    }
}

/// "BPF 2,345,678 runs · 85 ns/run · 199.4 ms · collector 1.24 s CPU (0.33%)".
fn cost_spans(s: &LiveSnapshot) -> Vec<Span<'static>> {
    let c = &s.cost;
    let mut spans = vec![
        label("cost"),
        Span::raw(format!("  BPF {} runs", thousands(Some(c.bpf_run_count)))),
    ];
    if c.bpf_run_time_ns == 0 {
        if c.bpf_run_count > 0 {
            spans.push(Span::styled(" · run time n/a (BPF stats off)", dim()));
        }
    } else {
        if c.bpf_run_count > 0 {
            spans.push(Span::raw(format!(
                " · {:.0} ns/run",
                c.bpf_run_time_ns as f64 / c.bpf_run_count as f64
            )));
        }
        spans.push(Span::raw(format!(
            " · {:.1} ms",
            c.bpf_run_time_ns as f64 / 1e6
        )));
    }
    spans.push(Span::raw(format!(
        " · collector {:.2} s CPU",
        c.collector_cpu_seconds
    )));
    if s.t > 0.0 {
        let pct = c.collector_cpu_seconds / s.t * 100.0;
        spans.push(Span::raw(if pct < 1.0 {
            format!(" ({pct:.2}%)")
        } else {
            format!(" ({pct:.1}%)")
        }));
    }
    spans
}

/// A column of the ranking: a count it can be sorted by, or one it cannot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Col {
    Rank,
    Key(SortKey),
    Pid,
    Accel,
    History,
    TopDevice,
}

impl Col {
    const ALL: [Col; 13] = [
        Col::Rank,
        Col::Key(SortKey::Name),
        Col::Pid,
        Col::Accel,
        Col::Key(SortKey::Cpu),
        Col::Key(SortKey::Wakeups),
        Col::Key(SortKey::Timer),
        Col::Key(SortKey::Vcpu),
        Col::Key(SortKey::Read),
        Col::Key(SortKey::Write),
        Col::Key(SortKey::Fd),
        Col::History,
        Col::TopDevice,
    ];
    /// Dropped first to last when the terminal is too narrow; rank, name and CPU% stay.
    const DROP_ORDER: [Col; 10] = [
        Col::TopDevice,
        Col::Pid,
        Col::Accel,
        Col::Key(SortKey::Fd),
        Col::History,
        Col::Key(SortKey::Write),
        Col::Key(SortKey::Read),
        Col::Key(SortKey::Timer),
        Col::Key(SortKey::Vcpu),
        Col::Key(SortKey::Wakeups),
    ];

    fn header(self) -> &'static str {
        match self {
            Col::Rank => "#",
            Col::Key(SortKey::Name) => "VM",
            Col::Pid => "PID",
            Col::Accel => "acc",
            Col::Key(SortKey::Wakeups) => "wake/s",
            Col::Key(SortKey::Timer) => "timer/s",
            Col::Key(SortKey::Vcpu) => "vcpu/s",
            Col::Key(SortKey::Read) => "read/s",
            Col::Key(SortKey::Write) => "write/s",
            Col::Key(SortKey::Fd) => "fd/s",
            Col::Key(SortKey::Cpu) => "CPU%",
            Col::History => "history",
            Col::TopDevice => "top dev",
        }
    }

    fn min_width(self, vms: usize) -> u16 {
        match self {
            Col::Rank => (vms.max(1).ilog10() + 1).max(2) as u16,
            Col::Key(SortKey::Name) => 10,
            Col::Pid => 7,
            Col::Accel => 3,
            Col::Key(SortKey::Wakeups) => 7,
            Col::Key(SortKey::Timer) => 7,
            Col::Key(SortKey::Vcpu) => 6,
            Col::Key(SortKey::Read) => 6,
            Col::Key(SortKey::Write) => 7,
            Col::Key(SortKey::Fd) => 6,
            Col::Key(SortKey::Cpu) => 5,
            Col::History => 8,
            Col::TopDevice => 8,
        }
    }

    fn right_aligned(self) -> bool {
        !matches!(
            self,
            Col::Key(SortKey::Name) | Col::Accel | Col::History | Col::TopDevice
        )
    }

    fn sort_key(self) -> Option<SortKey> {
        match self {
            Col::Key(key) => Some(key),
            _ => None,
        }
    }
}

/// The columns that fit in `width`, with their widths. Extra room goes to the name, then the
/// sparkline (more windows of history), then the top device.
fn list_columns(width: u16, vms: usize) -> Vec<(Col, u16)> {
    let avail = width.saturating_sub(HIGHLIGHT_SYMBOL.len() as u16);
    let need = |cols: &[Col]| -> u16 {
        cols.iter().map(|c| c.min_width(vms)).sum::<u16>() + cols.len().saturating_sub(1) as u16
    };
    let mut cols = Col::ALL.to_vec();
    for drop in Col::DROP_ORDER {
        if need(&cols) <= avail {
            break;
        }
        cols.retain(|c| *c != drop);
    }
    let mut extra = avail.saturating_sub(need(&cols));
    let mut widths: Vec<(Col, u16)> = cols.iter().map(|c| (*c, c.min_width(vms))).collect();
    for (col, cap) in [
        (Col::Key(SortKey::Name), 14),
        (Col::History, 22),
        (Col::TopDevice, 10),
        (Col::Key(SortKey::Name), u16::MAX),
    ] {
        if let Some((_, w)) = widths.iter_mut().find(|(c, _)| *c == col) {
            let add = extra.min(cap);
            *w += add;
            extra -= add;
        }
    }
    widths
}

fn list_row(row: &VmRow<'_>, columns: &[(Col, u16)], scale: f64) -> Row<'static> {
    let vm = row.vm;
    let last = vm.history.last();
    let running = row.basis == Basis::Running;
    let value_style = if running {
        Style::new().italic()
    } else {
        Style::new()
    };
    // A running window that has just started covers no time yet: its counts exist but have no
    // rate. Show that as pending, not as unavailable.
    let just_started = running && vm.running_elapsed <= 0.0;
    // Counts of a window whose uprobes were duty-cycled (`--max-overhead`) are estimates.
    let estimated = !running && last.is_some_and(|r| r.estimated);
    let rate_cell = |v: Option<f64>, counted: bool, fmt: fn(f64) -> String, scaled: bool| {
        let mut span = if v.is_none() && counted && just_started {
            Span::styled("…", dim())
        } else {
            value_span(v, fmt)
        };
        if scaled && estimated && v.is_some() {
            span.content = format!("{ESTIMATED_MARK}{}", span.content).into();
        }
        let style = span.style.patch(value_style);
        right(span.style(style))
    };
    let c = &vm.running;
    let Rates {
        wakeups,
        timer,
        vcpu,
        read,
        write,
        fd,
        cpu_percent,
    } = row.rates;
    let cells = columns.iter().map(|(col, width)| match col {
        Col::Rank => right(Span::raw(row.rank.to_string())),
        // A prefix, so that it shows however narrow the column is.
        Col::Key(SortKey::Name) if vm.exited => Cell::from(Line::from(vec![
            Span::styled(EXITED_MARK, Style::new().bold()),
            Span::raw(row.name.clone()),
        ])),
        Col::Key(SortKey::Name) => Cell::from(row.name.clone()),
        Col::Pid => right(Span::raw(vm.identity.pid.to_string())),
        Col::Accel => Cell::from(match vm.identity.accel {
            crate::identity::cmdline::Accel::Unknown => "?",
            a => a.as_str(),
        }),
        // Scaled when any part of it is (the vCPU wakeups never are: tracepoints).
        Col::Key(SortKey::Wakeups) => rate_cell(wakeups, c.timer.is_some(), fmt_rate, true),
        Col::Key(SortKey::Timer) => rate_cell(timer, c.timer.is_some(), fmt_rate, true),
        Col::Key(SortKey::Vcpu) => rate_cell(vcpu, c.vcpu_wakeups.is_some(), fmt_rate, false),
        Col::Key(SortKey::Read) => rate_cell(read, c.read.is_some(), fmt_rate, true),
        Col::Key(SortKey::Write) => rate_cell(write, c.write.is_some(), fmt_rate, true),
        Col::Key(SortKey::Fd) => rate_cell(fd, c.fd_wakeups.is_some(), fmt_rate, true),
        Col::Key(SortKey::Cpu) => rate_cell(
            cpu_percent,
            vm.running_cpu_seconds.is_some(),
            fmt_percent,
            false,
        ),
        Col::History => {
            if vm.history.is_empty() {
                Cell::from(Span::styled("running", dim().italic()))
            } else {
                Cell::from(Span::styled(
                    sparkline(&vm.history, usize::from(*width), scale),
                    Style::new().cyan(),
                ))
            }
        }
        Col::TopDevice => Cell::from(
            last.and_then(|r| top_device(r))
                .map_or_else(|| "-".to_string(), |d| clean(&d.label())),
        ),
    });
    let row_style = if vm.exited { dim() } else { Style::new() };
    Row::new(cells.collect::<Vec<_>>()).style(row_style)
}

const HELP: &[(&str, &str)] = &[
    ("↑/↓ j/k", "select a VM · in detail: older/newer windows"),
    ("Enter", "detail of the selected VM"),
    ("Esc", "back · clear the filter"),
    (
        "s",
        "sort: cpu → wakeups → timer → vcpu → read → write → fd → name",
    ),
    ("/", "filter by name (Enter keeps, Esc clears)"),
    ("p", "pause / resume the display"),
    ("?", "this help"),
    ("q Ctrl-C", "quit"),
    ("✕ name", "that VM's QEMU has exited"),
];

fn render_help(frame: &mut Frame, area: Rect) {
    let width = area.width.min(64);
    let height = area.height.min(21);
    let popup = Rect {
        x: area.x + (area.width - width) / 2,
        y: area.y + (area.height - height) / 2,
        width,
        height,
    };
    let mut lines: Vec<Line<'static>> = HELP
        .iter()
        .map(|(key, what)| {
            Line::from(vec![
                Span::styled(format!("{key:<9}"), Style::new().bold().cyan()),
                Span::raw(format!(" {what}")),
            ])
        })
        .collect();
    lines.push(Line::raw(""));
    lines.push(Line::raw(
        "Rates are per second over each VM's last closed window; a VM without one yet shows \
         its running window (history: running). Ranked by CPU% of a core by default. wake/s: \
         host wakeups the VM causes, QEMU's timer + fd wakeups + vCPU wakeups from guest \
         halts (KVM). history: CPU% of the last windows, on a log scale shared by all VMs. n/a: no probe source for that count on \
         this VM, never 0.",
    ));
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: true })
            .block(Block::bordered().title(" help · Esc closes ")),
        popup,
    );
}
