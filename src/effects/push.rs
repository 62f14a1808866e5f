//! Pushing a task's branch to `repo.url` with git2, with the credentials of
//! [`RepoAccess`] (each offered once; a refusal is final) and within
//! `repo.network_timeout`. A rejected update (a non-fast-forward, a hook) is an error naming the
//! branch, never a silent success.

use std::cell::{Cell, RefCell};
use std::path::Path;

use git2::{PushOptions, Repository};

use super::EffectError;
use crate::workspace::RepoAccess;

/// Pushes `refs/heads/{branch}` of the workspace at `ws` to `url`; returns the pushed
/// commit.
pub fn push_branch(ws: &Path, access: &RepoAccess, branch: &str) -> Result<String, EffectError> {
    let url = access.url.as_str();
    let repo = Repository::open(ws).map_err(|e| {
        EffectError::Permanent(format!(
            "cannot open the workspace {} to push {branch}: {e}",
            ws.display()
        ))
    })?;
    let refname = format!("refs/heads/{branch}");
    let head = repo
        .revparse_single(&refname)
        .and_then(|o| o.peel_to_commit())
        .map_err(|e| {
            EffectError::Permanent(format!("branch {branch} is not in the workspace: {e}"))
        })?
        .id()
        .to_string();
    let mut remote = repo
        .remote_anonymous(url)
        .map_err(|e| EffectError::Permanent(format!("cannot use remote {url}: {e}")))?;

    let next = Cell::new(0);
    let rejected: RefCell<Option<String>> = RefCell::new(None);
    let mut callbacks = access.callbacks(&next);
    callbacks.push_update_reference(|name, status| {
        if let Some(msg) = status {
            *rejected.borrow_mut() = Some(format!("{name}: {msg}"));
        }
        Ok(())
    });
    let mut opts = PushOptions::new();
    opts.remote_callbacks(callbacks);
    let spec = format!("{refname}:{refname}");
    let pushed = remote.push(&[spec.as_str()], Some(&mut opts));
    drop(opts);
    if let Some(why) = rejected.into_inner() {
        return Err(EffectError::Permanent(format!(
            "push of {branch} to {url} was rejected: {why}"
        )));
    }
    match pushed {
        Ok(()) => Ok(head),
        Err(e) => {
            let msg = e.message().to_string();
            let non_ff = msg.contains("non-fast-forward")
                || msg.contains("fastforwardable")
                || msg.contains("not present locally");
            let permanent = non_ff
                || msg.contains("refused every credential")
                || e.class() == git2::ErrorClass::Reference;
            let text = if non_ff {
                format!(
                    "push of {branch} to {url} was rejected as a non-fast-forward: \
                     the remote branch has commits the workspace does not ({msg})"
                )
            } else {
                format!("push of {branch} to {url} failed: {msg}")
            };
            Err(if permanent {
                EffectError::Permanent(text)
            } else {
                EffectError::transient(text)
            })
        }
    }
}
