//! Failing objects: how many failures in a row (for the backoff) and which failure was last
//! logged, so that `error_policy` logs a failure at WARN once — when it starts and when it
//! changes — and its repeats at DEBUG. A retry every few seconds of the same Vault outage must
//! not bury the log.
//!
//! One map, keyed by object (a ScopedSecret, or a workload for the workload controller); an
//! entry leaves when its object syncs or is deleted.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

use kube::runtime::reflector::ObjectRef;

use crate::api::v1alpha1::ScopedSecret;

/// One failing object.
#[derive(Debug, Default)]
struct Failing {
    attempts: u32,
    /// Category and message of the failure last logged at WARN.
    logged: Option<(&'static str, String)>,
}

/// What [`Failures::record`] decided for one failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// Failures in a row, this one included (1-based).
    pub attempt: u32,
    /// A repeat of the failure logged last: log it at DEBUG only.
    pub repeat: bool,
}

/// The failing objects, keyed by `K`.
#[derive(Debug)]
pub struct Failures<K = ObjectRef<ScopedSecret>>(Mutex<HashMap<K, Failing>>);

impl<K> Default for Failures<K> {
    fn default() -> Self {
        Failures(Default::default())
    }
}

impl<K: Eq + Hash + Clone> Failures<K> {
    /// Records a failure of `obj`.
    pub fn record(&self, obj: &K, category: &'static str, message: &str) -> Recorded {
        let mut map = self.0.lock().unwrap();
        let entry = map.entry(obj.clone()).or_default();
        entry.attempts = entry.attempts.saturating_add(1);
        let repeat = entry
            .logged
            .as_ref()
            .is_some_and(|(c, m)| *c == category && m == message);
        if !repeat {
            entry.logged = Some((category, message.to_string()));
        }
        Recorded {
            attempt: entry.attempts,
            repeat,
        }
    }

    /// `obj` synced (or is gone): the next failure is news again.
    /// Returns whether `obj` was failing (its recovery is news too).
    pub fn forget(&self, obj: &K) -> bool {
        self.0.lock().unwrap().remove(obj).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_news_when_it_starts_changes_or_returns_after_a_success() {
        let failures = Failures::<ObjectRef<ScopedSecret>>::default();
        let api = ObjectRef::<ScopedSecret>::new("api").within("shop-dev");
        let web = ObjectRef::<ScopedSecret>::new("web").within("shop-dev");
        let down = "failed to reach Vault";
        let r = |attempt, repeat| Recorded { attempt, repeat };
        assert_eq!(failures.record(&api, "VaultUnavailable", down), r(1, false));
        assert_eq!(failures.record(&api, "VaultUnavailable", down), r(2, true));
        assert_eq!(failures.record(&api, "VaultUnavailable", down), r(3, true));
        assert_eq!(
            failures.record(&web, "VaultUnavailable", down),
            r(1, false),
            "per object"
        );
        assert_eq!(
            failures.record(&api, "VaultUnavailable", "Vault is sealed"),
            r(4, false),
            "a new message is news, the count goes on"
        );
        assert_eq!(
            failures.record(&api, "Timeout", "Vault is sealed"),
            r(5, false)
        );
        assert_eq!(
            failures.record(&api, "Timeout", "Vault is sealed"),
            r(6, true)
        );
        failures.forget(&api);
        assert_eq!(
            failures.record(&api, "Timeout", "Vault is sealed"),
            r(1, false)
        );
        failures.forget(&api);
        failures.forget(&web);
        assert!(
            failures.0.lock().unwrap().is_empty(),
            "entries leave with their objects"
        );
    }

    #[test]
    fn workloads_fail_by_kind_and_name_and_their_recovery_is_news() {
        use crate::rollout::WorkloadKind;
        use kube::api::DynamicObject;
        let failures = Failures::<ObjectRef<DynamicObject>>::default();
        let web = |kind: WorkloadKind| ObjectRef::new_with("web", kind.resource()).within("shop");
        let (deployment, sts) = (
            web(WorkloadKind::Deployment),
            web(WorkloadKind::StatefulSet),
        );
        let r = |attempt, repeat| Recorded { attempt, repeat };
        let down = "failed to patch: 503";
        assert_eq!(
            failures.record(&deployment, "KubernetesError", down),
            r(1, false)
        );
        assert_eq!(
            failures.record(&deployment, "KubernetesError", down),
            r(2, true)
        );
        assert_eq!(
            failures.record(&sts, "KubernetesError", down),
            r(1, false),
            "per kind"
        );
        assert!(failures.forget(&deployment), "a recovery");
        assert!(!failures.forget(&deployment), "not twice");
    }
}
