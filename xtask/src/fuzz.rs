//! `cargo xtask fuzz [--seconds N] [TARGET...]`: runs each cargo-fuzz target (`fuzz/`) for a
//! bounded time, starting from the seeds in `fuzz/seeds/` (plus ELF files compiled from the
//! test fixtures); whatever makes a target crash, hang or run out of memory is copied to
//! `fuzz/regressions/TARGET/`, which `cargo xtask test` replays on every run.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::setup::{run, which};

fn flag(args: &[String], name: &str, default: u64) -> anyhow::Result<u64> {
    match args.iter().position(|a| a == name) {
        Some(i) => Ok(args
            .get(i + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()?),
        None => Ok(default),
    }
}

/// Every target, from the fuzz crate's `fuzz_targets/` directory.
fn targets(fuzz: &Path) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = fs::read_dir(fuzz.join("fuzz_targets"))?
        .flatten()
        .filter_map(|e| {
            e.path()
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
        })
        .collect();
    names.sort();
    Ok(names)
}

/// ELF inputs the seeds cannot carry (binaries are not committed): the test fixture with
/// USDT probes, compiled with and without debug info.
fn elf_seeds(root: &Path, corpus: &Path, target: &str) -> anyhow::Result<()> {
    if !matches!(target, "elf_usdt_notes" | "elf_symbols" | "dwarf_members") {
        return Ok(());
    }
    // The demo is two files: the probes and their semaphores live in the second.
    let fixtures = root.join("profiler/tests/fixtures/elf");
    let sources = [
        fixtures.join("usdt_demo_main.c"),
        fixtures.join("usdt_demo_sema.c"),
    ];
    for (name, flags) in [
        ("usdt-demo-g", &["-g", "-O1"][..]),
        ("usdt-demo", &["-O2", "-s"]),
    ] {
        let out = corpus.join(name);
        if out.exists() {
            continue;
        }
        let status = Command::new("cc")
            .args(flags)
            .arg("-o")
            .arg(&out)
            .args(&sources)
            .status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!(
                "xtask fuzz: could not compile {} (no ELF seed)",
                sources[0].display()
            );
        }
    }
    Ok(())
}

pub fn fuzz(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let seconds = flag(args, "--seconds", 60)?;
    let fuzz = root.join("fuzz");
    let all = targets(&fuzz)?;
    let wanted: Vec<String> = args.iter().filter(|a| all.contains(a)).cloned().collect();
    let selected = if wanted.is_empty() { all } else { wanted };
    crate::setup::setup(root)?;
    if !which("cargo-fuzz") {
        eprintln!("xtask fuzz: cargo install cargo-fuzz");
        run(Command::new("cargo").args(["install", "--locked", "cargo-fuzz"]))?;
    }
    let mut found = Vec::new();
    for target in &selected {
        let corpus = fuzz.join("corpus").join(target);
        fs::create_dir_all(&corpus)?;
        elf_seeds(root, &corpus, target)?;
        let artifacts = fuzz.join("artifacts").join(target);
        let _ = fs::remove_dir_all(&artifacts);
        fs::create_dir_all(&artifacts)?;
        eprintln!("xtask fuzz: {target} for {seconds} s");
        let status = Command::new("cargo")
            .current_dir(&fuzz)
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO")
            .env_remove("RUSTC")
            .args(["+nightly", "fuzz", "run", target])
            .arg(&corpus)
            .arg(fuzz.join("seeds").join(target))
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-timeout=10",
                "-rss_limit_mb=2048",
                "-max_len=65536",
            ])
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .status()
            .context("running cargo fuzz")?;
        let kept = keep_findings(&artifacts, &fuzz.join("regressions").join(target))?;
        if !status.success() || !kept.is_empty() {
            found.push(format!("{target}: {}", kept.len()));
        }
    }
    if !found.is_empty() {
        bail!(
            "fuzzing found inputs the parsers do not survive ({}); they are in \
             fuzz/regressions/, which `cargo xtask test` replays",
            found.join(", ")
        );
    }
    eprintln!(
        "xtask fuzz: {} target(s) ran clean for {seconds} s each",
        selected.len()
    );
    Ok(())
}

/// Copies crash/timeout/oom artifacts into the regression directory; returns what it kept.
fn keep_findings(artifacts: &Path, regressions: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut kept = Vec::new();
    fs::create_dir_all(regressions)?;
    for entry in fs::read_dir(artifacts)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if ["crash-", "timeout-", "oom-", "leak-"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            let to = regressions.join(&name);
            fs::copy(entry.path(), &to)?;
            eprintln!("xtask fuzz: kept {}", to.display());
            kept.push(to);
        }
    }
    Ok(kept)
}
