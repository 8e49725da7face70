use super::*;

#[test]
fn kallsyms_lookup() {
    let text = "ffffffff814204b0 t hrtimer_wakeup\n\
                ffffffff81420500 T hrtimer_wakeup_other\n\
                ffffffffc0001000 t hrtimer_wakeup\t[some_module]\n";
    assert_eq!(
        kallsyms_address(text, "hrtimer_wakeup"),
        Some(0xffffffff814204b0)
    );
    assert_eq!(kallsyms_address(text, "hrtimer"), None);
    // kptr_restrict: zeros.
    assert_eq!(
        kallsyms_address("0000000000000000 t hrtimer_wakeup\n", "hrtimer_wakeup"),
        None
    );
    assert_eq!(
        kallsyms_address("garbage\n\n x y\n", "hrtimer_wakeup"),
        None
    );
}

#[test]
fn kernel_releases() {
    assert_eq!(release_version("6.18.44-fc-v1300"), Some((6, 18)));
    assert_eq!(release_version("5.15.0-91-generic\n"), Some((5, 15)));
    assert_eq!(release_version("garbage"), None);
    assert!(release_version("5.18.0").unwrap() >= HRTIMER_MIN_RELEASE);
    assert!(release_version("5.17.15").unwrap() < HRTIMER_MIN_RELEASE);
}

/// A tracefs with the hrtimer events' formats as this kernel has them.
fn hrtimer_tracefs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (event, fields) in [
        (
            "hrtimer_start",
            "\tfield:void * hrtimer;\toffset:8;\tsize:8;\tsigned:0;\n\
             \tfield:void * function;\toffset:16;\tsize:8;\tsigned:0;\n",
        ),
        (
            "hrtimer_cancel",
            "\tfield:void * hrtimer;\toffset:8;\tsize:8;\tsigned:0;\n",
        ),
    ] {
        let at = dir.path().join("events/timer").join(event);
        std::fs::create_dir_all(&at).unwrap();
        let text = format!(
            "name: {event}\nID: 1\nformat:\n\tfield:unsigned short common_type;\t\
             offset:0;\tsize:2;\tsigned:0;\n\n{fields}\nprint fmt: \"\"\n"
        );
        std::fs::write(at.join("format"), text).unwrap();
    }
    dir
}

#[test]
fn the_hrtimer_sources_need_the_release_the_layout_and_hrtimer_wakeup() {
    let tracefs = hrtimer_tracefs();
    let kallsyms = "ffffffff8142de30 t hrtimer_wakeup\n";
    assert_eq!(
        hrtimer_offered(tracefs.path(), kallsyms, "6.18.44"),
        Ok(0xffffffff8142de30)
    );
    // An older kernel: no hrtimer source, but hrtimer_start still marks for the libc probes.
    let old = hrtimer_offered(tracefs.path(), kallsyms, "5.15.0").unwrap_err();
    crate::testing::assert_contains(&old, "Linux 5.15 has no `prev_state`");
    assert!(hrtimer_start_offered(tracefs.path(), kallsyms).is_ok());
    // kptr_restrict: neither.
    let hidden = "0000000000000000 t hrtimer_wakeup\n";
    let why = hrtimer_start_offered(tracefs.path(), hidden).unwrap_err();
    crate::testing::assert_contains(&why, "kptr_restrict");
    assert!(hrtimer_offered(tracefs.path(), hidden, "6.18.44").is_err());
    // A field moved: refused, naming it.
    let moved = hrtimer_tracefs();
    let format = moved.path().join("events/timer/hrtimer_start/format");
    let text = std::fs::read_to_string(&format)
        .unwrap()
        .replace("offset:16", "offset:24");
    std::fs::write(&format, text).unwrap();
    let why = hrtimer_start_offered(moved.path(), kallsyms).unwrap_err();
    crate::testing::assert_contains(&why, "`function` at offset 24");
}
