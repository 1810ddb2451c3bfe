//! Probe binaries for the end-to-end tests live in `src/bin/`; the tests are in `tests/`.
