//! Developer tasks for the profiler workspace, also used as a library by the profiler's
//! end-to-end tests: the cache location, the test guest image, a QEMU guest launcher, and
//! the test prerequisites.

pub mod boot_sector;
pub mod cache;
pub mod guest;
pub mod launch;
pub mod links;
pub mod prereq;
