//! `profiler capacity RUN`: VMs per host from their measured idle cost.

use std::{path::PathBuf, process::ExitCode};

use crate::analysis::capacity::{
    CapacityRequest, capacity, render_text, why_no_host_points, why_no_vm_costs,
};

pub struct CapacityOptions {
    pub file: PathBuf,
    pub request: CapacityRequest,
    pub json: bool,
    pub plot: Option<PathBuf>,
}

pub fn run(opts: CapacityOptions) -> anyhow::Result<ExitCode> {
    let records = super::report::load(&opts.file)?;
    // SAFETY: sysconf has no preconditions.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as f64;
    let report = capacity(&records, &opts.request, online);
    if report.vms.is_empty() {
        let why = why_no_vm_costs(&records, &opts.request)
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
