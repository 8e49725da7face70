//! Helpers the unit tests of every layer share (compiled for tests only).

/// A deterministic xorshift64 sequence, for fuzz-like tests that must replay the same way.
pub fn xorshift() -> impl FnMut() -> u64 {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// Asserts that `text` contains `needle`, showing the whole text when it does not.
#[track_caller]
pub fn assert_contains(text: &str, needle: &str) {
    assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
}

/// Asserts that `f` maps each input of `cases` to its output (a table-driven test), naming
/// the input that does not.
#[track_caller]
pub fn assert_maps<I: Copy + std::fmt::Debug, O: PartialEq + std::fmt::Debug>(
    f: impl Fn(I) -> O,
    cases: &[(I, O)],
) {
    for (input, want) in cases {
        assert_eq!(&f(*input), want, "for {input:?}");
    }
}
