//! How baton reaches the repository's remote: credentials for fetch and push alike, and
//! the bound on every network operation.
//!
//! Credentials are offered in this order, each once (a refusal is final, never a loop):
//! an ssh key file (`repo.ssh_key`), the ssh agent, a token for https
//! (`repo.token_env`, else the forge token), and the user's git credential helper.

use std::cell::Cell;
use std::path::PathBuf;
use std::time::Duration;

use git2::{Cred, CredentialType, RemoteCallbacks};

/// What a remote operation may use to get in.
#[derive(Clone, Default)]
pub struct RepoAccess {
    /// `repo.url`.
    pub url: String,
    /// A private key file for ssh remotes.
    pub ssh_key: Option<PathBuf>,
    /// A token for https remotes.
    pub token: Option<String>,
}

impl std::fmt::Debug for RepoAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoAccess")
            .field("url", &self.url)
            .field("ssh_key", &self.ssh_key)
            .field("token", &self.token.as_ref().map(|_| "set"))
            .finish()
    }
}

impl RepoAccess {
    /// Remote callbacks that answer credential requests from this access, each way at
    /// most once: `next` remembers, across the requests of one operation, which way to
    /// offer next.
    pub fn callbacks<'a>(&'a self, next: &'a Cell<usize>) -> RemoteCallbacks<'a> {
        let mut cb = RemoteCallbacks::new();
        cb.credentials(move |url, username, allowed| {
            let user = username.unwrap_or("git");
            let ssh = allowed.contains(CredentialType::SSH_KEY);
            let https = allowed.contains(CredentialType::USER_PASS_PLAINTEXT);
            while next.get() < 4 {
                let way = next.get();
                next.set(way + 1);
                let cred = match way {
                    0 if ssh => self.ssh_key.as_ref().map(|k| Cred::ssh_key(user, None, k, None)),
                    1 if ssh => Some(Cred::ssh_key_from_agent(user)),
                    2 if https => self
                        .token
                        .as_ref()
                        .map(|t| Cred::userpass_plaintext("x-access-token", t)),
                    // No helper, or one that knows nothing: the next way (a refusal).
                    3 if https => git2::Config::open_default()
                        .and_then(|config| Cred::credential_helper(&config, url, username))
                        .ok()
                        .map(Ok),
                    _ => None,
                };
                if let Some(cred) = cred {
                    return cred;
                }
            }
            Err(git2::Error::from_str(
                "the remote refused every credential baton has (repo.ssh_key, the ssh agent, repo.token_env, the git credential helper)",
            ))
        });
        cb
    }
}

/// Bounds every network operation of git (clone, fetch, push): connecting, and each read
/// or write of the connection. A hung remote fails the operation after this long.
pub fn set_network_timeout(timeout: Duration) {
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: libgit2 reads these process-wide options under its own lock; they are set
    // before any operation that uses them and only ever to a plain number.
    unsafe {
        let _ = git2::opts::set_server_connect_timeout_in_milliseconds(ms);
        let _ = git2::opts::set_server_timeout_in_milliseconds(ms);
    }
}
