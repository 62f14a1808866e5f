//! Finished history for the read benchmark (`baton bench --history`): tasks that went
//! through a four-stage pipeline, with their jobs, runs, events and effects, written in
//! batches. Not used by the service.

use entity::{agent_runs, effects, events, jobs, tasks};
use sea_orm::{ActiveValue::NotSet, EntityTrait, Set};

use super::{Store, StoreResult};
use crate::model::{
    EffectKind, EffectStatus, EventKind, EventSource, JobStatus, RunOutcome, TaskStatus,
};

const STAGES: [&str; 4] = ["s1", "s2", "s3", "s4"];
/// Tasks written per transaction.
const SEED_BATCH: usize = 250;

impl Store {
    /// Refreshes the planner's statistics (`ANALYZE`), as autovacuum would have after a
    /// history grown over months rather than written at once.
    pub async fn analyze(&self) -> StoreResult<()> {
        use sea_orm::ConnectionTrait;
        let (_write, db) = self.lock_writes().await;
        db.execute_unprepared("ANALYZE").await?;
        Ok(())
    }

    /// Writes `count` done tasks (keys `HIST-{first}` on), each with four done jobs, a
    /// passed run and three events per job, and a done push per run.
    pub async fn seed_history(&self, first: usize, count: usize, now: i64) -> StoreResult<()> {
        let mut next = first;
        while next < first + count {
            let n = SEED_BATCH.min(first + count - next);
            let (_write, txn) = self.write_txn().await?;
            let task_rows = (next..next + n).map(|i| tasks::ActiveModel {
                id: NotSet,
                key: Set(format!("HIST-{i}")),
                pipeline: Set("default".into()),
                title: Set(format!("Finished task {i}")),
                description: Set(None),
                plane_issue_id: Set(None),
                status: Set(TaskStatus::Done),
                trace_parent: Set(None),
                created_at: Set(now - 3_600_000),
                updated_at: Set(now - 60_000),
                history_pruned_at: Set(None),
            });
            tasks::Entity::insert_many(task_rows).exec(&txn).await?;
            let keys: Vec<String> = (next..next + n).map(|i| format!("HIST-{i}")).collect();
            let ids: Vec<i64> = {
                use sea_orm::{ColumnTrait, QueryFilter, QuerySelect};
                tasks::Entity::find()
                    .select_only()
                    .column(tasks::Column::Id)
                    .filter(tasks::Column::Key.is_in(keys))
                    .into_tuple()
                    .all(&txn)
                    .await?
            };
            let mut job_rows = Vec::new();
            for id in &ids {
                for stage in STAGES {
                    job_rows.push(jobs::ActiveModel {
                        task_id: Set(*id),
                        stage: Set(stage.into()),
                        iteration: Set(1),
                        status: Set(JobStatus::Done),
                        attempt: Set(1),
                        current_run_id: Set(None),
                        not_before: Set(now),
                        feedback: Set(None),
                        created_at: Set(now),
                        updated_at: Set(now),
                        ..Default::default()
                    });
                }
            }
            jobs::Entity::insert_many(job_rows).exec(&txn).await?;
            let job_ids: Vec<(i64, i64)> = {
                use sea_orm::{ColumnTrait, QueryFilter, QuerySelect};
                jobs::Entity::find()
                    .select_only()
                    .column(jobs::Column::Id)
                    .column(jobs::Column::TaskId)
                    .filter(jobs::Column::TaskId.is_in(ids.clone()))
                    .into_tuple()
                    .all(&txn)
                    .await?
            };
            let run_rows = job_ids.iter().map(|(job, _)| agent_runs::ActiveModel {
                job_id: Set(*job),
                attempt: Set(1),
                node_id: Set("bench".into()),
                pid: Set(Some(1)),
                started_at: Set(now - 120_000),
                heartbeat_at: Set(now - 60_000),
                exit_code: Set(Some(0)),
                exited_at: Set(Some(now - 60_000)),
                outcome: Set(Some(RunOutcome::Passed)),
                log_path: Set(format!("/var/lib/baton/logs/{job}.log")),
                commit_sha: Set(Some(format!("{job:040x}"))),
                ..Default::default()
            });
            agent_runs::Entity::insert_many(run_rows).exec(&txn).await?;
            let mut event_rows = Vec::new();
            let mut effect_rows = Vec::new();
            for (job, task) in &job_ids {
                for kind in [
                    EventKind::JobQueued,
                    EventKind::RunStarted,
                    EventKind::ClaimWon,
                ] {
                    event_rows.push(events::ActiveModel {
                        task_id: Set(*task),
                        job_id: Set(Some(*job)),
                        run_id: Set(None),
                        kind: Set(kind),
                        source: Set(EventSource::Monitor),
                        detail: Set("{}".into()),
                        at: Set(now - 60_000),
                        ..Default::default()
                    });
                }
                effect_rows.push(effects::ActiveModel {
                    task_id: Set(*task),
                    run_id: Set(*job),
                    kind: Set(EffectKind::Push),
                    idempotency_key: Set(format!("seed-push:{job}")),
                    status: Set(EffectStatus::Done),
                    attempts: Set(1),
                    next_attempt_at: Set(now),
                    last_error: Set(None),
                    external_ref: Set(None),
                    payload: Set("{}".into()),
                    created_at: Set(now),
                    updated_at: Set(now),
                    host: Set(None),
                    ..Default::default()
                });
            }
            for chunk in event_rows.chunks(1000) {
                events::Entity::insert_many(chunk.to_vec())
                    .exec(&txn)
                    .await?;
            }
            effects::Entity::insert_many(effect_rows).exec(&txn).await?;
            txn.commit().await?;
            next += n;
        }
        Ok(())
    }
}
