//! Where a stage's variables come from and which source wins: the precedence rule, written
//! once. Lowest first: `global.env` (with the run's `--set` on top), the environment where
//! the stage runs, the stage's `env` in stages.yaml, then in its config.yaml,
//! `env_from_stages` imports, values extracted earlier in the stage (in version order), the
//! migration's own `env`.
//!
//! Validation (which names exist), the engine (conditions and `runs_on`, before a stage runs)
//! and the executor (the values a request is rendered with) all build [`Layers`] and flatten
//! them with one of the scopes below, so none of them can order the sources differently.
//!
//! Values written in the files (`global.env`, a stage's `env`, a config's `env` list, a
//! migration's and a step's `env`) may hold templates, as apirun's do
//! (`vpc_name: "{{.project_name}}-vpc"`): [`Layers::resolve`] renders each once, against the
//! lower layers and the other values of its own layer (a value naming itself reads the lower
//! layers: `path: "{{.path}}/bin"` extends). A cycle is an error naming it. Values from
//! outside the files (`--set`, the environment, `valueFromEnv`, imports, extracted values)
//! are never rendered: they are inserted as they are.

use std::collections::{BTreeMap, BTreeSet};

use crate::template::{Reference, Scope, Template};

/// One source of variables, in precedence order (a later layer wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Layer {
    /// `global.env`, with `--set` values on top.
    Global,
    /// The environment of the process where the stage runs.
    Environment,
    /// The stage's `env` in stages.yaml.
    StageEnv,
    /// The `env` of the stage's config.yaml.
    ConfigEnv,
    /// Values imported with `env_from_stages`.
    Imported,
    /// Values extracted by the stage's earlier migrations.
    Extracted,
    /// The migration's own `env`.
    MigrationEnv,
}

impl Layer {
    /// Every layer, lowest precedence first.
    pub const ALL: [Layer; 7] = [
        Layer::Global,
        Layer::Environment,
        Layer::StageEnv,
        Layer::ConfigEnv,
        Layer::Imported,
        Layer::Extracted,
        Layer::MigrationEnv,
    ];
}

/// What the engine evaluates before a stage runs (its `condition`, its `runs_on`): what the
/// stages file gives the stage.
pub const ENGINE: &[Layer] = &[
    Layer::Global,
    Layer::Environment,
    Layer::StageEnv,
    Layer::Imported,
];

/// A stage's variables before any migration ran (auth and health-check templates).
pub const STAGE: &[Layer] = &[
    Layer::Global,
    Layer::Environment,
    Layer::StageEnv,
    Layer::ConfigEnv,
    Layer::Imported,
];

/// What a migration's templates see.
pub const MIGRATION: &[Layer] = &Layer::ALL;

/// The layers a migration adds above [`STAGE`] (together they are [`MIGRATION`]): the
/// executor resolves a stage's layers once and each migration's with
/// [`Layers::resolve_above`].
pub const MIGRATION_OWN: &[Layer] = &[Layer::Extracted, Layer::MigrationEnv];

/// A collection of variables one layer can hold: values, or just names (validation).
pub trait Vars: Default + Clone {
    /// Adds `upper`'s variables, replacing any with the same name.
    fn overlay(&mut self, upper: &Self);
}

impl Vars for BTreeMap<String, String> {
    fn overlay(&mut self, upper: &Self) {
        self.extend(upper.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
}

impl Vars for BTreeSet<&str> {
    fn overlay(&mut self, upper: &Self) {
        self.extend(upper.iter().copied());
    }
}

/// Variables by layer.
#[derive(Debug, Clone)]
pub struct Layers<V> {
    by_layer: [V; 7],
    /// Per layer, the names whose values are templates written in the files.
    templated: [BTreeSet<String>; 7],
}

impl<V: Vars> Default for Layers<V> {
    fn default() -> Self {
        Layers {
            by_layer: std::array::from_fn(|_| V::default()),
            templated: std::array::from_fn(|_| BTreeSet::new()),
        }
    }
}

/// A value written in the files whose template cannot be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("variable `{name}`: {message}")]
pub struct VarError {
    pub name: String,
    pub message: String,
}

/// Whether an authored value is a template (rendered by [`Layers::resolve`]).
pub fn is_template(value: &str) -> bool {
    value.contains("{{")
}

impl<V: Vars> Layers<V> {
    pub fn new() -> Self {
        Layers::default()
    }

    /// Replaces what `layer` holds.
    pub fn set(&mut self, layer: Layer, vars: V) -> &mut Self {
        self.by_layer[layer as usize] = vars;
        self
    }

    /// What `layer` holds.
    pub fn get(&self, layer: Layer) -> &V {
        &self.by_layer[layer as usize]
    }

    /// Marks `names` of `layer` as values written in the files that hold templates.
    pub fn templated(&mut self, layer: Layer, names: BTreeSet<String>) -> &mut Self {
        self.templated[layer as usize] = names;
        self
    }

    /// The layers of `scope` merged in precedence order (whatever order `scope` lists them
    /// in): a name defined by several takes the value of the highest.
    pub fn flatten(&self, scope: &[Layer]) -> V {
        let mut out = V::default();
        for layer in Layer::ALL {
            if scope.contains(&layer) {
                out.overlay(self.get(layer));
            }
        }
        out
    }
}

impl Layers<BTreeMap<String, String>> {
    /// [`Layers::set`] for values written in the files: those holding a template are
    /// rendered by [`Layers::resolve`].
    pub fn set_authored(&mut self, layer: Layer, vars: BTreeMap<String, String>) -> &mut Self {
        let names = vars
            .iter()
            .filter(|(_, v)| is_template(v))
            .map(|(k, _)| k.clone())
            .collect();
        self.set(layer, vars).templated(layer, names)
    }

    /// [`Layers::flatten`] with every authored template rendered (see the module docs).
    ///
    /// # Errors
    /// A template that does not parse, names a variable that is not defined below it, or is
    /// part of a cycle.
    pub fn resolve(&self, scope: &[Layer]) -> Result<BTreeMap<String, String>, VarError> {
        self.resolve_with(scope, true)
    }

    /// [`Layers::resolve`] for what is decided before a stage runs (its condition, its
    /// `runs_on`, the plan's forecast), where some sources may be unknown (on a coordinator,
    /// the agent's environment): a value whose template cannot be rendered here is left out,
    /// so only what reads it fails (as a missing variable), not everything.
    pub fn resolve_known(&self, scope: &[Layer]) -> BTreeMap<String, String> {
        self.resolve_with(scope, false).unwrap_or_default()
    }

    /// [`Layers::resolve`] for the layers of `scope` on top of `below`, the resolution of
    /// every layer under them (a stage's base under each migration's scope): the same
    /// result as resolving all of them, without copying and rendering the lower layers
    /// again.
    pub fn resolve_above(
        &self,
        below: BTreeMap<String, String>,
        scope: &[Layer],
    ) -> Result<BTreeMap<String, String>, VarError> {
        self.resolve_from(below, scope, true, None)
    }

    /// [`Layers::resolve`] with `environment` as the [`Layer::Environment`] layer, without
    /// copying it into the result: the result holds every other layer's values (a
    /// `global.env` value the environment overrides left out), and a name it lacks is the
    /// environment's. Looking a name up in the result, then in `environment` (what
    /// [`Scope::below`] does), gives exactly what [`Layers::resolve`] would. The executor
    /// resolves every stage this way: the environment is the largest layer and the same for
    /// every stage. What `self` holds in [`Layer::Environment`] is not used.
    pub fn resolve_beside(
        &self,
        environment: &BTreeMap<String, String>,
        scope: &[Layer],
    ) -> Result<BTreeMap<String, String>, VarError> {
        self.resolve_from(BTreeMap::new(), scope, true, Some(environment))
    }

    /// [`Layers::resolve_above`] where `below` was resolved beside `environment` (see
    /// [`Layers::resolve_beside`]); the result is beside it too.
    pub fn resolve_above_beside(
        &self,
        below: BTreeMap<String, String>,
        environment: &BTreeMap<String, String>,
        scope: &[Layer],
    ) -> Result<BTreeMap<String, String>, VarError> {
        self.resolve_from(below, scope, true, Some(environment))
    }

    fn resolve_with(
        &self,
        scope: &[Layer],
        strict: bool,
    ) -> Result<BTreeMap<String, String>, VarError> {
        self.resolve_from(BTreeMap::new(), scope, strict, None)
    }

    /// `beside`: the environment, kept out of the result (see [`Layers::resolve_beside`]).
    fn resolve_from(
        &self,
        mut out: BTreeMap<String, String>,
        scope: &[Layer],
        strict: bool,
        beside: Option<&BTreeMap<String, String>>,
    ) -> Result<BTreeMap<String, String>, VarError> {
        for layer in Layer::ALL {
            if !scope.contains(&layer) {
                continue;
            }
            if let (Layer::Environment, Some(env)) = (layer, beside) {
                // The environment wins over what is below it: those names are its.
                out.retain(|name, _| !env.contains_key(name));
                continue;
            }
            let values = self.get(layer);
            let templated = &self.templated[layer as usize];
            if templated.is_empty() {
                out.overlay(values);
                continue;
            }
            let mut done: BTreeMap<String, String> = values
                .iter()
                .filter(|(k, _)| !templated.contains(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            for name in templated {
                if values.contains_key(name) {
                    // The environment is below this layer only from the stage's `env` up.
                    let lower = Lower {
                        vars: &out,
                        beside: beside.filter(|_| layer > Layer::Environment),
                    };
                    let rendered =
                        resolve_one(name, values, templated, lower, &mut done, &mut Vec::new());
                    if strict {
                        rendered?;
                    }
                }
            }
            out.overlay(&done);
        }
        Ok(out)
    }
}

/// What the layers below the one being rendered hold: `vars`, then (resolved beside the
/// environment) `beside`.
#[derive(Clone, Copy)]
struct Lower<'a> {
    vars: &'a BTreeMap<String, String>,
    beside: Option<&'a BTreeMap<String, String>>,
}

/// Renders the authored value `name` of one layer (`values`), first the values of the same
/// layer it reads; `lower` is what the layers below hold, `stack` the names being rendered.
fn resolve_one(
    name: &str,
    values: &BTreeMap<String, String>,
    templated: &BTreeSet<String>,
    lower: Lower<'_>,
    done: &mut BTreeMap<String, String>,
    stack: &mut Vec<String>,
) -> Result<(), VarError> {
    if done.contains_key(name) {
        return Ok(());
    }
    let err = |message: String| VarError {
        name: name.to_owned(),
        message,
    };
    if let Some(at) = stack.iter().position(|n| n == name) {
        let mut cycle: Vec<&str> = stack[at..].iter().map(String::as_str).collect();
        cycle.push(name);
        return Err(err(format!(
            "its template is part of a cycle: {}",
            cycle.join(" -> ")
        )));
    }
    let text = values.get(name).map_or("", String::as_str);
    let template = Template::parse(text).map_err(|e| err(e.message))?;
    stack.push(name.to_owned());
    for r in template.references() {
        if let Reference::Var { name: read, .. } = r {
            if read != name && templated.contains(&read) && values.contains_key(&read) {
                resolve_one(&read, values, templated, lower, done, stack)?;
            }
        }
    }
    stack.pop();
    // What the value sees: the lower layers, then its own layer's other values.
    let mut seen = lower.vars.clone();
    seen.extend(
        done.iter()
            .filter(|(k, _)| k.as_str() != name)
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    let scope = Scope {
        below: lower.beside,
        ..Scope::with_vars(&seen)
    };
    let rendered = template.render(&scope).map_err(|e| err(e.message))?;
    done.insert(name.to_owned(), rendered);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn higher_layers_win_whatever_order_they_are_set_in() {
        let mut l = Layers::new();
        l.set(Layer::MigrationEnv, map(&[("x", "migration")]))
            .set(Layer::Global, map(&[("x", "global"), ("g", "1")]))
            .set(Layer::Imported, map(&[("x", "imported"), ("i", "2")]))
            .set(Layer::ConfigEnv, map(&[("x", "config")]));
        assert_eq!(l.flatten(MIGRATION)["x"], "migration");
        assert_eq!(l.flatten(STAGE)["x"], "imported");
        assert_eq!(l.flatten(&[Layer::Global, Layer::ConfigEnv])["x"], "config");
        assert_eq!(
            l.flatten(ENGINE),
            map(&[("x", "imported"), ("g", "1"), ("i", "2")])
        );
    }

    #[test]
    fn the_engine_does_not_see_config_env_or_migration_values() {
        assert!(!ENGINE.contains(&Layer::ConfigEnv));
        assert!(!ENGINE.contains(&Layer::Extracted));
        assert!(!STAGE.contains(&Layer::Extracted));
        let mut names: Layers<BTreeSet<&str>> = Layers::new();
        names.set(Layer::ConfigEnv, BTreeSet::from(["only_config"]));
        assert!(names.flatten(ENGINE).is_empty());
        assert!(names.flatten(STAGE).contains("only_config"));
    }

    #[test]
    fn a_migration_resolved_above_its_stage_sees_what_resolving_everything_gives() {
        assert_eq!(
            STAGE
                .iter()
                .chain(MIGRATION_OWN)
                .copied()
                .collect::<Vec<_>>(),
            MIGRATION,
            "the stage's layers and a migration's own are all of them, in order"
        );
        let mut l = Layers::new();
        l.set_authored(
            Layer::Global,
            map(&[("project", "shop"), ("vpc", "{{.project}}-vpc"), ("x", "g")]),
        )
        .set(Layer::Environment, map(&[("PATH", "/bin"), ("x", "env")]))
        .set_authored(Layer::StageEnv, map(&[("PATH", "{{.PATH}}:/opt")]))
        .set_authored(Layer::ConfigEnv, map(&[("url", "https://{{.vpc}}")]))
        .set(Layer::Imported, map(&[("id", "42"), ("x", "imported")]))
        .set(
            Layer::Extracted,
            map(&[("token_id", "t1"), ("x", "extracted")]),
        )
        .set_authored(
            Layer::MigrationEnv,
            map(&[
                ("path", "{{.url}}/{{.id}}/{{.token_id}}"),
                ("PATH", "{{.PATH}}:/m"),
                ("both", "{{.path}}?x={{.x}}"),
            ]),
        );
        let base = l.resolve(STAGE).unwrap();
        let above = l.resolve_above(base, MIGRATION_OWN).unwrap();
        let whole = l.resolve(MIGRATION).unwrap();
        assert_eq!(above, whole);
        assert_eq!(whole["both"], "https://shop-vpc/42/t1?x=extracted");
        assert_eq!(whole["PATH"], "/bin:/opt:/m");
    }

    #[test]
    fn authored_templates_render_once_against_lower_layers_and_their_own() {
        let mut l = Layers::new();
        l.set_authored(
            Layer::Global,
            map(&[
                ("project", "shop"),
                ("vpc_name", "{{.project}}-vpc"),
                ("subnet", "{{.vpc_name}}-a"),
            ]),
        )
        .set(Layer::Environment, map(&[("PATH", "/bin")]))
        .set_authored(
            Layer::StageEnv,
            map(&[("PATH", "{{.PATH}}:/opt"), ("label", "{{.subnet}}")]),
        )
        .set(Layer::Imported, map(&[("raw", "{{.project}}")]));
        let v = l.resolve(MIGRATION).unwrap();
        assert_eq!(v["vpc_name"], "shop-vpc");
        assert_eq!(v["subnet"], "shop-vpc-a");
        assert_eq!(
            v["PATH"], "/bin:/opt",
            "a value naming itself extends the lower one"
        );
        assert_eq!(v["label"], "shop-vpc-a");
        assert_eq!(
            v["raw"], "{{.project}}",
            "values from outside are never rendered"
        );
    }

    #[test]
    fn cycles_and_missing_names_are_errors_naming_the_variable() {
        let mut l = Layers::new();
        l.set_authored(
            Layer::StageEnv,
            map(&[("a", "{{.b}}"), ("b", "x{{.a}}"), ("c", "ok")]),
        );
        let e = l.resolve(MIGRATION).unwrap_err();
        assert!(e.message.contains("cycle: a -> b -> a"), "{e}");
        // Where some sources are unknown, only what cannot be rendered is left out.
        let known = l.resolve_known(MIGRATION);
        assert_eq!(known.get("c").map(String::as_str), Some("ok"));
        assert!(!known.contains_key("a") && !known.contains_key("b"));
        let mut l = Layers::new();
        l.set_authored(Layer::ConfigEnv, map(&[("a", "{{.nope}}")]));
        let e = l.resolve(MIGRATION).unwrap_err();
        assert_eq!(e.name, "a");
        assert!(e.message.contains("nope"), "{e}");
        // A higher layer is not visible to a lower one.
        let mut l = Layers::new();
        l.set_authored(Layer::Global, map(&[("g", "{{.m}}")]))
            .set(Layer::MigrationEnv, map(&[("m", "1")]));
        assert!(l.resolve(MIGRATION).is_err());
    }

    /// Looks every name of `names` up in `beside`, then in `env`, as a scope does.
    fn looked_up<'a>(
        beside: &'a BTreeMap<String, String>,
        env: &'a BTreeMap<String, String>,
        names: &[&str],
    ) -> BTreeMap<String, Option<&'a str>> {
        names
            .iter()
            .map(|n| {
                let v = beside.get(*n).or_else(|| env.get(*n)).map(String::as_str);
                ((*n).to_owned(), v)
            })
            .collect()
    }

    #[test]
    fn resolving_beside_the_environment_reads_as_resolving_with_it() {
        let env = map(&[
            ("HOME", "/home/u"),
            ("shared", "from env"),
            ("PATH", "/bin"),
        ]);
        let mut l = Layers::new();
        l.set_authored(
            Layer::Global,
            map(&[("shared", "global"), ("g", "g-{{.shared}}"), ("only", "o")]),
        )
        .set_authored(
            Layer::StageEnv,
            map(&[("path", "{{.PATH}}:{{.HOME}}/bin"), ("s", "{{.shared}}")]),
        )
        .set_authored(Layer::ConfigEnv, map(&[("PATH", "{{.PATH}}:/opt")]))
        .set(Layer::Imported, map(&[("HOME", "/imported")]));
        let names = [
            "HOME", "shared", "PATH", "g", "only", "path", "s", "missing",
        ];
        let mut with = l.clone();
        with.set(Layer::Environment, env.clone());
        let whole = with.resolve(STAGE).unwrap();
        let beside = l.resolve_beside(&env, STAGE).unwrap();
        assert_eq!(
            looked_up(&beside, &env, &names),
            looked_up(&whole, &BTreeMap::new(), &names)
        );
        // The environment is not copied: only what a layer above it sets is in the result,
        // and a global value it overrides is left out.
        assert!(!beside.contains_key("shared"), "{beside:?}");
        assert_eq!(beside["PATH"], "/bin:/opt");
        assert_eq!(beside["HOME"], "/imported");
        assert_eq!(
            beside["g"], "g-global",
            "a global value never reads the environment"
        );
        // A migration's values above it, too.
        let mut m = Layers::new();
        m.set_authored(
            Layer::MigrationEnv,
            map(&[("url", "{{.shared}}/{{.path}}")]),
        );
        let above = m
            .resolve_above_beside(beside.clone(), &env, MIGRATION_OWN)
            .unwrap();
        let above_whole = m.resolve_above(whole, MIGRATION_OWN).unwrap();
        assert_eq!(above["url"], above_whole["url"]);
        assert_eq!(above["url"], "from env//bin:/home/u/bin");
        // A global value reading a name only the environment has fails, as it does with it.
        let mut g = Layers::new();
        g.set_authored(Layer::Global, map(&[("x", "{{.HOME}}")]));
        assert!(g.resolve_beside(&env, STAGE).is_err());
    }
}
