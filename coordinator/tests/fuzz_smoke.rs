//! The fuzz targets' bodies under proptest: a short, bounded stand-in for `just fuzz` that
//! runs with every `cargo test`. Inputs are built from YAML and template fragments so they
//! reach deep into the loader, the template engine and the planner.

use proptest::prelude::*;

const FRAGMENTS: &[&str] = &[
    "stages:\n",
    "  - name: a\n",
    "  - name: b\n",
    "    config_path: a/config.yaml\n",
    "    depends_on: [a]\n",
    "    depends_on: [b]\n",
    "    env_from_stages:\n      - stage: a\n        vars: [x]\n",
    "    condition: \"{{.e}} == 'p'\"\n",
    "    timeout: 5m\n",
    "    on_failure: continue\n",
    "global:\n  env:\n    e: p\n",
    "migrate_dir: migration\n",
    "env:\n  - name: x\n    value: '{{.e}}'\n",
    "up:\n  request:\n    method: POST\n    url: '{{.u}}/x'\n",
    "  response:\n    env_from:\n      x: a.b\n",
    "down:\n  method: DELETE\n  url: x\n",
    "&a ",
    "*a",
    "[",
    "]",
    "{",
    "}",
    "{{",
    "}}",
    "{{if .x}}",
    "{{end}}",
    ":",
    "- ",
    "\n",
    "  ",
    "'",
    "\"",
    "|\n",
    "\0",
    "~",
    "!!str ",
    "#",
];

fn fragments() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(FRAGMENTS), 0..60)
        .prop_map(|parts| parts.concat().into_bytes())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn spec_loader_never_panics(data in fragments()) {
        let _ = baton_coordinator::synthetic::fuzz_project(&data);
    }

    #[test]
    fn spec_loader_never_panics_on_bytes(data in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = baton_coordinator::synthetic::fuzz_project(&data);
    }

    #[test]
    fn templates_never_panic(text in "(\\{\\{-? ?|-?\\}\\}|[.a-z|()\" `'=!&$-]|if |else |end|with |default |eq |printf |json|/\\*|\\*/|\\n){0,50}") {
        baton_common::template::fuzz_template(&text);
    }
}

/// A valid project, fed through the spec target's input format, loads and plans.
#[test]
fn valid_example_loads_through_the_fuzz_entry() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/multi-stage");
    let read = |p: &str| std::fs::read(root.join(p)).unwrap();
    let stages = String::from_utf8(read("stages.yaml")).unwrap();
    let one_stage: String = stages
        .lines()
        .take_while(|l| !l.contains("dependent_stage1"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("prerequisite_stage", "a")
        .replace("prerequisite/config.yaml", "a/config.yaml");
    let mut data = one_stage.into_bytes();
    data.push(0);
    data.extend(b"migrate_dir: migration\n");
    data.push(0);
    data.extend(read("prerequisite/migration/001_resource_group.yaml"));
    assert_eq!(baton_coordinator::synthetic::fuzz_project(&data), Some(1));
}
