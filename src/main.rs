use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = baton::cli::Cli::parse();
    // The shim runs before any runtime or logging: it only starts and waits for an agent.
    if let baton::cli::Command::Shim { log, argv } = &cli.command {
        let code = baton::agent::shim_main(log, argv);
        return std::process::ExitCode::from(code.clamp(0, 255) as u8);
    }
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
