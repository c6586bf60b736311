//! Runs every example in `docs/migrations.md`, so the documentation stays true.
//!
//! An example starts at `<!-- example: NAME -->` and ends at `<!-- expect: ... -->`. Between
//! them, a yaml block whose first line is `# PATH` is a file of the project; a text block
//! whose first line is `# target` scripts the target (`METHOD /path -> STATUS BODY`, one line
//! per reply, in order). Expectations:
//! - `exported k=v ...`: the stage succeeds and exports these values;
//! - `requests=A,B`: the target saw exactly these requests (`METHOD /path`), in order;
//! - `up-then-down requests=...`: the same after running up, then down to 0;
//! - `header name=value`: the first request carried this header;
//! - `fails "text"`: the stage fails with a message containing the text.

use std::collections::BTreeMap;

use baton_agent::executor::{AppliedMigration, Direction, StageEnd};
use baton_e2e::stage::{event_text, run, StageDir};
use baton_e2e::target::{Reply, Target};

#[derive(Debug, Default)]
struct Example {
    name: String,
    files: Vec<(String, String)>,
    replies: Vec<(String, String, Reply)>,
    expect: String,
}

fn parse(doc: &str) -> Vec<Example> {
    let mut out = Vec::new();
    let mut current: Option<Example> = None;
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        if let Some(name) = line
            .strip_prefix("<!-- example: ")
            .and_then(|l| l.strip_suffix(" -->"))
        {
            current = Some(Example {
                name: name.to_owned(),
                ..Example::default()
            });
        } else if let Some(expect) = line
            .strip_prefix("<!-- expect: ")
            .and_then(|l| l.strip_suffix(" -->"))
        {
            let mut ex = current.take().expect("expect without example");
            ex.expect = expect.to_owned();
            out.push(ex);
        } else if line.starts_with("```") && line.len() > 3 {
            let mut block = Vec::new();
            for l in lines.by_ref() {
                if l.starts_with("```") {
                    break;
                }
                block.push(l);
            }
            let Some(ex) = current.as_mut() else { continue };
            let header = block.first().copied().unwrap_or("");
            if header == "# target" {
                for r in &block[1..] {
                    let (req, reply) = r
                        .split_once(" -> ")
                        .expect("target line: METHOD /path -> STATUS BODY");
                    let (method, path) = req.split_once(' ').expect("METHOD /path");
                    let (status, body) = reply.split_once(' ').unwrap_or((reply, ""));
                    let status: u16 = status.parse().expect("status");
                    ex.replies.push((
                        method.to_owned(),
                        path.to_owned(),
                        Reply::text(status, body),
                    ));
                }
            } else if let Some(path) = header.strip_prefix("# ") {
                ex.files
                    .push((path.to_owned(), block[1..].join("\n") + "\n"));
            }
        }
    }
    out
}

fn requests(target: &Target) -> String {
    target
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect::<Vec<_>>()
        .join(",")
}

async fn check(ex: &Example) {
    let target = Target::start().await;
    let mut scripts: BTreeMap<(String, String), Vec<Reply>> = BTreeMap::new();
    for (m, p, r) in &ex.replies {
        scripts
            .entry((m.clone(), p.clone()))
            .or_default()
            .push(r.clone());
    }
    for ((m, p), replies) in scripts {
        target.on(&m, &p, replies);
    }
    let d = StageDir::new(&target.url());
    for (path, content) in &ex.files {
        d.write(path, content);
    }
    let (report, events) = run(d.task(Direction::Up, vec![])).await;
    let context = format!(
        "example `{}`: {:?}\n{}",
        ex.name,
        report.end,
        event_text(&events)
    );
    let expect = ex.expect.as_str();
    if let Some(text) = expect.strip_prefix("fails ") {
        let text = text.trim_matches('"');
        match &report.end {
            StageEnd::Failed(msg) => assert!(
                msg.contains(text),
                "{context}\nwanted failure containing {text:?}, got {msg:?}"
            ),
            _ => panic!("{context}\nwanted a failure"),
        }
        return;
    }
    assert_eq!(report.end, StageEnd::Succeeded, "{context}");
    if let Some(pairs) = expect.strip_prefix("exported ") {
        for pair in pairs.split_whitespace() {
            let (k, v) = pair.split_once('=').expect("k=v");
            assert_eq!(
                report.exported.get(k).map(String::as_str),
                Some(v),
                "{context}\n{k}"
            );
        }
    } else if let Some(want) = expect.strip_prefix("requests=") {
        assert_eq!(requests(&target), want, "{context}");
    } else if let Some(want) = expect.strip_prefix("up-then-down requests=") {
        let applied = report
            .migrations
            .iter()
            .map(|m| AppliedMigration {
                version: m.version,
                name: m.name.clone(),
                digest: m.digest.clone(),
                vars: m.extracted.clone(),
            })
            .collect();
        let (down, events) = run(d.task(
            Direction::Down {
                to: 0,
                skip_missing_down: false,
            },
            applied,
        ))
        .await;
        assert_eq!(
            down.end,
            StageEnd::Succeeded,
            "{context}\ndown: {}",
            event_text(&events)
        );
        assert_eq!(requests(&target), want, "{context}");
    } else if let Some(pair) = expect.strip_prefix("header ") {
        let (k, v) = pair.split_once('=').expect("name=value");
        assert_eq!(target.requests()[0].header(k), Some(v), "{context}");
    } else {
        panic!("unknown expectation `{expect}` in example `{}`", ex.name);
    }
}

#[tokio::test]
async fn every_example_in_migrations_md_runs() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/migrations.md"
    ))
    .expect("docs/migrations.md");
    let examples = parse(&doc);
    assert!(
        examples.len() >= 6,
        "examples went missing: {}",
        examples.len()
    );
    for ex in &examples {
        assert!(!ex.files.is_empty(), "example `{}` has no files", ex.name);
        check(ex).await;
    }
}
