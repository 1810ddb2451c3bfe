//! The benchmark command of agent-shim: `shim-bench` measures the shim side by side with
//! tini, dumb-init, catatonit and raw sockets in one run, and writes `bench/REPORT.md` and
//! `bench/chart.svg`.
//!
//! Every figure of the benchmark issue is one module under [`figures`]; each returns a
//! [`report::Figure`] holding its raw medians, its baseline measured in the same run, and a
//! PASS/FAIL verdict per target. Figures that go through the control link use only the
//! functions of [`control`], so switching them to the `control-link` crate is a change to that
//! one module.

#![deny(missing_docs)]

pub mod clock;
pub mod control;
pub mod env;
pub mod figures;
pub mod procs;
pub mod report;
pub mod stats;
pub mod svg;
