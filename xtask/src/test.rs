//! `cargo xtask test`: set-up, lints, unit tests and (as root) end-to-end tests on real guests.

use std::{
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use crate::setup::{is_root, run, setup};

/// A CPU-hungry neighbour: one busy thread per CPU at normal priority, until dropped. The
/// suite run beside it (`cargo xtask test --busy-neighbour`) is the suite on a machine half as
/// fast: no test may depend on how fast the machine is.
struct BusyNeighbour {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl BusyNeighbour {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let threads = (0..cpus)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                })
            })
            .collect();
        eprintln!("xtask: a busy neighbour runs on all {cpus} CPUs while the tests run");
        Self { stop, threads }
    }
}

impl Drop for BusyNeighbour {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

pub fn test(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let busy_neighbour = args.iter().any(|a| a == "--busy-neighbour");
    let args: Vec<&String> = args.iter().filter(|a| *a != "--busy-neighbour").collect();
    setup(root)?;
    let cargo = env!("CARGO");
    let cargo_cmd = || {
        let mut c = Command::new(cargo);
        c.current_dir(root);
        c
    };

    eprintln!("xtask: cargo fmt --check");
    run(cargo_cmd().args(["fmt", "--all", "--check"]))?;
    eprintln!("xtask: cargo clippy -D warnings");
    run(cargo_cmd().args([
        "clippy",
        "--workspace",
        "--exclude",
        "profiler-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;

    // The eBPF crate only builds for the bpf target, with nightly and build-std.
    eprintln!("xtask: cargo +nightly clippy (eBPF crate) -D warnings");
    run(Command::new("cargo")
        .current_dir(root.join("profiler-ebpf"))
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .args([
            "+nightly",
            "clippy",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]))?;

    // The alerting rules shipped for `profiler serve`, with their unit tests.
    if crate::setup::which("promtool") {
        eprintln!("xtask: promtool check rules / test rules (deploy/prometheus)");
        let rules = root.join("deploy/prometheus");
        run(Command::new("promtool").current_dir(&rules).args([
            "check",
            "rules",
            "qemu-profiler-rules.yml",
        ]))?;
        run(Command::new("promtool").current_dir(&rules).args([
            "test",
            "rules",
            "qemu-profiler-rules.test.yml",
        ]))?;
    } else if is_root() {
        anyhow::bail!("promtool is missing although set-up ran (Debian package `prometheus`)");
    } else {
        eprintln!("xtask: promtool not installed: the alerting-rule tests are skipped");
    }

    let mut tests = cargo_cmd();
    // Every test binary runs, whatever failed before it: one run says everything that fails.
    tests.args([
        "test",
        "--workspace",
        "--exclude",
        "profiler-ebpf",
        "--no-fail-fast",
    ]);
    if is_root() {
        let image = xtask::guest::build_guest(root)?;
        // Read/write tests need QEMU with USDT probes: built once (~15 min), then cached.
        let qemu_usdt = crate::qemu_usdt::qemu_usdt()?;
        // The end-to-end tests boot guests from this image; with PROFILER_E2E_REQUIRE a missing
        // prerequisite fails them instead of skipping them.
        tests
            .env("PROFILER_GUEST_KERNEL", &image.kernel)
            .env("PROFILER_GUEST_INITRD", &image.initrd)
            .env("PROFILER_QEMU_USDT", &qemu_usdt)
            .env("PROFILER_E2E_REQUIRE", "1");
    } else {
        eprintln!(
            "xtask: not root: the end-to-end tests (real guests, eBPF) will be skipped; run \
             `sudo -E cargo xtask test` for the whole suite"
        );
    }
    // Guests get the two cores to themselves: one test binary, one test at a time.
    tests.args(["--", "--test-threads=1"]).args(&args);
    eprintln!("xtask: cargo test");
    // Built first, so that the neighbour slows the tests, not the compiler.
    let mut build = cargo_cmd();
    build.args([
        "test",
        "--workspace",
        "--exclude",
        "profiler-ebpf",
        "--no-run",
    ]);
    run(&mut build)?;
    let _neighbour = busy_neighbour.then(BusyNeighbour::start);
    run(&mut tests)?;
    if is_root() {
        // The exact counts again with the other uprobe links: one per binary, shared by its
        // VMs (what watching every VM gets; these tests select theirs, which gets one per VM),
        // and per site (what kernels before 6.6 get).
        for links in ["per-binary", "per-site"] {
            eprintln!("xtask: exact-count end-to-end tests with --uprobe-links {links}");
            let mut again = cargo_cmd();
            again.args(["test", "-p", "profiler"]);
            for test in LINK_MODE_TESTS {
                again.args(["--test", test]);
            }
            again
                .env("PROFILER_UPROBE_LINKS", links)
                .args(["--", "--test-threads=1"])
                .args(&args);
            for (key, value) in tests.get_envs() {
                if let Some(value) = value {
                    again.env(key, value);
                }
            }
            run(&mut again)?;
        }
    }
    Ok(())
}

/// The end-to-end tests whose counts are exact through uprobes: run again with each other kind
/// of uprobe link.
const LINK_MODE_TESTS: [&str; 4] = [
    "e2e_devices",
    "e2e_symbols",
    "e2e_timers",
    "e2e_timer_sources",
];
