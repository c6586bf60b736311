//! Progress a person can follow while a run executes.
//!
//! On a terminal: a live view, one line per stage (waiting, running with its current
//! migration, succeeded, failed, skipped) under an overall bar whose clock ticks; a failed
//! run ends it in red with the reason; `--verbose` also prints log lines (command output,
//! retries) above it. Otherwise (a pipe, a CI log, `NO_COLOR`, `TERM=dumb`, `CI`, or
//! `--progress plain`): plain timestamped lines, one per stage start and end, migration,
//! request and log line. [`live_wanted`] decides.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::store::{EventKind, EventRecord};

/// `--progress`: how a run's progress is shown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// The live view on a terminal, plain lines otherwise (and under NO_COLOR, TERM=dumb
    /// or CI).
    #[default]
    Auto,
    /// The live view, even when stdout is not a terminal.
    Tty,
    /// Plain timestamped lines.
    Plain,
}

/// Whether to draw the live view: `mode`, else whether stdout is a terminal that wants it
/// (`env` is the process environment: `NO_COLOR`, `TERM=dumb` and `CI` ask for plain lines).
pub(super) fn live_wanted(mode: ProgressMode, env: &BTreeMap<String, String>) -> bool {
    use std::io::IsTerminal;
    match mode {
        ProgressMode::Tty => true,
        ProgressMode::Plain => false,
        ProgressMode::Auto => {
            std::io::stdout().is_terminal()
                && !env.contains_key("NO_COLOR")
                && env.get("TERM").is_none_or(|t| t != "dumb")
                && env.get("CI").is_none_or(|c| c.is_empty() || c == "false")
        }
    }
}

/// Where run events are shown.
pub(super) enum Progress<'o> {
    Lines(&'o mut dyn Write),
    Live(Live),
}

pub(super) struct Live {
    /// Kept so the bars stay drawn together, and to print log lines above them.
    multi: MultiProgress,
    overall: ProgressBar,
    stages: BTreeMap<String, ProgressBar>,
    /// Print log lines (command output, retries) above the bars.
    verbose: bool,
    /// The first stage failure, for the red end of a failed run.
    failure: Option<String>,
}

impl<'o> Progress<'o> {
    /// A live view when `live` (see [`live_wanted`]), else lines on `out`.
    pub(super) fn new(
        live: bool,
        verbose: bool,
        stages: &[String],
        out: &'o mut dyn Write,
    ) -> Progress<'o> {
        if !live {
            return Progress::Lines(out);
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let overall = multi.add(ProgressBar::new(stages.len() as u64));
        overall.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} stages  {elapsed}  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        // The clock ticks while nothing else happens.
        overall.enable_steady_tick(Duration::from_millis(500));
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
            multi,
            overall,
            stages: bars,
            verbose,
            failure: None,
        })
    }

    pub(super) fn event(&mut self, e: &EventRecord) -> std::io::Result<()> {
        match self {
            // Log lines (command output, retries) too, prefixed like `runs logs`.
            Progress::Lines(out) => match super::run::log_line(e) {
                // One write per line: stdout's line buffer would write a `writeln!`'s text
                // and its newline with two calls.
                Some(line) => out.write_all(format!("{line}\n").as_bytes()),
                None => super::run::print_event(*out, e),
            },
            Progress::Live(live) => {
                live.event(e);
                Ok(())
            }
        }
    }

    /// Shows `batch`, in order; as lines, with one write.
    pub(super) fn events(&mut self, batch: &[EventRecord]) -> std::io::Result<()> {
        match self {
            Progress::Lines(out) => {
                let mut text = Vec::new();
                for e in batch {
                    Progress::Lines(&mut text).event(e)?;
                }
                out.write_all(&text)
            }
            Progress::Live(live) => {
                for e in batch {
                    live.event(e);
                }
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
        if let EventKind::RunFinished { status } = &e.kind {
            self.overall.disable_steady_tick();
            if *status == crate::store::RunStatus::Failed
                || *status == crate::store::RunStatus::Cancelled
            {
                let red = ProgressStyle::with_template(
                    "{bar:30.red} {pos}/{len} stages  {elapsed}  {msg:.red}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar());
                self.overall.set_style(red);
                let why = self.failure.clone().unwrap_or_default();
                self.overall
                    .abandon_with_message(format!("run {}: {why}", status.as_str()));
            }
            return;
        }
        if self.verbose {
            if let Some(line) = super::run::log_line(e) {
                let _ = self.multi.println(line);
            }
        }
        // Approvals are decisions people wait on: always shown, with who may decide and how.
        if matches!(
            e.kind,
            EventKind::AwaitingApproval { .. }
                | EventKind::Approved { .. }
                | EventKind::Rejected { .. }
        ) {
            if let Some(text) = crate::status::event_text(e) {
                let _ = self.multi.println(text);
            }
            let waiting = matches!(e.kind, EventKind::AwaitingApproval { .. });
            self.overall
                .set_message(if waiting { "awaiting approval" } else { "" });
            if let Some(bar) = e.stage.as_ref().and_then(|s| self.stages.get(s)) {
                if waiting {
                    bar.set_message("awaiting approval");
                }
            }
            return;
        }
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
                if self.failure.is_none() {
                    let stage = e.stage.clone().unwrap_or_default();
                    self.failure = Some(format!("{stage} failed: {message}"));
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{RunStatus, FORMAT};

    /// Records each `write` call.
    #[derive(Default)]
    struct Calls(Vec<Vec<u8>>);

    impl Write for Calls {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn event(seq: u64, stage: Option<&str>, kind: EventKind) -> EventRecord {
        EventRecord {
            v: FORMAT,
            seq,
            at_ms: 0,
            stage: stage.map(str::to_owned),
            kind,
        }
    }

    #[test]
    fn a_batch_of_events_is_shown_in_order_with_one_write() {
        let batch = [
            event(
                1,
                Some("network"),
                EventKind::StageStarted {
                    attempt: 1,
                    token: 0,
                },
            ),
            event(
                2,
                Some("network"),
                EventKind::StageSucceeded { duration_ms: 1500 },
            ),
            event(
                3,
                None,
                EventKind::RunFinished {
                    status: RunStatus::Succeeded,
                },
            ),
        ];
        let mut calls = Calls::default();
        let mut progress = Progress::new(false, false, &["network".to_owned()], &mut calls);
        progress.events(&batch).unwrap();
        progress.events(&[]).unwrap();
        // One write for the batch; an empty batch writes nothing.
        assert_eq!(calls.0.len(), 1);
        let text = String::from_utf8(calls.0.concat()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].ends_with("network          started"), "{text}");
        assert!(
            lines[1].contains("network") && lines[1].contains("succeeded"),
            "{text}"
        );
        assert!(lines[2].contains("succeeded"), "{text}");
    }
}
