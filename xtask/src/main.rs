//! `cargo xtask <task>`: set-up, test guest, demo and the whole test suite.

mod bench;
mod demo;
mod density;
mod fuzz;
mod qemu_usdt;
mod setup;
mod test;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  setup   install everything building and testing needs (idempotent; needs root on Debian)
  guest   build the test guest (Debian kernel + busybox initramfs + workload) into the cache
  qemu-usdt  build Debian's QEMU source with USDT probes (dtrace backend) into the cache
  boot-sectors  write the KVM test guests (boot sectors: PIT at 1,000 and 100 Hz, halt) into
          the cache and print their paths
  demo    set up, boot a noisy and a quiet guest, profile them, print the report
  test [--busy-neighbour] [TEST ARGS...]
          set up, build the guest, run lints, unit tests and the root end-to-end tests;
          --busy-neighbour keeps every CPU busy meanwhile (the suite on a slower machine)
  bench [--quick] [NAME]
          measure the profiler's costs into docs/benchmarks.md (`cargo xtask bench help` lists them)
  fuzz [--seconds N] [TARGET...]
          run the cargo-fuzz targets (fuzz/) for N seconds each; findings go to fuzz/regressions
  density --vms N --profile noisy|quiet [--window S] [--hold K]
          boot N guests one by one while recording; host CPU vs VM count into docs/capacity.md
";

/// The boot-sector test guests the KVM end-to-end tests run.
fn boot_sectors() -> anyhow::Result<()> {
    use xtask::boot_sector::BootSector;
    for sector in [
        BootSector::Pit { hz: 1000 },
        BootSector::Pit { hz: 100 },
        BootSector::Halt,
    ] {
        println!("{}: {}", sector.name(), sector.image()?.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = xtask::launch::find_workspace_root();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup::setup(&root),
        Some("guest") => xtask::guest::guest_command(&root),
        Some("qemu-usdt") => qemu_usdt::qemu_usdt().map(|bin| println!("{}", bin.display())),
        Some("boot-sectors") => boot_sectors(),
        Some("demo") => demo::demo(&root, &args[1..]),
        Some("test") => test::test(&root, &args[1..]),
        Some("bench") => bench::bench(&root, &args[1..]),
        Some("density") => density::density(&root, &args[1..]),
        Some("fuzz") => fuzz::fuzz(&root, &args[1..]),
        // A process named like QEMU for the scale benchmarks (see bench/qemu_like.rs).
        Some("qemu-like") => bench::qemu_like_main(&args[1..]),
        // A syscall loop timing itself (see bench/loops.rs).
        Some("syscall-loop") => bench::syscall_loop_main(&args[1..]),
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            Ok(())
        }
        _ => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
