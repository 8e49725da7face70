//! Entering and leaving the terminal's full-screen mode, also when the program panics.

use std::{
    io::{self, Stdout, stdout},
    ops::{Deref, DerefMut},
    sync::{
        Once,
        atomic::{AtomicBool, Ordering},
    },
};

use crossterm::{
    cursor, execute,
    terminal::{EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode},
};
use ratatui::{Terminal, backend::CrosstermBackend};

/// The terminal is in raw mode on the alternate screen because of us.
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Installs (once) a panic hook that restores the terminal before the panic message prints,
/// so the message is readable and the shell usable. It does nothing while no
/// [`TerminalGuard`] is active, so it is safe to install early.
pub fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let _ = restore();
            previous(info);
        }));
    });
}

/// Leaves the alternate screen and raw mode and shows the cursor, if a [`TerminalGuard`] had
/// entered them; otherwise does nothing. Every step is tried even if one fails.
pub fn restore() -> io::Result<()> {
    if !ACTIVE.swap(false, Ordering::SeqCst) {
        return Ok(());
    }
    let raw = disable_raw_mode();
    let screen = execute!(stdout(), LeaveAlternateScreen, cursor::Show);
    raw.and(screen)
}

/// The terminal in full-screen mode (raw mode, alternate screen) for as long as it lives;
/// dropping it, or a panic anywhere, restores the terminal. Derefs to the ratatui
/// [`Terminal`] to pass to [`super::run`].
pub struct TerminalGuard {
    terminal: Terminal<CrosstermBackend<Stdout>>,
}

impl TerminalGuard {
    /// Fails (with the terminal left as it was) when standard output is not a terminal.
    pub fn new() -> io::Result<Self> {
        install_panic_hook();
        enable_raw_mode()?;
        ACTIVE.store(true, Ordering::SeqCst);
        let entered = execute!(stdout(), EnterAlternateScreen, cursor::Hide)
            .and_then(|()| Terminal::new(CrosstermBackend::new(stdout())));
        match entered {
            Ok(terminal) => Ok(Self { terminal }),
            Err(e) => {
                let _ = restore();
                Err(e)
            }
        }
    }
}

impl Deref for TerminalGuard {
    type Target = Terminal<CrosstermBackend<Stdout>>;

    fn deref(&self) -> &Self::Target {
        &self.terminal
    }
}

impl DerefMut for TerminalGuard {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.terminal
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        let _ = restore();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_without_a_guard_writes_nothing_and_succeeds() {
        install_panic_hook();
        install_panic_hook();
        assert!(!ACTIVE.load(Ordering::SeqCst));
        restore().unwrap();
    }
}
