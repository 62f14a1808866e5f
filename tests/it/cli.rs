//! The `baton` binary as a user runs it.

use std::path::Path;
use std::process::{Command, Output};

fn baton(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_baton"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("BATON_DATABASE_URL")
        .env_remove("DATABASE_URL")
        .output()
        .expect("run baton")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn submit_status_history_cancel_retry_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("baton.toml");
    std::fs::write(&config, crate::store::PIPELINE_TOML).unwrap();

    let o = baton(&config, &["migrate"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = baton(&config, &["submit", "ORCH-65", "--title", "Add a thing"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("submitted ORCH-65"));
    let o = baton(&config, &["submit", "ORCH-65"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("already exists"), "{}", text(&o));

    let o = baton(&config, &["status", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["tasks"][0]["task"]["key"], "ORCH-65");
    assert_eq!(v["tasks"][0]["jobs"][0]["stage"], "analyst");

    let o = baton(&config, &["history", "ORCH-65", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let kinds: Vec<&str> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["task_submitted", "job_queued"]);

    let o = baton(&config, &["status", "ORCH-65"]);
    assert!(text(&o).contains("analyst"), "{}", text(&o));
    assert!(baton(&config, &["cancel", "ORCH-65"]).status.success());
    let o = baton(&config, &["retry", "ORCH-65"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("re-queued ORCH-65 at stage analyst"));
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("baton.toml");
    std::fs::write(&config, crate::store::PIPELINE_TOML).unwrap();
    assert!(baton(&config, &["migrate"]).status.success());
    for (args, expect) in [
        (vec!["submit", "../etc/passwd"], "invalid task key"),
        (vec!["submit", "ORCH 65"], "invalid task key"),
        (
            vec!["submit", "OK-1", "--pipeline", "nope"],
            "unknown pipeline \"nope\"",
        ),
        (vec!["status", "MISSING-1"], "no task MISSING-1"),
    ] {
        let o = baton(&config, &args);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(text(&o).contains(expect), "{args:?}: {}", text(&o));
    }
    let o = baton(&dir.path().join("absent.toml"), &["status"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("absent.toml not found"), "{}", text(&o));

    std::fs::write(
        &config,
        "max_concurrent_jobs = 0\n[repo]\nurl = \"x\"\nbogus = 1\n",
    )
    .unwrap();
    let o = baton(&config, &["config", "check"]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("line 1: max_concurrent_jobs"), "{t}");
    assert!(t.contains("line 4: repo.bogus: unknown key"), "{t}");
    assert!(t.contains("pipelines: no pipeline is defined"), "{t}");
}

#[test]
fn config_check_redacts_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("baton.toml");
    let toml = format!(
        "database_url = \"postgres://baton:hunter2@db.example/baton?sslmode=require&password=hunter3\"\n{}\n[http]\ntoken_env = \"BATON_TEST_TOKEN_XYZ\"\n",
        crate::store::PIPELINE_TOML
    );
    std::fs::write(&config, toml).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["--config", config.to_str().unwrap(), "config", "check"])
        .env("BATON_TEST_TOKEN_XYZ", "sekrit-value")
        .env_remove("BATON_DATABASE_URL")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(!t.contains("hunter") && !t.contains("sekrit-value"), "{t}");
    assert!(
        t.contains("postgres://baton:***@db.example/baton?sslmode=require&password=***"),
        "{t}"
    );
    assert!(t.contains("$BATON_TEST_TOKEN_XYZ is set"), "{t}");
}

/// Through a pipe, `status --watch` writes one screen after another without screen codes,
/// and a reader that goes away (`| head`) ends it cleanly, not with a panic.
#[test]
fn status_watch_writes_screens_to_a_pipe_and_ends_with_its_reader() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("baton.toml");
    std::fs::write(&config, crate::store::PIPELINE_TOML).unwrap();
    assert!(baton(&config, &["migrate"]).status.success());
    assert!(baton(&config, &["submit", "W-1"]).status.success());
    let mut child = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["--config", config.to_str().unwrap(), "status", "--watch"])
        .env_remove("BATON_DATABASE_URL")
        .env_remove("DATABASE_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    // Read until the screen was written twice.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&seen)
        .matches("baton status -- ")
        .count()
        < 2
    {
        let n = out.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "status --watch ended: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&seen).to_string();
    assert!(!text.contains('\x1b'), "screen codes in a pipe: {text:?}");
    let last = text.rsplit("baton status -- ").next().unwrap();
    assert!(
        last.contains("W-1") && last.contains("analyst") && last.contains("running agents: 0"),
        "{last}"
    );
    // The reader goes away: the next screen cannot be written, and the watch ends.
    drop(out);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the watch outlived its reader"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{status:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// `--json` on the commands that change tasks, and on `config check`.
#[test]
fn commands_answer_in_json_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("baton.toml");
    std::fs::write(&config, crate::store::PIPELINE_TOML).unwrap();
    assert!(baton(&config, &["migrate"]).status.success());
    let json = |args: &[&str]| -> serde_json::Value {
        let o = baton(&config, args);
        assert!(o.status.success(), "{}", text(&o));
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)))
    };
    let submitted = json(&["submit", "J-1", "--json"]);
    assert_eq!(submitted["task"]["key"], "J-1");
    assert_eq!(submitted["job"]["stage"], "analyst");
    let cancelled = json(&["cancel", "J-1", "--json"]);
    assert_eq!(cancelled["status"], "cancelled");
    let retried = json(&["retry", "J-1", "--json"]);
    assert_eq!(retried["job"]["stage"], "analyst");
    let checked = json(&["config", "check", "--json"]);
    assert_eq!(checked["valid"], true);
    assert!(checked["effective"]["settings"]["pipelines"]["default"].is_object());
}

#[test]
fn a_relative_config_path_gives_absolute_folders() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("baton.toml"), crate::store::PIPELINE_TOML).unwrap();
    // Agents run inside their workspaces: a relative log folder would point elsewhere.
    let o = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["config", "check"])
        .current_dir(dir.path())
        .env_remove("BATON_CONFIG")
        .env_remove("BATON_DATABASE_URL")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let root = std::path::absolute(dir.path()).unwrap();
    let root = root.display();
    assert!(t.contains(&format!("log_dir = \"{root}/logs\"")), "{t}");
    assert!(
        t.contains(&format!("workspace_root = \"{root}/workspaces\"")),
        "{t}"
    );
}

#[test]
fn descriptions_come_from_a_flag_a_file_or_standard_input_and_are_bounded() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("baton.toml");
    std::fs::write(&config, crate::store::PIPELINE_TOML).unwrap();
    assert!(baton(&config, &["migrate"]).status.success());
    let o = baton(
        &config,
        &["submit", "D-1", "--description", "Inline words."],
    );
    assert!(o.status.success(), "{}", text(&o));
    let file = dir.path().join("desc.md");
    std::fs::write(&file, "From a file.\n").unwrap();
    let o = baton(
        &config,
        &[
            "submit",
            "D-2",
            "--description-file",
            file.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let mut child = Command::new(env!("CARGO_BIN_EXE_baton"))
        .arg("--config")
        .arg(&config)
        .args(["submit", "D-3", "--description-file", "-"])
        .env_remove("BATON_DATABASE_URL")
        .env_remove("DATABASE_URL")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"From standard input.")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let o = baton(&config, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let described: Vec<(&str, &str)> = v["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["task"]["key"].as_str().unwrap(),
                t["task"]["description"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        described,
        [
            ("D-3", "From standard input."),
            ("D-2", "From a file.\n"),
            ("D-1", "Inline words.")
        ]
    );
    // Too long: a clear error, and nothing written.
    let big = dir.path().join("big.md");
    std::fs::write(&big, "x".repeat(65 * 1024)).unwrap();
    let o = baton(
        &config,
        &["submit", "D-4", "--description-file", big.to_str().unwrap()],
    );
    assert!(!o.status.success());
    assert!(
        text(&o).contains("the description is 65 KiB; at most 64 KiB"),
        "{}",
        text(&o)
    );
    let o = baton(&config, &["status", "D-4"]);
    assert!(!o.status.success(), "D-4 was written: {}", text(&o));
    let o = baton(
        &config,
        &["submit", "D-5", "--description-file", "/nonexistent/x.md"],
    );
    assert!(text(&o).contains("cannot read the description from /nonexistent/x.md"));
}

#[test]
fn commands_refuse_a_schema_other_than_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("baton.toml");
    std::fs::write(&config, crate::store::PIPELINE_TOML).unwrap();
    // A fresh database: only migrate (or serve) creates the schema.
    let o = baton(&config, &["status"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("schema is older than this baton") && text(&o).contains("baton migrate"),
        "{}",
        text(&o)
    );
    assert!(baton(&config, &["migrate"]).status.success());
    assert!(baton(&config, &["status"]).status.success());
    // A newer baton migrated it further: this one neither reads nor upgrades it.
    let db = dir.path().join("baton.db");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use sea_orm::{ConnectionTrait, Database, Statement};
        let c = Database::connect(format!("sqlite://{}?mode=rw", db.display()))
            .await
            .unwrap();
        c.execute_raw(Statement::from_string(
            c.get_database_backend(),
            "INSERT INTO seaql_migrations (version, applied_at) VALUES ('m20991231_000001_future', 0)",
        ))
        .await
        .unwrap();
        c.close().await.unwrap();
    });
    for args in [&["status"][..], &["submit", "N-1"], &["migrate"]] {
        let o = baton(&config, args);
        assert!(!o.status.success(), "{args:?} ran on a newer schema");
        assert!(
            text(&o).contains("newer") || text(&o).contains("is missing"),
            "{args:?}: {}",
            text(&o)
        );
    }
}
