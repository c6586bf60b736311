//! The scheduler's pure core: run state plus `apply(event) -> actions`.
//!
//! No I/O, no clock, no async: the driver performs the actions and feeds back what happened,
//! so the core can be replayed and property-tested. Semantics (COMPAT.md):
//! - a stage starts when every dependency has finished (succeeded, skipped by its condition,
//!   or failed with `on_failure: continue`) and its `wait_between_stages` pause is over;
//! - at most `max_concurrent` stages run at once; ready stages start in plan order;
//! - a stage with a condition is checked when it becomes ready; false means
//!   `skipped (condition)`, which satisfies its dependents;
//! - `on_failure: stop`: nothing new starts, running stages finish, the run fails;
//!   `continue`: dependents still run, the run ends "succeeded with failures";
//!   `skip_dependents`: every transitive dependent is skipped, the others continue, the run
//!   fails;
//! - cancel: nothing new starts; the run ends cancelled once running stages have ended.

use std::time::Duration;

use baton_common::spec::OnFailure;

use crate::store::RunStatus;

/// A stage as the core sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageNode {
    pub name: String,
    /// Indices of dependencies within the run (dependencies outside the run are satisfied).
    pub deps: Vec<usize>,
    pub on_failure: OnFailure,
    pub has_condition: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    Condition,
    FailedDependency,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageStatus {
    Waiting,
    /// Its condition is being checked.
    Checking,
    Running,
    Succeeded,
    Failed,
    Skipped(SkipReason),
    /// The run ended (stop, cancel) before it could start.
    NotRun,
}

impl StageStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            StageStatus::Succeeded
                | StageStatus::Failed
                | StageStatus::Skipped(_)
                | StageStatus::NotRun
        )
    }
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Start,
    ConditionChecked {
        stage: usize,
        runs: bool,
    },
    /// The condition could not be evaluated (a variable only the run provides is missing):
    /// the stage fails, with its `on_failure`.
    ConditionFailed {
        stage: usize,
    },
    StageFinished {
        stage: usize,
        ok: bool,
    },
    /// The pause after `stage` finished is over.
    Released {
        stage: usize,
    },
    Cancel,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    CheckCondition(usize),
    Dispatch(usize),
    /// Send `Released { stage }` after `wait`.
    Hold {
        stage: usize,
        wait: Duration,
    },
    Skip {
        stage: usize,
        reason: SkipReason,
    },
    NotRun {
        stage: usize,
    },
    Finish(RunStatus),
}

/// Illegal events are typed errors, never silently ignored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    #[error("event {0:?} names a stage the run does not have")]
    UnknownStage(Event),
    #[error("event {event:?} does not fit stage `{stage}` in state {status:?}")]
    Unexpected {
        event: Event,
        stage: String,
        status: StageStatus,
    },
    #[error("the run has already finished")]
    Finished,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunCore {
    stages: Vec<StageNode>,
    dependents: Vec<Vec<usize>>,
    status: Vec<StageStatus>,
    /// The stage finished and its pause is over (or there was none).
    released: Vec<bool>,
    /// The stage's condition was checked and holds; it starts when a slot is free.
    condition_passed: Vec<bool>,
    max_concurrent: usize,
    wait: Duration,
    stopping: bool,
    cancelled: bool,
    failed_hard: bool,
    failed_soft: bool,
    finished: Option<RunStatus>,
}

impl RunCore {
    /// `stages` in plan order; `max_concurrent` 0 means unlimited.
    pub fn new(stages: Vec<StageNode>, max_concurrent: usize, wait: Duration) -> Self {
        let n = stages.len();
        let mut dependents = vec![Vec::new(); n];
        for (i, s) in stages.iter().enumerate() {
            for &d in &s.deps {
                if d < n {
                    dependents[d].push(i);
                }
            }
        }
        RunCore {
            stages,
            dependents,
            status: vec![StageStatus::Waiting; n],
            released: vec![false; n],
            condition_passed: vec![false; n],
            max_concurrent: if max_concurrent == 0 {
                usize::MAX
            } else {
                max_concurrent
            },
            wait,
            stopping: false,
            cancelled: false,
            failed_hard: false,
            failed_soft: false,
            finished: None,
        }
    }

    /// Marks a stage as already succeeded (a resumed run, or a stage done before a crash).
    pub fn preset_succeeded(&mut self, stage: usize) {
        if stage < self.status.len() {
            self.status[stage] = StageStatus::Succeeded;
            self.released[stage] = true;
        }
    }

    pub fn status(&self, stage: usize) -> StageStatus {
        self.status[stage]
    }

    pub fn stages(&self) -> &[StageNode] {
        &self.stages
    }

    pub fn finished(&self) -> Option<RunStatus> {
        self.finished
    }

    pub fn running(&self) -> usize {
        self.status
            .iter()
            .filter(|s| matches!(s, StageStatus::Running))
            .count()
    }

    pub fn apply(&mut self, event: Event) -> Result<Vec<Action>, CoreError> {
        if self.finished.is_some() {
            return Err(CoreError::Finished);
        }
        let n = self.stages.len();
        let check = |stage: usize| {
            if stage < n {
                Ok(())
            } else {
                Err(CoreError::UnknownStage(event.clone()))
            }
        };
        let mut actions = Vec::new();
        match event {
            Event::Start => {}
            Event::Cancel => {
                self.cancelled = true;
                self.stopping = true;
                // Pauses no longer matter: nothing new will start.
                for i in 0..n {
                    if self.status[i].is_terminal() {
                        self.released[i] = true;
                    }
                }
            }
            Event::ConditionChecked { stage, runs } => {
                check(stage)?;
                self.expect(stage, StageStatus::Checking, &event)?;
                if runs {
                    // Dispatched by `advance` when a slot is free.
                    self.status[stage] = StageStatus::Waiting;
                    self.condition_passed[stage] = true;
                } else {
                    self.status[stage] = StageStatus::Skipped(SkipReason::Condition);
                    self.released[stage] = true;
                    actions.push(Action::Skip {
                        stage,
                        reason: SkipReason::Condition,
                    });
                }
            }
            Event::ConditionFailed { stage } => {
                check(stage)?;
                self.expect(stage, StageStatus::Checking, &event)?;
                self.finish_stage(stage, false, &mut actions);
            }
            Event::StageFinished { stage, ok } => {
                check(stage)?;
                self.expect(stage, StageStatus::Running, &event)?;
                self.finish_stage(stage, ok, &mut actions);
            }
            Event::Released { stage } => {
                check(stage)?;
                if self.cancelled && self.released[stage] {
                    // Cancel released every pause already.
                } else if !self.status[stage].is_terminal() || self.released[stage] {
                    return Err(CoreError::Unexpected {
                        event: event.clone(),
                        stage: self.stages[stage].name.clone(),
                        status: self.status[stage],
                    });
                } else {
                    self.released[stage] = true;
                }
            }
        }
        self.advance(&mut actions);
        Ok(actions)
    }

    fn finish_stage(&mut self, stage: usize, ok: bool, actions: &mut Vec<Action>) {
        if ok {
            self.status[stage] = StageStatus::Succeeded;
        } else {
            self.status[stage] = StageStatus::Failed;
            match self.stages[stage].on_failure {
                OnFailure::Stop => {
                    self.stopping = true;
                    self.failed_hard = true;
                }
                OnFailure::Continue => self.failed_soft = true,
                OnFailure::SkipDependents => {
                    self.failed_hard = true;
                    for d in self.transitive_dependents(stage) {
                        if self.status[d] == StageStatus::Waiting {
                            self.status[d] = StageStatus::Skipped(SkipReason::FailedDependency);
                            self.released[d] = true;
                            actions.push(Action::Skip {
                                stage: d,
                                reason: SkipReason::FailedDependency,
                            });
                        }
                    }
                }
            }
        }
        let continues = ok || self.stages[stage].on_failure == OnFailure::Continue;
        if continues && !self.wait.is_zero() && !self.dependents[stage].is_empty() && !self.stopping
        {
            actions.push(Action::Hold {
                stage,
                wait: self.wait,
            });
        } else {
            self.released[stage] = true;
        }
    }

    fn expect(&self, stage: usize, want: StageStatus, event: &Event) -> Result<(), CoreError> {
        if self.status[stage] == want {
            Ok(())
        } else {
            Err(CoreError::Unexpected {
                event: event.clone(),
                stage: self.stages[stage].name.clone(),
                status: self.status[stage],
            })
        }
    }

    fn transitive_dependents(&self, stage: usize) -> Vec<usize> {
        let mut seen = vec![false; self.stages.len()];
        let mut stack = vec![stage];
        let mut out = Vec::new();
        while let Some(i) = stack.pop() {
            for &d in &self.dependents[i] {
                if !seen[d] {
                    seen[d] = true;
                    out.push(d);
                    stack.push(d);
                }
            }
        }
        out.sort_unstable();
        out
    }

    /// A dependency no longer holds its dependents back.
    fn satisfied(&self, dep: usize) -> bool {
        self.released[dep]
            && match self.status[dep] {
                StageStatus::Succeeded | StageStatus::Skipped(SkipReason::Condition) => true,
                StageStatus::Failed => self.stages[dep].on_failure == OnFailure::Continue,
                _ => false,
            }
    }

    /// Starts what can start, and finishes the run when nothing more can happen.
    fn advance(&mut self, actions: &mut Vec<Action>) {
        if !self.stopping {
            for i in 0..self.stages.len() {
                if self.status[i] != StageStatus::Waiting
                    || !self.stages[i].deps.iter().all(|&d| self.satisfied(d))
                {
                    continue;
                }
                if self.stages[i].has_condition && !self.condition_passed[i] {
                    self.status[i] = StageStatus::Checking;
                    actions.push(Action::CheckCondition(i));
                    continue;
                }
                if self.running() >= self.max_concurrent {
                    break;
                }
                self.status[i] = StageStatus::Running;
                actions.push(Action::Dispatch(i));
            }
        }
        let busy = self
            .status
            .iter()
            .any(|s| matches!(s, StageStatus::Running | StageStatus::Checking))
            || (0..self.stages.len()).any(|i| self.status[i].is_terminal() && !self.released[i]);
        if busy {
            return;
        }
        // Nothing runs, nothing is held: whatever still waits can never start.
        for i in 0..self.stages.len() {
            if self.status[i] == StageStatus::Waiting {
                self.status[i] = StageStatus::NotRun;
                actions.push(Action::NotRun { stage: i });
            }
        }
        let outcome = if self.cancelled {
            RunStatus::Cancelled
        } else if self.failed_hard {
            RunStatus::Failed
        } else if self.failed_soft {
            RunStatus::SucceededWithFailures
        } else {
            RunStatus::Succeeded
        };
        self.finished = Some(outcome);
        actions.push(Action::Finish(outcome));
    }
}
