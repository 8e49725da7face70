//! The README's count table and `--help` say what the code does: the timer sources `auto`
//! picks, in the order the source policy tries them (unprivileged, no guest).

use clap::CommandFactory as _;
use profiler::offer::policy::{TimerChoice, timer_plan};

/// Where each of `phrases` first appears in `text`, failing on a missing one.
fn positions(text: &str, phrases: &[&str], what: &str) -> Vec<usize> {
    phrases
        .iter()
        .map(|p| {
            text.find(p)
                .unwrap_or_else(|| panic!("{what} does not name {p:?}:\n{text}"))
        })
        .collect()
}

fn auto_order() -> Vec<&'static str> {
    let (sources, _) = timer_plan(
        &Ok(()),
        &profiler::offer::kernel::KernelOffer::all(),
        TimerChoice::Auto,
    );
    sources.iter().map(|s| s.what()).collect()
}

#[test]
fn readme_timer_row_names_autos_sources_in_order() {
    let readme = include_str!("../../README.md");
    let row = readme
        .lines()
        .find(|l| l.starts_with("| `timer` |"))
        .expect("the README's count table has a `timer` row");
    let cell = row.rsplit(" | ").next().unwrap();
    let at = positions(cell, &auto_order(), "the README's `timer` row");
    assert!(
        at.is_sorted(),
        "not in auto's order {:?}: {cell}",
        auto_order()
    );
    assert!(
        cell.starts_with(&format!(
            "`auto` (`--timer-source`) picks {}",
            auto_order()[0]
        )),
        "the cell opens with what auto picks first: {cell}"
    );
}

#[test]
fn record_help_says_what_auto_picks_first() {
    let mut cli = profiler::cli::Cli::command();
    let record = cli
        .find_subcommand_mut("record")
        .expect("a record subcommand");
    let help = record.render_long_help().to_string();
    let option = help
        .split("--timer-source")
        .nth(1)
        .expect("record --help describes --timer-source");
    let first_sentence = option.split("\n\n").next().unwrap().replace('\n', " ");
    let squeezed: String = first_sentence
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let at = positions(&squeezed, &auto_order(), "--timer-source's help");
    assert!(at.is_sorted(), "not in auto's order: {squeezed}");
    assert!(
        squeezed.contains(&format!("`auto` picks {}", auto_order()[0])),
        "{squeezed}"
    );
}
