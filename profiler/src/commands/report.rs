use std::{
    fs::File,
    io::{self, BufReader, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;

use crate::{
    analysis::report::{ReportFormat, render},
    record::{WindowRecord, read_records},
};

/// Reads a recording (`-` is standard input); warnings (a truncated last line) to stderr.
pub fn load(file: &Path) -> anyhow::Result<Vec<WindowRecord>> {
    let (records, warnings) = if file == Path::new("-") {
        read_records(io::stdin().lock())?
    } else {
        let f = File::open(file).with_context(|| format!("opening {}", file.display()))?;
        read_records(BufReader::new(f)).with_context(|| format!("reading {}", file.display()))?
    };
    for w in warnings {
        eprintln!("profiler: warning: {}: {w}", file.display());
    }
    Ok(records)
}

pub fn run(file: &Path, format: ReportFormat, plot: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let records = load(file)?;
    io::stdout().write_all(render(&records, format).as_bytes())?;
    if let Some(path) = plot {
        crate::outputs::plot::write(&path, &crate::outputs::plot::report_chart(&records)?)?;
        eprintln!("profiler: wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
