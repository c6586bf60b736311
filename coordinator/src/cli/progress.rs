//! Progress a person can follow while a run executes.
//!
//! On a terminal: a live view, one line per stage (waiting, running with its current
//! migration, succeeded, failed, skipped) under an overall bar. Otherwise (a pipe, a CI
//! log): plain timestamped lines, one per stage start and end, migration and request.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::store::{EventKind, EventRecord};

/// Where run events are shown.
pub(super) enum Progress<'o> {
    Lines(&'o mut dyn Write),
    Live(Live),
}

pub(super) struct Live {
    /// Kept so the bars stay drawn together; dropping it would detach them.
    _multi: MultiProgress,
    overall: ProgressBar,
    stages: BTreeMap<String, ProgressBar>,
}

impl<'o> Progress<'o> {
    /// A live view when `live` (stdout is a terminal), else lines on `out`.
    pub(super) fn new(live: bool, stages: &[String], out: &'o mut dyn Write) -> Progress<'o> {
        if !live {
            return Progress::Lines(out);
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let overall = multi.add(ProgressBar::new(stages.len() as u64));
        overall.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} stages  {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let width = stages.iter().map(String::len).max().unwrap_or(0);
        let style =
            ProgressStyle::with_template(&format!("{{spinner}} {{prefix:{width}}}  {{msg}}"))
                .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let mut bars = BTreeMap::new();
        for s in stages {
            let bar = multi.add(ProgressBar::new_spinner());
            bar.set_style(style.clone());
            bar.set_prefix(s.clone());
            bar.set_message("waiting");
            bars.insert(s.clone(), bar);
        }
        Progress::Live(Live {
            _multi: multi,
            overall,
            stages: bars,
        })
    }

    pub(super) fn event(&mut self, e: &EventRecord) -> std::io::Result<()> {
        match self {
            Progress::Lines(out) => super::run::print_event(*out, e),
            Progress::Live(live) => {
                live.event(e);
                Ok(())
            }
        }
    }

    /// Leaves the final state of every stage on screen.
    pub(super) fn finish(&mut self) {
        if let Progress::Live(live) = self {
            for bar in live.stages.values() {
                if !bar.is_finished() {
                    bar.finish();
                }
            }
            live.overall.finish();
        }
    }
}

impl Live {
    fn event(&mut self, e: &EventRecord) {
        let Some(bar) = e.stage.as_ref().and_then(|s| self.stages.get(s)) else {
            return;
        };
        let done = |bar: &ProgressBar, overall: &ProgressBar, msg: String| {
            bar.finish_with_message(msg);
            overall.inc(1);
        };
        match &e.kind {
            EventKind::StageStarted { .. } => {
                bar.enable_steady_tick(Duration::from_millis(120));
                bar.set_message("running");
            }
            EventKind::MigrationStarted {
                version,
                name,
                direction,
            } => {
                bar.set_message(format!("running {version:03}_{name} ({direction})"));
            }
            EventKind::StageSucceeded { duration_ms } => {
                done(
                    bar,
                    &self.overall,
                    format!("succeeded in {:.1}s", *duration_ms as f64 / 1000.0),
                );
            }
            EventKind::StageFailed { message } => {
                done(bar, &self.overall, format!("FAILED: {message}"))
            }
            EventKind::StageSkipped { reason } => {
                done(bar, &self.overall, format!("skipped ({reason})"))
            }
            EventKind::StageNotRun { reason } => {
                done(bar, &self.overall, format!("not run: {reason}"))
            }
            EventKind::NeedsAttention { migration, .. } => {
                bar.set_message(format!(
                    "NEEDS ATTENTION: {migration} in doubt (baton runs resolve)"
                ));
            }
            EventKind::AttemptLost { attempt, .. } => {
                bar.set_message(format!("attempt {attempt} lost; starting again"));
            }
            _ => {}
        }
    }
}
