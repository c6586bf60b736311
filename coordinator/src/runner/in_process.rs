//! Local mode's runner: each attempt runs on the executor inside this process, with this
//! process's environment. The only module of the coordinator that names the agent crate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use baton_agent::assignment::{self, Host};
use baton_agent::executor::StepGate;
use baton_common::stage::{Assignment, AttemptId, StageEvent};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{RunnerEvent, RunnerMessage, Selector, StageRunner};

/// The runner name [`RunnerEvent::Placed`] carries for in-process attempts.
pub const LOCAL: &str = "local";

/// Runs attempts in-process. `runs_on` is ignored: this process is the only runner.
#[derive(Debug, Clone)]
pub struct InProcessRunner {
    host: Arc<Host>,
    /// Gates waiting for the driver's acknowledgement, and each attempt's cancel token.
    state: Arc<Mutex<State>>,
    /// Owns every attempt task, so shutdown can wait for them.
    tasks: TaskTracker,
}

#[derive(Debug, Default)]
struct State {
    gates: HashMap<(AttemptId, u64), oneshot::Sender<()>>,
    cancels: HashMap<AttemptId, CancellationToken>,
}

impl InProcessRunner {
    /// `env` is this process's environment (the source of `valueFromEnv`).
    pub fn new(env: std::collections::BTreeMap<String, String>) -> Self {
        InProcessRunner {
            host: Arc::new(Host {
                env,
                user_agent: String::new(),
            }),
            state: Arc::default(),
            tasks: TaskTracker::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere; the maps are still consistent.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits until every attempt task has ended.
    pub async fn wait_idle(&self) {
        self.tasks.close();
        self.tasks.wait().await;
        self.tasks.reopen();
    }
}

/// The executor's gate: send `MigrationStarted` on the attempt's own event channel (so it
/// follows every earlier step) and wait until the driver acknowledges it, or the attempt is
/// cancelled.
fn gate(
    id: AttemptId,
    state: Arc<Mutex<State>>,
    steps: mpsc::Sender<StageEvent>,
    cancel: CancellationToken,
) -> StepGate {
    Arc::new(move |event| {
        let id = id.clone();
        let state = state.clone();
        let steps = steps.clone();
        let cancel = cancel.clone();
        Box::pin(async move {
            let version = match &event {
                StageEvent::MigrationStarted { version, .. } => *version,
                _ => 0,
            };
            let (tx, rx) = oneshot::channel();
            state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .gates
                .insert((id, version), tx);
            if steps.send(event).await.is_ok() {
                tokio::select! {
                    // A cancelled attempt never waits for an acknowledgement that won't come.
                    () = cancel.cancelled() => {}
                    _ = rx => {}
                }
            }
        })
    })
}

impl StageRunner for InProcessRunner {
    fn start(&self, a: Assignment, _selector: Selector, events: mpsc::Sender<RunnerMessage>) {
        let id = a.attempt.clone();
        let cancel = CancellationToken::new();
        self.lock().cancels.insert(id.clone(), cancel.clone());
        let host = self.host.clone();
        let state = self.state.clone();
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
            let (stx, mut srx) = mpsc::channel(256);
            let g = gate(id.clone(), state.clone(), stx.clone(), cancel.clone());
            let exec = assignment::run(a, &host, cancel, stx, Some(g));
            tokio::pin!(exec);
            let report = loop {
                tokio::select! {
                    // Steps first, so each is reported before the attempt's end.
                    biased;
                    Some(step) = srx.recv() => send(RunnerEvent::Step(step)).await,
                    report = &mut exec => break report,
                }
            };
            while let Ok(step) = srx.try_recv() {
                send(RunnerEvent::Step(step)).await;
            }
            {
                let mut s = state
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                s.cancels.remove(&id);
                s.gates.retain(|(a, _), _| a != &id);
            }
            send(RunnerEvent::Ended(report)).await;
        });
    }

    fn ack_started(&self, attempt: &AttemptId, version: u64) {
        if let Some(tx) = self.lock().gates.remove(&(attempt.clone(), version)) {
            let _ = tx.send(());
        }
    }

    fn ack_ended(&self, _attempt: &AttemptId) {
        // The result went over a channel inside this process: nothing to keep or drop.
    }

    fn cancel(&self, attempt: &AttemptId) {
        if let Some(c) = self.lock().cancels.get(attempt) {
            c.cancel();
        }
    }
}
