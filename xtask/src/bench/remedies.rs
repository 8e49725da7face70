//! `cargo xtask bench remedies`: what disabling a device class brings, measured side by side
//! in one run on the USDT QEMU. Guests identical but for one device: a USB tablet on UHCI, the
//! same tablet on xHCI, no USB; a parallel port, none. The figures `profiler check` quotes
//! with its fixes (docs/check.md) come from here.

use std::{
    path::Path,
    process::{Command, Stdio},
    thread::sleep,
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::json;
use xtask::launch::{DeviceSet, GuestSpec, launch};

use super::{flag, publish};

/// (guest name, extra QEMU arguments on top of the quiet set: no USB, no parallel, no VGA).
const GUESTS: &[(&str, &[&str])] = &[
    ("usb-uhci-tablet", &["-usb", "-device", "usb-tablet"]),
    (
        "usb-xhci-tablet",
        &["-device", "qemu-xhci", "-device", "usb-tablet"],
    ),
    ("usb-none", &[]),
    (
        "parallel-port",
        &[
            "-chardev",
            "null,id=lp0",
            "-device",
            "isa-parallel,chardev=lp0",
        ],
    ),
];

fn run_json(cmd: &mut Command) -> anyhow::Result<serde_json::Value> {
    let out = cmd.stderr(Stdio::inherit()).output()?;
    if !out.status.success() && out.stdout.is_empty() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn mean_of(cmp: &serde_json::Value, list: &str, name: &str) -> (f64, f64) {
    let m = cmp["vms"][0][list]
        .as_array()
        .and_then(|l| l.iter().find(|m| m["name"] == name));
    let v = |k: &str| m.and_then(|m| m[k].as_f64()).unwrap_or(0.0);
    (v("before"), v("after"))
}

pub fn run(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let window = flag(args, "--window", 10)?;
    let windows = flag(args, "--windows", 9)?;
    crate::setup::setup(root)?;
    let image = xtask::guest::build_guest(root)?;
    let qemu = crate::qemu_usdt::qemu_usdt()?;
    let profiler = crate::demo::build_profiler(root)?;
    let dir = xtask::cache::cache_subdir(&format!("run/remedies-{}", std::process::id()))?;
    let rec = dir.join("remedies.jsonl");
    let duration = (windows + 3) * window;
    eprintln!(
        "xtask bench remedies: {} guests on the USDT QEMU, recorded for {duration} s in {window} s \
         windows",
        GUESTS.len()
    );
    // Recording starts first, so each guest's boot is in the recording too.
    let mut recorder = Command::new(&profiler)
        .args([
            "record",
            "--window",
            &window.to_string(),
            "--duration",
            &duration.to_string(),
        ])
        .args(GUESTS.iter().flat_map(|(name, _)| ["--vm", *name]))
        .arg("--output")
        .arg(&rec)
        .spawn()
        .context("starting profiler record")?;
    let mut guests = Vec::new();
    for (name, extra) in GUESTS {
        let mut spec = GuestSpec::new(*name, DeviceSet::Quiet);
        spec.qemu = qemu.clone();
        spec.extra_args = extra.iter().map(|s| s.to_string()).collect();
        guests.push(launch(&spec, &image, &dir)?);
    }
    for g in &guests {
        g.wait_ready(Duration::from_secs(240))?;
    }
    let status = recorder.wait()?;
    if !status.success() {
        bail!("profiler record failed: {status}");
    }
    drop(guests);
    sleep(Duration::from_millis(200));

    // Four guests boot at once on the machine's cores: give them three windows.
    let settle = (3 * window).to_string();
    let compare = |before: &str, after: &str| -> anyhow::Result<serde_json::Value> {
        run_json(
            Command::new(&profiler)
                .args(["compare", "--json", "--settle", &settle])
                .args(["--pair", &format!("{before}={after}")])
                .arg(&rec)
                .arg(&rec),
        )
    };
    let uhci = compare("usb-uhci-tablet", "usb-none")?;
    let xhci = compare("usb-xhci-tablet", "usb-none")?;
    let parallel = compare("parallel-port", "usb-none")?;
    let check = run_json(
        Command::new(&profiler)
            .args([
                "check",
                "--format",
                "json",
                "--quiet",
                "usb,parallel",
                "--settle",
                &settle,
            ])
            .arg(&rec),
    )?;
    let capacity = run_json(
        Command::new(&profiler)
            .args([
                "capacity",
                "--json",
                "--settle",
                &settle,
                "--reserve-cores",
                "0",
            ])
            .arg(&rec),
    )?;

    let (t_uhci, t_none) = mean_of(&uhci, "counts", "timer");
    let (t_xhci, _) = mean_of(&xhci, "counts", "timer");
    let (cpu_uhci, cpu_none) = mean_of(&uhci, "counts", "cpu_seconds");
    let (cpu_xhci, _) = mean_of(&xhci, "counts", "cpu_seconds");
    let (frame, _) = mean_of(&uhci, "callbacks", "uhci_frame_timer");
    let per_s = |per_window: f64| per_window / window as f64;
    let cpu_pct = |cpu_per_window: f64| cpu_per_window / window as f64 * 100.0;
    // The parallel port over the whole recording, boot included: that is when guests touch it.
    let records = std::fs::read_to_string(&rec)?;
    let mut parallel_events = 0u64;
    let mut parallel_windows = Vec::new();
    for line in records.lines() {
        let r: serde_json::Value = serde_json::from_str(line)?;
        if r["vm"]["name"] != "parallel-port" {
            continue;
        }
        for d in r["devices"].as_array().into_iter().flatten() {
            if d["name"] == "parallel" {
                let n = d["read"].as_u64().unwrap_or(0) + d["write"].as_u64().unwrap_or(0);
                if n > 0 {
                    parallel_events += n;
                    parallel_windows.push(r["window"].as_u64().unwrap_or(0));
                }
            }
        }
    }
    let _ = parallel;
    let command = format!("cargo xtask bench remedies --window {window} --windows {windows}");
    let body = format!(
        "## What disabling a device brings (`profiler check`'s fixes)\n\n\
         `{command}`: four guests identical but for one device (the test guest, TCG, the USDT \
         QEMU, no VGA, no NIC), booted while one `profiler record --window {window}` ran for \
         {duration} s; means per full window from `profiler compare --pair X=usb-none` on that \
         recording, skipping each guest's first {settle} s.\n\n\
         | guest | timer events/s | QEMU CPU (% of a core) | note |\n|---|---:|---:|---|\n\
         | USB tablet on UHCI (`-usb -device usb-tablet`) | {:.0} | {:.2} | `uhci_frame_timer` {:.0}/s |\n\
         | USB tablet on xHCI (`-device qemu-xhci -device usb-tablet`) | {:.0} | {:.2} | |\n\
         | no USB | {:.0} | {:.2} | |\n\n\
         The parallel port (`-device isa-parallel`): {parallel_events} guest accesses, all in \
         window(s) {:?} (the guest's driver probing it at boot), none in steady state; \
         `-parallel none` removes them.\n",
        per_s(t_uhci),
        cpu_pct(cpu_uhci),
        per_s(frame),
        per_s(t_xhci),
        cpu_pct(cpu_xhci),
        per_s(t_none),
        cpu_pct(cpu_none),
        parallel_windows,
    );
    eprintln!("{body}");
    publish(
        root,
        "remedies",
        &body,
        &json!({
            "command": command,
            "uhci_vs_none": uhci,
            "xhci_vs_none": xhci,
            "parallel_events_boot": parallel_events,
            "parallel_windows": parallel_windows,
            "check": check,
            "capacity": capacity,
        }),
    )?;
    Ok(())
}
