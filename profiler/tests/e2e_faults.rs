//! End-to-end, faults from the outside world: QEMUs killed mid-flight over and over while
//! `serve` and `top` run (nothing left behind, nothing malformed, memory flat), and QMP
//! sockets that hang or answer garbage (a note for that VM, the others unaffected). Root.

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use common::*;

/// Links that probe one process, or the host: a binary's shared links (kept until the profiler
/// stops, however many of its VMs come and go) apart.
fn probe_fds(pid: u32) -> usize {
    xtask::links::probe_links_by_scope(pid).scoped
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn get(url: &str) -> String {
    ureq::get(url)
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .into_body()
        .read_to_string()
        .unwrap()
}

/// `qemu_profiler_bpf_map_entries{map="NAME"} N` from an exposition.
fn map_entries(metrics: &str, map: &str) -> u64 {
    let prefix = format!("qemu_profiler_bpf_map_entries{{map=\"{map}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {map} entries in:\n{metrics}"))
        .trim()
        .parse::<f64>()
        .unwrap() as u64
}

#[test]
fn fifty_qemus_killed_while_serve_and_top_run_leave_nothing_behind() {
    let test = "churn";
    let p = Prereq::new(test);
    if p.root().is_none() || p.tool("tmux").is_none() {
        return;
    }
    let Some(qemu) = usdt_qemu(test) else {
        return;
    };
    const CYCLES: usize = 50;
    let names: Vec<String> = (0..CYCLES).map(|i| format!("e2e-churn-{i:02}")).collect();
    let selection: Vec<&str> = names.iter().flat_map(|n| ["--vm", n.as_str()]).collect();
    let dir = run_dir("churn");
    let rec = dir.path().join("serve.jsonl");
    let mut serve_cmd = profiler();
    serve_cmd
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--window",
            "1",
            "--exit-grace",
            "1",
        ])
        .args(&selection)
        .arg("--output")
        .arg(&rec)
        .stderr(Stdio::piped());
    let mut child = serve_cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("serve says where").unwrap();
        if let Some(rest) = line.strip_prefix("profiler: serving metrics on http://") {
            break rest.trim_end_matches("/metrics").to_string();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    let serve = KillOnDrop(child);
    let serve_pid = serve.0.id();
    // `top` on the same churn, in a real terminal.
    let session = format!("profiler-e2e-churn-{}", std::process::id());
    let script = format!(
        "{} top --window 1 {} ; echo TOP-EXITED $?; sleep 60",
        env!("CARGO_BIN_EXE_profiler"),
        selection.join(" ")
    );
    Command::new("tmux")
        .args([
            "new-session",
            "-d",
            "-s",
            &session,
            "-x",
            "120",
            "-y",
            "30",
            &script,
        ])
        .status()
        .unwrap();
    let _tmux = TmuxSession(session.clone());
    let metrics_url = format!("http://{addr}/metrics");
    // Both up: serve has taken its first sample, top draws.
    wait_until("serve's first sample", HANG, || {
        get(&metrics_url)
            .lines()
            .any(|l| l.starts_with("qemu_profiler_samples_total ") && !l.ends_with(" 0"))
    });
    wait_until("top's first screen", HANG, || {
        tmux_screen(&session).starts_with("window ")
    });
    let fds_before = probe_fds(serve_pid);
    let mut rss_early = 0;
    for (i, name) in names.iter().enumerate() {
        let mut vm: Child = Command::new(&qemu)
            .args(["-machine", "pc,accel=tcg", "-m", "64", "-display", "none"])
            .args([
                "-nic",
                "none",
                "-L",
                "/usr/share/seabios",
                "-L",
                "/usr/share/qemu",
            ])
            .arg("-name")
            .arg(format!("guest={name}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Found and attached to by serve (it shows the VM's series once its probes are on;
        // top, sampling as often, attaches alongside), then SIGKILL.
        let series = format!("vm=\"{name}\"");
        wait_until(&format!("{name} in serve's metrics"), HANG, || {
            get(&metrics_url).contains(&series)
        });
        vm.kill().unwrap();
        vm.wait().unwrap();
        if i == 9 {
            rss_early = rss_kib(serve_pid);
        }
    }
    // Serve notices the last exit at its next sample and detaches in the background.
    let maps = [
        "WATCHED",
        "COUNTERS",
        "USDT_SPECS",
        "REGION_NAMES",
        "SEEN_CALLBACKS",
        "PENDING",
    ];
    // The binary's shared links stay, with their USDT specs: a few, however many VMs went.
    let shared = xtask::links::probe_links_by_scope(serve_pid).binary_wide;
    assert!(
        shared < CYCLES / 5,
        "{shared} binary-wide links for {CYCLES} VMs of one binary"
    );
    let deadline = Instant::now() + HANG;
    loop {
        let metrics = get(&metrics_url);
        let left: Vec<(&str, u64)> = maps
            .iter()
            .map(|&m| (m, map_entries(&metrics, m)))
            .filter(|&(m, n)| n > 0 && !(m == "USDT_SPECS" && shared > 0 && n <= 16))
            .collect();
        let fds = probe_fds(serve_pid);
        if left.is_empty() && fds == fds_before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after {HANG:?}: map entries left for dead QEMUs {left:?}; probe fds {fds}, \
             {fds_before} before (uprobes or links left)"
        );
        sleep(Duration::from_millis(200));
    }
    let rss_late = rss_kib(serve_pid);
    eprintln!("serve RSS after 10 cycles {rss_early} KiB, after {CYCLES}: {rss_late} KiB");
    assert!(
        rss_late <= rss_early + rss_early / 5 + 4096,
        "{rss_early} → {rss_late} KiB"
    );

    // top is still up and drawing.
    let screen = tmux_screen(&session);
    assert!(screen.starts_with("window "), "{screen}");
    assert!(
        !screen.contains("TOP-EXITED") && !screen.contains("panicked"),
        "{screen}"
    );

    // serve stops cleanly; every VM it saw has its closing window, every line is whole.
    // SAFETY: plain signal to our child.
    unsafe { libc::kill(serve_pid as i32, libc::SIGTERM) };
    let mut serve = serve;
    assert!(serve.0.wait().unwrap().success());
    let records = load(&rec);
    let mut seen = std::collections::BTreeSet::new();
    let mut closed = std::collections::BTreeSet::new();
    for r in &records {
        seen.insert(r.vm.name.clone());
        if r.partial_reason == Some(profiler::record::PartialReason::VmExited) {
            closed.insert(r.vm.name.clone());
        }
    }
    eprintln!(
        "{} of {CYCLES} QEMUs recorded, {} with their exit window",
        seen.len(),
        closed.len()
    );
    // Each was watched before it was killed.
    assert_eq!(seen.len(), CYCLES, "{seen:?}");
    assert_eq!(seen, closed, "a VM without its exit window");
}

fn tmux_screen(session: &str) -> String {
    String::from_utf8_lossy(
        &Command::new("tmux")
            .args(["capture-pane", "-p", "-t", session])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned()
}

struct TmuxSession(String);

impl Drop for TmuxSession {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .status();
    }
}

/// Sends `cont` on a QMP socket of the test's own.
fn qmp_cont(socket: &Path) {
    let deadline = Instant::now() + HANG;
    let stream = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => sleep(Duration::from_millis(50)),
            Err(e) => panic!("QMP {}: {e}", socket.display()),
        }
    };
    stream.set_read_timeout(Some(HANG)).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let mut w = stream;
    for cmd in [r#"{"execute":"qmp_capabilities"}"#, r#"{"execute":"cont"}"#] {
        writeln!(w, "{cmd}").unwrap();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line.contains("\"return\"") {
                break;
            }
        }
    }
}

/// Replaces the QMP socket at `path` with a server of the test's: `hang` accepts and says
/// nothing; otherwise it answers garbage. Runs until the test ends.
fn fake_qmp(path: &Path, hang: bool) {
    let deadline = Instant::now() + HANG;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "QEMU never made {}",
            path.display()
        );
        sleep(Duration::from_millis(20));
    }
    std::fs::remove_file(path).unwrap();
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for mut conn in listener.incoming().flatten() {
            if !hang {
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\n\r\n{\"QMP\": [garbage\n\x00\xff\n");
            }
            held.push(conn);
        }
    });
}

#[test]
fn a_hanging_or_garbage_qmp_socket_is_a_note_and_other_vms_are_named() {
    let test = "qmp_faults";
    let p = Prereq::new(test);
    if p.root().is_none() || p.kvm().is_none() || p.system_qemu().is_none() {
        return;
    }
    let dir = run_dir("qmp-faults");
    let d = dir.path();
    let mut vms = Vec::new();
    for name in ["e2e-qmp-ok", "e2e-qmp-hang", "e2e-qmp-garbage"] {
        let sock = |kind: &str| -> PathBuf { d.join(format!("{name}.{kind}.qmp")) };
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "pc,accel=kvm",
                "-m",
                "32",
                "-S",
                "-display",
                "none",
            ])
            .args(["-monitor", "none", "-nic", "none", "-vga", "none"])
            .arg("-name")
            .arg(format!("guest={name}"))
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                sock("profiler").display()
            ))
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                sock("test").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        vms.push((name, KillOnDrop(child), sock("profiler"), sock("test")));
    }
    fake_qmp(&vms[1].2, true);
    fake_qmp(&vms[2].2, false);
    let rec = d.join("rec.jsonl");
    let started = Instant::now();
    let recorder = profiler()
        .args(["record", "--window", "2", "--duration", "10"])
        .args(vms.iter().flat_map(|v| ["--vm", v.0]))
        .arg("--output")
        .arg(&rec)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Run the guests once the profiler watches all three (a window of each is written).
    for v in &vms {
        wait_for_record_of(&rec, v.0);
    }
    for v in &vms {
        qmp_cont(&v.3);
    }
    let out = recorder.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("{err}");
    assert!(out.status.success(), "{err}");
    // A monitor that never answers would hold sampling forever; a slow host only delays it.
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "a broken monitor stalled sampling"
    );
    assert!(
        err.contains("VM e2e-qmp-hang: device names from QMP failed"),
        "{err}"
    );
    assert!(
        err.contains("VM e2e-qmp-garbage: device names from QMP failed"),
        "{err}"
    );
    assert!(!err.contains("VM e2e-qmp-ok: device names"), "{err}");
    let records = load(&rec);
    for v in &vms {
        let windows = of(&records, v.0);
        assert!(windows.len() >= 4, "{}: {windows:#?}", v.0);
    }
    // SeaBIOS probes the parallel port: named by QEMU's map for the VM whose monitor works,
    // from the well-known table (it has one by default) for the two whose monitor does not.
    let names = |vm: &str| -> Vec<String> {
        of(&records, vm)
            .iter()
            .flat_map(|w| &w.devices)
            .map(|d| d.name.clone())
            .collect()
    };
    assert!(
        names("e2e-qmp-ok").iter().any(|n| n == "parallel"),
        "{:?}",
        names("e2e-qmp-ok")
    );
    assert!(
        names("e2e-qmp-hang")
            .iter()
            .any(|n| n.starts_with("parallel (port 0x37")),
        "{:?}",
        names("e2e-qmp-hang")
    );
}
