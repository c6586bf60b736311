//! Property tests of the scheduler core over random DAGs, failures, conditions and event
//! orders.

use std::collections::BTreeSet;
use std::time::Duration;

use baton_common::spec::OnFailure;
use proptest::prelude::*;

use super::core::{Action, Event, RunCore, SkipReason, StageNode, StageStatus};
use crate::store::RunStatus;

#[derive(Debug, Clone)]
struct Case {
    stages: Vec<StageNode>,
    /// Per stage: does it fail when run; does its condition hold.
    fails: Vec<bool>,
    condition: Vec<bool>,
    max: usize,
    wait: bool,
    /// Choices that pick which pending completion happens next.
    order: Vec<usize>,
}

fn any_case() -> impl Strategy<Value = Case> {
    (1usize..12).prop_flat_map(|n| {
        let deps = (0..n).map(|i| {
            prop::collection::btree_set(0..i.max(1), 0..=i.min(3))
                .prop_map(move |s| s.into_iter().filter(|d| *d < i).collect::<Vec<_>>())
        });
        let on_failure = prop::sample::select(vec![
            OnFailure::Stop,
            OnFailure::Continue,
            OnFailure::SkipDependents,
        ]);
        (
            deps.collect::<Vec<_>>(),
            prop::collection::vec(on_failure, n),
            prop::collection::vec(any::<bool>(), n),
            prop::collection::vec(prop::bool::weighted(0.2), n),
            prop::collection::vec(prop::bool::weighted(0.2), n),
            prop::collection::vec(prop::bool::weighted(0.8), n),
            0usize..4,
            any::<bool>(),
            prop::collection::vec(any::<usize>(), 64),
        )
            .prop_map(
                |(deps, on_failure, _pad, has_condition, fails, condition, max, wait, order)| {
                    Case {
                        stages: deps
                            .into_iter()
                            .enumerate()
                            .map(|(i, deps)| StageNode {
                                name: format!("s{i}"),
                                deps,
                                on_failure: on_failure[i],
                                has_condition: has_condition[i],
                            })
                            .collect(),
                        fails,
                        condition,
                        max,
                        wait,
                        order,
                    }
                },
            )
    })
}

/// What the driver would do, with completions in an order the case chooses. Returns every
/// event applied, in order, and the core at the end.
fn drive(case: &Case, cancel_at: Option<usize>) -> (Vec<Event>, RunCore, Vec<Action>) {
    let wait = if case.wait {
        Duration::from_secs(1)
    } else {
        Duration::ZERO
    };
    let mut core = RunCore::new(case.stages.clone(), case.max, wait);
    let mut log = vec![Event::Start];
    let mut all_actions = Vec::new();
    let mut pending: Vec<Event> = Vec::new();
    let mut actions = core.apply(Event::Start).expect("start");
    let mut step = 0;
    loop {
        for a in &actions {
            check_action(&core, case, a);
            match a {
                Action::CheckCondition(i) => pending.push(Event::ConditionChecked {
                    stage: *i,
                    runs: case.condition[*i],
                }),
                Action::Dispatch(i) => pending.push(Event::StageFinished {
                    stage: *i,
                    ok: !case.fails[*i],
                }),
                Action::Hold { stage, .. } => pending.push(Event::Released { stage: *stage }),
                Action::Skip { .. } | Action::NotRun { .. } | Action::Finish(_) => {}
            }
        }
        all_actions.append(&mut actions);
        if core.finished().is_some() {
            // After a cancel, pause timers may still be pending; the driver drops them. Nothing
            // else (a running stage, a condition check) may be outstanding.
            let outstanding: Vec<&Event> = pending
                .iter()
                .filter(|e| !(cancel_at.is_some() && matches!(e, Event::Released { .. })))
                .collect();
            assert!(
                outstanding.is_empty(),
                "the run finished with work outstanding: {outstanding:?}"
            );
            return (log, core, all_actions);
        }
        assert!(step < 10_000, "the run does not terminate");
        let event = if cancel_at == Some(step) {
            Event::Cancel
        } else {
            assert!(
                !pending.is_empty(),
                "the run is stuck: nothing pending, not finished"
            );
            let k = case.order[step % case.order.len()] % pending.len();
            pending.remove(k)
        };
        step += 1;
        log.push(event.clone());
        actions = core
            .apply(event)
            .expect("every event the driver sends fits");
    }
}

/// Invariants checked at every dispatch.
fn check_action(core: &RunCore, case: &Case, a: &Action) {
    if let Action::Dispatch(i) = a {
        for &d in &case.stages[*i].deps {
            let st = core.status(d);
            let ok = matches!(
                st,
                StageStatus::Succeeded | StageStatus::Skipped(SkipReason::Condition)
            ) || (st == StageStatus::Failed
                && case.stages[d].on_failure == OnFailure::Continue);
            assert!(ok, "s{i} started while its dependency s{d} is {st:?}");
        }
        if case.max > 0 {
            assert!(
                core.running() <= case.max,
                "more than {} stages running",
                case.max
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// No stage starts before its dependencies finished; never more than the limit run; the
    /// run terminates with every stage in a final state.
    #[test]
    fn runs_respect_dependencies_and_limits(case in any_case()) {
        let (_, core, actions) = drive(&case, None);
        for i in 0..case.stages.len() {
            prop_assert!(core.status(i).is_terminal(), "s{} ended {:?}", i, core.status(i));
        }
        let finishes = actions.iter().filter(|a| matches!(a, Action::Finish(_))).count();
        prop_assert_eq!(finishes, 1);
        let dispatched: BTreeSet<usize> = actions.iter().filter_map(|a| if let Action::Dispatch(i) = a { Some(*i) } else { None }).collect();
        prop_assert_eq!(dispatched.len(), actions.iter().filter(|a| matches!(a, Action::Dispatch(_))).count(), "a stage was dispatched twice");
    }

    /// `skip_dependents` skips exactly the transitive dependents of the failed stage that had
    /// not started; a failure with `stop` starts nothing new; outcomes match the failures.
    #[test]
    fn failure_modes(case in any_case()) {
        let (_, core, actions) = drive(&case, None);
        let n = case.stages.len();
        let failed: Vec<usize> = (0..n).filter(|&i| core.status(i) == StageStatus::Failed).collect();
        for &f in &failed {
            if case.stages[f].on_failure == OnFailure::SkipDependents {
                // Every transitive dependent ended skipped, unless something else ended it first.
                let mut stack = vec![f];
                let mut seen = BTreeSet::new();
                while let Some(i) = stack.pop() {
                    for j in 0..n {
                        if case.stages[j].deps.contains(&i) && seen.insert(j) {
                            stack.push(j);
                        }
                    }
                }
                for j in seen {
                    prop_assert!(
                        matches!(core.status(j), StageStatus::Skipped(SkipReason::FailedDependency) | StageStatus::NotRun | StageStatus::Skipped(SkipReason::Condition)),
                        "s{} depends on failed s{} but ended {:?}", j, f, core.status(j)
                    );
                }
            }
        }
        let outcome = actions.iter().find_map(|a| if let Action::Finish(o) = a { Some(*o) } else { None }).unwrap();
        let hard = failed.iter().any(|&f| case.stages[f].on_failure != OnFailure::Continue);
        let expected = if hard { RunStatus::Failed } else if failed.is_empty() { RunStatus::Succeeded } else { RunStatus::SucceededWithFailures };
        prop_assert_eq!(outcome, expected);
        // Skipped by condition only when the condition was false.
        for i in 0..n {
            if core.status(i) == StageStatus::Skipped(SkipReason::Condition) {
                prop_assert!(case.stages[i].has_condition && !case.condition[i]);
            }
        }
    }

    /// Replaying the recorded events into a fresh core rebuilds the same state.
    #[test]
    fn replay_rebuilds_the_same_state(case in any_case(), cancel_at in prop::option::of(0usize..20)) {
        let (log, core, _) = drive(&case, cancel_at);
        let wait = if case.wait { Duration::from_secs(1) } else { Duration::ZERO };
        let mut replayed = RunCore::new(case.stages.clone(), case.max, wait);
        for e in log {
            replayed.apply(e).unwrap();
        }
        prop_assert_eq!(replayed, core);
    }
}

#[test]
fn illegal_events_are_typed_errors() {
    let stages = vec![StageNode {
        name: "a".into(),
        deps: vec![],
        on_failure: OnFailure::Stop,
        has_condition: false,
    }];
    let mut core = RunCore::new(stages, 0, Duration::ZERO);
    assert_eq!(core.apply(Event::Start).unwrap(), vec![Action::Dispatch(0)]);
    assert!(core
        .apply(Event::ConditionChecked {
            stage: 0,
            runs: true
        })
        .is_err());
    assert!(core
        .apply(Event::StageFinished { stage: 7, ok: true })
        .is_err());
    assert_eq!(
        core.apply(Event::StageFinished { stage: 0, ok: true })
            .unwrap(),
        vec![Action::Finish(RunStatus::Succeeded)]
    );
    assert!(
        core.apply(Event::Start).is_err(),
        "a finished run takes no events"
    );
}

#[test]
fn stop_lets_running_stages_finish_and_starts_nothing_new() {
    // a, b independent; c after a.
    let node = |name: &str, deps: Vec<usize>| StageNode {
        name: name.into(),
        deps,
        on_failure: OnFailure::Stop,
        has_condition: false,
    };
    let mut core = RunCore::new(
        vec![node("a", vec![]), node("b", vec![]), node("c", vec![0])],
        0,
        Duration::ZERO,
    );
    assert_eq!(
        core.apply(Event::Start).unwrap(),
        vec![Action::Dispatch(0), Action::Dispatch(1)]
    );
    assert_eq!(
        core.apply(Event::StageFinished {
            stage: 1,
            ok: false
        })
        .unwrap(),
        vec![]
    );
    assert_eq!(
        core.apply(Event::StageFinished { stage: 0, ok: true })
            .unwrap(),
        vec![
            Action::NotRun { stage: 2 },
            Action::Finish(RunStatus::Failed)
        ]
    );
}
