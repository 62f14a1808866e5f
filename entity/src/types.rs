//! The closed vocabularies of the schema: statuses, outcomes, kinds and sources. Each is
//! stored as its lower-case name in a text column (sea-orm's `DeriveActiveEnum`), so the
//! database reads the same as before and a typo does not compile.

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// Declares a string-backed enum with its database, serde and display names in one place.
macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum, Serialize,
            Deserialize,
        )]
        #[sea_orm(rs_type = "String", db_type = "Text")]
        pub enum $name {
            $(
                $(#[$vmeta])*
                #[sea_orm(string_value = $text)]
                #[serde(rename = $text)]
                $variant,
            )+
        }

        impl $name {
            /// The name stored in the database and shown to users.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(format!(
                        "{other:?} is not one of: {}",
                        [$($text),+].join(", ")
                    )),
                }
            }
        }
    };
}

string_enum! {
    /// The status of a task.
    TaskStatus {
        Active = "active",
        Done = "done",
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

string_enum! {
    /// The status of a job: `queued` -> `running` -> `done` | `failed` | `cancelled`; a
    /// failed attempt with attempts left goes back to `queued`.
    JobStatus {
        Queued = "queued",
        Running = "running",
        Done = "done",
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

string_enum! {
    /// How a run ended, as its winning claim (or a cancel) recorded it.
    RunOutcome {
        Passed = "passed",
        Rejected = "rejected",
        Failed = "failed",
        Lost = "lost",
        Timeout = "timeout",
        Cancelled = "cancelled",
    }
}

string_enum! {
    /// What an effect of the outbox does at a remote.
    EffectKind {
        Push = "push",
        PullRequest = "pull_request",
        PlaneComment = "plane_comment",
        PlaneState = "plane_state",
    }
}

impl EffectKind {
    /// A push or a pull request: what carries a task's work to the remote, so that the
    /// task is done only once they are.
    pub const fn is_delivery(self) -> bool {
        matches!(self, EffectKind::Push | EffectKind::PullRequest)
    }
}

string_enum! {
    /// The status of an effect.
    EffectStatus {
        Pending = "pending",
        Done = "done",
        Failed = "failed",
        /// Closed without being performed: the work it carried was lost with its host.
        Cancelled = "cancelled",
    }
}

string_enum! {
    /// Who decided a job's advance.
    AdvanceDecider {
        Monitor = "monitor",
        Reaper = "reaper",
        /// Sent a task back to a stage whose work was lost with its host.
        Recovery = "recovery",
    }
}

string_enum! {
    /// Who wrote an event: an actor of a node, or an entry point acting for a person.
    EventSource {
        Monitor = "monitor",
        Reaper = "reaper",
        Dispatcher = "dispatcher",
        Cli = "cli",
        Api = "api",
        Webhook = "webhook",
    }
}

string_enum! {
    /// What an event records.
    EventKind {
        TaskSubmitted = "task_submitted",
        JobQueued = "job_queued",
        RunStarted = "run_started",
        RunExited = "run_exited",
        RunAdopted = "run_adopted",
        ClaimWon = "claim_won",
        ClaimLost = "claim_lost",
        JobAdvanced = "job_advanced",
        RetryScheduled = "retry_scheduled",
        Reaped = "reaped",
        TaskDone = "task_done",
        TaskFailed = "task_failed",
        TaskCancelled = "task_cancelled",
        EffectDone = "effect_done",
        EffectFailed = "effect_failed",
        EffectRetried = "effect_retried",
        /// The last stage passed; the task is done once its pushes and pull request are.
        AwaitingDelivery = "awaiting_delivery",
        /// The work of a stage existed only on a dead host: the task went back to it.
        TaskRecovered = "task_recovered",
    }
}
