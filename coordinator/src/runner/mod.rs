//! The seam between the engine and whatever runs a stage: [`StageRunner`].
//!
//! The driver hands a runner an [`Assignment`] and gets one ordered stream of
//! [`RunnerMessage`]s back per run: the attempt's steps as they happen, ending with exactly
//! one [`RunnerEvent::Ended`]. A `MigrationStarted` step is the persist-then-act gate: the
//! runner sends nothing for that migration to the target until the driver, having recorded the
//! step durably, calls [`StageRunner::ack_started`].
//!
//! Two runners implement it: [`in_process::InProcessRunner`] (local mode: the executor in this
//! process, the only module of this crate that names the agent crate) and
//! [`remote::AgentRegistry`] (distributed mode: attempts go over gRPC to an attached agent
//! whose labels match the stage's `runs_on`). There is one driver for both.

pub mod in_process;
pub mod remote;

use std::collections::BTreeMap;
use std::fmt;

use baton_common::stage::{Assignment, AttemptId, StageEvent, StageReport};
use tokio::sync::mpsc;

/// Which runners may take a stage: labels a runner must have, each with this value
/// (`runs_on`, templates rendered). Empty: any runner.
pub type Selector = BTreeMap<String, String>;

/// What a runner reports about an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum RunnerEvent {
    /// Nothing can take the attempt yet; the text says why (shown in the live view).
    Waiting(String),
    /// The attempt went to `runner` (an agent id, or `local`).
    Placed { runner: String },
    /// A step of the attempt, in the order it happened.
    Step(StageEvent),
    /// The runner lost the attempt (its agent's lease ran out, or the agent gave it up)
    /// without a result; what it did before is in the steps already reported. Nothing more
    /// comes for it. The driver calls [`StageRunner::ack_ended`] once it recorded the loss.
    Lost(String),
    /// A message from an attempt that is no longer the stage's live one (older fencing
    /// token, or declared lost) arrived and was rejected; the text says why. Recorded, never
    /// applied.
    Stale(String),
    /// The attempt ended; nothing more comes for it. The driver calls
    /// [`StageRunner::ack_ended`] once the result is recorded.
    Ended(StageReport),
}

/// One report, naming its attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct RunnerMessage {
    pub attempt: AttemptId,
    pub event: RunnerEvent,
}

/// Starts, gates and stops stage attempts. Calls never block: work happens on the runner's
/// own tasks and comes back on the `events` channel given to [`StageRunner::start`].
pub trait StageRunner: Send + Sync + fmt::Debug {
    /// Starts an attempt on a runner matching `selector` (waiting for one when none matches
    /// or all are busy). Everything about it arrives on `events`, ending with `Ended`.
    fn start(
        &self,
        assignment: Assignment,
        selector: Selector,
        events: mpsc::Sender<RunnerMessage>,
    );

    /// After a coordinator restart: `attempt` was running when the coordinator stopped; the
    /// runner reports on it to `events` if whatever holds it comes back in time, else
    /// reports it lost. A runner that cannot hold attempts across restarts reports it lost
    /// at once.
    fn adopt(&self, attempt: &AttemptId, events: mpsc::Sender<RunnerMessage>) {
        let lost = RunnerMessage {
            attempt: attempt.clone(),
            event: RunnerEvent::Lost("nothing holds it after the restart".to_owned()),
        };
        let _ = events.try_send(lost);
    }

    /// The driver durably recorded that migration `version` of `attempt` started: the runner
    /// may now send its first request.
    fn ack_started(&self, attempt: &AttemptId, version: u64);

    /// The driver durably recorded the attempt's result: the runner may forget it.
    fn ack_ended(&self, attempt: &AttemptId);

    /// Stops the attempt as soon as possible (command steps: their whole process group). It
    /// still ends with `Ended` (usually cancelled).
    fn cancel(&self, attempt: &AttemptId);
}

/// Whether `labels` satisfy `selector`.
pub fn matches(selector: &Selector, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// `region=westeurope, env=prod`, for messages.
pub fn describe(selector: &Selector) -> String {
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}
