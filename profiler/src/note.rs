//! Diagnostics as values: library code never prints; what goes wrong travels as a [`Note`] to
//! the command, which shows it (stderr for `record`, the status line of `top`, a metric in
//! `serve`).

use std::fmt;

/// A diagnostic about one VM or about the profiler itself, shown by the command that runs the
/// session (stderr for `record`, the status line of `top`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// The VM's name, when the note is about one VM.
    pub vm: Option<String>,
    pub text: String,
}

impl Note {
    pub fn vm(name: &str, text: impl Into<String>) -> Self {
        Self {
            vm: Some(name.to_string()),
            text: text.into(),
        }
    }

    pub fn general(text: impl Into<String>) -> Self {
        Self {
            vm: None,
            text: text.into(),
        }
    }
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.vm {
            Some(vm) => write!(f, "VM {}: {}", crate::text::clean(vm), self.text),
            None => f.write_str(&self.text),
        }
    }
}
