//! The agent's connection to its coordinator: dial out, say hello, run what is assigned,
//! stream every step and result back, and reconnect with jittered exponential backoff when
//! the connection ends.
//!
//! Per session: one `Attach` stream. The coordinator's `Welcome` comes first; then
//! assignments (each runs on the executor, at most `capacity` at once as the coordinator
//! places them), step acknowledgements (the persist-then-act gate: a migration's first request
//! waits for one), cancellations, result acknowledgements. Heartbeats go up every interval.
//!
//! When a session ends, the attempts it held are stopped (command steps: their process group)
//! and the coordinator re-dispatches them; a recorded migration is never sent again and the
//! one in flight is re-sent with the same idempotency key. (Keeping attempts alive across a
//! short disconnect, with leases and an outbox, is the fault-tolerance work.)

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_common::client::{endpoint, BearerToken, ClientError};
use baton_common::proto::{self, agent_message, agent_service_client, coordinator_message};
use baton_common::stage::wire::{attempt_of, event_to_wire, result_to_wire};
use baton_common::stage::{Assignment, AttemptId};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::assignment::{run_reporting, Gates, Host};

/// How the agent runs, from its flags and environment.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The coordinator's URL (`http://` or `https://`).
    pub coordinator: String,
    /// Stable identity, in every hello and in the `User-Agent` of every request.
    pub id: String,
    pub labels: BTreeMap<String, String>,
    /// Attempts run at once.
    pub capacity: u32,
    /// Bearer token for the coordinator.
    pub token: Option<String>,
    /// CA bundle (PEM) the coordinator's certificate must chain to.
    pub ca_pem: Option<Vec<u8>>,
    /// This process's environment: `valueFromEnv` and credentials are read here only.
    pub env: BTreeMap<String, String>,
    /// Where attempts' files are written while they run.
    pub workspace: std::path::PathBuf,
    /// Reconnect backoff: the first wait's upper bound, doubling up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl AgentConfig {
    /// `User-Agent` of every request the agent's stages send.
    pub fn user_agent(&self) -> String {
        format!("baton-agent/{} ({})", env!("CARGO_PKG_VERSION"), self.id)
    }
}

/// Why the agent stopped for good (everything else is retried).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Token(String),
    #[error("the coordinator refused this agent: {0}")]
    Refused(String),
}

/// How a session ended.
enum SessionEnd {
    /// Shutdown was asked for.
    Shutdown,
    /// The session was accepted, then ended: reconnect from the first backoff step.
    AfterWelcome(String),
}

/// Runs the agent until `shutdown`: sessions one after another, with backoff between.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let host = Arc::new(Host {
        env: config.env.clone(),
        user_agent: config.user_agent(),
        workspace: Some(config.workspace.clone()),
        clients: Arc::default(),
    });
    let token = BearerToken::new(config.token.as_deref()).map_err(AgentError::Token)?;
    let endpoint = endpoint(&config.coordinator, config.ca_pem.as_deref())?;
    let mut backoff = config.backoff_initial;
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        match session(&config, &endpoint, &token, &host, &shutdown).await {
            Ok(SessionEnd::Shutdown) => return Ok(()),
            Ok(SessionEnd::AfterWelcome(why)) => {
                tracing::warn!(why, "session ended; reconnecting");
                backoff = config.backoff_initial;
            }
            Err(status) if fatal(&status) => {
                return Err(AgentError::Refused(status.message().to_owned()))
            }
            Err(status) => tracing::warn!(
                code = ?status.code(),
                error = status.message(),
                "cannot reach the coordinator; retrying"
            ),
        }
        let wait = full_jitter(backoff);
        tokio::select! {
            // Shutdown first: never sleep through it.
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(wait) => {}
        }
        backoff = (backoff * 2).min(config.backoff_max);
    }
}

/// Statuses retrying cannot fix: the coordinator said who we are is not welcome.
fn fatal(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
    )
}

/// A uniformly random wait in `[0, bound]`, so agents that lost the coordinator together do
/// not come back together.
fn full_jitter(bound: Duration) -> Duration {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        return bound;
    }
    let frac = (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64;
    bound.mul_f64(frac)
}

fn message(kind: agent_message::Kind) -> proto::AgentMessage {
    proto::AgentMessage { kind: Some(kind) }
}

/// Running attempts of a session, by id: their cancel tokens.
type Running = Arc<Mutex<HashMap<AttemptId, CancellationToken>>>;

fn lock(r: &Running) -> std::sync::MutexGuard<'_, HashMap<AttemptId, CancellationToken>> {
    // A poisoned lock only means a panic elsewhere; the map is still consistent.
    r.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn session(
    config: &AgentConfig,
    endpoint: &tonic::transport::Endpoint,
    token: &BearerToken,
    host: &Arc<Host>,
    shutdown: &CancellationToken,
) -> Result<SessionEnd, tonic::Status> {
    let channel = tokio::select! {
        () = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        c = endpoint.connect() => c.map_err(|e| tonic::Status::unavailable(format!("cannot connect to {}: {e}", config.coordinator)))?,
    };
    let mut client =
        agent_service_client::AgentServiceClient::with_interceptor(channel, token.clone())
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024);
    let (out, out_rx) = mpsc::channel::<proto::AgentMessage>(1024);
    let hello = message(agent_message::Kind::Hello(proto::AgentHello {
        agent_id: config.id.clone(),
        labels: config.labels.clone().into_iter().collect(),
        capacity: config.capacity,
        held_attempts: Vec::new(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    }));
    // The channel was just made; it has room.
    let _ = out.try_send(hello);
    let mut inbound = client
        .attach(ReceiverStream::new(out_rx))
        .await?
        .into_inner();
    let welcome = match inbound.message().await? {
        Some(proto::CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Welcome(w)),
        }) => w,
        other => {
            return Err(tonic::Status::internal(format!(
                "the coordinator's first message was not a welcome: {other:?}"
            )))
        }
    };
    tracing::info!(session = %welcome.session_id, coordinator = %config.coordinator, "attached");
    let heartbeat = Duration::from_millis(welcome.heartbeat_interval_ms.max(100));
    let gates = Gates::default();
    let running: Running = Arc::default();
    let mut tasks = JoinSet::new();
    let mut tick = tokio::time::interval(heartbeat);
    let end = loop {
        tokio::select! {
            // Shutdown first: stop taking work.
            () = shutdown.cancelled() => break SessionEnd::Shutdown,
            // Finished attempt tasks: nothing to do but reap them.
            Some(_) = tasks.join_next() => {}
            _ = tick.tick() => {
                let held: Vec<proto::AttemptRef> = lock(&running).keys().map(Into::into).collect();
                let beat = message(agent_message::Kind::Heartbeat(proto::Heartbeat { running: held }));
                if out.send(beat).await.is_err() {
                    break SessionEnd::AfterWelcome("the stream to the coordinator closed".to_owned());
                }
            }
            msg = inbound.message() => match msg {
                Ok(Some(m)) => {
                    if let Err(why) = handle(m, &out, host, &gates, &running, &mut tasks) {
                        tracing::error!(error = %why, "protocol error from the coordinator; ending the session");
                        break SessionEnd::AfterWelcome(why);
                    }
                }
                Ok(None) => break SessionEnd::AfterWelcome("the coordinator closed the stream".to_owned()),
                Err(status) if fatal(&status) => {
                    stop_all(&running, &mut tasks).await;
                    return Err(status);
                }
                Err(status) => break SessionEnd::AfterWelcome(format!("stream error: {}", status.message())),
            },
        }
    };
    stop_all(&running, &mut tasks).await;
    Ok(end)
}

/// Cancels every attempt of the session and waits (bounded) for them to stop.
async fn stop_all(running: &Running, tasks: &mut JoinSet<()>) {
    for c in lock(running).values() {
        c.cancel();
    }
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if waited.is_err() {
        tracing::warn!("attempts did not stop within 10 s; abandoning them");
        tasks.abort_all();
    }
}

/// One message from the coordinator. `Err` is a protocol error that ends the session.
fn handle(
    m: proto::CoordinatorMessage,
    out: &mpsc::Sender<proto::AgentMessage>,
    host: &Arc<Host>,
    gates: &Gates,
    running: &Running,
    tasks: &mut JoinSet<()>,
) -> Result<(), String> {
    match m.kind {
        Some(coordinator_message::Kind::Assignment(a)) => {
            let a = Assignment::try_from(a).map_err(|e| format!("malformed assignment: {e}"))?;
            let id = a.attempt.clone();
            if lock(running).contains_key(&id) {
                return Err(format!("{id} was assigned twice"));
            }
            let cancel = CancellationToken::new();
            lock(running).insert(id.clone(), cancel.clone());
            let (out, host, gates, running) =
                (out.clone(), host.clone(), gates.clone(), running.clone());
            tasks.spawn(async move {
                tracing::info!(attempt = %id, "attempt started");
                let end = run_reporting(a, &host, cancel, &gates, |step| {
                    let out = out.clone();
                    let wire = event_to_wire(&id, &step);
                    async move {
                        // A closed stream ends the session, which stops this attempt.
                        let _ = out
                            .send(message(agent_message::Kind::StageEvent(wire)))
                            .await;
                    }
                })
                .await;
                tracing::info!(attempt = %id, end = ?end.end, "attempt ended");
                let result = result_to_wire(&id, &end);
                let _ = out
                    .send(message(agent_message::Kind::StageResult(result)))
                    .await;
                lock(&running).remove(&id);
            });
            Ok(())
        }
        Some(coordinator_message::Kind::StepAck(ack)) => {
            let id = attempt_of(ack.attempt, "StepAck").map_err(|e| e.to_string())?;
            if !gates.ack(&id, ack.version) {
                tracing::debug!(attempt = %id, version = ack.version, "step acknowledged after its attempt stopped");
            }
            Ok(())
        }
        Some(coordinator_message::Kind::Cancel(c)) => {
            let id = attempt_of(c.attempt, "CancelAttempt").map_err(|e| e.to_string())?;
            tracing::info!(attempt = %id, reason = %c.reason, "cancel");
            if let Some(token) = lock(running).get(&id) {
                token.cancel();
            }
            Ok(())
        }
        Some(coordinator_message::Kind::ResultAck(ack)) => {
            let id = attempt_of(ack.attempt, "ResultAck").map_err(|e| e.to_string())?;
            tracing::debug!(attempt = %id, "result recorded by the coordinator");
            Ok(())
        }
        Some(coordinator_message::Kind::Welcome(_)) => {
            Err("a second welcome on one stream".to_owned())
        }
        None => Err("a message with no kind".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn jitter_stays_within_its_bound() {
        for _ in 0..100 {
            let w = super::full_jitter(Duration::from_secs(2));
            assert!(w <= Duration::from_secs(2));
        }
    }
}
