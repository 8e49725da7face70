//! The state of `profiler top` and what keys do to it. No I/O: tests drive it directly.

use crossterm::event::{Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use crate::{
    identity::discovery::VmKey,
    tui::model::{SortKey, VmRow, ranked_rows},
    windows::live::{LiveSnapshot, LiveVm},
};

/// Rows moved by PageUp / PageDown.
const PAGE: isize = 10;

/// Which screen is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum View {
    /// The ranking of all VMs.
    #[default]
    List,
    /// One VM: its windows, devices, timer callbacks, identity.
    Detail(VmKey),
}

/// Everything the screens show, and the user's choices.
#[derive(Debug, Default)]
pub struct App {
    /// The snapshot on screen.
    pub(super) shown: LiveSnapshot,
    /// The newest snapshot received while paused.
    held: Option<LiveSnapshot>,
    pub(super) paused: bool,
    pub(super) sort: SortKey,
    /// Case-insensitive substring of VM names; empty shows all.
    pub(super) filter: String,
    /// Typing goes into the filter.
    pub(super) editing_filter: bool,
    pub(super) view: View,
    /// The selected VM; `selected_index` is where it was, for when it disappears.
    pub(super) selected: Option<VmKey>,
    selected_index: usize,
    /// The user moved the selection: it follows that VM across re-ranking. Until then (and
    /// after Home) it stays on row 1, so the screen opens on the top of the ranking.
    following: bool,
    pub(super) help: bool,
    /// Detail view: closed windows scrolled back from the newest.
    pub(super) detail_scroll: usize,
    quit: bool,
}

impl App {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes a new snapshot from the collector. While paused it is held, not shown.
    pub fn apply(&mut self, snapshot: LiveSnapshot) {
        if self.paused {
            self.held = Some(snapshot);
        } else {
            self.shown = snapshot;
            self.fix_selection();
        }
    }

    /// The user asked to quit.
    pub fn should_quit(&self) -> bool {
        self.quit
    }

    pub fn view(&self) -> View {
        self.view
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    pub fn sort_key(&self) -> SortKey {
        self.sort
    }

    pub fn filter(&self) -> &str {
        &self.filter
    }

    /// The selected VM's key, if any VM is listed.
    pub fn selected(&self) -> Option<VmKey> {
        self.selected
    }

    /// The snapshot on screen (frozen while paused).
    pub fn snapshot(&self) -> &LiveSnapshot {
        &self.shown
    }

    /// A terminal event; only keys change anything (a resize is handled by the next draw).
    pub fn handle_event(&mut self, event: Event) {
        if let Event::Key(key) = event {
            self.handle_key(key);
        }
    }

    pub fn handle_key(&mut self, key: KeyEvent) {
        if key.kind == KeyEventKind::Release {
            return;
        }
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        if ctrl && matches!(key.code, KeyCode::Char('c' | 'C')) {
            self.quit = true;
            return;
        }
        if self.help {
            match key.code {
                KeyCode::Esc | KeyCode::Char('?') | KeyCode::Enter => self.help = false,
                KeyCode::Char('q') => self.quit = true,
                _ => {}
            }
            return;
        }
        if self.editing_filter {
            self.edit_filter(key.code, ctrl);
            return;
        }
        match key.code {
            KeyCode::Char('q') => self.quit = true,
            KeyCode::Char('?') => self.help = true,
            KeyCode::Char('p') => self.toggle_pause(),
            _ => match self.view {
                View::List => self.list_key(key.code),
                View::Detail(_) => self.detail_key(key.code),
            },
        }
    }

    fn list_key(&mut self, code: KeyCode) {
        match code {
            KeyCode::Down | KeyCode::Char('j') => self.move_selection(1),
            KeyCode::Up | KeyCode::Char('k') => self.move_selection(-1),
            KeyCode::PageDown => self.move_selection(PAGE),
            KeyCode::PageUp => self.move_selection(-PAGE),
            KeyCode::Home | KeyCode::Char('g') => {
                self.move_selection(isize::MIN);
                self.following = false;
            }
            KeyCode::End | KeyCode::Char('G') => self.move_selection(isize::MAX),
            KeyCode::Enter => {
                if let Some(key) = self.selected {
                    self.view = View::Detail(key);
                    self.detail_scroll = 0;
                }
            }
            KeyCode::Esc => {
                self.filter.clear();
                self.fix_selection();
            }
            KeyCode::Char('s') => {
                self.sort = self.sort.next();
                self.fix_selection();
            }
            KeyCode::Char('/') => self.editing_filter = true,
            _ => {}
        }
    }

    fn detail_key(&mut self, code: KeyCode) {
        let windows = self.detail_vm().map_or(0, |vm| vm.history.len());
        match code {
            KeyCode::Esc | KeyCode::Backspace | KeyCode::Left | KeyCode::Char('h') => {
                self.view = View::List;
            }
            // Older windows.
            KeyCode::Up | KeyCode::Char('k') => {
                self.detail_scroll = (self.detail_scroll + 1).min(windows);
            }
            KeyCode::PageUp => {
                self.detail_scroll = (self.detail_scroll + PAGE as usize).min(windows);
            }
            // Back towards the running window.
            KeyCode::Down | KeyCode::Char('j') => {
                self.detail_scroll = self.detail_scroll.saturating_sub(1);
            }
            KeyCode::PageDown => {
                self.detail_scroll = self.detail_scroll.saturating_sub(PAGE as usize);
            }
            KeyCode::End | KeyCode::Char('G') => self.detail_scroll = 0,
            _ => {}
        }
    }

    /// Typing edits the filter (the list follows as you type); Enter keeps it, Esc clears it.
    fn edit_filter(&mut self, code: KeyCode, ctrl: bool) {
        match code {
            KeyCode::Enter => {
                self.editing_filter = false;
                // The VM the filter found is the one the user wants: follow it from now on.
                self.following |= !self.filter.is_empty() && self.selected.is_some();
            }
            KeyCode::Esc => {
                self.filter.clear();
                self.editing_filter = false;
            }
            KeyCode::Backspace => {
                self.filter.pop();
            }
            KeyCode::Char('u') if ctrl => self.filter.clear(),
            KeyCode::Char(c) if !ctrl && !c.is_control() => self.filter.push(c),
            _ => return,
        }
        self.fix_selection();
    }

    fn toggle_pause(&mut self) {
        self.paused = !self.paused;
        if !self.paused
            && let Some(s) = self.held.take()
        {
            self.shown = s;
            self.fix_selection();
        }
    }

    /// The list as shown: ranked by the sort key, filtered by name.
    pub(super) fn rows(&self) -> Vec<VmRow<'_>> {
        ranked_rows(&self.shown, self.sort, &self.filter)
    }

    /// Where the selection is in `rows`.
    pub(super) fn selected_position(&self, rows: &[VmRow<'_>]) -> Option<usize> {
        let key = self.selected?;
        rows.iter().position(|r| r.vm.key == key)
    }

    /// The VM the detail view shows, while it is in the snapshot.
    pub(super) fn detail_vm(&self) -> Option<&LiveVm> {
        match self.view {
            View::Detail(key) => self.shown.vms.iter().find(|v| v.key == key),
            View::List => None,
        }
    }

    /// Keeps the selection on row 1 until the user moves it; then keeps that VM selected
    /// wherever it moved, and if it is gone (exited, filtered out), selects whatever is now at
    /// its old position.
    fn fix_selection(&mut self) {
        let keys: Vec<VmKey> = self.rows().iter().map(|r| r.vm.key).collect();
        if keys.is_empty() {
            self.selected = None;
            return;
        }
        if !self.following {
            self.selected_index = 0;
            self.selected = Some(keys[0]);
            return;
        }
        if let Some(pos) = self
            .selected
            .and_then(|key| keys.iter().position(|k| *k == key))
        {
            self.selected_index = pos;
        } else {
            self.selected_index = self.selected_index.min(keys.len() - 1);
            self.selected = Some(keys[self.selected_index]);
        }
    }

    fn move_selection(&mut self, delta: isize) {
        let keys: Vec<VmKey> = self.rows().iter().map(|r| r.vm.key).collect();
        if keys.is_empty() {
            self.selected = None;
            return;
        }
        let current = self
            .selected
            .and_then(|key| keys.iter().position(|k| *k == key))
            .unwrap_or(0);
        let last = keys.len() - 1;
        let next = current.saturating_add_signed(delta).min(last);
        self.selected_index = next;
        self.selected = Some(keys[next]);
        self.following = true;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::tui::fixtures;

    pub(crate) fn press(app: &mut App, code: KeyCode) {
        app.handle_key(KeyEvent::new(code, KeyModifiers::NONE));
    }

    pub(crate) fn type_str(app: &mut App, s: &str) {
        for c in s.chars() {
            press(app, KeyCode::Char(c));
        }
    }

    pub(crate) fn loaded() -> App {
        let mut app = App::new();
        app.apply(fixtures::snapshot());
        app
    }

    fn selected_name(app: &App) -> String {
        let key = app.selected().expect("a selection");
        app.snapshot()
            .vms
            .iter()
            .find(|v| v.key == key)
            .unwrap()
            .identity
            .name
            .clone()
    }

    #[test]
    fn first_snapshot_selects_the_top_vm() {
        let app = loaded();
        assert_eq!(selected_name(&app), "noisy-usb");
        assert!(App::new().selected().is_none());
    }

    #[test]
    fn selection_moves_and_stops_at_the_ends() {
        let mut app = loaded();
        press(&mut app, KeyCode::Char('j'));
        assert_eq!(selected_name(&app), "fresh-boot");
        press(&mut app, KeyCode::Down);
        assert_eq!(selected_name(&app), "legacy-ubuntu");
        press(&mut app, KeyCode::Up);
        press(&mut app, KeyCode::Char('k'));
        press(&mut app, KeyCode::Char('k'));
        assert_eq!(selected_name(&app), "noisy-usb");
        press(&mut app, KeyCode::End);
        assert_eq!(selected_name(&app), "batch-07");
        press(&mut app, KeyCode::Char('j'));
        assert_eq!(selected_name(&app), "batch-07");
        press(&mut app, KeyCode::Home);
        assert_eq!(selected_name(&app), "noisy-usb");
        press(&mut app, KeyCode::PageDown);
        assert_eq!(selected_name(&app), "batch-07");
    }

    #[test]
    fn selection_follows_the_vm_when_the_ranking_changes() {
        let mut app = loaded();
        press(&mut app, KeyCode::Char('j'));
        assert_eq!(selected_name(&app), "fresh-boot");
        while app.sort_key() != SortKey::Read {
            press(&mut app, KeyCode::Char('s')); // read: fresh-boot ranks first now
        }
        assert_eq!(app.selected_position(&app.rows()), Some(0));
        assert_eq!(selected_name(&app), "fresh-boot");

        // The selected VM vanishes: the selection stays at its position.
        let mut snap = fixtures::snapshot();
        snap.vms.retain(|v| v.identity.name != "fresh-boot");
        app.apply(snap);
        assert_eq!(app.selected_position(&app.rows()), Some(0));
        assert_eq!(selected_name(&app), "noisy-usb");
    }

    #[test]
    fn until_the_user_moves_the_selection_it_stays_on_the_top_row() {
        let mut app = App::new();
        let mut snap = fixtures::snapshot();
        app.apply(snap.clone());
        assert_eq!(selected_name(&app), "noisy-usb");
        // The ranking changes under an untouched selection: still row 1.
        snap.vms.retain(|v| v.identity.name != "noisy-usb");
        app.apply(snap);
        assert_eq!(app.selected_position(&app.rows()), Some(0));
        assert_eq!(selected_name(&app), "fresh-boot");
        // Sorting by another key keeps it on top too.
        press(&mut app, KeyCode::Char('s'));
        assert_eq!(app.selected_position(&app.rows()), Some(0));
        // Once moved it follows its VM; Home puts it back on the top row for good.
        press(&mut app, KeyCode::Char('j'));
        let followed = app.selected();
        press(&mut app, KeyCode::Char('s'));
        assert_eq!(app.selected(), followed);
        press(&mut app, KeyCode::Home);
        app.apply(fixtures::snapshot());
        assert_eq!(app.selected_position(&app.rows()), Some(0));
    }

    #[test]
    fn sort_key_cycles() {
        let mut app = loaded();
        let mut seen = Vec::new();
        for _ in SortKey::ALL {
            seen.push(app.sort_key());
            press(&mut app, KeyCode::Char('s'));
        }
        assert_eq!(seen, SortKey::ALL);
        assert_eq!(app.sort_key(), SortKey::Cpu);
    }

    #[test]
    fn filter_edits_live_enter_keeps_esc_clears() {
        let mut app = loaded();
        press(&mut app, KeyCode::Char('/'));
        type_str(&mut app, "quX");
        press(&mut app, KeyCode::Backspace);
        assert_eq!(app.filter(), "qu");
        // `q` while typing is text, not quit.
        assert!(!app.should_quit());
        assert_eq!(app.rows().len(), 1);
        assert_eq!(selected_name(&app), "quiet");
        press(&mut app, KeyCode::Enter);
        assert!(!app.editing_filter);
        assert_eq!(app.filter(), "qu");
        // Keys act normally again.
        press(&mut app, KeyCode::Char('/'));
        press(&mut app, KeyCode::Esc);
        assert_eq!(app.filter(), "");
        assert_eq!(app.rows().len(), 5);
        assert_eq!(selected_name(&app), "quiet");

        // Esc in the list clears an applied filter too.
        press(&mut app, KeyCode::Char('/'));
        type_str(&mut app, "zzz");
        press(&mut app, KeyCode::Enter);
        assert!(app.rows().is_empty());
        assert!(app.selected().is_none());
        press(&mut app, KeyCode::Esc);
        assert_eq!(app.rows().len(), 5);
        assert!(app.selected().is_some());
    }

    #[test]
    fn enter_opens_the_detail_and_esc_goes_back() {
        let mut app = loaded();
        press(&mut app, KeyCode::Char('j'));
        let key = app.selected().unwrap();
        press(&mut app, KeyCode::Enter);
        assert_eq!(app.view(), View::Detail(key));
        // The detail stays on its VM when the ranking changes under it.
        app.apply(fixtures::snapshot());
        assert_eq!(app.detail_vm().unwrap().key, key);
        press(&mut app, KeyCode::Up);
        press(&mut app, KeyCode::Up);
        assert_eq!(app.detail_scroll, 0, "fresh-boot has no closed window");
        press(&mut app, KeyCode::Esc);
        assert_eq!(app.view(), View::List);

        press(&mut app, KeyCode::Home);
        press(&mut app, KeyCode::Enter);
        for _ in 0..20 {
            press(&mut app, KeyCode::Char('k'));
        }
        assert_eq!(app.detail_scroll, 12);
        press(&mut app, KeyCode::Char('j'));
        assert_eq!(app.detail_scroll, 11);
    }

    #[test]
    fn pause_freezes_the_screen_and_resume_catches_up() {
        let mut app = loaded();
        press(&mut app, KeyCode::Char('p'));
        assert!(app.is_paused());
        let mut newer = fixtures::snapshot();
        newer.t += 1.0;
        newer.vms.truncate(1);
        app.apply(newer.clone());
        assert_eq!(app.snapshot().t, fixtures::T);
        assert_eq!(app.snapshot().vms.len(), 5);
        press(&mut app, KeyCode::Char('p'));
        assert!(!app.is_paused());
        assert_eq!(app.snapshot().t, newer.t);
        assert_eq!(app.snapshot().vms.len(), 1);
    }

    #[test]
    fn help_quit_and_ctrl_c() {
        let mut app = loaded();
        press(&mut app, KeyCode::Char('?'));
        assert!(app.help);
        press(&mut app, KeyCode::Char('j')); // ignored under help
        assert_eq!(selected_name(&app), "noisy-usb");
        press(&mut app, KeyCode::Esc);
        assert!(!app.help);
        press(&mut app, KeyCode::Char('q'));
        assert!(app.should_quit());

        let mut app = loaded();
        press(&mut app, KeyCode::Char('/'));
        app.handle_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL));
        assert!(app.should_quit());
        assert_eq!(app.filter(), "");
    }

    #[test]
    fn key_releases_are_ignored() {
        let mut app = loaded();
        let mut release = KeyEvent::new(KeyCode::Char('q'), KeyModifiers::NONE);
        release.kind = KeyEventKind::Release;
        app.handle_event(Event::Key(release));
        assert!(!app.should_quit());
        app.handle_event(Event::Resize(10, 10));
        assert!(!app.should_quit());
    }
}
