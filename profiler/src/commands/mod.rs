//! One module per subcommand.

mod capacity;
mod check;
mod compare;
mod list;
mod record;
mod report;
mod serve;
mod top;

use std::process::ExitCode;

use crate::cli::{Cli, Command};

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::List {
            json,
            debug_dirs,
            timer_source,
        } => list::run(
            json,
            crate::probes::ProbeOptions {
                debug_roots: debug_roots(debug_dirs),
                timer_choice: timer_source,
                max_overhead: None,
            },
        ),
        Command::Record {
            window,
            duration,
            output,
            target,
        } => record::run(record::RecordOptions {
            window,
            duration,
            output,
            filter: filter(&target),
            libvirt_monitor: target.libvirt_monitor,
            probe: probe_options(target),
        }),
        Command::Report { file, format, plot } => report::run(&file, format, plot),
        Command::Compare {
            before,
            after,
            pairs,
            settle,
            json,
            plot,
        } => compare::run(before, after, pairs, settle, json, plot),
        Command::Capacity {
            file,
            cores,
            reserve_cores,
            target_util,
            settle,
            json,
            plot,
        } => {
            if !(target_util > 0.0 && target_util <= 1.0) {
                anyhow::bail!("--target-util must be in (0, 1], not {target_util}");
            }
            capacity::run(capacity::CapacityOptions {
                file,
                request: crate::analysis::capacity::CapacityRequest {
                    cores,
                    reserve_cores,
                    target_util,
                    settle,
                },
                json,
                plot,
            })
        }
        Command::Check {
            list_classes: true, ..
        } => {
            print!("{}", check::list_classes());
            Ok(ExitCode::SUCCESS)
        }
        Command::Check {
            file,
            quiet,
            windows,
            window,
            settle,
            max_timer_rate,
            format,
            list_classes: false,
            target,
        } => check::run(check::CheckOptions {
            file,
            quiet,
            windows,
            window,
            settle,
            max_timer_rate,
            format,
            filter: filter(&target),
            libvirt_monitor: target.libvirt_monitor,
            probe: probe_options(target),
        }),
        Command::Serve {
            listen,
            window,
            output,
            textfile_dir,
            exit_grace,
            target,
        } => serve::run(serve::ServeOptions {
            listen,
            window,
            output,
            textfile_dir,
            exit_grace,
            filter: filter(&target),
            libvirt_monitor: target.libvirt_monitor,
            probe: probe_options(target),
        }),
        Command::Top {
            window,
            output,
            target,
        } => top::run(top::TopOptions {
            window,
            output,
            filter: filter(&target),
            libvirt_monitor: target.libvirt_monitor,
            probe: probe_options(target),
        }),
    }
}

fn filter(target: &crate::cli::Target) -> crate::windows::session::VmFilter {
    crate::windows::session::VmFilter {
        names: target.vms.clone(),
        pids: target.pids.clone(),
    }
}

fn probe_options(target: crate::cli::Target) -> crate::probes::ProbeOptions {
    crate::probes::ProbeOptions {
        debug_roots: debug_roots(target.debug_dirs),
        timer_choice: target.timer_source,
        max_overhead: target.max_overhead,
    }
}

/// The system debug roots plus the user's `--debug-dir`s, searched first.
fn debug_roots(extra: Vec<std::path::PathBuf>) -> crate::offer::elf::DebugRoots {
    let mut roots = crate::offer::elf::DebugRoots::system();
    for (i, dir) in extra.into_iter().enumerate() {
        roots.debug_dirs.insert(i, dir);
    }
    roots
}
