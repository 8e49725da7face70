use std::{
    fs::File,
    io::{self, BufReader, Write as _},
    path::Path,
    process::ExitCode,
};

use anyhow::Context as _;

use crate::{
    record::read_records,
    report::{ReportFormat, render},
};

pub fn run(file: &Path, format: ReportFormat) -> anyhow::Result<ExitCode> {
    let (records, warnings) = if file == Path::new("-") {
        read_records(io::stdin().lock())?
    } else {
        let f = File::open(file).with_context(|| format!("opening {}", file.display()))?;
        read_records(BufReader::new(f)).with_context(|| format!("reading {}", file.display()))?
    };
    for w in warnings {
        eprintln!("profiler: warning: {}: {w}", file.display());
    }
    io::stdout().write_all(render(&records, format).as_bytes())?;
    Ok(ExitCode::SUCCESS)
}
