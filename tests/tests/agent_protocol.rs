//! The agent against a scripted coordinator speaking the real protocol over a real socket:
//! an unexpected or malformed message ends the session (never a panic) and the agent
//! reconnects; a migration's first request waits for the coordinator's step acknowledgement.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::Duration;

use baton_agent::session::{run, AgentConfig};
use baton_common::proto::{
    self, agent_message, agent_service_server, coordinator_message, CoordinatorMessage,
};
use baton_e2e::target::Target;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;

type Out = mpsc::Sender<Result<CoordinatorMessage, tonic::Status>>;

/// Hands every `Attach` to the test: the agent's messages and a sender for the answers.
struct Fake {
    sessions: mpsc::Sender<(tonic::Streaming<proto::AgentMessage>, Out)>,
}

#[tonic::async_trait]
impl agent_service_server::AgentService for Fake {
    type AttachStream =
        Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, tonic::Status>> + Send>>;

    async fn attach(
        &self,
        request: tonic::Request<tonic::Streaming<proto::AgentMessage>>,
    ) -> Result<tonic::Response<Self::AttachStream>, tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        self.sessions
            .send((request.into_inner(), tx))
            .await
            .unwrap();
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn coord(kind: coordinator_message::Kind) -> Result<CoordinatorMessage, tonic::Status> {
    Ok(CoordinatorMessage { kind: Some(kind) })
}

fn welcome() -> Result<CoordinatorMessage, tonic::Status> {
    coord(coordinator_message::Kind::Welcome(proto::Welcome {
        session_id: "s".into(),
        heartbeat_interval_ms: 60_000,
        lease_ms: 180_000,
    }))
}

/// The agent's next message other than a heartbeat.
async fn next(inbound: &mut tonic::Streaming<proto::AgentMessage>) -> agent_message::Kind {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .expect("the agent sends within 10 s")
            .expect("the stream is healthy")
            .expect("the stream is open");
        match m.kind.unwrap() {
            agent_message::Kind::Heartbeat(_) => continue,
            k => return k,
        }
    }
}

/// The next session, waiting at most 10 s.
async fn session(
    sessions: &mut mpsc::Receiver<(tonic::Streaming<proto::AgentMessage>, Out)>,
) -> (tonic::Streaming<proto::AgentMessage>, Out) {
    tokio::time::timeout(Duration::from_secs(10), sessions.recv())
        .await
        .expect("the agent (re)connects within 10 s")
        .unwrap()
}

fn assignment(target: &str) -> proto::StageAssignment {
    let mut files = std::collections::HashMap::new();
    files.insert(
        "s/config.yaml".to_owned(),
        b"migrate_dir: migration\n".to_vec(),
    );
    files.insert(
        "s/migration/001_put.yaml".to_owned(),
        b"up:\n  request:\n    method: PUT\n    url: '{{.api}}/gate/1'\n".to_vec(),
    );
    proto::StageAssignment {
        attempt: Some(proto::AttemptRef {
            run_id: 1,
            stage: "s".into(),
            fencing_token: 0,
            attempt: 1,
        }),
        files,
        config_file: "s/config.yaml".into(),
        global_vars: [("api".to_owned(), target.to_owned())].into(),
        direction: proto::Direction::Up as i32,
        retry: Some(proto::RetryPolicy {
            max_attempts: 1,
            initial_backoff_ms: 10,
            multiplier: 2.0,
            max_backoff_ms: 10,
        }),
        key_scope: "store/run".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_survives_a_misbehaving_coordinator_and_waits_for_step_acks() {
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stx, mut sessions) = mpsc::channel(4);
    let stop = CancellationToken::new();
    let server_stop = stop.clone();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(agent_service_server::AgentServiceServer::new(Fake {
                sessions: stx,
            }))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async move { server_stop.cancelled().await },
            ),
    );
    let work = std::env::temp_dir().join(format!("baton-agent-protocol-{}", std::process::id()));
    let mut config = AgentConfig::new(&url, "fake-agent", work.clone());
    config.labels = BTreeMap::from([("env".to_owned(), "test".to_owned())]);
    config.capacity = 2;
    config.backoff_initial = Duration::from_millis(20);
    config.backoff_max = Duration::from_millis(100);
    let agent = tokio::spawn(run(config, stop.clone()));

    // Session 1: the first answer is not a welcome.
    let (mut inbound, out) = session(&mut sessions).await;
    match next(&mut inbound).await {
        agent_message::Kind::Hello(h) => {
            assert_eq!(h.agent_id, "fake-agent");
            assert_eq!(h.capacity, 2);
            assert_eq!(h.labels.get("env").map(String::as_str), Some("test"));
        }
        other => panic!("hello first, got {other:?}"),
    }
    out.send(coord(coordinator_message::Kind::ResultAck(
        proto::ResultAck::default(),
    )))
    .await
    .unwrap();

    // Session 2: a welcome, then an assignment without an attempt.
    let (mut inbound, out) = session(&mut sessions).await;
    assert!(matches!(
        next(&mut inbound).await,
        agent_message::Kind::Hello(_)
    ));
    out.send(welcome()).await.unwrap();
    let mut broken = assignment(&target.url());
    broken.attempt = None;
    out.send(coord(coordinator_message::Kind::Assignment(broken)))
        .await
        .unwrap();

    // Session 3: a good assignment; the request waits for the step acknowledgement.
    let (mut inbound, out) = session(&mut sessions).await;
    assert!(matches!(
        next(&mut inbound).await,
        agent_message::Kind::Hello(_)
    ));
    out.send(welcome()).await.unwrap();
    out.send(coord(coordinator_message::Kind::Assignment(assignment(
        &target.url(),
    ))))
    .await
    .unwrap();
    let started = match next(&mut inbound).await {
        agent_message::Kind::StageEvent(e) => e,
        other => panic!("a stage event, got {other:?}"),
    };
    assert!(matches!(
        started.kind,
        Some(proto::stage_event::Kind::MigrationStarted(_))
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        target.requests().is_empty(),
        "the request went out before the coordinator acknowledged the step"
    );
    out.send(coord(coordinator_message::Kind::StepAck(proto::StepAck {
        attempt: started.attempt.clone(),
        version: 1,
    })))
    .await
    .unwrap();
    let result = loop {
        if let agent_message::Kind::StageResult(r) = next(&mut inbound).await {
            break r;
        }
    };
    assert_eq!(
        result.outcome,
        proto::StageOutcome::Succeeded as i32,
        "{result:?}"
    );
    let sent = target.requests_to("PUT", "/gate/1");
    assert_eq!(sent.len(), 1);
    assert!(
        sent[0]
            .header("user-agent")
            .unwrap()
            .ends_with("(fake-agent)"),
        "{:?}",
        sent[0].header("user-agent")
    );
    assert!(!agent.is_finished(), "the agent is still running");
    stop.cancel();
    agent.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&work);
}
