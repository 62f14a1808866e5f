//! Agents on real tickets: the prompt an agent receives (the ticket's title and
//! description, the reviewer's words on the next iteration, a failed attempt's reason),
//! usage read from Claude Code's and Codex's output, and Plane as the tracker: a work
//! item's description, a cancelled work item, and the poll that finds lost deliveries.
//! Real agent processes and real git, on SQLite and PostgreSQL.

use baton::actors::ProbeEvent;
use baton::actors::monitor::MonitorEvent;
use baton::clock::Clock;
use baton::config::{Config, Secrets};
use baton::model::{Origin, TaskStatus};
use baton::service::ServeOptions;
use baton::tasks::SubmitRequest;
use serde_json::json;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::on_both;
use crate::support::TestDb;
use crate::support::harness::*;

const PROMPT: &str = r#"
prompt = """
Task {{ task.key }}: {{ task.title }}
{{ task.description }}
Stage {{ stage }}, iteration {{ iteration }}, attempt {{ attempt }}, on {{ branch }}
{% if feedback %}FEEDBACK: {{ feedback }}{% endif %}
"""
"#;

/// Submits a task as the CLI does, with a description.
async fn submit(h: &Harness, config: &Config, key: &str, description: Option<&str>) {
    let request = SubmitRequest {
        title: Some("Greet people".into()),
        description: description.map(str::to_string),
        ..SubmitRequest::new(crate::support::key(key))
    };
    baton::tasks::submit(
        &h.db.store,
        config,
        request,
        Origin::Cli,
        Clock::system().now_ms(),
    )
    .await
    .expect("submit");
}

fn read(path: std::path::PathBuf) -> String {
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

async fn prompts_carry_the_ticket_and_the_reviewers_words(db: TestDb) {
    let h = Harness::new(db);
    let seen = h.root.join("seen");
    std::fs::create_dir_all(&seen).unwrap();
    let developer = h.agent(
        "developer",
        &format!(
            r#"cp "$BATON_PROMPT_FILE" "{seen}/dev-$BATON_ITERATION.txt"
printf '%s' "$1" > "{seen}/dev-arg-$BATON_ITERATION.txt"
echo "v$BATON_ITERATION" > code.txt"#,
            seen = seen.display()
        ),
    );
    let reviewer = h.agent(
        "reviewer",
        r#"if [ "$BATON_ITERATION" = 1 ]; then
  printf 'CHANGES_REQUESTED: please add tests for greet()\n' > review.md
else
  printf 'APPROVED\n' > review.md
fi"#,
    );
    let config = h.config(&format!(
        r#"
[pipelines.default]
stages = ["developer", "reviewer"]
[stages.developer]
command = ["sh", "{developer}", "{{prompt}}"]
{PROMPT}
[stages.reviewer]
command = ["sh", "{reviewer}"]
on_reject = "developer"
gate.verdict = {{ file = "review.md", approve = "APPROVED", reject = "CHANGES_REQUESTED" }}
{PROMPT}
"#
    ));
    submit(&h, &config, "PR-1", Some("greet() must greet by name.")).await;
    let (node, mut rx) = h.start(config).await;
    assert_eq!(wait_task_end(&mut rx).await, TaskStatus::Done);
    node.shutdown().await;

    let first = read(seen.join("dev-1.txt"));
    assert!(first.contains("Task PR-1: Greet people"), "{first}");
    assert!(first.contains("greet() must greet by name."), "{first}");
    assert!(
        first.contains("Stage developer, iteration 1, attempt 1, on baton/PR-1"),
        "{first}"
    );
    assert!(
        !first.contains("FEEDBACK"),
        "a first pass has no feedback: {first}"
    );
    let second = read(seen.join("dev-2.txt"));
    assert!(
        second.contains("FEEDBACK: CHANGES_REQUESTED: please add tests for greet()"),
        "{second}"
    );
    // `{prompt}` is one argument, never split by a shell.
    assert_eq!(read(seen.join("dev-arg-2.txt")), second);

    let detail =
        h.db.store
            .task_detail(&crate::support::key("PR-1"))
            .await
            .unwrap();
    let dev2 = detail
        .jobs
        .iter()
        .find(|j| j.stage == "developer" && j.iteration == 2)
        .unwrap();
    assert!(
        dev2.feedback
            .as_deref()
            .unwrap()
            .contains("please add tests")
    );
    let run = detail.runs.iter().find(|r| r.job_id == dev2.id).unwrap();
    assert_eq!(run.prompt.as_deref(), Some(second.as_str()));
    let shown = baton::present::render_detail(&detail, 0);
    assert!(shown.contains("please add tests for greet()"), "{shown}");
    let doc = baton::present::detail_json(&detail, 0);
    assert!(
        doc["runs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["prompt"] == json!(second))
    );
}
on_both!(
    prompts_carry_the_ticket_and_the_reviewers_words,
    prompts_carry_the_ticket_and_the_reviewers_words
);

async fn a_retry_is_told_why_the_last_attempt_failed(db: TestDb) {
    let h = Harness::new(db);
    let seen = h.root.join("seen.txt");
    let agent = h.agent(
        "flaky",
        &format!(
            r#"if [ "$BATON_ATTEMPT" = 1 ]; then echo "boom: the compiler said no"; exit 3; fi
cp "$BATON_PROMPT_FILE" "{}""#,
            seen.display()
        ),
    );
    let config = h.config(&format!(
        r#"
[pipelines.default]
stages = ["developer"]
[stages.developer]
command = ["sh", "{agent}"]
commit = false
prompt = "{{{{ feedback }}}}"
"#
    ));
    submit(&h, &config, "RETRY-7", None).await;
    let (node, mut rx) = h.start(config).await;
    assert_eq!(wait_task_end(&mut rx).await, TaskStatus::Done);
    node.shutdown().await;
    let prompt = read(seen);
    assert!(
        prompt.starts_with("Attempt 1 failed: agent exited with code 3"),
        "{prompt}"
    );
    assert!(prompt.contains("boom: the compiler said no"), "{prompt}");
}
on_both!(
    a_retry_is_told_why_the_last_attempt_failed,
    a_retry_is_told_why_the_last_attempt_failed
);

async fn a_prompt_too_long_for_one_argument_fails_with_advice(db: TestDb) {
    let h = Harness::new(db);
    let config = h.config(
        r#"
[pipelines.default]
stages = ["developer"]
[stages.developer]
command = ["sh", "-c", "true", "{prompt}"]
prompt = "{{ task.description }}{{ task.description }}"
"#,
    );
    submit(&h, &config, "BIG-1", Some(&"x".repeat(60 * 1024))).await;
    let (node, mut rx) = h.start(config).await;
    assert_eq!(wait_task_end(&mut rx).await, TaskStatus::Failed);
    node.shutdown().await;
    let events =
        h.db.store
            .task_detail(&crate::support::key("BIG-1"))
            .await
            .unwrap()
            .events;
    let failed = events
        .iter()
        .find(|e| e.kind == baton::model::EventKind::TaskFailed)
        .unwrap();
    assert!(
        failed.detail.contains("BATON_PROMPT_FILE"),
        "{}",
        failed.detail
    );
    assert!(failed.detail.contains("120 KiB"), "{}", failed.detail);
}
on_both!(
    a_prompt_too_long_for_one_argument_fails_with_advice,
    a_prompt_too_long_for_one_argument_fails_with_advice
);

async fn usage_from_claude_and_codex_is_summed_per_task(db: TestDb) {
    let h = Harness::new(db);
    let claude = h.agent(
        "claude",
        r#"echo '{"type":"system","subtype":"init","session_id":"s-1"}'
echo '{"type":"result","subtype":"success","is_error":false,"duration_ms":1988,"duration_api_ms":1883,"num_turns":3,"result":"Done","stop_reason":"end_turn","session_id":"s-1","total_cost_usd":0.173019,"usage":{"input_tokens":2,"cache_creation_input_tokens":7882,"cache_read_input_tokens":15109,"output_tokens":5,"service_tier":"standard"},"permission_denials":[]}'
echo analysis > analysis.md"#,
    );
    let codex = h.agent(
        "codex",
        r#"echo '{"type":"thread.started","thread_id":"t-1"}'
echo '{"type":"turn.started"}'
echo '{"type":"item.completed","item":{"id":"item_0","type":"agent_message","text":"ok"}}'
echo '{"type":"turn.completed","usage":{"input_tokens":12731,"cached_input_tokens":6912,"cache_write_input_tokens":0,"output_tokens":6,"reasoning_output_tokens":0}}'
echo '{"type":"turn.started"}'
echo '{"type":"turn.completed","usage":{"input_tokens":1000,"cached_input_tokens":0,"output_tokens":94}}'
echo code > code.txt"#,
    );
    let plain = h.agent("plain", "echo done > done.txt");
    let config = h.config(&format!(
        r#"
[pipelines.default]
stages = ["analyst", "developer", "reviewer"]
[stages.analyst]
command = ["sh", "{claude}"]
[stages.developer]
command = ["sh", "{codex}"]
[stages.reviewer]
command = ["sh", "{plain}"]
"#
    ));
    submit(&h, &config, "USE-1", None).await;
    let (node, mut rx) = h.start(config).await;
    assert_eq!(wait_task_end(&mut rx).await, TaskStatus::Done);
    // The dashboard's overview shows the task's total.
    let overview: serde_json::Value =
        reqwest::get(format!("http://{}/api/v1/overview", node.http_addr))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(
        overview["tasks"][0]["usage_text"],
        "36.7k in, 105 out, $0.1730, 5 turns"
    );
    node.shutdown().await;
    let detail =
        h.db.store
            .task_detail(&crate::support::key("USE-1"))
            .await
            .unwrap();
    let usage = |stage: &str| {
        let job = detail.jobs.iter().find(|j| j.stage == stage).unwrap();
        let run = detail.runs.iter().find(|r| r.job_id == job.id).unwrap();
        (run.tokens_in, run.tokens_out, run.cost_microusd, run.turns)
    };
    assert_eq!(
        usage("analyst"),
        (Some(22993), Some(5), Some(173019), Some(3))
    );
    assert_eq!(usage("developer"), (Some(13731), Some(100), None, Some(2)));
    assert_eq!(
        usage("reviewer"),
        (None, None, None, None),
        "a plain agent reports nothing"
    );
    let doc = baton::present::detail_json(&detail, 0);
    assert_eq!(
        doc["usage"],
        json!({"tokens_in": 36724, "tokens_out": 105, "cost_microusd": 173019, "turns": 5})
    );
    assert!(
        baton::present::render_detail(&detail, 0)
            .contains("usage: 36.7k in, 105 out, $0.1730, 5 turns")
    );
}
on_both!(
    usage_from_claude_and_codex_is_summed_per_task,
    usage_from_claude_and_codex_is_summed_per_task
);

/// A Plane stand-in that answers what it is asked the way Plane's API v1 does.
async fn plane() -> MockServer {
    let plane = MockServer::start().await;
    let project = "/api/v1/workspaces/team/projects/proj-uuid";
    Mock::given(method("GET"))
        .and(path(format!("{project}/")))
        .and(header("X-API-Key", "plane-key"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"id": "proj-uuid", "identifier": "PROJ", "name": "App"})),
        )
        .mount(&plane)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("{project}/states/")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "total_count": 3, "next_cursor": "100:1:0", "prev_cursor": "100:-1:1",
            "next_page_results": false, "prev_page_results": false, "count": 3,
            "total_pages": 1, "total_results": 3, "extra_stats": null, "grouped_by": null, "sub_grouped_by": null,
            "results": [
                {"id": "st-backlog", "name": "Backlog", "color": "#ccc", "group": "backlog", "sequence": 1000.0, "default": true},
                {"id": "st-ready", "name": "Ready for agents", "color": "#0a0", "group": "unstarted", "sequence": 2000.0, "default": false},
                {"id": "st-cancelled", "name": "Cancelled", "color": "#a00", "group": "cancelled", "sequence": 3000.0, "default": false},
            ],
        })))
        .mount(&plane)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("{project}/work-items/issue-5/")))
        .respond_with(ResponseTemplate::new(200).set_body_json(work_item(5, "st-ready")))
        .mount(&plane)
        .await;
    plane
}

/// A work item as Plane's API returns it: the state and the project as ids, the
/// description as HTML only.
fn work_item(n: i64, state: &str) -> serde_json::Value {
    json!({
        "id": format!("issue-{n}"), "name": format!("Item {n}"), "sequence_id": n,
        "state": state, "project": "proj-uuid", "workspace": "ws-uuid",
        "description_html": format!("<p>Make item {n} <strong>fast</strong> &amp; small.</p>"),
        "priority": "none", "labels": ["lb-1"], "assignees": [], "parent": null,
        "created_at": "2026-11-24T08:00:00Z", "updated_at": "2026-11-24T08:00:00Z",
    })
}

fn plane_config(url: &str) -> String {
    format!(
        r#"
[plane]
api_url = "{url}"
workspace = "team"
project_id = "proj-uuid"
api_key_env = "BATON_TEST_PLANE_KEY"
webhook_secret_env = "BATON_TEST_WEBHOOK_SECRET"
trigger_state = "Ready for agents"
poll_interval = "POLL"
requests_per_minute = 6000
[effects]
plane_comment = false
"#
    )
}

fn plane_secrets() -> Secrets {
    Secrets {
        plane_api_key: Some("plane-key".into()),
        webhook_secret: Some("whsec".into()),
        ..Default::default()
    }
}

async fn a_work_items_description_is_read_from_plane_before_the_first_stage(db: TestDb) {
    let plane = plane().await;
    let h = Harness::new(db);
    let seen = h.root.join("seen.txt");
    let agent = h.agent(
        "agent",
        &format!(r#"cp "$BATON_PROMPT_FILE" "{}""#, seen.display()),
    );
    let config = h.config(&format!(
        r#"
[pipelines.default]
stages = ["developer"]
[stages.developer]
command = ["sh", "{agent}"]
commit = false
prompt = "{{{{ task.description }}}} at {{{{ task.url }}}}"
{}"#,
        plane_config(&plane.uri()).replace("POLL", "0s")
    ));
    let request = SubmitRequest {
        plane_issue_id: Some("issue-5".into()),
        ..SubmitRequest::new(crate::support::key("PROJ-5"))
    };
    baton::tasks::submit(
        &h.db.store,
        &config,
        request,
        Origin::Cli,
        Clock::system().now_ms(),
    )
    .await
    .unwrap();
    let options = ServeOptions {
        secrets: Some(plane_secrets()),
        ..Default::default()
    };
    let (node, mut rx) = h.start_with(config, options).await;
    assert_eq!(wait_task_end(&mut rx).await, TaskStatus::Done);
    node.shutdown().await;
    let url = format!("{}/team/projects/proj-uuid/issues/issue-5", plane.uri());
    assert_eq!(read(seen), format!("Make item 5 fast & small. at {url}"));
    let task =
        h.db.store
            .task_by_key(&crate::support::key("PROJ-5"))
            .await
            .unwrap();
    assert_eq!(
        task.description.as_deref(),
        Some("Make item 5 fast & small.")
    );
}
on_both!(
    a_work_items_description_is_read_from_plane_before_the_first_stage,
    a_work_items_description_is_read_from_plane_before_the_first_stage
);

fn sign(body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"whsec").unwrap();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

async fn a_work_item_moved_to_a_cancelled_state_cancels_its_task_and_agent(db: TestDb) {
    let plane = plane().await;
    let h = Harness::new(db);
    let config = h.config(&format!(
        r#"
[pipelines.default]
stages = ["developer"]
[stages.developer]
command = ["sh", "-c", "sleep 120"]
{}"#,
        plane_config(&plane.uri()).replace("POLL", "0s")
    ));
    submit(&h, &config, "PROJ-5", None).await;
    let options = ServeOptions {
        secrets: Some(plane_secrets()),
        ..Default::default()
    };
    let (node, mut rx) = h.start_with(config, options).await;
    let run_id = wait_for(&mut rx, |ev| match ev {
        ProbeEvent::Monitor {
            event: MonitorEvent::Start,
            run_id,
            ..
        } => Some(*run_id),
        _ => None,
    })
    .await;
    let pid = loop {
        if let Some(pid) = h.db.store.run(run_id).await.unwrap().and_then(|r| r.pid) {
            break pid;
        }
        wait_for_activity(&mut rx).await;
    };
    // Plane's delivery: the state inline with its group, the project by its id.
    let body = serde_json::to_vec(&json!({
        "event": "issue", "action": "updated", "webhook_id": "wh-1", "workspace_id": "ws-uuid",
        "data": {
            "id": "issue-5", "name": "Item 5", "sequence_id": 5, "project": "proj-uuid",
            "state": {"id": "st-cancelled", "name": "Cancelled", "color": "#a00", "group": "cancelled"},
            "labels": [], "assignees": [], "description_html": "<p></p>", "description_stripped": "",
        },
        "activity": {"field": "state_id", "new_value": "Cancelled", "old_value": "Ready for agents", "actor": {"id": "u-1"}},
    }))
    .unwrap();
    let resp = reqwest::Client::new()
        .post(format!("http://{}/webhooks/plane", node.http_addr))
        .header("X-Plane-Delivery", "d-cancel")
        .header("X-Plane-Event", "issue")
        .header("X-Plane-Signature", sign(&body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        (v["status"].as_str(), v["task"].as_str()),
        (Some("cancelled"), Some("PROJ-5"))
    );
    assert!(
        !baton::agent::alive(pid),
        "the agent outlived its work item's cancel"
    );
    let task =
        h.db.store
            .task_by_key(&crate::support::key("PROJ-5"))
            .await
            .unwrap();
    assert_eq!(task.status, TaskStatus::Cancelled);
    node.shutdown().await;
}
on_both!(
    a_work_item_moved_to_a_cancelled_state_cancels_its_task_and_agent,
    a_work_item_moved_to_a_cancelled_state_cancels_its_task_and_agent
);

async fn the_poll_submits_a_work_item_whose_delivery_was_lost_once(db: TestDb) {
    let plane = plane().await;
    // Listed with `expand=labels`, a work item's labels are whole label objects.
    let mut seven = work_item(7, "st-ready");
    seven["labels"] = json!([{
        "id": "lb-1", "created_at": "2026-11-24T08:00:00Z", "updated_at": "2026-11-24T08:00:00Z",
        "deleted_at": null, "name": "Bug", "description": "", "color": "#ff4444",
        "sort_order": 65535.0, "external_source": null, "external_id": null,
        "created_by": "u-1", "updated_by": null, "workspace": "ws-uuid",
        "project": "proj-uuid", "parent": null,
    }]);
    Mock::given(method("GET"))
        .and(path(
            "/api/v1/workspaces/team/projects/proj-uuid/work-items/",
        ))
        .and(wiremock::matchers::query_param("expand", "labels"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "total_count": 2, "next_cursor": "100:1:0", "prev_cursor": "100:-1:1",
            "next_page_results": false, "prev_page_results": false, "count": 2,
            "total_pages": 1, "total_results": 2, "extra_stats": null,
            "grouped_by": null, "sub_grouped_by": null,
            "results": [seven, work_item(8, "st-backlog")],
        })))
        .mount(&plane)
        .await;
    let h = Harness::new(db);
    let config = h.config(&format!(
        r#"
[pipelines.default]
stages = ["developer"]
[pipelines.bugfix]
stages = ["developer"]
plane_labels = ["bug"]
[stages.developer]
command = ["true"]
commit = false
{}"#,
        plane_config(&plane.uri()).replace("POLL", "200ms")
    ));
    // Another node holds the poll for a moment: this one waits its turn.
    let now = Clock::system().now_ms();
    assert!(
        h.db.store
            .take_lease("plane_poll", "other-node", 2_000, now)
            .await
            .unwrap()
    );
    let options = ServeOptions {
        secrets: Some(plane_secrets()),
        ..Default::default()
    };
    let (node, mut rx) = h.start_with(config, options).await;
    let mut results = Vec::new();
    while results
        .iter()
        .filter(|r: &&baton::actors::plane_poller::PollResult| r.polled)
        .count()
        < 3
    {
        results.push(
            wait_for(&mut rx, |ev| match ev {
                ProbeEvent::PlanePoller { result } => Some(result.clone()),
                _ => None,
            })
            .await,
        );
    }
    node.shutdown().await;
    assert!(
        !results[0].polled,
        "polled while another node held the lease"
    );
    let polled: Vec<_> = results.iter().filter(|r| r.polled).collect();
    assert_eq!(
        polled
            .iter()
            .map(|r| (r.n_listed, r.n_submitted))
            .collect::<Vec<_>>(),
        [(1, 1), (1, 0), (1, 0)],
        "only the item in the trigger state, submitted once"
    );
    let tasks = h.db.store.list_tasks(None).await.unwrap();
    assert_eq!(tasks.len(), 1);
    let t = &tasks[0].task;
    assert_eq!(
        (
            t.key.as_str(),
            t.title.as_str(),
            t.plane_issue_id.as_deref()
        ),
        ("PROJ-7", "Item 7", Some("issue-7"))
    );
    assert_eq!(t.description.as_deref(), Some("Make item 7 fast & small."));
    assert_eq!(t.pipeline, "bugfix", "the pipeline of its label");
}
on_both!(
    the_poll_submits_a_work_item_whose_delivery_was_lost_once,
    the_poll_submits_a_work_item_whose_delivery_was_lost_once
);
