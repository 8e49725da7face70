//! `cargo xtask density --vms N --profile noisy|quiet`: VM density, measured. Boots N real
//! guests one at a time while `profiler record` runs, holding each VM count for a few windows
//! once the new guest has settled; then `profiler capacity` sets the host's measured CPU
//! against the VM count next to the projection from each VM's own QEMU CPU, and the result
//! goes to docs/capacity.md with the commands.

use std::{
    path::Path,
    process::{Command, Stdio},
    thread::sleep,
    time::Duration,
};

use anyhow::{Context as _, bail};
use xtask::launch::{DeviceSet, GuestSpec, RunningGuest, launch};

use crate::bench::{flag, publish_to};

const CAPACITY_INTRO: &str = "# Capacity: how many VMs fit\n\nSee the end of this page for \
    how `profiler capacity` works; the sections below are written by `cargo xtask density`.\n";

fn value<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

pub fn density(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let vms = flag(args, "--vms", 8)? as usize;
    let window = flag(args, "--window", 10)?;
    // Windows each VM count is held for, after the new guest's settle time.
    let hold = flag(args, "--hold", 2)?;
    let profile = value(args, "--profile").unwrap_or("quiet");
    let devices = match profile {
        "noisy" => DeviceSet::Noisy,
        "quiet" => DeviceSet::Quiet,
        other => bail!("--profile is noisy or quiet, not {other:?}"),
    };
    crate::setup::setup(root)?;
    let image = xtask::guest::build_guest(root)?;
    let profiler = crate::demo::build_profiler(root)?;
    let dir = xtask::cache::cache_subdir(&format!("run/density-{}", std::process::id()))?;
    let rec = dir.join(format!("density-{profile}.jsonl"));
    let settle = 2 * window;
    eprintln!(
        "xtask density: {vms} {profile} guests (Debian's QEMU, TCG), one every ~{} s, `profiler \
         record --window {window}` throughout",
        settle + hold * window
    );
    let names: Vec<String> = (1..=vms)
        .map(|i| format!("density-{profile}-{i:02}"))
        .collect();
    // Only this ramp's guests: anything else running on the host is in the host CPU anyway,
    // but must not be counted as one of the VMs.
    let mut recorder = Command::new(&profiler)
        .args(["record", "--window", &window.to_string(), "--output"])
        .arg(&rec)
        .args(names.iter().flat_map(|n| ["--vm", n.as_str()]))
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting profiler record")?;
    let mut guests: Vec<RunningGuest> = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        // The host with no VM first.
        sleep(Duration::from_secs(hold * window + 1));
        for (i, name) in names.iter().enumerate() {
            let i = i + 1;
            let spec = GuestSpec::new(name.clone(), devices);
            let guest = launch(&spec, &image, &dir)?;
            guest.wait_ready(Duration::from_secs(300))?;
            eprintln!("xtask density: {i} VM(s) running");
            guests.push(guest);
            sleep(Duration::from_secs(settle + hold * window));
        }
        Ok(())
    })();
    // SAFETY: plain signal to our child.
    unsafe { libc::kill(recorder.id() as i32, libc::SIGINT) };
    recorder.wait()?;
    drop(guests);
    result?;

    let plot = root.join(format!("docs/capacity-{profile}.svg"));
    let capacity = |extra: &[&str]| -> anyhow::Result<std::process::Output> {
        Ok(Command::new(&profiler)
            .args([
                "capacity",
                "--settle",
                &settle.to_string(),
                "--reserve-cores",
                "0",
            ])
            .args(extra)
            .arg(&rec)
            .output()?)
    };
    let text = capacity(&["--plot", plot.to_str().context("a UTF-8 path")?])?;
    if !text.status.success() {
        bail!(
            "profiler capacity failed: {}",
            String::from_utf8_lossy(&text.stderr)
        );
    }
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    let json: serde_json::Value = serde_json::from_slice(&capacity(&["--json"])?.stdout)?;
    // A PNG beside the SVG, for people reading the docs where SVG does not render (the
    // profiler renders it where fonts exist).
    let png = plot.with_extension("png");
    let _ = capacity(&["--plot", png.to_str().context("a UTF-8 path")?]);
    eprintln!("{text}");
    let command = format!(
        "cargo xtask density --vms {vms} --profile {profile} --window {window} --hold {hold}"
    );
    let body = format!(
        "## {profile} guests, measured\n\n`{command}`, then `profiler capacity --settle \
         {settle} --reserve-cores 0 density-{profile}.jsonl --plot \
         docs/capacity-{profile}.svg`:\n\n```\n{}```\n\n![host CPU against VMs, {profile}]\
         (capacity-{profile}.png)\n",
        text
    );
    publish_to(
        root,
        "capacity.md",
        CAPACITY_INTRO,
        &format!("density-{profile}"),
        &body,
        &json,
    )?;
    Ok(())
}
