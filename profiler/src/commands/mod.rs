//! One module per subcommand.

mod capacity;
mod check;
mod compare;
mod list;
mod live;
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
            uprobe_links,
        } => list::run(
            json,
            crate::probes::ProbeOptions {
                debug_roots: debug_roots(debug_dirs),
                timer_choice: timer_source,
                max_overhead: None,
                uprobe_links,
                selective: false,
            },
        ),
        Command::Record {
            window,
            duration,
            output,
            target,
        } => record::run(record::RecordOptions {
            live: live_options(window, target),
            duration,
            output,
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
        Command::Capacity(args) => capacity::run(args),
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
            max_wakeup_rate,
            format,
            list_classes: false,
            target,
        } => check::run(check::CheckOptions {
            file,
            quiet,
            windows,
            settle,
            max_timer_rate,
            max_wakeup_rate,
            format,
            live: live_options(window, target),
        }),
        Command::Serve {
            listen,
            window,
            output,
            textfile_dir,
            exit_grace,
            target,
        } => serve::run(serve::ServeOptions {
            live: live_options(window, target),
            listen,
            output,
            textfile_dir,
            exit_grace,
        }),
        Command::Top {
            window,
            output,
            target,
        } => top::run(top::TopOptions {
            live: live_options(window, target),
            output,
        }),
    }
}

/// What a live command is given by its window length and target options.
fn live_options(window: u64, target: crate::cli::Target) -> live::LiveOptions {
    let selective = !target.vms.is_empty() || !target.pids.is_empty();
    live::LiveOptions {
        window,
        filter: crate::windows::session::VmFilter {
            names: target.vms,
            pids: target.pids,
        },
        libvirt_monitor: target.libvirt_monitor,
        probe: crate::probes::ProbeOptions {
            debug_roots: debug_roots(target.debug_dirs),
            timer_choice: target.timer_source,
            max_overhead: target.max_overhead,
            uprobe_links: target.uprobe_links,
            selective,
        },
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
