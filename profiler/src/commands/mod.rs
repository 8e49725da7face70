//! One module per subcommand.

mod list;
mod record;
mod report;
mod top;

use std::process::ExitCode;

use crate::cli::{Cli, Command};

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::List { json } => list::run(json),
        Command::Record {
            window,
            duration,
            output,
            vms,
            pids,
        } => record::run(record::RecordOptions {
            window,
            duration,
            output,
            filter: crate::session::VmFilter { names: vms, pids },
        }),
        Command::Report { file, format } => report::run(&file, format),
        Command::Top {
            window,
            output,
            vms,
            pids,
        } => top::run(top::TopOptions {
            window,
            output,
            filter: crate::session::VmFilter { names: vms, pids },
        }),
    }
}
