//! Inheritance (pure): scopes in precedence order → one value per key, with its source.
//!
//! The most specific scope wins; a JSON `null` in a more specific scope is a tombstone that
//! hides the inherited key. Values are wrapped in [`SecretValue`], whose `Debug` never prints
//! the value, so a stray `{:?}` cannot leak one.

use std::collections::BTreeMap;
use std::fmt;

use crate::api::v1alpha1::KeySelection;
use crate::scope::Scope;

/// Kubernetes caps a Secret at 1 MiB of data.
pub const MAX_SECRET_BYTES: usize = 1024 * 1024;

/// A secret value. `Debug` and `Display` are redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(String);

impl SecretValue {
    pub fn new(value: impl Into<String>) -> Self {
        SecretValue(value.into())
    }
    /// The value itself. Call sites are few and obvious: the Secret's data, the HMAC, and
    /// the CLI when asked to show values.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(<redacted>)")
    }
}

/// One key of one scope: a value, or a tombstone that unsets the inherited key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Value(SecretValue),
    Tombstone,
}

/// What one scope path holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScopeData {
    pub scope: Scope,
    pub path: String,
    /// KV v2 version read; `None` when the path does not exist (an empty scope).
    pub version: Option<u64>,
    pub entries: BTreeMap<String, Entry>,
    /// The path's KV v2 custom metadata (owner and expiry per key; never values).
    pub custom_metadata: BTreeMap<String, String>,
}

impl ScopeData {
    /// A path with nothing at it.
    pub fn missing(scope: Scope, path: impl Into<String>) -> Self {
        ScopeData {
            scope,
            path: path.into(),
            version: None,
            entries: BTreeMap::new(),
            custom_metadata: BTreeMap::new(),
        }
    }
}

/// Where a resolved value comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub scope: Scope,
    pub path: String,
    pub version: u64,
}

/// A resolved key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedKey {
    pub value: SecretValue,
    pub source: Source,
    /// The key's name in Vault when it was renamed.
    pub renamed_from: Option<String>,
}

/// Resolved keys by name, sorted.
pub type Resolved = BTreeMap<String, ResolvedKey>;

/// Applies inheritance: `layers` are in precedence order, lowest first.
pub fn resolve(layers: &[ScopeData]) -> Resolved {
    let mut out = Resolved::new();
    for layer in layers {
        let Some(version) = layer.version else {
            continue;
        };
        for (key, entry) in &layer.entries {
            match entry {
                Entry::Tombstone => {
                    out.remove(key);
                }
                Entry::Value(value) => {
                    out.insert(
                        key.clone(),
                        ResolvedKey {
                            value: value.clone(),
                            source: Source {
                                scope: layer.scope,
                                path: layer.path.clone(),
                                version,
                            },
                            renamed_from: None,
                        },
                    );
                }
            }
        }
    }
    out
}

/// Why a key selection could not be applied. Key names are not secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectError {
    #[error(
        "key {key:?} (from {path}) is not a valid Secret key: use letters, digits, '-', '_' and '.'; exclude or rename it in spec.keys"
    )]
    InvalidKey { key: String, path: String },
    #[error("spec.keys.rename maps {from:?} to {to:?}, which is not a valid Secret key")]
    InvalidRename { from: String, to: String },
    #[error("spec.keys.rename writes two keys as {to:?} ({first:?} and {second:?})")]
    RenameCollision {
        to: String,
        first: String,
        second: String,
    },
    #[error("the resolved data is {size} bytes, over the 1 MiB limit of a Kubernetes Secret")]
    TooLarge { size: usize },
}

/// Whether `key` is a valid Secret data key (`[-._a-zA-Z0-9]+`, at most 253 bytes, not `.`
/// or `..`).
pub fn is_valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key != "."
        && key != ".."
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Matches `name` against a pattern where `*` stands for any run of characters.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(i) => rest = &rest[i + middle.len()..],
            None => return false,
        }
    }
    true
}

/// Applies include / exclude / rename and checks the result is a valid Secret.
pub fn select(
    resolved: Resolved,
    selection: Option<&KeySelection>,
) -> Result<Resolved, SelectError> {
    let default = KeySelection::default();
    let sel = selection.unwrap_or(&default);
    let mut out = Resolved::new();
    for (name, mut key) in resolved {
        let included = sel.include.is_empty() || sel.include.iter().any(|p| glob_match(p, &name));
        let excluded = sel.exclude.iter().any(|p| glob_match(p, &name));
        if !included || excluded {
            continue;
        }
        let target = match sel.rename.get(&name) {
            Some(to) => {
                if !is_valid_key(to) {
                    return Err(SelectError::InvalidRename {
                        from: name,
                        to: to.clone(),
                    });
                }
                key.renamed_from = Some(name.clone());
                to.clone()
            }
            None => {
                if !is_valid_key(&name) {
                    return Err(SelectError::InvalidKey {
                        key: name,
                        path: key.source.path.clone(),
                    });
                }
                name.clone()
            }
        };
        if let Some(existing) = out.get(&target) {
            return Err(SelectError::RenameCollision {
                to: target.clone(),
                first: existing
                    .renamed_from
                    .clone()
                    .unwrap_or_else(|| target.clone()),
                second: name,
            });
        }
        out.insert(target, key);
    }
    let size: usize = out
        .iter()
        .map(|(k, v)| k.len() + v.value.expose().len())
        .sum();
    if size > MAX_SECRET_BYTES {
        return Err(SelectError::TooLarge { size });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(scope: Scope, entries: &[(&str, Option<&str>)]) -> ScopeData {
        ScopeData {
            scope,
            path: format!("p/{}", scope.as_str()),
            version: Some(scope as u64 + 1),
            entries: entries
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        match v {
                            Some(v) => Entry::Value(SecretValue::new(*v)),
                            None => Entry::Tombstone,
                        },
                    )
                })
                .collect(),
            custom_metadata: Default::default(),
        }
    }

    fn value_of(r: &Resolved, key: &str) -> Option<(String, Scope)> {
        r.get(key)
            .map(|k| (k.value.expose().to_string(), k.source.scope))
    }

    #[test]
    fn every_more_specific_scope_overrides_every_less_specific_one() {
        for (lo_i, lo) in Scope::ALL.iter().enumerate() {
            for hi in &Scope::ALL[lo_i + 1..] {
                let r = resolve(&[
                    layer(*lo, &[("FOO", Some("low"))]),
                    layer(*hi, &[("FOO", Some("high"))]),
                ]);
                assert_eq!(
                    value_of(&r, "FOO"),
                    Some(("high".into(), *hi)),
                    "{lo} vs {hi}"
                );
            }
        }
    }

    #[test]
    fn a_tombstone_at_each_level_hides_every_less_specific_value() {
        for (i, tomb) in Scope::ALL.iter().enumerate().skip(1) {
            let mut layers: Vec<ScopeData> = Scope::ALL[..i]
                .iter()
                .map(|s| layer(*s, &[("FOO", Some("inherited")), ("BAR", Some("kept"))]))
                .collect();
            layers.push(layer(*tomb, &[("FOO", None)]));
            let r = resolve(&layers);
            assert!(
                !r.contains_key("FOO"),
                "tombstone at {tomb} did not hide FOO"
            );
            assert_eq!(r["BAR"].value.expose(), "kept");
        }
    }

    #[test]
    fn a_value_more_specific_than_a_tombstone_shows_again() {
        let r = resolve(&[
            layer(Scope::Project, &[("FOO", Some("a"))]),
            layer(Scope::Environment, &[("FOO", None)]),
            layer(Scope::EnvironmentService, &[("FOO", Some("b"))]),
        ]);
        assert_eq!(
            value_of(&r, "FOO"),
            Some(("b".into(), Scope::EnvironmentService))
        );
    }

    #[test]
    fn a_tombstone_with_nothing_to_hide_adds_nothing() {
        let r = resolve(&[layer(Scope::Service, &[("GHOST", None)])]);
        assert!(r.is_empty());
    }

    #[test]
    fn missing_scopes_are_empty_not_errors() {
        let r = resolve(&[
            ScopeData::missing(Scope::Project, "shop"),
            layer(Scope::Service, &[("A", Some("1"))]),
            ScopeData::missing(Scope::Environment, "shop/envs/dev"),
        ]);
        assert_eq!(r.len(), 1);
        assert_eq!(
            r["A"].source,
            Source {
                scope: Scope::Service,
                path: "p/service".into(),
                version: 2
            }
        );
    }

    #[test]
    fn each_key_records_its_own_winning_scope_path_and_version() {
        let r = resolve(&[
            layer(Scope::Project, &[("A", Some("1")), ("B", Some("1"))]),
            layer(Scope::Environment, &[("B", Some("2"))]),
        ]);
        assert_eq!(r["A"].source.scope, Scope::Project);
        assert_eq!(r["A"].source.version, 1);
        assert_eq!(r["B"].source.scope, Scope::Environment);
        assert_eq!(r["B"].source.path, "p/environment");
        assert_eq!(r["B"].source.version, 3);
    }

    fn sel(include: &[&str], exclude: &[&str], rename: &[(&str, &str)]) -> KeySelection {
        KeySelection {
            include: include.iter().map(|s| s.to_string()).collect(),
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
            rename: rename
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        }
    }

    fn resolved(keys: &[&str]) -> Resolved {
        resolve(&[layer(
            Scope::Project,
            &keys.iter().map(|k| (*k, Some("v"))).collect::<Vec<_>>(),
        )])
    }

    #[test]
    fn include_exclude_and_wildcards_select_keys() {
        let r = select(
            resolved(&["DB_HOST", "DB_PASS", "API_KEY", "OTHER"]),
            Some(&sel(&["DB_*", "API_KEY"], &["*_PASS"], &[])),
        )
        .unwrap();
        assert_eq!(r.keys().collect::<Vec<_>>(), vec!["API_KEY", "DB_HOST"]);
    }

    #[test]
    fn rename_writes_the_new_name_and_remembers_the_old() {
        let r = select(
            resolved(&["DB_PASSWORD"]),
            Some(&sel(&[], &[], &[("DB_PASSWORD", "password")])),
        )
        .unwrap();
        assert_eq!(r["password"].renamed_from.as_deref(), Some("DB_PASSWORD"));
        assert!(!r.contains_key("DB_PASSWORD"));
    }

    #[test]
    fn rename_onto_an_existing_key_is_refused() {
        let err = select(resolved(&["A", "B"]), Some(&sel(&[], &[], &[("A", "B")]))).unwrap_err();
        assert!(matches!(err, SelectError::RenameCollision { .. }), "{err}");
    }

    #[test]
    fn invalid_key_names_are_refused_unless_excluded_or_renamed() {
        let err = select(resolved(&["bad key"]), None).unwrap_err();
        assert_eq!(
            err,
            SelectError::InvalidKey {
                key: "bad key".into(),
                path: "p/project".into()
            }
        );
        assert!(
            select(resolved(&["bad key"]), Some(&sel(&[], &["bad*"], &[])))
                .unwrap()
                .is_empty()
        );
        assert!(
            select(
                resolved(&["bad key"]),
                Some(&sel(&[], &[], &[("bad key", "good")]))
            )
            .is_ok()
        );
        let err = select(resolved(&["A"]), Some(&sel(&[], &[], &[("A", "no/slash")]))).unwrap_err();
        assert!(matches!(err, SelectError::InvalidRename { .. }));
    }

    #[test]
    fn data_over_one_mebibyte_is_refused() {
        let big = "x".repeat(MAX_SECRET_BYTES);
        let r = resolve(&[layer(Scope::Project, &[("BIG", Some(&big))])]);
        assert!(matches!(select(r, None), Err(SelectError::TooLarge { .. })));
    }

    #[test]
    fn glob_matches_like_a_shell_star() {
        for (p, n, want) in [
            ("A*", "ABC", true),
            ("*C", "ABC", true),
            ("A*C", "ABC", true),
            ("A*C", "AC", true),
            ("*", "", true),
            ("A*B*C", "AxxBxxC", true),
            ("A*B*C", "ACB", false),
            ("AB", "ABC", false),
            ("A*A", "A", false),
        ] {
            assert_eq!(glob_match(p, n), want, "{p} ~ {n}");
        }
    }

    #[test]
    fn debug_output_never_shows_a_value() {
        let v = SecretValue::new("canary-123");
        assert!(!format!("{v:?}").contains("canary"));
        let r = resolve(&[layer(Scope::Project, &[("K", Some("canary-123"))])]);
        assert!(!format!("{r:?}").contains("canary"));
    }
}
