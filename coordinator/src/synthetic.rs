//! Synthetic projects, for property tests and benchmarks: a stages file with the given
//! dependency edges, where every stage has a config and one migration, held in memory.

use std::path::Path;

use baton_common::spec::{load_project, LoadOptions, Loaded, MemoryFiles};

/// Files of a project with `n` stages named `s0`..`s{n-1}`; `edges` are `(stage, dependency)`.
/// Every stage imports `out` from its first dependency, so `env_from_stages` is exercised.
pub fn project_files(n: usize, edges: &[(usize, usize)]) -> MemoryFiles {
    let mut deps: Vec<Vec<usize>> = vec![Vec::new(); n];
    for &(s, d) in edges {
        if !deps[s].contains(&d) {
            deps[s].push(d);
        }
    }
    let mut stages = String::from("apiVersion: baton/v1\nkind: StageOrchestration\nglobal:\n  env:\n    api: http://127.0.0.1:9\nstages:\n");
    let mut files = MemoryFiles::default();
    for (i, d) in deps.iter().enumerate() {
        stages.push_str(&format!(
            "  - name: s{i}\n    config_path: s{i}/config.yaml\n"
        ));
        if !d.is_empty() {
            let list: Vec<String> = d.iter().map(|j| format!("s{j}")).collect();
            stages.push_str(&format!("    depends_on: [{}]\n", list.join(", ")));
            stages.push_str(&format!(
                "    env_from_stages:\n      - stage: s{}\n        vars: [out]\n",
                d[0]
            ));
        }
        files.insert(format!("s{i}/config.yaml"), "migrate_dir: migration\n");
        files.insert(
            format!("s{i}/migration/001_step.yaml"),
            "up:\n  request:\n    method: POST\n    url: '{{.api}}/things'\n  response:\n    env_from:\n      out: id\n",
        );
    }
    files.insert("stages.yaml", stages);
    files
}

/// Loads [`project_files`].
pub fn load(n: usize, edges: &[(usize, usize)]) -> Loaded {
    let files = project_files(n, edges);
    load_project(Path::new("stages.yaml"), &files, LoadOptions::default())
}

/// A layered DAG of `n` stages: each stage after the first layer depends on up to three
/// stages of the previous layer, chosen by a fixed pseudo-random sequence.
pub fn layered_edges(n: usize, width: usize) -> Vec<(usize, usize)> {
    let mut edges = Vec::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in width..n {
        let layer_start = (i / width - 1) * width;
        for _ in 0..3 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let d = layer_start + (x as usize % width);
            edges.push((i, d));
        }
    }
    edges
}

/// The spec fuzz target's body: `data` split on NUL into a stages file, a stage config and
/// two migrations (as many as there are parts); load, check and plan. Returns how many
/// stages the plan holds when the input was a valid project. Must never panic.
pub fn fuzz_project(data: &[u8]) -> Option<usize> {
    let paths = [
        "stages.yaml",
        "a/config.yaml",
        "a/migration/001_one.yaml",
        "a/migration/002_two.yaml",
    ];
    let mut files = MemoryFiles::default();
    for (path, part) in paths.iter().zip(data.split(|b| *b == 0)) {
        files.insert(path, part.to_vec());
    }
    let loaded = load_project(Path::new("stages.yaml"), &files, LoadOptions::default());
    let _ = loaded.diagnostics.to_string();
    if let Some(spec) = &loaded.partial {
        let _ = crate::planner::check(spec, Path::new("stages.yaml"));
    }
    let project = loaded.project.as_ref()?;
    let _ = crate::planner::check(&project.spec, &project.stages_file);
    let planned = crate::planner::plan(
        project,
        &crate::planner::Selection::All,
        &crate::planner::NoHistory,
    )
    .ok()
    .map(|p| p.order.len());
    let _ = crate::planner::plan(
        project,
        &crate::planner::Selection::Range {
            from: "a".into(),
            to: "b".into(),
        },
        &crate::planner::NoHistory,
    );
    planned
}
