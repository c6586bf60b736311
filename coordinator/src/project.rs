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
/// command line sets (`--set`); `strict` turns warnings into errors.
pub fn load(
    stages_file: &Path,
    files: &dyn SourceFiles,
    provided: BTreeSet<String>,
    strict: bool,
) -> LoadedProject {
    let options = LoadOptions {
        provided,
        ..LoadOptions::default()
    };
    let capture = CapturingFiles::new(files);
    let loaded = load_project(stages_file, &capture, options);
    let mut diags = loaded.diagnostics;
    if let Some(project) = &loaded.project {
        diags.extend(planner::check(&project.spec, &project.stages_file));
    } else if let Some(partial) = &loaded.partial {
        diags.extend(planner::check(partial, &normalize(stages_file)));
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
