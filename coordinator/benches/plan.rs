//! Planning and validating a generated 10,000-stage DAG (DESIGN.md target: under 100 ms).
//!
//! The project is held in memory (`MemoryFiles`) so the benchmark measures baton, not the
//! disk. Two measurements:
//! - `graph_checks_and_plan`: validating the DAG (cycles, `env_from_stages` reachability) and
//!   planning it (selection, order, waves, digest), on a loaded project.
//! - `load_all_files_validate_plan`: everything from bytes: parsing the stages file and the
//!   20,000 stage files, every validation check, the graph checks and the plan.
//!
//! Run with `just bench` (or `cargo bench -p baton-coordinator --bench plan`).

use std::path::Path;

use baton_common::spec::{load_project, LoadOptions};
use baton_coordinator::planner::{self, NoHistory, Selection};
use baton_coordinator::synthetic;
use criterion::{criterion_group, criterion_main, Criterion};

/// The allocator of the `baton` binary, so the benchmark measures what the command does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn bench(c: &mut Criterion) {
    let n = 10_000;
    let files = synthetic::project_files(n, &synthetic::layered_edges(n, 100));
    let mut group = c.benchmark_group("plan_10000_stages");
    group.sample_size(10);
    group.bench_function("load_all_files_validate_plan", |b| {
        b.iter(|| {
            let loaded = load_project(Path::new("stages.yaml"), &files, LoadOptions::default());
            let project = loaded.project.expect("the synthetic project is valid");
            let checks = planner::check(&project.spec, &project.stages_file);
            assert!(checks.is_empty());
            let plan = planner::plan(&project, &Selection::All, &NoHistory).expect("plans");
            assert_eq!(plan.order.len(), n);
            plan
        })
    });
    let loaded = load_project(Path::new("stages.yaml"), &files, LoadOptions::default());
    let project = loaded.project.expect("the synthetic project is valid");
    group.bench_function("graph_checks_and_plan", |b| {
        b.iter(|| planner::plan(&project, &Selection::All, &NoHistory).expect("plans"))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
