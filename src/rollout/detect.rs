//! Which workloads consume a Secret, and which of its keys they read (pure).
//!
//! A pod template consumes a Secret through `env[].valueFrom.secretKeyRef` (one key),
//! `envFrom[].secretRef` (every key), a `secret` volume or a `projected` volume source (every
//! key, or only the keys listed in `items`) — in containers, init containers and ephemeral
//! containers alike. Optional references count: the Secret exists now.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{EnvFromSource, EnvVar, KeyToPath, PodSpec, VolumeMount};

/// What part of the Secret a workload reads.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Reads {
    /// Every key (`envFrom`, a whole-Secret volume).
    Whole,
    /// Only these keys (`secretKeyRef`, volume `items`).
    Keys(BTreeSet<String>),
}

impl Reads {
    fn merge(self, other: Reads) -> Reads {
        match (self, other) {
            (Reads::Keys(mut a), Reads::Keys(b)) => {
                a.extend(b);
                Reads::Keys(a)
            }
            _ => Reads::Whole,
        }
    }

    /// Whether any of `changed` is read.
    pub fn touches(&self, changed: &BTreeSet<String>) -> bool {
        match self {
            Reads::Whole => !changed.is_empty(),
            Reads::Keys(keys) => keys.iter().any(|k| changed.contains(k)),
        }
    }
}

/// How one pod template consumes one Secret.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Consumption {
    pub reads: Reads,
    /// Through environment variables (`env` or `envFrom`): only a restart refreshes them.
    pub env: bool,
    /// Through a volume mounted with `subPath`: the kubelet never refreshes those files.
    pub sub_path: bool,
}

impl Consumption {
    /// Whether kubelet's refresh of mounted files is enough for a workload that asks for
    /// live reload: only plain volume mounts, no env, no subPath.
    pub fn live_reloadable(&self) -> bool {
        !self.env && !self.sub_path
    }
}

fn items_reads(items: &Option<Vec<KeyToPath>>) -> Reads {
    match items {
        Some(items) if !items.is_empty() => {
            Reads::Keys(items.iter().map(|i| i.key.clone()).collect())
        }
        _ => Reads::Whole,
    }
}

/// What a container reads Secrets through: (env, envFrom, volumeMounts).
type ContainerReads<'a> = (
    &'a Option<Vec<EnvVar>>,
    &'a Option<Vec<EnvFromSource>>,
    &'a Option<Vec<VolumeMount>>,
);

/// What every kind of container of `spec` (containers, init and ephemeral containers) reads
/// Secrets through.
fn containers(spec: &PodSpec) -> impl Iterator<Item = ContainerReads<'_>> {
    let regular = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    let ephemeral = spec.ephemeral_containers.iter().flatten();
    regular
        .map(|c| (&c.env, &c.env_from, &c.volume_mounts))
        .chain(ephemeral.map(|c| (&c.env, &c.env_from, &c.volume_mounts)))
}

/// How `spec` consumes each Secret it references.
pub fn consumptions(spec: &PodSpec) -> BTreeMap<String, Consumption> {
    let mut out = BTreeMap::<String, Consumption>::new();
    let mut add = |secret: &str, reads: Reads, env: bool| {
        let none = || Consumption {
            reads: Reads::Keys(BTreeSet::new()),
            env: false,
            sub_path: false,
        };
        let c = out.entry(secret.into()).or_insert_with(none);
        c.reads = std::mem::replace(&mut c.reads, Reads::Whole).merge(reads);
        c.env |= env;
    };
    // The Secrets each volume carries, by volume name.
    let mut volumes = BTreeMap::<&str, Vec<&str>>::new();
    for v in spec.volumes.iter().flatten() {
        let plain = v.secret.iter();
        let plain = plain.filter_map(|s| Some((s.secret_name.as_deref()?, &s.items)));
        let projected = v.projected.iter().flat_map(|p| p.sources.iter().flatten());
        let projected = projected.filter_map(|s| s.secret.as_ref().map(|s| (&*s.name, &s.items)));
        for (secret, items) in plain.chain(projected) {
            add(secret, items_reads(items), false);
            volumes.entry(&v.name).or_default().push(secret);
        }
    }
    let mut sub_paths = BTreeSet::new();
    for (envs, env_froms, mounts) in containers(spec) {
        let envs = envs.iter().flatten();
        for r in envs.filter_map(|e| e.value_from.as_ref()?.secret_key_ref.as_ref()) {
            add(&r.name, Reads::Keys([r.key.clone()].into()), true);
        }
        for r in env_froms
            .iter()
            .flatten()
            .filter_map(|f| f.secret_ref.as_ref())
        {
            add(&r.name, Reads::Whole, true);
        }
        let mounts = mounts.iter().flatten();
        let sub_path = mounts.filter(|m| m.sub_path.as_deref().is_some_and(|p| !p.is_empty()));
        sub_paths.extend(sub_path.map(|m| m.name.as_str()));
    }
    for secret in sub_paths.iter().filter_map(|v| volumes.get(v)).flatten() {
        out.get_mut(*secret)
            .expect("added with its volume")
            .sub_path = true;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> PodSpec {
        serde_json::from_value(v).unwrap()
    }

    fn keys(k: &[&str]) -> Reads {
        Reads::Keys(k.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn every_reference_form_is_found_with_what_it_reads() {
        let cases = [
            (
                "secretKeyRef",
                json!({"containers": [{"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "api", "key": "DB_PASSWORD"}}}]}]}),
                Some(Consumption {
                    reads: keys(&["DB_PASSWORD"]),
                    env: true,
                    sub_path: false,
                }),
            ),
            (
                "optional secretKeyRef",
                json!({"containers": [{"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "api", "key": "A", "optional": true}}}]}]}),
                Some(Consumption {
                    reads: keys(&["A"]),
                    env: true,
                    sub_path: false,
                }),
            ),
            (
                "envFrom",
                json!({"containers": [{"name": "c", "envFrom": [{"secretRef": {"name": "api"}}]}]}),
                Some(Consumption {
                    reads: Reads::Whole,
                    env: true,
                    sub_path: false,
                }),
            ),
            (
                "whole volume",
                json!({"containers": [{"name": "c", "volumeMounts": [{"name": "v", "mountPath": "/s"}]}],
                       "volumes": [{"name": "v", "secret": {"secretName": "api"}}]}),
                Some(Consumption {
                    reads: Reads::Whole,
                    env: false,
                    sub_path: false,
                }),
            ),
            (
                "volume with items",
                json!({"containers": [{"name": "c"}],
                       "volumes": [{"name": "v", "secret": {"secretName": "api", "items": [{"key": "A", "path": "a"}]}}]}),
                Some(Consumption {
                    reads: keys(&["A"]),
                    env: false,
                    sub_path: false,
                }),
            ),
            (
                "projected volume",
                json!({"containers": [{"name": "c"}],
                       "volumes": [{"name": "v", "projected": {"sources": [{"configMap": {"name": "api"}}, {"secret": {"name": "api", "items": [{"key": "B", "path": "b"}]}}]}}]}),
                Some(Consumption {
                    reads: keys(&["B"]),
                    env: false,
                    sub_path: false,
                }),
            ),
            (
                "subPath mount",
                json!({"containers": [{"name": "c", "volumeMounts": [{"name": "v", "mountPath": "/s/a", "subPath": "a"}]}],
                       "volumes": [{"name": "v", "secret": {"secretName": "api"}}]}),
                Some(Consumption {
                    reads: Reads::Whole,
                    env: false,
                    sub_path: true,
                }),
            ),
            (
                "init container",
                json!({"containers": [{"name": "c"}], "initContainers": [{"name": "i", "envFrom": [{"secretRef": {"name": "api"}}]}]}),
                Some(Consumption {
                    reads: Reads::Whole,
                    env: true,
                    sub_path: false,
                }),
            ),
            (
                "ephemeral container",
                json!({"containers": [{"name": "c"}], "ephemeralContainers": [{"name": "e", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "api", "key": "K"}}}]}]}),
                Some(Consumption {
                    reads: keys(&["K"]),
                    env: true,
                    sub_path: false,
                }),
            ),
            (
                "another Secret",
                json!({"containers": [{"name": "c", "envFrom": [{"secretRef": {"name": "other"}}],
                       "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "other", "key": "A"}}}]}],
                       "volumes": [{"name": "v", "secret": {"secretName": "other"}}]}),
                None,
            ),
            (
                "a ConfigMap of the same name",
                json!({"containers": [{"name": "c", "envFrom": [{"configMapRef": {"name": "api"}}]}]}),
                None,
            ),
        ];
        for (what, s, want) in cases {
            assert_eq!(consumptions(&spec(s)).remove("api"), want, "{what}");
        }
    }

    #[test]
    fn keys_from_several_places_add_up_and_a_whole_read_wins() {
        let s = spec(json!({"containers": [
            {"name": "a", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "api", "key": "A"}}}]},
            {"name": "b", "env": [{"name": "Y", "valueFrom": {"secretKeyRef": {"name": "api", "key": "B"}}}]}]}));
        assert_eq!(consumptions(&s)["api"].reads, keys(&["A", "B"]));
        let s = spec(json!({"containers": [
            {"name": "a", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "api", "key": "A"}}}], "envFrom": [{"secretRef": {"name": "api"}}]}]}));
        assert_eq!(consumptions(&s)["api"].reads, Reads::Whole);
    }

    #[test]
    fn only_plain_volume_consumers_can_live_reload() {
        let plain = Consumption {
            reads: Reads::Whole,
            env: false,
            sub_path: false,
        };
        assert!(plain.live_reloadable());
        assert!(
            !Consumption {
                env: true,
                ..plain.clone()
            }
            .live_reloadable()
        );
        assert!(
            !Consumption {
                sub_path: true,
                ..plain
            }
            .live_reloadable()
        );
    }

    #[test]
    fn a_key_reader_is_touched_only_by_its_keys() {
        let changed: BTreeSet<String> = ["B".to_string()].into();
        assert!(!keys(&["A"]).touches(&changed));
        assert!(keys(&["A", "B"]).touches(&changed));
        assert!(Reads::Whole.touches(&changed));
        assert!(!Reads::Whole.touches(&BTreeSet::new()));
    }
}
