//! Supervisor mode (being written).

pub mod lifecycle;
pub mod loglines;
pub mod restart;
pub mod tasks;
