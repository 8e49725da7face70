//! Making sure tracefs is mounted: tracepoint attachment looks up event ids there, and on some
//! hosts (this machine kind among them) `/sys/kernel/tracing` exists but is empty.

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use anyhow::bail;

const CANDIDATES: &[&str] = &["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

fn has_events(dir: &Path) -> bool {
    dir.join("events").is_dir()
}

/// Returns the mounted tracefs, mounting it at `/sys/kernel/tracing` when needed.
pub fn ensure_tracefs() -> anyhow::Result<PathBuf> {
    if let Some(found) = CANDIDATES.iter().map(Path::new).find(|d| has_events(d)) {
        return Ok(found.to_path_buf());
    }
    let target = Path::new(CANDIDATES[0]);
    if !target.is_dir() {
        bail!(
            "tracefs is not mounted and {} does not exist: the kernel lacks CONFIG_TRACING, \
             or /sys is not mounted",
            target.display()
        );
    }
    let src = CString::new("nodev").expect("no NUL");
    let dst = CString::new(CANDIDATES[0]).expect("no NUL");
    let fstype = CString::new("tracefs").expect("no NUL");
    // SAFETY: all pointers are valid NUL-terminated strings; data may be NULL.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        bail!(
            "tracefs is not mounted and mounting it at {} failed: {err}. Run as root, or mount \
             it yourself: mount -t tracefs nodev {}",
            CANDIDATES[0],
            CANDIDATES[0]
        );
    }
    if !has_events(target) {
        bail!(
            "mounted tracefs at {} but it has no events/ directory",
            target.display()
        );
    }
    Ok(target.to_path_buf())
}
