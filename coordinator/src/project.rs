//! Loading a project for validation and for runs: the spec loader plus the planner's graph
//! checks, keeping the bytes of every file read. The CLI loads from disk, the coordinator
//! from the files a client sent; both go through [`load`], so they report the same problems
//! and ship the same bytes.

use std::collections::BTreeSet;
use std::path::Path;

use baton_common::diag::Diagnostics;
use baton_common::spec::{
    load_project, normalize, CapturingFiles, LoadOptions, Project, SourceFiles,
};

use crate::planner;
use crate::scheduler::driver::PlannedFiles;

/// A loaded project (when it has no error), every finding (sorted), and the bytes read.
#[derive(Debug)]
pub struct LoadedProject {
    pub project: Option<Project>,
    pub diagnostics: Diagnostics,
    pub files: PlannedFiles,
}

/// Loads `stages_file` and everything it names from `files`. `provided` are variables the
/// command line sets (`--set`); `environment` is `--environment` (a project that declares
/// environments, loaded without one, is checked once per environment: every finding of any
/// of them is reported, once); `strict` turns warnings into errors.
pub fn load(
    stages_file: &Path,
    files: &dyn SourceFiles,
    provided: BTreeSet<String>,
    environment: Option<&str>,
    strict: bool,
) -> LoadedProject {
    let options = LoadOptions {
        provided: provided.clone(),
        environment: environment.map(str::to_owned),
        ..LoadOptions::default()
    };
    let capture = CapturingFiles::new(files);
    let loaded = load_project(stages_file, &capture, options);
    let mut diags = loaded.diagnostics;
    let spec = loaded
        .project
        .as_ref()
        .map(|p| &p.spec)
        .or(loaded.partial.as_ref());
    if let Some(spec) = spec {
        if environment.is_none() && !spec.environments.is_empty() {
            // Without the environments' variables, the load reports what they provide as
            // missing: every environment's load says what is true instead.
            diags = Diagnostics::new();
        }
        diags.extend(planner::check(spec, &normalize(stages_file)));
        if environment.is_none() {
            for env in &spec.environments {
                let options = LoadOptions {
                    provided: provided.clone(),
                    environment: Some(env.name.value.clone()),
                    ..LoadOptions::default()
                };
                for d in load_project(stages_file, &capture, options)
                    .diagnostics
                    .iter()
                {
                    if !diags.iter().any(|seen| seen == d) {
                        diags.push(d.clone());
                    }
                }
            }
        }
    }
    if strict {
        diags.promote_warnings();
    }
    diags.sort();
    let project = if diags.has_errors() {
        None
    } else {
        loaded.project
    };
    LoadedProject {
        project,
        diagnostics: diags,
        files: capture.into_files(),
    }
}

/// A project that declares environments, loaded without `--environment` for a command that
/// runs or reads state: the error to show (which environments there are, and how to pick).
pub fn environment_required(project: &Project) -> Option<String> {
    if project.spec.environments.is_empty() || project.spec.environment.is_some() {
        return None;
    }
    let names: Vec<&str> = project
        .spec
        .environments
        .iter()
        .map(|e| e.name.value.as_str())
        .collect();
    Some(format!(
        "this project has environments ({}); choose one with --environment NAME (-e), e.g. `-e {}`",
        names.join(", "),
        names[0]
    ))
}
