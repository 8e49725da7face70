//! The one cleaning applied to text from outside — VM names, uuids, device, callback and
//! Nova names: anyone who starts a QEMU or defines a domain sets them — wherever it leaves the
//! process: the terminal (`top`, `list`, `report`, `check`), CSV, metric labels, notes.

/// Makes text from outside safe to show. Besides control characters (C0, DEL, C1 — every
/// terminal escape sequence starts with one), it replaces the invisible formatting characters
/// that can make text lie about itself (bidi overrides and isolates, zero-width characters,
/// line and paragraph separators) with U+FFFD, and caps the length at 256 characters.
pub fn clean(s: &str) -> String {
    const MAX_CHARS: usize = 256;
    let mut out: String = s
        .chars()
        .take(MAX_CHARS)
        .map(|c| if is_unsafe(c) { '\u{FFFD}' } else { c })
        .collect();
    if s.chars().nth(MAX_CHARS).is_some() {
        out.push('…');
    }
    out
}

pub(crate) fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'                  // Arabic letter mark
            | '\u{200B}'..='\u{200F}'   // zero-width space/joiners, LRM, RLM
            | '\u{2028}'..='\u{202E}'   // line/paragraph separators, bidi embeddings/overrides
            | '\u{2060}'..='\u{2069}'   // word joiner, invisible operators, bidi isolates
            | '\u{FEFF}'                // zero-width no-break space
            | '\u{FFF9}'..='\u{FFFB}' // interlinear annotation
        )
}

/// Each item [`clean`]ed, joined with `, `.
pub fn clean_list<S: AsRef<str>>(items: &[S]) -> String {
    items
        .iter()
        .map(|s| clean(s.as_ref()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A CSV cell: cleaned, quoted when needed, and a leading `=`, `+`, `-`, `@` (or tab / CR, which
/// some spreadsheets also read as a formula start) defused with `'`, so a hostile VM name
/// cannot run a formula in whoever opens the file.
pub fn csv_field(s: &str) -> String {
    let s = clean(s);
    let formula = s.starts_with(['=', '+', '-', '@', '\t', '\r']);
    let s = if formula { format!("'{s}") } else { s };
    if formula || s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each input as a terminal shows it and as a CSV cell holds it.
    #[test]
    fn escapes_invisible_characters_and_formulas_are_defused() {
        for (raw, shown, cell) in [
            ("\x1b[2Jx", "\u{FFFD}[2Jx", "\u{FFFD}[2Jx"),
            ("a\u{202E}b", "a\u{FFFD}b", "a\u{FFFD}b"),
            ("\u{9b}6n", "\u{FFFD}6n", "\u{FFFD}6n"),
            ("web-01", "web-01", "web-01"),
            (
                "=HYPERLINK(\"x\")",
                "=HYPERLINK(\"x\")",
                "\"'=HYPERLINK(\"\"x\"\")\"",
            ),
            ("+1", "+1", "\"'+1\""),
            ("@SUM", "@SUM", "\"'@SUM\""),
            ("a,b", "a,b", "\"a,b\""),
            ("\x1bx", "\u{FFFD}x", "\u{FFFD}x"),
        ] {
            assert_eq!(
                (clean(raw), csv_field(raw)),
                (shown.into(), cell.into()),
                "{raw:?}"
            );
        }
        let long = "x".repeat(300);
        assert_eq!(clean(&long).chars().count(), 257);
    }
}
