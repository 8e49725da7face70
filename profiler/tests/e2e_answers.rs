//! End-to-end, the answers: `check` (did these devices go quiet?) with its exit codes, `compare`
//! (before vs after), `capacity` (how many fit), and the charts, on real guests. Root.

mod common;

use std::{path::Path, process::Output, time::Duration};

use common::*;
use xtask::launch::{DeviceSet, GuestSpec, RunningGuest, launch};

fn boot_all(
    specs: Vec<GuestSpec>,
    dir: &Path,
    image: &xtask::guest::GuestImage,
) -> Vec<RunningGuest> {
    let guests: Vec<RunningGuest> = specs
        .iter()
        .map(|s| launch(s, image, dir).expect("launch"))
        .collect();
    for g in &guests {
        g.wait_ready(Duration::from_secs(180)).expect("boots");
    }
    guests
}

fn check(args: &[&str]) -> (i32, String) {
    let out: Output = profiler().arg("check").args(args).output().expect("runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "profiler check {}\n{text}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().expect("exited"), text)
}

fn assert_svg(path: &Path) {
    let svg = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "{}",
        path.display()
    );
    // It renders (fonts permitting): the same conversion `--plot x.png` does.
    if let Ok(png) = profiler::outputs::plot::svg_to_png(&svg) {
        std::fs::write(path.with_extension("png"), png).unwrap();
    }
}

#[test]
fn check_compare_capacity_and_plots_on_real_guests() {
    let test = "answers";
    let Some(image) = e2e_guest_image(test) else {
        return;
    };
    let Some(qemu) = usdt_qemu(test) else {
        return;
    };
    let dir = run_dir("answers");
    let d = dir.path();
    let mut noisy = GuestSpec::new("e2e-ans-noisy", DeviceSet::Noisy);
    noisy.qemu = qemu.clone();
    let mut quiet = GuestSpec::new("e2e-ans-quiet", DeviceSet::Quiet);
    quiet.qemu = qemu;
    // Debian's stripped QEMU under TCG: nothing sees its devices.
    let stripped = GuestSpec::new("e2e-ans-stripped", DeviceSet::Quiet);
    let launched = chrono::Utc::now();
    let launched_at = std::time::Instant::now();
    let _guests = boot_all(vec![noisy, quiet, stripped], d, &image);

    let live = ["--window", "2", "--windows", "2", "--settle", "2"];
    let (code, text) = check(
        &[
            &live[..],
            &["--vm", "e2e-ans-quiet", "--quiet", "usb,parallel"],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("usb       quiet") && text.contains("parallel  quiet"),
        "{text}"
    );
    let (code, text) = check(
        &[
            &live[..],
            &["--vm", "e2e-ans-noisy", "--quiet", "usb,parallel"],
        ]
        .concat(),
    );
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("usb       NOISY"), "{text}");
    assert!(
        text.contains("uhci_frame_timer") || text.contains("uhci"),
        "{text}"
    );
    assert!(
        text.contains("fix (libvirt): <controller type='usb' model='none'/>"),
        "{text}"
    );
    let (code, text) = check(
        &[
            &live[..],
            &["--vm", "e2e-ans-stripped", "--quiet", "usb,parallel"],
        ]
        .concat(),
    );
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("cannot tell"), "{text}");
    let (code, _) = check(&[&live[..], &["--vm", "no-such-vm", "--quiet", "usb"]].concat());
    assert_eq!(code, 2, "no VM matched");

    // One recording of all three.
    let rec = d.join("run.jsonl");
    run_ok(
        profiler()
            .args(["record", "--window", "2", "--duration", "12"])
            .args([
                "--vm",
                "e2e-ans-noisy",
                "--vm",
                "e2e-ans-quiet",
                "--vm",
                "e2e-ans-stripped",
            ])
            .arg("--output")
            .arg(&rec),
    );
    // The same verdicts from the file.
    let rec_s = rec.to_str().unwrap();
    let (code, _) = check(&[
        rec_s,
        "--vm",
        "e2e-ans-noisy",
        "--quiet",
        "usb",
        "--settle",
        "2",
    ]);
    assert_eq!(code, 1);
    let (code, json) = check(&[
        rec_s,
        "--vm",
        "e2e-ans-quiet",
        "--quiet",
        "usb",
        "--settle",
        "2",
        "--format",
        "json",
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["vms"][0]["classes"][0]["verdict"], "quiet");

    // Before (noisy) vs after (quiet): the drop, in text and as a chart.
    let plot = d.join("compare.svg");
    let out = run_ok(
        profiler()
            .args(["compare", "--pair", "e2e-ans-noisy=e2e-ans-quiet", "--json"])
            .arg(&rec)
            .arg(&rec)
            .arg("--plot")
            .arg(&plot),
    );
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let timer = &c["vms"][0]["counts"][0];
    assert_eq!(timer["name"], "timer");
    let drop = timer["change_percent"].as_f64().unwrap();
    eprintln!(
        "timer events per window: {} → {} ({drop:.1} %)",
        timer["before"], timer["after"]
    );
    assert!(drop < -90.0, "{c:#}");
    let frame = c["vms"][0]["callbacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "uhci_frame_timer")
        .expect("the frame timer, before");
    assert_eq!(frame["after"], 0.0);
    assert_svg(&plot);

    // Capacity: more quiet VMs than noisy VMs per host; the host chart renders.
    let plot = d.join("capacity.svg");
    let out = run_ok(
        profiler()
            .args([
                "capacity",
                "--json",
                "--settle",
                "2",
                "--target-util",
                "0.8",
            ])
            .arg(&rec)
            .arg("--plot")
            .arg(&plot),
    );
    let cap: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let fits = |profile: &str| -> u64 {
        cap["profiles"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["profile"] == profile)
            .unwrap_or_else(|| panic!("no profile {profile}: {cap:#}"))["vms_per_host"]
            .as_u64()
            .unwrap_or(u64::MAX)
    };
    eprintln!(
        "VMs per host: noisy {}, quiet {}",
        fits("e2e-ans-noisy"),
        fits("e2e-ans-quiet")
    );
    assert!(fits("e2e-ans-quiet") > fits("e2e-ans-noisy"), "{cap:#}");
    assert!(
        !cap["host"].as_array().unwrap().is_empty(),
        "host CPU per window: {cap:#}"
    );
    assert_svg(&plot);
    // Memory: every settled record carries its QEMU's resident memory and its guest's RAM;
    // each profile says how many fit by CPU and by memory, and which binds.
    let records = load(&rec);
    for r in records.iter().filter(|r| !r.partial) {
        let rss = r
            .resident_bytes
            .unwrap_or_else(|| panic!("no resident: {r:?}"));
        assert!(rss > 10 << 20, "{r:?}");
        assert_eq!(r.vm.guest_memory_bytes, Some(256 << 20), "{r:?}");
        // The host's busy time comes from the scheduler (the tasks' runtimes where a cpuacct
        // hierarchy is mounted, as on this machine kind; else each CPU's idle time).
        let host = r.host.expect("a full window has the host");
        assert!(
            matches!(
                host.busy_source,
                Some(
                    profiler::record::BusySource::Cpuacct
                        | profiler::record::BusySource::SchedSwitch
                )
            ),
            "{r:?}"
        );
        assert!(host.memory_bytes.is_some_and(|m| m > rss), "{r:?}");
    }
    if cap["host_busy_source"] == "cpuacct" {
        // Every task's runtime, the VMs' included: never below them.
        assert_eq!(cap["host_below_vms"], serde_json::json!([]), "{cap:#}");
    }
    for p in cap["profiles"].as_array().unwrap() {
        let count = |key: &str| p[key].as_u64().unwrap_or_else(|| panic!("no {key}: {p:#}"));
        let (cpu, memory) = (count("vms_per_host"), count("vms_per_host_memory"));
        let binding = if memory < cpu { "memory" } else { "cpu" };
        assert_eq!(p["binding"], binding, "{p:#}");
        assert_eq!(p["fits"], cpu.min(memory), "{p:#}");
    }
    let text = run_ok(profiler().args(["capacity", "--settle", "2"]).arg(&rec));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("(CPU)") || text.contains("(memory)"),
        "the binding limit is named: {text}"
    );

    let plot = d.join("report.svg");
    run_ok(profiler().arg("report").arg(&rec).arg("--plot").arg(&plot));
    assert_svg(&plot);

    // VMs that were already running: a short recording of guests up for longer than the
    // default --settle (30 s) answers, since settling counts from each QEMU's start.
    let up = Duration::from_secs(40);
    std::thread::sleep(up.saturating_sub(launched_at.elapsed()));
    let short = d.join("short.jsonl");
    run_ok(
        profiler()
            .args(["record", "--window", "5", "--duration", "11"])
            .args(["--vm", "e2e-ans-noisy", "--vm", "e2e-ans-quiet"])
            .arg("--output")
            .arg(&short),
    );
    for r in load(&short) {
        let started: chrono::DateTime<chrono::Utc> =
            r.vm.started
                .as_deref()
                .unwrap_or_else(|| panic!("no vm.started: {r:?}"))
                .parse()
                .unwrap();
        // Launched by this test after `launched`, and up before the recording began.
        let after_launch = (started - launched).num_milliseconds();
        assert!(
            after_launch > -1_000,
            "{started} before the launch at {launched}"
        );
        assert!(
            started < chrono::Utc::now() - chrono::TimeDelta::seconds(30),
            "{started}"
        );
    }
    let plot = d.join("capacity-short.svg");
    let out = run_ok(
        profiler()
            .args(["capacity", "--json"])
            .arg(&short)
            .arg("--plot")
            .arg(&plot),
    );
    let cap: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cap["settle_seconds"], 30.0, "the default settle: {cap:#}");
    assert_eq!(cap["vms"].as_array().unwrap().len(), 2, "{cap:#}");
    assert!(!cap["host"].as_array().unwrap().is_empty(), "{cap:#}");
    assert_svg(&plot);
    // And when nothing can be answered, it says what was missing and what to do.
    let out = profiler()
        .args(["capacity", "--settle", "3600"])
        .arg(&short)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("nothing to answer") && stderr.contains("lower --settle"),
        "{stderr}"
    );
}
