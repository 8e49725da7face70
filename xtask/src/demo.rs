//! `cargo xtask demo`: the whole story on real guests. Boots `noisy` (default devices + a USB
//! tablet on UHCI) and `quiet` (no USB, parallel port, VGA or NIC) and opens `profiler top` on
//! them; on quitting (or without a terminal, or with `--no-tui`: a fixed `--duration`
//! recording) it prints the Pulsar table of each. The guests run on the QEMU built with USDT
//! probes when `cargo xtask qemu-usdt` has built it, so read/write counts show too.

use std::{io::IsTerminal as _, path::Path, process::Command, time::Duration};

use anyhow::Context as _;
use xtask::launch::{DeviceSet, GuestSpec, launch};

use crate::setup::{run, setup};

fn flag(args: &[String], name: &str, default: u64) -> anyhow::Result<u64> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()
            .with_context(|| format!("{name} takes whole seconds")),
        None => Ok(default),
    }
}

/// Builds the release profiler binary and returns its path.
pub fn build_profiler(root: &Path) -> anyhow::Result<std::path::PathBuf> {
    eprintln!("xtask: building the profiler (release)");
    run(Command::new(env!("CARGO")).current_dir(root).args([
        "build",
        "--release",
        "--package",
        "profiler",
    ]))?;
    Ok(root.join("target/release/profiler"))
}

pub fn demo(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let window = flag(args, "--window", 10)?;
    let duration = flag(args, "--duration", 30)?;
    setup(root)?;
    let image = xtask::guest::build_guest(root)?;
    let profiler = build_profiler(root)?;

    let run_dir = xtask::cache::cache_subdir(&format!("run/demo-{}", std::process::id()))?;
    eprintln!(
        "xtask: booting guests `noisy` and `quiet` under TCG (logs in {})",
        run_dir.display()
    );
    let spec = |name: &str, devices| {
        let mut spec = GuestSpec::new(name, devices);
        if let Some(qemu) = xtask::prereq::built_qemu_usdt() {
            spec.qemu = qemu;
        }
        spec
    };
    let noisy = launch(&spec("noisy", DeviceSet::Noisy), &image, &run_dir)?;
    let quiet = launch(&spec("quiet", DeviceSet::Quiet), &image, &run_dir)?;
    for guest in [&noisy, &quiet] {
        guest.wait_ready(Duration::from_secs(180))?;
        eprintln!("xtask: guest {} is up (pid {})", guest.name(), guest.pid());
    }

    let recording = run_dir.join("demo.jsonl");
    if std::io::stdout().is_terminal() && !args.iter().any(|a| a == "--no-tui") {
        // The live view; `q` quits. Closed windows also go to the recording.
        eprintln!(
            "xtask: profiler top --window {window} (q quits; records in {})",
            recording.display()
        );
        run(Command::new(&profiler)
            .args(["top", "--window", &window.to_string()])
            .args(["--vm", "noisy", "--vm", "quiet", "--output"])
            .arg(&recording))?;
        run(Command::new(&profiler).arg("report").arg(&recording))?;
        drop((noisy, quiet));
        return Ok(());
    }
    eprintln!(
        "xtask: profiler record --window {window} --duration {duration} (records in {})",
        recording.display()
    );
    run(Command::new(&profiler)
        .args([
            "record",
            "--window",
            &window.to_string(),
            "--duration",
            &duration.to_string(),
            "--vm",
            "noisy",
            "--vm",
            "quiet",
            "--output",
        ])
        .arg(&recording))?;
    run(Command::new(&profiler).arg("report").arg(&recording))?;
    eprintln!(
        "xtask: the recording stays in {}; `{} report --format markdown {}` renders it again",
        recording.display(),
        profiler.display(),
        recording.display()
    );
    drop((noisy, quiet));
    Ok(())
}
