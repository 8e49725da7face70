//! `profiler compare BEFORE AFTER`: the Pulsar before/after tables side by side.

use std::{path::PathBuf, process::ExitCode};

use crate::analysis::compare::{Pair, compare, render_text};

pub fn run(
    before: PathBuf,
    after: PathBuf,
    pairs: Vec<Pair>,
    settle: f64,
    json: bool,
    plot: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let b = super::report::load(&before)?;
    let a = super::report::load(&after)?;
    let c = compare(&b, &a, &pairs, settle);
    if json {
        println!("{}", serde_json::to_string_pretty(&c)?);
    } else {
        print!("{}", render_text(&c));
    }
    if let Some(path) = plot {
        crate::outputs::plot::write(&path, &crate::outputs::plot::compare_chart(&c)?)?;
        eprintln!("profiler: wrote {}", path.display());
    }
    Ok(if c.vms.is_empty() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}
