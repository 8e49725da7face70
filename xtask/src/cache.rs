//! The xtask cache: downloaded packages, guest images, built tools.
//!
//! It lives outside the repository on purpose: CI runs a fresh clone on the same machine
//! and must reuse what an earlier run downloaded and built.

use std::ffi::OsString;
use std::path::PathBuf;

/// `$PROFILER_CACHE_DIR` if set, else `$XDG_CACHE_HOME/profiler`, else
/// `$HOME/.cache/profiler`. Created on demand (best effort: if that fails, the first write
/// into it reports the error with its path).
pub fn cache_dir() -> PathBuf {
    let dir = resolve(
        std::env::var_os("PROFILER_CACHE_DIR"),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    );
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// `cache_dir()/name`, created, with a clear error if it cannot be.
pub fn cache_subdir(name: &str) -> anyhow::Result<PathBuf> {
    let dir = cache_dir().join(name);
    std::fs::create_dir_all(&dir)
        .map_err(|e| anyhow::anyhow!("cannot create cache directory {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Pure part of [`cache_dir`]. Empty variables count as unset; a relative
/// `XDG_CACHE_HOME` is ignored, as the XDG base-directory spec requires.
fn resolve(profiler: Option<OsString>, xdg: Option<OsString>, home: Option<OsString>) -> PathBuf {
    let set = |v: Option<OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = set(profiler) {
        return dir;
    }
    if let Some(xdg) = set(xdg).filter(|p| p.is_absolute()) {
        return xdg.join("profiler");
    }
    match set(home) {
        Some(home) => home.join(".cache").join("profiler"),
        // No HOME at all (e.g. a bare systemd unit): still somewhere shared between runs.
        None => std::env::temp_dir().join("profiler-cache"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> Option<OsString> {
        Some(s.into())
    }

    #[test]
    fn precedence() {
        assert_eq!(resolve(os("/c"), os("/x"), os("/h")), PathBuf::from("/c"));
        assert_eq!(
            resolve(None, os("/x"), os("/h")),
            PathBuf::from("/x/profiler")
        );
        assert_eq!(
            resolve(None, None, os("/h")),
            PathBuf::from("/h/.cache/profiler")
        );
    }

    #[test]
    fn empty_and_relative_are_ignored() {
        assert_eq!(
            resolve(os(""), os(""), os("/h")),
            PathBuf::from("/h/.cache/profiler")
        );
        assert_eq!(
            resolve(None, os("rel"), os("/h")),
            PathBuf::from("/h/.cache/profiler")
        );
    }

    #[test]
    fn no_home() {
        assert_eq!(
            resolve(None, None, None),
            std::env::temp_dir().join("profiler-cache")
        );
    }
}
