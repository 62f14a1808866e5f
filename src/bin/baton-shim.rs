//! `baton-shim`: starts one agent in a session of its own, with its log as output, and
//! records its identity before and the exit after in the run's status file (see
//! `baton::agent`). The same as `baton shim`, in a binary that holds only this, so that
//! it starts in a fraction of the time once per stage.

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::ExitCode::from(baton::agent::shim_cli(&args))
}
