//! Prompts: a stage's template (`prompt` or `prompt_file`), rendered with minijinja in
//! strict mode for each run, so that a misspelt variable is an error (caught by
//! `baton config check`) rather than an empty string in front of an agent.
//!
//! Also the bounds on what agents are given: a task's description, the feedback between
//! stages, and the rendered prompt when it travels as one argument.

use std::path::Path;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;
use minijinja::{Environment, UndefinedBehavior, Value};
use serde::Serialize;

use crate::model::Verdict;

/// A task's description longer than this is refused at submit.
pub const DESCRIPTION_MAX: usize = 64 * 1024;
/// Feedback (a verdict, a failure with the end of its log) is cut to this many bytes.
pub const FEEDBACK_MAX: usize = 16 * 1024;
/// Linux caps one argument at 128 KiB: a prompt passed as `{prompt}` must stay under this.
pub const PROMPT_ARG_MAX: usize = 100 * 1024;
/// How many lines of a failed attempt's log its feedback carries.
pub const FEEDBACK_LOG_LINES: usize = 40;

/// The task as a prompt sees it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PromptTask {
    pub key: String,
    pub title: String,
    /// Empty when the task has none.
    pub description: String,
    /// The Plane work item's web address; empty when unknown.
    pub url: String,
}

/// Every variable a prompt template may use.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PromptVars {
    pub task: PromptTask,
    pub stage: String,
    pub iteration: i32,
    pub attempt: i32,
    pub run_id: i64,
    pub branch: String,
    pub workspace: String,
    /// Empty on a first pass; the rejecting stage's verdict after a rejection; the
    /// previous attempt's failure and the end of its log on a retry.
    pub feedback: String,
}

/// Why a template cannot be rendered, with its line in the template when known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", line.map(|l| format!("line {l} of the prompt: ")).unwrap_or_default())]
pub struct PromptError {
    pub line: Option<usize>,
    pub message: String,
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    // Prompts are text, not HTML: nothing is escaped.
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    if let Ok(syntax) = SyntaxConfig::builder().keep_trailing_newline(true).build() {
        env.set_syntax(syntax);
    }
    env
}

/// Renders `template` with `vars`.
pub fn render(template: &str, vars: &PromptVars) -> Result<String, PromptError> {
    environment()
        .render_str(template, Value::from(Serde(vars)))
        .map_err(|e| PromptError {
            line: e.line(),
            message: match e.detail() {
                Some(d) => format!("{}: {d}", e.kind()),
                None => e.kind().to_string(),
            },
        })
}

/// The variables a template may use (`task` only through its fields).
const VARIABLES: &[&str] = &[
    "task.key",
    "task.title",
    "task.description",
    "task.url",
    "stage",
    "iteration",
    "attempt",
    "run_id",
    "branch",
    "workspace",
    "feedback",
];

/// Checks a template: every variable it names, in any branch, must be one there is, and
/// a render with sample values must succeed (syntax, filters). Errors name their line
/// where minijinja knows it.
pub fn check(template: &str) -> Result<(), PromptError> {
    let env = environment();
    let parsed = env.template_from_str(template).map_err(|e| PromptError {
        line: e.line(),
        message: e.to_string(),
    })?;
    let mut unknown: Vec<String> = parsed
        .undeclared_variables(true)
        .into_iter()
        .filter(|v| !VARIABLES.contains(&v.as_str()))
        .collect();
    if !unknown.is_empty() {
        unknown.sort();
        return Err(PromptError {
            line: unknown
                .iter()
                .find_map(|v| template.lines().position(|l| l.contains(v.as_str())))
                .map(|i| i + 1),
            message: format!(
                "unknown variable {}; known: {}",
                unknown.join(", "),
                VARIABLES.join(", ")
            ),
        });
    }
    let sample = PromptVars {
        task: PromptTask {
            key: "APP-1".into(),
            title: "title".into(),
            description: "description".into(),
            url: "https://plane.example/APP-1".into(),
        },
        stage: "stage".into(),
        iteration: 2,
        attempt: 2,
        run_id: 1,
        branch: "baton/APP-1".into(),
        workspace: "/workspace".into(),
        feedback: "feedback".into(),
    };
    render(template, &sample).map(|_| ())
}

/// Writes a run's rendered prompt beside its log (`12-developer-1.prompt.md` beside
/// `12-developer-1.log`) and returns the file's path.
pub fn write_beside(log: &Path, text: &str) -> std::io::Result<std::path::PathBuf> {
    let path = log.with_extension("prompt.md");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Cuts `text` to at most `max` bytes at a character boundary, saying that it did.
pub fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let marker = "\n[... cut ...]\n";
    let mut end = max.saturating_sub(marker.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{marker}", &text[..end])
}

/// The feedback of a failed attempt: its reason and the last lines of its log.
pub fn failure_feedback(attempt: i32, reason: &str, log_tail: &str) -> String {
    let mut out = format!("Attempt {attempt} failed: {reason}\n");
    if !log_tail.trim().is_empty() {
        out.push_str(&format!(
            "\nThe last lines of its log:\n{}\n",
            log_tail.trim_end()
        ));
    }
    bounded(&out, FEEDBACK_MAX)
}

/// What a claim hands on to the job that runs next: the verdict file's text after a
/// rejection; the reason and the end of the run's log after a failed attempt.
pub fn feedback(
    verdict: &Verdict,
    verdict_text: Option<&str>,
    attempt: i32,
    log: &Path,
) -> Option<String> {
    let reason = match verdict {
        Verdict::Passed => return None,
        Verdict::Rejected => return verdict_text.map(|t| bounded(t, FEEDBACK_MAX)),
        Verdict::Failed { reason } | Verdict::Lost { reason } => reason.as_str(),
        Verdict::TimedOut => "it ran past the stage timeout and was stopped",
    };
    Some(failure_feedback(attempt, reason, &log_tail(log)))
}

/// The last [`FEEDBACK_LOG_LINES`] lines of a log (read from its last 64 KiB); empty
/// when the log cannot be read, e.g. on another host.
pub fn log_tail(log: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(log) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    last_lines(&String::from_utf8_lossy(&buf), FEEDBACK_LOG_LINES)
}

/// The last `n` lines of `text`.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A Plane work item's description as text: its stripped text when Plane gives one,
/// else its HTML made text; `None` when both are empty.
/// It is cut to [`DESCRIPTION_MAX`]: a tracker's text is taken as far as it goes.
pub fn description_text(stripped: Option<&str>, html: Option<&str>) -> Option<String> {
    let text = match (stripped.map(str::trim), html) {
        (Some(t), _) if !t.is_empty() => Some(t.to_string()),
        (_, Some(html)) => Some(html_to_text(html)).filter(|t| !t.is_empty()),
        _ => None,
    };
    text.map(|t| bounded(&t, DESCRIPTION_MAX))
}

/// Plain text of a Plane description given only as HTML: tags dropped, block ends as line
/// breaks, the common entities decoded.
pub fn html_to_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut rest = html;
    while let Some(open) = rest.find('<') {
        out.push_str(&rest[..open]);
        let Some(close) = rest[open..].find('>') else {
            rest = "";
            break;
        };
        let tag = rest[open + 1..open + close]
            .trim_start_matches('/')
            .to_ascii_lowercase();
        let name = tag
            .split(|c: char| c.is_whitespace() || c == '/')
            .next()
            .unwrap_or("");
        if matches!(
            name,
            "p" | "br" | "div" | "li" | "h1" | "h2" | "h3" | "h4" | "tr" | "pre"
        ) && !out.ends_with('\n')
            && !out.is_empty()
        {
            out.push('\n');
        }
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    let decoded = out
        .replace("&nbsp;", " ")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&");
    decoded.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_every_variable() {
        let vars = PromptVars {
            task: PromptTask {
                key: "APP-7".into(),
                title: "Fix login".into(),
                description: "It fails & crashes <sometimes>".into(),
                url: String::new(),
            },
            stage: "developer".into(),
            iteration: 2,
            attempt: 1,
            run_id: 9,
            branch: "baton/APP-7".into(),
            workspace: "/w".into(),
            feedback: "CHANGES_REQUESTED: add a test".into(),
        };
        let t = "{{ task.key }}: {{ task.title }}\n{{ task.description }}\n{% if feedback %}Reviewer said: {{ feedback }}{% endif %}\n";
        let out = render(t, &vars).unwrap();
        assert_eq!(
            out,
            "APP-7: Fix login\nIt fails & crashes <sometimes>\nReviewer said: CHANGES_REQUESTED: add a test\n"
        );
    }

    #[test]
    fn unknown_variables_and_syntax_errors_name_their_line() {
        let e = check("Hello\n{{ task.key }}\n{{ task.titel }}\n").unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.to_string().starts_with("line 3 of the prompt"), "{e}");
        let e = check("{{ tsak }}").unwrap_err();
        assert!(e.to_string().contains("unknown variable tsak"), "{e}");
        // A branch the sample values do not take is checked all the same.
        let e = check("ok\n{% if not feedback %}{{ task.titel }}{% endif %}").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.to_string().contains("task.titel"), "{e}");
        let e = check("{% if %}").unwrap_err();
        assert_eq!(e.line, Some(1));
        assert!(check("{{ task.key }} {{ feedback }} {{ run_id }} {{ branch }}").is_ok());
    }

    #[test]
    fn feedback_is_bounded_at_a_character_boundary() {
        let long = "é".repeat(FEEDBACK_MAX);
        let cut = bounded(&long, FEEDBACK_MAX);
        assert!(cut.len() <= FEEDBACK_MAX);
        assert!(cut.ends_with("[... cut ...]\n"));
        let f = failure_feedback(2, "gate exited 1", "a\nb\nc");
        assert_eq!(
            f,
            "Attempt 2 failed: gate exited 1\n\nThe last lines of its log:\na\nb\nc\n"
        );
        assert_eq!(last_lines("1\n2\n3\n4", 2), "3\n4");
    }

    #[test]
    fn html_descriptions_become_text() {
        assert_eq!(
            html_to_text("<p>Say <strong>hello</strong> &amp; wave.</p><p>Then&nbsp;leave.</p>"),
            "Say hello & wave.\nThen leave."
        );
        assert_eq!(html_to_text("no tags"), "no tags");
        assert_eq!(html_to_text("<p>unclosed <b"), "unclosed");
    }
}
