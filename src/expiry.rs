//! Keys near their expiry (pure): `scoped-secrets secret set --expires` stores
//! `expires.<KEY>` in the scope's KV v2 custom metadata, which comes with every read; the
//! operator reports resolved keys that expire within a horizon.

use std::time::Duration;

use crate::resolve::{Resolved, ScopeData};

/// Custom-metadata prefix of a key's expiry.
pub const EXPIRES_PREFIX: &str = "expires.";

/// When one resolved key expires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expiry {
    pub key: String,
    pub at: jiff::Timestamp,
}

/// The expiry of every resolved key that has one, from its winning scope's metadata.
pub fn expiries<L: AsRef<ScopeData>>(resolved: &Resolved, layers: &[L]) -> Vec<Expiry> {
    resolved
        .iter()
        .filter_map(|(name, k)| {
            let layer = layers
                .iter()
                .map(AsRef::as_ref)
                .find(|l| l.path == k.source.path)?;
            let vault_key = k.renamed_from.as_deref().unwrap_or(name);
            let at = layer
                .custom_metadata
                .get(&format!("{EXPIRES_PREFIX}{vault_key}"))?
                .parse::<jiff::Timestamp>()
                .ok()?;
            Some(Expiry {
                key: name.clone(),
                at,
            })
        })
        .collect()
}

/// A sentence naming the keys that expire before `now + horizon` (or already did), if any.
pub fn expiring(expiries: &[Expiry], now: jiff::Timestamp, horizon: Duration) -> Option<String> {
    let horizon = jiff::SignedDuration::try_from(horizon).unwrap_or(jiff::SignedDuration::MAX);
    let limit = now.checked_add(horizon).unwrap_or(jiff::Timestamp::MAX);
    let soon: Vec<String> = expiries
        .iter()
        .filter(|e| e.at <= limit)
        .map(|e| {
            if e.at <= now {
                format!("{} expired at {}", e.key, e.at)
            } else {
                format!("{} expires at {}", e.key, e.at)
            }
        })
        .collect();
    (!soon.is_empty()).then(|| {
        format!(
            "{}; rotate them (scoped-secrets secret rotate)",
            soon.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::{Entry, SecretValue, resolve, select};
    use crate::scope::Scope;

    #[test]
    fn expiries_come_from_the_winning_scope_and_follow_renames() {
        let layers = vec![
            ScopeData {
                scope: Scope::Project,
                path: "shop".into(),
                version: Some(1),
                entries: [("A".to_string(), Entry::Value(SecretValue::new("1")))].into(),
                custom_metadata: [("expires.A".to_string(), "2020-01-01T00:00:00Z".to_string())]
                    .into(),
            },
            ScopeData {
                scope: Scope::Environment,
                path: "shop/envs/dev".into(),
                version: Some(1),
                entries: [("A".to_string(), Entry::Value(SecretValue::new("2")))].into(),
                custom_metadata: [("expires.A".to_string(), "2030-01-01T00:00:00Z".to_string())]
                    .into(),
            },
        ];
        let sel = crate::api::v1alpha1::KeySelection {
            rename: [("A".to_string(), "B".to_string())].into(),
            ..Default::default()
        };
        let resolved = select(resolve(&layers), Some(&sel)).unwrap();
        assert_eq!(
            expiries(&resolved, &layers),
            vec![Expiry {
                key: "B".into(),
                at: "2030-01-01T00:00:00Z".parse().unwrap()
            }]
        );
    }

    #[test]
    fn only_keys_within_the_horizon_are_reported() {
        let now: jiff::Timestamp = "2029-12-20T00:00:00Z".parse().unwrap();
        let e = |k: &str, t: &str| Expiry {
            key: k.into(),
            at: t.parse().unwrap(),
        };
        let list = vec![
            e("SOON", "2030-01-01T00:00:00Z"),
            e("LATER", "2031-01-01T00:00:00Z"),
            e("PAST", "2029-01-01T00:00:00Z"),
        ];
        let msg = expiring(&list, now, Duration::from_secs(14 * 86_400)).unwrap();
        assert!(
            msg.contains("SOON expires at 2030-01-01") && msg.contains("PAST expired"),
            "{msg}"
        );
        assert!(!msg.contains("LATER"));
        assert!(expiring(&list[1..2], now, Duration::from_secs(86_400)).is_none());
    }
}
