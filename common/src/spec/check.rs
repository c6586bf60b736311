//! Checks across files: does every variable a template reads have a source?
//!
//! Sources, per the precedence in `crate::vars`: `global.env`, the environment where the stage runs,
//! the stage's `env` (stages.yaml and config.yaml), `env_from_stages`, values extracted by
//! earlier migrations of the stage, and the migration's own `env`. The process environment is
//! unknown until the stage runs, so an unprovided variable is a *warning*; a missing `.auth.X`
//! or `auth_name` is an error (auth is only ever defined in the config).

use crate::vars::{self, Layer, Layers};
use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::mask::MIN_SECRET_LEN;
use std::path::{Path, PathBuf};

use crate::diag::{closest, Diagnostics};
use crate::template::{Reference, Template};

use super::read::Reader;
use super::{
    BodySpec, EnvEntry, JsonTemplate, LoadedStage, Sources, StageConfigSpec, StageSpec, StagesSpec,
    StepAction, StepSpec, Tmpl,
};

pub(super) fn variables(
    diags: &mut Diagnostics,
    sources: &Sources,
    spec: &StagesSpec,
    stages: &[LoadedStage],
    stages_file: &Path,
    stages_text: &str,
    provided: &BTreeSet<String>,
) {
    let mut global: BTreeSet<&str> = provided.iter().map(String::as_str).collect();
    global.extend(spec.global_entries().map(|e| e.name.value.as_str()));
    let stage_names: Vec<&str> = spec.stages.iter().map(|s| s.name.value.as_str()).collect();
    let index = spec.index();
    check_env_values(
        &mut Reader::new(stages_file, stages_text, diags),
        "global.env",
        &spec.global.env,
        &global,
    );
    if let Some(env) = &spec.environment {
        let who = format!("environment `{}`", env.spec.name.value);
        check_env_values(
            &mut Reader::new(stages_file, stages_text, diags),
            &who,
            &env.spec.env,
            &global,
        );
        if let Some(file) = &env.file {
            let text = sources.get(file).unwrap_or("");
            check_env_values(
                &mut Reader::new(file, text, diags),
                &who,
                &env.file_env,
                &global,
            );
        }
    }
    // Each stage's check reads only its own files and what is fixed above: a large
    // project's stages are checked in parts on several threads, their findings joined in
    // stage order (the same findings, in the same order, as one by one).
    let each = Each {
        sources,
        stages_file,
        stages_text,
        global: &global,
        stage_names: &stage_names,
        index: &index,
    };
    let parts = super::in_parts(spec.stages.len(), |range| {
        let mut found = Diagnostics::new();
        for i in range {
            each.stage(&mut found, &spec.stages[i], &stages[i]);
        }
        found
    });
    for found in parts {
        diags.extend(found);
    }

    secrets(diags, sources, spec, stages, stages_file, stages_text);

    // env_from_stages names variables the source stage exports.
    let mut r = Reader::new(stages_file, stages_text, diags);
    for stage in &spec.stages {
        for efs in &stage.env_from_stages {
            let Some(&idx) = index.get(efs.stage.value.as_str()) else {
                continue;
            };
            let exports = stages[idx].exports();
            for var in &efs.vars {
                if !exports.contains(&var.value.as_str()) {
                    let help = match closest(&var.value, exports.iter().copied()) {
                        Some(c) => format!("did you mean `{c}`?"),
                        None if exports.is_empty() => format!(
                            "no migration of `{}` has `response.env_from`",
                            efs.stage.value
                        ),
                        None => format!("it exports: {}", exports.join(", ")),
                    };
                    r.warning(
                        var.pos,
                        format!("stage `{}`: env_from_stages takes `{}` from `{}`, which no migration of `{}` exports", stage.name.value, var.value, efs.stage.value, efs.stage.value),
                        Some(help),
                    );
                }
            }
        }
    }
}

/// What every stage's variable check shares.
struct Each<'a> {
    sources: &'a Sources,
    stages_file: &'a Path,
    stages_text: &'a str,
    /// `--set` names and `global.env`.
    global: &'a BTreeSet<&'a str>,
    stage_names: &'a [&'a str],
    index: &'a HashMap<&'a str, usize>,
}

impl Each<'_> {
    /// One stage: its condition, parameters file, env values, auth and wait templates, and
    /// every migration's templates and body tokens, against the variables in their scope.
    fn stage(&self, diags: &mut Diagnostics, stage: &StageSpec, loaded: &LoadedStage) {
        let Each {
            sources,
            stages_file,
            stages_text,
            global,
            stage_names,
            index,
        } = *self;
        // The parameters file's names are variables of the stage.
        let params: Vec<String> = parameters_text(sources, stages_file, stage)
            .and_then(|(_, text)| super::parameters::parameters(text, |_| Some(String::new())).ok())
            .map(|p| p.into_keys().collect())
            .unwrap_or_default();
        // The environment where the stage runs is unknown here: its layer stays empty.
        let mut layers: Layers<BTreeSet<&str>> = Layers::new();
        layers
            .set(Layer::Global, global.clone())
            .set(
                Layer::StageEnv,
                stage
                    .env
                    .iter()
                    .map(|e| e.name.value.as_str())
                    .chain(params.iter().map(String::as_str))
                    .collect(),
            )
            .set(
                Layer::ConfigEnv,
                loaded
                    .config
                    .env
                    .iter()
                    .map(|e| e.name.value.as_str())
                    .collect(),
            )
            .set(
                Layer::Imported,
                stage
                    .env_from_stages
                    .iter()
                    .flat_map(|f| f.vars.iter().map(|v| v.value.as_str()))
                    .collect(),
            );
        let stage_level = layers.flatten(vars::ENGINE);
        let base = layers.flatten(vars::STAGE);
        let auth_names: Vec<&str> = loaded
            .config
            .auth
            .iter()
            .map(|a| a.name.value.as_str())
            .collect();

        // The condition sees the stage's variables from stages.yaml.
        if let Some(cond) = &stage.condition {
            let mut r = Reader::new(stages_file, stages_text, diags);
            for reference in cond.value.references() {
                match reference {
                    Reference::Stage { name, .. } if !index.contains_key(name.as_str()) => {
                        let help = closest(&name, stage_names.iter().copied())
                            .map(|c| format!("did you mean `{c}`?"));
                        r.error(
                            cond.pos,
                            format!(
                                "stage `{}`: condition names unknown stage `{name}`",
                                stage.name.value
                            ),
                            help,
                        );
                    }
                    Reference::Var {
                        name,
                        optional: false,
                        ..
                    } if !stage_level.contains(name.as_str()) => {
                        r.warning(
                            cond.pos,
                            format!("stage `{}`: condition uses variable `{name}`, which no source provides", stage.name.value),
                            Some(provide_help(&name)),
                        );
                    }
                    _ => {}
                }
            }
        }

        // A parameters file's tokens take what the engine gives the stage.
        if let Some((path, text)) = parameters_text(sources, stages_file, stage) {
            let engine = layers.flatten(&[Layer::Global, Layer::StageEnv, Layer::Imported]);
            check_tokens(diags, &path, text, &stage.name.value, &engine);
        }

        // Values written in the files may be templates, rendered against the layers below
        // and their own layer (see `vars`).
        let who = format!("stage `{}`", stage.name.value);
        {
            let mut r = Reader::new(stages_file, stages_text, diags);
            let upto = layers.flatten(&[Layer::Global, Layer::StageEnv]);
            check_env_values(&mut r, &who, &stage.env, &upto);
        }

        // Auth configs render with the stage's variables.
        if let Some(text) = sources.get(&loaded.config_file) {
            let mut r = Reader::new(&loaded.config_file, text, diags);
            let upto = layers.flatten(&[Layer::Global, Layer::StageEnv, Layer::ConfigEnv]);
            check_env_values(&mut r, &who, &loaded.config.env, &upto);
            for auth in &loaded.config.auth {
                for t in auth.kind.templates() {
                    check_template(&mut r, &who, t, &base, &auth_names);
                }
            }
            if let Some(wait) = &loaded.config.wait {
                for t in wait.url.iter().chain(wait.headers.iter().map(|(_, t)| t)) {
                    check_template(&mut r, &who, t, &base, &auth_names);
                }
            }
        }

        // One growing set of names in scope, so checking stays linear in the number of
        // migrations: what the stage's layers provide, then what each migration extracts;
        // a migration's own `env` (and, for `down`, what its `up` and `find` extract) is in
        // scope only while that migration is checked.
        let mut scope: BTreeSet<&str> = layers.flatten(vars::MIGRATION);
        for m in &loaded.migrations {
            let Some(text) = sources.get(&m.file) else {
                scope.extend(m.exports());
                continue;
            };
            let mut r = Reader::new(&m.file, text, diags);
            let own = with_names(&mut scope, m.env.iter().map(|e| e.name.value.as_str()));
            check_env_values(&mut r, &who, &m.env, &scope);
            if let Some(up) = &m.up {
                let step = with_names(&mut scope, up.env.iter().map(|e| e.name.value.as_str()));
                check_env_values(&mut r, &who, &up.env, &scope);
                check_step(&mut r, stage, &loaded.config, up, &scope, &auth_names);
                check_body_tokens(r.diags, sources, &m.file, up, &stage.name.value, &scope);
                without(&mut scope, step);
            }
            if let Some(down) = &m.down {
                // Down sees its own `env`, what its up extracted, and what `find` extracts.
                let step = with_names(&mut scope, down.env.iter().map(|e| e.name.value.as_str()));
                check_env_values(&mut r, &who, &down.env, &scope);
                let ups = with_names(&mut scope, m.exports());
                if let Some(find) = &down.find {
                    check_step(&mut r, stage, &loaded.config, find, &scope, &auth_names);
                }
                let finds = with_names(
                    &mut scope,
                    down.find
                        .iter()
                        .flat_map(|f| f.response.env_from.iter().map(|(n, _)| n.value.as_str())),
                );
                check_step(&mut r, stage, &loaded.config, down, &scope, &auth_names);
                check_body_tokens(r.diags, sources, &m.file, down, &stage.name.value, &scope);
                without(&mut scope, finds);
                without(&mut scope, ups);
                without(&mut scope, step);
            }
            without(&mut scope, own);
            scope.extend(m.exports());
        }
    }
}

/// A stage's `parameters_file`, as read when the project was loaded.
fn parameters_text<'s>(
    sources: &'s Sources,
    stages_file: &Path,
    stage: &StageSpec,
) -> Option<(PathBuf, &'s str)> {
    let rel = stage.parameters_file.as_ref()?;
    let path = super::beside(stages_file, &rel.value);
    let text = sources.get(&path)?;
    Some((path, text))
}

/// `#{name}#` tokens of a step's `body_file` (read when the project was loaded).
fn check_body_tokens(
    diags: &mut Diagnostics,
    sources: &Sources,
    migration_file: &Path,
    step: &StepSpec,
    stage: &str,
    scope: &BTreeSet<&str>,
) {
    if let Some(StepAction::Request(req)) = &step.action {
        if let Some(BodySpec::File(f)) = &req.body {
            let path = super::beside(migration_file, &f.value);
            if let Some(text) = sources.get(&path) {
                check_tokens(diags, &path, text, stage, scope);
            }
        }
    }
}

/// Every `#{name}#` token of `text` that no source in `scope` provides: a warning at its
/// line, as for a template's variables.
fn check_tokens(
    diags: &mut Diagnostics,
    path: &Path,
    text: &str,
    stage: &str,
    scope: &BTreeSet<&str>,
) {
    for t in crate::tokens::tokens(text) {
        if scope.contains(t.name) {
            continue;
        }
        let (line, col) = crate::tokens::position(text, t.offset);
        let pos = crate::yaml::Pos {
            line: u32::try_from(line).unwrap_or(u32::MAX),
            col: u32::try_from(col).unwrap_or(u32::MAX),
        };
        let help = closest(t.name, scope.iter().copied()).map_or_else(
            || format!("define `{}` in the environment's variables (env_file or env), global.env or the stage's env", t.name),
            |c| format!("did you mean `{c}`?"),
        );
        diags
            .warning(
                path,
                pos,
                format!(
                    "stage `{stage}`: token `#{{{}}}#`, which no source provides",
                    t.name
                ),
            )
            .with_help(help);
    }
}

fn provide_help(name: &str) -> String {
    format!("define `{name}` in env, list it in env_from_stages, set it in the environment where the stage runs, or write `{{{{.{name} | default \"...\"}}}}`")
}

/// Adds `names` to `scope`; returns those that were not there (to take out again).
fn with_names<'a>(
    scope: &mut BTreeSet<&'a str>,
    names: impl Iterator<Item = &'a str>,
) -> Vec<&'a str> {
    names.filter(|n| scope.insert(n)).collect()
}

fn without(scope: &mut BTreeSet<&str>, added: Vec<&str>) {
    for n in added {
        scope.remove(n);
    }
}

fn check_step(
    r: &mut Reader<'_>,
    stage: &StageSpec,
    config: &StageConfigSpec,
    step: &StepSpec,
    scope: &BTreeSet<&str>,
    auth_names: &[&str],
) {
    let who = format!("stage `{}`", stage.name.value);
    match &step.action {
        Some(StepAction::Request(req)) => {
            let mut ts: Vec<&Tmpl> = Vec::new();
            ts.extend(req.url.iter());
            ts.extend(req.headers.iter().map(|(_, t)| t));
            ts.extend(req.queries.iter().map(|(_, t)| t));
            ts.extend(step.response.result_code_templates.iter());
            match &req.body {
                Some(BodySpec::Text(t)) if req.renders_body(config) => ts.push(t),
                Some(BodySpec::Json(j)) if req.renders_body(config) => json_templates(j, &mut ts),
                _ => {}
            }
            for t in ts {
                check_template(r, &who, t, scope, auth_names);
            }
            // A template in a body_file name reads variables too (the files it can name
            // were found when the project was loaded).
            if let Some(BodySpec::File(f)) = &req.body {
                let written = f.value.to_string_lossy();
                if vars::is_template(&written) {
                    match Template::parse(&written) {
                        Ok(template) => {
                            let t = Tmpl {
                                template,
                                pos: f.pos,
                                style: crate::yaml::ScalarStyle::Plain,
                            };
                            check_template(r, &who, &t, scope, auth_names);
                        }
                        Err(e) => r.error(
                            f.pos,
                            format!(
                                "{who}: body_file `{written}` is not a valid template: {}",
                                e.message
                            ),
                            e.help,
                        ),
                    }
                }
            }
            if let Some(name) = &req.auth_name {
                if !auth_names.contains(&name.value.as_str()) {
                    let help = closest(&name.value, auth_names.iter().copied())
                        .map(|c| format!("did you mean `{c}`?"))
                        .or_else(|| {
                            Some("define it under `auth:` in the stage's config.yaml".into())
                        });
                    r.error(
                        name.pos,
                        format!(
                            "stage `{}`: auth `{}` is not defined in the stage config",
                            stage.name.value, name.value
                        ),
                        help,
                    );
                }
            }
        }
        Some(StepAction::Command(cmd)) => {
            let ts = cmd
                .program
                .iter()
                .chain(cmd.args.iter())
                .chain(cmd.env.iter().map(|(_, t)| t))
                .chain(cmd.workdir.iter());
            for t in ts {
                check_template(r, &who, t, scope, auth_names);
            }
        }
        None => {}
    }
}

fn json_templates<'a>(j: &'a JsonTemplate, out: &mut Vec<&'a Tmpl>) {
    match j {
        JsonTemplate::Str(t) => out.push(t),
        JsonTemplate::Array(items) => items.iter().for_each(|i| json_templates(i, out)),
        JsonTemplate::Object(entries) => entries.iter().for_each(|(_, v)| json_templates(v, out)),
        _ => {}
    }
}

/// `env` values written in the files that hold templates: they must parse, and what they
/// read must be in `scope` (the layers below and their own layer).
fn check_env_values(r: &mut Reader<'_>, who: &str, entries: &[EnvEntry], scope: &BTreeSet<&str>) {
    for e in entries {
        if e.secret_from.is_some() || !vars::is_template(&e.value) {
            continue;
        }
        match Template::parse(&e.value) {
            Ok(template) => {
                let t = Tmpl {
                    template,
                    pos: e.value_pos,
                    style: e.style,
                };
                check_template(r, who, &t, scope, &[]);
            }
            Err(err) => {
                let pos = r.pos_in_scalar(e.value_pos, e.style, &e.value, err.offset);
                r.error(
                    pos,
                    format!(
                        "{who}: the value of `{}` is not a valid template: {}",
                        e.name.value, err.message
                    ),
                    err.help,
                );
            }
        }
    }
}

fn check_template(
    r: &mut Reader<'_>,
    who: &str,
    t: &Tmpl,
    scope: &BTreeSet<&str>,
    auth_names: &[&str],
) {
    for reference in t.template.references() {
        match reference {
            Reference::Var {
                name,
                offset,
                optional: false,
            } if !scope.contains(name.as_str()) => {
                let pos = r.pos_in_scalar(t.pos, t.style, t.source(), offset);
                let help = closest(&name, scope.iter().copied()).map_or_else(
                    || provide_help(&name),
                    |c| format!("did you mean `{c}`? otherwise {}", provide_help(&name)),
                );
                r.warning(
                    pos,
                    format!("{who}: variable `{name}` is used but no source provides it"),
                    Some(help),
                );
            }
            Reference::Auth { name, offset } if !auth_names.contains(&name.as_str()) => {
                let pos = r.pos_in_scalar(t.pos, t.style, t.source(), offset);
                r.error(
                    pos,
                    format!("{who}: `.auth.{name}` names an auth that is not defined in the stage config"),
                    Some("define it under `auth:` in the stage's config.yaml".into()),
                );
            }
            Reference::Stage { name, offset } => {
                let pos = r.pos_in_scalar(t.pos, t.style, t.source(), offset);
                r.error(pos, format!("`success`/`failed` (stage `{name}`) can only be used in a stage's condition"), None);
            }
            _ => {}
        }
    }
}

/// `secrets:` lists (stages.yaml and config.yaml): a secret with a literal value shorter than
/// [`MIN_SECRET_LEN`] would mask ordinary text everywhere, so it is an error; a name that no
/// source defines and no migration exports is a warning (probably a typo).
fn secrets(
    diags: &mut Diagnostics,
    sources: &Sources,
    spec: &StagesSpec,
    stages: &[LoadedStage],
    stages_file: &Path,
    stages_text: &str,
) {
    for (stage, loaded) in spec.stages.iter().zip(stages) {
        if stage.secrets.is_empty() && loaded.config.secrets.is_empty() {
            continue;
        }
        let mut literal: BTreeMap<&str, &str> = BTreeMap::new();
        let mut known: BTreeSet<&str> = BTreeSet::new();
        for e in spec
            .global
            .env
            .iter()
            .chain(&stage.env)
            .chain(&loaded.config.env)
        {
            known.insert(&e.name.value);
            if e.secret_from.is_none() {
                literal.insert(&e.name.value, &e.value);
            }
        }
        known.extend(
            stage
                .env_from_stages
                .iter()
                .flat_map(|f| f.vars.iter().map(|v| v.value.as_str())),
        );
        known.extend(loaded.exports());
        let lists = [
            (stages_file, stages_text, &stage.secrets),
            (
                loaded.config_file.as_path(),
                sources.get(&loaded.config_file).unwrap_or(""),
                &loaded.config.secrets,
            ),
        ];
        for (file, text, names) in lists {
            let mut r = Reader::new(file, text, diags);
            for name in names.iter() {
                if let Some(value) = literal.get(name.value.as_str()) {
                    let len = value.chars().count();
                    if len < MIN_SECRET_LEN {
                        r.error(
                            name.pos,
                            format!("stage `{}`: secret `{}` is {len} characters long; secrets need at least {MIN_SECRET_LEN}", stage.name.value, name.value),
                            Some("a shorter secret would be masked everywhere it appears in ordinary text; use a longer value".into()),
                        );
                    }
                } else if !known.contains(name.value.as_str()) {
                    r.warning(
                        name.pos,
                        format!("stage `{}`: secrets names `{}`, which no env entry defines and no migration exports", stage.name.value, name.value),
                        closest(&name.value, known.iter().copied()).map(|c| format!("did you mean `{c}`?")),
                    );
                }
            }
        }
    }
}
