//! Inheritance (pure): scopes in precedence order → one value per key, with its source.
//!
//! The most specific scope wins; a JSON `null` in a more specific scope is a tombstone that
//! hides the inherited key. Values are wrapped in [`SecretValue`], whose `Debug` never prints
//! the value, so a stray `{:?}` cannot leak one.
//!
//! A [`ScopeData`] is what the shared read cache holds for every path the operator reads, so it
//! is laid out small: the keys of a scope in one sorted slice ([`Entries`]), each value in a
//! `Box<str>`. The cache hands it out as an `Arc<ScopeData>`; the functions here take layers
//! as anything that is [`AsRef<ScopeData>`], owned or shared.

use std::collections::BTreeMap;
use std::fmt;

use crate::api::v1alpha1::KeySelection;
use crate::scope::Scope;

/// Kubernetes caps a Secret at 1 MiB of data.
pub const MAX_SECRET_BYTES: usize = 1024 * 1024;

/// A secret value. `Debug` and `Display` are redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Box<str>);

impl SecretValue {
    pub fn new(value: impl Into<String>) -> Self {
        // No spare capacity: the read cache keeps every value of every path it holds.
        SecretValue(value.into().into_boxed_str())
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

/// The keys of one scope, sorted by name, each once.
///
/// A sorted boxed slice rather than a `BTreeMap`: a scope holds a handful of keys, read whole
/// by [`resolve`] far more often than looked up one by one, and a map's first node takes over
/// half a KiB however few keys it holds — more than the keys and values of a typical scope, in
/// the read cache that keeps every path read. Lookups are binary searches; the rare edits
/// (`insert`, `remove`: the CLI's preview, tests) rebuild the slice.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Entries(Box<[(Box<str>, Entry)]>);

impl Entries {
    fn position(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| (**k).cmp(key))
    }

    /// The entry of `key`.
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.position(key).ok().map(|i| &self.0[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.position(key).is_ok()
    }

    /// The entries, sorted by key.
    pub fn iter(&self) -> EntriesIter<'_> {
        self.into_iter()
    }

    /// The keys, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| &**k)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sets `key`, returning its previous entry.
    pub fn insert(&mut self, key: String, entry: Entry) -> Option<Entry> {
        let mut all = std::mem::take(&mut self.0).into_vec();
        let previous = match all.binary_search_by(|(k, _)| (**k).cmp(key.as_str())) {
            Ok(i) => Some(std::mem::replace(&mut all[i].1, entry)),
            Err(i) => {
                all.insert(i, (key.into_boxed_str(), entry));
                None
            }
        };
        self.0 = all.into_boxed_slice();
        previous
    }

    /// Unsets `key`, returning its entry.
    pub fn remove(&mut self, key: &str) -> Option<Entry> {
        let i = self.position(key).ok()?;
        let mut all = std::mem::take(&mut self.0).into_vec();
        let (_, entry) = all.remove(i);
        self.0 = all.into_boxed_slice();
        Some(entry)
    }
}

/// The entries of an [`Entries`], sorted by key.
pub type EntriesIter<'a> = std::iter::Map<
    std::slice::Iter<'a, (Box<str>, Entry)>,
    fn(&'a (Box<str>, Entry)) -> (&'a str, &'a Entry),
>;

impl<'a> IntoIterator for &'a Entries {
    type Item = (&'a str, &'a Entry);
    type IntoIter = EntriesIter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, e)| (&**k, e))
    }
}

/// The last entry of a key given twice wins, as in a map.
impl<K: Into<String>> FromIterator<(K, Entry)> for Entries {
    fn from_iter<I: IntoIterator<Item = (K, Entry)>>(iter: I) -> Self {
        let sorted: BTreeMap<String, Entry> =
            iter.into_iter().map(|(k, e)| (k.into(), e)).collect();
        Entries(
            sorted
                .into_iter()
                .map(|(k, e)| (k.into_boxed_str(), e))
                .collect(),
        )
    }
}

impl<K: Into<String>, const N: usize> From<[(K, Entry); N]> for Entries {
    fn from(entries: [(K, Entry); N]) -> Self {
        entries.into_iter().collect()
    }
}

impl fmt::Debug for Entries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// What one scope path holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScopeData {
    pub scope: Scope,
    pub path: String,
    /// KV v2 version read; `None` when the path does not exist (an empty scope).
    pub version: Option<u64>,
    pub entries: Entries,
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
            entries: Entries::default(),
            custom_metadata: BTreeMap::new(),
        }
    }
}

/// Layers are read owned (tests, the CLI) or shared (`Arc<ScopeData>`, from the read cache).
impl AsRef<ScopeData> for ScopeData {
    fn as_ref(&self) -> &ScopeData {
        self
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
pub fn resolve<L: AsRef<ScopeData>>(layers: &[L]) -> Resolved {
    let mut out = Resolved::new();
    for layer in layers {
        let layer = layer.as_ref();
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
                        key.to_string(),
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
    fn entries_are_sorted_by_key_and_the_last_of_a_repeated_key_wins() {
        let value = |v: &str| Entry::Value(SecretValue::new(v));
        let mut e: Entries = [("B", value("1")), ("A", value("2")), ("B", value("3"))].into();
        assert_eq!(e.keys().collect::<Vec<_>>(), ["A", "B"]);
        assert_eq!(e.get("B"), Some(&value("3")));
        assert_eq!(e.get("C"), None);
        assert_eq!(e.insert("C".into(), Entry::Tombstone), None);
        assert_eq!(e.insert("A".into(), value("4")), Some(value("2")));
        assert_eq!(e.remove("B"), Some(value("3")));
        assert_eq!(e.remove("B"), None);
        let all: Vec<_> = e.iter().collect();
        assert_eq!(all, [("A", &value("4")), ("C", &Entry::Tombstone)]);
    }

    #[test]
    fn debug_output_never_shows_a_value() {
        let v = SecretValue::new("canary-123");
        assert!(!format!("{v:?}").contains("canary"));
        let l = layer(Scope::Project, &[("K", Some("canary-123"))]);
        assert!(!format!("{l:?}").contains("canary"));
        let r = resolve(&[l]);
        assert!(!format!("{r:?}").contains("canary"));
    }
}
