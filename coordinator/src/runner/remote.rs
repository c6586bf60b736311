//! Distributed mode's runner: the registry of attached agents and of the attempts they hold.
//!
//! Placement: an attempt goes to an agent whose labels match the stage's `runs_on` selector,
//! that is not draining and that has a free slot (the least busy one; ties by id); with none,
//! it waits in a FIFO queue and the run shows why, and it is placed the moment a matching
//! agent attaches or frees a slot.
//!
//! Leases: every placed attempt carries its fencing token and a lease, renewed whenever its
//! agent names it in a heartbeat (or reports on it). An attempt whose lease has not been
//! renewed for L + G (lease plus grace, the coordinator's monotonic clock) is lost: reported
//! [`RunnerEvent::Lost`] exactly once, and the driver decides (its stage's `retry_on_lost`).
//! A session that ends does not lose its attempts by itself: the agent keeps running them and
//! reattaches (its hello names what it holds); only an agent that comes back without an
//! attempt, or never comes back within the lease, loses it. Attempts a restarted coordinator
//! found running are expected for the failover grace F ([`AgentRegistry::expect`]).
//!
//! Fencing: only the agent holding an attempt, with the attempt's token, may report on it.
//! Anything else is stale: rejected on the agent's stream (`Rejected`) and shown in the run's
//! log, never applied. A result that arrives again after it was recorded is acknowledged as
//! already applied (the [`Ledger`] reads the store to tell the two apart).
//!
//! The registry never writes the store. The driver records every step and result and
//! acknowledges them through [`StageRunner`]; the registry turns those into `StepAck` /
//! `ResultAck` messages on the agent's stream. No lock is held across an await: state
//! changes return [`Effect`]s that are sent after.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_common::proto;
use baton_common::stage::wire::{event_from_wire, result_from_wire, WireError};
use baton_common::stage::{Assignment, AttemptId, StageEnd, StageReport};
use tokio::sync::mpsc;

use super::{describe, matches, RunnerEvent, RunnerMessage, Selector, StageRunner};

/// What the coordinator sends down an agent's stream.
pub type Outbound = Result<proto::CoordinatorMessage, tonic::Status>;

/// How many messages an agent's stream may queue before the agent reads them.
const OUTBOX: usize = 1024;

/// Why an agent's message was refused (its session then ends with this status).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("malformed message: {0}")]
    Malformed(#[from] WireError),
    #[error("{0}")]
    Unexpected(String),
    #[error("the session was replaced by a newer one from the same agent")]
    Replaced,
}

impl From<SessionError> for tonic::Status {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::Malformed(_) => tonic::Status::invalid_argument(e.to_string()),
            SessionError::Unexpected(_) | SessionError::Replaced => {
                tonic::Status::failed_precondition(e.to_string())
            }
        }
    }
}

/// The timings of leases (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How often agents send heartbeats (H).
    pub heartbeat: Duration,
    /// How long an agent keeps an attempt without a renewal (L).
    pub lease: Duration,
    /// How much longer the coordinator waits before it declares the attempt lost (G).
    pub grace: Duration,
}

impl Timing {
    /// L + G: an attempt not renewed for this long is lost.
    pub fn lost_after(&self) -> Duration {
        self.lease + self.grace
    }
}

/// What the store says about a message for an attempt the registry does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The attempt's result is recorded: acknowledge it as already applied.
    AlreadyApplied,
    /// The attempt was replaced, declared lost, or its run is not active: reject it.
    Stale(String),
}

/// Reads the store for [`Verdict`]s (blocking; called off the async workers).
pub type Ledger = Arc<dyn Fn(&AttemptId) -> Verdict + Send + Sync>;

/// One attached agent, as `baton agents list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub capacity: u32,
    pub running: u32,
    pub last_seen: Duration,
    pub version: String,
    pub draining: bool,
}

/// Identifies one session of one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub agent: String,
    pub id: u64,
}

#[derive(Debug)]
struct Agent {
    session: u64,
    labels: BTreeMap<String, String>,
    capacity: u32,
    outbox: mpsc::Sender<Outbound>,
    last_seen: Instant,
    version: String,
}

#[derive(Debug)]
struct Pending {
    assignment: Assignment,
    selector: Selector,
    events: mpsc::Sender<RunnerMessage>,
    /// The run was told why it waits.
    told: Option<String>,
}

/// An attempt some agent holds (or is expected to hold after a coordinator restart).
#[derive(Debug)]
struct Placed {
    /// The agent holding it; `None` for an expected attempt no agent claimed yet.
    agent: Option<String>,
    /// Where its reports go; `None` until the run's driver adopts an expected attempt
    /// (reports wait in `early` meanwhile).
    events: Option<mpsc::Sender<RunnerMessage>>,
    early: Vec<RunnerMessage>,
    /// Lost when the clock passes this without a renewal.
    deadline: Instant,
}

#[derive(Debug, Default)]
struct Registry {
    agents: BTreeMap<String, Agent>,
    /// Agents told to drain (kept across their reconnects).
    draining: BTreeSet<String>,
    pending: VecDeque<Pending>,
    attempts: HashMap<AttemptId, Placed>,
    /// Results handed to the driver and not yet recorded: which agent to acknowledge.
    unacked: HashMap<AttemptId, String>,
    /// Where each run's reports go (for stale messages about attempts no longer held).
    runs: HashMap<u64, mpsc::Sender<RunnerMessage>>,
    next_session: u64,
    /// L + G.
    lost_after: Duration,
    /// Added to the monotonic clock (tests move time forward without waiting).
    skew: Duration,
}

impl Registry {
    /// The coordinator's monotonic clock: lease arithmetic uses nothing else.
    fn now(&self) -> Instant {
        Instant::now() + self.skew
    }

    fn running_on(&self, agent: &str) -> usize {
        self.attempts
            .values()
            .filter(|p| p.agent.as_deref() == Some(agent))
            .count()
    }

    fn outbox(&self, agent: &str) -> Option<mpsc::Sender<Outbound>> {
        self.agents.get(agent).map(|a| a.outbox.clone())
    }
}

/// A message to send once the registry's lock is released.
pub enum Effect {
    ToDriver(mpsc::Sender<RunnerMessage>, RunnerMessage),
    ToAgent(mpsc::Sender<Outbound>, Box<proto::CoordinatorMessage>),
    /// A result for an attempt the registry does not hold: ask the store, then acknowledge
    /// it as already applied or reject it as stale.
    Judge {
        ledger: Ledger,
        attempt: AttemptId,
        agent: mpsc::Sender<Outbound>,
        run: Option<mpsc::Sender<RunnerMessage>>,
    },
}

impl std::fmt::Debug for Effect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Effect::ToDriver(_, m) => f.debug_tuple("ToDriver").field(m).finish(),
            Effect::ToAgent(_, m) => f.debug_tuple("ToAgent").field(m).finish(),
            Effect::Judge { attempt, .. } => f.debug_tuple("Judge").field(attempt).finish(),
        }
    }
}

fn rejected(attempt: &AttemptId, reason: &str) -> Box<proto::CoordinatorMessage> {
    coordinator_message(proto::coordinator_message::Kind::Rejected(
        proto::Rejected {
            attempt: Some(attempt.into()),
            reason: reason.to_owned(),
        },
    ))
}

fn result_ack(attempt: &AttemptId, already_applied: bool) -> Box<proto::CoordinatorMessage> {
    coordinator_message(proto::coordinator_message::Kind::ResultAck(
        proto::ResultAck {
            attempt: Some(attempt.into()),
            already_applied,
        },
    ))
}

fn stale_report(attempt: &AttemptId, why: &str) -> RunnerMessage {
    RunnerMessage {
        attempt: attempt.clone(),
        event: RunnerEvent::Stale(why.to_owned()),
    }
}

/// Sends effects, waiting for room (from async code that may wait: sessions).
pub async fn deliver(effects: Vec<Effect>) {
    for e in effects {
        match e {
            // A closed channel means the run or the session is gone; nothing waits for it.
            Effect::ToDriver(tx, m) => {
                let _ = tx.send(m).await;
            }
            Effect::ToAgent(tx, m) => {
                let _ = tx.send(Ok(*m)).await;
            }
            Effect::Judge {
                ledger,
                attempt,
                agent,
                run,
            } => {
                let a = attempt.clone();
                let verdict = tokio::task::spawn_blocking(move || ledger(&a))
                    .await
                    .unwrap_or_else(|e| {
                        Verdict::Stale(format!("the store could not be read: {e}"))
                    });
                match verdict {
                    Verdict::AlreadyApplied => {
                        tracing::info!(%attempt, "result sent again after it was recorded; acknowledged as already applied");
                        let _ = agent.send(Ok(*result_ack(&attempt, true))).await;
                    }
                    Verdict::Stale(why) => {
                        tracing::warn!(%attempt, why, "stale result rejected");
                        let _ = agent.send(Ok(*rejected(&attempt, &why))).await;
                        if let Some(run) = run {
                            let _ = run.send(stale_report(&attempt, &why)).await;
                        }
                    }
                }
            }
        }
    }
}

/// Sends effects without waiting (from the driver's synchronous calls). A full channel
/// means the other side stopped reading; the message is dropped and logged.
fn deliver_now(effects: Vec<Effect>) {
    for e in effects {
        let full = match e {
            Effect::ToDriver(tx, m) => tx.try_send(m).is_err(),
            Effect::ToAgent(tx, m) => tx.try_send(Ok(*m)).is_err(),
            Effect::Judge { .. } => {
                tokio::spawn(deliver(vec![e]));
                false
            }
        };
        if full {
            tracing::warn!("a message was dropped: its receiver is gone or not reading");
        }
    }
}

fn coordinator_message(kind: proto::coordinator_message::Kind) -> Box<proto::CoordinatorMessage> {
    Box::new(proto::CoordinatorMessage { kind: Some(kind) })
}

/// The registry of attached agents; cheap to clone.
#[derive(Clone)]
pub struct AgentRegistry {
    inner: Arc<Mutex<Registry>>,
    timing: Timing,
    ledger: Ledger,
}

impl std::fmt::Debug for AgentRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentRegistry")
            .field("timing", &self.timing)
            .finish_non_exhaustive()
    }
}

impl AgentRegistry {
    /// `timing` is what `Welcome` tells agents and what the sweeper enforces; `ledger` reads
    /// the store for results about attempts the registry no longer holds.
    pub fn new(timing: Timing, ledger: Ledger) -> Self {
        AgentRegistry {
            inner: Arc::new(Mutex::new(Registry {
                lost_after: timing.lost_after(),
                ..Registry::default()
            })),
            timing,
            ledger,
        }
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A poisoned lock only means a panic elsewhere; the registry is still consistent.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers an agent from its hello; returns its session, the stream to send it
    /// (starting with `Welcome`), and what to deliver. Attempts the agent names as held are
    /// its again (their leases renewed); attempts it held before and does not name are lost.
    pub fn attach(
        &self,
        hello: proto::AgentHello,
    ) -> Result<(Session, mpsc::Receiver<Outbound>, Vec<Effect>), SessionError> {
        if hello.agent_id.trim().is_empty() {
            return Err(SessionError::Unexpected(
                "hello has an empty agent_id".to_owned(),
            ));
        }
        if hello.capacity == 0 {
            return Err(SessionError::Unexpected(
                "hello has capacity 0; an agent runs at least one attempt".to_owned(),
            ));
        }
        let held: BTreeSet<AttemptId> = hello
            .held_attempts
            .into_iter()
            .map(AttemptId::try_from)
            .collect::<Result<_, _>>()?;
        let (tx, rx) = mpsc::channel(OUTBOX);
        let mut effects = Vec::new();
        let mut r = self.lock();
        r.next_session += 1;
        let session = r.next_session;
        let id = hello.agent_id.clone();
        if let Some(old) = r.agents.remove(&id) {
            // The agent came back before its old stream was seen to close.
            let _ = old.outbox.try_send(Err(SessionError::Replaced.into()));
        }
        let welcome =
            coordinator_message(proto::coordinator_message::Kind::Welcome(proto::Welcome {
                session_id: session.to_string(),
                heartbeat_interval_ms: millis(self.timing.heartbeat),
                lease_ms: millis(self.timing.lease),
            }));
        // First on the stream, before any assignment placed below.
        let _ = tx.try_send(Ok(*welcome));
        let now = r.now();
        let lost_after = self.timing.lost_after();
        let mut gone = Vec::new();
        for (attempt, p) in r.attempts.iter_mut() {
            let claims = held.contains(attempt);
            match p.agent.as_deref() {
                Some(a) if a == id && claims => p.deadline = now + lost_after,
                Some(a) if a == id => gone.push(attempt.clone()),
                // Expected after a coordinator restart: the first agent that holds it has it.
                None if claims => {
                    p.agent = Some(id.clone());
                    p.deadline = now + lost_after;
                    tracing::info!(%attempt, agent = %id, "attempt reattached after the coordinator restarted");
                }
                _ => {}
            }
        }
        for attempt in gone {
            effects.extend(lose(
                &mut r,
                &attempt,
                &format!("agent {id} came back without it (it restarted, or never received it)"),
            ));
        }
        for attempt in &held {
            if r.unacked.contains_key(attempt) {
                r.unacked.insert(attempt.clone(), id.clone());
            }
        }
        tracing::info!(agent = %id, session, labels = ?hello.labels, capacity = hello.capacity, held = held.len(), "agent attached");
        r.agents.insert(
            id.clone(),
            Agent {
                session,
                labels: hello.labels.into_iter().collect(),
                capacity: hello.capacity,
                outbox: tx.clone(),
                last_seen: now,
                version: hello.version,
            },
        );
        if r.draining.contains(&id) {
            effects.push(Effect::ToAgent(
                tx,
                coordinator_message(proto::coordinator_message::Kind::Drain(proto::Drain {})),
            ));
        }
        effects.extend(place(&mut r));
        Ok((
            Session {
                agent: id,
                id: session,
            },
            rx,
            effects,
        ))
    }

    /// The session ended (the stream closed or failed). Its attempts stay the agent's until
    /// their leases run out: an agent that reconnects in time keeps them.
    pub fn detach(&self, session: &Session, why: &str) -> Vec<Effect> {
        let mut r = self.lock();
        match r.agents.get(&session.agent) {
            Some(a) if a.session == session.id => {}
            // Already replaced by a newer session; that one stays.
            _ => return Vec::new(),
        }
        r.agents.remove(&session.agent);
        let held = r.running_on(&session.agent);
        if r.draining.contains(&session.agent) && held == 0 {
            tracing::info!(agent = %session.agent, "drained agent disconnected");
        } else {
            tracing::info!(agent = %session.agent, session = session.id, why, held, "agent detached; its attempts keep their leases");
        }
        place(&mut r)
    }

    /// Handles one message of a session after its hello.
    pub fn on_message(
        &self,
        session: &Session,
        msg: proto::AgentMessage,
    ) -> Result<Vec<Effect>, SessionError> {
        use proto::agent_message::Kind;
        let mut r = self.lock();
        let skew = r.skew;
        let agent = match r.agents.get_mut(&session.agent) {
            Some(a) if a.session == session.id => a,
            _ => return Err(SessionError::Replaced),
        };
        let now = Instant::now() + skew;
        agent.last_seen = now;
        let outbox = agent.outbox.clone();
        let deadline = now + self.timing.lost_after();
        match msg.kind {
            None => Err(SessionError::Malformed(WireError::Missing {
                message: "AgentMessage",
                field: "kind",
            })),
            Some(Kind::Hello(_)) => Err(SessionError::Unexpected(
                "hello sent twice on one stream".to_owned(),
            )),
            Some(Kind::Heartbeat(h)) => {
                let mut renewed = Vec::new();
                let mut revoked = Vec::new();
                for a in h.running {
                    let attempt = AttemptId::try_from(a.clone())?;
                    let mine = match r.attempts.get_mut(&attempt) {
                        Some(p) if p.agent.as_deref() == Some(session.agent.as_str()) => {
                            p.deadline = deadline;
                            true
                        }
                        // Expected after a restart and not yet claimed: this agent has it.
                        Some(p) if p.agent.is_none() => {
                            p.agent = Some(session.agent.clone());
                            p.deadline = deadline;
                            true
                        }
                        // Its result waits to be recorded, or it is in the outbox: keep it.
                        _ => r.unacked.contains_key(&attempt),
                    };
                    if mine {
                        renewed.push(a);
                    } else {
                        revoked.push(a);
                    }
                }
                Ok(vec![Effect::ToAgent(
                    outbox,
                    coordinator_message(proto::coordinator_message::Kind::Lease(
                        proto::LeaseRenewal { renewed, revoked },
                    )),
                )])
            }
            Some(Kind::StageEvent(e)) => {
                let (attempt, step) = event_from_wire(e)?;
                let report = RunnerMessage {
                    attempt: attempt.clone(),
                    event: RunnerEvent::Step(step),
                };
                // A step sent again after its result: recorded already.
                let settled = r.unacked.contains_key(&attempt);
                let run = r.runs.get(&attempt.run).cloned();
                match holder(&mut r, session, &attempt) {
                    Some(p) => {
                        p.deadline = deadline;
                        Ok(to_driver(p, report))
                    }
                    None if settled => Ok(Vec::new()),
                    None => {
                        let why = format!(
                            "{attempt} is not held by agent {} (it was replaced or lost)",
                            session.agent
                        );
                        let mut effects = vec![Effect::ToAgent(outbox, rejected(&attempt, &why))];
                        if let Some(run) = run {
                            effects.push(Effect::ToDriver(run, stale_report(&attempt, &why)));
                        }
                        Ok(effects)
                    }
                }
            }
            Some(Kind::StageResult(res)) => {
                let (attempt, report) = result_from_wire(res)?;
                if holder(&mut r, session, &attempt).is_none() {
                    if let Some(agent) = r.unacked.get_mut(&attempt) {
                        // Sent again while the first copy is being recorded: one transition.
                        agent.clone_from(&session.agent);
                        return Ok(Vec::new());
                    }
                    let run = r.runs.get(&attempt.run).cloned();
                    return Ok(vec![Effect::Judge {
                        ledger: self.ledger.clone(),
                        attempt,
                        agent: outbox,
                        run,
                    }]);
                }
                let Some(mut placed) = r.attempts.remove(&attempt) else {
                    return Ok(Vec::new());
                };
                r.unacked.insert(attempt.clone(), session.agent.clone());
                let event = match report.end {
                    StageEnd::Lost(why) => {
                        RunnerEvent::Lost(format!("agent {} gave it up: {why}", session.agent))
                    }
                    _ => RunnerEvent::Ended(report),
                };
                let mut effects = to_driver(&mut placed, RunnerMessage { attempt, event });
                effects.extend(place(&mut r));
                Ok(effects)
            }
        }
    }

    /// Declares lost every attempt whose lease ran out, and ends sessions that have been
    /// silent as long (a frozen agent whose connection stays open). Call it periodically.
    pub fn sweep(&self) -> Vec<Effect> {
        let lost_after = self.timing.lost_after();
        let mut r = self.lock();
        let now = r.now();
        let silent: Vec<(String, u64)> = r
            .agents
            .iter()
            .filter(|(_, a)| now.saturating_duration_since(a.last_seen) > lost_after)
            .map(|(id, a)| (id.clone(), a.session))
            .collect();
        for (agent, session) in silent {
            if let Some(a) = r.agents.remove(&agent) {
                tracing::warn!(
                    agent,
                    session,
                    "no heartbeat for {} ms; ending its session",
                    lost_after.as_millis()
                );
                let _ = a
                    .outbox
                    .try_send(Err(tonic::Status::deadline_exceeded(format!(
                        "no heartbeat for {} ms",
                        lost_after.as_millis()
                    ))));
            }
        }
        let expired: Vec<(AttemptId, Option<String>)> = r
            .attempts
            .iter()
            .filter(|(_, p)| now > p.deadline)
            .map(|(a, p)| (a.clone(), p.agent.clone()))
            .collect();
        let mut effects = Vec::new();
        for (attempt, agent) in expired {
            let why = match agent {
                Some(a) => format!(
                    "agent {a} did not renew its lease for {} ms",
                    lost_after.as_millis()
                ),
                None => "no agent reattached with it after the coordinator restarted".to_owned(),
            };
            effects.extend(lose(&mut r, &attempt, &why));
        }
        effects.extend(place(&mut r));
        // Runs whose driver is gone need no route for stale reports any more.
        r.runs.retain(|_, tx| !tx.is_closed());
        effects
    }

    /// After a coordinator restart: `attempt` was running when the coordinator stopped; the
    /// agent holding it has `grace` to reattach and claim it. Its run's driver adopts it with
    /// [`StageRunner::adopt`]; reports that arrive before are kept for it.
    pub fn expect(&self, attempt: AttemptId, grace: Duration) {
        let mut r = self.lock();
        let deadline = r.now() + grace;
        r.attempts.insert(
            attempt,
            Placed {
                agent: None,
                events: None,
                early: Vec::new(),
                deadline,
            },
        );
    }

    /// Stops new assignments to `agent`; its running attempts finish, then it disconnects.
    /// Returns how many attempts it still runs, or `None` when no such agent is attached.
    pub fn drain(&self, agent: &str) -> Option<u32> {
        let (outbox, running) = {
            let mut r = self.lock();
            let outbox = r.outbox(agent)?;
            r.draining.insert(agent.to_owned());
            (outbox, r.running_on(agent))
        };
        tracing::info!(agent, running, "draining agent");
        deliver_now(vec![Effect::ToAgent(
            outbox,
            coordinator_message(proto::coordinator_message::Kind::Drain(proto::Drain {})),
        )]);
        Some(u32::try_from(running).unwrap_or(u32::MAX))
    }

    /// Every attached agent, by id.
    pub fn agents(&self) -> Vec<AgentInfo> {
        let r = self.lock();
        r.agents
            .iter()
            .map(|(id, a)| AgentInfo {
                id: id.clone(),
                labels: a.labels.clone(),
                capacity: a.capacity,
                running: u32::try_from(r.running_on(id)).unwrap_or(u32::MAX),
                last_seen: r.now().saturating_duration_since(a.last_seen),
                version: a.version.clone(),
                draining: r.draining.contains(id),
            })
            .collect()
    }

    /// Moves the registry's clock forward (tests: leases run out without waiting).
    #[cfg(test)]
    pub(crate) fn advance(&self, by: Duration) {
        self.lock().skew += by;
    }

    /// Every attempt the registry holds (placed or expected), for tests.
    #[cfg(test)]
    pub(crate) fn held(&self) -> Vec<(AttemptId, Option<String>)> {
        self.lock()
            .attempts
            .iter()
            .map(|(a, p)| (a.clone(), p.agent.clone()))
            .collect()
    }

    /// The stream of `session`, while it is the agent's current one.
    pub fn session_outbox(&self, session: &Session) -> Option<mpsc::Sender<Outbound>> {
        self.lock()
            .agents
            .get(&session.agent)
            .filter(|a| a.session == session.id)
            .map(|a| a.outbox.clone())
    }

    /// The stream of the agent holding `attempt`, while it is attached.
    fn outbox_of(&self, attempt: &AttemptId) -> Option<mpsc::Sender<Outbound>> {
        let r = self.lock();
        let agent = r.attempts.get(attempt)?.agent.clone()?;
        r.outbox(&agent)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The attempt, when this session's agent holds it (an expected attempt is claimed).
fn holder<'r>(
    r: &'r mut Registry,
    session: &Session,
    attempt: &AttemptId,
) -> Option<&'r mut Placed> {
    let p = r.attempts.get_mut(attempt)?;
    match p.agent.as_deref() {
        Some(a) if a == session.agent => Some(p),
        None => {
            p.agent = Some(session.agent.clone());
            Some(p)
        }
        Some(_) => None,
    }
}

/// A report for `p`'s run: sent now, or kept until its driver adopts it.
fn to_driver(p: &mut Placed, m: RunnerMessage) -> Vec<Effect> {
    match &p.events {
        Some(tx) => vec![Effect::ToDriver(tx.clone(), m)],
        None => {
            p.early.push(m);
            Vec::new()
        }
    }
}

/// Reports `attempt` lost (once) and forgets it.
fn lose(r: &mut Registry, attempt: &AttemptId, why: &str) -> Vec<Effect> {
    let Some(mut placed) = r.attempts.remove(attempt) else {
        return Vec::new();
    };
    tracing::warn!(%attempt, why, "attempt lost");
    // Its agent, if attached, stops it: nothing more from it will be applied.
    let mut effects = Vec::new();
    if let Some(outbox) = placed.agent.as_deref().and_then(|a| r.outbox(a)) {
        effects.push(Effect::ToAgent(outbox, rejected(attempt, why)));
    }
    effects.extend(to_driver(
        &mut placed,
        RunnerMessage {
            attempt: attempt.clone(),
            event: RunnerEvent::Lost(why.to_owned()),
        },
    ));
    effects
}

/// Places waiting attempts on matching agents with a free slot, in queue order; tells the
/// runs of those that still wait why (once per reason).
fn place(r: &mut Registry) -> Vec<Effect> {
    let mut effects = Vec::new();
    let mut still = VecDeque::with_capacity(r.pending.len());
    let mut load: BTreeMap<String, usize> = r
        .agents
        .keys()
        .map(|id| (id.clone(), r.running_on(id)))
        .collect();
    while let Some(mut p) = r.pending.pop_front() {
        let best = r
            .agents
            .iter()
            .filter(|(id, _)| !r.draining.contains(*id))
            .filter(|(_, a)| matches(&p.selector, &a.labels))
            .filter(|(id, a)| load.get(*id).copied().unwrap_or(0) < a.capacity as usize)
            .min_by_key(|(id, _)| (load.get(*id).copied().unwrap_or(0), (*id).clone()))
            .map(|(id, a)| (id.clone(), a.outbox.clone()));
        let Some((agent_id, outbox)) = best else {
            let why = waiting_reason(r, &p.selector);
            if p.told.as_deref() != Some(why.as_str()) {
                effects.push(Effect::ToDriver(
                    p.events.clone(),
                    RunnerMessage {
                        attempt: p.assignment.attempt.clone(),
                        event: RunnerEvent::Waiting(why.clone()),
                    },
                ));
                p.told = Some(why);
            }
            still.push_back(p);
            continue;
        };
        *load.entry(agent_id.clone()).or_default() += 1;
        let id = p.assignment.attempt.clone();
        let msg = coordinator_message(proto::coordinator_message::Kind::Assignment(
            proto::StageAssignment::from(&p.assignment),
        ));
        effects.push(Effect::ToAgent(outbox, msg));
        effects.push(Effect::ToDriver(
            p.events.clone(),
            RunnerMessage {
                attempt: id.clone(),
                event: RunnerEvent::Placed {
                    runner: agent_id.clone(),
                },
            },
        ));
        tracing::info!(attempt = %id, token = id.token, agent = %agent_id, "attempt assigned");
        r.attempts.insert(
            id,
            Placed {
                agent: Some(agent_id),
                events: Some(p.events),
                early: Vec::new(),
                deadline: r.now() + r.lost_after,
            },
        );
    }
    r.pending = still;
    effects
}

fn waiting_reason(r: &Registry, selector: &Selector) -> String {
    let wanted = if selector.is_empty() {
        "an agent".to_owned()
    } else {
        format!("an agent with {}", describe(selector))
    };
    let matching: Vec<&String> = r
        .agents
        .iter()
        .filter(|(_, a)| matches(selector, &a.labels))
        .map(|(id, _)| id)
        .collect();
    if matching.is_empty() {
        format!("waiting for {wanted}")
    } else if matching.iter().all(|id| r.draining.contains(*id)) {
        format!("waiting for {wanted} (the matching ones are draining)")
    } else {
        format!("waiting for a free slot on {wanted}")
    }
}

impl StageRunner for AgentRegistry {
    fn start(
        &self,
        assignment: Assignment,
        selector: Selector,
        events: mpsc::Sender<RunnerMessage>,
    ) {
        let effects = {
            let mut r = self.lock();
            r.runs.insert(assignment.attempt.run, events.clone());
            r.pending.push_back(Pending {
                assignment,
                selector,
                events,
                told: None,
            });
            place(&mut r)
        };
        deliver_now(effects);
    }

    fn adopt(&self, attempt: &AttemptId, events: mpsc::Sender<RunnerMessage>) {
        let effects = {
            let mut r = self.lock();
            r.runs.insert(attempt.run, events.clone());
            match r.attempts.get_mut(attempt) {
                Some(p) => {
                    p.events = Some(events.clone());
                    std::mem::take(&mut p.early)
                        .into_iter()
                        .map(|m| Effect::ToDriver(events.clone(), m))
                        .collect()
                }
                None => vec![Effect::ToDriver(
                    events,
                    RunnerMessage {
                        attempt: attempt.clone(),
                        event: RunnerEvent::Lost(
                            "no agent holds it after the coordinator restarted".to_owned(),
                        ),
                    },
                )],
            }
        };
        deliver_now(effects);
    }

    fn ack_started(&self, attempt: &AttemptId, version: u64) {
        if let Some(outbox) = self.outbox_of(attempt) {
            let msg =
                coordinator_message(proto::coordinator_message::Kind::StepAck(proto::StepAck {
                    attempt: Some(attempt.into()),
                    version,
                }));
            deliver_now(vec![Effect::ToAgent(outbox, msg)]);
        }
    }

    fn ack_ended(&self, attempt: &AttemptId) {
        // The ack goes to the agent that sent the result, on its current session (a new
        // session re-sends unacknowledged results and is answered then if this one is lost).
        let outbox = {
            let mut r = self.lock();
            r.unacked.remove(attempt).and_then(|agent| r.outbox(&agent))
        };
        if let Some(outbox) = outbox {
            deliver_now(vec![Effect::ToAgent(outbox, result_ack(attempt, false))]);
        }
    }

    fn cancel(&self, attempt: &AttemptId) {
        let effects = {
            let mut r = self.lock();
            if let Some(i) = r
                .pending
                .iter()
                .position(|p| &p.assignment.attempt == attempt)
            {
                let p = r.pending.remove(i);
                p.into_iter()
                    .map(|p| {
                        Effect::ToDriver(
                            p.events,
                            RunnerMessage {
                                attempt: attempt.clone(),
                                event: RunnerEvent::Ended(StageReport::ended(StageEnd::Cancelled)),
                            },
                        )
                    })
                    .collect()
            } else if let Some(agent) = r.attempts.get(attempt).and_then(|p| p.agent.clone()) {
                // A detached agent cannot be told: its lease runs out and the driver records
                // the attempt cancelled (unconfirmed).
                r.outbox(&agent)
                    .map(|outbox| {
                        vec![Effect::ToAgent(
                            outbox,
                            coordinator_message(proto::coordinator_message::Kind::Cancel(
                                proto::CancelAttempt {
                                    attempt: Some(attempt.into()),
                                    reason: "the run was cancelled".to_owned(),
                                },
                            )),
                        )]
                    })
                    .unwrap_or_default()
            } else {
                Vec::new()
            }
        };
        deliver_now(effects);
    }
}

#[cfg(test)]
mod lease_tests;
