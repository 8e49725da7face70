//! Shared memory mappings of `BPF_F_MMAPABLE` arrays: userspace reads and writes their values
//! with atomic loads and stores, without a syscall.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicU64},
};

use anyhow::Context as _;
use aya::{Ebpf, maps::Map};

/// A read-write, shared mapping of an mmapable array of `entries` values of `value_size`
/// bytes (a multiple of 8, as the kernel lays them out).
pub struct MappedArray {
    base: NonNull<u8>,
    entries: u32,
    value_size: usize,
    bytes: usize,
}

// SAFETY: the mapping is plain shared memory, accessed only through atomics; it stays valid
// until `Drop` unmaps it.
unsafe impl Send for MappedArray {}
unsafe impl Sync for MappedArray {}

impl MappedArray {
    pub fn map(ebpf: &Ebpf, name: &str, entries: u32, value_size: usize) -> anyhow::Result<Self> {
        let Some(Map::Array(data)) = ebpf.map(name) else {
            anyhow::bail!("map {name} missing or not an array");
        };
        anyhow::ensure!(
            value_size.is_multiple_of(8),
            "map {name}: values of {value_size} bytes"
        );
        let page = 4096;
        let bytes = (entries as usize * value_size).div_ceil(page) * page;
        // SAFETY: a fresh shared mapping of the map's fd; the kernel checks the length
        // against the array and that the map was created mmapable.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error()).with_context(|| format!("mmap of map {name}"));
        }
        Ok(Self {
            base: NonNull::new(ptr.cast()).context("mmap returned NULL")?,
            entries,
            value_size,
            bytes,
        })
    }

    /// The `u64` at byte `offset` of value `index`, if in range.
    pub fn u64_at(&self, index: u32, offset: usize) -> Option<&AtomicU64> {
        self.at(index, offset, 8)
            // SAFETY: in range, 8-aligned (values are, and offsets are multiples of 8 for u64).
            .map(|p| unsafe { &*p.cast::<AtomicU64>() })
    }

    /// The `u32` at byte `offset` of value `index`, if in range.
    pub fn u32_at(&self, index: u32, offset: usize) -> Option<&AtomicU32> {
        self.at(index, offset, 4)
            // SAFETY: in range and 4-aligned.
            .map(|p| unsafe { &*p.cast::<AtomicU32>() })
    }

    fn at(&self, index: u32, offset: usize, size: usize) -> Option<*mut u8> {
        (index < self.entries && offset.is_multiple_of(size) && offset + size <= self.value_size)
            .then(|| {
                // SAFETY: within the mapping (checked above).
                unsafe {
                    self.base
                        .as_ptr()
                        .add(index as usize * self.value_size + offset)
                }
            })
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped; nothing borrows it past `self`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}
