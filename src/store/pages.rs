//! The reads an operator polls, which must not grow with history: a page of tasks by
//! cursor, newest first, and the counts by status from one aggregate.

use std::collections::BTreeMap;

use entity::{jobs, tasks};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};

use super::tasks::{LIVE, TaskSummary};
use super::{Store, StoreResult};
use crate::model::TaskStatus;

/// Which tasks a page lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskFilter {
    pub status: Option<TaskStatus>,
    pub pipeline: Option<String>,
    /// Tasks with a queued or running job of this stage.
    pub stage: Option<String>,
    /// Keys that start with this.
    pub key_prefix: Option<String>,
}

impl Store {
    /// A page of tasks with their jobs, newest first: those with an id below `after`
    /// (the previous page's cursor) that match `filter`, at most `limit`; with the
    /// cursor of the next page when there is one. Costs one page, whatever the history.
    pub async fn task_page(
        &self,
        filter: &TaskFilter,
        limit: u64,
        after: Option<i64>,
    ) -> StoreResult<(Vec<TaskSummary>, Option<i64>)> {
        use sea_orm::sea_query::{LikeExpr, Query};
        let mut q = tasks::Entity::find().order_by_desc(tasks::Column::Id);
        if let Some(after) = after {
            q = q.filter(tasks::Column::Id.lt(after));
        }
        if let Some(status) = filter.status {
            q = q.filter(tasks::Column::Status.eq(status));
        }
        if let Some(pipeline) = &filter.pipeline {
            q = q.filter(tasks::Column::Pipeline.eq(pipeline.as_str()));
        }
        if let Some(stage) = &filter.stage {
            // Tasks at that stage now: a queued or running job of it.
            let at = Query::select()
                .column(jobs::Column::TaskId)
                .from(jobs::Entity)
                .and_where(jobs::Column::Stage.eq(stage.as_str()))
                .and_where(jobs::Column::Status.is_in(LIVE))
                .to_owned();
            q = q.filter(tasks::Column::Id.in_subquery(at));
        }
        if let Some(prefix) = &filter.key_prefix {
            let escaped = prefix
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            let like = LikeExpr::new(format!("{escaped}%")).escape('\\');
            q = q.filter(tasks::Column::Key.like(like));
        }
        let mut tasks = q.limit(limit + 1).all(&self.db).await?;
        let next = (tasks.len() as u64 > limit).then(|| {
            tasks.truncate(limit as usize);
            tasks.last().map(|t| t.id)
        });
        if let Some(prefix) = &filter.key_prefix {
            // SQLite's LIKE ignores ASCII case; keys do not.
            tasks.retain(|t| t.key.starts_with(prefix.as_str()));
        }
        Ok((self.with_jobs(tasks).await?, next.flatten()))
    }

    /// How many tasks there are of each status, counted by the database.
    pub async fn task_counts(&self) -> StoreResult<BTreeMap<String, i64>> {
        let rows: Vec<(TaskStatus, i64)> = tasks::Entity::find()
            .select_only()
            .column(tasks::Column::Status)
            .column_as(tasks::Column::Id.count(), "n")
            .group_by(tasks::Column::Status)
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(rows.into_iter().map(|(s, n)| (s.to_string(), n)).collect())
    }
}
