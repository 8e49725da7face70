//! Binary-wide multi-uprobe links, shared by the watched VMs of one QEMU binary.
//!
//! A link scoped to one process adds a consumer to the kernel's uprobe at each of its
//! offsets, and every hit runs every consumer's filter: with N VMs of one binary, each trap
//! costs N handler calls, and each VM's links cost grace periods when they go. A link with
//! no process (every process mapping the file gets the breakpoints) is one consumer however
//! many VMs run that binary; its programs count a hit only for a watched, unbudgeted process
//! ([`profiler_common::link_generation::SHARED`]). Each offset of a file is held by one link
//! at most (two would count each hit twice), and the links stay until the profiler ends: a
//! binary no process maps costs nothing, and closing one while its VMs come and go would
//! leave a moment with two.

use std::{collections::HashMap, os::unix::fs::MetadataExt as _, path::Path, sync::Arc};

use anyhow::Context as _;

/// A file as the kernel's uprobes know it: its device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    /// The file `path` names (`/proc/PID/exe` is followed to the binary itself).
    pub fn of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        Ok(Self {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// The shared links (of type `L`) made so far, by program, file and offset.
#[derive(Debug)]
pub struct SharedLinks<L> {
    /// The link holding each point, with the cookie it carries there.
    points: HashMap<(String, FileId, u64), (u64, Arc<L>)>,
    links: usize,
}

impl<L> Default for SharedLinks<L> {
    fn default() -> Self {
        Self {
            points: HashMap::new(),
            links: 0,
        }
    }
}

/// One point to link: its file offset, its cookie, its USDT semaphore's file offset (0: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedPoint {
    pub offset: u64,
    pub cookie: u64,
    pub ref_ctr_offset: u64,
}

impl<L> SharedLinks<L> {
    /// The links that hold `points` of `target` for `program`: those that already do, and one
    /// new link, made by `make`, for the points none holds yet. All or nothing; an offset
    /// already held with another cookie is an error (a second link would count it twice).
    pub fn link(
        &mut self,
        program: &str,
        target: &Path,
        points: &[SharedPoint],
        make: impl FnOnce(&[SharedPoint]) -> anyhow::Result<L>,
    ) -> anyhow::Result<Vec<Arc<L>>> {
        let file = FileId::of(target).with_context(|| format!("reading {}", target.display()))?;
        let mut held: Vec<Arc<L>> = Vec::new();
        let mut new: Vec<SharedPoint> = Vec::new();
        for point in points {
            match self.points.get(&(program.to_string(), file, point.offset)) {
                Some((cookie, link)) => {
                    anyhow::ensure!(
                        *cookie == point.cookie,
                        "offset {:#x} of {} is linked for {program} with another cookie",
                        point.offset,
                        target.display()
                    );
                    if !held.iter().any(|h| Arc::ptr_eq(h, link)) {
                        held.push(link.clone());
                    }
                }
                None if !new.iter().any(|n| n.offset == point.offset) => new.push(*point),
                None => {}
            }
        }
        if !new.is_empty() {
            let link = Arc::new(make(&new)?);
            self.links += 1;
            for p in &new {
                self.points.insert(
                    (program.to_string(), file, p.offset),
                    (p.cookie, link.clone()),
                );
            }
            held.push(link);
        }
        Ok(held)
    }

    /// Kernel links made (each holds the points of one batch).
    pub fn len(&self) -> usize {
        self.links
    }

    pub fn is_empty(&self) -> bool {
        self.links == 0
    }
}
