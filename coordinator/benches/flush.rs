//! One durable flush, as the store makes it (results in docs/benchmarks.md; nothing here is
//! asserted). Every transition baton acts on waits for one: the stage boundary's gap and
//! the CPU a stage costs at a real target's latency both hold one flush per migration start.
//!
//! Two loops of `BENCH_FLUSHES` (default 2,000) rounds on a fresh state directory, each
//! round on one thread, one after the other:
//! - `sled`: insert one small key, then `flush` the database (what the durable floor of
//!   `just bench-runs` does before each call);
//! - `store`: one transition (an event appended to a run's log) through
//!   `Store::commit_unflushed`, then `Store::sync` (what the driver does at each settle),
//!   on the store's sled database (opened as `baton` opens it).
//!
//! Reported per loop: the flush's latency p50/p99 (from the call to its return), and the
//! context switches of the whole process (every thread: sled's IO pool too) and its CPU time
//! per round, from `getrusage`.
//!
//! Run: `just bench-flush` (= `cargo bench -p baton-coordinator --bench flush`).

use std::path::Path;
use std::time::Instant;

use baton_coordinator::store::{EventKind, EventRecord, Op, SledStore, Store, Transition, FORMAT};
use nix::sys::resource::UsageWho;
use support::{percentile, temp, usage};

mod support;

/// The allocator of the `baton` binary, so the benchmark measures what the command does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs `rounds` rounds of `write` then `flush`, timing each flush; prints one table row.
fn measure(name: &str, rounds: usize, mut write: impl FnMut(usize), mut flush: impl FnMut()) {
    // Warm up: the first write and flush set up what sled starts lazily.
    write(0);
    flush();
    let before = usage(UsageWho::RUSAGE_SELF);
    let mut times = Vec::with_capacity(rounds);
    for i in 1..=rounds {
        write(i);
        let t = Instant::now();
        flush();
        times.push(t.elapsed());
    }
    let after = usage(UsageWho::RUSAGE_SELF);
    times.sort();
    let n = rounds as f64;
    println!(
        "| {name} | {rounds} | {:.3} ms | {:.3} ms | {:.2} | {:.1} µs |",
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3,
        (after.1 - before.1) as f64 / n,
        (after.0 - before.0).as_secs_f64() * 1e6 / n,
    );
}

fn main() {
    let rounds: usize = std::env::var("BENCH_FLUSHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    println!("| loop | rounds | flush p50 | flush p99 | context switches / round | CPU / round |");
    println!("|---|---|---|---|---|---|");

    let dir = temp("flush-sled");
    let db = SledStore::sled_config(&dir)
        .open()
        .expect("the state opens");
    measure(
        "sled",
        rounds,
        |i| {
            db.insert(format!("c{i}/start"), &b"started"[..])
                .expect("written");
        },
        || {
            db.flush().expect("flushed");
        },
    );
    drop(db);
    let _ = std::fs::remove_dir_all(&dir);

    let dir = temp("flush-store");
    let store = SledStore::open(Path::new(&dir)).expect("the state opens");
    measure(
        "store",
        rounds,
        |i| {
            let event = EventRecord {
                v: FORMAT,
                seq: i as u64,
                at_ms: 0,
                stage: Some("s".to_owned()),
                kind: EventKind::Notice {
                    message: format!("round {i}"),
                },
            };
            store
                .commit_unflushed(Transition {
                    ops: vec![Op::AppendEvent { run: 1, event }],
                })
                .expect("written");
        },
        || store.sync().expect("flushed"),
    );
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
