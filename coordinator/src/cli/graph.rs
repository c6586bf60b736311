//! `baton stages graph`: the dependency graph as Mermaid or Graphviz dot.

use std::io::Write;

use baton_common::spec::Project;

use super::stages::load_and_check;
use super::{GraphArgs, GraphFormat, EXIT_INVALID, EXIT_OK};

pub(super) fn run(
    args: &GraphArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let (project, diags) = load_and_check(&args.spec);
    let Some(project) = project else {
        write!(err, "{diags}")?;
        return Ok(EXIT_INVALID);
    };
    let text = match args.format {
        GraphFormat::Mermaid => mermaid(&project),
        GraphFormat::Dot => dot(&project),
    };
    out.write_all(text.as_bytes())?;
    Ok(EXIT_OK)
}

/// Edges point from a dependency to its dependent (the direction work flows). Node ids are
/// positional (`s0`, `s1`, ...) because stage names may hold characters Mermaid reserves.
pub fn mermaid(project: &Project) -> String {
    let stages = &project.spec.stages;
    let mut s = String::from("graph TD\n");
    for (i, st) in stages.iter().enumerate() {
        let label = st.name.value.replace('"', "#quot;");
        let shape = if st.condition.is_some() {
            format!("{{\"{label}\"}}")
        } else {
            format!("[\"{label}\"]")
        };
        s.push_str(&format!("    s{i}{shape}\n"));
    }
    for (i, st) in stages.iter().enumerate() {
        for dep in &st.depends_on {
            if let Some(j) = stages.iter().position(|t| t.name.value == dep.value) {
                s.push_str(&format!("    s{j} --> s{i}\n"));
            }
        }
    }
    s
}

pub fn dot(project: &Project) -> String {
    let quote = |n: &str| format!("\"{}\"", n.replace('\\', "\\\\").replace('"', "\\\""));
    let mut s = String::from("digraph stages {\n    rankdir=LR;\n");
    for st in &project.spec.stages {
        let shape = if st.condition.is_some() {
            " [shape=diamond]"
        } else {
            " [shape=box]"
        };
        s.push_str(&format!("    {}{shape};\n", quote(&st.name.value)));
    }
    for st in &project.spec.stages {
        for dep in &st.depends_on {
            s.push_str(&format!(
                "    {} -> {};\n",
                quote(&dep.value),
                quote(&st.name.value)
            ));
        }
    }
    s.push_str("}\n");
    s
}
