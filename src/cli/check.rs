//! The further checks of `baton config check`: Plane's state names, the remote, and the
//! in-flight tasks a config would orphan.

use super::*;

/// A line of a check's report: on standard output, or on standard error when standard
/// output carries a JSON document.
fn say(json: bool, line: String) {
    if json {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

/// With Plane configured and reachable, every state name the config uses must exist in
/// the project; when Plane cannot be asked, says so and goes on.
pub(super) async fn check_plane_states(config: &Config, json: bool) -> anyhow::Result<()> {
    let Some(plane) = &config.plane else {
        return Ok(());
    };
    let secrets = crate::config::Secrets::from_env(config);
    let Some(key) = secrets.plane_api_key.as_deref() else {
        say(
            json,
            format!(
                "# ${} is not set: Plane state names were not checked",
                plane.api_key_env
            ),
        );
        return Ok(());
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default();
    let states = match crate::effects::plane::list_states(&http, plane, key).await {
        Ok(states) => states,
        Err(e) => {
            say(
                json,
                format!(
                    "# Plane at {} could not be asked ({e}): state names were not checked",
                    plane.api_url
                ),
            );
            return Ok(());
        }
    };
    let names: Vec<&str> = states.iter().map(|s| s.name.as_str()).collect();
    let mut wanted = vec![
        ("plane.trigger_state", plane.trigger_state.as_deref()),
        ("plane.states.on_start", plane.states.on_start.as_deref()),
        ("plane.states.on_done", plane.states.on_done.as_deref()),
        ("plane.states.on_failed", plane.states.on_failed.as_deref()),
    ];
    wanted.extend(
        plane
            .cancel_states
            .iter()
            .map(|s| ("plane.cancel_states", Some(s.as_str()))),
    );
    let missing: Vec<String> = wanted
        .iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .filter(|(_, v)| !names.iter().any(|n| n.eq_ignore_ascii_case(v)))
        .map(|(k, v)| format!("  - {k}: Plane has no state named {v:?}"))
        .collect();
    if missing.is_empty() {
        say(
            json,
            format!(
                "# Plane state names checked against the project: all {} exist",
                names.len()
            ),
        );
        return Ok(());
    }
    anyhow::bail!(
        "unknown Plane state names (the project has: {}):\n{}",
        names.join(", "),
        missing.join("\n")
    )
}

/// Reaches repo.url as a node would: its credentials, its network timeout.
pub(super) async fn check_remote(config: &Config, json: bool) -> anyhow::Result<()> {
    crate::workspace::set_network_timeout(config.repo.network_timeout);
    let access = config.repo_access(&crate::config::Secrets::from_env(config));
    let base = config.repo.base_branch.clone();
    let heads = tokio::task::spawn_blocking(move || crate::workspace::ls_remote(&access))
        .await?
        .map_err(|e| anyhow::anyhow!("repo.url {} cannot be reached: {e}", config.repo.url))?;
    if !heads.iter().any(|h| h == &format!("refs/heads/{base}")) {
        anyhow::bail!(
            "repo.url {} is reachable but has no branch {base} (repo.base_branch)",
            config.repo.url
        );
    }
    say(
        json,
        format!(
            "# repo.url {} is reachable: {} branch(es), {base} among them",
            config.repo.url,
            heads
                .iter()
                .filter(|h| h.starts_with("refs/heads/"))
                .count()
        ),
    );
    Ok(())
}

/// The in-flight tasks this config would orphan, when the database can be asked.
pub(super) async fn check_orphans(config: &Config, json: bool) -> anyhow::Result<()> {
    // A check must not create an SQLite file that does not exist yet.
    if let Some(rest) = config.database_url.strip_prefix("sqlite://") {
        let file = rest.split('?').next().unwrap_or_default();
        if !file.is_empty() && !file.starts_with(':') && !Path::new(file).exists() {
            say(
                json,
                format!("# no database at {file} yet: no in-flight task to check"),
            );
            return Ok(());
        }
    }
    let store = match tokio::time::timeout(
        Duration::from_secs(10),
        Store::open_current(&config.database_url),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            say(
                json,
                format!("# in-flight tasks were not checked against this config: {e}"),
            );
            return Ok(());
        }
        Err(_) => {
            say(
                json,
                "# in-flight tasks were not checked: the database did not answer in 10s"
                    .to_string(),
            );
            return Ok(());
        }
    };
    let orphans = tasks::orphans(&store, config).await?;
    if orphans.is_empty() {
        say(
            json,
            "# every in-flight task's pipeline and stage are in this config".to_string(),
        );
        return Ok(());
    }
    anyhow::bail!(
        "this config orphans {} in-flight task(s):\n{}\n`baton serve` refuses it; restore the pipeline or stage, or start with `--orphaned fail` to fail them",
        orphans.len(),
        orphans
            .iter()
            .map(|o| format!("  - {}: {}", o.key, o.reason))
            .collect::<Vec<_>>()
            .join("\n")
    )
}
