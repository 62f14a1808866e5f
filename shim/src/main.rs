//! `baton-shim`: starts one agent in a session of its own, with its log as output, and
//! records its identity before and the exit after in the run's status file (see the
//! `shim` crate). The same as `baton shim`, in a binary that links only that crate and
//! skips the Rust runtime's start-up (its own `main`), so that it starts, once a stage,
//! in about the time a small C program does.
//!
//! Two packages build it: `baton` as `baton-shim` (linked as the host links, what
//! `cargo install` installs and the tests run), and this crate as `baton-shim-static`,
//! which `cargo build-static-shim` links against musl: a static program whose C library
//! starts without probing the processor, which glibc does with `cpuid` instructions that
//! a virtual machine traps, one by one (docs/benchmarks.md).
#![no_main]

use std::ffi::{CStr, OsString, c_char, c_int};
use std::os::unix::ffi::OsStringExt;

/// The C entry point. The arguments are read from `argv` as the operating system gives
/// them, UTF-8 or not (musl, unlike glibc, does not hand them to the standard library's
/// initializers). The standard library needs nothing else from the start-up it skips (a
/// guard page found by reading `/proc/self/maps`, an alternate signal stack, `SIGPIPE`
/// ignored, standard descriptors that were closed reopened on `/dev/null`: baton gives
/// the shim all three, on `/dev/null`, so `SIGPIPE` and a failing `eprintln!` cannot
/// arise). Without that start-up a panic aborts the shim instead of exiting with 101, so
/// the shim avoids what could panic: errors are returned, not unwrapped.
#[unsafe(no_mangle)]
extern "C" fn main(argc: c_int, argv: *const *const c_char) -> c_int {
    let count = usize::try_from(argc).unwrap_or(0);
    let args: Vec<OsString> = (1..count)
        // SAFETY: the C start-up passes `argc` pointers to NUL-terminated strings in
        // `argv`, which stay valid for the whole program.
        .map(|i| unsafe { CStr::from_ptr(*argv.add(i)) })
        .map(|arg| OsString::from_vec(arg.to_bytes().to_vec()))
        .collect();
    c_int::from(shim::shim_cli(&args))
}
