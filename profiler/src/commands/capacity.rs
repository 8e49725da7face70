//! `profiler capacity RUN`: VMs per host from their measured idle cost.

use std::process::ExitCode;

use crate::{
    analysis::capacity::{
        CapacityRequest, capacity, render_text, why_no_host_points, why_no_vm_costs,
    },
    cli::CapacityArgs,
};

fn gib(g: f64) -> u64 {
    (g.max(0.0) * (1u64 << 30) as f64) as u64
}

pub fn run(opts: CapacityArgs) -> anyhow::Result<ExitCode> {
    let target_util = opts.target_util;
    if !(target_util > 0.0 && target_util <= 1.0) {
        anyhow::bail!("--target-util must be in (0, 1], not {target_util}");
    }
    let request = CapacityRequest {
        cores: opts.cores,
        reserve_cores: opts.reserve_cores,
        target_util,
        settle: opts.settle,
        memory: opts.memory_gib.map(gib),
        reserve_memory: gib(opts.reserve_memory_gib),
    };
    let records = super::report::load(&opts.file)?;
    // SAFETY: sysconf has no preconditions.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as f64;
    let report = capacity(&records, &request, online);
    if report.vms.is_empty() {
        let why = why_no_vm_costs(&records, &request)
            .unwrap_or_else(|| "no VM has a settled full window with its CPU time".into());
        anyhow::bail!("{}: nothing to answer: {why}", opts.file.display());
    }
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render_text(&report));
    }
    if let Some(path) = opts.plot {
        if let Some(why) = why_no_host_points(&records, &report) {
            anyhow::bail!("{}: nothing to plot: {why}", opts.file.display());
        }
        crate::outputs::plot::write(&path, &crate::outputs::plot::capacity_chart(&report)?)?;
        eprintln!("profiler: wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
