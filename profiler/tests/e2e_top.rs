//! End-to-end: `profiler top` in a real terminal (tmux) against real guests.

mod common;

use std::{
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

use common::*;
use xtask::launch::DeviceSet;

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux").args(args).output().expect("tmux runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn capture(session: &str) -> String {
    tmux(&["capture-pane", "-p", "-t", session])
}

/// The noisy guest ranks above the quiet one, a hostile name cannot reach the terminal, and
/// `q` quits and gives the terminal back (cooked mode, echo on).
#[test]
fn top_ranks_noisy_above_quiet_and_q_restores_the_terminal() {
    let Some(image) = e2e_guest_image("top_in_tmux") else {
        return;
    };
    if !Command::new("tmux")
        .arg("-V")
        .status()
        .is_ok_and(|s| s.success())
    {
        panic!("tmux is missing: `cargo xtask setup` installs it");
    }
    let dir = run_dir("top");
    let noisy = boot("e2e-top-noisy", DeviceSet::Noisy, &image, dir.path());
    let quiet = boot("e2e-top-quiet", DeviceSet::Quiet, &image, dir.path());
    let session = format!("profiler-e2e-{}", std::process::id());
    let profiler = env!("CARGO_BIN_EXE_profiler");
    // After top exits, print the terminal mode so the test can see it was restored.
    let script = format!(
        "{profiler} top --window 2 --vm e2e-top-noisy --vm e2e-top-quiet; \
         echo TOP-EXITED rc=$?; stty -a | tr ' ' '\\n' | grep -E '^-?(icanon|echo)$' | tr '\\n' ' '; \
         echo; sleep 60"
    );
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "100",
        "-y",
        "30",
        &script,
    ]);
    let kill = scopeguard(session.clone());

    // Two closed 2 s windows, then read the ranking.
    let deadline = Instant::now() + Duration::from_secs(30);
    let screen = loop {
        sleep(Duration::from_secs(1));
        let screen = capture(&session);
        if screen.contains("window 003") || Instant::now() > deadline {
            break screen;
        }
    };
    eprintln!("{screen}");
    let row = |name: &str| {
        screen
            .lines()
            .position(|l| l.contains(name))
            .unwrap_or_else(|| panic!("{name} not on screen:\n{screen}"))
    };
    assert!(row("e2e-top-noisy") < row("e2e-top-quiet"), "{screen}");
    assert!(screen.contains(&noisy.pid().to_string()));
    assert!(screen.contains(&quiet.pid().to_string()));

    tmux(&["send-keys", "-t", &session, "q"]);
    sleep(Duration::from_secs(2));
    let after = capture(&session);
    assert!(after.contains("TOP-EXITED rc=0"), "{after}");
    assert!(
        after.contains("icanon") && !after.contains("-icanon"),
        "{after}"
    );
    assert!(
        after.contains("echo") && !after.contains("-echo "),
        "{after}"
    );
    drop(kill);
}

/// Kills the tmux session when the test ends, pass or fail.
struct KillSession(String);

impl Drop for KillSession {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .status();
    }
}

fn scopeguard(session: String) -> KillSession {
    KillSession(session)
}
