//! One OpenTelemetry trace per task: across actors, across a restart, and into the agent.

use std::collections::HashSet;

use opentelemetry::trace::TracerProvider;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tracing_subscriber::layer::SubscriberExt;

use crate::support::harness::{Harness, wait_effects_settled, wait_for, wait_for_activity};
use crate::support::{Backend, TestDb};
use baton::actors::ProbeEvent;
use baton::model::ClaimOutcome;

/// Spans are collected on this thread (a current-thread runtime runs every actor here but
/// the Advancer, which sends its spans to this thread's collector all the same).
async fn one_trace_per_task_across_actors_and_a_restart(db: TestDb) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_subscriber::filter::LevelFilter::INFO)
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let h = Harness::new(db);
    // The reviewer waits for a file: it is still running when the first node stops, and
    // the second node adopts it.
    let agent = h.agent(
        "agent",
        r#"echo "$TRACEPARENT" > "$BATON_WORKSPACE/../../traceparent-$BATON_STAGE"
echo "$BATON_STAGE" > "$BATON_STAGE.txt"
if [ "$BATON_STAGE" = reviewer ]; then
  while [ ! -f "$BATON_WORKSPACE/../../go" ]; do sleep 0.05; done
fi"#,
    );
    let config = h.config(&format!(
        "[pipelines.default]\nstages = [\"developer\", \"reviewer\"]\n[stages.developer]\ncommand = [\"sh\", \"{agent}\"]\n[stages.reviewer]\ncommand = [\"sh\", \"{agent}\"]\n[effects]\npush = true\n"
    ));
    let submitted = h.submit("TR-1", "developer").await;
    let trace_parent = submitted
        .task
        .trace_parent
        .clone()
        .expect("a task gets a trace context at submit");
    let trace_id = baton::telemetry::trace_id_of(&trace_parent)
        .unwrap()
        .to_string();

    // First boot: the developer stage passes and the reviewer starts; the node stops.
    let (node, mut rx) = h.start(config.clone()).await;
    wait_for(&mut rx, |ev| match ev {
        ProbeEvent::Advancer {
            outcome: Ok(ClaimOutcome::Won(_)),
            ..
        } => Some(()),
        _ => None,
    })
    .await;
    wait_effects_settled(&mut rx, &h.db.store, "TR-1").await;
    let traceparent_file = h.root.join("traceparent-reviewer");
    while !traceparent_file.exists() {
        wait_for_activity(&mut rx).await;
    }
    node.shutdown().await;
    // Second boot: the reviewer is adopted and finishes here.
    let (node, mut rx) = h.start(config).await;
    std::fs::write(h.root.join("go"), "").unwrap();
    assert_eq!(
        crate::support::harness::wait_task_end(&mut rx).await,
        baton::model::TaskStatus::Done
    );
    wait_effects_settled(&mut rx, &h.db.store, "TR-1").await;
    node.shutdown().await;
    let _ = provider.force_flush();

    let spans = exporter.get_finished_spans().unwrap();
    let of_task: Vec<_> = spans
        .iter()
        .filter(|s| {
            s.attributes
                .iter()
                .any(|kv| kv.key.as_str() == "task" && kv.value.as_str() == "TR-1")
        })
        .collect();
    let names: HashSet<&str> = of_task.iter().map(|s| s.name.as_ref()).collect();
    for name in ["dispatch", "effect"] {
        assert!(names.contains(name), "no {name} span among {names:?}");
    }
    for s in &of_task {
        assert_eq!(
            s.span_context.trace_id().to_string(),
            trace_id,
            "span {} left the task's trace",
            s.name
        );
    }
    // The reviewer's claim was made by the second node (its agent finished only after
    // the restart): claims of both boots are in the trace.
    assert!(spans.iter().filter(|s| s.name == "claim").count() >= 2);
    // Spans without the task field (gate, auto-commit, the Advancer's claim) are in it too,
    // through their parents and through ractor's message span propagation.
    for name in ["gate", "auto_commit", "claim"] {
        let found: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
        assert!(!found.is_empty(), "no {name} span");
        for s in found {
            assert_eq!(
                s.span_context.trace_id().to_string(),
                trace_id,
                "{name} span left the task's trace"
            );
        }
    }
    // Each agent got TRACEPARENT of its run span.
    for stage in ["developer", "reviewer"] {
        let tp = std::fs::read_to_string(h.root.join(format!("traceparent-{stage}"))).unwrap();
        let tp = tp.trim();
        assert_eq!(
            baton::telemetry::trace_id_of(tp),
            Some(trace_id.as_str()),
            "{stage}: {tp}"
        );
    }
}

#[tokio::test]
async fn one_trace_per_task_sqlite() {
    if let Some(db) = TestDb::new(Backend::Sqlite).await {
        one_trace_per_task_across_actors_and_a_restart(db).await;
    }
}

#[tokio::test]
async fn one_trace_per_task_postgres() {
    if let Some(db) = TestDb::new(Backend::Postgres).await {
        one_trace_per_task_across_actors_and_a_restart(db).await;
    }
}

/// With `protocol = "http"`, spans go to `{endpoint}/v1/traces` as OTLP protobuf.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_http() {
    use opentelemetry::trace::Tracer;
    use wiremock::matchers::{header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/traces"))
        .and(header("content-type", "application/x-protobuf"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let settings = baton::config::TelemetrySettings {
        otlp_endpoint: Some(server.uri()),
        protocol: "http".into(),
        service_name: "baton-test".into(),
    };
    let (provider, _reader) = baton::telemetry::otlp_exporters(
        &settings,
        &server.uri(),
        opentelemetry_sdk::Resource::builder()
            .with_service_name("baton-test")
            .build(),
    )
    .unwrap();
    drop(provider.tracer("test").start("exported-span"));
    // The batch exporter's thread posts with a blocking client; flush waits for it.
    tokio::task::spawn_blocking(move || provider.force_flush())
        .await
        .unwrap()
        .unwrap();
    let requests = server.received_requests().await.unwrap();
    let posted = requests
        .iter()
        .find(|r| r.url.path() == "/v1/traces")
        .expect("no OTLP export");
    assert!(
        posted
            .body
            .windows(b"exported-span".len())
            .any(|w| w == b"exported-span"),
        "the span is not in the export"
    );
}

/// Logs an operator can read: each line carries its own task's fields only (no task's
/// span sits inside another's), JSON lines carry them as fields of their span, and text
/// written to a file or a pipe has no colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_log_line_carries_its_own_task_only() {
    let db = crate::support::TestDb::new(crate::support::Backend::Sqlite)
        .await
        .unwrap();
    let h = crate::support::harness::Harness::new(db);
    h.config(
        "[pipelines.default]\nstages = [\"one\", \"two\"]\n[stages.one]\ncommand = [\"sh\", \"-c\", \"echo 1 > one.txt\"]\n[stages.two]\ncommand = [\"sh\", \"-c\", \"echo 2 > two.txt\"]\n[effects]\npush = true\n",
    );
    let config = h.root.join("baton.toml");
    let mut lines_of = Vec::new();
    for (json, keys) in [(true, ["LOG-1", "LOG-2"]), (false, ["LOG-3", "LOG-4"])] {
        for key in keys {
            h.submit(key, "one").await;
        }
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_baton"));
        cmd.arg("--config").arg(&config);
        if json {
            cmd.arg("--log-json");
        }
        let log = h.root.join(format!("serve-{json}.log"));
        let serve = cmd
            .arg("serve")
            .env_remove("BATON_DATABASE_URL")
            .env_remove("DATABASE_URL")
            .env_remove("NO_COLOR")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        for key in keys {
            let t = crate::support::harness::task_end_elsewhere(&h.db.store, key).await;
            assert_eq!(t.status, baton::model::TaskStatus::Done);
        }
        crate::support::harness::stop_serve(serve);
        lines_of.push((json, keys, std::fs::read_to_string(&log).unwrap()));
    }
    for (json, keys, text) in lines_of {
        assert!(!text.contains('\x1b'), "colour codes in a file: {text}");
        let mut seen = std::collections::HashSet::new();
        for line in text.lines() {
            let tasks: std::collections::HashSet<String> = if json {
                let v: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
                let spans = v["spans"].as_array().cloned().unwrap_or_default();
                spans
                    .iter()
                    .chain([&v["span"], &v["fields"]])
                    .filter_map(|s| s["task"].as_str().map(str::to_string))
                    .collect()
            } else {
                keys.iter()
                    .filter(|k| line.contains(&format!("task={k}")))
                    .map(|k| k.to_string())
                    .collect()
            };
            assert!(tasks.len() <= 1, "a line of several tasks: {line}");
            seen.extend(tasks);
        }
        for key in keys {
            assert!(seen.contains(key), "no line of {key}: {text}");
        }
    }
}
