//! Links the static musl release shim without unwind tables (`link/no-unwind-tables.ld`).
//!
//! Only for the musl target (the static build, linked through `cc`) in a release
//! profile, whose `panic = "abort"` means nothing ever unwinds. Debug builds unwind, and the
//! tables are what unwinding reads. (A build script can neither see the profile's panic
//! strategy — `CARGO_CFG_PANIC` is the target's default, `unwind` — nor tell the binary from
//! its unit-test harness: `cargo test --release --target x86_64-unknown-linux-musl` links the
//! harness with the script too, so a failing test there aborts the harness instead of being
//! reported. Run the shim's unit tests in the debug profile or for the host target, as
//! `.ci/run` does.) About 160 KB of the static binary is `.eh_frame` (with the index ld
//! builds from it, `.eh_frame_hdr`) and `.gcc_except_table`; a panic still prints its
//! message and aborts, only its backtrace is empty. (`src/unwinder.rs` then replaces the
//! unwinder itself, which had nothing left to read.)
//!
//! The same build links with the toolchain's `rust-lld` (rustup's `gcc-ld/ld.lld`, through
//! `cc -fuse-ld=lld`) rather than the system's GNU ld, when the toolchain has it: a smaller
//! file for the same code. Without it, GNU ld links as before.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=link/no-unwind-tables.ld");
    let musl = env::var("CARGO_CFG_TARGET_ENV").is_ok_and(|e| e == "musl");
    let release = env::var("PROFILE").is_ok_and(|p| p == "release");
    if !(musl && release) {
        return;
    }
    let Ok(dir) = env::var("CARGO_MANIFEST_DIR") else {
        return;
    };
    let script = Path::new(&dir).join("link").join("no-unwind-tables.ld");
    println!("cargo:rustc-link-arg-bins=-T");
    println!("cargo:rustc-link-arg-bins={}", script.display());
    // `cc` links with the toolchain's own lld (`-B` puts its `ld.lld` first): its layout
    // packs the segments tighter than GNU ld's (about 7 KB less, same code and data).
    if let Some(lld) = toolchain_lld() {
        println!("cargo:rustc-link-arg-bins=-B{}", lld.display());
        println!("cargo:rustc-link-arg-bins=-fuse-ld=lld");
    } else {
        println!("cargo:warning=no rust-lld in the toolchain: linking with the system ld (a larger binary)");
    }
}

/// The directory of the toolchain's `ld.lld` (rustup ships `rust-lld` with every x86_64 Linux
/// toolchain, and a `gcc-ld/ld.lld` that runs it for `cc -fuse-ld=lld`), if it has one.
fn toolchain_lld() -> Option<PathBuf> {
    let rustc = env::var_os("RUSTC")?;
    let host = env::var("HOST").ok()?;
    let out = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()?;
    let sysroot = String::from_utf8(out.stdout).ok()?;
    let dir = Path::new(sysroot.trim())
        .join("lib/rustlib")
        .join(host)
        .join("bin/gcc-ld");
    dir.join("ld.lld").is_file().then_some(dir)
}
