//! `cargo xtask density --vms N --profile noisy|quiet`: VM density, measured. Boots real
//! guests one at a time while `profiler record` runs, holding each VM count for some windows
//! once the new guest has settled; then `profiler capacity` sets the host's measured CPU
//! against the VM count next to the projection from each VM's own QEMU CPU, and the result
//! goes to docs/capacity.md with the commands.
//!
//! How many windows each count is held for is chosen from what the first guest measures: its
//! own cost and the host's noise around it. A ramp's slope is known to t·noise/√Σ(VMs −
//! mean)²; it is planned so that this is at most half the per-VM cost, or the ramp says up
//! front that it cannot resolve it on this host (and how many guests would).

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

/// Windows the first guest is held for to measure its cost and the host's noise.
const CALIBRATION_WINDOWS: u64 = 4;
/// The most windows a VM count is held for.
const MAX_HOLD: u64 = 8;

/// Σ (k − mean)² over VM counts 1..=n, each held for `hold` windows.
fn spread(n: u64, hold: u64) -> f64 {
    let n = n as f64;
    hold as f64 * n * (n * n - 1.0) / 12.0
}

/// The ramp of `vms` guests that resolves `per_vm` cores at `noise` cores of scatter: the
/// fewest windows per VM count (2 to [`MAX_HOLD`]) for which the slope's half interval
/// t·noise/√spread is at most per_vm/2; `None` when even [`MAX_HOLD`] cannot (then the guests
/// it would take at that hold are the second value).
pub fn plan(per_vm: f64, noise: f64, vms: u64) -> Result<(u64, f64), (f64, u64)> {
    const T: f64 = 2.1;
    let needed = (2.0 * T * noise / per_vm).powi(2);
    match (2..=MAX_HOLD).find(|&h| spread(vms, h) >= needed) {
        Some(h) => Ok((h, needed)),
        None => Err((
            needed,
            (vms..10_000)
                .find(|&n| spread(n, MAX_HOLD) >= needed)
                .unwrap_or(10_000),
        )),
    }
}

/// The first guest's cost (cores) and the host's noise (cores: the standard deviation of its
/// busy CPU), over the recording's last `windows` full windows (after the guest settled).
fn calibrate(rec: &Path, windows: usize) -> anyhow::Result<(f64, f64)> {
    let text = std::fs::read_to_string(rec)?;
    let mut full: Vec<(f64, f64)> = Vec::new();
    for line in text.lines() {
        let r: serde_json::Value = serde_json::from_str(line)?;
        let seconds = r["seconds"].as_f64().unwrap_or(0.0);
        if r["partial"].as_bool() != Some(false) || seconds <= 0.0 {
            continue;
        }
        if let (Some(cpu), Some(busy)) = (
            r["cpu_seconds"].as_f64(),
            r["host"]["busy_cpu_seconds"].as_f64(),
        ) {
            full.push((cpu / seconds, busy / seconds));
        }
    }
    let last = &full[full.len().saturating_sub(windows)..];
    anyhow::ensure!(
        last.len() >= 2,
        "too few full windows with the host's CPU to calibrate ({})",
        last.len()
    );
    let n = last.len() as f64;
    let cost = last.iter().map(|w| w.0).sum::<f64>() / n;
    let mean = last.iter().map(|w| w.1).sum::<f64>() / n;
    let noise = (last.iter().map(|w| (w.1 - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    Ok((cost, noise))
}

pub fn density(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let max_vms = flag(args, "--vms", 8)? as usize;
    let window = flag(args, "--window", 10)?;
    // Windows each VM count is held for, after the new guest's settle time (default: chosen).
    let fixed_hold = args
        .iter()
        .any(|a| a == "--hold")
        .then(|| flag(args, "--hold", 2))
        .transpose()?;
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
        "xtask density: {max_vms} {profile} guests (Debian's QEMU, TCG), `profiler record \
         --window {window}` throughout"
    );
    let names: Vec<String> = (1..=max_vms)
        .map(|i| format!("density-{profile}-{i:02}"))
        .collect();
    let mut hold = fixed_hold.unwrap_or(2);
    let mut planned = String::new();
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
        for (i, name) in names.iter().enumerate() {
            let i = i + 1;
            let spec = GuestSpec::new(name.clone(), devices);
            let guest = launch(&spec, &image, &dir)?;
            guest.wait_ready(Duration::from_secs(300))?;
            eprintln!("xtask density: {i} VM(s) running");
            guests.push(guest);
            if i > 1 || fixed_hold.is_some() {
                sleep(Duration::from_secs(settle + hold * window));
                continue;
            }
            // The first guest: its own cost and the host's noise around it decide the ramp.
            sleep(Duration::from_secs(
                settle + CALIBRATION_WINDOWS * window + 1,
            ));
            let (cost, noise) = calibrate(&rec, CALIBRATION_WINDOWS as usize)?;
            let n = max_vms as u64;
            match plan(cost, noise, n) {
                Ok((h, needed)) => {
                    hold = h;
                    planned = format!(
                        "The first guest measured {:.2} % of a core itself, and the host's \
                         busy CPU scattered by {:.2} % of a core around it ({CALIBRATION_WINDOWS} \
                         windows): resolving that cost to half needs Σ(VMs − mean)² ≥ \
                         {needed:.0}, so the ramp holds each of its {n} VM counts for {h} \
                         windows (Σ = {:.0}).\n\n",
                        cost * 100.0,
                        noise * 100.0,
                        spread(n, h)
                    );
                }
                Err((needed, guests)) => {
                    planned = format!(
                        "The first guest measured {:.2} % of a core itself, and the host's \
                         busy CPU scattered by {:.2} % of a core around it ({CALIBRATION_WINDOWS} \
                         windows): resolving that cost to half needs Σ(VMs − mean)² ≥ \
                         {needed:.0}, which {n} guests held {MAX_HOLD} windows each do not \
                         reach ({guests} would): the ramp cannot resolve it on this host. It \
                         runs its {n} guests anyway, {hold} windows at each count, to show what \
                         `capacity` makes of such a ramp; the per-VM figures answer.\n\n",
                        cost * 100.0,
                        noise * 100.0,
                    );
                }
            }
            eprintln!("xtask density: {}", planned.trim());
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
    let command = match fixed_hold {
        Some(h) => format!(
            "cargo xtask density --vms {max_vms} --profile {profile} --window {window} --hold {h}"
        ),
        None => {
            format!("cargo xtask density --vms {max_vms} --profile {profile} --window {window}")
        }
    };
    let body = format!(
        "## {profile} guests, measured\n\n`{command}`, then `profiler capacity --settle \
         {settle} --reserve-cores 0 density-{profile}.jsonl --plot \
         docs/capacity-{profile}.svg`. {planned}```\n{}```\n\n![host CPU against VMs, \
         {profile}](capacity-{profile}.png)\n",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ramp_is_planned_to_resolve_the_per_vm_cost_or_not_at_all() {
        // Noisy guests: 3 % of a core each, 1 % of noise: 6 guests, 2 windows each, do.
        let (h, needed) = plan(0.03, 0.01, 6).unwrap();
        assert_eq!(h, 2);
        assert!(spread(6, h) >= needed);
        // Noisier: more windows at each count.
        let (h, _) = plan(0.03, 0.05, 6).unwrap();
        assert!(h > 2, "{h}");
        // Quiet guests: 0.5 % each in 3 % of noise: 8 guests cannot; it says how many could.
        let (needed, guests) = plan(0.005, 0.03, 8).unwrap_err();
        assert!(spread(guests, MAX_HOLD) >= needed && guests > 8);
        assert_eq!(spread(3, 2), 4.0);
    }
}
