//! Sharding: with `--shard-count N`, each replica serves the ScopedSecrets of the namespaces
//! that hash to its `--shard-index`, so a cluster beyond one process's reach is served by N
//! processes that never coordinate with each other. Kubernetes is the coordination: each shard
//! holds its own Lease (`scoped-secrets-leader-<index>`), so standbys of a shard take over
//! from its leader like an unsharded standby does.
//!
//! The hash is FNV-1a (64-bit) of the namespace name, modulo N: fixed by this file, the same
//! on every platform, in every version and in every process (never `DefaultHasher`, whose
//! output may change between Rust releases). A whole namespace lands on one shard, so the
//! objects a reconcile reads together (its namespace, VaultStores, workloads) are one
//! shard's. Changing N moves namespaces between shards: roll all shards together.

use std::fmt;

/// One shard of N.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    index: u32,
    count: u32,
}

/// A shard that cannot exist.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid shard {index} of {count}: --shard-count must be at least 1 and --shard-index below it"
)]
pub struct InvalidShard {
    index: u32,
    count: u32,
}

impl Shard {
    /// Shard `index` of `count` (0-based).
    pub fn new(index: u32, count: u32) -> Result<Self, InvalidShard> {
        if count == 0 || index >= count {
            return Err(InvalidShard { index, count });
        }
        Ok(Shard { index, count })
    }

    /// The shard of a replica from its StatefulSet pod ordinal: replicas `o`, `o + count`,
    /// `o + 2 count`, … serve shard `o mod count` (one leads, the others stand by).
    pub fn from_ordinal(ordinal: u32, count: u32) -> Result<Self, InvalidShard> {
        Shard::new(ordinal % count.max(1), count)
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    /// Whether this shard serves the ScopedSecrets of `namespace`.
    pub fn serves(&self, namespace: &str) -> bool {
        shard_of(namespace, self.count) == self.index
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} of {}", self.index, self.count)
    }
}

/// Whether `shard` (`None`: not sharded) serves the ScopedSecrets of `namespace`.
pub fn serves(shard: Option<Shard>, namespace: Option<&str>) -> bool {
    shard.is_none_or(|s| namespace.is_some_and(|ns| s.serves(ns)))
}

/// The shard (of `count`) serving `namespace`: FNV-1a 64 of its name, modulo `count`.
pub fn shard_of(namespace: &str, count: u32) -> u32 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = namespace
        .bytes()
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    (hash % u64::from(count.max(1))) as u32
}

/// A StatefulSet pod's ordinal: the value of the `apps.kubernetes.io/pod-index` label when
/// given (`POD_INDEX` from the downward API), else the number after the last `-` of the
/// hostname (`scoped-secrets-2` → 2).
pub fn pod_ordinal(pod_index: Option<&str>, hostname: Option<&str>) -> Option<u32> {
    if let Some(i) = pod_index.map(str::trim).filter(|s| !s.is_empty()) {
        return i.parse().ok();
    }
    hostname?.trim().rsplit_once('-')?.1.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_fnv1a_and_never_changes() {
        // FNV-1a 64 reference values: "" is the offset basis, "a" = 0xaf63dc4c8601ec8c.
        assert_eq!(
            shard_of("", u32::MAX),
            (0xcbf2_9ce4_8422_2325u64 % u64::from(u32::MAX)) as u32
        );
        assert_eq!(
            shard_of("a", u32::MAX),
            (0xaf63_dc4c_8601_ec8cu64 % u64::from(u32::MAX)) as u32
        );
        // Pinned: a change here moves namespaces between the shards of running operators.
        let pinned: Vec<u32> = [
            "default",
            "shop-dev",
            "shop-prod",
            "bank-dev",
            "kube-system",
        ]
        .iter()
        .map(|ns| shard_of(ns, 4))
        .collect();
        assert_eq!(pinned, vec![2, 3, 1, 1, 2]);
    }

    #[test]
    fn every_namespace_has_exactly_one_shard_and_the_shards_share_the_load() {
        let shards: Vec<Shard> = (0..4).map(|i| Shard::new(i, 4).unwrap()).collect();
        let mut per_shard = [0usize; 4];
        for n in 0..4000 {
            let ns = format!("team-{n}-dev");
            let serving: Vec<&Shard> = shards.iter().filter(|s| s.serves(&ns)).collect();
            assert_eq!(serving.len(), 1, "{ns}");
            per_shard[serving[0].index() as usize] += 1;
        }
        assert!(per_shard.iter().all(|&n| n > 800), "{per_shard:?}");
    }

    #[test]
    fn shards_come_from_flags_or_the_pod_ordinal() {
        assert!(Shard::new(2, 2).is_err());
        assert!(Shard::new(0, 0).is_err());
        assert_eq!(
            Shard::from_ordinal(5, 2).unwrap(),
            Shard::new(1, 2).unwrap()
        );
        assert_eq!(pod_ordinal(Some("3"), Some("x-1")), Some(3));
        assert_eq!(pod_ordinal(None, Some("scoped-secrets-12\n")), Some(12));
        assert_eq!(pod_ordinal(Some(""), Some("scoped-secrets-0")), Some(0));
        assert_eq!(pod_ordinal(None, Some("laptop")), None);
        assert_eq!(pod_ordinal(Some("x"), None), None);
    }
}
