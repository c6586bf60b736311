//! The coordinator against scripted agents speaking the real protocol over a real socket:
//! a malformed, out-of-order or unexpected message gets a clear gRPC status and ends only
//! that session; the run it held is not stuck: its attempt goes to a well-behaved agent.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use baton_agent::session::AgentConfig;
use baton_common::proto::{
    self, agent_message, agent_service_client::AgentServiceClient,
    control_service_client::ControlServiceClient, coordinator_message,
};
use baton_coordinator::server::{serve, ServeConfig};
use baton_e2e::target::Target;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

struct Server {
    url: String,
    stop: CancellationToken,
    dir: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start(name: &str) -> Server {
    let dir = std::env::temp_dir().join(format!("baton-protocol-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let mut config = ServeConfig::new(dir.join("data"));
    config.shutdown_grace = Duration::from_secs(2);
    // Short leases: an attempt whose agent vanished is lost after 2 s.
    config.heartbeat = Duration::from_millis(200);
    config.lease = Duration::from_secs(1);
    config.grace = Duration::from_secs(1);
    tokio::spawn(serve(config, listener, stop.clone()));
    Server { url, stop, dir }
}

async fn channel(url: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn msg(kind: agent_message::Kind) -> proto::AgentMessage {
    proto::AgentMessage { kind: Some(kind) }
}

fn hello(id: &str) -> proto::AgentMessage {
    msg(agent_message::Kind::Hello(proto::AgentHello {
        agent_id: id.to_owned(),
        labels: HashMap::new(),
        capacity: 1,
        held_attempts: Vec::new(),
        version: "test".to_owned(),
    }))
}

/// A scripted agent: sends `first` messages, returns the stream's answer.
async fn attach(
    url: &str,
    first: Vec<proto::AgentMessage>,
) -> (
    mpsc::Sender<proto::AgentMessage>,
    Result<tonic::Streaming<proto::CoordinatorMessage>, tonic::Status>,
) {
    let mut client = AgentServiceClient::new(channel(url).await);
    let (tx, rx) = mpsc::channel(16);
    for m in first {
        tx.send(m).await.unwrap();
    }
    let r = client
        .attach(ReceiverStream::new(rx))
        .await
        .map(tonic::Response::into_inner);
    (tx, r)
}

/// The reason of the next `Rejected` on the stream (skipping other messages).
async fn rejection(stream: &mut tonic::Streaming<proto::CoordinatorMessage>) -> String {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
            Ok(Ok(Some(proto::CoordinatorMessage {
                kind: Some(coordinator_message::Kind::Rejected(r)),
            }))) => return r.reason,
            Ok(Ok(Some(_))) => continue,
            other => panic!("no rejection within 10 s: {other:?}"),
        }
    }
}

/// The next status the stream ends with (skipping ordinary messages).
async fn ends_with(stream: &mut tonic::Streaming<proto::CoordinatorMessage>) -> tonic::Status {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => panic!("the stream ended without a status"),
            Ok(Err(status)) => return status,
            Err(_) => panic!("no status within 10 s"),
        }
    }
}

fn attempt(run: u64, stage: &str, n: u32) -> Option<proto::AttemptRef> {
    Some(proto::AttemptRef {
        run_id: run,
        stage: stage.to_owned(),
        fencing_token: 0,
        attempt: n,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_openings_are_refused_with_a_clear_status() {
    let s = start("openings").await;
    // A heartbeat before the hello.
    let beat = msg(agent_message::Kind::Heartbeat(proto::Heartbeat {
        running: Vec::new(),
    }));
    let (_tx, r) = attach(&s.url, vec![beat]).await;
    let status = r.err().unwrap();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("first message"), "{status:?}");
    // A hello without an id.
    let (_tx, r) = attach(&s.url, vec![hello(" ")]).await;
    let status = r.err().unwrap();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().contains("empty agent_id"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unexpected_messages_end_only_their_session() {
    let s = start("unexpected").await;
    let cases: Vec<(proto::AgentMessage, tonic::Code, &str)> = vec![
        (
            proto::AgentMessage { kind: None },
            tonic::Code::InvalidArgument,
            "no `kind`",
        ),
        (
            hello("twice"),
            tonic::Code::FailedPrecondition,
            "hello sent twice",
        ),
        (
            msg(agent_message::Kind::StageResult(proto::StageResult {
                attempt: attempt(42, "nope", 0),
                outcome: 1,
                ..Default::default()
            })),
            tonic::Code::InvalidArgument,
            "numbered from 1",
        ),
    ];
    for (i, (bad, code, text)) in cases.into_iter().enumerate() {
        let (tx, r) = attach(&s.url, vec![hello(&format!("scripted-{i}"))]).await;
        let mut stream = r.unwrap();
        let first = stream.message().await.unwrap().unwrap();
        assert!(matches!(
            first.kind,
            Some(coordinator_message::Kind::Welcome(_))
        ));
        tx.send(bad).await.unwrap();
        let status = ends_with(&mut stream).await;
        assert_eq!(status.code(), code, "case {i}: {status:?}");
        assert!(status.message().contains(text), "case {i}: {status:?}");
    }
    // A report on an attempt the agent does not hold is not a protocol error: it is
    // rejected (stale), and the session goes on.
    let (tx, r) = attach(&s.url, vec![hello("stale")]).await;
    let mut stream = r.unwrap();
    stream.message().await.unwrap().unwrap(); // welcome
    tx.send(msg(agent_message::Kind::StageEvent(proto::StageEvent {
        attempt: attempt(42, "nope", 1),
        kind: Some(proto::stage_event::Kind::Log(proto::LogLine {
            version: None,
            line: "x".into(),
        })),
    })))
    .await
    .unwrap();
    let reason = rejection(&mut stream).await;
    assert!(reason.contains("is not held by agent stale"), "{reason}");
    tx.send(msg(agent_message::Kind::Heartbeat(proto::Heartbeat {
        running: Vec::new(),
    })))
    .await
    .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(answer.kind, Some(coordinator_message::Kind::Lease(_))),
        "the session goes on: {answer:?}"
    );
    // The coordinator still serves: a well-behaved agent attaches and gets its welcome.
    let (_tx, r) = attach(&s.url, vec![hello("good")]).await;
    let first = r.unwrap().message().await.unwrap().unwrap();
    assert!(matches!(
        first.kind,
        Some(coordinator_message::Kind::Welcome(_))
    ));
}

/// An agent that takes an assignment, then reports on an attempt it was never given, is
/// told the report is stale (and the run's log shows it); when the rogue vanishes, its
/// attempt is lost after its lease (nothing was in flight), goes to a real agent, and the
/// run succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_survives_an_agent_that_breaks_the_protocol() {
    let s = start("survives").await;
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    let (tx, r) = attach(&s.url, vec![hello("rogue")]).await;
    let mut stream = r.unwrap();
    stream.message().await.unwrap().unwrap(); // welcome

    let mut control = ControlServiceClient::new(channel(&s.url).await);
    let mut files = HashMap::new();
    files.insert("stages.yaml".to_owned(), b"stages:\n  - name: s\n    config_path: s/config.yaml\nglobal:\n  env:\n    api: http://127.0.0.1:9\n".to_vec());
    files.insert(
        "s/config.yaml".to_owned(),
        b"migrate_dir: migration\n".to_vec(),
    );
    files.insert(
        "s/migration/001_put.yaml".to_owned(),
        b"up:\n  request:\n    method: PUT\n    url: '{{.api}}/things/1'\n".to_vec(),
    );
    let submitted = control
        .submit_run(proto::SubmitRunRequest {
            files,
            stages_file: "stages.yaml".to_owned(),
            set: [("api".to_owned(), target.url())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    // The rogue gets the assignment, then reports on an attempt it does not hold.
    let assigned = loop {
        let m = stream.message().await.unwrap().unwrap();
        if let Some(coordinator_message::Kind::Assignment(a)) = m.kind {
            break a;
        }
    };
    assert_eq!(assigned.attempt.as_ref().unwrap().attempt, 1);
    tx.send(msg(agent_message::Kind::StageResult(proto::StageResult {
        attempt: attempt(submitted.run_id, "s", 7),
        outcome: 1,
        ..Default::default()
    })))
    .await
    .unwrap();
    let reason = rejection(&mut stream).await;
    assert!(reason.contains("no attempt 7"), "{reason}");
    // The rogue vanishes without a word.
    drop(tx);
    drop(stream);

    // A real agent, in this process, takes the re-dispatched attempt.
    let stop = CancellationToken::new();
    let mut config = AgentConfig::new(&s.url, "good", s.dir.join("agent-work"));
    config.capacity = 1;
    config.backoff_initial = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(200);
    let agent = tokio::spawn(baton_agent::session::run(config, stop.clone()));
    let mut events = control
        .watch_run(proto::WatchRunRequest {
            run_id: submitted.run_id,
            from_seq: 0,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = String::new();
    let mut log = Vec::new();
    while let Some(e) = tokio::time::timeout(Duration::from_secs(30), events.message())
        .await
        .unwrap()
        .unwrap()
    {
        log.push(e.message.clone());
        last = e.record_json;
    }
    let log = log.join("\n");
    assert!(log.contains("stale (token 0)"), "{log}");
    assert!(log.contains("attempt 1 was lost"), "{log}");
    assert!(
        last.contains("\"run_finished\"") && last.contains("\"succeeded\""),
        "{last}"
    );
    assert_eq!(target.requests_to("PUT", "/things/1").len(), 1);
    stop.cancel();
    agent.await.unwrap().unwrap();
}
