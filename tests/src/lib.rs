//! Probe binaries for the end-to-end tests live in `src/bin/`; the tests are in `tests/`.
//! The library holds what the tests share with the benchmark: [`vm_image`], what a test
//! microVM boots.

pub mod vm_image;
