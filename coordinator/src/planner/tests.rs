use std::collections::BTreeSet;

use baton_common::spec::Project;
use proptest::prelude::*;

use super::*;
use crate::synthetic;

fn project(n: usize, edges: &[(usize, usize)]) -> Project {
    let loaded = synthetic::load(n, edges);
    assert!(!loaded.diagnostics.has_errors(), "{}", loaded.diagnostics);
    loaded.project.expect("project loads")
}

fn names(plan: &Plan) -> Vec<&str> {
    plan.order.iter().map(|s| s.name.as_str()).collect()
}

struct Ran(Vec<&'static str>);

impl History for Ran {
    fn stage_succeeded(&self, stage: &str) -> bool {
        self.0.contains(&stage)
    }
    fn applied_versions(&self, stage: &str) -> BTreeSet<u64> {
        if self.0.contains(&stage) {
            BTreeSet::from([1])
        } else {
            BTreeSet::new()
        }
    }
}

#[test]
fn ties_break_in_file_order_and_waves_group_parallel_stages() {
    // s0 <- s1, s0 <- s2, s0 <- s3, (s1, s2, s3) <- s4
    let p = project(5, &[(1, 0), (2, 0), (3, 0), (4, 1), (4, 2), (4, 3)]);
    let plan = plan(&p, &Selection::All, &NoHistory).unwrap();
    assert_eq!(names(&plan), ["s0", "s1", "s2", "s3", "s4"]);
    assert_eq!(plan.waves, vec![vec![0], vec![1, 2, 3], vec![4]]);
}

#[test]
fn cycle_is_named_in_full() {
    let p = project(4, &[(1, 0), (2, 1), (1, 2), (3, 2)]);
    let err = plan(&p, &Selection::All, &NoHistory).unwrap_err();
    let PlanError::Invalid(d) = err else {
        panic!("expected Invalid")
    };
    let text = d.to_string();
    assert!(
        text.contains("error: circular dependency detected: s1 -> s2 -> s1"),
        "{text}"
    );
}

#[test]
fn env_from_stages_must_be_a_transitive_dependency() {
    let mut files = synthetic::project_files(3, &[(1, 0)]);
    let stages = String::from_utf8(files.get("stages.yaml").unwrap().to_vec()).unwrap();
    let stages = stages.replace(
        "  - name: s2\n    config_path: s2/config.yaml\n",
        "  - name: s2\n    config_path: s2/config.yaml\n    env_from_stages:\n      - stage: s1\n        vars: [out]\n",
    );
    files.insert("stages.yaml", stages);
    let loaded = baton_common::spec::load_project(
        std::path::Path::new("stages.yaml"),
        &files,
        Default::default(),
    );
    let p = loaded.project.unwrap();
    let PlanError::Invalid(d) = plan(&p, &Selection::All, &NoHistory).unwrap_err() else {
        panic!()
    };
    assert!(
        d.to_string().contains("stage `s2`: env_from_stages names `s1`, which is not a dependency (add it to depends_on)"),
        "{d}"
    );
}

#[test]
fn range_selects_paths_between() {
    // s0 <- s1 <- s2 <- s3, s1 <- s4 (s4 is not on the path to s3)
    let p = project(5, &[(1, 0), (2, 1), (3, 2), (4, 1)]);
    let sel = Selection::Range {
        from: "s1".into(),
        to: "s3".into(),
    };
    let plan = plan(&p, &sel, &Ran(vec!["s0"])).unwrap();
    assert_eq!(names(&plan), ["s1", "s2", "s3"]);
    assert_eq!(plan.uses_history_of, ["s0"]);
}

#[test]
fn one_sided_ranges() {
    // s0 <- s1 <- s2 <- s3, s1 <- s4
    let p = project(5, &[(1, 0), (2, 1), (3, 2), (4, 1)]);
    let range = |from: &str, to: &str| Selection::Range {
        from: from.into(),
        to: to.into(),
    };
    // Up: --from alone is the stage and its dependents; --to alone, and its dependencies.
    let up = plan(&p, &range("s1", ""), &Ran(vec!["s0"])).unwrap();
    assert_eq!(names(&up), ["s1", "s2", "s3", "s4"]);
    let up = plan(&p, &range("", "s2"), &Ran(vec![])).unwrap();
    assert_eq!(names(&up), ["s0", "s1", "s2"]);
    // Down runs the other way: --from (the later stage) alone is it and what it depends on;
    // --to (the earlier stage) alone is it and what depends on it.
    let all = Ran(vec!["s0", "s1", "s2", "s3", "s4"]);
    let down = plan_down(&p, &range("", "s2"), &all, Dependents::Refuse).unwrap();
    assert_eq!(names(&down), ["s3", "s2"]);
    let down = plan_down(&p, &range("s4", ""), &all, Dependents::Cascade).unwrap();
    assert_eq!(names(&down).len(), 5, "s4 and s1, s0, and (cascade) s2, s3");
}

#[test]
fn selection_errors() {
    let p = project(3, &[(1, 0), (2, 1)]);
    let err = plan(
        &p,
        &Selection::Range {
            from: "s2".into(),
            to: "s0".into(),
        },
        &Ran(vec!["s0", "s1"]),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "--from s2 --to s0 selects no stages: `s0` does not depend on `s2` (pick a --to that comes after --from)"
    );
    let err = plan(
        &p,
        &Selection::Stages {
            names: vec!["s9".into()],
        },
        &NoHistory,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("--stage names unknown stage `s9`"),
        "{err}"
    );
    let err = plan(
        &p,
        &Selection::Stages {
            names: vec!["s2".into()],
        },
        &NoHistory,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("stage s2: dependent stage s1 has not been executed"),
        "{err}"
    );
    let ok = plan(
        &p,
        &Selection::Stages {
            names: vec!["s2".into()],
        },
        &Ran(vec!["s1"]),
    )
    .unwrap();
    assert_eq!(names(&ok), ["s2"]);
}

#[test]
fn pending_migrations_come_from_history() {
    let p = project(2, &[(1, 0)]);
    let plan = plan(&p, &Selection::All, &Ran(vec!["s0"])).unwrap();
    assert!(plan.order[0].pending.is_empty());
    assert_eq!(plan.order[1].pending, vec![(1, "step".to_owned())]);
}

#[test]
fn digest_covers_every_input() {
    let p = project(2, &[(1, 0)]);
    let a = plan(&p, &Selection::All, &NoHistory).unwrap();
    assert_eq!(a.inputs.len(), 5);
    let mut files = synthetic::project_files(2, &[(1, 0)]);
    files.insert(
        "s1/migration/001_step.yaml",
        "up:\n  request:\n    method: PUT\n    url: '{{.api}}/x'\n",
    );
    let changed = baton_common::spec::load_project(
        std::path::Path::new("stages.yaml"),
        &files,
        Default::default(),
    );
    let b = plan(&changed.project.unwrap(), &Selection::All, &NoHistory).unwrap();
    assert_ne!(a.digest, b.digest);
}

/// Random graphs: `n` stages with edges (stage, dependency) where a dependency may point
/// anywhere, so some graphs have cycles.
fn any_graph() -> impl Strategy<Value = (usize, Vec<(usize, usize)>)> {
    (2usize..14).prop_flat_map(|n| {
        let edge = (0..n, 0..n).prop_filter("no self edges", |(a, b)| a != b);
        (Just(n), prop::collection::vec(edge, 0..(n * 2)))
    })
}

/// Random DAGs: edges only point to earlier stages.
fn any_dag() -> impl Strategy<Value = (usize, Vec<(usize, usize)>)> {
    (2usize..16).prop_flat_map(|n| {
        let edge = (1..n).prop_flat_map(|s| (Just(s), 0..s));
        (Just(n), prop::collection::vec(edge, 0..(n * 2)))
    })
}

fn has_path(edges: &[(usize, usize)], from: usize, to: usize) -> bool {
    let mut stack = vec![from];
    let mut seen = BTreeSet::new();
    while let Some(i) = stack.pop() {
        for &(s, d) in edges {
            if s == i && seen.insert(d) {
                if d == to {
                    return true;
                }
                stack.push(d);
            }
        }
    }
    false
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Every dependency comes before its dependent, in order and in waves.
    #[test]
    fn every_edge_is_respected((n, edges) in any_dag()) {
        let p = project(n, &edges);
        let plan = plan(&p, &Selection::All, &NoHistory).unwrap();
        prop_assert_eq!(plan.order.len(), n);
        let pos: Vec<usize> = (0..n).map(|i| plan.order.iter().position(|s| s.index == i).unwrap()).collect();
        for &(s, d) in &edges {
            prop_assert!(pos[d] < pos[s], "s{} must come after s{}", s, d);
            prop_assert!(plan.order[pos[d]].wave < plan.order[pos[s]].wave);
        }
    }

    /// A cyclic graph is rejected, and each reported cycle exists in the input.
    #[test]
    fn cycles_are_real((n, edges) in any_graph()) {
        let p = project(n, &edges);
        let cyclic = (0..n).any(|i| has_path(&edges, i, i));
        match plan(&p, &Selection::All, &NoHistory) {
            Ok(_) => prop_assert!(!cyclic, "a cyclic graph was planned"),
            Err(PlanError::Invalid(d)) => {
                prop_assert!(cyclic, "an acyclic graph was rejected: {}", d);
                for diag in d.iter() {
                    let Some(chain) = diag.message.strip_prefix("circular dependency detected: ") else { continue };
                    let ids: Vec<usize> = chain.split(" -> ").map(|s| s[1..].parse().unwrap()).collect();
                    prop_assert_eq!(ids.first(), ids.last());
                    for w in ids.windows(2) {
                        prop_assert!(edges.contains(&(w[0], w[1])), "s{} -> s{} is not an edge", w[0], w[1]);
                    }
                }
            }
            Err(other) => prop_assert!(false, "unexpected {:?}", other),
        }
    }

    /// The same spec always yields the same plan.
    #[test]
    fn planning_is_deterministic((n, edges) in any_dag()) {
        let a = plan(&project(n, &edges), &Selection::All, &NoHistory).unwrap();
        let b = plan(&project(n, &edges), &Selection::All, &NoHistory).unwrap();
        prop_assert_eq!(a, b);
    }
}

#[test]
fn digest_does_not_depend_on_where_baton_runs() {
    let files = synthetic::project_files(3, &[(1, 0), (2, 1)]);
    let mut moved = baton_common::spec::MemoryFiles::default();
    for (p, c) in files.iter() {
        moved.insert(std::path::Path::new("some/dir").join(p), c);
    }
    let here = baton_common::spec::load_project(
        std::path::Path::new("stages.yaml"),
        &files,
        Default::default(),
    );
    let there = baton_common::spec::load_project(
        std::path::Path::new("some/dir/stages.yaml"),
        &moved,
        Default::default(),
    );
    let a = plan(&here.project.unwrap(), &Selection::All, &NoHistory).unwrap();
    let b = plan(&there.project.unwrap(), &Selection::All, &NoHistory).unwrap();
    assert_eq!(a.digest, b.digest);
    assert_eq!(a.inputs, b.inputs);
}

/// The bundled environments example, in memory, with `edit` applied to one file's text.
fn environments_example(edit: (&str, &str, &str)) -> baton_common::spec::MemoryFiles {
    fn walk(
        dir: &std::path::Path,
        rel: &std::path::Path,
        out: &mut baton_common::spec::MemoryFiles,
    ) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let rel = rel.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                walk(&entry.path(), &rel, out);
            } else {
                out.insert(rel, std::fs::read(entry.path()).unwrap());
            }
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/environments");
    let mut files = baton_common::spec::MemoryFiles::default();
    walk(&root, std::path::Path::new(""), &mut files);
    let (path, from, to) = edit;
    let text = String::from_utf8(files.get(path).unwrap().to_vec()).unwrap();
    assert!(text.contains(from), "{path} holds `{from}`");
    files.insert(path, text.replacen(from, to, 1));
    files
}

/// (digest, release) of the example planned for `environment`.
fn digests_for(files: &baton_common::spec::MemoryFiles, environment: &str) -> (String, String) {
    let options = baton_common::spec::LoadOptions {
        environment: Some(environment.to_owned()),
        ..Default::default()
    };
    let loaded =
        baton_common::spec::load_project(std::path::Path::new("stages.yaml"), files, options);
    let project = loaded
        .project
        .unwrap_or_else(|| panic!("{}", loaded.diagnostics));
    let plan = plan(&project, &Selection::All, &NoHistory).unwrap();
    assert_eq!(
        plan.release,
        release_of(&project, &project_inputs(&project))
    );
    (plan.digest, plan.release)
}

/// A release is the files less the environments' variables files: the same for every
/// environment, unchanged by an edit of a variables file, changed by an edit of a stage. A
/// plan's digest is for one environment and its variables.
#[test]
fn a_release_leaves_out_the_environments_variables_files_and_a_digest_does_not() {
    let same = environments_example(("stages.yaml", "\n", "\n"));
    let (dev, dev_release) = digests_for(&same, "dev");
    let (test, test_release) = digests_for(&same, "test");
    assert_ne!(dev, test);
    assert_eq!(dev_release, test_release);
    assert_ne!(dev, dev_release);

    let vars_edited = environments_example(("vars/vars-development.yml", ":", ": "));
    let (dev_after, dev_release_after) = digests_for(&vars_edited, "dev");
    assert_ne!(dev_after, dev);
    assert_eq!(dev_release_after, dev_release);

    let stage_edited = environments_example(("prerequisite/config.yaml", "\n", "\n\n"));
    let (dev_after, dev_release_after) = digests_for(&stage_edited, "dev");
    assert_ne!(dev_after, dev);
    assert_ne!(dev_release_after, dev_release);
}

/// A project with many files hashes them on a thread of its own: the same plan as hashing
/// them in line.
#[test]
fn a_large_projects_inputs_hashed_beside_planning_give_the_same_plan() {
    let p = project(600, &synthetic::layered_edges(600, 20));
    assert!(p.inputs.len() >= PARALLEL_INPUTS);
    let beside = plan(&p, &Selection::All, &NoHistory).unwrap();
    let in_line = plan_stages(
        &p,
        &Selection::All,
        &NoHistory,
        &PlanVars::default(),
        || inputs_and_digests(&p),
    )
    .unwrap();
    assert_eq!(beside, in_line);
    assert_eq!(beside.inputs.len(), p.inputs.len());
}
