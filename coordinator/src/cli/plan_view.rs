//! The plan as a person reads it: waves of stages that may run in parallel, with pending
//! migrations, variable flow and condition forecasts.

use std::io::Write;

use baton_common::spec::duration;
use baton_common::spec::OnFailure;

use crate::planner::{ConditionForecast, Plan, PlannedStage};

pub(super) fn write_text(plan: &Plan, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(out, "dry run: no request will be sent")?;
    if plan.direction == "down" {
        writeln!(
            out,
            "rolling back, newest migration first; a stage after every stage that depends on it"
        )?;
    }
    let stages = plan.order.len();
    writeln!(
        out,
        "plan for {}{}: {} stage{} in {} wave{} (digest {})",
        super::shown_project(&plan.stages_file),
        plan.environment
            .as_ref()
            .map(|e| format!(" in {e}"))
            .unwrap_or_default(),
        stages,
        if stages == 1 { "" } else { "s" },
        plan.waves.len(),
        if plan.waves.len() == 1 { "" } else { "s" },
        &plan.digest[..12]
    )?;
    writeln!(
        out,
        "settings: max_concurrent_stages {}, wait_between_stages {}, rollback_on_failure {}",
        plan.max_concurrent_stages
            .map_or("unlimited".to_owned(), |n| n.to_string()),
        plan.wait_between_stages
            .map_or("none".to_owned(), duration::format),
        plan.rollback_on_failure
    )?;
    if !plan.uses_history_of.is_empty() {
        writeln!(
            out,
            "uses stored results of: {}",
            plan.uses_history_of.join(", ")
        )?;
    }
    let width = plan.order.iter().map(|s| s.name.len()).max().unwrap_or(0);
    for (w, wave) in plan.waves.iter().enumerate() {
        writeln!(out)?;
        if wave.len() > 1 {
            writeln!(out, "wave {} ({} stages in parallel):", w + 1, wave.len())?;
        } else {
            writeln!(out, "wave {}:", w + 1)?;
        }
        for &k in wave {
            write_stage(&plan.order[k], width, plan.direction == "down", out)?;
        }
    }
    Ok(())
}

fn write_stage(
    s: &PlannedStage,
    width: usize,
    down: bool,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let (none, some) = if down {
        ("nothing to roll back", "to roll back")
    } else {
        ("nothing pending", "pending")
    };
    let pending = if s.pending.is_empty() {
        none.to_owned()
    } else {
        let list: Vec<String> = s
            .pending
            .iter()
            .map(|(v, n)| format!("{v:03}_{n}"))
            .collect();
        format!("{} {some}: {}", s.pending.len(), list.join(", "))
    };
    let applied = if s.applied > 0 && !down {
        format!(" ({} applied)", s.applied)
    } else {
        String::new()
    };
    writeln!(out, "  {:width$}  {pending}{applied}", s.name)?;
    let pad = " ".repeat(width + 4);
    if !s.depends_on.is_empty() {
        let label = if down { "after rolling back" } else { "after" };
        writeln!(out, "{pad}{label}: {}", s.depends_on.join(", "))?;
    }
    for (from, vars) in &s.imports {
        writeln!(out, "{pad}imports from {from}: {}", vars.join(", "))?;
    }
    if !s.exports.is_empty() {
        writeln!(out, "{pad}exports: {}", s.exports.join(", "))?;
    }
    if let (Some(c), Some(f)) = (&s.condition, &s.forecast) {
        let verdict = match f {
            ConditionForecast::Runs => "runs".to_owned(),
            ConditionForecast::Skipped => "skipped (condition)".to_owned(),
            ConditionForecast::AtRunTime { reason } => format!("decided at run time: {reason}"),
        };
        writeln!(out, "{pad}condition `{c}`: {verdict}")?;
    }
    if s.on_failure != OnFailure::Stop {
        writeln!(out, "{pad}on_failure: {}", s.on_failure.as_str())?;
    }
    if let Some(t) = s.timeout {
        writeln!(out, "{pad}timeout: {}", duration::format(t))?;
    }
    Ok(())
}
