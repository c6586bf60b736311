//! The stage contract on the wire: conversions between [`super`]'s types and the generated
//! `baton.v1` messages. The only module that builds or reads those messages for stages; a
//! missing required field or a value out of range is a typed [`WireError`], never a default.

use std::path::PathBuf;
use std::time::Duration;

use crate::proto;
use crate::spec::RetryPolicy;

use super::{
    AppliedMigration, Assignment, AttemptId, Direction, MigrationOutcome, StageEnd, StageEvent,
    StageReport, StageVars,
};

/// A message that does not fit the contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("`{message}` has no `{field}`")]
    Missing {
        message: &'static str,
        field: &'static str,
    },
    #[error("`{message}.{field}` is invalid: {why}")]
    Invalid {
        message: &'static str,
        field: &'static str,
        why: String,
    },
}

fn missing(message: &'static str, field: &'static str) -> WireError {
    WireError::Missing { message, field }
}

fn invalid(message: &'static str, field: &'static str, why: impl Into<String>) -> WireError {
    WireError::Invalid {
        message,
        field,
        why: why.into(),
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn direction_word(
    message: &'static str,
    field: &'static str,
    w: &str,
) -> Result<&'static str, WireError> {
    match w {
        "up" => Ok("up"),
        "down" => Ok("down"),
        other => Err(invalid(
            message,
            field,
            format!("`{other}` is neither `up` nor `down`"),
        )),
    }
}

impl From<&AttemptId> for proto::AttemptRef {
    fn from(a: &AttemptId) -> Self {
        proto::AttemptRef {
            run_id: a.run,
            stage: a.stage.clone(),
            fencing_token: a.token,
            attempt: a.attempt,
        }
    }
}

impl TryFrom<proto::AttemptRef> for AttemptId {
    type Error = WireError;
    fn try_from(a: proto::AttemptRef) -> Result<Self, WireError> {
        if a.stage.is_empty() {
            return Err(missing("AttemptRef", "stage"));
        }
        if a.attempt == 0 {
            return Err(invalid(
                "AttemptRef",
                "attempt",
                "attempts are numbered from 1",
            ));
        }
        Ok(AttemptId {
            run: a.run_id,
            stage: a.stage,
            attempt: a.attempt,
            token: a.fencing_token,
        })
    }
}

/// The attempt named by an optional (proto3 message) field.
pub fn attempt_of(
    a: Option<proto::AttemptRef>,
    message: &'static str,
) -> Result<AttemptId, WireError> {
    AttemptId::try_from(a.ok_or_else(|| missing(message, "attempt"))?)
}

impl From<&AppliedMigration> for proto::AppliedMigration {
    fn from(a: &AppliedMigration) -> Self {
        proto::AppliedMigration {
            version: a.version,
            name: a.name.clone(),
            digest: a.digest.clone(),
            variables: a.vars.clone().into_iter().collect(),
        }
    }
}

impl From<proto::AppliedMigration> for AppliedMigration {
    fn from(a: proto::AppliedMigration) -> Self {
        AppliedMigration {
            version: a.version,
            name: a.name,
            digest: a.digest,
            vars: a.variables.into_iter().collect(),
        }
    }
}

impl From<&Assignment> for proto::StageAssignment {
    fn from(a: &Assignment) -> Self {
        let (direction, down_to, skip_missing_down) = match a.direction {
            Direction::Up => (proto::Direction::Up, 0, false),
            Direction::Down {
                to,
                skip_missing_down,
            } => (proto::Direction::Down, to, skip_missing_down),
        };
        proto::StageAssignment {
            attempt: Some((&a.attempt).into()),
            files: a
                .files
                .iter()
                .map(|(p, b)| (p.to_string_lossy().into_owned(), b.clone()))
                .collect(),
            config_file: a.config_file.to_string_lossy().into_owned(),
            global_vars: a.vars.global.clone().into_iter().collect(),
            literal_globals: a.vars.literal_globals.clone(),
            stage_vars: a.vars.stage.clone().into_iter().collect(),
            imported_vars: a.vars.imported.clone().into_iter().collect(),
            secrets: a.secrets.clone(),
            not_secret: a.not_secret.clone(),
            applied: a.applied.iter().map(Into::into).collect(),
            direction: direction as i32,
            down_to,
            skip_missing_down,
            retry: Some(proto::RetryPolicy {
                max_attempts: a.retry.max_attempts,
                initial_backoff_ms: ms(a.retry.initial_backoff),
                multiplier: a.retry.multiplier,
                max_backoff_ms: ms(a.retry.max_backoff),
            }),
            timeout_ms: a.timeout.map_or(0, ms),
            key_scope: a.key_scope.clone(),
            traceparent: a.traceparent.clone(),
        }
    }
}

impl TryFrom<proto::StageAssignment> for Assignment {
    type Error = WireError;
    fn try_from(a: proto::StageAssignment) -> Result<Self, WireError> {
        const M: &str = "StageAssignment";
        let attempt = attempt_of(a.attempt, M)?;
        if a.config_file.is_empty() {
            return Err(missing(M, "config_file"));
        }
        if !a.files.contains_key(&a.config_file) {
            return Err(invalid(
                M,
                "config_file",
                format!("`{}` is not among `files`", a.config_file),
            ));
        }
        if a.key_scope.is_empty() {
            return Err(missing(M, "key_scope"));
        }
        let direction = match proto::Direction::try_from(a.direction) {
            Ok(proto::Direction::Up) => Direction::Up,
            Ok(proto::Direction::Down) => Direction::Down {
                to: a.down_to,
                skip_missing_down: a.skip_missing_down,
            },
            _ => {
                return Err(invalid(
                    M,
                    "direction",
                    format!("{} is neither up nor down", a.direction),
                ))
            }
        };
        let retry = a.retry.ok_or_else(|| missing(M, "retry"))?;
        if retry.max_attempts == 0 {
            return Err(invalid(M, "retry.max_attempts", "at least 1"));
        }
        if !retry.multiplier.is_finite() || retry.multiplier < 1.0 {
            return Err(invalid(
                M,
                "retry.multiplier",
                "a finite number of at least 1",
            ));
        }
        Ok(Assignment {
            attempt,
            files: a
                .files
                .into_iter()
                .map(|(p, b)| (PathBuf::from(p), b))
                .collect(),
            config_file: PathBuf::from(a.config_file),
            vars: StageVars {
                global: a.global_vars.into_iter().collect(),
                literal_globals: a.literal_globals,
                stage: a.stage_vars.into_iter().collect(),
                imported: a.imported_vars.into_iter().collect(),
            },
            secrets: a.secrets,
            not_secret: a.not_secret,
            applied: a.applied.into_iter().map(Into::into).collect(),
            direction,
            retry: RetryPolicy {
                max_attempts: retry.max_attempts,
                initial_backoff: Duration::from_millis(retry.initial_backoff_ms),
                multiplier: retry.multiplier,
                max_backoff: Duration::from_millis(retry.max_backoff_ms),
            },
            timeout: (a.timeout_ms > 0).then(|| Duration::from_millis(a.timeout_ms)),
            key_scope: a.key_scope,
            traceparent: a.traceparent,
            parsed: None,
        })
    }
}

/// A stage event on the wire.
pub fn event_to_wire(attempt: &AttemptId, e: &StageEvent) -> proto::StageEvent {
    use proto::stage_event::Kind;
    let kind = match e {
        StageEvent::MigrationStarted {
            version,
            name,
            direction,
        } => Kind::MigrationStarted(proto::MigrationStarted {
            version: *version,
            name: name.clone(),
            direction: (*direction).to_owned(),
        }),
        StageEvent::RequestSent {
            version,
            method,
            url,
            status,
            duration,
            attempt,
            error,
        } => Kind::RequestSent(proto::RequestSent {
            version: *version,
            method: method.clone(),
            url: url.clone(),
            status: status.map(u32::from),
            duration_ms: ms(*duration),
            attempt: *attempt,
            error: error.clone().unwrap_or_default(),
        }),
        StageEvent::Log { version, line } => Kind::Log(proto::LogLine {
            version: *version,
            line: line.clone(),
        }),
        StageEvent::MigrationFinished(m) => Kind::MigrationFinished(proto::MigrationFinished {
            migration: Some(proto::AppliedMigration {
                version: m.version,
                name: m.name.clone(),
                digest: m.digest.clone(),
                variables: m.extracted.clone().into_iter().collect(),
            }),
            direction: m.direction.to_owned(),
            duration_ms: ms(m.duration),
        }),
    };
    proto::StageEvent {
        attempt: Some(attempt.into()),
        kind: Some(kind),
    }
}

/// A stage event from the wire, with the attempt it belongs to.
pub fn event_from_wire(e: proto::StageEvent) -> Result<(AttemptId, StageEvent), WireError> {
    use proto::stage_event::Kind;
    const M: &str = "StageEvent";
    let attempt = attempt_of(e.attempt, M)?;
    let event = match e.kind.ok_or_else(|| missing(M, "kind"))? {
        Kind::MigrationStarted(s) => StageEvent::MigrationStarted {
            version: s.version,
            name: s.name,
            direction: direction_word("MigrationStarted", "direction", &s.direction)?,
        },
        Kind::RequestSent(r) => StageEvent::RequestSent {
            version: r.version,
            method: r.method,
            url: r.url,
            status: r
                .status
                .map(|s| {
                    u16::try_from(s).map_err(|_| {
                        invalid(
                            "RequestSent",
                            "status",
                            format!("{s} is not an HTTP status"),
                        )
                    })
                })
                .transpose()?,
            duration: Duration::from_millis(r.duration_ms),
            attempt: r.attempt,
            error: Some(r.error).filter(|e| !e.is_empty()),
        },
        Kind::Log(l) => StageEvent::Log {
            version: l.version,
            line: l.line,
        },
        Kind::MigrationFinished(f) => {
            let m = f
                .migration
                .ok_or_else(|| missing("MigrationFinished", "migration"))?;
            StageEvent::MigrationFinished(MigrationOutcome {
                version: m.version,
                name: m.name,
                direction: direction_word("MigrationFinished", "direction", &f.direction)?,
                digest: m.digest,
                extracted: m.variables.into_iter().collect(),
                duration: Duration::from_millis(f.duration_ms),
            })
        }
    };
    Ok((attempt, event))
}

/// A stage's end on the wire. Each migration's variables travelled in its
/// `migration_finished` event (recorded then); the result repeats which migrations ran.
pub fn result_to_wire(attempt: &AttemptId, r: &StageReport) -> proto::StageResult {
    let (outcome, error) = match &r.end {
        StageEnd::Succeeded => (proto::StageOutcome::Succeeded, String::new()),
        StageEnd::Failed(m) => (proto::StageOutcome::Failed, m.clone()),
        StageEnd::Cancelled => (proto::StageOutcome::Cancelled, String::new()),
        StageEnd::TimedOut => (proto::StageOutcome::TimedOut, String::new()),
        StageEnd::Lost(why) => (proto::StageOutcome::Lost, why.clone()),
    };
    proto::StageResult {
        attempt: Some(attempt.into()),
        outcome: outcome as i32,
        migrations: r
            .migrations
            .iter()
            .map(|m| proto::AppliedMigration {
                version: m.version,
                name: m.name.clone(),
                digest: m.digest.clone(),
                variables: Default::default(),
            })
            .collect(),
        exported: r.exported.clone().into_iter().collect(),
        error,
        secret_exports: r.secret_exports.clone(),
    }
}

/// A stage's end from the wire. `migrations` stay empty: the engine recorded each one from
/// its `migration_finished` event.
pub fn result_from_wire(r: proto::StageResult) -> Result<(AttemptId, StageReport), WireError> {
    const M: &str = "StageResult";
    let attempt = attempt_of(r.attempt, M)?;
    let end = match proto::StageOutcome::try_from(r.outcome) {
        Ok(proto::StageOutcome::Succeeded) => StageEnd::Succeeded,
        Ok(proto::StageOutcome::Failed) => StageEnd::Failed(r.error),
        Ok(proto::StageOutcome::Cancelled) => StageEnd::Cancelled,
        Ok(proto::StageOutcome::TimedOut) => StageEnd::TimedOut,
        Ok(proto::StageOutcome::Lost) => StageEnd::Lost(r.error),
        _ => {
            return Err(invalid(
                M,
                "outcome",
                format!("{} is not an outcome", r.outcome),
            ))
        }
    };
    Ok((
        attempt,
        StageReport {
            end,
            migrations: Vec::new(),
            exported: r.exported.into_iter().collect(),
            secret_exports: r.secret_exports,
        },
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn assignment() -> Assignment {
        let mut files = BTreeMap::new();
        files.insert(
            PathBuf::from("infra/config.yaml"),
            b"migrate_dir: migration\n".to_vec(),
        );
        Assignment {
            attempt: AttemptId {
                token: 5,
                run: 7,
                stage: "infra".into(),
                attempt: 2,
            },
            files,
            config_file: PathBuf::from("infra/config.yaml"),
            vars: StageVars {
                global: [("a".to_owned(), "1".to_owned())].into(),
                literal_globals: vec!["a".into()],
                stage: [("b".to_owned(), "2".to_owned())].into(),
                imported: [("c".to_owned(), "3".to_owned())].into(),
            },
            secrets: vec!["c".into()],
            not_secret: vec!["db_password_policy".into()],
            applied: vec![AppliedMigration {
                version: 1,
                name: "vpc".into(),
                digest: "d".into(),
                vars: [("vpc_id".to_owned(), "v-1".to_owned())].into(),
            }],
            direction: Direction::Down {
                to: 1,
                skip_missing_down: true,
            },
            retry: RetryPolicy::default(),
            timeout: Some(Duration::from_secs(5)),
            key_scope: "s/r".into(),
            traceparent: String::new(),
            parsed: None,
        }
    }

    #[test]
    fn assignment_round_trips() {
        let a = assignment();
        let back = Assignment::try_from(proto::StageAssignment::from(&a)).expect("valid");
        assert_eq!(back, a);
    }

    #[test]
    fn assignment_without_required_fields_is_refused() {
        let mut w = proto::StageAssignment::from(&assignment());
        w.attempt = None;
        assert_eq!(
            Assignment::try_from(w).unwrap_err(),
            missing("StageAssignment", "attempt")
        );
        let mut w = proto::StageAssignment::from(&assignment());
        w.config_file = "elsewhere.yaml".into();
        assert!(matches!(
            Assignment::try_from(w),
            Err(WireError::Invalid {
                field: "config_file",
                ..
            })
        ));
        let mut w = proto::StageAssignment::from(&assignment());
        w.direction = 99;
        assert!(matches!(
            Assignment::try_from(w),
            Err(WireError::Invalid {
                field: "direction",
                ..
            })
        ));
        let mut w = proto::StageAssignment::from(&assignment());
        w.retry = Some(proto::RetryPolicy {
            max_attempts: 1,
            initial_backoff_ms: 0,
            multiplier: f64::NAN,
            max_backoff_ms: 0,
        });
        assert!(Assignment::try_from(w).is_err());
        let mut w = proto::StageAssignment::from(&assignment());
        w.key_scope.clear();
        assert!(Assignment::try_from(w).is_err());
    }

    #[test]
    fn events_and_results_round_trip() {
        let id = assignment().attempt;
        let events = [
            StageEvent::MigrationStarted {
                version: 1,
                name: "vpc".into(),
                direction: "up",
            },
            StageEvent::RequestSent {
                version: 1,
                method: "POST".into(),
                url: "http://x/vpc".into(),
                status: Some(201),
                duration: Duration::from_millis(3),
                attempt: 1,
                error: None,
            },
            StageEvent::RequestSent {
                version: 1,
                method: "POST".into(),
                url: "http://x/vpc".into(),
                status: None,
                duration: Duration::from_millis(3),
                attempt: 2,
                error: Some("connection refused".into()),
            },
            StageEvent::Log {
                version: None,
                line: "hello".into(),
            },
            StageEvent::MigrationFinished(MigrationOutcome {
                version: 1,
                name: "vpc".into(),
                direction: "down",
                digest: "d".into(),
                extracted: [("id".to_owned(), "1".to_owned())].into(),
                duration: Duration::from_millis(9),
            }),
        ];
        for e in events {
            assert_eq!(
                event_from_wire(event_to_wire(&id, &e)).expect("valid"),
                (id.clone(), e)
            );
        }
        for end in [
            StageEnd::Succeeded,
            StageEnd::Failed("boom".into()),
            StageEnd::Cancelled,
            StageEnd::TimedOut,
        ] {
            let r = StageReport {
                end,
                migrations: Vec::new(),
                exported: [("x".to_owned(), "1".to_owned())].into(),
                secret_exports: vec!["x".into()],
            };
            assert_eq!(
                result_from_wire(result_to_wire(&id, &r)).expect("valid"),
                (id.clone(), r)
            );
        }
    }

    #[test]
    fn bad_events_are_refused() {
        let id = assignment().attempt;
        let mut w = event_to_wire(
            &id,
            &StageEvent::MigrationStarted {
                version: 1,
                name: "v".into(),
                direction: "up",
            },
        );
        if let Some(proto::stage_event::Kind::MigrationStarted(s)) = &mut w.kind {
            s.direction = "sideways".into();
        }
        assert!(event_from_wire(w).is_err());
        let w = proto::StageEvent {
            attempt: Some((&id).into()),
            kind: None,
        };
        assert_eq!(
            event_from_wire(w).unwrap_err(),
            missing("StageEvent", "kind")
        );
        let mut w = result_to_wire(&id, &StageReport::ended(StageEnd::Succeeded));
        w.outcome = 0;
        assert!(result_from_wire(w).is_err());
        let mut w = result_to_wire(&id, &StageReport::ended(StageEnd::Succeeded));
        w.attempt = Some(proto::AttemptRef {
            run_id: 1,
            stage: "s".into(),
            fencing_token: 0,
            attempt: 0,
        });
        assert!(result_from_wire(w).is_err());
    }
}
