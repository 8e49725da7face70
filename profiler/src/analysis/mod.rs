//! Answers instead of numbers, from window records (live or recorded): `check` (did these
//! devices go quiet?), `compare` (before vs after), `capacity` (how many such VMs fit). Pure:
//! records in, reports out.

pub mod capacity;
pub mod check;
pub mod compare;
pub mod report;
