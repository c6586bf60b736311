//! Property tests of leases and fencing in the registry: random interleavings of agents
//! attaching (after a restart holding only some of their attempts), detaching, heartbeating,
//! reporting results (current or stale), and time passing, against a model driver that
//! starts a stage's next attempt (with a larger token) only when the previous one ended or
//! was lost, as the real driver does. After every step:
//! - at most one attempt per stage is held (at most one live lease per stage);
//! - a stage's end (ended or lost) is reported only for its current attempt, i.e. results
//!   are applied only with the current token;
//! - an attempt ends at most once, and a stage that ended stays ended.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use baton_common::proto;
use baton_common::spec::RetryPolicy;
use baton_common::stage::{Assignment, AttemptId, Direction, StageVars};
use proptest::prelude::*;
use tokio::sync::mpsc;

use super::{AgentRegistry, Effect, Outbound, Session, Timing, Verdict};
use crate::runner::{RunnerEvent, RunnerMessage, Selector, StageRunner};

#[derive(Debug, Clone)]
enum Op {
    /// The agent (re)attaches; `keep` picks which of its attempts it still holds.
    Attach {
        agent: usize,
        keep: u8,
    },
    Detach {
        agent: usize,
    },
    Heartbeat {
        agent: usize,
    },
    /// The agent reports a result: for one of its attempts, or (stale) for an older token.
    Result {
        agent: usize,
        pick: usize,
        lost: bool,
        stale: bool,
    },
    /// Time passes, then the sweeper runs.
    Advance {
        ms: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..2usize, any::<u8>()).prop_map(|(agent, keep)| Op::Attach { agent, keep }),
        (0..2usize).prop_map(|agent| Op::Detach { agent }),
        (0..2usize).prop_map(|agent| Op::Heartbeat { agent }),
        (0..2usize, 0..4usize, any::<bool>(), any::<bool>()).prop_map(
            |(agent, pick, lost, stale)| Op::Result {
                agent,
                pick,
                lost,
                stale
            }
        ),
        (0..2000u64).prop_map(|ms| Op::Advance { ms }),
    ]
}

#[derive(Default)]
struct AgentModel {
    session: Option<Session>,
    rx: Option<mpsc::Receiver<Outbound>>,
    held: BTreeSet<AttemptId>,
}

struct StageModel {
    current: AttemptId,
    done: bool,
    ended: BTreeSet<AttemptId>,
}

fn assignment(attempt: AttemptId) -> Assignment {
    Assignment {
        attempt,
        files: BTreeMap::new(),
        config_file: "config.yaml".into(),
        vars: StageVars::default(),
        secrets: Vec::new(),
        not_secret: Vec::new(),
        applied: Vec::new(),
        direction: Direction::Up,
        retry: RetryPolicy::default(),
        timeout: None,
        key_scope: "k".into(),
        traceparent: String::new(),
        parsed: None,
    }
}

fn hello(id: &str, held: &BTreeSet<AttemptId>) -> proto::AgentHello {
    proto::AgentHello {
        agent_id: id.to_owned(),
        labels: Default::default(),
        capacity: 2,
        held_attempts: held.iter().map(Into::into).collect(),
        version: "test".into(),
    }
}

fn msg(kind: proto::agent_message::Kind) -> proto::AgentMessage {
    proto::AgentMessage { kind: Some(kind) }
}

/// Delivers effects at once, judging stale results as the ledger would (stale).
fn deliver(effects: Vec<Effect>) {
    for e in effects {
        match e {
            Effect::ToDriver(tx, m) => {
                let _ = tx.try_send(m);
            }
            Effect::ToAgent(tx, m) => {
                let _ = tx.try_send(Ok(*m));
            }
            Effect::Judge {
                ledger,
                attempt,
                agent,
                run,
            } => {
                if let Verdict::Stale(why) = ledger(&attempt) {
                    let _ = agent.try_send(Ok(*super::rejected(&attempt, &why)));
                    if let Some(run) = run {
                        let _ = run.try_send(super::stale_report(&attempt, &why));
                    }
                }
            }
        }
    }
}

fn check(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let timing = Timing {
        heartbeat: Duration::from_millis(100),
        lease: Duration::from_millis(1000),
        grace: Duration::from_millis(500),
    };
    let reg = AgentRegistry::new(
        timing,
        std::sync::Arc::new(|_| Verdict::Stale("stale".into())),
    );
    let (tx, mut rx) = mpsc::channel::<RunnerMessage>(100_000);
    let mut token = 0u64;
    let mut stages: BTreeMap<String, StageModel> = BTreeMap::new();
    for name in ["a", "b", "c"] {
        token += 1;
        let id = AttemptId {
            run: 1,
            stage: name.into(),
            attempt: 1,
            token,
        };
        reg.start(assignment(id.clone()), Selector::new(), tx.clone());
        stages.insert(
            name.into(),
            StageModel {
                current: id,
                done: false,
                ended: BTreeSet::new(),
            },
        );
    }
    let names = ["agent-0", "agent-1"];
    let mut agents: Vec<AgentModel> = vec![AgentModel::default(), AgentModel::default()];
    for op in ops {
        match op {
            Op::Attach { agent, keep } => {
                let model = &mut agents[agent];
                let kept: BTreeSet<AttemptId> = model
                    .held
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| keep & (1 << (i % 8)) != 0)
                    .map(|(_, a)| a.clone())
                    .collect();
                let (session, rx, effects) = reg.attach(hello(names[agent], &kept)).unwrap();
                deliver(effects);
                model.session = Some(session);
                model.rx = Some(rx);
                model.held = kept;
            }
            Op::Detach { agent } => {
                if let Some(s) = agents[agent].session.take() {
                    deliver(reg.detach(&s, "test"));
                }
            }
            Op::Heartbeat { agent } => {
                let model = &mut agents[agent];
                if let Some(s) = &model.session {
                    let beat = msg(proto::agent_message::Kind::Heartbeat(proto::Heartbeat {
                        running: model.held.iter().map(Into::into).collect(),
                    }));
                    match reg.on_message(s, beat) {
                        Ok(e) => deliver(e),
                        Err(_) => model.session = None,
                    }
                }
            }
            Op::Result {
                agent,
                pick,
                lost,
                stale,
            } => {
                let model = &mut agents[agent];
                let Some(s) = model.session.clone() else {
                    continue;
                };
                let Some(mine) = model
                    .held
                    .iter()
                    .nth(pick % model.held.len().max(1))
                    .cloned()
                else {
                    continue;
                };
                let about = if stale {
                    AttemptId {
                        token: mine.token.saturating_sub(1),
                        ..mine.clone()
                    }
                } else {
                    model.held.remove(&mine);
                    mine
                };
                let outcome = if lost {
                    proto::StageOutcome::Lost
                } else {
                    proto::StageOutcome::Succeeded
                };
                let result = msg(proto::agent_message::Kind::StageResult(
                    proto::StageResult {
                        attempt: Some((&about).into()),
                        outcome: outcome as i32,
                        ..Default::default()
                    },
                ));
                match reg.on_message(&s, result) {
                    Ok(e) => deliver(e),
                    Err(_) => model.session = None,
                }
            }
            Op::Advance { ms } => {
                reg.advance(Duration::from_millis(ms));
                deliver(reg.sweep());
            }
        }
        // The agents read their streams.
        for model in &mut agents {
            let Some(rx) = model.rx.as_mut() else {
                continue;
            };
            while let Ok(m) = rx.try_recv() {
                use proto::coordinator_message::Kind;
                match m {
                    Ok(proto::CoordinatorMessage { kind: Some(k) }) => match k {
                        Kind::Assignment(a) => {
                            model
                                .held
                                .insert(AttemptId::try_from(a.attempt.unwrap()).unwrap());
                        }
                        Kind::Rejected(r) => {
                            model
                                .held
                                .remove(&AttemptId::try_from(r.attempt.unwrap()).unwrap());
                        }
                        Kind::Lease(l) => {
                            for r in l.revoked {
                                model.held.remove(&AttemptId::try_from(r).unwrap());
                            }
                        }
                        _ => {}
                    },
                    Ok(_) => {}
                    // The session was ended by the coordinator.
                    Err(_) => model.session = None,
                }
            }
        }
        // The model driver reads its reports.
        while let Ok(m) = rx.try_recv() {
            let stage = stages.get_mut(&m.attempt.stage).unwrap();
            match m.event {
                RunnerEvent::Ended(_) | RunnerEvent::Lost(_) => {
                    prop_assert_eq!(
                        &m.attempt,
                        &stage.current,
                        "an end reported for an attempt that is not the stage's current one"
                    );
                    prop_assert!(!stage.done, "a stage that ended ended again");
                    prop_assert!(
                        stage.ended.insert(m.attempt.clone()),
                        "an attempt ended twice"
                    );
                    reg.ack_ended(&m.attempt);
                    if matches!(m.event, RunnerEvent::Lost(_)) && m.attempt.attempt < 8 {
                        token += 1;
                        let next = AttemptId {
                            attempt: m.attempt.attempt + 1,
                            token,
                            ..m.attempt.clone()
                        };
                        prop_assert!(next.token > stage.current.token);
                        stage.current = next.clone();
                        reg.start(assignment(next), Selector::new(), tx.clone());
                    } else {
                        stage.done = true;
                    }
                }
                RunnerEvent::Step(_) => {
                    prop_assert_eq!(&m.attempt, &stage.current, "a step of a stale attempt");
                }
                RunnerEvent::Waiting(_) | RunnerEvent::Placed { .. } | RunnerEvent::Stale(_) => {}
            }
        }
        // At most one live lease per stage, and it is the current attempt's.
        let mut per_stage: BTreeMap<String, Vec<AttemptId>> = BTreeMap::new();
        for (a, _) in reg.held() {
            per_stage.entry(a.stage.clone()).or_default().push(a);
        }
        for (stage, held) in per_stage {
            prop_assert!(
                held.len() <= 1,
                "stage {} has {} live attempts",
                stage,
                held.len()
            );
            prop_assert_eq!(&held[0], &stages[&stage].current);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn leases_fence_stale_attempts(ops in prop::collection::vec(op(), 1..80)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async { check(ops) })?;
    }
}
