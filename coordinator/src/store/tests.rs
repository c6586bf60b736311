//! One suite, run against both stores.

use std::collections::BTreeMap;

use super::*;

fn run(id: u64, status: RunStatus) -> RunRecord {
    RunRecord {
        uid: format!("uid-{id}"),
        v: FORMAT,
        id,
        project: "p".into(),
        direction: "up".into(),
        selection: Selection::All,
        plan_digest: "d".into(),
        plan: serde_json::json!({"order": []}),
        created_at_ms: 1,
        status,
        finished_at_ms: None,
        down: None,
        by: String::new(),
        release: String::new(),
    }
}

fn event(seq: u64, line: &str) -> EventRecord {
    EventRecord {
        v: FORMAT,
        seq,
        at_ms: 2,
        stage: Some("s".into()),
        kind: EventKind::Log { line: line.into() },
    }
}

fn applied(version: u64) -> AppliedRecord {
    AppliedRecord {
        v: FORMAT,
        version,
        name: format!("m{version}"),
        digest: "x".into(),
        applied_at_ms: 3,
        run_id: 1,
        vars: BTreeMap::from([(format!("v{version}"), "1".into())]),
    }
}

fn suite(store: &dyn Store) {
    let a = store.next_id().unwrap();
    let b = store.next_id().unwrap();
    assert!(b > a && a > 0);

    let key = StageKey::new("p", "infra");
    let other = StageKey::new("p", "infra2");
    let mut t = Transition::new();
    t.push(Op::PutRun(run(7, RunStatus::Running)));
    // Appended out of order; read back in order (big-endian keys).
    t.push(Op::AppendEvent {
        run: 7,
        event: event(256, "b"),
    });
    t.push(Op::AppendEvent {
        run: 7,
        event: event(1, "a"),
    });
    t.push(Op::AppendEvent {
        run: 8,
        event: event(1, "other run"),
    });
    t.push(Op::PutApplied {
        key: key.clone(),
        record: applied(300),
    });
    t.push(Op::PutApplied {
        key: key.clone(),
        record: applied(2),
    });
    t.push(Op::PutApplied {
        key: other.clone(),
        record: applied(1),
    });
    store.commit(t).unwrap();

    assert_eq!(store.run(7).unwrap().unwrap().status, RunStatus::Running);
    assert_eq!(
        store.run(7).unwrap().unwrap(),
        run(7, RunStatus::Running),
        "the frozen plan is kept whole"
    );
    assert_eq!(store.run(9).unwrap(), None);
    let events: Vec<u64> = store.events(7, 0).unwrap().iter().map(|e| e.seq).collect();
    assert_eq!(events, [1, 256]);
    assert_eq!(store.events(7, 2).unwrap().len(), 1);
    let versions: Vec<u64> = store
        .applied(&key)
        .unwrap()
        .iter()
        .map(|r| r.version)
        .collect();
    assert_eq!(
        versions,
        [2, 300],
        "a stage's history does not include another stage whose name extends it"
    );
    assert!(store.is_applied(&key, 300).unwrap());
    assert!(
        !store.is_applied(&key, 1).unwrap(),
        "another stage's version is not this stage's"
    );
    assert!(store.is_applied(&other, 1).unwrap());

    let mut t = Transition::new();
    t.push(Op::PutRun(run(7, RunStatus::Succeeded)));
    t.push(Op::RemoveApplied {
        key: key.clone(),
        version: 300,
    });
    t.push(Op::PutResult {
        key: key.clone(),
        record: StageResultRecord {
            v: FORMAT,
            run_id: 7,
            at_ms: 4,
            exports: BTreeMap::from([("a".into(), "b".into())]),
            secret: vec![],
        },
    });
    store.commit(t).unwrap();
    assert_eq!(store.run(7).unwrap().unwrap().status, RunStatus::Succeeded);
    assert_eq!(store.applied(&key).unwrap().len(), 1);
    assert!(
        !store.is_applied(&key, 300).unwrap(),
        "removed from the history"
    );
    assert_eq!(store.result(&key).unwrap().unwrap().exports["a"], "b");
    assert_eq!(store.runs().unwrap().len(), 1);

    let mut t = Transition::new();
    t.push(Op::RemoveResult { key: key.clone() });
    store.commit(t).unwrap();
    assert_eq!(store.result(&key).unwrap(), None);

    // Environments keep their own history under one project.
    let prod = StageKey::new("p/prod", "infra");
    assert_eq!(prod.environment, "prod");
    assert_ne!(prod.bytes(), key.bytes());
    assert_eq!(key.environment, "default");
    assert!(store.applied(&prod).unwrap().is_empty());

    // The audit log: appended with the transition it records, read in order, chained.
    assert_eq!(store.last_audit().unwrap(), None);
    for (action, by) in [("submit", "alice"), ("approve", "bob"), ("cancel", "alice")] {
        crate::audit::append(
            store,
            crate::audit::Entry {
                action,
                by: by.into(),
                project: "p/prod".into(),
                run: 7,
                release: "r".into(),
                reason: String::new(),
            },
        )
        .unwrap();
    }
    let audit = store.audit().unwrap();
    assert_eq!(audit.iter().map(|a| a.seq).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(store.last_audit().unwrap().as_ref(), audit.last());
    assert!(crate::audit::verify(&audit).is_ok());
}

#[test]
fn memory_store() {
    suite(&MemoryStore::new());
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("baton-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn sled_store() {
    let dir = temp_dir("suite");
    suite(&SledStore::open(&dir).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sled_state_survives_reopen_and_ids_stay_monotonic() {
    let dir = temp_dir("reopen");
    let first = {
        let s = SledStore::open(&dir).unwrap();
        let mut t = Transition::new();
        t.push(Op::PutRun(run(1, RunStatus::Failed)));
        s.commit(t).unwrap();
        s.next_id().unwrap()
    };
    // sled's flusher thread lets go of the directory lock shortly after the last handle is
    // dropped; wait for that (bounded), as a restarted process would never need to.
    let mut reopened = None;
    for _ in 0..500 {
        match SledStore::open(&dir) {
            Ok(s) => {
                reopened = Some(s);
                break;
            }
            Err(StoreError::Locked { .. }) => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(e) => panic!("{e}"),
        }
    }
    let s = reopened.expect("the lock is released after the store is dropped");
    assert_eq!(s.run(1).unwrap().unwrap().status, RunStatus::Failed);
    assert!(s.next_id().unwrap() > first);
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn records_from_a_newer_format_are_refused() {
    let err = decode::<RunRecord>("run", br#"{"v": 99}"#).unwrap_err();
    assert!(
        err.to_string()
            .contains("(record format 99; this baton reads up to 1): upgrade baton"),
        "{err}"
    );
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let dir = temp_dir("lock");
    let _first = SledStore::open(&dir).unwrap();
    let err = SledStore::open(&dir).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("is in use by another baton process"),
        "{err}"
    );
}

#[test]
fn the_state_directory_is_private_to_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("baton-store-mode-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    {
        let s = SledStore::open(&dir).unwrap();
        suite(&s);
    }
    // Reopened: whatever sled wrote meanwhile is made private too.
    let _s = SledStore::open(&dir);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            assert_eq!(mode(&entry.path()), 0o600, "{}", entry.path().display());
            files += 1;
        }
    }
    assert!(files > 0, "sled wrote no file");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Group commit: writers committing at the same time all return, each only after its own
/// transition is durable; everything they wrote is there after the store is reopened.
#[test]
fn concurrent_commits_are_all_durable() {
    let dir = std::env::temp_dir().join(format!("baton-store-group-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    {
        let store = std::sync::Arc::new(SledStore::open(&dir).unwrap());
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..25u64 {
                        let mut tr = Transition::new();
                        tr.push(Op::AppendEvent {
                            run: t + 1,
                            event: event(i, "x"),
                        });
                        store.commit(tr).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
    // sled releases its lock shortly after the last handle is dropped (bounded wait).
    let mut reopened = None;
    for _ in 0..100 {
        match SledStore::open(&dir) {
            Ok(s) => {
                reopened = Some(s);
                break;
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
    let store = reopened.unwrap();
    for run in 1..=8 {
        assert_eq!(store.events(run, 0).unwrap().len(), 25, "run {run}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
