//! A do-nothing unwinder for the static release build, in place of LLVM's libunwind.
//!
//! The release profile aborts on panic, so nothing ever unwinds, and the static musl build
//! has no unwind tables to walk (see `build.rs`). Yet std, precompiled for unwinding, still
//! refers to the unwinder's entry points: the personality routine and landing pads that never
//! run, and the stack walk of a panic's backtrace under `RUST_BACKTRACE`. Defining those entry
//! points here keeps libunwind (about 50 KiB, and the `fprintf` it logs with) out of the binary.
//! A backtrace walk ends at once, exactly as it did when it found no unwind tables: a panic
//! prints its message and location, an empty `stack backtrace:` and aborts. Entry points that
//! only unwinding would call abort.
//!
//! Compiled only for musl with `panic = "abort"` on x86_64 and aarch64 (whose std uses the
//! Itanium-style entry points below; 32-bit ARM's EHABI has others); every other build links
//! the real unwinder. Every entry point std can refer to is defined here, with or without LTO,
//! so no member of libunwind is ever pulled into the link (one would clash with these).

use std::ffi::{c_int, c_void};

/// `_URC_END_OF_STACK`: the walk reached the end of the stack.
const END_OF_STACK: c_int = 5;

/// Walks the stack calling `trace` per frame: here there are none to report.
#[no_mangle]
extern "C" fn _Unwind_Backtrace(
    _trace: extern "C" fn(*mut c_void, *mut c_void) -> c_int,
    _arg: *mut c_void,
) -> c_int {
    END_OF_STACK
}

/// A frame's instruction pointer (never asked: the walk reports no frame).
#[no_mangle]
extern "C" fn _Unwind_GetIP(_ctx: *mut c_void) -> usize {
    0
}

/// A frame's instruction pointer (never asked: the walk reports no frame).
#[no_mangle]
extern "C" fn _Unwind_GetIPInfo(_ctx: *mut c_void, _before: *mut c_int) -> usize {
    0
}

/// Unwinding only: never called with `panic = "abort"`.
#[no_mangle]
extern "C" fn _Unwind_Resume(_exception: *mut c_void) -> ! {
    std::process::abort()
}

/// Personality routine only (unwinding): never called with `panic = "abort"`.
#[no_mangle]
extern "C" fn _Unwind_GetLanguageSpecificData(_ctx: *mut c_void) -> *mut c_void {
    std::process::abort()
}

/// Personality routine only (unwinding): never called with `panic = "abort"`.
#[no_mangle]
extern "C" fn _Unwind_GetRegionStart(_ctx: *mut c_void) -> usize {
    std::process::abort()
}

/// Personality routine only (unwinding): never called with `panic = "abort"`.
#[no_mangle]
extern "C" fn _Unwind_GetTextRelBase(_ctx: *mut c_void) -> usize {
    std::process::abort()
}

/// Personality routine only (unwinding): never called with `panic = "abort"`.
#[no_mangle]
extern "C" fn _Unwind_GetDataRelBase(_ctx: *mut c_void) -> usize {
    std::process::abort()
}

/// Personality routine only (unwinding): never called with `panic = "abort"`.
#[no_mangle]
extern "C" fn _Unwind_SetGR(_ctx: *mut c_void, _reg: c_int, _value: usize) {
    std::process::abort()
}

/// Personality routine only (unwinding): never called with `panic = "abort"`.
#[no_mangle]
extern "C" fn _Unwind_SetIP(_ctx: *mut c_void, _ip: usize) {
    std::process::abort()
}

/// Finds the function containing an address (backtrace printing only; never reached, the walk
/// reports no frame): unknown.
#[no_mangle]
extern "C" fn _Unwind_FindEnclosingFunction(_pc: *mut c_void) -> *mut c_void {
    std::ptr::null_mut()
}

/// Starts unwinding for a panic: never called with `panic = "abort"`; if it were, there is no
/// handler to find, which is what this answers.
#[no_mangle]
extern "C" fn _Unwind_RaiseException(_exception: *mut c_void) -> c_int {
    END_OF_STACK
}

/// Frees a foreign exception: there are none without unwinding.
#[no_mangle]
extern "C" fn _Unwind_DeleteException(_exception: *mut c_void) {}

/// A frame's canonical frame address (never asked: the walk reports no frame).
#[no_mangle]
extern "C" fn _Unwind_GetCFA(_ctx: *mut c_void) -> usize {
    0
}
