//! `profiler top` in a real terminal for the benchmarks: a detached tmux session.

use std::process::Command;

use anyhow::Context as _;

/// Runs tmux with `args`; its standard output.
pub fn tmux(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("tmux")
        .args(args)
        .output()
        .context("running tmux")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A detached tmux session running a script, killed on drop.
pub struct TmuxSession(String);

impl TmuxSession {
    /// `script` in a new session `name` of `width` × `height`.
    pub fn start(name: &str, script: &str, width: u16, height: u16) -> anyhow::Result<Self> {
        let (width, height) = (width.to_string(), height.to_string());
        tmux(&[
            "new-session",
            "-d",
            "-s",
            name,
            "-x",
            &width,
            "-y",
            &height,
            script,
        ])?;
        Ok(Self(name.to_string()))
    }
}

impl Drop for TmuxSession {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .status();
    }
}
