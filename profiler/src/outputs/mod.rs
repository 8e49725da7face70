//! Where windows go: record files (kept whole on a full disk), charts, and `serve`'s
//! Prometheus metrics.

pub mod metrics;
pub mod output;
pub mod plot;
