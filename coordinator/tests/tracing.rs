//! Tracing across processes: the real coordinator and agent export spans with
//! `--otlp-endpoint` to an in-process OTLP collector (a tonic server for the OTLP trace
//! service); one run is one trace holding the coordinator's run and stage spans and the
//! agent's attempt and migration spans.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_e2e::cluster::{agent_binary, start_agent, start_coordinator, wait_for};
use baton_e2e::files::write;
use baton_e2e::target::Target;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// (service name, span name, trace id) of every span received.
type Received = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

struct Collector(Received);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    got.push((service.clone(), span.name, span.trace_id));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_per_run_holds_coordinator_and_agent_spans() {
    let root = std::env::temp_dir().join(format!("baton-tracing-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let received: Received = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(received.clone())))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    let project = root.join("project");
    write(
        &project.join("stages.yaml"),
        "stages:\n  - name: a\n    config_path: a/config.yaml\n  - name: b\n    config_path: a/config.yaml\n    depends_on: [a]\nglobal:\n  env:\n    api: http://127.0.0.1:9\n",
    );
    write(&project.join("a/config.yaml"), "migrate_dir: migration\n");
    write(
        &project.join("a/migration/001_put.yaml"),
        "up:\n  request:\n    method: PUT\n    url: '{{.api}}/things/1'\n",
    );

    let baton = PathBuf::from(env!("CARGO_BIN_EXE_baton"));
    let otlp = ["--otlp-endpoint", collector.as_str()];
    let (mut coordinator, url) = start_coordinator(&baton, &root.join("data"), &otlp);
    let mut agent = start_agent(&agent_binary(&baton), &url, "traced", &[], &root, &otlp);
    let out = tokio::task::spawn_blocking({
        let (project, url, api) = (project.clone(), url.clone(), target.url());
        move || {
            Command::new(env!("CARGO_BIN_EXE_baton"))
                .args([
                    "stages",
                    "up",
                    "--coordinator",
                    &url,
                    "--set",
                    &format!("api={api}"),
                ])
                .current_dir(&project)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // SIGTERM: both flush their spans on the way out.
    agent.signal(15);
    coordinator.signal(15);
    let (a, c) = tokio::task::spawn_blocking(move || {
        (
            agent.wait_exit(Duration::from_secs(30)),
            coordinator.wait_exit(Duration::from_secs(30)),
        )
    })
    .await
    .unwrap();
    assert_eq!((a, c), (Some(0), Some(0)));
    let r = received.clone();
    tokio::task::spawn_blocking(move || {
        wait_for("the run's spans", Duration::from_secs(15), || {
            r.lock().unwrap().iter().any(|(_, n, _)| n == "run")
        })
    })
    .await
    .unwrap();

    let spans = received.lock().unwrap().clone();
    let run_trace = spans
        .iter()
        .find(|(s, n, _)| s == "baton-coordinator" && n == "run")
        .map(|(_, _, t)| t.clone())
        .unwrap();
    let mut in_trace: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (service, name, trace) in &spans {
        if trace == &run_trace {
            in_trace
                .entry(service.clone())
                .or_default()
                .insert(name.clone());
        }
    }
    let coordinator_spans = in_trace
        .get("baton-coordinator")
        .cloned()
        .unwrap_or_default();
    let agent_spans = in_trace.get("baton-agent").cloned().unwrap_or_default();
    assert!(
        coordinator_spans.contains("run") && coordinator_spans.contains("stage"),
        "{in_trace:?}"
    );
    assert!(
        agent_spans.contains("attempt") && agent_spans.contains("migration"),
        "{in_trace:?}"
    );
    // Two stages: two attempts, both in the run's trace.
    let attempts = spans
        .iter()
        .filter(|(s, n, t)| s == "baton-agent" && n == "attempt" && t == &run_trace)
        .count();
    assert_eq!(attempts, 2, "{spans:?}");
    let _ = std::fs::remove_dir_all(&root);
}
