use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc 3's `mi_option_purge_delay` (`mimalloc.h`; the Rust bindings name no
/// constant for it): how long freed memory is kept before it goes back to the system.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> std::process::ExitCode {
    // Freed memory goes back to the system at once rather than after mimalloc 3's
    // default of a second: a node of 5,000 sleeping agents holds about 35 MiB less, at
    // no cost in CPU per stage (docs/benchmarks.md).
    // SAFETY: sets an option's value; mimalloc reads it at each purge.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    // The shim runs before any argument parsing, runtime or logging: it only starts and
    // waits for an agent (`baton-shim` does the same in a smaller binary).
    if std::env::args_os().nth(1).is_some_and(|a| a == "shim") {
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        return std::process::ExitCode::from(baton::agent::shim_cli(&args));
    }
    let cli = baton::cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(baton::cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
