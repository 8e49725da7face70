//! What the fuzzers found, kept: every input in `fuzz/regressions/TARGET/` (crashes, hangs and
//! out-of-memory cases `cargo xtask fuzz` found, after the fix) and the seeds in
//! `fuzz/seeds/TARGET/` go through the same entry points the fuzzers drive, on every
//! `cargo xtask test`. Unprivileged, fast.

use std::{
    path::{Path, PathBuf},
    sync::mpsc,
    time::Duration,
};

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    files
}

#[test]
fn every_kept_input_is_handled_quickly_without_a_panic() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut total = 0;
    for (name, target) in profiler::fuzz_targets::TARGETS {
        assert!(
            fuzz.join("fuzz_targets")
                .join(format!("{name}.rs"))
                .is_file(),
            "no fuzz target for {name}"
        );
        for kind in ["regressions", "seeds"] {
            for file in inputs(&fuzz.join(kind).join(name)) {
                let bytes = std::fs::read(&file).unwrap();
                let (tx, rx) = mpsc::channel();
                let target = *target;
                std::thread::spawn(move || {
                    target(&bytes);
                    let _ = tx.send(());
                });
                rx.recv_timeout(Duration::from_secs(10))
                    .unwrap_or_else(|_| {
                        panic!("{} took more than 10 s (or panicked)", file.display())
                    });
                total += 1;
            }
        }
    }
    eprintln!("{total} kept fuzz inputs replayed");
    assert!(total >= 10, "the seeds are missing: {total}");
}
