//! A private git remote over smart HTTP on 127.0.0.1: git's own `git http-backend`
//! behind a listener that, like a forge, answers 401 with a Basic challenge unless the
//! request carries the expected password (a token), and lets a push through only then.
//!
//! Two switches, files in the served folder that anything (an agent, the test) can make
//! or remove: with `outage`, every push is answered 503 (fetches still work); with
//! `hold`, a push is held until the file goes, then answered 503 (it never reaches the
//! repository).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use base64::Engine;
use tokio::io::AsyncWriteExt;

struct Remote {
    root: PathBuf,
    token: String,
}

/// A running private remote; dropped with its test.
pub struct GitHttp {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GitHttp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GitHttp {
    /// Serves the bare repositories under `root` (as `http://ADDR/NAME.git`), to clients
    /// whose Basic credentials carry `token` as the password.
    pub async fn start(root: &Path, token: &str) -> GitHttp {
        let state = Arc::new(Remote {
            root: root.to_path_buf(),
            token: token.to_string(),
        });
        let app = axum::Router::new().fallback(handle).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        GitHttp { addr, task }
    }

    pub fn url(&self, repo: &str) -> String {
        format!("http://{}/{repo}", self.addr)
    }
}

fn authorized(headers: &HeaderMap, token: &str) -> Option<String> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let (user, password) = String::from_utf8(decoded)
        .ok()?
        .split_once(':')
        .map(|(u, p)| (u.to_string(), p.to_string()))?;
    (password == token).then_some(user)
}

async fn handle(
    State(remote): State<Arc<Remote>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let unavailable = || {
        Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .body(Body::from("the remote is down\n"))
            .unwrap()
    };
    let push = uri.path().ends_with("git-receive-pack")
        || uri.query().is_some_and(|q| q.contains("git-receive-pack"));
    if push && remote.root.join("outage").exists() {
        return unavailable();
    }
    if push && remote.root.join("hold").exists() {
        while remote.root.join("hold").exists() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        return unavailable();
    }
    let Some(user) = authorized(&headers, &remote.token) else {
        return Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header("WWW-Authenticate", "Basic realm=\"private\"")
            .body(Body::from("authentication required\n"))
            .unwrap();
    };
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("http-backend")
        .env("GIT_PROJECT_ROOT", &remote.root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", uri.path())
        .env("QUERY_STRING", uri.query().unwrap_or(""))
        .env("REQUEST_METHOD", method.as_str())
        .env("REMOTE_USER", &user)
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("CONTENT_LENGTH", body.len().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (name, var) in [
        ("content-type", "CONTENT_TYPE"),
        ("content-encoding", "HTTP_CONTENT_ENCODING"),
        ("git-protocol", "GIT_PROTOCOL"),
    ] {
        if let Some(v) = headers.get(name).and_then(|v| v.to_str().ok()) {
            cmd.env(var, v);
        }
    }
    let mut child = cmd.spawn().expect("git http-backend");
    let mut stdin = child.stdin.take().unwrap();
    let feed = tokio::spawn(async move {
        let _ = stdin.write_all(&body).await;
    });
    let out = child
        .wait_with_output()
        .await
        .expect("git http-backend output");
    let _ = feed.await;
    cgi_response(&out.stdout)
}

/// A CGI answer (headers, a blank line, the body) as an HTTP response.
fn cgi_response(raw: &[u8]) -> Response {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)));
    let Some((at, sep)) = split else {
        return Response::builder()
            .status(StatusCode::BAD_GATEWAY)
            .body(Body::from("git http-backend answered nothing"))
            .unwrap();
    };
    let head = String::from_utf8_lossy(&raw[..at]).to_string();
    let mut response = Response::builder();
    let mut status = StatusCode::OK;
    for line in head.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split_whitespace().next().and_then(|c| c.parse().ok());
            status = code
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(status);
        } else {
            response = response.header(name.trim(), value);
        }
    }
    response
        .status(status)
        .body(Body::from(raw[at + sep..].to_vec()))
        .unwrap()
}
