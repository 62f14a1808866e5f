//! The shim that starts every agent, and the status file it writes.
//!
//! baton never starts an agent directly. It starts the shim (the `baton-shim` binary, or
//! `baton shim`), which puts itself in a new session (so the agent has its own process
//! group, which outlives baton and can be killed as a whole), records who it is, starts
//! the agent with its log file as stdout and stderr, waits for it, and records the exit
//! status, both in the run's status file. So the exit code is known even when baton was
//! down when the agent ended, and a restarted baton can adopt the run instead of starting
//! the agent again.
//!
//! This crate holds only that, and the reading of the status file, so that the shim's
//! binary, started once a stage, links nothing else: it costs what a small program costs.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// Exit code the shim reports when the agent's program cannot be started.
pub const EXIT_CANNOT_START: i32 = 127;

/// What the shim writes when the agent ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// The exit code, or 128 + the signal number when a signal ended it.
    pub code: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Why the agent could not be started, when it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The status file of a run: beside its log, with `.status` in place of `.log`. The shim
/// appends one JSON line before the agent starts (its [`Identity`]) and one when the
/// agent ended (its [`ExitStatus`]): one file created per run instead of a pid file and an
/// exit file, each written aside and renamed. Only whole lines count, so a line read
/// while it is being written, or cut short by a crash, is no line at all: the exit is
/// complete or absent.
pub fn status_file(log_path: &Path) -> PathBuf {
    log_path.with_extension("status")
}

/// The pid file and the exit file a shim of an earlier release writes beside the log.
pub fn legacy_files(log_path: &Path) -> [PathBuf; 2] {
    [
        log_path.with_extension("pid"),
        log_path.with_extension("exit"),
    ]
}

/// What a run's shim wrote about it: who leads the agent's process group, and how the
/// agent ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunStatus {
    pub identity: Option<Identity>,
    pub exit: Option<ExitStatus>,
}

impl RunStatus {
    /// Reads the status file of the run logging to `log`. Without one, reads the pid and
    /// exit files a shim of an earlier release writes (`.pid` and `.exit` beside the log),
    /// so that a node upgraded while its agents run still adopts them.
    pub fn read(log: &Path) -> RunStatus {
        match std::fs::read(status_file(log)) {
            Ok(bytes) => RunStatus::parse(&bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let [pid, exit] = legacy_files(log).map(|f| std::fs::read(f).ok());
                RunStatus {
                    identity: pid.and_then(|b| serde_json::from_slice(&b).ok()),
                    exit: exit.and_then(|b| serde_json::from_slice(&b).ok()),
                }
            }
            Err(_) => RunStatus::default(),
        }
    }

    /// The first whole line that is an identity, and the first that is an exit.
    fn parse(bytes: &[u8]) -> RunStatus {
        let mut status = RunStatus::default();
        for line in bytes.split_inclusive(|b| *b == b'\n') {
            let Some(line) = line.strip_suffix(b"\n") else {
                break;
            };
            if status.identity.is_none() {
                status.identity = serde_json::from_slice(line).ok();
                if status.identity.is_some() {
                    continue;
                }
            }
            if status.exit.is_none() {
                status.exit = serde_json::from_slice(line).ok();
            }
        }
        status
    }

    /// Appends `record` to the status file of the run logging to `log`, as one line
    /// written at once. With `new_line`, the line starts on a line of its own even when
    /// the line before was cut short (a failed write must not swallow the exit).
    pub fn append(log: &Path, record: &impl Serialize, new_line: bool) -> std::io::Result<()> {
        let mut line = Vec::with_capacity(128);
        if new_line {
            line.push(b'\n');
        }
        serde_json::to_writer(&mut line, record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(status_file(log))?
            .write_all(&line)
    }
}

/// The exit the shim wrote, if it did.
pub fn read_exit(log_path: &Path) -> Option<ExitStatus> {
    RunStatus::read(log_path).exit
}

/// A process as it can be told apart from a later one with the same pid: its start time
/// (in clock ticks since boot) and the boot it started in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub pid: i32,
    pub start_time: u64,
    pub boot_id: String,
}

fn boot_id() -> std::io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?
        .trim()
        .to_string())
}

/// A process's start time, field 22 of `/proc/PID/stat`.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (in parentheses, which may hold spaces); the state is
    // field 3, so the start time is the 20th of these.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl Identity {
    /// This process.
    pub fn of_self() -> std::io::Result<Identity> {
        let pid = std::process::id() as i32;
        Ok(Identity {
            pid,
            start_time: start_time(pid)
                .ok_or_else(|| std::io::Error::other("no start time in /proc/self/stat"))?,
            boot_id: boot_id()?,
        })
    }

    /// Records this identity in the status file of the run logging to `log`.
    pub fn record(&self, log: &Path) -> std::io::Result<()> {
        RunStatus::append(log, self, false)
    }

    /// The identity the shim of the run logging to `log` recorded, if it did.
    pub fn of_run(log: &Path) -> Option<Identity> {
        RunStatus::read(log).identity
    }

    /// True while this very process lives: same pid, same start time, same boot.
    pub fn alive(&self) -> bool {
        alive(self.pid)
            && start_time(self.pid) == Some(self.start_time)
            && boot_id().is_ok_and(|b| b == self.boot_id)
    }
}

/// True when a process with this pid exists on this host and has not ended (a zombie,
/// ended but not yet reaped by its parent, counts as ended).
pub fn alive(pid: i32) -> bool {
    if pid <= 0 || kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state != "Z" && state != "X"),
        Err(_) => true,
    }
}

extern "C" fn ignore_signal(_: nix::libc::c_int) {}

/// Runs the shim from its command line, `[shim] --log LOG -- PROGRAM [ARGS...]` (the
/// arguments after the program's name), read without clap: the shim starts once a stage
/// and should cost what a small program costs. Returns the agent's exit code, or 2 for
/// a command line it cannot read. Arguments are taken as the operating system gives
/// them: a program or log path that is not UTF-8 is passed on unchanged.
pub fn shim_cli(args: &[OsString]) -> u8 {
    match parse_cli(args) {
        Some((log, argv)) => shim_main(log, argv).clamp(0, 255) as u8,
        None => {
            eprintln!("usage: baton-shim --log LOG -- PROGRAM [ARGS...]");
            2
        }
    }
}

/// The log path and the agent's command line in `[shim] --log LOG -- PROGRAM [ARGS...]`.
fn parse_cli(args: &[OsString]) -> Option<(&Path, &[OsString])> {
    let args = match args.first() {
        Some(first) if first == "shim" => &args[1..],
        _ => args,
    };
    match args {
        [flag, log, sep, argv @ ..] if flag == "--log" && sep == "--" && !argv.is_empty() => {
            Some((Path::new(log), argv))
        }
        _ => None,
    }
}

/// The body of `baton shim --log LOG -- ARGV...`: runs synchronously, never returns
/// before the agent ended, and always tries to record the exit.
pub fn shim_main(log: &Path, argv: &[OsString]) -> i32 {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, sigaction};
    // Its own session: the agent gets a process group of its own that survives baton.
    let _ = nix::unistd::setsid();
    // TERM and INT reach the whole group; the shim outlives them to record the exit.
    // A handler (unlike SIG_IGN) is reset to the default in the agent by exec.
    let action = SigAction::new(
        SigHandler::Handler(ignore_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: the handler does nothing, which is async-signal-safe.
        unsafe {
            let _ = sigaction(sig, &action);
        }
    }
    // Who the agent's group leader is, durable before the agent can do any work: a baton
    // that dies before recording the pid, or a pid reused after a reboot, cannot fool
    // the next one.
    let recorded = Identity::of_self().and_then(|id| id.record(log));
    if let Err(e) = &recorded {
        eprintln!("baton shim: cannot record the agent's identity: {e}");
    }
    let status = run_agent(log, argv);
    if let Err(e) = RunStatus::append(log, &status, recorded.is_err()) {
        eprintln!("baton shim: cannot record the exit: {e}");
    }
    status.code
}

fn run_agent(log: &Path, argv: &[OsString]) -> ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    let cannot = |error: String| ExitStatus {
        code: EXIT_CANNOT_START,
        signal: None,
        error: Some(error),
    };
    let mut file = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        Ok(f) => f,
        Err(e) => return cannot(format!("cannot open log file {}: {e}", log.display())),
    };
    let Some((program, args)) = argv.split_first() else {
        return cannot("empty command".to_string());
    };
    let (out, err) = match (file.try_clone(), file.try_clone()) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return cannot(format!("cannot share log file: {e}")),
    };
    let child = std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("cannot start agent command {program:?}: {e}");
            let _ = writeln!(file, "baton: {msg}");
            return cannot(msg);
        }
    };
    match child.wait() {
        Ok(st) => match (st.code(), st.signal()) {
            (Some(code), _) => ExitStatus {
                code,
                signal: None,
                error: None,
            },
            (None, Some(sig)) => ExitStatus {
                code: 128 + sig,
                signal: Some(sig),
                error: None,
            },
            (None, None) => cannot("agent ended without a status".to_string()),
        },
        Err(e) => cannot(format!("cannot wait for the agent: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_tells_a_process_from_a_stranger_with_its_pid() {
        let me = Identity::of_self().unwrap();
        assert!(me.alive());
        let reused = Identity {
            start_time: me.start_time + 1,
            ..me.clone()
        };
        assert!(!reused.alive(), "a later process with the same pid passed");
        let rebooted = Identity {
            boot_id: "another-boot".into(),
            ..me.clone()
        };
        assert!(!rebooted.alive(), "a pid of an earlier boot passed");
    }

    #[test]
    fn only_whole_lines_count_and_an_earlier_shims_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("1-dev-1.log");
        let me = Identity::of_self().unwrap();
        let identity = serde_json::to_string(&me).unwrap();
        // An exit being written (or cut short): the agent has not ended.
        std::fs::write(status_file(&log), format!("{identity}\n{{\"code\":0")).unwrap();
        let read = RunStatus::read(&log);
        assert_eq!((read.identity, read.exit), (Some(me.clone()), None));
        // An identity being written: nothing yet.
        std::fs::write(status_file(&log), &identity[..identity.len() / 2]).unwrap();
        assert_eq!(RunStatus::read(&log), RunStatus::default());
        // The identity's write failed halfway: the exit still gets a line of its own.
        let exit = ExitStatus {
            code: 5,
            signal: None,
            error: None,
        };
        RunStatus::append(&log, &exit, true).unwrap();
        assert_eq!(RunStatus::read(&log).exit, Some(exit));
        // A shim of an earlier release wrote a pid file and an exit file.
        let old = dir.path().join("2-dev-1.log");
        std::fs::write(old.with_extension("pid"), &identity).unwrap();
        assert_eq!(RunStatus::read(&old).identity.as_ref(), Some(&me));
        std::fs::write(old.with_extension("exit"), r#"{"code":4,"signal":null}"#).unwrap();
        let read = RunStatus::read(&old);
        assert_eq!(read.identity, Some(me));
        assert_eq!(read.exit.map(|e| e.code), Some(4));
    }

    #[test]
    fn the_shim_refuses_a_command_line_it_cannot_read_and_passes_odd_bytes_on() {
        let bad_lines: [Vec<OsString>; 4] = [
            vec![],
            vec!["shim".into()],
            vec!["--log".into(), "x.log".into(), "--".into()],
            vec!["--log".into(), "x.log".into(), "true".into()],
        ];
        for bad in bad_lines {
            assert_eq!(shim_cli(&bad), 2, "{bad:?}");
        }
        // Bytes that are not UTF-8 are read and passed on as they are.
        use std::os::unix::ffi::OsStrExt;
        let odd = |b: &[u8]| std::ffi::OsStr::from_bytes(b).to_os_string();
        let line = [
            "shim".into(),
            "--log".into(),
            odd(b"r\xff.log"),
            "--".into(),
            odd(b"ag\xfeent"),
            odd(b"x\xff"),
        ];
        let (log, argv) = parse_cli(&line).expect("a command line with odd bytes");
        assert_eq!(log.as_os_str().as_bytes(), b"r\xff.log");
        assert_eq!(argv, &line[4..]);
    }
}
