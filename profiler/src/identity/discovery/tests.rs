use super::*;
use std::time::Duration;

/// A child process, killed and reaped when the test ends, pass or fail.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A process directory `root/PID` with an `fd` folder and a command line.
fn fake_process(root: &std::path::Path, pid: u32, cmdline: &[u8]) -> std::path::PathBuf {
    let d = root.join(pid.to_string());
    fs::create_dir_all(d.join("fd")).unwrap();
    fs::write(d.join("cmdline"), cmdline).unwrap();
    d
}

#[test]
fn stat_with_hostile_comm() {
    // comm may contain spaces and ')' — count fields from the last ')'.
    let stat = "4242 (qemu) (x) y) S 1 4242 4242 0 -1 4194560 5000 0 0 0 1234 567 0 0 20 0 \
                5 0 987654 1000000 2000 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 \
                0 0 0 0 0";
    assert_eq!(
        parse_stat(stat),
        Some(ProcStat {
            start_ticks: 987654,
            cpu: CpuTicks(1234 + 567)
        })
    );
    assert_eq!(parse_stat("garbage"), None);
    assert_eq!(parse_stat("1 (x) S 1 2"), None);
}

#[test]
fn accel_from_open_files() {
    let parsed = parse_cmdline(&[
        "qemu-system-x86_64".into(),
        "-machine".into(),
        "pc,accel=kvm:tcg".into(),
    ]);
    let kvm = vec!["/dev/kvm".to_string(), "anon_inode:kvm-vm".to_string()];
    assert_eq!(detect_accel(&parsed, Some(&kvm)), Accel::Kvm);
    let none: Vec<String> = vec!["/dev/null".into(), "socket:[123]".into()];
    assert_eq!(detect_accel(&parsed, Some(&none)), Accel::Tcg);
    assert_eq!(detect_accel(&parsed, None), Accel::Unknown);
    let xen = parse_cmdline(&["qemu-system-i386".into(), "-xen-domid".into(), "3".into()]);
    assert_eq!(detect_accel(&xen, Some(&none)), Accel::Xen);
    let plain = parse_cmdline(&["qemu-system-x86_64".into()]);
    assert_eq!(detect_accel(&plain, None), Accel::Tcg);
}

#[test]
fn cmdline_split() {
    assert_eq!(
        split_cmdline(b"qemu-system-x86_64\0-name\0a b\0\0"),
        vec!["qemu-system-x86_64", "-name", "a b"]
    );
    assert!(split_cmdline(b"").is_empty());
}

#[test]
fn fake_proc_tree() {
    let dir = tempfile::tempdir().unwrap();
    let proc_root = dir.path().join("proc");
    let libvirt_run = dir.path().join("libvirt");
    fs::create_dir_all(&libvirt_run).unwrap();
    let mk = |pid: u32, cmdline: &[u8], start: u64| {
        let d = proc_root.join(pid.to_string());
        fs::create_dir_all(d.join("fd")).unwrap();
        fs::write(d.join("cmdline"), cmdline).unwrap();
        fs::write(
            d.join("stat"),
            format!("{pid} (x) S 1 1 1 0 -1 0 0 0 0 0 10 20 0 0 20 0 1 0 {start} 0 0"),
        )
        .unwrap();
    };
    mk(10, b"qemu-system-x86_64\0-name\0guest=alpha\0", 500);
    mk(11, b"/usr/bin/qemu-system-x86_64\0-m\x00256\0", 600);
    mk(12, b"/bin/bash\0", 700);
    fs::write(libvirt_run.join("beta.pid"), "11\n").unwrap();
    fs::create_dir_all(proc_root.join("self")).unwrap();
    let found = scan_qemu_processes(&HostPaths::fake(proc_root, libvirt_run));
    let names: Vec<_> = found.iter().map(|p| p.identity.name.as_str()).collect();
    assert_eq!(names, vec!["alpha", "beta"]);
    assert_eq!(found[0].key.start_ticks, 500);
    assert_eq!(found[1].cpu.total(), 30);
    assert_eq!(found[0].identity.accel, Accel::Tcg);
}

#[test]
fn cache_rereads_only_stat_once_settled() {
    let dir = tempfile::tempdir().unwrap();
    let d = fake_process(dir.path(), 42, b"qemu-system-x86_64\0-name\0first\0");
    let stat = |cpu: u64| format!("42 (q) S 1 1 1 0 -1 0 0 0 0 0 {cpu} 0 0 0 20 0 1 0 7 0 0");
    fs::write(d.join("stat"), stat(1)).unwrap();
    let paths = HostPaths::fake(dir.path().into(), dir.path().join("none"));
    let mut cache = DiscoveryCache::default();
    for _ in 0..FULL_READS {
        assert_eq!(
            scan_qemu_processes_cached(&paths, &mut cache)[0]
                .identity
                .name,
            "first"
        );
    }
    // Settled: a changed command line is not re-read, CPU time is.
    fs::write(d.join("cmdline"), b"qemu-system-x86_64\0-name\0second\0").unwrap();
    fs::write(d.join("stat"), stat(9)).unwrap();
    let p = &scan_qemu_processes_cached(&paths, &mut cache)[0];
    assert_eq!((p.identity.name.as_str(), p.cpu.total()), ("first", 9));
    // A new start time is a new process: read in full.
    fs::write(d.join("stat"), stat(9).replace(" 7 0 0", " 8 0 0")).unwrap();
    assert_eq!(
        scan_qemu_processes_cached(&paths, &mut cache)[0]
            .identity
            .name,
        "second"
    );
    // Gone: forgotten.
    fs::remove_dir_all(&d).unwrap();
    assert!(scan_qemu_processes_cached(&paths, &mut cache).is_empty());
    assert!(cache.known.is_empty());
}

#[test]
fn a_settled_process_is_timed_by_its_cpu_clock_until_it_exits() {
    use std::os::unix::process::CommandExt as _;
    // A real process named like QEMU that burns CPU (unprivileged: any process's CPU
    // clock can be read, and a pidfd opened, by its parent).
    let mut busy = Reaped(
        std::process::Command::new("sh")
            .arg0("qemu-system-x86_64")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap(),
    );
    let pid = busy.0.id();
    let paths = HostPaths::default();
    let mut cache = DiscoveryCache::default();
    let scan = |cache: &mut DiscoveryCache| {
        scan_qemu_processes_cached(&paths, cache)
            .into_iter()
            .find(|p| p.key.pid == pid)
    };
    // Until it has exec'd the shell, it is the test binary.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while scan(&mut cache).is_none() {
        assert!(std::time::Instant::now() < deadline, "never seen");
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..FULL_READS {
        assert!(scan(&mut cache).is_some());
    }
    assert!(cache.known[&pid].clock.is_some() && cache.known[&pid].stat.is_none());
    let hz = clock_ticks_per_second();
    // The busy loop's CPU time, read through the clock, grows (by a tenth of a second:
    // however long that takes on a busy host).
    let before = scan(&mut cache).unwrap().cpu.total();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut after = before;
    while after < before + hz / 10 {
        assert!(
            std::time::Instant::now() < deadline,
            "{before} -> {after} ticks in 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
        after = scan(&mut cache).unwrap().cpu.total();
    }
    // And agrees with /proc/PID/stat, read between two clock reads (the loop runs on
    // while this thread waits for a CPU).
    let stat = read_stat(&paths, pid).unwrap().cpu.total();
    let later = scan(&mut cache).unwrap().cpu.total();
    assert!(
        stat + hz / 10 >= after && stat <= later + hz / 10,
        "clock {after}..{later}, stat {stat}"
    );
    // Exited (a zombie, not reaped yet, its PID still listed): gone at once.
    busy.0.kill().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while scan(&mut cache).is_some() {
        assert!(std::time::Instant::now() < deadline, "still seen");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        fs::metadata(format!("/proc/{pid}")).is_ok(),
        "not reaped yet"
    );
}

#[test]
fn the_host_cpu_is_read_again_through_the_kept_handle() {
    let mut reader = HostCpuReader::default();
    let paths = HostPaths::default();
    let first = reader.read(&paths.proc_root).unwrap();
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_millis(50) {}
    let second = reader.read(&paths.proc_root).unwrap();
    assert!(second.busy_ticks >= first.busy_ticks);
    assert_eq!(
        second.cpus as usize,
        std::thread::available_parallelism().unwrap().get()
    );
}

#[test]
fn the_exit_watch_names_every_exited_process_and_no_running_one() {
    // More exits at once than one epoll_wait batch holds.
    let mut watch = ExitWatch::new().unwrap();
    let exiting: Vec<Reaped> = (0..70)
        .map(|_| Reaped(std::process::Command::new("true").spawn().unwrap()))
        .collect();
    let running = Reaped(
        std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap(),
    );
    let clocks: Vec<ProcessClock> = exiting
        .iter()
        .chain([&running])
        .map(|c| ProcessClock::open(c.0.id()).unwrap())
        .collect();
    assert!(clocks.iter().all(|c| watch.add(c)));
    let want: HashSet<u32> = exiting.iter().map(|c| c.0.id()).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let exited = watch.exited().unwrap();
        assert!(!exited.contains(&running.0.id()));
        if exited == want {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of 70",
            exited.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A closed pidfd leaves the set.
    drop(clocks);
    assert!(watch.exited().unwrap().is_empty());
}

#[test]
fn a_hinted_scan_looks_only_at_known_qemus_and_processes_that_exec_d() {
    use std::os::unix::process::CommandExt as _;
    let mut child = Reaped(
        std::process::Command::new("sleep")
            .arg0("qemu-system-x86_64")
            .arg("30")
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    let paths = HostPaths::default();
    let mut cache = DiscoveryCache::default();
    let has = |found: Vec<QemuProcess>| found.iter().any(|p| p.key.pid == pid);
    // Until it has exec'd sleep, it is the test binary: wait for the exec.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while fs::read(format!("/proc/{pid}/cmdline")).map_or(true, |c| !c.starts_with(b"qemu")) {
        assert!(std::time::Instant::now() < deadline, "never exec'd");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Not known and not among the execs: not looked at.
    assert!(!has(scan_qemu_processes_hinted(&paths, &mut cache, &[])));
    assert!(qemus_unchanged(&paths, &mut cache, &[]));
    assert!(
        !qemus_unchanged(&paths, &mut cache, &[pid]),
        "a new QEMU among the execs"
    );
    // Among them: found, then known.
    assert!(has(scan_qemu_processes_hinted(&paths, &mut cache, &[pid])));
    assert!(
        !qemus_unchanged(&paths, &mut cache, &[]),
        "a QEMU still settling is read again"
    );
    for _ in 0..=FULL_READS {
        assert!(has(scan_qemu_processes_hinted(&paths, &mut cache, &[])));
    }
    assert!(cache.known[&pid].clock.is_some(), "settled on its clock");
    // Settled: unchanged until an exec by it or of a new QEMU, or its exit.
    assert!(qemus_unchanged(&paths, &mut cache, &[]));
    assert!(qemus_unchanged(&paths, &mut cache, &[std::process::id()]));
    assert!(!qemus_unchanged(&paths, &mut cache, &[pid]));
    // Exited (a zombie until reaped): gone without a look at /proc.
    child.0.kill().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while qemus_unchanged(&paths, &mut cache, &[]) {
        assert!(std::time::Instant::now() < deadline, "exit never seen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while has(scan_qemu_processes_hinted(&paths, &mut cache, &[])) {
        assert!(std::time::Instant::now() < deadline, "still seen");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Its CPU time as last read while it ran stays for the session, once.
    assert!(take_exit_cpu(&mut cache, pid).is_some());
    assert!(take_exit_cpu(&mut cache, pid).is_none());
    // A fake tree has no pidfds: a hinted scan is a full one there.
    let dir = tempfile::tempdir().unwrap();
    let d = fake_process(dir.path(), 42, b"qemu-system-x86_64\0");
    fs::write(
        d.join("stat"),
        "42 (q) S 1 1 1 0 -1 0 0 0 0 0 1 0 0 0 20 0 1 0 7 0 0",
    )
    .unwrap();
    let fake = HostPaths::fake(dir.path().into(), dir.path().join("none"));
    let found = scan_qemu_processes_hinted(&fake, &mut DiscoveryCache::default(), &[]);
    assert_eq!(found.len(), 1);
}

#[test]
fn a_kernel_thread_is_looked_at_again_only_now_and_then() {
    let dir = tempfile::tempdir().unwrap();
    let d = fake_process(dir.path(), 5, b"");
    let paths = HostPaths::fake(dir.path().into(), dir.path().join("none"));
    let mut cache = DiscoveryCache::default();
    assert!(scan_qemu_processes_cached(&paths, &mut cache).is_empty());
    assert_eq!(
        cache.no_command_line.get(&5),
        Some(&NO_COMMAND_LINE_RECHECK)
    );
    // The PID now runs QEMU (reused, or a helper that exec'd): found at the next look.
    fs::write(d.join("cmdline"), b"qemu-system-x86_64\0-name\0late\0").unwrap();
    fs::write(
        d.join("stat"),
        "5 (q) S 1 1 1 0 -1 0 0 0 0 0 1 0 0 0 20 0 1 0 9 0 0",
    )
    .unwrap();
    for _ in 0..NO_COMMAND_LINE_RECHECK {
        assert!(scan_qemu_processes_cached(&paths, &mut cache).is_empty());
    }
    let found = scan_qemu_processes_cached(&paths, &mut cache);
    assert_eq!(found[0].identity.name, "late");
    assert!(cache.no_command_line.is_empty());
    // Gone: forgotten.
    fs::remove_dir_all(&d).unwrap();
    scan_qemu_processes_cached(&paths, &mut cache);
    assert!(cache.known.is_empty() && cache.no_command_line.is_empty());
}

#[test]
fn unnamed_vm_is_named_by_pid() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("77");
    fs::create_dir_all(&d).unwrap();
    fs::write(d.join("cmdline"), b"qemu-kvm\0").unwrap();
    fs::write(
        d.join("stat"),
        "77 (qemu-kvm) S 1 1 1 0 -1 0 0 0 0 0 1 2 0 0 20 0 1 0 9 0 0",
    )
    .unwrap();
    let p = read_qemu_process(
        &HostPaths::fake(dir.path().into(), dir.path().join("none")),
        77,
        &HashMap::new(),
    )
    .unwrap();
    assert_eq!(p.identity.name, "pid 77");
}
