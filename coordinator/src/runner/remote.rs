//! Distributed mode's runner: the registry of attached agents. An attempt goes to an agent
//! whose labels match the stage's `runs_on` selector and that has a free slot (the least busy
//! one; ties by id); with none, it waits in a FIFO queue and the run shows why, and it is
//! placed the moment a matching agent attaches or frees a slot.
//!
//! The registry only routes: it never touches the store. The driver records every step and
//! result and acknowledges them through [`StageRunner`]; the registry turns those into
//! `StepAck` / `ResultAck` messages on the agent's stream.
//!
//! Invariants:
//! - an attempt is on at most one agent, and only that agent's current session may report on
//!   it; anything else from a session is a protocol error that ends the session;
//! - an agent whose session ends (disconnect, crash, replaced by a newer session) loses its
//!   attempts: each is reported [`RunnerEvent::Lost`] exactly once, and the driver decides
//!   what happens next;
//! - no lock is held across an await: state changes return [`Effect`]s that are sent after.

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

/// One attached agent, as `baton agents list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub capacity: u32,
    pub running: u32,
    pub last_seen: Duration,
    pub version: String,
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
    running: BTreeSet<AttemptId>,
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

#[derive(Debug)]
struct Placed {
    agent: String,
    session: u64,
    events: mpsc::Sender<RunnerMessage>,
}

#[derive(Debug, Default)]
struct Registry {
    agents: BTreeMap<String, Agent>,
    pending: VecDeque<Pending>,
    attempts: HashMap<AttemptId, Placed>,
    /// Results handed to the driver and not yet recorded: where to send the `ResultAck`.
    unacked: HashMap<AttemptId, (String, u64)>,
    next_session: u64,
}

/// A message to send once the registry's lock is released.
#[derive(Debug)]
pub enum Effect {
    ToDriver(mpsc::Sender<RunnerMessage>, RunnerMessage),
    ToAgent(mpsc::Sender<Outbound>, Box<proto::CoordinatorMessage>),
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
#[derive(Debug, Clone)]
pub struct AgentRegistry {
    inner: Arc<Mutex<Registry>>,
    heartbeat: Duration,
    lease: Duration,
}

impl AgentRegistry {
    /// `heartbeat` and `lease` are what `Welcome` tells agents.
    pub fn new(heartbeat: Duration, lease: Duration) -> Self {
        AgentRegistry {
            inner: Arc::default(),
            heartbeat,
            lease,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A poisoned lock only means a panic elsewhere; the registry is still consistent.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers an agent from its hello; returns its session, the stream to send it
    /// (starting with `Welcome`), and what to deliver (lost attempts of a replaced session,
    /// newly placed attempts).
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
        let (tx, rx) = mpsc::channel(OUTBOX);
        let mut effects = Vec::new();
        let mut r = self.lock();
        r.next_session += 1;
        let session = r.next_session;
        if let Some(old) = r.agents.remove(&hello.agent_id) {
            // The agent came back before its old stream was seen to close.
            let _ = old.outbox.try_send(Err(SessionError::Replaced.into()));
            effects.extend(lose(&mut r, &old, "its agent reconnected"));
        }
        let welcome =
            coordinator_message(proto::coordinator_message::Kind::Welcome(proto::Welcome {
                session_id: session.to_string(),
                heartbeat_interval_ms: u64::try_from(self.heartbeat.as_millis())
                    .unwrap_or(u64::MAX),
                lease_ms: u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX),
            }));
        // First on the stream, before any assignment placed below.
        let _ = tx.try_send(Ok(*welcome));
        tracing::info!(agent = %hello.agent_id, session, labels = ?hello.labels, capacity = hello.capacity, "agent attached");
        r.agents.insert(
            hello.agent_id.clone(),
            Agent {
                session,
                labels: hello.labels.into_iter().collect(),
                capacity: hello.capacity,
                running: BTreeSet::new(),
                outbox: tx,
                last_seen: Instant::now(),
                version: hello.version,
            },
        );
        effects.extend(place(&mut r));
        Ok((
            Session {
                agent: hello.agent_id,
                id: session,
            },
            rx,
            effects,
        ))
    }

    /// The session ended (the stream closed or failed): its attempts are lost.
    pub fn detach(&self, session: &Session, why: &str) -> Vec<Effect> {
        let mut r = self.lock();
        match r.agents.get(&session.agent) {
            Some(a) if a.session == session.id => {}
            // Already replaced by a newer session; that one stays.
            _ => return Vec::new(),
        }
        let Some(agent) = r.agents.remove(&session.agent) else {
            return Vec::new();
        };
        tracing::info!(agent = %session.agent, session = session.id, why, "agent detached");
        lose(
            &mut r,
            &agent,
            &format!("agent {} disconnected: {why}", session.agent),
        )
    }

    /// Handles one message of a session after its hello.
    pub fn on_message(
        &self,
        session: &Session,
        msg: proto::AgentMessage,
    ) -> Result<Vec<Effect>, SessionError> {
        use proto::agent_message::Kind;
        let mut r = self.lock();
        let agent = match r.agents.get_mut(&session.agent) {
            Some(a) if a.session == session.id => a,
            _ => return Err(SessionError::Replaced),
        };
        agent.last_seen = Instant::now();
        match msg.kind {
            None => Err(SessionError::Malformed(WireError::Missing {
                message: "AgentMessage",
                field: "kind",
            })),
            Some(Kind::Hello(_)) => Err(SessionError::Unexpected(
                "hello sent twice on one stream".to_owned(),
            )),
            Some(Kind::Heartbeat(_)) => Ok(Vec::new()),
            Some(Kind::StageEvent(e)) => {
                let (attempt, step) = event_from_wire(e)?;
                let placed = owned(&r, session, &attempt)?;
                Ok(vec![Effect::ToDriver(
                    placed.events.clone(),
                    RunnerMessage {
                        attempt,
                        event: RunnerEvent::Step(step),
                    },
                )])
            }
            Some(Kind::StageResult(res)) => {
                let (attempt, report) = result_from_wire(res)?;
                owned(&r, session, &attempt)?;
                let Some(placed) = r.attempts.remove(&attempt) else {
                    return Ok(Vec::new());
                };
                if let Some(a) = r.agents.get_mut(&session.agent) {
                    a.running.remove(&attempt);
                }
                r.unacked
                    .insert(attempt.clone(), (session.agent.clone(), session.id));
                let mut effects = vec![Effect::ToDriver(
                    placed.events,
                    RunnerMessage {
                        attempt,
                        event: RunnerEvent::Ended(report),
                    },
                )];
                effects.extend(place(&mut r));
                Ok(effects)
            }
        }
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
                running: u32::try_from(a.running.len()).unwrap_or(u32::MAX),
                last_seen: a.last_seen.elapsed(),
                version: a.version.clone(),
            })
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

    /// The agent an attempt runs on, for routing acknowledgements.
    fn outbox_of(&self, attempt: &AttemptId) -> Option<mpsc::Sender<Outbound>> {
        let r = self.lock();
        let placed = r.attempts.get(attempt)?;
        r.agents
            .get(&placed.agent)
            .filter(|a| a.session == placed.session)
            .map(|a| a.outbox.clone())
    }
}

/// The attempt, when this session holds it; else the message is a protocol error.
fn owned<'r>(
    r: &'r Registry,
    session: &Session,
    attempt: &AttemptId,
) -> Result<&'r Placed, SessionError> {
    match r.attempts.get(attempt) {
        Some(p) if p.agent == session.agent && p.session == session.id => Ok(p),
        _ => Err(SessionError::Unexpected(format!(
            "{attempt} is not assigned to agent {} in this session",
            session.agent
        ))),
    }
}

/// Reports every attempt of `agent` lost, and places waiting attempts elsewhere.
fn lose(r: &mut Registry, agent: &Agent, why: &str) -> Vec<Effect> {
    let mut effects = Vec::new();
    for attempt in &agent.running {
        if let Some(placed) = r.attempts.remove(attempt) {
            effects.push(Effect::ToDriver(
                placed.events,
                RunnerMessage {
                    attempt: attempt.clone(),
                    event: RunnerEvent::Lost(why.to_owned()),
                },
            ));
        }
    }
    effects.extend(place(r));
    effects
}

/// Places waiting attempts on matching agents with a free slot, in queue order; tells the
/// runs of those that still wait why (once per reason).
fn place(r: &mut Registry) -> Vec<Effect> {
    let mut effects = Vec::new();
    let mut still = VecDeque::with_capacity(r.pending.len());
    while let Some(mut p) = r.pending.pop_front() {
        let best = r
            .agents
            .iter()
            .filter(|(_, a)| matches(&p.selector, &a.labels))
            .filter(|(_, a)| a.running.len() < a.capacity as usize)
            .min_by_key(|(id, a)| (a.running.len(), (*id).clone()))
            .map(|(id, _)| id.clone());
        let Some(agent_id) = best else {
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
        let Some(agent) = r.agents.get_mut(&agent_id) else {
            still.push_back(p);
            continue;
        };
        let id = p.assignment.attempt.clone();
        agent.running.insert(id.clone());
        let msg = coordinator_message(proto::coordinator_message::Kind::Assignment(
            proto::StageAssignment::from(&p.assignment),
        ));
        effects.push(Effect::ToAgent(agent.outbox.clone(), msg));
        effects.push(Effect::ToDriver(
            p.events.clone(),
            RunnerMessage {
                attempt: id.clone(),
                event: RunnerEvent::Placed {
                    runner: agent_id.clone(),
                },
            },
        ));
        tracing::info!(attempt = %id, agent = %agent_id, "attempt assigned");
        let session = agent.session;
        r.attempts.insert(
            id,
            Placed {
                agent: agent_id,
                session,
                events: p.events,
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
    if r.agents.values().any(|a| matches(selector, &a.labels)) {
        format!("waiting for a free slot on {wanted}")
    } else {
        format!("waiting for {wanted}")
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
        // The ack goes to the session that sent the result, if it is still attached (a new
        // session of the agent re-sends unacknowledged results and is answered then).
        let outbox = {
            let mut r = self.lock();
            r.unacked.remove(attempt).and_then(|(agent, session)| {
                r.agents
                    .get(&agent)
                    .filter(|a| a.session == session)
                    .map(|a| a.outbox.clone())
            })
        };
        if let Some(outbox) = outbox {
            let msg = coordinator_message(proto::coordinator_message::Kind::ResultAck(
                proto::ResultAck {
                    attempt: Some(attempt.into()),
                    already_applied: false,
                },
            ));
            deliver_now(vec![Effect::ToAgent(outbox, msg)]);
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
            } else if let Some(placed) = r.attempts.get(attempt) {
                r.agents
                    .get(&placed.agent)
                    .map(|a| {
                        vec![Effect::ToAgent(
                            a.outbox.clone(),
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
