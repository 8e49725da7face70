//! A VM's detail view: its identity and sources, its windows, and its devices and timer
//! callbacks over the recent windows.

use super::*;

impl App {
    pub(super) fn render_detail(&self, frame: &mut Frame, area: Rect) {
        let Some(vm) = self.detail_vm() else {
            frame.render_widget(
                Paragraph::new(
                    "This VM is gone: its last window has scrolled away. Esc goes back.",
                )
                .wrap(Wrap { trim: true })
                .block(Block::new().borders(Borders::TOP)),
                area,
            );
            return;
        };
        let lines = identity_lines(vm, self.shown.window);
        // A border and the lines as they wrap (word wrapping may take one more).
        let width = usize::from(area.width.max(1));
        let rows: usize = lines.iter().map(|l| l.width().div_ceil(width).max(1)).sum();
        let [identity, tables] =
            Layout::vertical([Constraint::Length(rows as u16 + 2), Constraint::Fill(1)])
                .areas(area);
        render_identity(frame, identity, vm, lines);

        let (windows, devices, callbacks) = if tables.width >= DETAIL_SIDE_BY_SIDE_MIN_WIDTH {
            let [left, right] = Layout::horizontal([Constraint::Length(53), Constraint::Fill(1)])
                .spacing(1)
                .areas(tables);
            let [top, bottom] =
                Layout::vertical([Constraint::Fill(1), Constraint::Fill(1)]).areas(right);
            (left, top, bottom)
        } else {
            let [top, bottom] =
                Layout::vertical([Constraint::Fill(3), Constraint::Fill(2)]).areas(tables);
            let [left, right] = Layout::horizontal([Constraint::Fill(1), Constraint::Fill(1)])
                .spacing(1)
                .areas(bottom);
            (top, left, right)
        };
        self.render_windows(frame, windows, vm);
        render_rates(frame, devices, vm, self.shown.window, RatePane::Devices);
        render_rates(frame, callbacks, vm, self.shown.window, RatePane::Callbacks);
    }

    /// The VM's Pulsar table: one row per closed window, then the running window.
    pub(super) fn render_windows(&self, frame: &mut Frame, area: Rect, vm: &LiveVm) {
        let mut rows: Vec<Row<'static>> = vm.history.iter().map(|r| window_row(r)).collect();
        if !vm.exited {
            rows.push(running_row(vm));
        }
        let block = Block::new()
            .borders(Borders::TOP)
            .border_style(dim())
            .title(format!(
                " {} s windows · * partial{} ",
                self.shown.window_secs,
                if vm.exited {
                    " · exited".to_string()
                } else {
                    format!(" · running {:.1} s", vm.running_elapsed)
                }
            ));
        let inner = block.inner(area);
        frame.render_widget(block, area);

        let visible = usize::from(inner.height.saturating_sub(1));
        let scroll = self.detail_scroll.min(rows.len().saturating_sub(visible));
        let end = rows.len() - scroll;
        let start = end.saturating_sub(visible);
        let shown: Vec<Row<'static>> = rows.drain(start..end).collect();

        let header = Row::new(
            ["Interval", "Timer", "vCPU", "Read", "Write", "FD", "CPU s"]
                .into_iter()
                .enumerate()
                .map(|(i, h)| {
                    let line = Line::from(h);
                    Cell::from(if i == 0 {
                        line
                    } else {
                        line.alignment(Alignment::Right)
                    })
                }),
        )
        .style(Style::new().bold());
        let widths = [8, 7, 7, 7, 7, 6, 5].map(Constraint::Length);
        frame.render_widget(
            Table::new(shown, widths).header(header).column_spacing(1),
            inner,
        );
    }
}

/// The lines above the tables: identity, devices, sources, where the CPU went, and (KVM) what
/// the guest itself did.
fn identity_lines(vm: &LiveVm, running_window: u64) -> Vec<Line<'static>> {
    let id = &vm.identity;
    let mut first = vec![
        label("pid"),
        Span::raw(format!(" {}  ", id.pid)),
        label("accel"),
        Span::raw(format!(" {}  ", id.accel)),
        label("uuid"),
        match &id.uuid {
            Some(u) => Span::raw(format!(" {}  ", clean(u))),
            None => Span::styled(" -  ", dim()),
        },
    ];
    if let Some(domid) = id.xen_domid {
        first.push(label("xen domid"));
        first.push(Span::raw(format!(" {domid}  ")));
    }
    first.push(if vm.exited {
        Span::styled("exited", Style::new().yellow())
    } else {
        Span::styled("running", Style::new().green())
    });
    let devices = if vm.devices.is_empty() {
        Span::styled("none named on the command line", dim())
    } else {
        Span::raw(crate::text::clean_list(&vm.devices))
    };
    let sources = if vm.sources.read == vm.sources.write {
        format!(
            "timer: {} · read/write: {}",
            clean(&vm.sources.timer),
            clean(&vm.sources.read)
        )
    } else {
        format!(
            "timer: {} · read: {} · write: {}",
            clean(&vm.sources.timer),
            clean(&vm.sources.read),
            clean(&vm.sources.write)
        )
    };
    let mut lines = vec![Line::from(first)];
    if let Some(l) = &id.libvirt {
        let mut spans = vec![label("libvirt"), Span::raw(format!(" {}", clean(&l.name)))];
        if let Some(n) = &l.nova {
            for (what, v) in [
                ("nova", &n.name),
                ("project", &n.project),
                ("flavor", &n.flavor),
            ] {
                if let Some(v) = v {
                    spans.push(Span::raw("  "));
                    spans.push(label(what));
                    spans.push(Span::raw(format!(" {}", clean(v))));
                }
            }
        }
        lines.push(Line::from(spans));
    }
    lines.push(Line::from(vec![label("devices"), Span::raw(" "), devices]));
    lines.push(Line::from(vec![
        label("sources"),
        Span::raw(" "),
        Span::raw(sources),
    ]));
    let last = vm.history.last();
    lines.push(Line::from(
        [label("cpu"), Span::raw(" ")]
            .into_iter()
            .chain(cpu_spans(last.map(|r| &**r), running_window))
            .collect::<Vec<_>>(),
    ));
    if id.accel == crate::identity::cmdline::Accel::Kvm {
        lines.push(Line::from(
            [label("guest"), Span::raw(" ")]
                .into_iter()
                .chain(guest_spans(last.map(|r| &**r), running_window))
                .collect::<Vec<_>>(),
        ));
    }
    lines
}

/// What comes once the running window closes, dimmed.
fn until_closed(what: &str, running_window: u64) -> Vec<Span<'static>> {
    vec![Span::styled(
        format!("{what} when window {running_window:03} closes"),
        dim(),
    )]
}

/// Where the last closed window's CPU went: the QEMU process's share by thread role, and the
/// kernel workers besides.
fn cpu_spans(last: Option<&WindowRecord>, running_window: u64) -> Vec<Span<'static>> {
    let Some(r) = last else {
        return until_closed("by thread role", running_window);
    };
    let mut spans = vec![Span::raw(format!("window {:03} · ", r.window))];
    let (Some(cpu), Some(split)) = (r.cpu_seconds, r.cpu_by_role) else {
        spans.push(Span::styled(
            "n/a by thread role (threads not read at both ends of the window)",
            dim(),
        ));
        return spans;
    };
    let share = |part: f64| {
        if cpu > 0.0 {
            format!("{:.0}%", (part / cpu * 100.0).min(100.0))
        } else {
            "-".into()
        }
    };
    let core = |secs: f64| fmt_percent(secs / r.seconds * 100.0);
    spans.push(Span::raw(format!(
        "{}% of a core: vCPU threads {} · device model {} · other {} · kernel workers +{}% \
         · guest time {}% · {} vCPU thread{}",
        core(cpu),
        share(split.vcpu),
        share(split.device_model),
        share(split.other),
        core(split.kernel_workers),
        core(split.vcpu_guest),
        split.vcpu_threads,
        if split.vcpu_threads == 1 { "" } else { "s" },
    )));
    spans
}

/// What a KVM guest itself did in the last closed window: vCPU wakeups, halt polls, accesses
/// the kernel handled, exits by reason.
fn guest_spans(last: Option<&WindowRecord>, running_window: u64) -> Vec<Span<'static>> {
    let Some(r) = last else {
        return until_closed("vCPU wakeups and exits", running_window);
    };
    let per_s = |n: Option<u64>| value_span(crate::tui::model::rate(n, r.seconds), fmt_rate);
    let mut spans = vec![
        Span::raw(format!("window {:03} · vCPU wakeups ", r.window)),
        per_s(r.vcpu_wakeups),
        Span::raw("/s · halt polls "),
        per_s(r.vcpu_halt_polls),
        Span::raw("/s · in-kernel accesses "),
        per_s(r.in_kernel),
        Span::raw("/s · exits "),
    ];
    if r.kvm_exits.is_empty() {
        let why = r
            .sources
            .kvm_exits
            .strip_prefix("unavailable: ")
            .map_or_else(|| "none".to_string(), |why| format!("n/a: {}", clean(why)));
        spans.push(Span::styled(why, dim()));
    } else {
        spans.push(Span::raw(
            r.kvm_exits
                .iter()
                .take(4)
                .map(|e| {
                    format!(
                        "{} {}/s",
                        clean(&e.reason),
                        fmt_rate(e.count as f64 / r.seconds)
                    )
                })
                .collect::<Vec<_>>()
                .join(", "),
        ));
    }
    spans
}

fn render_identity(frame: &mut Frame, area: Rect, vm: &LiveVm, lines: Vec<Line<'static>>) {
    let id = &vm.identity;
    let text = Text::from(lines);
    let title = Line::from(vec![
        Span::raw(" VM "),
        Span::styled(clean(&id.name), Style::new().bold()),
        Span::raw(" "),
    ]);
    frame.render_widget(
        Paragraph::new(text).wrap(Wrap { trim: false }).block(
            Block::new()
                .borders(Borders::TOP)
                .border_style(dim())
                .title(title),
        ),
        area,
    );
}

fn window_row(r: &WindowRecord) -> Row<'static> {
    let count = |v: Option<u64>| {
        let mut span = count_span(v);
        if r.estimated && v.is_some() {
            span.content = format!("{ESTIMATED_MARK}{}", span.content).into();
        }
        right(span)
    };
    Row::new([
        Cell::from(format!(
            "{:03}{}",
            r.window,
            if r.partial { "*" } else { "" }
        )),
        count(r.timer),
        right(count_span(r.vcpu_wakeups)),
        count(r.read),
        count(r.write),
        count(r.fd_wakeups),
        right(cpu_seconds_span(r.cpu_seconds)),
    ])
}

fn running_row(vm: &LiveVm) -> Row<'static> {
    let c = &vm.running;
    Row::new([
        Cell::from("running"),
        right(count_span(c.timer)),
        right(count_span(c.vcpu_wakeups)),
        right(count_span(c.read)),
        right(count_span(c.write)),
        right(count_span(c.fd_wakeups)),
        right(cpu_seconds_span(vm.running_cpu_seconds)),
    ])
    .style(Style::new().italic().green())
}

fn titled(title: String) -> Block<'static> {
    Block::new()
        .borders(Borders::TOP)
        .border_style(dim())
        .title(title)
}

fn empty_state(frame: &mut Frame, area: Rect, block: Block<'static>, text: String) {
    frame.render_widget(
        Paragraph::new(Span::styled(text, dim()))
            .wrap(Wrap { trim: true })
            .block(block),
        area,
    );
}

/// The VM's last closed window; until there is one, says what comes when the running window
/// (`running_window`) closes in a box titled `title`.
fn last_closed<'a>(
    frame: &mut Frame,
    area: Rect,
    vm: &'a LiveVm,
    running_window: u64,
    (title, what): (&str, &str),
) -> Option<&'a WindowRecord> {
    let last = vm.history.last();
    if last.is_none() {
        let text =
            format!("no closed window yet: {what} come when window {running_window:03} closes");
        empty_state(frame, area, titled(format!(" {title} ")), text);
    }
    last.map(|w| &**w)
}

/// The detail view's tables of the last closed window: reads and writes per device, timer
/// events per QEMU callback.
#[derive(Debug, Clone, Copy)]
enum RatePane {
    Devices,
    Callbacks,
}

impl RatePane {
    /// Why the pane has no rows.
    fn empty_text(self, last: &WindowRecord) -> String {
        match self {
            RatePane::Devices if last.read == Some(0) && last.write == Some(0) => {
                format!("no device reads or writes in window {:03}", last.window)
            }
            RatePane::Devices => format!(
                "no per-device source for this VM: {}",
                clean(&last.sources.read)
            ),
            RatePane::Callbacks if last.timer == Some(0) => {
                format!("no timer events in window {:03}", last.window)
            }
            RatePane::Callbacks if last.sources.timer_callbacks == "symbols" => format!(
                "no timer callback ran in window {:03} (other wakeups: glib timeouts)",
                last.window
            ),
            RatePane::Callbacks => format!(
                "timers by callback: {}",
                clean(&last.sources.timer_callbacks)
            ),
        }
    }
}

/// `pane`'s names and their per-second rates in the last closed window, busiest first.
fn render_rates(frame: &mut Frame, area: Rect, vm: &LiveVm, running_window: u64, pane: RatePane) {
    let (what, title, columns): (_, _, &[&'static str]) = match pane {
        RatePane::Devices => (
            ("devices", "per-device counts"),
            "devices",
            &["device", "read/s", "write/s"],
        ),
        RatePane::Callbacks => (
            ("timer callbacks", "callbacks"),
            "timer callbacks",
            &["callback", "timer/s"],
        ),
    };
    let Some(last) = last_closed(frame, area, vm, running_window, what) else {
        return;
    };
    let mut rows: Vec<(String, Vec<u64>)> = match pane {
        RatePane::Devices => last
            .devices
            .iter()
            .map(|d| (d.label(), vec![d.read, d.write]))
            .collect(),
        RatePane::Callbacks => last
            .timers
            .iter()
            .map(|t| (t.callback.clone(), vec![t.count]))
            .collect(),
    };
    let block = titled(format!(" {title} · window {:03} ", last.window));
    if rows.is_empty() {
        empty_state(frame, area, block, pane.empty_text(last));
        return;
    }
    rows.sort_by_key(|(_, counts)| std::cmp::Reverse(counts.iter().sum::<u64>()));
    let rows = rows.into_iter().map(|(name, counts)| {
        Row::new(
            std::iter::once(Cell::from(clean(&name))).chain(
                counts
                    .into_iter()
                    .map(|n| right(Span::raw(fmt_rate(n as f64 / last.seconds)))),
            ),
        )
    });
    let header = Row::new(columns.iter().enumerate().map(|(i, &c)| {
        if i == 0 {
            Cell::from(c)
        } else {
            right(Span::raw(c))
        }
    }))
    .style(Style::new().bold());
    let widths = std::iter::once(Constraint::Fill(1))
        .chain(columns.iter().skip(1).map(|_| Constraint::Length(7)));
    frame.render_widget(
        Table::new(rows, widths)
            .header(header)
            .column_spacing(1)
            .block(block),
        area,
    );
}
