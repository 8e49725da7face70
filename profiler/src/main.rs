use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = profiler::cli::Cli::parse();
    match profiler::commands::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("profiler: error: {err:#}");
            std::process::ExitCode::from(2)
        }
    }
}
