//! `baton-shim`: starts one agent in a session of its own, with its log as output, and
//! records its identity before and the exit after in the run's status file (see the
//! `shim` crate). The same as `baton shim`, in a binary that links only that crate and
//! skips the Rust runtime's start-up (its own `main`), so that it starts, once a stage,
//! in about the time a small C program does.
#![no_main]

use std::ffi::{c_char, c_int};

/// The C entry point: the standard library still has the arguments (glibc hands them to
/// its initializers), and needs nothing else from the start-up it skips (a guard page
/// found by reading `/proc/self/maps`, an alternate signal stack, `SIGPIPE` ignored,
/// standard descriptors that were closed reopened on `/dev/null`: baton gives the shim
/// all three, on `/dev/null`, so `SIGPIPE` and a failing `eprintln!` cannot arise).
/// Without that start-up a panic aborts the shim instead of exiting with 101, so the
/// shim avoids what could panic: the arguments are read as the operating system gives
/// them, UTF-8 or not, and errors are returned, not unwrapped.
#[unsafe(no_mangle)]
extern "C" fn main(_argc: c_int, _argv: *const *const c_char) -> c_int {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    c_int::from(shim::shim_cli(&args))
}
