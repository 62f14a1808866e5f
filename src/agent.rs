//! Agent processes: starting them through the shim (the `shim` crate), watching them,
//! and the signals that stop them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

pub use shim::{
    EXIT_CANNOT_START, ExitStatus, Identity, RunStatus, alive, read_exit, shim_cli, shim_main,
    status_file,
};

/// How long a TERM-ed agent gets before KILL.
pub const AGENT_KILL_GRACE_DEFAULT: Duration = Duration::from_secs(5);

/// The pid of a run's agent (its shim, the leader of its process group) while that very
/// process still runs: a recorded exit means it ended; the recorded identity names it
/// even when baton never recorded the pid, and tells a stranger that reuses the pid after
/// a reboot from it. Without an identity, the recorded pid is trusted as it is.
pub fn live_agent(log: &Path, recorded_pid: Option<i32>) -> Option<i32> {
    let status = RunStatus::read(log);
    if status.exit.is_some() {
        return None;
    }
    match status.identity {
        Some(id) => id.alive().then_some(id.pid),
        None => recorded_pid.filter(|p| alive(*p)),
    }
}

/// Everything needed to start one agent.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub argv: Vec<String>,
    pub cwd: PathBuf,
    pub log_path: PathBuf,
    pub env: BTreeMap<String, String>,
    /// Variables removed from the agent's environment: baton's own secrets.
    pub env_remove: Vec<String>,
    /// The binary that provides `baton shim`.
    pub shim_exe: PathBuf,
}

/// Starts the shim for `spec`. The returned child is the shim, the leader of the agent's
/// process group; its pid is the run's pid.
pub fn spawn(spec: &AgentSpec) -> std::io::Result<tokio::process::Child> {
    if let Some(dir) = spec.log_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Nothing an earlier run at this path left (an earlier shim's files included) may
    // pass for this one's.
    for stale in [status_file(&spec.log_path)]
        .into_iter()
        .chain(shim::legacy_files(&spec.log_path))
    {
        let _ = std::fs::remove_file(stale);
    }
    let mut cmd = tokio::process::Command::new(&spec.shim_exe);
    cmd.arg("shim")
        .arg("--log")
        .arg(&spec.log_path)
        .arg("--")
        .args(&spec.argv)
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(false);
    for k in &spec.env_remove {
        cmd.env_remove(k);
    }
    cmd.envs(&spec.env);
    cmd.spawn()
}

/// A handle that becomes readable when the process `pid` ends (a pidfd, Linux 5.3 and
/// later), so that a Monitor waits for an agent that is not its child without waking
/// up to look. `None` when none can be had (an older kernel, or the process is gone):
/// the caller polls instead. The caller checks afterwards that `pid` is still the
/// process it meant, since a pid may have been reused before the handle was opened.
pub fn exit_watch(pid: i32) -> Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    use std::os::fd::FromRawFd;
    if pid <= 0 {
        return None;
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as std::os::fd::RawFd) };
    // SAFETY: an `OwnedFd` stays open, and is the same descriptor, until it is dropped
    // with the `AsyncFd` that owns it.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .ok()
}

/// Sends `signal` to the agent's process group.
pub fn signal_group(pid: i32, signal: Signal) -> bool {
    pid > 0 && killpg(Pid::from_raw(pid), signal).is_ok()
}

/// TERM to the group, then KILL after `grace` if it is still there.
pub async fn terminate_group(pid: i32, grace: Duration) {
    if !signal_group(pid, Signal::SIGTERM) {
        return;
    }
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline {
        if !group_alive(pid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal_group(pid, Signal::SIGKILL);
}

fn group_alive(pgid: i32) -> bool {
    pgid > 0 && killpg(Pid::from_raw(pgid), None).is_ok()
}

/// The file name of the shim's own binary, installed beside `baton`.
pub const SHIM_BIN: &str = "baton-shim";

/// The binary that starts agents: `baton-shim` beside `exe` when it is there (a small
/// program, quick to start), else `exe` itself (`baton shim`). Both take the same
/// arguments.
pub fn shim_exe_beside(exe: &Path) -> PathBuf {
    let small = exe.with_file_name(SHIM_BIN);
    if small.is_file() {
        small
    } else {
        exe.to_path_buf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recorded_exit_wins_and_the_identity_names_an_unrecorded_agent() {
        let dir = tempfile::tempdir().unwrap();
        let log = |name: &str| dir.path().join(format!("{name}.log"));
        let me = Identity::of_self().unwrap();
        // No status file, no recorded pid: no agent.
        assert_eq!(live_agent(&log("1-dev-1"), None), None);
        // The shim's identity names the agent even when baton never recorded its pid.
        me.record(&log("1-dev-1")).unwrap();
        assert_eq!(live_agent(&log("1-dev-1"), None), Some(me.pid));
        // A recorded pid that the recorded identity contradicts is not trusted.
        let stranger = Identity {
            start_time: me.start_time + 1,
            ..me.clone()
        };
        stranger.record(&log("2-dev-1")).unwrap();
        assert_eq!(live_agent(&log("2-dev-1"), Some(me.pid)), None);
        // A recorded exit means the agent ended, whatever else says.
        let exit = ExitStatus {
            code: 3,
            signal: None,
            error: None,
        };
        RunStatus::append(&log("1-dev-1"), &exit, false).unwrap();
        assert_eq!(live_agent(&log("1-dev-1"), Some(me.pid)), None);
        assert_eq!(
            RunStatus::read(&log("1-dev-1")),
            RunStatus {
                identity: Some(me),
                exit: Some(exit)
            }
        );
    }

    #[test]
    fn a_half_written_exit_leaves_the_agent_alive_and_an_earlier_shims_files_count() {
        let dir = tempfile::tempdir().unwrap();
        let me = Identity::of_self().unwrap();
        let identity = serde_json::to_string(&me).unwrap();
        // An exit being written: the agent has not ended.
        let log = dir.path().join("1-dev-1.log");
        std::fs::write(status_file(&log), format!("{identity}\n{{\"code\":0")).unwrap();
        assert_eq!(live_agent(&log, None), Some(me.pid));
        // A shim of an earlier release: its pid file names the agent, its exit file ends it.
        let old = dir.path().join("2-dev-1.log");
        let [pid, exit] = shim::legacy_files(&old);
        std::fs::write(pid, &identity).unwrap();
        assert_eq!(live_agent(&old, None), Some(me.pid));
        std::fs::write(exit, r#"{"code":4,"signal":null}"#).unwrap();
        assert_eq!(live_agent(&old, Some(me.pid)), None);
    }

    #[test]
    fn the_shim_is_found_beside_baton() {
        let dir = tempfile::tempdir().unwrap();
        let baton = dir.path().join("baton");
        assert_eq!(shim_exe_beside(&baton), baton, "no baton-shim: baton shim");
        std::fs::write(dir.path().join(SHIM_BIN), "").unwrap();
        assert_eq!(shim_exe_beside(&baton), dir.path().join(SHIM_BIN));
    }

    #[tokio::test]
    async fn an_exit_watch_wakes_when_its_process_ends() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.2")
            .spawn()
            .unwrap();
        let watch = exit_watch(child.id() as i32).expect("a pidfd on Linux");
        let ended = watch.readable().await.is_ok();
        assert!(ended);
        // Readable means ended: the exit status is there without waiting.
        assert!(child.try_wait().unwrap().is_some(), "woke before the end");
        assert!(exit_watch(0).is_none());
    }
}
