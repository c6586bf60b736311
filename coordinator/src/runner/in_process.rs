//! Local mode's runner: each attempt runs on the executor inside this process, with this
//! process's environment. The only module of the coordinator that names the agent crate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use baton_agent::assignment::{run_reporting, Gates, Host};
use baton_common::stage::{Assignment, AttemptId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{RunnerEvent, RunnerMessage, Selector, StageRunner};

/// The runner name [`RunnerEvent::Placed`] carries for in-process attempts.
pub const LOCAL: &str = "local";

/// Runs attempts in-process. `runs_on` is ignored: this process is the only runner.
#[derive(Debug, Clone)]
pub struct InProcessRunner {
    host: Arc<Host>,
    /// Migration starts waiting for the driver's acknowledgement.
    gates: Gates,
    /// Each running attempt's cancel token.
    cancels: Arc<Mutex<HashMap<AttemptId, CancellationToken>>>,
    /// Owns every attempt task.
    tasks: TaskTracker,
}

impl InProcessRunner {
    /// `env` is this process's environment (the source of `valueFromEnv`).
    /// The HTTP client most stages use is built ahead, in the background.
    pub fn new(env: std::collections::BTreeMap<String, String>) -> Self {
        InProcessRunner {
            host: Arc::new(Host {
                env: Arc::new(env.into()),
                user_agent: String::new(),
                workspace: None,
                clients: baton_agent::client::ClientCache::building_default(""),
            }),
            gates: Gates::default(),
            cancels: Arc::default(),
            tasks: TaskTracker::new(),
        }
    }

    fn cancels(&self) -> std::sync::MutexGuard<'_, HashMap<AttemptId, CancellationToken>> {
        // A poisoned lock only means a panic elsewhere; the map is still consistent.
        self.cancels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl StageRunner for InProcessRunner {
    fn start(&self, a: Assignment, _selector: Selector, events: mpsc::Sender<RunnerMessage>) {
        let id = a.attempt.clone();
        let cancel = CancellationToken::new();
        self.cancels().insert(id.clone(), cancel.clone());
        let this = self.clone();
        self.tasks.spawn(async move {
            let send = |event| {
                let events = events.clone();
                let attempt = id.clone();
                async move {
                    // A closed channel means the run's driver is gone; nothing waits for this.
                    let _ = events.send(RunnerMessage { attempt, event }).await;
                }
            };
            send(RunnerEvent::Placed {
                runner: LOCAL.to_owned(),
            })
            .await;
            let end = run_reporting(a, &this.host, cancel, &this.gates, |step| {
                send(RunnerEvent::Step(step))
            })
            .await;
            this.cancels().remove(&id);
            send(RunnerEvent::Ended(end)).await;
        });
    }

    fn ack_started(&self, attempt: &AttemptId, version: u64) {
        self.gates.ack(attempt, version);
    }

    fn ack_ended(&self, _attempt: &AttemptId) {
        // The result went over a channel inside this process: nothing to keep or drop.
    }

    fn cancel(&self, attempt: &AttemptId) {
        if let Some(c) = self.cancels().get(attempt) {
            c.cancel();
        }
    }
}
