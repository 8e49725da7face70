//! End-to-end: the recording's disk fills up mid-run and frees up again; no window is lost.

mod common;

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use common::*;

fn sh(cmd: &mut Command) {
    let status = cmd.status().expect("tool runs");
    assert!(status.success(), "{cmd:?}: {status}");
}

#[test]
fn full_disk_mid_recording_loses_no_window() {
    // Root is what this needs (tmpfs mount, eBPF); the guest image is not used.
    if e2e_guest_image("disk_full").is_none() {
        return;
    }
    let dir = run_dir("disk-full");
    let mnt = dir.path().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    sh(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&mnt));
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    // Leave room for about one record, then the disk is full.
    let filler = mnt.join("filler");
    sh(Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", filler.display()))
        .args(["bs=1k", "count=63", "status=none"]));

    // Any QEMU process will do: SeaBIOS idling without a boot device.
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "pc,accel=tcg",
            "-m",
            "32",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-name", "guest=e2e-full"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rec = mnt.join("recording.jsonl");
    let mut recorder = profiler()
        .args([
            "record",
            "--window",
            "1",
            "--duration",
            "8",
            "--vm",
            "e2e-full",
            "--output",
        ])
        .arg(&rec)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its stderr, line by line as it comes, and whole at the end.
    let (tx, rx) = std::sync::mpsc::channel();
    let lines = BufReader::new(recorder.stderr.take().unwrap()).lines();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in lines.map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    // The disk frees up once the profiler has found it full.
    let deadline = std::time::Instant::now() + HANG;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("keeping them in memory") => break,
            Ok(_) => {}
            Err(e) => panic!("the profiler never said the disk was full ({e})"),
        }
    }
    std::fs::remove_file(&filler).unwrap();
    let status = recorder.wait().unwrap();
    let stderr = reader.join().unwrap();
    let _ = qemu.kill();
    let _ = qemu.wait();
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("keeping them in memory"), "{stderr}");
    assert!(stderr.contains("nothing was lost"), "{stderr}");

    let windows: Vec<u64> = of(&load(&rec), "e2e-full")
        .iter()
        .map(|w| w.window)
        .collect();
    assert_eq!(windows, (0..8).collect::<Vec<u64>>(), "{stderr}");
}
