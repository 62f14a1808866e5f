//! What `baton status` lists, and the screens of `baton status --watch`.

use super::*;

/// How many ended tasks `baton status` shows after the active ones.
const STATUS_RECENT: u64 = 20;

/// The tasks `baton status` lists: the active ones and the last 20 others, newest first;
/// with `all`, every task, read a page at a time.
pub(super) async fn status_tasks(
    store: &Store,
    all: bool,
) -> anyhow::Result<Vec<crate::store::TaskSummary>> {
    use crate::model::TaskStatus;
    use crate::store::TaskFilter;
    let mut out = Vec::new();
    if all {
        let mut after = None;
        loop {
            let (page, next) = store.task_page(&TaskFilter::default(), 500, after).await?;
            out.extend(page);
            match next {
                Some(n) => after = Some(n),
                None => return Ok(out),
            }
        }
    }
    let active = TaskFilter {
        status: Some(TaskStatus::Active),
        ..Default::default()
    };
    let (active, _) = store.task_page(&active, u32::MAX.into(), None).await?;
    out.extend(active);
    let mut after = None;
    let mut ended = 0;
    // The newest tasks that are not active, a page at a time, until 20.
    while ended < STATUS_RECENT {
        let (page, next) = store
            .task_page(&TaskFilter::default(), STATUS_RECENT * 2, after)
            .await?;
        for t in page
            .into_iter()
            .filter(|t| t.task.status != TaskStatus::Active)
        {
            if ended < STATUS_RECENT {
                ended += 1;
                out.push(t);
            }
        }
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    out.sort_by_key(|t| std::cmp::Reverse(t.task.id));
    Ok(out)
}

/// One screen of `baton status --watch`.
pub async fn render_watch(
    store: &Store,
    key: Option<&TaskKey>,
    clock: &Clock,
) -> anyhow::Result<String> {
    let now = clock.now_ms();
    let mut out = format!(
        "baton status -- {} (Ctrl-C to stop)\n\n",
        present::fmt_time(now)
    );
    match key {
        Some(key) => out.push_str(&present::render_detail(
            &store.task_detail(key).await?,
            clock.now_ms(),
        )),
        None => out.push_str(&present::render_tasks(&status_tasks(store, false).await?)),
    }
    let running: Vec<_> = store
        .running_jobs()
        .await?
        .into_iter()
        .filter(|r| key.is_none_or(|k| r.task.key == k.as_str()))
        .collect();
    out.push_str(&present::render_running(&running, now));
    Ok(out)
}
