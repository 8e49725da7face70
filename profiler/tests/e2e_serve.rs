//! End-to-end, the fleet view: two `profiler serve` instances standing for two hosts, each
//! profiling a real guest, scraped by a real Prometheus server (Debian's package, on
//! loopback); a `topk` query through Prometheus's HTTP API ranks the noisy guest first, with
//! its host; `promtool check metrics` accepts the exposition. Root, real guests.

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use common::*;
use xtask::launch::{DeviceSet, GuestSpec, launch};

/// A `profiler serve` on an ephemeral loopback port; killed on drop.
struct Serve {
    child: KillOnDrop,
    addr: String,
}

fn serve(vm: &str) -> Serve {
    let mut child = profiler()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--window",
            "2",
            "--vm",
            vm,
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("profiler serve starts");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("serve said where it listens")
            .expect("stderr");
        eprintln!("{line}");
        if let Some(rest) = line.strip_prefix("profiler: serving metrics on http://") {
            break rest.trim_end_matches("/metrics").to_string();
        }
    };
    // Keep draining stderr so the process never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            eprintln!("serve: {line}");
        }
    });
    Serve {
        child: KillOnDrop(child),
        addr,
    }
}

fn get(url: &str) -> String {
    ureq::get(url)
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .into_body()
        .read_to_string()
        .expect("a text body")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn prometheus(dir: &Path, targets: &[(&str, &str)]) -> (Child, String) {
    let mut config = String::from(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  \
         - job_name: qemu-profiler\n    static_configs:\n",
    );
    for (addr, host) in targets {
        config.push_str(&format!(
            "      - targets: ['{addr}']\n        labels:\n          host: {host}\n"
        ));
    }
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .expect("prometheus starts");
    (child, addr)
}

/// `query` through Prometheus's HTTP API: the vector result.
fn query(prometheus: &str, query: &str) -> Vec<serde_json::Value> {
    let url = format!(
        "http://{prometheus}/api/v1/query?query={}",
        query
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    );
    let body: serde_json::Value = serde_json::from_str(&get(&url)).expect("JSON");
    assert_eq!(body["status"], "success", "{body}");
    body["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn prometheus_ranks_the_noisy_guest_first_across_two_hosts() {
    let test = "prometheus_ranks_the_noisy_guest_first";
    let Some(image) = e2e_guest_image(test) else {
        return;
    };
    let p = Prereq::new(test);
    if p.tool("prometheus").is_none() || p.tool("promtool").is_none() {
        return;
    }
    let Some(qemu) = usdt_qemu(test) else {
        return;
    };
    let dir = run_dir("serve");
    let mut guests = Vec::new();
    for (name, devices) in [
        ("e2e-serve-noisy", DeviceSet::Noisy),
        ("e2e-serve-quiet", DeviceSet::Quiet),
    ] {
        let mut spec = GuestSpec::new(name, devices);
        spec.qemu = qemu.clone();
        guests.push(launch(&spec, &image, dir.path()).expect("launch"));
    }
    for g in &guests {
        g.wait_ready(BOOT).expect("boots");
    }
    let host_a = serve("e2e-serve-noisy");
    let host_b = serve("e2e-serve-quiet");

    // The exposition passes Prometheus's own linter (once the first sample is in).
    let deadline = Instant::now() + HANG;
    let metrics = loop {
        let metrics = get(&format!("http://{}/metrics", host_a.addr));
        if metrics.contains("qemu_profiler_device_reads_total") {
            break metrics;
        }
        assert!(Instant::now() < deadline, "no VM series yet:\n{metrics}");
        sleep(Duration::from_millis(500));
    };
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n{metrics}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(get(&format!("http://{}/", host_a.addr)).contains("href=\"/metrics\""));

    let (prom, prom_addr) = prometheus(
        dir.path(),
        &[(&host_a.addr, "host-a"), (&host_b.addr, "host-b")],
    );
    let _prom = KillOnDrop(prom);
    let deadline = Instant::now() + Duration::from_secs(300);
    let ranking = loop {
        sleep(Duration::from_secs(2));
        let ready = std::panic::catch_unwind(|| {
            query(
                &prom_addr,
                "topk(2, rate(qemu_profiler_timer_events_total[15s]))",
            )
        });
        if let Ok(result) = ready
            && result.len() == 2
        {
            break result;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never had both guests' rates; its log:\n{}",
            std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
        );
    };
    eprintln!("{ranking:#?}");
    let first = &ranking[0]["metric"];
    assert_eq!(first["vm"], "e2e-serve-noisy", "{ranking:#?}");
    assert_eq!(first["host"], "host-a", "{ranking:#?}");
    assert_eq!(first["instance"], host_a.addr.as_str(), "{ranking:#?}");
    assert_eq!(ranking[1]["metric"]["vm"], "e2e-serve-quiet");
    let rate = |i: usize| -> f64 { ranking[i]["value"][1].as_str().unwrap().parse().unwrap() };
    assert!(rate(0) > 10.0 * rate(1), "noisy vs quiet: {ranking:#?}");

    // Drill-down: the noisy guest's busiest device, through the same API.
    let devices = query(
        &prom_addr,
        "topk(1, sum by (host, vm, device) (rate(qemu_profiler_device_reads_total[15s])))",
    );
    assert_eq!(devices[0]["metric"]["device"], "uhci", "{devices:#?}");
    // Identity joins on the info series.
    let info = query(&prom_addr, "qemu_profiler_vm_info");
    assert_eq!(info.len(), 2, "{info:#?}");
    assert!(info.iter().all(|s| s["metric"]["read_source"] == "usdt"));
    drop(host_a.child);
    drop(host_b.child);
    drop(guests);
}

/// Running as a service: the JSONL output reopened on SIGHUP (logrotate moved it), the
/// textfile for node_exporter rewritten atomically each window, SIGTERM a clean stop.
#[test]
fn serve_reopens_its_output_on_sighup_and_writes_the_textfile() {
    use std::os::unix::fs::PermissionsExt as _;
    let test = "serve_reopens_its_output_on_sighup";
    let Some(image) = e2e_guest_image(test) else {
        return;
    };
    if Prereq::new(test).tool("promtool").is_none() {
        return;
    }
    let dir = run_dir("serve-files");
    let d = dir.path();
    let guest = launch(
        &GuestSpec::new("e2e-serve-files", DeviceSet::Quiet),
        &image,
        d,
    )
    .expect("launch");
    guest.wait_ready(BOOT).expect("boots");
    let out = d.join("windows.jsonl");
    let textdir = d.join("textfile");
    std::fs::create_dir(&textdir).unwrap();
    let child = profiler()
        .args(["serve", "--listen", "127.0.0.1:0", "--window", "1"])
        .args(["--vm", "e2e-serve-files", "--output"])
        .arg(&out)
        .arg("--textfile-dir")
        .arg(&textdir)
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let child = KillOnDrop(child);
    // Written at the first sample, and again at each window's end.
    let textfile = textdir.join("qemu_profiler.prom");
    let series = "qemu_profiler_timer_events_total{vm=\"e2e-serve-files\"";
    wait_until("the textfile with the VM's series", HANG, || {
        std::fs::read_to_string(&textfile).is_ok_and(|t| t.contains(series))
    });
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode & 0o027,
        0,
        "output mode {mode:o} is group-writable or world-readable"
    );
    let check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&textfile).unwrap())
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    // No temporary file is left for node_exporter to pick up half-written.
    let names: Vec<String> = std::fs::read_dir(&textdir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["qemu_profiler.prom"], "{names:?}");

    // logrotate: move the file away (once it has a window), then SIGHUP.
    wait_until("a window in the output", HANG, || {
        !load_so_far(&out).is_empty()
    });
    let rotated = d.join("windows.jsonl.1");
    std::fs::rename(&out, &rotated).unwrap();
    let mut child = child;
    // SAFETY: plain signal to our child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGHUP) };
    // Reopened at the next sample: a new file, then a window written to it.
    wait_until("a window in the reopened output", HANG, || {
        !load_so_far(&out).is_empty()
    });
    // SAFETY: as above.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    assert!(child.0.wait().unwrap().success(), "SIGTERM is a clean stop");
    let old = load(&rotated);
    let new = load(&out);
    assert!(!old.is_empty() && !new.is_empty(), "{old:?} / {new:?}");
    assert!(
        new[0].window > old.last().unwrap().window,
        "windows continue in the new file"
    );
    assert!(
        new.last().unwrap().partial,
        "the running window was flushed at SIGTERM"
    );
    drop(guest);
}
