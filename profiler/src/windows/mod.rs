//! From samples to windows: the session (one sample: discover, watch, read, attribute), the
//! sampling loop, the collector's windowing, the overhead budget's duty cycles, and what a live
//! view receives.

pub mod budget;
pub mod collector;
pub mod discover;
pub mod drops;
pub mod finish;
pub mod host;
pub mod live;
pub mod sampler;
pub mod session;
