//! The planner: a loaded [`Project`] and a selection into an immutable [`Plan`].
//!
//! Pure: no async, no I/O. The dependency graph lives here (petgraph): cycles are found
//! with Tarjan's algorithm and reported as a real cycle of the input, in full; the order is
//! a topological sort that breaks ties by file order, so the same spec always yields the
//! same plan. The plan carries a digest over every file the project read, so a run always
//! executes what was planned (and, later, approved).
//!
//! Invariants of a [`Plan`]: `order` is a topological order of the selected stages (every
//! stage appears after all its selected dependencies); `waves[i]` holds the stages whose
//! longest dependency chain within the selection has length `i`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::path::Path;
use std::time::Duration;

use baton_common::diag::{closest, Diagnostics};
use baton_common::spec::{sha256_hex, OnFailure, Project, StagesSpec};
use baton_common::template::{Scope, TemplateErrorKind};
use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::Direction;
use serde::Serialize;

/// Which stages to run.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Selection {
    #[default]
    All,
    /// `--stage X`: only these stages.
    Stages { names: Vec<String> },
    /// `--from A --to B`: the stages on paths from A to B, both included. One side may be
    /// empty: `--from A` alone is A and every stage after it (its dependents, transitively),
    /// `--to B` alone is B and every stage before it (for `down`, the other way round).
    Range { from: String, to: String },
}

/// What earlier runs left behind; the store implements it, dry runs without state use
/// [`NoHistory`].
pub trait History {
    /// The stage's last run succeeded (its exported variables are stored).
    fn stage_succeeded(&self, stage: &str) -> bool;
    /// Versions of the stage's migrations already applied.
    fn applied_versions(&self, stage: &str) -> BTreeSet<u64>;
}

/// No earlier runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHistory;

impl History for NoHistory {
    fn stage_succeeded(&self, _: &str) -> bool {
        false
    }
    fn applied_versions(&self, _: &str) -> BTreeSet<u64> {
        BTreeSet::new()
    }
}

/// Why planning failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// Problems in the files (cycles, `env_from_stages` outside the dependencies).
    #[error("the stages file is invalid")]
    Invalid(Diagnostics),
    /// A bad `--stage` / `--from` / `--to`.
    #[error("{0}")]
    Selection(String),
    /// A selected stage depends on a stage that never ran.
    #[error("{0}")]
    History(String),
}

/// What the static variables say a condition will do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ConditionForecast {
    Runs,
    Skipped,
    /// Depends on values only known during the run (exports, outcomes, the agent's environment).
    AtRunTime {
        reason: String,
    },
}

/// One selected stage in the plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlannedStage {
    pub name: String,
    /// Position in the stages file (0-based).
    pub index: usize,
    /// Names of the stage's direct dependencies, in file order.
    pub depends_on: Vec<String>,
    /// The stage's wave, from 0 here; written from 1 in JSON, as the text view numbers them.
    #[serde(serialize_with = "ser_wave")]
    pub wave: usize,
    pub on_failure: OnFailure,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_opt_duration"
    )]
    pub timeout: Option<Duration>,
    /// (version, name) of migrations not yet applied, in order.
    pub pending: Vec<(u64, String)>,
    /// Number of migrations already applied.
    pub applied: usize,
    /// Variables imported from other stages: (from stage, variables).
    pub imports: Vec<(String, Vec<String>)>,
    /// Variables the stage's migrations export.
    pub exports: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forecast: Option<ConditionForecast>,
}

/// An immutable execution plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub stages_file: String,
    /// `up`, or `down` (then `pending` lists the migrations to roll back, newest first, and
    /// `depends_on` names the stages that must be rolled back first).
    pub direction: &'static str,
    pub selection: Selection,
    /// Selected stages in execution order.
    pub order: Vec<PlannedStage>,
    /// Indices into `order`, grouped into waves of stages that may run in parallel.
    pub waves: Vec<Vec<usize>>,
    /// Stages outside the selection whose stored results the selection uses.
    pub uses_history_of: Vec<String>,
    pub max_concurrent_stages: Option<u64>,
    #[serde(serialize_with = "ser_opt_duration")]
    pub wait_between_stages: Option<Duration>,
    pub rollback_on_failure: bool,
    /// SHA-256 over every input file's path and digest, hex.
    pub digest: String,
    /// Every file read, with its SHA-256.
    pub inputs: BTreeMap<String, String>,
    /// The environment the plan is for (`--environment`); absent without environments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    /// The release: SHA-256 over the project's files without the environment's variables
    /// file, so the same files give the same release in every environment (what promotion
    /// compares). The plan's `digest` also covers the environment and `--set`.
    pub release: String,
    /// `baton up --to VERSION`: per stage, the highest version this run applies (see
    /// [`Plan::cap_up`]). Kept in the stored plan, so a resumed run keeps its cap.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub up_to: BTreeMap<String, u64>,
    /// `baton down --to VERSION`: per stage, the version this run rolls back to (absent:
    /// all of it); see [`Plan::cap_down`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub down_to: BTreeMap<String, u64>,
}

impl Plan {
    /// Applies `stage`'s migrations only up to `version` (apirun's `up --to`): the rest stay
    /// pending, and the digest covers the cap.
    pub fn cap_up(&mut self, stage: &str, version: u64) {
        for s in self.order.iter_mut().filter(|s| s.name == stage) {
            s.pending.retain(|(v, _)| *v <= version);
        }
        self.up_to.insert(stage.to_owned(), version);
        self.cover_cap("up_to", stage, version);
    }

    /// Rolls `stage` back only down to `version` (apirun's `down --to`; 0: all of it): the
    /// rest stays applied, and the digest covers the cap.
    pub fn cap_down(&mut self, stage: &str, version: u64) {
        for s in self.order.iter_mut().filter(|s| s.name == stage) {
            s.pending.retain(|(v, _)| *v > version);
        }
        self.down_to.insert(stage.to_owned(), version);
        self.cover_cap("down_to", stage, version);
    }

    fn cover_cap(&mut self, what: &str, stage: &str, version: u64) {
        let mut buf = std::mem::take(&mut self.digest).into_bytes();
        buf.extend_from_slice(format!("\n{what} {stage} {version}").as_bytes());
        self.digest = sha256_hex(&buf);
    }
}

fn ser_wave<S: serde::Serializer>(wave: &usize, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(*wave).map_or(u64::MAX, |w| w + 1))
}

fn ser_opt_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&baton_common::spec::duration::format(*d)),
        None => s.serialize_none(),
    }
}

/// The dependency graph of a project: an edge `dependency -> dependent`.
pub(crate) struct Graph {
    g: DiGraph<usize, ()>,
    nodes: Vec<NodeIndex>,
}

impl Graph {
    pub(crate) fn build(spec: &StagesSpec) -> Self {
        let mut g = DiGraph::with_capacity(spec.stages.len(), spec.stages.len() * 2);
        let nodes: Vec<NodeIndex> = (0..spec.stages.len()).map(|i| g.add_node(i)).collect();
        let index = spec.index();
        // `added_for[d] == i`: the edge d -> i is in (a dependency named twice is one edge).
        let mut added_for = vec![usize::MAX; spec.stages.len()];
        for (i, s) in spec.stages.iter().enumerate() {
            for dep in &s.depends_on {
                if let Some(&d) = index.get(dep.value.as_str()) {
                    if d != i && added_for[d] != i {
                        added_for[d] = i;
                        g.add_edge(nodes[d], nodes[i], ());
                    }
                }
            }
        }
        Graph { g, nodes }
    }

    /// Direct dependencies of stage `i`, in file order.
    pub(crate) fn deps(&self, i: usize) -> Vec<usize> {
        let mut d: Vec<usize> = self
            .g
            .neighbors_directed(self.nodes[i], Direction::Incoming)
            .map(|n| self.g[n])
            .collect();
        d.sort_unstable();
        d
    }

    pub(crate) fn dependents(&self, i: usize) -> Vec<usize> {
        let mut d: Vec<usize> = self
            .g
            .neighbors_directed(self.nodes[i], Direction::Outgoing)
            .map(|n| self.g[n])
            .collect();
        d.sort_unstable();
        d
    }

    /// Every stage reachable from `start` following `dir`, `start` excluded.
    /// `start` and every stage [`StageGraph::reach`] finds from it.
    pub(crate) fn with_reach(&self, start: usize, dir: Direction) -> BTreeSet<usize> {
        let mut set = self.reach(start, dir);
        set.insert(start);
        set
    }

    pub(crate) fn reach(&self, start: usize, dir: Direction) -> BTreeSet<usize> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![start];
        while let Some(i) = stack.pop() {
            for n in self.g.neighbors_directed(self.nodes[i], dir) {
                let j = self.g[n];
                if seen.insert(j) {
                    stack.push(j);
                }
            }
        }
        seen
    }

    /// The stages on dependency paths from `earlier` to `later`, both included; `None` when
    /// `later` does not (transitively) depend on `earlier`.
    pub(crate) fn between(&self, earlier: usize, later: usize) -> Option<BTreeSet<usize>> {
        if earlier == later {
            return Some(BTreeSet::from([earlier]));
        }
        let below = self.reach(earlier, Direction::Outgoing);
        if !below.contains(&later) {
            return None;
        }
        let above = self.reach(later, Direction::Incoming);
        let mut set: BTreeSet<usize> = below.intersection(&above).copied().collect();
        set.insert(earlier);
        set.insert(later);
        Some(set)
    }

    /// Is `target` a transitive dependency of `stage`?
    fn depends_transitively(&self, stage: usize, target: usize) -> bool {
        if self.deps(stage).contains(&target) {
            return true;
        }
        self.reach(stage, Direction::Incoming).contains(&target)
    }

    /// One real cycle for every strongly connected component that has one, each as stage
    /// indices in `depends_on` direction, starting at its first stage in file order.
    fn cycles(&self) -> Vec<Vec<usize>> {
        let mut out = Vec::new();
        for scc in tarjan_scc(&self.g) {
            if scc.len() < 2 {
                continue;
            }
            let members: BTreeSet<usize> = scc.iter().map(|n| self.g[*n]).collect();
            let start = *members.iter().next().unwrap_or(&0);
            // Walk dependency edges inside the component until we return to `start`: a
            // breadth-first search gives the shortest such cycle.
            let mut prev: HashMap<usize, usize> = HashMap::new();
            let mut queue = std::collections::VecDeque::from([start]);
            let mut found = None;
            while let Some(i) = queue.pop_front() {
                for d in self.deps(i) {
                    if !members.contains(&d) {
                        continue;
                    }
                    if d == start {
                        found = Some(i);
                        break;
                    }
                    if let std::collections::hash_map::Entry::Vacant(e) = prev.entry(d) {
                        e.insert(i);
                        queue.push_back(d);
                    }
                }
                if found.is_some() {
                    break;
                }
            }
            let Some(mut last) = found else { continue };
            let mut path = vec![last];
            while last != start {
                last = prev[&last];
                path.push(last);
            }
            path.reverse();
            out.push(path);
        }
        out.sort();
        out
    }
}

/// Checks the dependency graph of a stages file: cycles and `env_from_stages` outside the
/// dependencies. Works on a spec whose other files had errors, so every problem is
/// reported at once. Empty when the graph can be planned.
pub fn check(spec: &StagesSpec, stages_file: &Path) -> Diagnostics {
    check_graph(spec, stages_file, &Graph::build(spec))
}

pub(crate) fn check_graph(spec: &StagesSpec, file: &Path, graph: &Graph) -> Diagnostics {
    let mut diags = Diagnostics::new();
    let cycles = graph.cycles();
    for cycle in &cycles {
        let mut names: Vec<&str> = cycle
            .iter()
            .map(|&i| spec.stages[i].name.value.as_str())
            .collect();
        names.push(names[0]);
        let first = &spec.stages[cycle[0]];
        let next = &spec.stages[cycle[1 % cycle.len()]].name.value;
        let pos = first
            .depends_on
            .iter()
            .find(|d| &d.value == next)
            .map_or(first.name.pos, |d| d.pos);
        diags
            .error(
                file,
                pos,
                format!("circular dependency detected: {}", names.join(" -> ")),
            )
            .with_help("remove one of these depends_on entries");
    }
    if !cycles.is_empty() {
        // Transitive checks are meaningless on a cyclic graph.
        return diags;
    }
    let index = spec.index();
    for (i, s) in spec.stages.iter().enumerate() {
        for efs in &s.env_from_stages {
            let Some(&j) = index.get(efs.stage.value.as_str()) else {
                continue;
            };
            if j != i && !graph.depends_transitively(i, j) {
                diags.error(
                    file,
                    efs.stage.pos,
                    format!("stage `{}`: env_from_stages names `{}`, which is not a dependency (add it to depends_on)", s.name.value, efs.stage.value),
                );
            }
        }
    }
    diags
}

/// The project's graph, checked (cycles, `env_from_stages`), with stage indices by name and
/// the names in file order: what every planning starts from.
#[allow(clippy::type_complexity)]
pub(crate) fn checked_graph(
    project: &Project,
) -> Result<(Graph, HashMap<&str, usize>, Vec<&str>), PlanError> {
    let graph = Graph::build(&project.spec);
    let diags = check_graph(&project.spec, &project.stages_file, &graph);
    if diags.has_errors() {
        return Err(PlanError::Invalid(diags));
    }
    let names = project
        .spec
        .stages
        .iter()
        .map(|s| s.name.value.as_str())
        .collect();
    Ok((graph, project.spec.index(), names))
}

/// A stage named on the command line, or an error naming the flag and the closest name.
pub(crate) fn lookup_stage(
    index: &HashMap<&str, usize>,
    names: &[&str],
    name: &str,
    flag: &str,
) -> Result<usize, PlanError> {
    index.get(name).copied().ok_or_else(|| {
        let hint = closest(name, names.iter().copied())
            .map_or(String::new(), |c| format!(" (did you mean `{c}`?)"));
        PlanError::Selection(format!("{flag} names unknown stage `{name}`{hint}"))
    })
}

/// What `stages down` says when migrations it would roll back have no `down` step.
pub fn missing_down_message(missing: &[String]) -> String {
    format!(
        "`stages down` cannot roll back these migrations: they have no `down` step\n  {}\nnothing was rolled back; add --skip-missing-down to pass over them (what they did stays)",
        missing.join("\n  ")
    )
}

/// What a run will know besides the files: its `--set` values, and the environment its
/// conditions are evaluated in (the CLI's own in local mode; none on a coordinator, whose
/// conditions see no process environment).
#[derive(Debug, Clone, Default)]
pub struct PlanVars {
    pub overrides: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
}

/// Plans a loaded project with no `--set` values and no environment.
pub fn plan(
    project: &Project,
    selection: &Selection,
    history: &dyn History,
) -> Result<Plan, PlanError> {
    plan_with(project, selection, history, &PlanVars::default())
}

/// Plans a loaded project: conditions are forecast with every source the run will use, and
/// the digest covers the `--set` values (see [`cover_overrides`]).
pub fn plan_with(
    project: &Project,
    selection: &Selection,
    history: &dyn History,
    plan_vars: &PlanVars,
) -> Result<Plan, PlanError> {
    // The inputs' digests need only the files read: for a large project they are computed on
    // a thread of their own while the stages are planned.
    if project.inputs.len() < PARALLEL_INPUTS {
        return plan_stages(project, selection, history, plan_vars, || {
            inputs_and_digests(project)
        });
    }
    std::thread::scope(|scope| {
        let hashing = scope.spawn(|| inputs_and_digests(project));
        plan_stages(project, selection, history, plan_vars, || {
            hashing
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    })
}

/// A project that read at least this many files hashes them beside planning its stages.
const PARALLEL_INPUTS: usize = 1024;

/// The project's inputs by relative path (see [`project_inputs`]), its plan digest and its
/// release (see [`digests`]).
fn inputs_and_digests(project: &Project) -> (BTreeMap<String, String>, String, String) {
    let inputs = project_inputs(project);
    let (digest, release) = digests(project, &inputs);
    (inputs, digest, release)
}

/// [`plan_with`], with the inputs and their digests from `inputs`, asked for at the end.
fn plan_stages(
    project: &Project,
    selection: &Selection,
    history: &dyn History,
    plan_vars: &PlanVars,
    inputs: impl FnOnce() -> (BTreeMap<String, String>, String, String),
) -> Result<Plan, PlanError> {
    let (graph, index, names) = checked_graph(project)?;
    let spec = &project.spec;
    let n = spec.stages.len();
    let lookup = |name: &str, flag: &str| lookup_stage(&index, &names, name, flag);

    let selected: BTreeSet<usize> = match selection {
        Selection::All => (0..n).collect(),
        Selection::Stages { names: wanted } => {
            let mut set = BTreeSet::new();
            for w in wanted {
                set.insert(lookup(w, "--stage")?);
            }
            if set.is_empty() {
                return Err(PlanError::Selection("--stage needs a stage name".into()));
            }
            set
        }
        Selection::Range { from, to } if to.is_empty() => {
            let a = lookup(from, "--from")?;
            graph.with_reach(a, Direction::Outgoing)
        }
        Selection::Range { from, to } if from.is_empty() => {
            let b = lookup(to, "--to")?;
            graph.with_reach(b, Direction::Incoming)
        }
        Selection::Range { from, to } => {
            let a = lookup(from, "--from")?;
            let b = lookup(to, "--to")?;
            graph.between(a, b).ok_or_else(|| {
                PlanError::Selection(format!(
                    "--from {from} --to {to} selects no stages: `{to}` does not depend on `{from}` (pick a --to that comes after --from)"
                ))
            })?
        }
    };

    let mut in_selection = vec![false; n];
    for &i in &selected {
        in_selection[i] = true;
    }
    let deps: Vec<Vec<usize>> = (0..n).map(|i| graph.deps(i)).collect();

    // Dependencies outside the selection must have run before: their stored results stand in.
    let mut uses_history_of = BTreeSet::new();
    for &i in &selected {
        for &d in &deps[i] {
            if !in_selection[d] {
                if !history.stage_succeeded(names[d]) {
                    return Err(PlanError::History(format!(
                        "stage {}: dependent stage {} has not been executed (run it first, e.g. `baton stages up --stage {}`, or select a range that includes it)",
                        names[i], names[d], names[d]
                    )));
                }
                uses_history_of.insert(d);
            }
        }
    }

    // Topological order, ties broken by file order.
    let mut indegree = vec![0usize; n];
    for &i in &selected {
        indegree[i] = deps[i].iter().filter(|&&d| in_selection[d]).count();
    }
    let mut ready: BinaryHeap<Reverse<usize>> = selected
        .iter()
        .filter(|&&i| indegree[i] == 0)
        .map(|&i| Reverse(i))
        .collect();
    let mut order = Vec::with_capacity(selected.len());
    let mut wave_of = vec![0usize; n];
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for d in graph.dependents(i) {
            if !in_selection[d] {
                continue;
            }
            wave_of[d] = wave_of[d].max(wave_of[i] + 1);
            indegree[d] -= 1;
            if indegree[d] == 0 {
                ready.push(Reverse(d));
            }
        }
    }
    debug_assert_eq!(
        order.len(),
        selected.len(),
        "the graph was checked to be acyclic"
    );

    let mut global_vars: BTreeMap<String, String> = spec.global_vars();
    global_vars.extend(plan_vars.overrides.clone());
    let mut planned = Vec::with_capacity(order.len());
    for &i in &order {
        let s = &spec.stages[i];
        let loaded = &project.stages[i];
        let applied = history.applied_versions(&s.name.value);
        let pending: Vec<(u64, String)> = loaded
            .migrations
            .iter()
            .filter(|m| !applied.contains(&m.version))
            .map(|m| (m.version, m.name.clone()))
            .collect();
        let forecast = s.condition.as_ref().map(|c| {
            // What the engine will evaluate, less what only the run knows (imports, other
            // stages' outcomes): a missing one makes the forecast "at run time".
            let stage_vars = baton_common::stage::StageVars {
                global: global_vars.clone(),
                literal_globals: plan_vars.overrides.keys().cloned().collect(),
                stage: s
                    .env
                    .iter()
                    .map(|e| (e.name.value.clone(), e.value.clone()))
                    .collect(),
                ..Default::default()
            };
            let (vars, env) = stage_vars.condition_inputs(&plan_vars.env);
            let scope = Scope {
                vars: Some(&vars),
                env: Some(&env),
                ..Scope::default()
            };
            match c.value.evaluate(&scope) {
                Ok(true) => ConditionForecast::Runs,
                Ok(false) => ConditionForecast::Skipped,
                Err(e) => ConditionForecast::AtRunTime {
                    reason: match e.kind {
                        TemplateErrorKind::MissingVariable(v) => {
                            format!("needs `{v}`, known only during the run")
                        }
                        _ => e.message,
                    },
                },
            }
        });
        planned.push(PlannedStage {
            name: s.name.value.clone(),
            index: i,
            depends_on: deps[i].iter().map(|&d| names[d].to_owned()).collect(),
            wave: wave_of[i],
            on_failure: s.on_failure,
            timeout: s.timeout.as_ref().map(|t| t.value),
            pending,
            applied: applied.len(),
            imports: s
                .env_from_stages
                .iter()
                .map(|e| {
                    (
                        e.stage.value.clone(),
                        e.vars.iter().map(|v| v.value.clone()).collect(),
                    )
                })
                .collect(),
            exports: loaded.exports().into_iter().map(str::to_owned).collect(),
            condition: s.condition.as_ref().map(|c| c.value.source().to_owned()),
            forecast,
        });
    }
    let wave_count = planned.iter().map(|p| p.wave + 1).max().unwrap_or(0);
    let mut waves = vec![Vec::new(); wave_count];
    for (k, p) in planned.iter().enumerate() {
        waves[p.wave].push(k);
    }
    for w in &mut waves {
        w.sort_by_key(|&k| planned[k].index);
    }

    let (inputs, digest, release) = inputs();
    Ok(Plan {
        stages_file: display(&project.stages_file),
        direction: "up",
        selection: selection.clone(),
        order: planned,
        waves,
        uses_history_of: uses_history_of
            .into_iter()
            .map(|d| names[d].to_owned())
            .collect(),
        max_concurrent_stages: spec.global.max_concurrent_stages.as_ref().map(|m| m.value),
        wait_between_stages: spec.global.wait_between_stages.as_ref().map(|w| w.value),
        rollback_on_failure: spec.global.rollback_on_failure,
        digest: cover_overrides(digest, project, &plan_vars.overrides),
        release,
        environment: project.spec.environment_name().map(str::to_owned),
        inputs,
        up_to: BTreeMap::new(),
        down_to: BTreeMap::new(),
    })
}

/// `digest` extended to cover the run's `--set` values, so a plan made with other values is
/// another plan (a dry run and the run it predicts match only with the same values). A
/// secret's value is not hashed into a digest that is shown and stored: only its name counts.
pub fn cover_overrides(
    digest: String,
    project: &Project,
    overrides: &BTreeMap<String, String>,
) -> String {
    if overrides.is_empty() {
        return digest;
    }
    let declared = |name: &str| {
        project
            .spec
            .stages
            .iter()
            .any(|s| s.secrets.iter().any(|x| x.value == name))
            || project
                .stages
                .iter()
                .any(|l| l.config.secrets.iter().any(|x| x.value == name))
    };
    let mut buf = digest.into_bytes();
    buf.extend_from_slice(b"\n--set\n");
    for (name, value) in overrides {
        buf.extend_from_slice(name.as_bytes());
        buf.push(0);
        if !(baton_common::mask::sensitive_name(name) || declared(name)) {
            buf.extend_from_slice(value.as_bytes());
        }
        buf.push(b'\n');
    }
    sha256_hex(&buf)
}

pub(crate) fn display(p: &Path) -> String {
    p.to_string_lossy().replace('\\', "/")
}

/// Every file the project read, by path relative to the stages file's directory (so the
/// digest does not depend on where baton was started from), with its SHA-256.
pub fn project_inputs(project: &Project) -> BTreeMap<String, String> {
    let base = project.stages_file.parent().unwrap_or(Path::new(""));
    project
        .inputs
        .iter()
        .map(|(p, d)| (display(p.strip_prefix(base).unwrap_or(p)), d.clone()))
        .collect()
}

/// `digest` (of the inputs) extended by the environment the plan is for, if any: the same
/// files planned for two environments are two plans.
fn environment_digest(project: &Project, digest: String) -> String {
    match project.spec.environment_name() {
        None => digest,
        Some(env) => sha256_hex(format!("{digest}\nenvironment {env}").as_bytes()),
    }
}

/// The digest of a plan of `project` before `--set` and caps (its inputs and environment),
/// and its release (see [`Plan::release`]); the inputs are hashed once when no environment
/// file sets the two apart.
pub(crate) fn digests(project: &Project, inputs: &BTreeMap<String, String>) -> (String, String) {
    let env_files: BTreeSet<String> = project
        .spec
        .environments
        .iter()
        .filter_map(|env| env.env_file.as_ref())
        .map(|f| {
            let path = baton_common::spec::beside(&project.stages_file, &f.value);
            project_inputs_key(project, &path)
        })
        .collect();
    let all = digest_inputs(inputs, |_| true);
    let release = if env_files.iter().any(|f| inputs.contains_key(f)) {
        digest_inputs(inputs, |p| !env_files.contains(p))
    } else {
        all.clone()
    };
    (environment_digest(project, all), release)
}

/// The release of `project` (see [`Plan::release`]).
pub fn release_of(project: &Project, inputs: &BTreeMap<String, String>) -> String {
    digests(project, inputs).1
}

fn project_inputs_key(project: &Project, path: &Path) -> String {
    let base = project.stages_file.parent().unwrap_or(Path::new(""));
    display(path.strip_prefix(base).unwrap_or(path))
}

/// SHA-256 over `path NUL digest LF` for every input in path order that `keep` keeps.
pub(crate) fn digest_inputs(
    inputs: &BTreeMap<String, String>,
    keep: impl Fn(&str) -> bool,
) -> String {
    let mut buf = Vec::with_capacity(inputs.iter().map(|(p, d)| p.len() + d.len() + 2).sum());
    for (p, d) in inputs.iter().filter(|(p, _)| keep(p)) {
        buf.extend_from_slice(p.as_bytes());
        buf.push(0);
        buf.extend_from_slice(d.as_bytes());
        buf.push(b'\n');
    }
    sha256_hex(&buf)
}

mod down;

pub use down::{missing_down, plan_down, Dependents};

#[cfg(test)]
mod tests;
