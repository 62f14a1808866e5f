//! Loading and validating config files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

const GOOD: &str = r#"
database_url = "sqlite://baton.db?mode=rwc"
[repo]
url = "/srv/app.git"
[pipelines.default]
stages = ["developer", "reviewer"]
[stages.developer]
command = ["sh", "-c", "echo {task}"]
timeout = "45m"
[stages.reviewer]
command = ["review"]
on_reject = "developer"
gate.verdict = { file = "docs/{task}/review.md", approve = "APPROVED", reject = "CHANGES_REQUESTED" }
"#;

fn load(text: &str) -> Result<Config, Vec<Problem>> {
    Config::from_toml(text, Path::new("/etc/baton"), &EnvOverrides::default())
}

#[test]
fn good_config_loads_with_defaults_and_resolved_paths() {
    let c = load(GOOD).unwrap();
    assert_eq!(c.stages["developer"].timeout, Duration::from_secs(45 * 60));
    assert_eq!(c.reaper.finalize_grace, Duration::from_secs(300));
    assert_eq!(c.workspace_root, PathBuf::from("/etc/baton/workspaces"));
    assert_eq!(c.database_url, "sqlite:///etc/baton/baton.db?mode=rwc");
    assert!(c.stages["developer"].gate.exit_zero);
}

#[test]
fn env_overrides_database_url() {
    let env = EnvOverrides {
        database_url: Some("postgres://u:pw@db/baton".into()),
    };
    let c = Config::from_toml(GOOD, Path::new("."), &env).unwrap();
    assert_eq!(c.database_url, "postgres://u:pw@db/baton");
    assert!(c.render_effective().contains("postgres://u:***@db/baton"));
    assert!(!c.render_effective().contains("pw@"));
}

#[test]
fn every_problem_is_collected_with_key_and_line() {
    let text = GOOD.replace("timeout = \"45m\"", "timeout = \"0s\"\ncomand = [\"x\"]")
        + "[pipelines.other]\nstages = [\"ghost\"]\n[reaper]\nfinalize_grace = \"900d\"\n";
    let problems = load(&text).unwrap_err();
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    assert!(keys.contains(&"stages.developer.comand"), "{problems:?}");
    assert!(keys.contains(&"stages.developer.timeout"), "{problems:?}");
    assert!(keys.contains(&"pipelines.other.stages"), "{problems:?}");
    assert!(keys.contains(&"reaper.finalize_grace"), "{problems:?}");
    assert_eq!(problems.len(), 4, "{problems:?}");
    let timeout = problems
        .iter()
        .find(|p| p.key == "stages.developer.timeout")
        .unwrap();
    assert_eq!(timeout.line, Some(9));
    let unknown = problems
        .iter()
        .find(|p| p.key == "stages.developer.comand")
        .unwrap();
    assert_eq!(unknown.line, Some(10));
}

#[test]
fn on_reject_outside_the_pipeline_is_named() {
    let text = GOOD.replace("on_reject = \"developer\"", "on_reject = \"analyst\"");
    let problems = load(&text).unwrap_err();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].key, "stages.reviewer.on_reject");
    assert!(problems[0].message.contains("not in pipeline \"default\""));
    assert_eq!(problems[0].line, Some(12));
}

#[test]
fn syntax_and_type_errors_carry_a_line() {
    let problems = load("max_concurrent_jobs = \"many\"\n").unwrap_err();
    assert_eq!(problems[0].line, Some(1));
    assert_eq!(problems[0].key, "max_concurrent_jobs");
    let problems = load("[repo\nurl = 1\n").unwrap_err();
    assert_eq!(problems[0].line, Some(1));
    let problems = load(&GOOD.replace("\"45m\"", "\"45 parsecs\"")).unwrap_err();
    assert_eq!(problems[0].line, Some(9), "{problems:?}");
}

#[test]
fn prompt_templates_are_checked_with_their_stage_and_line() {
    let text = GOOD.replace(
        "timeout = \"45m\"",
        "timeout = \"45m\"\nprompt = \"\"\"\nDo {{ task.key }}.\nSee {{ task.descripton }}\n\"\"\"",
    );
    let problems = load(&text).unwrap_err();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].key, "stages.developer.prompt");
    assert_eq!(problems[0].line, Some(10));
    assert!(
        problems[0].message.starts_with("line 2 of the prompt"),
        "{}",
        problems[0].message
    );
    // TOML drops the newline after the opening quotes, so "See" is the prompt's line 2.
    // `{prompt}` without a prompt, a missing prompt file, and both forms at once.
    let text = GOOD
        .replace(
            "command = [\"review\"]",
            "command = [\"review\", \"{prompt}\"]",
        )
        .replace(
            "timeout = \"45m\"",
            "timeout = \"45m\"\nprompt_file = \"nope.md\"\nprompt = \"x\"",
        );
    let keys: Vec<String> = load(&text)
        .unwrap_err()
        .into_iter()
        .map(|p| p.key)
        .collect();
    assert!(
        keys.contains(&"stages.reviewer.command".to_string()),
        "{keys:?}"
    );
    assert!(
        keys.contains(&"stages.developer.prompt_file".to_string()),
        "{keys:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dev.md"), "Hello {{ task.title }}").unwrap();
    let text = GOOD.replace(
        "timeout = \"45m\"",
        "timeout = \"45m\"\nprompt_file = \"dev.md\"",
    );
    let c = Config::from_toml(&text, dir.path(), &EnvOverrides::default()).unwrap();
    assert_eq!(
        c.stages["developer"].template.as_deref(),
        Some("Hello {{ task.title }}")
    );
}

#[test]
fn empty_command_and_unknown_placeholder_are_problems() {
    let text = GOOD
        .replace("[\"review\"]", "[]")
        .replace("echo {task}", "echo {tsak}");
    let problems = load(&text).unwrap_err();
    assert!(
        problems
            .iter()
            .any(|p| p.key == "stages.reviewer.command" && p.message.contains("empty"))
    );
    assert!(
        problems
            .iter()
            .any(|p| p.key == "stages.developer.command" && p.message.contains("{tsak}"))
    );
}

#[test]
fn stage_env_concurrency_and_gate_timeout_are_checked() {
    let text = GOOD.replace(
        "timeout = \"45m\"",
        "timeout = \"45m\"\nmax_concurrent = 0\ngate.timeout = \"0s\"\n\
         env = { MODEL = \"opus\", BATON_STAGE = \"x\", \"bad-name\" = \"y\", KEY = \"${UNCLOSED\" }",
    );
    let problems = load(&text).unwrap_err();
    let mut keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "stages.developer.env.BATON_STAGE",
            "stages.developer.env.KEY",
            "stages.developer.env.bad-name",
            "stages.developer.gate.timeout",
            "stages.developer.max_concurrent",
        ],
        "{problems:?}"
    );
    let good = GOOD.replace(
        "timeout = \"45m\"",
        "timeout = \"45m\"\nmax_concurrent = 2\nenv = { MODEL = \"opus\", KEY = \"${SRC_KEY}\" }",
    );
    let c = load(&good).unwrap();
    assert_eq!(c.stages["developer"].gate.timeout, GATE_TIMEOUT_DEFAULT);
    assert_eq!(c.policy().stage_limits.get("developer"), Some(&2));
    assert!(c.hidden_vars().contains(&"SRC_KEY".to_string()));
    let env = c.stages["developer"].resolved_env(|v| (v == "SRC_KEY").then(|| "k".to_string()));
    assert_eq!(
        env.into_iter().collect::<Vec<_>>(),
        [("KEY".into(), "k".into()), ("MODEL".into(), "opus".into())]
    );
}

proptest::proptest! {
    /// No config text panics the loader: it loads, or names its problems.
    #[test]
    fn no_text_panics_the_config_loader(text in "\\PC{0,300}") {
        let _ = load(&text);
    }

    /// Nor does any line added to a good config, in any script.
    #[test]
    fn no_line_panics_the_config_loader(line in "[a-z_.]{1,20} = \\PC{0,40}", at in 0usize..20) {
        let mut lines: Vec<&str> = GOOD.lines().collect();
        let at = at.min(lines.len());
        lines.insert(at, &line);
        let _ = load(&lines.join("\n"));
    }

    /// A database URL's password is never shown, in its userinfo or its query.
    #[test]
    fn redaction_hides_every_password(pw in "[A-Za-z0-9%!]{6,20}") {
        for url in [
            format!("postgres://baton:{pw}@db:5432/baton"),
            format!("postgres://baton@db/baton?sslmode=require&password={pw}"),
            format!("postgres://baton:{pw}@db/baton?PASSWORD={pw}"),
        ] {
            let shown = crate::store::redact_url(&url);
            proptest::prop_assert!(!shown.contains(&pw), "{}", shown);
        }
    }
}
