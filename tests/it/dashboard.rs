//! The dashboard in headless Chromium, against a real `baton serve`: it shows a running
//! and a finished task, and updates without a reload when the running one finishes.
//!
//! Chromium is driven over the DevTools protocol. It is Debian's `chromium` package
//! (`BATON_CHROMIUM` names another binary); `.ci/run` installs it when missing. Without
//! it the test says it was skipped, except under CI, where it fails.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::support::harness::Harness;
use crate::support::{Backend, TestDb};

/// How long the test waits for the page or the service to reach a state.
const WAIT: Duration = Duration::from_secs(60);

fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BATON_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A DevTools session on one page.
struct Page {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl Page {
    async fn eval(&mut self, expression: &str) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": "Runtime.evaluate", "params": {"expression": expression, "returnByValue": true}});
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .unwrap();
        loop {
            let Some(Ok(Message::Text(text))) = self.ws.next().await else {
                panic!("the DevTools connection closed");
            };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == id {
                return v["result"]["result"]["value"].clone();
            }
        }
    }

    /// Evaluates `expression` until it is `true`.
    async fn wait_until(&mut self, expression: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            if self.eval(expression).await == Value::Bool(true) {
                return;
            }
            let text = self
                .eval("document.body ? document.body.innerText : ''")
                .await;
            assert!(
                Instant::now() < deadline,
                "the page never satisfied {expression}; it shows:\n{text}"
            );
            // Waiting on the browser, which no probe can report.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_tasks_and_updates_without_a_reload() {
    let Some(browser) = chromium() else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!(
                "Chromium is required under CI (apt-get install chromium, or set BATON_CHROMIUM)"
            );
        }
        eprintln!(
            "SKIPPED the dashboard browser test: no Chromium found (install Debian's chromium or set BATON_CHROMIUM)"
        );
        return;
    };
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let h = Harness::new(db);
    let agent = h.agent(
        "agent",
        r#"if [ "$BATON_TASK" = DASH-2 ]; then
  while [ ! -f "$BATON_WORKSPACE/../../go" ]; do sleep 0.05; done
fi
if [ "$BATON_TASK" = DASH-3 ]; then echo "DASH-3 cannot be done"; exit 1; fi
echo done"#,
    );
    let port = free_port();
    // The config file is what `baton serve` reads; only its port changes.
    h.config(&format!(
        "[pipelines.default]\nstages = [\"developer\", \"reviewer\"]\n[stages.developer]\ncommand = [\"sh\", \"{agent}\"]\n[stages.reviewer]\ncommand = [\"true\"]\n"
    ));
    let toml = std::fs::read_to_string(h.root.join("baton.toml"))
        .unwrap()
        .replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
        );
    std::fs::write(h.root.join("baton.toml"), toml).unwrap();

    let _serve = Killed(
        Command::new(env!("CARGO_BIN_EXE_baton"))
            .args([
                "--config",
                h.root.join("baton.toml").to_str().unwrap(),
                "serve",
                "--stop-agents",
            ])
            .env("BATON_LOG", "warn")
            .env_remove("BATON_DATABASE_URL")
            .env_remove("DATABASE_URL")
            .spawn()
            .unwrap(),
    );
    h.submit("DASH-1", "developer").await;
    h.submit("DASH-2", "developer").await;
    h.submit("DASH-3", "developer").await;
    let status = |key: &'static str| {
        let store = h.db.store.clone();
        async move {
            store
                .task_by_key(&crate::support::key(key))
                .await
                .unwrap()
                .status
        }
    };
    let deadline = Instant::now() + WAIT;
    while status("DASH-1").await != baton::model::TaskStatus::Done
        || status("DASH-3").await != baton::model::TaskStatus::Failed
    {
        assert!(Instant::now() < deadline, "DASH-1 or DASH-3 never ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let profile = tempfile::tempdir().unwrap();
    let _chromium = Killed(
        Command::new(&browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Chromium says where DevTools listens in a file of its profile.
    let active = profile.path().join("DevToolsActivePort");
    let deadline = Instant::now() + WAIT;
    let devtools_port = loop {
        if let Some(port) = std::fs::read_to_string(&active)
            .ok()
            .and_then(|s| s.lines().next().map(str::to_string))
        {
            break port;
        }
        assert!(Instant::now() < deadline, "Chromium did not start DevTools");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let target: Value = reqwest::Client::new()
        .put(format!(
            "http://127.0.0.1:{devtools_port}/json/new?http://127.0.0.1:{port}/"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (ws, _) =
        tokio_tungstenite::connect_async(target["webSocketDebuggerUrl"].as_str().unwrap())
            .await
            .unwrap();
    let mut page = Page { ws, next_id: 0 };

    let task_status = |key: &str, status: &str| {
        format!(
            "(document.querySelector('[data-task=\"{key}\"]') || {{}}).textContent === '{status}'"
        )
    };
    page.wait_until(&task_status("DASH-1", "done")).await;
    page.wait_until(&task_status("DASH-2", "active")).await;
    page.wait_until("document.getElementById('running').innerText.includes('DASH-2')")
        .await;
    let loaded_at = page.eval("window.batonLoadedAt").await;
    assert!(loaded_at.is_number(), "{loaded_at}");

    // The running task finishes; the page follows without being reloaded.
    std::fs::write(h.root.join("go"), "").unwrap();
    page.wait_until(&task_status("DASH-2", "done")).await;
    page.wait_until("document.getElementById('running').innerText.includes('no agent is running')")
        .await;
    assert_eq!(
        page.eval("window.batonLoadedAt").await,
        loaded_at,
        "the page was reloaded"
    );
    let refreshes = page.eval("window.batonRefreshes").await.as_u64().unwrap();
    assert!(refreshes >= 2, "{refreshes} refreshes");
    assert_eq!(status("DASH-2").await, baton::model::TaskStatus::Done);

    // The list of all tasks filters by status, through the API's pages.
    page.eval("document.getElementById('f-status').value = 'failed'; document.querySelector('#filters button').click()")
        .await;
    page.wait_until("document.getElementById('list').innerText.includes('DASH-3') && !document.getElementById('list').innerText.includes('DASH-1')")
        .await;

    // A failed task's page says why, and its retry button re-queues it.
    page.wait_until(&task_status("DASH-3", "failed")).await;
    page.eval("document.querySelector('[data-open=\"DASH-3\"]').click()")
        .await;
    page.wait_until(
        "document.getElementById('detail-body').innerText.includes('failed: attempt 3 of 3')",
    )
    .await;
    page.wait_until(
        "document.getElementById('log-tail').innerText.includes('DASH-3 cannot be done')",
    )
    .await;
    let jobs_before =
        h.db.store
            .jobs_of(
                h.db.store
                    .task_by_key(&crate::support::key("DASH-3"))
                    .await
                    .unwrap()
                    .id,
            )
            .await
            .unwrap()
            .len();
    page.eval("document.querySelector('[data-act=\"retry\"]').click()")
        .await;
    page.wait_until("document.getElementById('action').innerText === 'retry DASH-3: done'")
        .await;
    let task =
        h.db.store
            .task_by_key(&crate::support::key("DASH-3"))
            .await
            .unwrap();
    let jobs_after = h.db.store.jobs_of(task.id).await.unwrap().len();
    assert_eq!(jobs_after, jobs_before + 1, "the retry queued no job");
    assert_eq!(
        page.eval("window.batonLoadedAt").await,
        loaded_at,
        "the action reloaded the page"
    );
}
