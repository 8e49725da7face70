//! The `bpf(2)` commands aya does not wrap (multi-uprobe links, links on perf events opened by
//! hand, batched lookups, program info, test runs), through one call site.

use std::io;
use std::os::fd::{FromRawFd as _, OwnedFd, RawFd};

/// `enum bpf_cmd` in `include/uapi/linux/bpf.h`.
pub const BPF_PROG_LOAD: libc::c_long = 5;
pub const BPF_PROG_TEST_RUN: libc::c_long = 10;
pub const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
pub const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
pub const BPF_LINK_CREATE: libc::c_long = 28;

/// `bpf(cmd, attr, sizeof attr)`: the kernel's return value, or the error it set.
///
/// # Safety
/// `attr` is a valid `bpf_attr` prefix for `cmd`, and every pointer in it points at memory
/// that outlives the call and is writable wherever the kernel writes.
pub unsafe fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: the caller's promise.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut A,
            std::mem::size_of::<A>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// [`bpf`] for a command that returns a new descriptor (a program, a link).
///
/// # Safety
/// As for [`bpf`].
pub unsafe fn bpf_fd<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<OwnedFd> {
    // SAFETY: the caller's promise.
    let fd = unsafe { bpf(cmd, attr) }?;
    // SAFETY: a new descriptor the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}
