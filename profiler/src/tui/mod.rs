//! `profiler top`: a live ranking of the VMs whose device models wake the host most.
//!
//! [`run`] is the event loop; [`App`] holds the state and draws it, with no I/O, so tests
//! drive it (and `run` itself) on a [`ratatui::backend::TestBackend`]. The caller owns the real
//! terminal, through [`TerminalGuard`], and feeds `run` the collector's snapshots.

mod app;
mod model;
mod render;
mod terminal;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod tests;

use std::{io, time::Duration};

use anyhow::Context as _;
use crossterm::event::Event;
use futures_util::{Stream, StreamExt as _};
use ratatui::{Terminal, backend::Backend};
use tokio::{sync::watch, time::MissedTickBehavior};

pub use app::{App, View};
pub use model::{SortKey, clean};
pub use terminal::{TerminalGuard, install_panic_hook, restore};

use crate::windows::live::LiveSnapshot;

/// Runs the UI until the user quits (`q`, Ctrl-C) or the collector drops its end of `updates`.
///
/// - `events`: terminal events, e.g. `crossterm::event::EventStream::new()`. If the stream
///   ends, the UI keeps showing updates until `updates` closes.
/// - `updates`: the collector's latest snapshot. A watch channel because every snapshot is the
///   whole state, so only the newest matters: a slow terminal never makes the collector wait
///   or queue snapshots, and the value already in the channel is drawn at once.
/// - `tick`: redraw period when nothing else happens.
///
/// The screen is redrawn after every event, update and tick (a resize is picked up by the
/// next draw).
pub async fn run<B>(
    terminal: &mut Terminal<B>,
    mut events: impl Stream<Item = io::Result<Event>> + Unpin,
    mut updates: watch::Receiver<LiveSnapshot>,
    tick: Duration,
) -> anyhow::Result<()>
where
    B: Backend,
    B::Error: Send + Sync + 'static,
{
    let mut app = App::new();
    app.apply(updates.borrow_and_update().clone());
    let mut ticker = tokio::time::interval(tick.max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut events_open = true;
    loop {
        terminal
            .draw(|frame| app.render(frame))
            .context("drawing the terminal")?;
        tokio::select! {
            _ = ticker.tick() => {}
            event = events.next(), if events_open => match event {
                Some(Ok(event)) => app.handle_event(event),
                Some(Err(e)) => return Err(e).context("reading terminal events"),
                None => events_open = false,
            },
            changed = updates.changed() => match changed {
                Ok(()) => app.apply(updates.borrow_and_update().clone()),
                // The collector is gone: nothing more will be shown.
                Err(_) => return Ok(()),
            },
        }
        if app.should_quit() {
            return Ok(());
        }
    }
}
