# Recipes mirror CI (.ci/run) and the README. `just --list` shows them.

# Everything CI runs, exactly as CI runs it.
ci:
    bash .ci/run

# The README's test command.
test:
    cargo test --workspace

# The README's main job: run the bundled examples against a local demo API.
demo:
    cargo run -q --bin baton -- demo

# The same through a coordinator and two agents (one process tree, gRPC over loopback).
demo-distributed:
    cargo run -q --bin baton -- demo --distributed

lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Planning benchmark for a generated 10,000-stage DAG (results: docs/benchmarks.md).
bench:
    cargo bench -p baton-coordinator --bench plan

# Distributed mode: dispatch gaps, a 500-stage DAG, coordinator memory with 1,000 agents
# (results: docs/benchmarks.md). BENCH_PARTS=dispatch,dag,memory picks parts.
bench-distributed:
    cargo bench -p baton-coordinator --bench distributed

# Whole runs of the real binaries on generated projects (a chain, a fan-out, a 500-stage DAG)
# at 0 and 20 ms target latency, locally and through a coordinator with two agents, side by
# side with a bare async fan-out as the floor (results: docs/benchmarks.md).
# BENCH_RUNS=chain,fan,dag BENCH_MODES=floor,durable,local,distributed BENCH_LATENCIES=0,20
# pick parts.
bench-runs:
    cargo bench -p baton-coordinator --bench runs

# One durable flush of the store, alone: latency, context switches and CPU per flush
# (results: docs/benchmarks.md). BENCH_FLUSHES=N rounds (default 2,000).
bench-flush:
    cargo bench -p baton-coordinator --bench flush

# The randomized fault soak: runs of a 30-stage DAG while agents and the coordinator are
# killed and restarted at random; reproducible from the printed seed (default 9 minutes, so
# the whole recipe stays under 10). CI runs 120 s.
soak seconds="540" seed="":
    BATON_SOAK_SECS={{seconds}} BATON_SOAK_SEED={{seed}} cargo test -p baton-e2e --test soak -- --ignored --nocapture

# A fuzzing campaign; CI runs the same targets for 30 s each.
fuzz target="spec" seconds="600":
    cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run {{target}} -- -max_total_time={{seconds}} -max_len=4096

# Review and accept changed CLI snapshots after an intended output change.
snapshots:
    INSTA_UPDATE=always cargo test -p baton-coordinator --test cli
