//! Rotation overlap windows: after a key changes, its previous value stays in the Secret for
//! the rule's `overlap`, so clients can move from the old value to the new one.
//!
//! The previous value is the key's value in the latest earlier KV v2 version of its winning
//! scope where it differed; the window starts at the `created_time` of the version that
//! changed it. A previous version that was deleted or destroyed (a revocation) ends the window
//! at once — the versions are read no older than the caller's `max_age`, and afresh on a
//! forced sync, so a revocation is seen by the sync it forces. Written under `as` joined with
//! `,` (new first), or as `<KEY>_PREVIOUS`.

use std::time::Duration;

use crate::api::v1alpha1::Rotation;
use crate::resolve::{Entry, ResolvedKey, SecretValue};
use crate::vault::{ScopeSource, StoreHandle, VaultError};

/// How many earlier versions are looked at for the previous value.
const MAX_HISTORY: u64 = 20;

/// An open overlap window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    pub previous: SecretValue,
    pub ends: jiff::Timestamp,
}

/// The open window of `current` (a resolved key) under `overlap` at `now`, if any. Versions
/// are read no older than `max_age` (zero: from Vault, for a forced sync).
pub async fn window(
    source: &dyn ScopeSource,
    store: &StoreHandle,
    key: &str,
    current: &ResolvedKey,
    overlap: Duration,
    now: jiff::Timestamp,
    max_age: Duration,
) -> Result<Option<Window>, VaultError> {
    let path = &current.source.path;
    let mut changed_in = current.source.version;
    let lowest = current.source.version.saturating_sub(MAX_HISTORY).max(1);
    for v in (lowest..current.source.version).rev() {
        let Some(version) = source.read_version(store, path, v, max_age).await? else {
            return Ok(None);
        };
        // A deleted or destroyed version: revoked, it never shows again.
        let Some(entries) = version.entries else {
            return Ok(None);
        };
        match entries.get(key) {
            Some(Entry::Value(value)) if value == &current.value => changed_in = v,
            Some(Entry::Value(previous)) => {
                let Some(changed) = source
                    .read_version(store, path, changed_in, max_age)
                    .await?
                else {
                    return Ok(None);
                };
                let overlap =
                    jiff::SignedDuration::try_from(overlap).unwrap_or(jiff::SignedDuration::MAX);
                let ends = changed
                    .created
                    .checked_add(overlap)
                    .unwrap_or(jiff::Timestamp::MAX);
                return Ok((now < ends).then(|| Window {
                    previous: previous.clone(),
                    ends,
                }));
            }
            // The key was new, or unset, before: nothing to overlap with.
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// The key and value a rule writes: `as` = `new,old` (or `new` once the window closed), or
/// `<KEY>_PREVIOUS` = old while the window is open.
pub fn rotated_entry(
    rule: &Rotation,
    current: &SecretValue,
    window: Option<&Window>,
) -> Option<(String, SecretValue)> {
    match (&rule.as_, window) {
        (Some(as_), Some(w)) => Some((
            as_.clone(),
            SecretValue::new(format!("{},{}", current.expose(), w.previous.expose())),
        )),
        (Some(as_), None) => Some((as_.clone(), current.clone())),
        (None, Some(w)) => Some((format!("{}_PREVIOUS", rule.key), w.previous.clone())),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(as_: Option<&str>) -> Rotation {
        Rotation {
            key: "API_KEY".into(),
            overlap: "24h".into(),
            as_: as_.map(Into::into),
        }
    }

    #[test]
    fn the_rotated_entry_joins_new_first_or_keeps_the_previous_alone() {
        let new = SecretValue::new("new");
        let w = Window {
            previous: SecretValue::new("old"),
            ends: jiff::Timestamp::MAX,
        };
        let (k, v) = rotated_entry(&rule(Some("API_KEYS")), &new, Some(&w)).unwrap();
        assert_eq!((k.as_str(), v.expose()), ("API_KEYS", "new,old"));
        let (k, v) = rotated_entry(&rule(Some("API_KEYS")), &new, None).unwrap();
        assert_eq!((k.as_str(), v.expose()), ("API_KEYS", "new"));
        let (k, v) = rotated_entry(&rule(None), &new, Some(&w)).unwrap();
        assert_eq!((k.as_str(), v.expose()), ("API_KEY_PREVIOUS", "old"));
        assert!(rotated_entry(&rule(None), &new, None).is_none());
    }
}
