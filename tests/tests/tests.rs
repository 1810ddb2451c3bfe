//! End-to-end tests that run the real binaries.
