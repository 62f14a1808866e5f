use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
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
