//! Usage accounting: what an agent's tool reported it used, read from the run's log after
//! the agent ended.
//!
//! - Claude Code (`--output-format json`, or `stream-json --verbose`) ends with one
//!   `{"type":"result", ...}` record carrying `total_cost_usd`, `num_turns` and `usage`
//!   (`input_tokens`, `cache_creation_input_tokens`, `cache_read_input_tokens`,
//!   `output_tokens`). Tokens in are the three input counts together.
//! - Codex (`codex exec --json`) writes a `{"type":"turn.completed","usage":{...}}` event
//!   per turn (`input_tokens`, `cached_input_tokens`, `output_tokens`), summed here; it
//!   reports no cost. Its cached tokens are a part of its input tokens.
//!
//! Agents that print nothing of the kind are fine: the usage is `None`.

use std::io::BufRead;
use std::path::Path;

use serde::Deserialize;

use crate::model::Usage;

/// Lines longer than this are not usage records (Claude's `result` carries the final
/// answer, so it may be long, but not this long).
const USAGE_LINE_MAX: usize = 4 * 1024 * 1024;

#[derive(Deserialize)]
struct Record {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    usage: Option<Tokens>,
    #[serde(default)]
    total_cost_usd: Option<f64>,
    #[serde(default)]
    num_turns: Option<i32>,
}

#[derive(Deserialize, Default)]
struct Tokens {
    #[serde(default)]
    input_tokens: i64,
    #[serde(default)]
    cache_creation_input_tokens: i64,
    #[serde(default)]
    cache_read_input_tokens: i64,
    #[serde(default)]
    output_tokens: i64,
}

/// The usage reported in the log at `path`, if any.
pub fn from_log(path: &Path) -> Option<Usage> {
    let file = std::fs::File::open(path).ok()?;
    from_lines(std::io::BufReader::new(file).lines().map_while(Result::ok))
}

/// The usage reported in these lines: Claude's last `result` record, else the sum of
/// Codex's `turn.completed` events.
pub fn from_lines(lines: impl Iterator<Item = String>) -> Option<Usage> {
    let mut claude: Option<Usage> = None;
    let mut codex: Option<Usage> = None;
    for line in lines {
        let line = line.trim();
        if line.len() > USAGE_LINE_MAX || !line.contains("\"type\"") {
            continue;
        }
        // Claude's `--output-format json` with verbose settings prints every message as
        // one JSON array, the result last.
        let records: Vec<Record> = if line.starts_with('[') {
            serde_json::from_str::<Vec<serde_json::Value>>(line)
                .map(|all| {
                    all.into_iter()
                        .filter_map(|v| serde_json::from_value(v).ok())
                        .collect()
                })
                .unwrap_or_default()
        } else if line.starts_with('{') {
            serde_json::from_str::<Record>(line).into_iter().collect()
        } else {
            continue;
        };
        for r in records {
            match r.kind.as_str() {
                "result" => {
                    let t = r.usage.unwrap_or_default();
                    claude = Some(Usage {
                        tokens_in: Some(
                            t.input_tokens
                                + t.cache_creation_input_tokens
                                + t.cache_read_input_tokens,
                        ),
                        tokens_out: Some(t.output_tokens),
                        cost_microusd: r.total_cost_usd.map(|c| (c * 1_000_000.0).round() as i64),
                        turns: r.num_turns,
                    });
                }
                "turn.completed" => {
                    let t = r.usage.unwrap_or_default();
                    let turn = Usage {
                        tokens_in: Some(t.input_tokens),
                        tokens_out: Some(t.output_tokens),
                        cost_microusd: None,
                        turns: Some(1),
                    };
                    codex = Some(codex.unwrap_or_default().plus(turn));
                }
                _ => {}
            }
        }
    }
    claude.or(codex)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> impl Iterator<Item = String> + '_ {
        text.lines().map(str::to_string)
    }

    #[test]
    fn claude_result_records_give_tokens_cost_and_turns() {
        let log = r#"starting
{"type":"system","subtype":"init","session_id":"s-1","tools":["Bash"]}
{"type":"assistant","message":{"usage":{"input_tokens":3,"output_tokens":5}}}
{"type":"result","subtype":"success","is_error":false,"duration_ms":2345,"duration_api_ms":2100,"num_turns":4,"result":"Done.","session_id":"s-1","total_cost_usd":0.0123456,"usage":{"input_tokens":12,"cache_creation_input_tokens":100,"cache_read_input_tokens":2000,"output_tokens":345}}
"#;
        assert_eq!(
            from_lines(lines(log)),
            Some(Usage {
                tokens_in: Some(2112),
                tokens_out: Some(345),
                cost_microusd: Some(12346),
                turns: Some(4),
            })
        );
    }

    #[test]
    fn codex_turns_are_summed() {
        let log = r#"{"type":"thread.started","thread_id":"t-1"}
{"type":"turn.started"}
{"type":"item.completed","item":{"id":"item_0","type":"agent_message","text":"ok"}}
{"type":"turn.completed","usage":{"input_tokens":1000,"cached_input_tokens":200,"output_tokens":50}}
{"type":"turn.started"}
{"type":"turn.completed","usage":{"input_tokens":500,"cached_input_tokens":0,"output_tokens":25}}
"#;
        assert_eq!(
            from_lines(lines(log)),
            Some(Usage {
                tokens_in: Some(1500),
                tokens_out: Some(75),
                cost_microusd: None,
                turns: Some(2),
            })
        );
    }

    #[test]
    fn a_verbose_json_array_is_read_for_its_result() {
        let log = r#"[{"type":"system","subtype":"init"},{"type":"result","subtype":"success","is_error":false,"num_turns":1,"total_cost_usd":0.173019,"usage":{"input_tokens":2,"cache_creation_input_tokens":7882,"cache_read_input_tokens":15109,"output_tokens":5,"service_tier":"standard"}}]"#;
        let u = from_lines(lines(log)).unwrap();
        assert_eq!(
            (u.tokens_in, u.tokens_out, u.cost_microusd, u.turns),
            (Some(22993), Some(5), Some(173019), Some(1))
        );
    }

    #[test]
    fn logs_without_usage_give_none() {
        assert_eq!(
            from_lines(lines("hello\n{\"not\": \"a record\"}\n{broken")),
            None
        );
        assert_eq!(from_log(Path::new("/nonexistent/log")), None);
    }
}
