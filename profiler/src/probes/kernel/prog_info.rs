//! What aya 0.14 does not expose of a loaded program's `bpf_prog_info`: its recursion misses,
//! the runs the kernel skipped because a BPF program or a BPF map syscall (which holds the
//! CPU's `bpf_prog_active` while it copies or scans a map) was already running on that CPU,
//! e.g. a timer expiry interrupting the collector's map read. Each skipped run is an event
//! that may not have been counted.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use super::bpf_call::{BPF_OBJ_GET_INFO_BY_FD, bpf};

/// `struct bpf_prog_info` up to `recursion_misses` (Linux 5.12): 27 eight-byte words, the
/// misses in the last. The kernel fills what fits of a shorter buffer.
type ProgInfoHead = [u64; 27];
const RUN_CNT: usize = 25;
const RECURSION_MISSES: usize = 26;

/// The `info` member of `union bpf_attr`.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn info_head(program: BorrowedFd<'_>) -> io::Result<ProgInfoHead> {
    let mut head: ProgInfoHead = [0; 27];
    let mut attr = InfoAttr {
        bpf_fd: program.as_raw_fd() as u32,
        info_len: size_of::<ProgInfoHead>() as u32,
        info: head.as_mut_ptr() as u64,
    };
    // SAFETY: `attr` points at a buffer of `info_len` bytes that outlives the call.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(head)
}

/// Runs of `program` the kernel skipped as nested, since it was loaded.
pub fn recursion_misses(program: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(info_head(program)?[RECURSION_MISSES])
}

/// Runs counted while BPF statistics were on (to check the layout against aya's reading).
pub fn run_count(program: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(info_head(program)?[RUN_CNT])
}

#[cfg(test)]
mod tests {
    //! Root test: the layout agrees with aya's own reading of the same program's run count.

    use std::os::fd::AsFd as _;

    use crate::probes::kernel::test_support::root_test;

    #[test]
    fn root_prog_info_layout_agrees_with_aya() {
        let (_one_at_a_time, mut ebpf) = root_test!("root_prog_info_layout");
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
        crate::probes::kernel::object::attach_tracepoint(&mut ebpf, "sched", "sched_process_exec")
            .unwrap();
        for _ in 0..5 {
            std::process::Command::new("true").status().unwrap();
        }
        drop(stats);
        let program = ebpf.program("sched_process_exec").unwrap();
        let fd = program.fd().unwrap().as_fd();
        let ours = super::run_count(fd).unwrap();
        assert!(ours >= 5, "{ours} runs");
        assert_eq!(ours, program.info().unwrap().run_count());
        // Nothing nests over an exec here.
        assert_eq!(super::recursion_misses(fd).unwrap(), 0);
    }
}
