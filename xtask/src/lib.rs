//! Developer tasks for the profiler workspace, also used as a library by the profiler's
//! end-to-end tests: the cache location, the test guest image, and a QEMU guest launcher.

pub mod cache;
pub mod guest;
pub mod launch;
