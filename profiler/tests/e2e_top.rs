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
    if Prereq::new("top_in_tmux").tool("tmux").is_none() {
        return;
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
         echo; echo TTY-CHECKED; sleep 60"
    );
    let kill = start_session(&session, &script, 100, 30);
    let screen = screen_showing(&session, "window 003");
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
    // Quitting detaches every probe: the kernel removes uprobes one at a time (about 10 a
    // second on a loaded machine here), so give it time.
    let quit = Instant::now();
    let deadline = quit + HANG;
    let after = loop {
        sleep(Duration::from_millis(500));
        let after = capture(&session);
        // The mode line comes after the exit line: wait for the marker printed after both
        // (a capture between the two once failed the check below).
        if after.contains("TTY-CHECKED") || Instant::now() > deadline {
            break after;
        }
    };
    eprintln!("top quit in {:.1} s", quit.elapsed().as_secs_f64());
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

/// `script` in a detached tmux session of `width` × `height`, killed when the guard drops.
fn start_session(session: &str, script: &str, width: u16, height: u16) -> KillSession {
    let (width, height) = (width.to_string(), height.to_string());
    tmux(&[
        "new-session",
        "-d",
        "-s",
        session,
        "-x",
        &width,
        "-y",
        &height,
        script,
    ]);
    KillSession(session.to_string())
}

/// The screen once it shows `marker` (checked each second), or as it is after [`HANG`].
fn screen_showing(session: &str, marker: &str) -> String {
    let deadline = Instant::now() + HANG;
    loop {
        sleep(Duration::from_secs(1));
        let screen = capture(session);
        if screen.contains(marker) || Instant::now() > deadline {
            return screen;
        }
    }
}

/// A KVM guest without a QMP socket (as under libvirt, which holds the monitor): the profiler
/// has something to say about it, and says it in the status line, not over the screen.
#[test]
fn top_shows_notes_in_its_status_line_and_stays_intact() {
    let name = "e2e-top-kvm-noqmp";
    let Some(_qemu) = kvm_guest_without_qmp(name) else {
        return;
    };
    if Prereq::new("top_status_line").tool("tmux").is_none() {
        return;
    }
    let session = format!("profiler-e2e-notes-{}", std::process::id());
    let profiler = env!("CARGO_BIN_EXE_profiler");
    let script = format!("{profiler} top --window 2 --vm {name} 2>&1; sleep 60");
    let kill = start_session(&session, &script, 100, 24);
    let screen = screen_showing(&session, "window 002");
    eprintln!("{screen}");
    let lines: Vec<&str> = screen.lines().collect();
    assert!(lines[0].starts_with("window 00"), "{screen}");
    assert!(lines[1].starts_with("host  1 VMs"), "{screen}");
    assert!(
        lines[2].starts_with("probes  hrtimer tracepoints"),
        "{screen}"
    );
    assert!(lines[3].starts_with("cost  BPF "), "{screen}");
    assert!(lines[2].contains("kvm tracepoints"), "{screen}");
    let status = lines
        .iter()
        .find(|l| l.starts_with("note "))
        .unwrap_or_else(|| panic!("no status line:\n{screen}"));
    assert!(status.contains("no QMP socket"), "{screen}");
    assert!(
        lines.last().unwrap().starts_with("q quit"),
        "the key line is intact:\n{screen}"
    );
    assert!(screen.contains(name), "{screen}");
    // Nothing was written outside ratatui: no stray "profiler:" text anywhere.
    assert!(!screen.contains("profiler:"), "{screen}");
    tmux(&["send-keys", "-t", &session, "q"]);
    drop(kill);
}

/// Under KVM a guest whose only activity is its own 1 kHz timer costs its QEMU a share of a
/// core that never reaches QEMU's event loop: `top` ranks it above SeaBIOS idling, and its
/// detail view says its vCPU thread took that CPU.
#[test]
fn top_ranks_a_kvm_guest_s_own_timer_first_and_shows_its_vcpu_share() {
    use xtask::boot_sector::{BootSector, BootSectorGuest};
    let test = "top_kvm_guest_tick";
    let p = Prereq::new(test);
    if p.root().is_none() || p.kvm().is_none() || p.system_qemu().is_none() {
        return;
    }
    if p.tool("tmux").is_none() {
        return;
    }
    let dir = run_dir("top-kvm");
    let mut guests = Vec::new();
    // SeaBIOS first: the default order of discovery would otherwise favour the PIT guest.
    for spec in [
        BootSectorGuest::seabios("e2e-top-bios"),
        BootSectorGuest::new("e2e-top-pit", BootSector::Pit { hz: 1000 }),
    ] {
        let guest = spec.launch(dir.path()).expect("QEMU starts");
        guest.wait_for_line(&spec.ready_line(), BOOT).expect("runs");
        guests.push(guest);
    }
    let session = format!("profiler-e2e-kvm-{}", std::process::id());
    let profiler = env!("CARGO_BIN_EXE_profiler");
    let script =
        format!("{profiler} top --window 3 --vm e2e-top-bios --vm e2e-top-pit 2>&1; sleep 60");
    let kill = start_session(&session, &script, 110, 30);
    let screen = screen_showing(&session, "window 002");
    eprintln!("{screen}");
    let rank1 = screen
        .lines()
        .find(|l| l.starts_with("> 1 "))
        .unwrap_or_else(|| panic!("no rank 1:\n{screen}"));
    assert!(rank1.contains("e2e-top-pit"), "{screen}");
    assert!(screen.contains("ranked by CPU%"), "{screen}");

    // Rank 1 is selected: its detail view.
    tmux(&["send-keys", "-t", &session, "Enter"]);
    let deadline = Instant::now() + HANG;
    let detail = loop {
        sleep(Duration::from_millis(500));
        let screen = capture(&session);
        if screen.contains("vCPU threads") || Instant::now() > deadline {
            break screen;
        }
    };
    eprintln!("{detail}");
    let share: f64 = detail
        .split("vCPU threads ")
        .nth(1)
        .and_then(|rest| rest.split('%').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no vCPU share:\n{detail}"));
    assert!(share >= 90.0, "{detail}");
    assert!(detail.contains("vCPU wakeups"), "{detail}");
    tmux(&["send-keys", "-t", &session, "q"]);
    drop(kill);
}
