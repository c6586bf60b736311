//! The agent's connection to its coordinator: dial out, say hello, run what is assigned,
//! stream every step and result back, and reconnect with jittered exponential backoff when
//! the connection ends.
//!
//! Per session: one `Attach` stream. The coordinator's `Welcome` comes first; then
//! assignments (each runs on the executor, at most `capacity` at once as the coordinator
//! places them), step acknowledgements (the persist-then-act gate: a migration's first request
//! waits for one), lease renewals (one per heartbeat), cancellations, result
//! acknowledgements, rejections and drain.
//!
//! Attempts belong to the agent, not to a session: a dropped connection does not stop them.
//! Each holds a lease the coordinator renews in answer to heartbeats; when a lease has not
//! been renewed for the lease period L the agent stops the attempt and reports it lost
//! (nothing new starts for it: a migration's start also needs the coordinator's
//! acknowledgement). What the coordinator must not miss (a migration's end, an attempt's
//! result) goes through the [`Outbox`]: journaled, sent, and flushed beside the sending
//! (see [`Item::Journaled`]), re-sent on every new session until the coordinator
//! acknowledges the result or rejects the attempt.
//! A restarted agent names the attempts its outbox holds in its hello and reports the ones
//! that were running when it stopped as lost.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_common::client::{endpoint, BearerToken, ClientError};
use baton_common::proto::{self, agent_message, agent_service_client, coordinator_message};
use baton_common::stage::wire::{attempt_of, event_to_wire, result_to_wire};
use baton_common::stage::{Assignment, AttemptId, StageEnd, StageEvent};
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::assignment::{run_reporting, Gates, Host};
use crate::outbox::{Outbox, OutboxError};

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
    /// The agent's own state: the outbox (`outbox/`) and the files of running attempts
    /// (`work/`).
    pub data_dir: std::path::PathBuf,
    /// Reconnect backoff: the first wait's upper bound, doubling up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// HTTP/2 keepalive ping interval on the connection to the coordinator; a ping not
    /// answered within half of it ends the connection (a half-open one is noticed).
    pub keepalive: Duration,
    /// On shutdown, how long running attempts get to stop and their results to be sent.
    pub shutdown_grace: Duration,
    /// The key that encrypts the outbox (default: `state.key` in the data directory).
    pub state_key: baton_common::seal::StateKey,
}

impl AgentConfig {
    /// Defaults (no labels, capacity 4, backoff 0.5 s doubling to 30 s, keepalive 10 s) for
    /// everything but the coordinator, the id and the data directory.
    pub fn new(coordinator: &str, id: &str, data_dir: std::path::PathBuf) -> Self {
        AgentConfig {
            coordinator: coordinator.to_owned(),
            id: id.to_owned(),
            labels: BTreeMap::new(),
            capacity: 4,
            token: None,
            ca_pem: None,
            env: BTreeMap::new(),
            data_dir,
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            keepalive: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            state_key: baton_common::seal::StateKey::default(),
        }
    }

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
    #[error(transparent)]
    Outbox(#[from] OutboxError),
}

/// How a session ended.
enum SessionEnd {
    /// Shutdown was asked for and the session wound down.
    Shutdown,
    /// The coordinator drained the agent and nothing is left to run or send.
    Drained,
    /// The session was accepted, then ended: reconnect from the first backoff step.
    AfterWelcome(String),
}

/// Live messages kept for the next session while none is up; beyond this, the oldest log
/// lines and request notes are dropped (a migration's start, its end and results never are).
const MAX_QUEUED: usize = 10_000;

/// An attempt running on this agent.
#[derive(Debug)]
struct Held {
    cancel: CancellationToken,
    /// When its lease was last renewed (the send time of the heartbeat the renewal answers).
    renewed: Instant,
    /// Set when the agent gave it up (lease expired, revoked, shutdown): its result is
    /// reported as lost.
    lost: Option<String>,
}

/// What waits to be sent.
#[derive(Debug)]
enum Item {
    /// Sent at most once: progress, logs, a migration's start (re-sent until acknowledged
    /// through `gates_sent`).
    Live(proto::AgentMessage),
    /// In the outbox under this sequence number. Sent without waiting for its flush: the
    /// copy is there to be sent again after the agent restarts, and one a crash loses before
    /// its flush is a message the coordinator either received (and recorded) or never did,
    /// as if the agent had stopped a moment earlier (its attempt is then lost, and a
    /// migration it had started is in doubt).
    Journaled(u64),
}

/// The agent's state across sessions.
struct Shared {
    host: Arc<Host>,
    outbox: Outbox,
    gates: Gates,
    held: Mutex<HashMap<AttemptId, Held>>,
    queue: Mutex<VecDeque<Item>>,
    wake: Notify,
    /// Outbox entries handed to some session and not yet acknowledged: re-sent on the next.
    handed: Mutex<BTreeSet<u64>>,
    /// Migration starts sent and not yet acknowledged: re-sent on the next session.
    gates_sent: Mutex<BTreeMap<(AttemptId, u64), proto::AgentMessage>>,
    /// The lease period the coordinator announced (none before the first welcome).
    lease: Mutex<Option<Duration>>,
    draining: AtomicBool,
    tasks: TaskTracker,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere; the data is still consistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn message(kind: agent_message::Kind) -> proto::AgentMessage {
    proto::AgentMessage { kind: Some(kind) }
}

impl Shared {
    /// Attempts to name in hello and heartbeats: running, or ended with a result not yet
    /// acknowledged.
    fn holding(&self) -> Vec<AttemptId> {
        let mut ids: BTreeSet<AttemptId> = lock(&self.held).keys().cloned().collect();
        ids.extend(self.outbox.attempts());
        ids.into_iter().collect()
    }

    /// Nothing runs, nothing waits to be sent or acknowledged.
    fn idle(&self) -> bool {
        lock(&self.held).is_empty()
            && lock(&self.queue).is_empty()
            && self.outbox.attempts().is_empty()
    }

    fn push(&self, item: Item) {
        let mut q = lock(&self.queue);
        if q.len() >= MAX_QUEUED {
            let droppable = q.iter().position(|i| {
                matches!(i, Item::Live(proto::AgentMessage { kind: Some(agent_message::Kind::StageEvent(e)) })
                    if matches!(e.kind, Some(proto::stage_event::Kind::Log(_)) | Some(proto::stage_event::Kind::RequestSent(_))))
            });
            if let Some(i) = droppable {
                q.remove(i);
                tracing::warn!("the coordinator is unreachable and the queue is full: an old log line was dropped");
            }
        }
        q.push_back(item);
        drop(q);
        self.wake.notify_one();
    }

    /// Journals `m` and queues it, returning once it is durable; if the journal fails, sends
    /// it anyway.
    async fn journal_and_queue(&self, m: proto::AgentMessage) {
        if let Some(ticket) = self.journal_and_queue_unflushed(m) {
            // A failed task only means the flush did not run; it is logged like a failed one.
            let _ = self.flush_copy(ticket).await;
        }
    }

    /// Makes the outbox's copies up to `ticket` durable on the blocking pool; a failure is
    /// logged (the message has been sent without a durable copy).
    fn flush_copy(&self, ticket: u64) -> tokio::task::JoinHandle<()> {
        let outbox = self.outbox.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = outbox.sync(ticket) {
                tracing::error!(error = %e, "cannot flush the outbox; a message was sent without a durable copy");
            }
        })
    }

    /// Journals `m` and queues it at once, without waiting for the flush (see
    /// [`Item::Journaled`]); returns the ticket a flush must cover (none when the journal
    /// failed and `m` was queued without a copy).
    fn journal_and_queue_unflushed(&self, m: proto::AgentMessage) -> Option<u64> {
        match self.outbox.write(&m) {
            Ok((seq, ticket)) => {
                self.push(Item::Journaled(seq));
                Some(ticket)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot journal a message; sending it without a copy");
                self.push(Item::Live(m));
                None
            }
        }
    }

    /// The next message to send, marked as handed to a session.
    fn pop(&self) -> Option<proto::AgentMessage> {
        loop {
            let item = lock(&self.queue).pop_front()?;
            match item {
                Item::Live(m) => {
                    if let Some(key) = gate_key(&m) {
                        lock(&self.gates_sent).insert(key, m.clone());
                    }
                    return Some(m);
                }
                Item::Journaled(seq) => {
                    // Gone: acknowledged (or rejected) before it was sent.
                    let Some(m) = self.outbox.get(seq) else {
                        continue;
                    };
                    lock(&self.handed).insert(seq);
                    return Some(m);
                }
            }
        }
    }

    /// What an earlier session sent and nobody acknowledged, in the order it happened.
    fn replay(&self) -> Vec<proto::AgentMessage> {
        let handed = lock(&self.handed).clone();
        let mut out: Vec<proto::AgentMessage> = self
            .outbox
            .entries()
            .into_iter()
            .filter(|(seq, _)| handed.contains(seq))
            .map(|(_, m)| m)
            .collect();
        out.extend(lock(&self.gates_sent).values().cloned());
        out
    }

    /// The coordinator recorded `attempt`'s result (or will never apply it): drop its
    /// journaled messages.
    fn settle(&self, attempt: AttemptId) {
        match self.outbox.drop_attempt(&attempt) {
            Ok(dropped) => lock(&self.handed).retain(|s| !dropped.contains(s)),
            Err(e) => {
                tracing::error!(error = %e, %attempt, "cannot drop an acknowledged result from the outbox; it will be sent again")
            }
        }
    }

    /// Gives `attempt` up: it is stopped and reported lost with `why`.
    fn give_up(&self, attempt: &AttemptId, why: &str) {
        if let Some(h) = lock(&self.held).get_mut(attempt) {
            if h.lost.is_none() {
                tracing::warn!(%attempt, why, "giving the attempt up");
                h.lost = Some(why.to_owned());
            }
            h.cancel.cancel();
        }
    }

    /// Starts an assigned attempt on the executor.
    fn start(self: &Arc<Self>, a: Assignment) -> Result<(), String> {
        let id = a.attempt.clone();
        let cancel = CancellationToken::new();
        {
            let mut held = lock(&self.held);
            if held.contains_key(&id) {
                return Err(format!("{id} was assigned twice"));
            }
            held.insert(
                id.clone(),
                Held {
                    cancel: cancel.clone(),
                    renewed: Instant::now(),
                    lost: None,
                },
            );
        }
        let this = self.clone();
        self.tasks.spawn(async move {
            tracing::info!(attempt = %id, "attempt started");
            let report_to = this.clone();
            let report_id = id.clone();
            let mut end = run_reporting(a, &this.host, cancel, &this.gates, move |step| {
                let this = report_to.clone();
                let msg = message(agent_message::Kind::StageEvent(event_to_wire(
                    &report_id, &step,
                )));
                async move {
                    if matches!(step, StageEvent::MigrationFinished(_)) {
                        // The attempt goes on at once; the flush runs beside it (and is
                        // often shared with the stage's result, written next).
                        if let Some(ticket) = this.journal_and_queue_unflushed(msg) {
                            drop(this.flush_copy(ticket));
                        }
                    } else {
                        this.push(Item::Live(msg));
                    }
                }
            })
            .await;
            let lost = lock(&this.held).get(&id).and_then(|h| h.lost.clone());
            if let Some(why) = lost {
                if end.end != StageEnd::Succeeded {
                    end.end = StageEnd::Lost(why);
                }
            }
            tracing::info!(attempt = %id, end = ?end.end, "attempt ended");
            let result = message(agent_message::Kind::StageResult(result_to_wire(&id, &end)));
            this.journal_and_queue(result).await;
            tracing::info!(attempt = %id, "result journaled; sent until the coordinator acknowledges it");
            lock(&this.held).remove(&id);
            lock(&this.gates_sent).retain(|(a, _), _| a != &id);
        });
        Ok(())
    }

    /// Gives up every attempt whose lease has not been renewed for the lease period.
    fn expire_leases(&self) {
        let Some(lease) = *lock(&self.lease) else {
            return;
        };
        let expired: Vec<AttemptId> = lock(&self.held)
            .iter()
            .filter(|(_, h)| h.lost.is_none() && h.renewed.elapsed() > lease)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            self.give_up(
                &id,
                &format!(
                    "its lease was not renewed for {} ms (the coordinator was unreachable)",
                    lease.as_millis()
                ),
            );
        }
    }
}

/// `(attempt, version)` of a migration's start, the message its gate waits on.
fn gate_key(m: &proto::AgentMessage) -> Option<(AttemptId, u64)> {
    match &m.kind {
        Some(agent_message::Kind::StageEvent(e)) => match &e.kind {
            Some(proto::stage_event::Kind::MigrationStarted(s)) => {
                Some((attempt_of(e.attempt.clone(), "StageEvent").ok()?, s.version))
            }
            _ => None,
        },
        _ => None,
    }
}

/// Runs the agent until `shutdown`: sessions one after another, with backoff between.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let user_agent = config.user_agent();
    let host = Arc::new(Host {
        env: Arc::new(config.env.clone().into()),
        // Most stages use the default client: built while the agent connects.
        clients: crate::client::ClientCache::building_default(&user_agent),
        user_agent,
        workspace: Some(config.data_dir.join("work")),
    });
    let token = BearerToken::new(config.token.as_deref()).map_err(AgentError::Token)?;
    let endpoint = endpoint(&config.coordinator, config.ca_pem.as_deref())?
        .http2_keep_alive_interval(config.keepalive)
        .keep_alive_timeout(config.keepalive / 2);
    let dir = config.data_dir.clone();
    let key = config.state_key.clone();
    let outbox = tokio::task::spawn_blocking(move || Outbox::open(&dir, &key))
        .await
        .map_err(|e| OutboxError::Io(e.to_string()))??;
    let check = outbox.clone();
    let interrupted = tokio::task::spawn_blocking(move || check.close_interrupted())
        .await
        .map_err(|e| OutboxError::Io(e.to_string()))??;
    for a in &interrupted {
        tracing::warn!(attempt = %a, "the attempt was running when the agent stopped; reporting it lost");
    }
    // Whatever the outbox holds may have been sent before the restart: re-send it all.
    let handed: BTreeSet<u64> = outbox.entries().into_iter().map(|(s, _)| s).collect();
    let shared = Arc::new(Shared {
        host,
        outbox,
        gates: Gates::default(),
        held: Mutex::default(),
        queue: Mutex::default(),
        wake: Notify::new(),
        handed: Mutex::new(handed),
        gates_sent: Mutex::default(),
        lease: Mutex::new(None),
        draining: AtomicBool::new(false),
        tasks: TaskTracker::new(),
    });
    let watchdog = {
        let shared = shared.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => shared.expire_leases(),
                }
            }
        })
    };
    let ended = sessions(&config, &endpoint, &token, &shared, &shutdown).await;
    watchdog.abort();
    // Whatever still runs stops now; its result stays in the outbox for the next start.
    for id in lock(&shared.held).keys().cloned().collect::<Vec<_>>() {
        shared.give_up(&id, "the agent is shutting down");
    }
    shared.tasks.close();
    if tokio::time::timeout(config.shutdown_grace, shared.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("attempts did not stop within the shutdown grace; abandoning them");
    }
    ended
}

async fn sessions(
    config: &AgentConfig,
    endpoint: &tonic::transport::Endpoint,
    token: &BearerToken,
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
) -> Result<(), AgentError> {
    let mut backoff = config.backoff_initial;
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let wait = match session(config, endpoint, token, shared, shutdown).await {
            Ok(SessionEnd::Shutdown) => return Ok(()),
            Ok(SessionEnd::Drained) => {
                tracing::info!("drained: nothing left to run; exiting");
                return Ok(());
            }
            Ok(SessionEnd::AfterWelcome(why)) => {
                backoff = config.backoff_initial;
                let wait = full_jitter(backoff);
                tracing::warn!(
                    why,
                    retry_in_ms = millis(wait),
                    "session ended; reconnecting"
                );
                wait
            }
            Err(status) if fatal(&status) => {
                return Err(AgentError::Refused(status.message().to_owned()))
            }
            Err(status) => {
                let wait = full_jitter(backoff);
                tracing::warn!(
                    code = ?status.code(),
                    error = status.message(),
                    retry_in_ms = millis(wait),
                    "cannot reach the coordinator; retrying"
                );
                wait
            }
        };
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

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
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

async fn session(
    config: &AgentConfig,
    endpoint: &tonic::transport::Endpoint,
    token: &BearerToken,
    shared: &Arc<Shared>,
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
    let (out, out_rx) = mpsc::channel::<proto::AgentMessage>(256);
    let hello = message(agent_message::Kind::Hello(proto::AgentHello {
        agent_id: config.id.clone(),
        labels: config.labels.clone().into_iter().collect(),
        capacity: config.capacity,
        held_attempts: shared.holding().iter().map(Into::into).collect(),
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
    let heartbeat = Duration::from_millis(welcome.heartbeat_interval_ms.max(50));
    *lock(&shared.lease) = Some(Duration::from_millis(welcome.lease_ms.max(100)));
    // What earlier sessions sent and nobody acknowledged goes first, in order.
    let mut replay: VecDeque<proto::AgentMessage> = shared.replay().into();
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Send times of heartbeats not yet answered, oldest first.
    let mut beats: VecDeque<Instant> = VecDeque::new();
    let mut stopping: Option<tokio::time::Instant> = None;
    let end = loop {
        let draining = shared.draining.load(Ordering::SeqCst);
        if (stopping.is_some() || draining) && shared.idle() {
            break if stopping.is_some() {
                SessionEnd::Shutdown
            } else {
                SessionEnd::Drained
            };
        }
        let ready = !replay.is_empty() || !lock(&shared.queue).is_empty();
        let deadline =
            stopping.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            () = shutdown.cancelled(), if stopping.is_none() => {
                // Stop the attempts; their results go out on this session if it lasts.
                for id in lock(&shared.held).keys().cloned().collect::<Vec<_>>() {
                    shared.give_up(&id, "the agent is shutting down");
                }
                stopping = Some(tokio::time::Instant::now() + config.shutdown_grace);
            }
            () = tokio::time::sleep_until(deadline), if stopping.is_some() => break SessionEnd::Shutdown,
            _ = tick.tick() => {
                let held: Vec<proto::AttemptRef> = shared.holding().iter().map(Into::into).collect();
                let beat = message(agent_message::Kind::Heartbeat(proto::Heartbeat { running: held }));
                match out.try_send(beat) {
                    Ok(()) => beats.push_back(Instant::now()),
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        break SessionEnd::AfterWelcome("the stream to the coordinator closed".to_owned());
                    }
                    // The stream is backed up; the next tick tries again.
                    Err(mpsc::error::TrySendError::Full(_)) => {}
                }
            }
            permit = out.reserve(), if ready => match permit {
                Ok(permit) => {
                    let next = match replay.pop_front() {
                        Some(m) => Some(m),
                        None => shared.pop(),
                    };
                    if let Some(m) = next {
                        permit.send(m);
                    }
                }
                Err(_) => break SessionEnd::AfterWelcome("the stream to the coordinator closed".to_owned()),
            },
            () = shared.wake.notified(), if !ready => {}
            msg = inbound.message() => match msg {
                Ok(Some(m)) => {
                    if let Err(why) = handle(m, shared, &mut beats) {
                        tracing::error!(error = %why, "protocol error from the coordinator; ending the session");
                        break SessionEnd::AfterWelcome(why);
                    }
                }
                Ok(None) => break SessionEnd::AfterWelcome("the coordinator closed the stream".to_owned()),
                Err(status) if fatal(&status) => {
                    for id in lock(&shared.held).keys().cloned().collect::<Vec<_>>() {
                        shared.give_up(&id, "the coordinator refused this agent");
                    }
                    return Err(status);
                }
                Err(status) => break SessionEnd::AfterWelcome(format!("stream error: {}", status.message())),
            },
        }
    };
    // Anything replayed but not sent goes out again on the next session (it is still
    // journaled or still in `gates_sent`).
    drop(replay);
    Ok(end)
}

/// One message from the coordinator. `Err` is a protocol error that ends the session.
fn handle(
    m: proto::CoordinatorMessage,
    shared: &Arc<Shared>,
    beats: &mut VecDeque<Instant>,
) -> Result<(), String> {
    match m.kind {
        Some(coordinator_message::Kind::Assignment(a)) => {
            let a = Assignment::try_from(a).map_err(|e| format!("malformed assignment: {e}"))?;
            shared.start(a)
        }
        Some(coordinator_message::Kind::StepAck(ack)) => {
            let id = attempt_of(ack.attempt, "StepAck").map_err(|e| e.to_string())?;
            lock(&shared.gates_sent).remove(&(id.clone(), ack.version));
            if !shared.gates.ack(&id, ack.version) {
                tracing::debug!(attempt = %id, version = ack.version, "step acknowledged after its attempt stopped");
            }
            Ok(())
        }
        Some(coordinator_message::Kind::Cancel(c)) => {
            let id = attempt_of(c.attempt, "CancelAttempt").map_err(|e| e.to_string())?;
            tracing::info!(attempt = %id, reason = %c.reason, "cancel");
            if let Some(h) = lock(&shared.held).get(&id) {
                h.cancel.cancel();
            }
            Ok(())
        }
        Some(coordinator_message::Kind::ResultAck(ack)) => {
            let id = attempt_of(ack.attempt, "ResultAck").map_err(|e| e.to_string())?;
            if ack.already_applied {
                tracing::info!(attempt = %id, "the coordinator had already recorded this result (sent again); dropped from the outbox");
            } else {
                tracing::debug!(attempt = %id, "result recorded by the coordinator");
            }
            shared.settle(id);
            Ok(())
        }
        Some(coordinator_message::Kind::Rejected(r)) => {
            let id = attempt_of(r.attempt, "Rejected").map_err(|e| e.to_string())?;
            tracing::warn!(attempt = %id, reason = %r.reason, "the coordinator rejected the attempt's messages");
            shared.give_up(&id, &r.reason);
            lock(&shared.gates_sent).retain(|(a, _), _| a != &id);
            shared.settle(id);
            Ok(())
        }
        Some(coordinator_message::Kind::Lease(l)) => {
            // Answers come in heartbeat order; a renewal counts from its heartbeat's send.
            let sent = beats.pop_front().unwrap_or_else(Instant::now);
            let mut held = lock(&shared.held);
            for r in l.renewed {
                if let Ok(id) = AttemptId::try_from(r) {
                    if let Some(h) = held.get_mut(&id) {
                        h.renewed = h.renewed.max(sent);
                    }
                }
            }
            drop(held);
            for r in l.revoked {
                if let Ok(id) = AttemptId::try_from(r) {
                    shared.give_up(&id, "the coordinator no longer holds its lease");
                }
            }
            Ok(())
        }
        Some(coordinator_message::Kind::Drain(_)) => {
            tracing::info!("drain: no new work; finishing what runs, then exiting");
            shared.draining.store(true, Ordering::SeqCst);
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
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn shared(dir: &std::path::Path) -> Arc<Shared> {
        let outbox = Outbox::open(dir, &baton_common::seal::StateKey::default()).unwrap();
        Arc::new(Shared {
            host: Arc::new(Host {
                env: Arc::new(BTreeMap::new().into()),
                user_agent: "test".to_owned(),
                workspace: None,
                clients: Arc::default(),
            }),
            outbox,
            gates: Gates::default(),
            held: Mutex::default(),
            queue: Mutex::default(),
            wake: Notify::new(),
            handed: Mutex::default(),
            gates_sent: Mutex::default(),
            lease: Mutex::new(None),
            draining: AtomicBool::new(false),
            tasks: TaskTracker::new(),
        })
    }

    fn log_line(a: &AttemptId, line: &str) -> proto::AgentMessage {
        message(agent_message::Kind::StageEvent(proto::StageEvent {
            attempt: Some(a.into()),
            kind: Some(proto::stage_event::Kind::Log(proto::LogLine {
                line: line.to_owned(),
                ..Default::default()
            })),
        }))
    }

    /// A journaled message goes out at once, in its place in the queue, and its copy is
    /// durable once its flush ran: a reopened outbox (a restarted agent) holds it.
    #[test]
    fn a_journaled_message_keeps_its_place_and_its_copy() {
        let dir = std::env::temp_dir().join(format!("baton-session-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = shared(&dir);
        let a = AttemptId {
            run: 1,
            stage: "s".to_owned(),
            attempt: 1,
            token: 9,
        };
        s.push(Item::Live(log_line(&a, "before")));
        let ticket = s
            .journal_and_queue_unflushed(log_line(&a, "journaled"))
            .expect("journaled");
        s.push(Item::Live(log_line(&a, "after")));
        assert_eq!(s.pop().unwrap(), log_line(&a, "before"));
        assert_eq!(s.pop().unwrap(), log_line(&a, "journaled"));
        assert_eq!(s.pop().unwrap(), log_line(&a, "after"));
        assert!(s.pop().is_none());
        s.outbox.sync(ticket).unwrap();
        assert!(s.outbox.is_durable(ticket));
        drop(s);
        let s = shared(&dir);
        let held: Vec<_> = s.outbox.entries().into_iter().map(|(_, m)| m).collect();
        assert_eq!(held, vec![log_line(&a, "journaled")]);
        assert_eq!(s.outbox.attempts(), [a.clone()].into_iter().collect());
        // Acknowledged: dropped, and a reopened outbox no longer holds it once a later
        // flush covered the removal.
        s.settle(a.clone());
        assert!(s.outbox.attempts().is_empty());
        let later = s.outbox.write(&log_line(&a, "x")).unwrap().1;
        s.outbox.sync(later).unwrap();
        drop(s);
        let reopened = Outbox::open(&dir, &baton_common::seal::StateKey::default()).unwrap();
        assert_eq!(reopened.entries().len(), 1, "only the later write is left");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn jitter_stays_within_its_bound() {
        for _ in 0..100 {
            let w = super::full_jitter(Duration::from_secs(2));
            assert!(w <= Duration::from_secs(2));
        }
    }
}
