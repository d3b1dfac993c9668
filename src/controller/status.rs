//! Status and conditions (pure): what the ScopedSecret's status says after a reconcile.
//!
//! A condition's `lastTransitionTime` moves only when its status flips; a reason or message
//! change alone keeps it. A status equal to the current one is not written.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::v1alpha1::{KeyInput, KeyStatus, ScopedSecret, ScopedSecretStatus};
use crate::resolve::Resolved;
use crate::template::Templated;

pub const READY: &str = "Ready";
pub const SYNCED: &str = "Synced";
pub const REASON_SYNCED: &str = "Synced";
/// Condition set while resolved keys expire within the horizon.
pub const KEYS_EXPIRING: &str = "KeysExpiring";
/// Condition set while restarts from a flapping Secret are paused.
pub const ROLLOUTS_PAUSED: &str = "RolloutsPaused";
/// Condition of `deletionPolicy: Retain`: whether the Secret is free of the owner reference.
pub const RETAINED: &str = "Retained";

/// The outcome a status is derived from.
pub enum Outcome<'a> {
    /// The Secret holds the resolved content.
    Synced {
        secret_name: &'a str,
        /// Resolved keys written as they are.
        resolved: &'a Resolved,
        /// Keys built by templates.
        templated: &'a Templated,
        content_hash: &'a str,
        /// Whether the Secret was written in this reconcile.
        wrote: bool,
        /// The recent content changes, for the restart breaker.
        changes: &'a crate::api::v1alpha1::ChangeHistory,
        /// Why restarts from the Secret are paused, while the breaker pauses them.
        paused: Option<&'a str>,
        /// Keys expiring within the horizon, as a sentence.
        expiring: Option<&'a str>,
        /// The `force-sync` annotation value this sync acted on, recorded so that it is not
        /// acted on again (after an operator restart either).
        force_sync: Option<&'a str>,
        /// What brought this sync: `status.lastTrigger` when the content changed.
        trigger: crate::api::v1alpha1::LastTrigger,
    },
    /// The reconcile failed; the existing Secret (if any) is kept as it was.
    Failed { reason: &'a str, message: &'a str },
}

/// Per-key sources for `status.keys`, sorted by name. A templated key has the scope
/// `template`, the template as its path, and its inputs with their sources.
pub fn key_statuses(resolved: &Resolved, templated: &Templated) -> Vec<KeyStatus> {
    let mut keys: Vec<KeyStatus> = resolved
        .iter()
        .map(|(name, k)| KeyStatus {
            name: name.clone(),
            from: k.renamed_from.clone(),
            scope: k.source.scope.as_str().to_string(),
            path: k.source.path.clone(),
            version: k.source.version,
            inputs: Vec::new(),
        })
        .collect();
    keys.extend(templated.iter().map(|(name, t)| {
        KeyStatus {
            name: name.clone(),
            from: None,
            scope: "template".into(),
            path: t.origin.path(),
            version: 0,
            inputs: t
                .inputs
                .iter()
                .map(|(input, source)| KeyInput {
                    name: input.clone(),
                    scope: source.scope.as_str().to_string(),
                    path: source.path.clone(),
                    version: source.version,
                })
                .collect(),
        }
    }));
    keys.sort_by(|a, b| a.name.cmp(&b.name));
    keys
}

/// The next status from the previous one, the outcome, the object's generation and now.
pub fn next_status(
    prev: Option<&ScopedSecretStatus>,
    outcome: &Outcome<'_>,
    generation: Option<i64>,
    now: Time,
) -> ScopedSecretStatus {
    let mut status = prev.cloned().unwrap_or_default();
    status.observed_generation = generation;
    let mut conditions = Conditions::of(&mut status, generation, &now);
    let (ok, reason, message) = match outcome {
        Outcome::Synced {
            secret_name,
            resolved,
            templated,
            content_hash,
            wrote,
            changes,
            paused,
            expiring,
            force_sync,
            trigger,
        } => {
            let cleared = ("NoneExpiring", "no key expires within the horizon");
            conditions.flag(KEYS_EXPIRING, *expiring, "ExpiresSoon", cleared);
            let cleared = ("Resumed", "restarts run again");
            conditions.flag(ROLLOUTS_PAUSED, *paused, "Flapping", cleared);
            if let Some(value) = force_sync {
                status.force_sync_handled = Some(value.to_string());
            }
            status.changes =
                (**changes != Default::default()).then(|| Box::new((*changes).clone()));
            let changed = status.content_hash.as_deref() != Some(*content_hash);
            if changed {
                status.last_change_time = Some(now.clone());
                status.last_trigger = Some(*trigger);
            }
            if *wrote || changed || status.last_sync_time.is_none() {
                status.last_sync_time = Some(now.clone());
            }
            status.secret_name = Some(secret_name.to_string());
            status.keys = key_statuses(resolved, templated);
            status.content_hash = Some(content_hash.to_string());
            let (resolved, templated) = (resolved.len(), templated.len());
            let message = if templated == 0 {
                format!("Secret {secret_name} holds {resolved} resolved keys")
            } else {
                format!(
                    "Secret {secret_name} holds {resolved} resolved and {templated} templated keys"
                )
            };
            (true, REASON_SYNCED, message)
        }
        Outcome::Failed { reason, message } => (false, *reason, message.to_string()),
    };
    let ready_message = match &status.secret_name {
        Some(secret) if !ok => {
            format!("{message} (Secret {secret} is kept with its last synced content)")
        }
        _ => message.clone(),
    };
    conditions.set(READY, ok, reason, &ready_message);
    conditions.set(SYNCED, ok, reason, &message);
    status.conditions = conditions.list;
    status
}

/// Sets, clears or keeps the `Retained` condition after the `Retain` stage.
pub fn set_retention(
    status: &mut ScopedSecretStatus,
    retention: &super::retain::Retention,
    generation: Option<i64>,
    now: &Time,
) {
    use super::retain::Retention;
    let secret = status.secret_name.clone();
    let secret = secret.as_deref().unwrap_or("of this ScopedSecret");
    let mut conditions = Conditions::of(status, generation, now);
    match retention {
        Retention::Delete => conditions.list.retain(|c| c.type_ != RETAINED),
        Retention::Unknown => {}
        Retention::Retained => conditions.set(
            RETAINED,
            true,
            "OwnerReferenceRemoved",
            &format!(
                "deletionPolicy is Retain: Secret {secret} carries no owner reference and stays when this ScopedSecret is deleted"
            ),
        ),
        Retention::Failed(message) => conditions.set(
            RETAINED,
            false,
            "KubernetesError",
            &format!(
                "deletionPolicy is Retain but the owner reference could not be removed yet, so deleting this ScopedSecret now would delete the Secret: {message}"
            ),
        ),
    }
    status.conditions = conditions.list;
}

/// The condition `type_` of the status `ss` was read with, when it is True.
pub fn holding<'a>(ss: &'a ScopedSecret, type_: &str) -> Option<&'a Condition> {
    let conditions = &ss.status.as_ref()?.conditions;
    conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
}

/// The conditions of a status being made, at one generation and time.
struct Conditions<'a> {
    list: Vec<Condition>,
    generation: Option<i64>,
    now: &'a Time,
}

impl<'a> Conditions<'a> {
    /// Takes the conditions of `status` (put them back from `list`).
    fn of(status: &mut ScopedSecretStatus, generation: Option<i64>, now: &'a Time) -> Self {
        let list = std::mem::take(&mut status.conditions);
        Conditions {
            list,
            generation,
            now,
        }
    }

    /// Sets condition `type_`; its `lastTransitionTime` moves only when its status flips.
    fn set(&mut self, type_: &str, ok: bool, reason: &str, message: &str) {
        let status = if ok { "True" } else { "False" };
        let Some(c) = self.list.iter_mut().find(|c| c.type_ == type_) else {
            return self.list.push(Condition {
                type_: type_.into(),
                status: status.into(),
                reason: reason.into(),
                message: message.into(),
                observed_generation: self.generation,
                last_transition_time: self.now.clone(),
            });
        };
        if c.status != status {
            c.last_transition_time = self.now.clone();
            c.status = status.into();
        }
        c.reason = reason.into();
        c.message = message.into();
        c.observed_generation = self.generation;
    }

    /// A condition that appears when it first holds: True with `why` while it does, then
    /// False with the `cleared` reason and message.
    fn flag(&mut self, type_: &str, why: Option<&str>, reason: &str, cleared: (&str, &str)) {
        match why {
            Some(why) => self.set(type_, true, reason, why),
            None if self.list.iter().any(|c| c.type_ == type_) => {
                self.set(type_, false, cleared.0, cleared.1)
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::v1alpha1::LastTrigger;
    use crate::resolve::{Entry, ScopeData, SecretValue, resolve};
    use crate::scope::Scope;

    static NO_TEMPLATES: Templated = Templated::new();

    fn t(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).unwrap())
    }

    fn resolved() -> Resolved {
        resolve(&[ScopeData {
            scope: Scope::Environment,
            path: "shop/envs/dev".into(),
            version: Some(4),
            entries: [("DB_HOST".to_string(), Entry::Value(SecretValue::new("db")))].into(),
            custom_metadata: Default::default(),
        }])
    }

    static NO_CHANGES: crate::api::v1alpha1::ChangeHistory = crate::api::v1alpha1::ChangeHistory {
        times: Vec::new(),
        resume_handled: None,
        revocation: None,
    };

    fn synced<'a>(r: &'a Resolved, hash: &'a str, wrote: bool) -> Outcome<'a> {
        Outcome::Synced {
            secret_name: "api",
            resolved: r,
            templated: &NO_TEMPLATES,
            content_hash: hash,
            wrote,
            changes: &NO_CHANGES,
            paused: None,
            expiring: None,
            force_sync: None,
            trigger: LastTrigger::Refresh,
        }
    }

    fn cond<'a>(s: &'a ScopedSecretStatus, ty: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == ty).unwrap()
    }

    #[test]
    fn first_sync_sets_keys_hash_times_and_true_conditions() {
        let r = resolved();
        let s = next_status(None, &synced(&r, "h1", true), Some(1), t(100));
        assert_eq!(s.observed_generation, Some(1));
        assert_eq!(
            s.keys,
            vec![KeyStatus {
                name: "DB_HOST".into(),
                from: None,
                scope: "environment".into(),
                path: "shop/envs/dev".into(),
                version: 4,
                inputs: vec![],
            }]
        );
        assert_eq!(s.content_hash.as_deref(), Some("h1"));
        assert_eq!(s.last_sync_time, Some(t(100)));
        assert_eq!(s.last_change_time, Some(t(100)));
        assert_eq!(cond(&s, READY).status, "True");
        assert_eq!(cond(&s, SYNCED).reason, "Synced");
    }

    #[test]
    fn last_trigger_names_what_brought_the_last_content_change_only() {
        let r = resolved();
        let with = |hash, trigger| {
            let mut outcome = synced(&r, hash, true);
            if let Outcome::Synced { trigger: t, .. } = &mut outcome {
                *t = trigger;
            }
            outcome
        };
        let s = next_status(None, &with("h1", LastTrigger::Refresh), Some(1), t(100));
        assert_eq!(s.last_trigger, Some(LastTrigger::Refresh));
        let s = next_status(Some(&s), &with("h2", LastTrigger::Audit), Some(1), t(101));
        assert_eq!(s.last_trigger, Some(LastTrigger::Audit));
        // A peer's refresh that finds the same content says nothing about the last change.
        let s = next_status(
            Some(&s),
            &with("h2", LastTrigger::PeerPath),
            Some(1),
            t(102),
        );
        assert_eq!(s.last_trigger, Some(LastTrigger::Audit));
        assert_eq!(
            serde_json::to_value(&s).unwrap()["lastTrigger"],
            serde_json::json!("audit")
        );
        assert_eq!(
            serde_json::to_value(LastTrigger::PeerPath).unwrap(),
            serde_json::json!("peer-path")
        );
    }

    #[test]
    fn templated_keys_list_their_inputs_with_scopes_never_values() {
        let spec = crate::api::v1alpha1::TargetTemplate {
            data: [("URL".to_string(), "db://{{ DB_HOST }}/app".to_string())].into(),
            ..Default::default()
        };
        let out = crate::template::apply(resolved(), Some(&spec), &Default::default()).unwrap();
        let s = next_status(
            None,
            &Outcome::Synced {
                secret_name: "api",
                resolved: &out.resolved,
                templated: &out.templated,
                content_hash: "h1",
                wrote: true,
                changes: &NO_CHANGES,
                paused: None,
                expiring: None,
                force_sync: None,
                trigger: LastTrigger::Refresh,
            },
            Some(1),
            t(100),
        );
        assert_eq!(s.keys.len(), 2);
        assert_eq!(s.keys[0].inputs, vec![], "a resolved key has no inputs");
        assert_eq!(
            s.keys[1],
            KeyStatus {
                name: "URL".into(),
                from: None,
                scope: "template".into(),
                path: "spec.target.template.data".into(),
                version: 0,
                inputs: vec![KeyInput {
                    name: "DB_HOST".into(),
                    scope: "environment".into(),
                    path: "shop/envs/dev".into(),
                    version: 4,
                }],
            }
        );
        let json = serde_json::to_string(&s).unwrap();
        assert!(!json.contains("db://"), "{json}");
        assert!(
            !serde_json::to_value(&s.keys[0])
                .unwrap()
                .as_object()
                .unwrap()
                .contains_key("inputs"),
            "the shape of resolved keys is unchanged"
        );
        assert_eq!(
            cond(&s, READY).message,
            "Secret api holds 1 resolved and 1 templated keys"
        );
    }

    #[test]
    fn a_no_op_resync_yields_the_identical_status() {
        let r = resolved();
        let first = next_status(None, &synced(&r, "h1", true), Some(1), t(100));
        let again = next_status(Some(&first), &synced(&r, "h1", false), Some(1), t(200));
        assert_eq!(first, again, "a no-op resync must not need a status write");
    }

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let r = resolved();
        let ok = next_status(None, &synced(&r, "h1", true), Some(1), t(100));
        let failed = next_status(
            Some(&ok),
            &Outcome::Failed {
                reason: "VaultUnavailable",
                message: "down",
            },
            Some(1),
            t(200),
        );
        assert_eq!(cond(&failed, READY).last_transition_time, t(200));
        assert_eq!(cond(&failed, READY).status, "False");
        assert!(
            cond(&failed, READY).message.contains("kept"),
            "{}",
            cond(&failed, READY).message
        );
        // Still failing, other reason: no transition.
        let failed2 = next_status(
            Some(&failed),
            &Outcome::Failed {
                reason: "VaultPermissionDenied",
                message: "403",
            },
            Some(1),
            t(300),
        );
        assert_eq!(cond(&failed2, READY).last_transition_time, t(200));
        assert_eq!(cond(&failed2, READY).reason, "VaultPermissionDenied");
        // Failure keeps what describes the existing Secret.
        assert_eq!(failed2.content_hash.as_deref(), Some("h1"));
        assert_eq!(failed2.keys.len(), 1);
        let back = next_status(Some(&failed2), &synced(&r, "h1", false), Some(1), t(400));
        assert_eq!(cond(&back, READY).last_transition_time, t(400));
        assert_eq!(
            back.last_change_time,
            Some(t(100)),
            "same content is not a change"
        );
    }

    #[test]
    fn a_content_change_moves_change_and_sync_times() {
        let r = resolved();
        let first = next_status(None, &synced(&r, "h1", true), Some(1), t(100));
        let changed = next_status(Some(&first), &synced(&r, "h2", true), Some(1), t(500));
        assert_eq!(changed.last_change_time, Some(t(500)));
        assert_eq!(changed.last_sync_time, Some(t(500)));
        let repaired = next_status(Some(&changed), &synced(&r, "h2", true), Some(1), t(600));
        assert_eq!(
            repaired.last_change_time,
            Some(t(500)),
            "a drift repair is not a content change"
        );
        assert_eq!(repaired.last_sync_time, Some(t(600)));
    }

    #[test]
    fn the_retained_condition_follows_the_policy_and_stays_on_unknown() {
        use crate::controller::retain::Retention;
        let r = resolved();
        let mut s = next_status(None, &synced(&r, "h1", true), Some(1), t(100));
        set_retention(&mut s, &Retention::Retained, Some(1), &t(100));
        assert_eq!(cond(&s, RETAINED).status, "True");
        assert!(cond(&s, RETAINED).message.contains("Secret api"));
        let before = s.clone();
        set_retention(&mut s, &Retention::Unknown, Some(1), &t(200));
        assert_eq!(s, before);
        set_retention(&mut s, &Retention::Failed("503".into()), Some(1), &t(300));
        assert_eq!(cond(&s, RETAINED).status, "False");
        assert_eq!(cond(&s, RETAINED).last_transition_time, t(300));
        set_retention(&mut s, &Retention::Delete, Some(2), &t(400));
        assert!(s.conditions.iter().all(|c| c.type_ != RETAINED));
    }

    #[test]
    fn a_handled_force_sync_value_is_recorded_only_by_a_sync() {
        let r = resolved();
        let mut outcome = synced(&r, "h1", false);
        if let Outcome::Synced { force_sync, .. } = &mut outcome {
            *force_sync = Some("revoke-1");
        }
        let s = next_status(None, &outcome, Some(1), t(100));
        assert_eq!(s.force_sync_handled.as_deref(), Some("revoke-1"));
        let failed = next_status(
            Some(&s),
            &Outcome::Failed {
                reason: "VaultUnavailable",
                message: "down",
            },
            Some(1),
            t(200),
        );
        assert_eq!(failed.force_sync_handled.as_deref(), Some("revoke-1"));
        let later = next_status(Some(&failed), &synced(&r, "h1", false), Some(1), t(300));
        assert_eq!(
            later.force_sync_handled.as_deref(),
            Some("revoke-1"),
            "kept"
        );
    }
}
