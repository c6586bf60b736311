//! Planning `stages down`: which stages to roll back, in reverse dependency order.
//!
//! Selection (COMPAT.md): all stages; `--stage X` (X only); `--from C --to S` (C back to S
//! inclusive: C is the later stage, S the earlier one). A stage whose dependents still have
//! applied migrations is refused, naming them, unless `cascade` adds those dependents.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use baton_common::spec::Project;
use petgraph::Direction;

use super::{checked_graph, lookup_stage, project_inputs};

use super::{display, History, Plan, PlanError, PlannedStage, Selection};

/// What to do about dependents, outside the selection, that still have applied migrations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependents {
    /// Refuse, naming them (the default of `stages down`).
    Refuse,
    /// Roll them back too (`--cascade`).
    Cascade,
    /// Leave them (rollback on failure undoes only what the failed run changed).
    Leave,
}

pub fn plan_down(
    project: &Project,
    selection: &Selection,
    history: &dyn History,
    dependents: Dependents,
) -> Result<Plan, PlanError> {
    let (graph, index, names) = checked_graph(project)?;
    let spec = &project.spec;
    let n = spec.stages.len();
    let lookup = |name: &str, flag: &str| lookup_stage(&index, &names, name, flag);
    let mut selected: BTreeSet<usize> = match selection {
        Selection::All => (0..n).collect(),
        Selection::Stages { names: wanted } => wanted
            .iter()
            .map(|w| lookup(w, "--stage"))
            .collect::<Result<_, _>>()?,
        // Down runs from the later stage back to the earlier one: `--from X` alone is X and
        // what it depends on, `--to Y` alone is Y and what depends on it.
        Selection::Range { from, to } if to.is_empty() => {
            graph.with_reach(lookup(from, "--from")?, Direction::Incoming)
        }
        Selection::Range { from, to } if from.is_empty() => {
            graph.with_reach(lookup(to, "--to")?, Direction::Outgoing)
        }
        Selection::Range { from, to } => {
            let later = lookup(from, "--from")?;
            let earlier = lookup(to, "--to")?;
            graph.between(earlier, later).ok_or_else(|| {
                PlanError::Selection(format!(
                    "--from {from} --to {to} selects no stages to roll back: `{from}` does not depend on `{to}` (down runs from a later stage back to an earlier one)"
                ))
            })?
        }
    };
    let applied = |i: usize| !history.applied_versions(names[i]).is_empty();
    // Dependents still applied hold their dependencies in place.
    let mut blocked: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    for &i in &selected {
        for d in graph.reach(i, Direction::Outgoing) {
            if !selected.contains(&d) && applied(d) {
                blocked.entry(i).or_default().insert(d);
            }
        }
    }
    if !blocked.is_empty() && dependents != Dependents::Leave {
        if dependents == Dependents::Cascade {
            for ds in blocked.values() {
                selected.extend(ds.iter().copied());
            }
        } else {
            let (i, ds) = blocked
                .iter()
                .next()
                .map(|(i, ds)| (*i, ds.clone()))
                .unwrap_or_default();
            let list: Vec<&str> = ds.iter().map(|&d| names[d]).collect();
            return Err(PlanError::Selection(format!(
                "stage {} cannot be rolled back while stages that depend on it are applied: {} (roll those back first, or add --cascade)",
                names[i],
                list.join(", ")
            )));
        }
    }
    // Reverse topological order: a stage after every selected stage that depends on it.
    let mut outdegree = vec![0usize; n];
    for &i in &selected {
        outdegree[i] = graph
            .dependents(i)
            .iter()
            .filter(|d| selected.contains(d))
            .count();
    }
    let mut ready: BinaryHeap<Reverse<usize>> = selected
        .iter()
        .filter(|&&i| outdegree[i] == 0)
        .map(|&i| Reverse(n - 1 - i))
        .collect();
    let mut order = Vec::with_capacity(selected.len());
    let mut wave_of = vec![0usize; n];
    while let Some(Reverse(r)) = ready.pop() {
        let i = n - 1 - r;
        order.push(i);
        for d in graph.deps(i) {
            if !selected.contains(&d) {
                continue;
            }
            wave_of[d] = wave_of[d].max(wave_of[i] + 1);
            outdegree[d] -= 1;
            if outdegree[d] == 0 {
                ready.push(Reverse(n - 1 - d));
            }
        }
    }
    let planned: Vec<PlannedStage> = order
        .iter()
        .map(|&i| {
            let s = &spec.stages[i];
            let loaded = &project.stages[i];
            let versions = history.applied_versions(&s.name.value);
            let mut pending: Vec<(u64, String)> = versions
                .iter()
                .map(|v| {
                    let name = loaded
                        .migrations
                        .iter()
                        .find(|m| m.version == *v)
                        .map_or_else(|| "(file removed)".to_owned(), |m| m.name.clone());
                    (*v, name)
                })
                .collect();
            pending.reverse();
            PlannedStage {
                name: s.name.value.clone(),
                index: i,
                depends_on: graph
                    .dependents(i)
                    .into_iter()
                    .filter(|d| selected.contains(d))
                    .map(|d| names[d].to_owned())
                    .collect(),
                wave: wave_of[i],
                on_failure: baton_common::spec::OnFailure::Stop,
                timeout: s.timeout.as_ref().map(|t| t.value),
                pending,
                applied: versions.len(),
                imports: Vec::new(),
                exports: Vec::new(),
                condition: None,
                forecast: None,
            }
        })
        .collect();
    let wave_count = planned.iter().map(|p| p.wave + 1).max().unwrap_or(0);
    let mut waves = vec![Vec::new(); wave_count];
    for (k, p) in planned.iter().enumerate() {
        waves[p.wave].push(k);
    }
    let inputs = project_inputs(project);
    let (digest, release) = super::digests(project, &inputs);
    Ok(Plan {
        stages_file: display(&project.stages_file),
        direction: "down",
        selection: selection.clone(),
        order: planned,
        waves,
        uses_history_of: Vec::new(),
        max_concurrent_stages: spec.global.max_concurrent_stages.as_ref().map(|m| m.value),
        wait_between_stages: None,
        rollback_on_failure: false,
        digest,
        release,
        environment: project.spec.environment_name().map(str::to_owned),
        inputs,
        up_to: BTreeMap::new(),
        down_to: BTreeMap::new(),
    })
}

/// The migrations a down plan would roll back that have no `down` step (or whose file is
/// gone), as `stage `s`: 002_name`: without `--skip-missing-down` the run would stop at the
/// first, so the command refuses before it asks or changes anything.
pub fn missing_down(project: &Project, plan: &Plan) -> Vec<String> {
    let mut out = Vec::new();
    for stage in &plan.order {
        let Some(loaded) = project.stages.get(stage.index) else {
            continue;
        };
        for (version, name) in &stage.pending {
            let has_down = loaded
                .migrations
                .iter()
                .any(|m| m.version == *version && m.down.is_some());
            if !has_down {
                out.push(format!("stage `{}`: {version:03}_{name}", stage.name));
            }
        }
    }
    out
}
