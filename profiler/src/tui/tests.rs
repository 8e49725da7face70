//! Screens as text (insta snapshots of a TestBackend), and `run` driven end to end.

use std::{io, time::Duration};

use crossterm::event::{Event, KeyCode, KeyEvent, KeyModifiers};
use futures_util::stream;
use ratatui::{Terminal, backend::TestBackend, buffer::Buffer, style::Modifier};
use tokio::sync::watch;

use super::{
    App, View,
    app::tests::{loaded, press, type_str},
    fixtures, run,
};
use crate::{record::WindowRecord, windows::live::LiveSnapshot};

fn draw(app: &App, width: u16, height: u16) -> Terminal<TestBackend> {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    terminal.draw(|f| app.render(f)).unwrap();
    terminal
}

fn screen(app: &App, width: u16, height: u16) -> String {
    draw(app, width, height).backend().to_string()
}

fn buffer_text(buffer: &Buffer) -> String {
    buffer
        .content
        .chunks(buffer.area.width as usize)
        .map(|line| line.iter().map(|c| c.symbol()).collect::<String>())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Keys a user presses, in order.
enum Step {
    Key(KeyCode),
    Type(&'static str),
    Detail(&'static str),
}

/// The loaded fixture after `steps`, at `width` × `height`, against snapshot `name`.
fn snapshot_after(name: &str, steps: &[Step], width: u16, height: u16) {
    let mut app = loaded();
    for step in steps {
        match step {
            Step::Key(code) => press(&mut app, *code),
            Step::Type(text) => type_str(&mut app, text),
            Step::Detail(vm) => open_detail(&mut app, vm),
        }
    }
    insta::assert_snapshot!(name, screen(&app, width, height));
}

#[test]
fn the_list_at_every_size_and_sorted() {
    use Step::*;
    snapshot_after("list_80x24", &[], 80, 24);
    snapshot_after("list_60x20_drops_columns", &[], 60, 20);
    snapshot_after("list_120x30_widens_name_and_history", &[], 120, 30);
    snapshot_after("list_tiny_terminal", &[], 20, 5);
    snapshot_after(
        "list_sorted_by_read_puts_na_last",
        &[Key(KeyCode::Char('s'))],
        80,
        24,
    );
}

#[test]
fn the_detail_view_of_each_kind_of_vm() {
    use Step::*;
    snapshot_after("detail_80x24", &[Detail("noisy-usb")], 80, 24);
    snapshot_after("detail_60x20", &[Detail("noisy-usb")], 60, 20);
    snapshot_after(
        "detail_of_a_vm_with_na_counts",
        &[Detail("legacy-ubuntu")],
        80,
        24,
    );
    snapshot_after(
        "detail_before_the_first_closed_window",
        &[Detail("fresh-boot")],
        80,
        24,
    );
    snapshot_after("detail_of_an_exited_xen_vm", &[Detail("batch-07")], 80, 24);
}

/// `top` on windows recorded under KVM: the list and the PIT guest's detail view.
#[test]
fn recorded_kvm_guests() {
    let mut app = App::new();
    app.apply(fixtures::recorded_kvm());
    insta::assert_snapshot!("recorded_kvm_list", screen(&app, 100, 14));
    app.handle_key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE));
    insta::assert_snapshot!("recorded_kvm_detail", screen(&app, 100, 24));
}

#[test]
fn help_and_filters() {
    use Step::*;
    let slash = Key(KeyCode::Char('/'));
    let enter = Key(KeyCode::Enter);
    snapshot_after("help_overlay", &[Key(KeyCode::Char('?'))], 80, 24);
    snapshot_after(
        "filter_while_typing",
        &[Key(KeyCode::Char('/')), Type("u")],
        80,
        24,
    );
    snapshot_after(
        "filter_applied",
        &[Key(KeyCode::Char('/')), Type("QUIET"), Key(KeyCode::Enter)],
        80,
        24,
    );
    snapshot_after(
        "filter_matching_nothing",
        &[slash, Type("nope"), enter],
        80,
        12,
    );
}

fn open_detail(app: &mut App, name: &str) {
    press(app, KeyCode::Home);
    while app
        .snapshot()
        .vms
        .iter()
        .find(|v| Some(v.key) == app.selected())
        .is_some_and(|v| v.identity.name != name)
    {
        let before = app.selected();
        press(app, KeyCode::Char('j'));
        assert_ne!(before, app.selected(), "no VM {name:?} in the list");
    }
    press(app, KeyCode::Enter);
    assert!(matches!(app.view(), View::Detail(_)));
}

#[test]
fn waiting_for_the_first_sample() {
    let mut app = App::new();
    app.apply(LiveSnapshot::default());
    insta::assert_snapshot!(screen(&app, 80, 12));
}

/// A VM whose uprobes a `--max-overhead` budget duty-cycled: its windows' counts are scaled
/// estimates, marked `~` in the list and in its windows.
#[test]
fn estimated_counts_are_marked() {
    let mut snapshot = fixtures::snapshot();
    let vm = snapshot
        .vms
        .iter_mut()
        .find(|v| v.identity.name == "noisy-usb")
        .unwrap();
    let windows: Vec<WindowRecord> = vm
        .history
        .iter()
        .map(|r| {
            let mut r = (**r).clone();
            r.estimated = true;
            r.probed_seconds = Some(7.5);
            r
        })
        .collect();
    vm.history = windows.into();
    let mut app = App::new();
    app.apply(snapshot);
    let list = screen(&app, 80, 24);
    let row = list.lines().find(|l| l.contains("noisy-usb")).unwrap();
    assert!(row.contains('~'), "{list}");
    let quiet = list.lines().find(|l| l.contains("quiet")).unwrap();
    assert!(!quiet.contains('~'), "{list}");
    open_detail(&mut app, "noisy-usb");
    insta::assert_snapshot!(screen(&app, 80, 24));
}

#[test]
fn detail_scrolled_back() {
    let mut app = loaded();
    open_detail(&mut app, "noisy-usb");
    for _ in 0..5 {
        press(&mut app, KeyCode::Up);
    }
    insta::assert_snapshot!(screen(&app, 80, 24));
}

#[test]
fn detail_of_a_vm_that_went_away() {
    let mut app = loaded();
    open_detail(&mut app, "quiet");
    let mut snap = fixtures::snapshot();
    snap.vms.retain(|v| v.identity.name != "quiet");
    app.apply(snap);
    insta::assert_snapshot!(screen(&app, 80, 12));
}

#[test]
fn paused() {
    let mut app = loaded();
    press(&mut app, KeyCode::Char('p'));
    let mut newer = fixtures::snapshot();
    newer.t += 10.0;
    newer.vms.clear();
    app.apply(newer);
    insta::assert_snapshot!(screen(&app, 80, 24));
}

#[test]
fn hostile_vm_name_is_neutralized() {
    let mut app = App::new();
    app.apply(fixtures::hostile());
    let list = screen(&app, 80, 24);
    press(&mut app, KeyCode::Enter);
    let detail = screen(&app, 80, 24);
    for text in [&list, &detail] {
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "a control character reached the screen:\n{text}"
        );
        // Truncated to its column in the list, whole in the detail's title.
        crate::testing::assert_contains(text, "�[2J�]0;pw");
    }
    crate::testing::assert_contains(&detail, "VM �[2J�]0;pwned� ");
    // The uuid's right-to-left override is neutralized too.
    crate::testing::assert_contains(&detail, "�[31mred�txt.exe");
    insta::assert_snapshot!("hostile_list", list);
    insta::assert_snapshot!("hostile_detail", detail);
}

#[test]
fn na_is_dimmed_and_never_zero() {
    let app = loaded();
    let terminal = draw(&app, 80, 24);
    let buffer = terminal.backend().buffer();
    let text = buffer_text(buffer);
    let (y, line) = text
        .lines()
        .enumerate()
        .find(|(_, l)| l.contains("legacy-ubu"))
        .expect("legacy row");
    let x = line.find("n/a").expect("n/a in the legacy row");
    let x = line[..x].chars().count() as u16;
    let cell = &buffer[(x, y as u16)];
    assert!(cell.modifier.contains(Modifier::DIM), "{cell:?}");
    assert!(!line.contains(" 0 "), "{line}");
}

#[test]
fn a_window_that_just_started_is_pending_not_na() {
    let mut snap = fixtures::snapshot();
    snap.vms.retain(|v| v.identity.name == "fresh-boot");
    snap.vms[0].running_elapsed = 0.0;
    snap.vms[0].running.read = None;
    let mut app = App::new();
    app.apply(snap);
    let text = screen(&app, 80, 12);
    let row = text
        .lines()
        .find(|l| l.contains("fresh-boot"))
        .expect("the row");
    // CPU%, wake/s, timer/s, write/s, fd/s pending; read/s and vcpu/s (TCG) unavailable.
    assert_eq!(row.matches('…').count(), 5, "{row}");
    assert_eq!(row.matches("n/a").count(), 2, "{row}");
}

#[test]
fn nothing_panics_at_any_size() {
    let mut screens = Vec::new();
    let mut list = loaded();
    screens.push(App::new());
    let mut help = loaded();
    press(&mut help, KeyCode::Char('?'));
    screens.push(help);
    let mut filter = loaded();
    press(&mut filter, KeyCode::Char('/'));
    type_str(&mut filter, "no");
    screens.push(filter);
    for name in ["noisy-usb", "legacy-ubuntu", "fresh-boot", "batch-07"] {
        let mut detail = loaded();
        open_detail(&mut detail, name);
        screens.push(detail);
    }
    press(&mut list, KeyCode::Char('p'));
    screens.push(list);
    let mut hostile = App::new();
    hostile.apply(fixtures::hostile());
    screens.push(hostile);
    // Around every width and height where the layout changes.
    let widths = [
        0, 1, 2, 3, 5, 9, 10, 20, 39, 40, 59, 60, 71, 72, 79, 80, 81, 130,
    ];
    let heights = [0, 1, 2, 3, 4, 5, 6, 8, 11, 12, 13, 20, 24, 40];
    for app in &screens {
        for width in widths {
            for height in heights {
                draw(app, width, height);
            }
        }
    }
}

#[test]
fn the_list_scrolls_to_keep_the_selection_visible() {
    let mut snap = fixtures::snapshot();
    let template = fixtures::vm(&snap, "quiet").clone();
    snap.vms = (0..60u32)
        .map(|i| {
            let mut vm = template.clone();
            vm.key.pid = 10_000 + i;
            std::sync::Arc::make_mut(&mut vm.identity).pid = 10_000 + i;
            std::sync::Arc::make_mut(&mut vm.identity).name = format!("guest-{i:02}");
            vm
        })
        .collect();
    let mut app = App::new();
    app.apply(snap);
    press(&mut app, KeyCode::Char('s'));
    press(&mut app, KeyCode::Char('s'));
    press(&mut app, KeyCode::Char('s'));
    press(&mut app, KeyCode::Char('s'));
    press(&mut app, KeyCode::Char('s')); // by name
    press(&mut app, KeyCode::End);
    let text = screen(&app, 80, 24);
    let selected = text
        .lines()
        .find(|l| l.starts_with("\">"))
        .expect("selected row");
    assert!(selected.contains("60 guest-59"), "{text}");
    press(&mut app, KeyCode::Home);
    let text = screen(&app, 80, 24);
    let selected = text
        .lines()
        .find(|l| l.starts_with("\">"))
        .expect("selected row");
    assert!(selected.contains("1 guest-00"), "{text}");
}

/// 100 VMs of similar rates. The first VM discovered led the first snapshot; by the next one
/// it ranks #67. The screen must open on rank 1, not follow that VM down the list.
#[test]
fn top_opens_on_rank_1_with_100_vms() {
    let template = fixtures::vm(&fixtures::snapshot(), "quiet").clone();
    let snapshot = |leader_rate: u64| {
        let mut snap = fixtures::snapshot();
        snap.vms = (0..100u32)
            .map(|i| {
                let mut vm = template.clone();
                vm.key.pid = 20_000 + i;
                std::sync::Arc::make_mut(&mut vm.identity).pid = 20_000 + i;
                std::sync::Arc::make_mut(&mut vm.identity).name = format!("vm-{i:03}");
                let timer = if i == 0 {
                    leader_rate
                } else {
                    30_000 - 10 * u64::from(i)
                };
                let history: Vec<crate::record::WindowRecord> = vm
                    .history
                    .iter()
                    .map(|r| {
                        let mut r = (**r).clone();
                        r.vm.name = vm.identity.name.clone();
                        r.vm.pid = vm.identity.pid;
                        r.timer = Some(timer);
                        // Ranked by CPU: a thousandth of a CPU second per timer event.
                        r.cpu_seconds = Some(timer as f64 / 1000.0);
                        r
                    })
                    .collect();
                vm.history = history.into();
                vm
            })
            .collect();
        snap
    };
    let mut app = App::new();
    app.apply(snapshot(40_000));
    // vm-000 now sits between vm-066 (29,340) and vm-067 (29,330): rank 67.
    app.apply(snapshot(29_335));
    let rows = app.rows();
    assert_eq!(rows[66].vm.identity.name, "vm-000");
    assert_eq!(app.selected_position(&rows), Some(0));
    insta::assert_snapshot!(screen(&app, 80, 24));
}

#[test]
fn a_note_shows_in_the_status_line() {
    let mut snap = fixtures::snapshot();
    snap.notes = vec![
        (2.0, crate::note::Note::general("first")),
        (
            fixtures::T - 4.0,
            crate::note::Note::vm(
                "legacy-ubuntu",
                "no QMP socket on its command line; KVM ports and pages are named by address",
            ),
        ),
    ];
    let mut app = App::new();
    app.apply(snap);
    insta::assert_snapshot!(screen(&app, 100, 24));
}

#[test]
fn resizing_redraws_to_the_new_size() {
    let app = loaded();
    let mut terminal = Terminal::new(TestBackend::new(80, 24)).unwrap();
    terminal.draw(|f| app.render(f)).unwrap();
    terminal.backend_mut().resize(60, 20);
    terminal.draw(|f| app.render(f)).unwrap();
    assert_eq!(terminal.backend().to_string(), screen(&app, 60, 20));
}

fn key(code: KeyCode) -> io::Result<Event> {
    Ok(Event::Key(KeyEvent::new(code, KeyModifiers::NONE)))
}

/// The screen after `run` took `keys` (the last one quitting) over the fixture snapshot.
async fn screen_after(keys: &[KeyCode]) -> String {
    let mut terminal = Terminal::new(TestBackend::new(80, 24)).unwrap();
    let (_tx, rx) = watch::channel(fixtures::snapshot());
    let events = stream::iter(keys.iter().map(|k| key(*k)));
    run(&mut terminal, events, rx, Duration::from_secs(3600))
        .await
        .unwrap();
    terminal.backend().to_string()
}

#[tokio::test]
async fn run_drives_the_screens_and_quits_on_q() {
    use KeyCode::{Char, Enter, Esc};
    let text = screen_after(&[Char('j'), Enter, Esc, Char('q')]).await;
    // Back on the list with the second VM selected.
    let selected = text
        .lines()
        .find(|l| l.starts_with("\">"))
        .expect("a selected row");
    assert!(selected.contains("fresh-boot"), "{text}");
    crate::testing::assert_contains(&text, "ranked by CPU%");
}

#[tokio::test]
async fn run_shows_the_detail_view() {
    use KeyCode::{Char, Enter};
    let text = screen_after(&[Char('j'), Enter, Char('q')]).await;
    crate::testing::assert_contains(&text, "VM fresh-boot");
    crate::testing::assert_contains(&text, "running");
}

#[tokio::test]
async fn run_applies_updates_and_stops_when_the_collector_goes() {
    let mut terminal = Terminal::new(TestBackend::new(80, 24)).unwrap();
    let (tx, rx) = watch::channel(LiveSnapshot::default());
    let driver = async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.send(fixtures::snapshot()).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Dropping the sender closes the channel.
    };
    let (result, ()) = tokio::join!(
        run(
            &mut terminal,
            stream::pending(),
            rx,
            Duration::from_millis(5)
        ),
        driver
    );
    result.unwrap();
    let text = terminal.backend().to_string();
    crate::testing::assert_contains(&text, "noisy-usb");
    crate::testing::assert_contains(&text, "window 012");
}

#[tokio::test]
async fn run_quits_on_ctrl_c_and_survives_the_end_of_events() {
    let mut terminal = Terminal::new(TestBackend::new(40, 10)).unwrap();
    let (_tx, rx) = watch::channel(fixtures::snapshot());
    let ctrl_c = Ok(Event::Key(KeyEvent::new(
        KeyCode::Char('c'),
        KeyModifiers::CONTROL,
    )));
    run(
        &mut terminal,
        stream::iter([ctrl_c]),
        rx,
        Duration::from_millis(5),
    )
    .await
    .unwrap();

    // Events end without a quit: the UI keeps going until the collector goes.
    let (tx, rx) = watch::channel(fixtures::snapshot());
    let closer = async move {
        tokio::time::sleep(Duration::from_millis(30)).await;
        drop(tx);
    };
    let (result, ()) = tokio::join!(
        run(&mut terminal, stream::empty(), rx, Duration::from_millis(5)),
        closer
    );
    result.unwrap();
}

#[tokio::test]
async fn run_reports_a_terminal_error() {
    let mut terminal = Terminal::new(TestBackend::new(40, 10)).unwrap();
    let (_tx, rx) = watch::channel(fixtures::snapshot());
    let broken = stream::iter([Err(io::Error::other("tty gone"))]);
    let err = run(&mut terminal, broken, rx, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("tty gone"), "{err:#}");
}
