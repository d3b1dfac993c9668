//! Building the desired Secret and its keyed content hash (pure).
//!
//! `data` (bytes) is written, never `stringData`: `stringData` is write-only and muddles
//! server-side-apply ownership. The content hash is an HMAC-SHA256 under a key only the
//! operator holds, so status and annotations can carry it without revealing a value.

use std::collections::BTreeMap;
use std::fmt;

use hmac::{Hmac, Mac};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use sha2::{Digest, Sha256};

use crate::MANAGED_LABEL;
use crate::api::v1alpha1::{DeletionPolicy, ScopedSecret};
use crate::resolve::Resolved;

/// Annotation on the Secret with the HMAC of its content.
pub const CONTENT_HASH_ANNOTATION: &str = "scopedsecrets.io/content-hash";
/// Annotation on the Secret with a digest of the metadata the operator sets (labels,
/// annotations, type, ownership), so a spec edit that only removes a label is still written.
pub const METADATA_HASH_ANNOTATION: &str = "scopedsecrets.io/metadata-hash";
/// Label on the Secret naming its ScopedSecret.
pub const OWNER_LABEL: &str = "scopedsecrets.io/scopedsecret";
/// Value of [`MANAGED_LABEL`] on managed Secrets.
pub const MANAGED_LABEL_VALUE: &str = "true";
/// The Secret type that is never written.
pub const FORBIDDEN_TYPE: &str = "kubernetes.io/service-account-token";

/// The HMAC key. `Debug` is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct HmacKey(Vec<u8>);

impl HmacKey {
    pub fn new(bytes: Vec<u8>) -> Self {
        HmacKey(bytes)
    }

    /// The key material, for other HMACs under the same key (rollout annotations).
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for HmacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HmacKey(<redacted>)")
    }
}

/// What precedes the hex digits of a content hash.
const CONTENT_HASH_PREFIX: &str = "hmac-sha256:";

/// Keyed HMAC-SHA256 of a Secret's type and data, as `hmac-sha256:<hex>`. Each field is
/// length-prefixed so no two different contents share an encoding.
pub fn content_hash(key: &HmacKey, type_: &str, data: &BTreeMap<String, ByteString>) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(&key.0).expect("HMAC accepts keys of any length");
    let mut field = |bytes: &[u8]| {
        mac.update(&(bytes.len() as u64).to_be_bytes());
        mac.update(bytes);
    };
    field(type_.as_bytes());
    for (k, v) in data {
        field(k.as_bytes());
        field(&v.0);
    }
    format!("{CONTENT_HASH_PREFIX}{}", hex(&mac.finalize().into_bytes()))
}

/// The digest a content hash (`hmac-sha256:<hex>`) spells; `None` for anything else.
pub fn parse_content_hash(hash: &str) -> Option<[u8; 32]> {
    unhex(hash.strip_prefix(CONTENT_HASH_PREFIX)?)
}

/// A content hash as the annotation and the status carry it.
pub fn format_content_hash(digest: &[u8; 32]) -> String {
    format!("{CONTENT_HASH_PREFIX}{}", hex(digest))
}

/// `bytes` in lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The Secret's data from resolved keys.
pub fn secret_data(resolved: &Resolved) -> BTreeMap<String, ByteString> {
    resolved
        .iter()
        .map(|(k, v)| (k.clone(), ByteString(v.value.expose().as_bytes().to_vec())))
        .collect()
}

/// The Secret's type: `spec.target.type`, by default `Opaque`.
pub fn secret_type(ss: &ScopedSecret) -> String {
    ss.spec
        .target
        .as_ref()
        .and_then(|t| t.type_.clone())
        .unwrap_or_else(|| "Opaque".to_string())
}

/// The Secret as the operator wants it: what it applies with server-side apply.
pub fn desired_secret(
    ss: &ScopedSecret,
    secret_name: &str,
    data: BTreeMap<String, ByteString>,
    content_hash: &str,
    key_hashes: &str,
) -> Secret {
    let target = ss.spec.target.clone().unwrap_or_default();
    let type_ = secret_type(ss);

    let mut labels = target.labels;
    labels.insert(MANAGED_LABEL.to_string(), MANAGED_LABEL_VALUE.to_string());
    labels.insert(
        OWNER_LABEL.to_string(),
        ss.metadata.name.clone().unwrap_or_default(),
    );

    let owner_references = match ss.spec.deletion_policy {
        DeletionPolicy::Delete => Some(vec![owner_reference(ss)]),
        DeletionPolicy::Retain => None,
    };

    let mut annotations = target.annotations;
    annotations.insert(
        CONTENT_HASH_ANNOTATION.to_string(),
        content_hash.to_string(),
    );
    // What the workload controller computes restarts from, reading Secret metadata only.
    annotations.insert(
        crate::rollout::KEY_HASHES_ANNOTATION.to_string(),
        key_hashes.to_string(),
    );
    let metadata_hash = metadata_digest(&type_, &labels, &annotations, owner_references.is_some());
    annotations.insert(METADATA_HASH_ANNOTATION.to_string(), metadata_hash);

    Secret {
        metadata: ObjectMeta {
            name: Some(secret_name.to_string()),
            namespace: ss.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references,
            ..Default::default()
        },
        type_: Some(type_),
        data: Some(data),
        ..Default::default()
    }
}

fn owner_reference(ss: &ScopedSecret) -> OwnerReference {
    OwnerReference {
        api_version: ScopedSecret::api_version(&()).into_owned(),
        kind: ScopedSecret::kind(&()).into_owned(),
        name: ss.metadata.name.clone().unwrap_or_default(),
        uid: ss.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        // Not blocking: that would need `update` on scopedsecrets/finalizers, and nothing
        // waits on the Secret's deletion.
        block_owner_deletion: None,
    }
}

fn metadata_digest(
    type_: &str,
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
    owned: bool,
) -> String {
    // Not keyed: none of this is secret.
    let mut h = Sha256::new();
    let mut field = |s: &str| {
        h.update((s.len() as u64).to_be_bytes());
        h.update(s.as_bytes());
    };
    field(type_);
    for (k, v) in labels.iter().chain(annotations.iter()) {
        field(k);
        field(v);
    }
    field(if owned { "owned" } else { "retained" });
    hex(&h.finalize()[..8])
}

/// Whether `existing` differs from `desired` in anything the operator sets. Equal means no
/// write at all: a no-op resync costs zero API writes.
pub fn needs_write(existing: Option<&Secret>, desired: &Secret) -> bool {
    let Some(existing) = existing else {
        return true;
    };
    let empty_data = BTreeMap::new();
    let data_equal = existing.data.as_ref().unwrap_or(&empty_data)
        == desired.data.as_ref().unwrap_or(&empty_data);
    let type_equal = existing.type_.as_deref().unwrap_or("Opaque")
        == desired.type_.as_deref().unwrap_or("Opaque");
    !(data_equal
        && type_equal
        && existing.string_data.is_none()
        && metadata_matches(&existing.metadata, desired))
}

/// Whether a Secret's metadata has everything the operator sets on `desired`: its labels and
/// annotations (the content and metadata hashes among them) and the same ScopedSecret owner
/// reference. Others' labels and annotations do not matter.
fn metadata_matches(existing: &ObjectMeta, desired: &Secret) -> bool {
    let subset = |want: &Option<BTreeMap<String, String>>,
                  have: &Option<BTreeMap<String, String>>| {
        let empty = BTreeMap::new();
        let have = have.as_ref().unwrap_or(&empty);
        want.as_ref()
            .unwrap_or(&empty)
            .iter()
            .all(|(k, v)| have.get(k) == Some(v))
    };
    let want = &desired.metadata;
    same_owner(existing, want)
        && subset(&want.labels, &existing.labels)
        && subset(&want.annotations, &existing.annotations)
}

/// Whether a Secret that had every label and annotation of a desired Secret when it was last
/// verified, and has not changed since, has those of `desired`: it carries the same metadata
/// hash `hash` (a digest of the type, labels and annotations the operator sets, the content
/// and key hashes among them) and its ScopedSecret owner references have the uids
/// `owner_uids`, as `desired`'s do. Needs nothing else of the Secret: what the managed Secrets'
/// cache keeps of it (`controller::caches::ManagedSecret`).
pub fn same_metadata_hash(
    hash: Option<[u8; 8]>,
    owner_uids: &[Box<str>],
    desired: &Secret,
) -> bool {
    let want = &desired.metadata;
    let wanted = want.annotations.as_ref();
    let wanted = wanted.and_then(|a| a.get(METADATA_HASH_ANNOTATION));
    hash.is_some()
        && hash == wanted.and_then(|h| unhex(h))
        && owner_uids.iter().map(|u| &**u).eq(scoped_secret_uids(want))
}

/// The operator's owner references are the same: those to a ScopedSecret, by uid.
fn same_owner(existing: &ObjectMeta, desired: &ObjectMeta) -> bool {
    scoped_secret_uids(existing).eq(scoped_secret_uids(desired))
}

/// The uids of the ScopedSecret owner references of `meta`.
pub fn scoped_secret_uids(meta: &ObjectMeta) -> impl Iterator<Item = &str> {
    let owners = meta.owner_references.iter().flatten();
    owners
        .filter(|r| is_scoped_secret(r))
        .map(|r| r.uid.as_str())
}

/// The `N` bytes `s` spells in lowercase hex, as the operator writes its hashes; `None` for
/// anything else (another length, another case, not hex).
pub fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let s = s.as_bytes();
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0; N];
    for (byte, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// Whether an owner reference names a ScopedSecret.
pub fn is_scoped_secret(owner: &OwnerReference) -> bool {
    owner.kind == "ScopedSecret" && owner.api_version.starts_with("scopedsecrets.io/")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::v1alpha1::{ScopedSecretSpec, StoreRef, Target};

    fn key() -> HmacKey {
        HmacKey::new(b"0123456789abcdef0123456789abcdef".to_vec())
    }

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
            .collect()
    }

    fn ss() -> ScopedSecret {
        let mut ss = ScopedSecret::new(
            "api",
            ScopedSecretSpec {
                store_ref: StoreRef {
                    name: "vault".into(),
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        ss.metadata.namespace = Some("shop-dev".into());
        ss.metadata.uid = Some("uid-1".into());
        ss
    }

    #[test]
    fn content_hash_is_keyed_and_changes_with_any_byte() {
        let a = content_hash(&key(), "Opaque", &data(&[("A", "1")]));
        assert!(a.starts_with("hmac-sha256:"));
        assert_eq!(a, content_hash(&key(), "Opaque", &data(&[("A", "1")])));
        assert_ne!(a, content_hash(&key(), "Opaque", &data(&[("A", "2")])));
        assert_ne!(a, content_hash(&key(), "Opaque", &data(&[("B", "1")])));
        assert_ne!(a, content_hash(&key(), "other", &data(&[("A", "1")])));
        assert_ne!(
            a,
            content_hash(
                &HmacKey::new(b"another key".to_vec()),
                "Opaque",
                &data(&[("A", "1")])
            )
        );
        // Length prefixes: moving a byte between key and value is a different content.
        assert_ne!(
            content_hash(&key(), "Opaque", &data(&[("AB", "C")])),
            content_hash(&key(), "Opaque", &data(&[("A", "BC")]))
        );
        // Not a plain hash of the value.
        let plain = hex(&Sha256::digest(b"1"));
        assert!(!a.contains(&plain));
    }

    #[test]
    fn desired_secret_is_labelled_owned_and_typed() {
        let mut s = ss();
        s.spec.target = Some(Box::new(Target {
            name: Some("api-env".into()),
            labels: [
                ("team".to_string(), "shop".to_string()),
                (MANAGED_LABEL.to_string(), "false".to_string()),
            ]
            .into(),
            annotations: [("note".to_string(), "x".to_string())].into(),
            ..Default::default()
        }));
        let d = desired_secret(&s, "api-env", data(&[("A", "1")]), "hmac-sha256:ab", "{}");
        let labels = d.metadata.labels.as_ref().unwrap();
        assert_eq!(
            labels[MANAGED_LABEL], "true",
            "users cannot unset the managed label"
        );
        assert_eq!(labels["team"], "shop");
        assert_eq!(labels[OWNER_LABEL], "api");
        let ann = d.metadata.annotations.as_ref().unwrap();
        assert_eq!(ann[CONTENT_HASH_ANNOTATION], "hmac-sha256:ab");
        assert_eq!(ann["note"], "x");
        assert_eq!(d.type_.as_deref(), Some("Opaque"));
        assert!(d.string_data.is_none());
        let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("ScopedSecret", "uid-1", Some(true))
        );
        assert_eq!(d.metadata.namespace.as_deref(), Some("shop-dev"));
    }

    #[test]
    fn retain_policy_writes_no_owner_reference() {
        let mut s = ss();
        s.spec.deletion_policy = DeletionPolicy::Retain;
        let d = desired_secret(&s, "api", data(&[]), "h", "{}");
        assert!(d.metadata.owner_references.is_none());
        let owned = desired_secret(&ss(), "api", data(&[]), "h", "{}");
        assert!(
            needs_write(Some(&owned), &d),
            "switching to Retain must drop the owner reference"
        );
    }

    #[test]
    fn equal_secret_needs_no_write_and_any_drift_does() {
        let d = desired_secret(&ss(), "api", data(&[("A", "1")]), "h", "{}");
        assert!(needs_write(None, &d));
        let mut existing = d.clone();
        // Server-added metadata and foreign labels do not count as drift.
        existing.metadata.resource_version = Some("7".into());
        existing
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("extra".into(), "y".into());
        assert!(!needs_write(Some(&existing), &d));

        let mut edited = existing.clone();
        edited.data = Some(data(&[("A", "tampered")]));
        assert!(needs_write(Some(&edited), &d));
        let mut added = existing.clone();
        added.data = Some(data(&[("A", "1"), ("B", "2")]));
        assert!(needs_write(Some(&added), &d));
        let mut unlabelled = existing.clone();
        unlabelled
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .remove(MANAGED_LABEL);
        assert!(needs_write(Some(&unlabelled), &d));
        let mut retyped = existing.clone();
        retyped.type_ = Some("kubernetes.io/tls".into());
        assert!(needs_write(Some(&retyped), &d));
    }

    #[test]
    fn removing_a_label_from_the_spec_is_a_change() {
        let mut s = ss();
        s.spec.target = Some(Box::new(Target {
            labels: [("team".to_string(), "shop".to_string())].into(),
            ..Default::default()
        }));
        let before = desired_secret(&s, "api", data(&[]), "h", "{}");
        let after = desired_secret(&ss(), "api", data(&[]), "h", "{}");
        assert!(needs_write(Some(&before), &after));
    }
}
