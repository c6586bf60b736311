//! Where a stage's variables come from and which source wins: the precedence rule, written
//! once. Lowest first: `global.env` (with the run's `--set` on top), the environment where
//! the stage runs, the stage's `env` in stages.yaml, then in its config.yaml,
//! `env_from_stages` imports, values extracted earlier in the stage (in version order), the
//! migration's own `env`.
//!
//! Validation (which names exist), the engine (conditions and `runs_on`, before a stage runs)
//! and the executor (the values a request is rendered with) all build [`Layers`] and flatten
//! them with one of the scopes below, so none of them can order the sources differently.

use std::collections::{BTreeMap, BTreeSet};

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
}

impl<V: Vars> Default for Layers<V> {
    fn default() -> Self {
        Layers {
            by_layer: std::array::from_fn(|_| V::default()),
        }
    }
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
}
