//! `secret set|rm|unset|rotate --dry-run`: what a change would touch, before it is made.
//!
//! Nothing is written to Vault or the cluster. The ScopedSecrets, stores, namespaces and
//! workloads come from manifests (`-f`, `--workloads`) or, without them, from the current kube
//! context. Each ScopedSecret whose scopes include the changed path is run through the
//! controller's pipeline twice — as Vault is, and with the change applied in memory — and the
//! keys whose value would differ are the keys that change; the workloads that would restart
//! are decided by the controller's own rules ([`crate::rollout::targeted`] and
//! [`crate::rollout::desired::held_back`]) on the keys that change. The result is a short table.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use futures::future::BoxFuture;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use kube::api::{Api, ListParams};
use serde_json::Value;

use super::render::Manifests;
use super::{CliError, VaultArgs};
use crate::api::v1alpha1::ScopedSecret;
use crate::controller::status::ROLLOUTS_PAUSED;
use crate::pipeline::{self, Built};
use crate::render::HmacKey;
use crate::resolve::{Entries, Entry, ScopeData, SecretValue};
use crate::rollout::{self, Workload, WorkloadKind};
use crate::scope::ScopePath;
use crate::vault::direct::DirectSource;
use crate::vault::{ScopeSource, StoreHandle, VaultError, VersionData};

/// The flags of a preview, on `secret set|rm|unset|rotate`.
#[derive(Args, Debug, Clone, Default)]
pub struct PreviewArgs {
    /// Change nothing: print which ScopedSecrets (and keys) the change would touch and which
    /// workloads would restart. Uses the manifests of -f / --workloads, or the kube context.
    #[arg(long, global = true)]
    pub dry_run: bool,
    /// With --dry-run: ScopedSecret, store and Namespace manifests (files, directories or `-`)
    /// instead of the cluster's objects.
    #[arg(short = 'f', long = "filename", value_name = "PATH", global = true)]
    pub files: Vec<PathBuf>,
    /// With --dry-run: workload manifests (Deployments, StatefulSets, DaemonSets, Argo
    /// Rollouts) instead of the cluster's.
    #[arg(long, value_name = "PATH", global = true)]
    pub workloads: Vec<PathBuf>,
    /// With --dry-run: the operator's --max-restarts-in-flight, to say how many restarts
    /// would wait for the restart budget.
    #[arg(long, value_name = "N", default_value_t = 10, global = true)]
    pub max_restarts_in_flight: usize,
}

/// The edit a command would make to one key of one scope.
#[derive(Clone, Debug)]
pub enum Edit {
    /// `set` / `rotate`: a new value.
    Set(SecretValue),
    /// `rm`: the key leaves the scope.
    Remove,
    /// `unset`: a tombstone.
    Tombstone,
}

/// A change to preview: `key` of the KV v2 path `path` under `mount`.
#[derive(Clone, Debug)]
pub struct Change {
    pub mount: String,
    pub path: String,
    pub key: String,
    pub edit: Edit,
}

/// Serves `inner` with the change applied: the changed path reads as one version newer.
struct Edited {
    inner: Arc<dyn ScopeSource>,
    change: Change,
}

impl Edited {
    fn applies(&self, store: &StoreHandle, path: &str) -> bool {
        store.connection.kv.mount == self.change.mount && path == self.change.path
    }

    fn edit(&self, entries: &mut Entries) {
        let key = self.change.key.clone();
        match &self.change.edit {
            Edit::Set(v) => {
                entries.insert(key, Entry::Value(v.clone()));
            }
            Edit::Remove => {
                entries.remove(&key);
            }
            Edit::Tombstone => {
                entries.insert(key, Entry::Tombstone);
            }
        }
    }
}

impl ScopeSource for Edited {
    fn read_scopes<'a>(
        &'a self,
        store: &'a StoreHandle,
        paths: &'a [ScopePath],
        max_age: Duration,
    ) -> BoxFuture<'a, Result<Vec<Arc<ScopeData>>, VaultError>> {
        Box::pin(async move {
            let mut layers = self.inner.read_scopes(store, paths, max_age).await?;
            for layer in &mut layers {
                if self.applies(store, &layer.path) {
                    // The reader's (cached) copy stays as it is: the preview edits its own.
                    let layer = Arc::make_mut(layer);
                    self.edit(&mut layer.entries);
                    layer.version = Some(layer.version.unwrap_or(0) + 1);
                }
            }
            Ok(layers)
        })
    }

    fn read_version<'a>(
        &'a self,
        store: &'a StoreHandle,
        path: &'a str,
        version: u64,
        max_age: Duration,
    ) -> BoxFuture<'a, Result<Option<VersionData>, VaultError>> {
        Box::pin(async move {
            // The version the change would write: the latest one, edited, written now.
            if self.applies(store, path) {
                let latest = self
                    .inner
                    .read_scopes(
                        store,
                        &[ScopePath {
                            scope: crate::scope::Scope::Project,
                            path: path.to_string(),
                        }],
                        Duration::ZERO,
                    )
                    .await?;
                let current = latest.into_iter().next();
                if current.as_ref().and_then(|l| l.version).unwrap_or(0) + 1 == version {
                    let mut entries = current.map(|l| l.entries.clone()).unwrap_or_default();
                    self.edit(&mut entries);
                    return Ok(Some(VersionData {
                        entries: Some(entries),
                        created: jiff::Timestamp::now(),
                    }));
                }
            }
            self.inner.read_version(store, path, version, max_age).await
        })
    }
}

/// What the change would do to one ScopedSecret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Impact {
    /// `namespace/name` of the ScopedSecret.
    pub scoped_secret: String,
    pub secret: String,
    /// Keys whose value would be added, changed or removed (names only).
    pub changed: BTreeSet<String>,
    /// `Kind/name` of the workloads that would restart.
    pub restarts: Vec<String>,
    /// `Kind/name (why)` of consumers that would not.
    pub spared: Vec<String>,
    /// Why restarts would be held back, when they would.
    pub held: Option<String>,
}

/// The impact of `change` on every ScopedSecret of `manifests` that reads its path. A
/// ScopedSecret that cannot be resolved today is reported with the controller's error.
pub async fn impact(
    manifests: &Manifests,
    source: Arc<dyn ScopeSource>,
    change: &Change,
) -> Vec<Result<Impact, (String, crate::controller::Error)>> {
    let edited = Edited {
        inner: source.clone(),
        change: change.clone(),
    };
    let key = HmacKey::new(rand::random::<[u8; 32]>().to_vec());
    let now = jiff::Timestamp::now();
    let mut out = Vec::new();
    for ss in &manifests.scoped_secrets {
        let ns = ss.metadata.namespace.clone().unwrap_or_default();
        let id = format!("{ns}/{}", ss.metadata.name.as_deref().unwrap_or_default());
        let labels = manifests.namespaces.get(&ns).cloned().unwrap_or_default();
        let plan = match manifests
            .store_of(ss)
            .and_then(|store| pipeline::plan(ss, &ns, &labels, store))
        {
            Ok(plan) => plan,
            // Refused today: not a reader of anything.
            Err(_) => continue,
        };
        let reads = plan.handle.connection.kv.mount == change.mount
            && plan.paths.iter().any(|p| p.path == change.path);
        if !reads {
            continue;
        }
        let files = manifests.template_files(&ns);
        let built = async {
            let before = pipeline::build(
                ss,
                &plan,
                source.as_ref(),
                Duration::ZERO,
                &key,
                now,
                &files,
            )
            .await?;
            let after =
                pipeline::build(ss, &plan, &edited, Duration::ZERO, &key, now, &files).await?;
            Ok::<_, crate::controller::Error>((before, after))
        };
        match built.await {
            Ok((before, after)) => {
                let workloads = manifests.workloads_in(&ns);
                out.push(Ok(assess(ss, id, &before, &after, &workloads)));
            }
            Err(e) => out.push(Err((id, e))),
        }
    }
    out
}

/// The pure part: changed keys, and the restarts the controller would decide.
fn assess(
    ss: &ScopedSecret,
    id: String,
    before: &Built,
    after: &Built,
    workloads: &[Workload],
) -> Impact {
    let empty = BTreeMap::new();
    let old = before.desired.data.as_ref().unwrap_or(&empty);
    let new = after.desired.data.as_ref().unwrap_or(&empty);
    let changed: BTreeSet<String> = old
        .keys()
        .chain(new.keys())
        .filter(|k| old.get(*k) != new.get(*k))
        .cloned()
        .collect();
    let secret = after.desired.metadata.name.clone().unwrap_or_default();
    let mut restarts = Vec::new();
    let mut spared = Vec::new();
    if !changed.is_empty() {
        // What pods run now is not known here: decide on the keys alone.
        let fresh: Vec<Workload> = workloads
            .iter()
            .cloned()
            .map(|mut w| {
                w.template.clear();
                w
            })
            .collect();
        for w in &fresh {
            let Some(consumption) = rollout::targeted(ss.spec.rollout.as_deref(), w, &secret)
            else {
                continue;
            };
            let name = format!("{}/{}", w.kind.as_str(), w.name());
            let why = match rollout::desired::held_back(w, &consumption) {
                _ if !consumption.reads.touches(&changed) => Some("KeysUnchanged".into()),
                why => why.map(|why| format!("{why:?}")),
            };
            match why {
                None => restarts.push(name),
                Some(why) => spared.push(format!("{name} ({why})")),
            }
        }
    }
    let held = ss
        .status
        .as_ref()
        .and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == ROLLOUTS_PAUSED && c.status == "True")
        })
        .map(|c| format!("breaker: restarts paused ({})", c.message));
    Impact {
        scoped_secret: id,
        secret: format!(
            "{}/{secret}",
            ss.metadata.namespace.as_deref().unwrap_or_default()
        ),
        changed,
        restarts,
        spared,
        held,
    }
}

/// What the cluster-wide restart budget would do with the restarts, when it would hold some
/// back: the operator rolls at most `in_flight` workloads at once (each workload once, however
/// many of its Secrets change).
pub fn budget(impacts: &[Impact], in_flight: usize) -> Option<String> {
    let workloads: BTreeSet<(&str, &str)> = impacts
        .iter()
        .filter(|i| i.held.is_none())
        .flat_map(|i| {
            let ns = i.secret.split('/').next().unwrap_or_default();
            i.restarts.iter().map(move |w| (ns, w.as_str()))
        })
        .collect();
    (workloads.len() > in_flight).then(|| {
        format!(
            "Restart budget: {} workloads would restart, at most {in_flight} at once: {} wait their turn (oldest first), more if other rollouts are in flight.",
            workloads.len(),
            workloads.len() - in_flight
        )
    })
}

/// The table a person reads in two seconds.
pub fn table(impacts: &[Impact]) -> String {
    let rows: Vec<[String; 4]> = impacts
        .iter()
        .map(|i| {
            let keys = if i.changed.is_empty() {
                "- (overridden: no change)".to_string()
            } else {
                i.changed.iter().cloned().collect::<Vec<_>>().join(",")
            };
            let mut restarts = if i.restarts.is_empty() {
                "-".to_string()
            } else {
                i.restarts.join(", ")
            };
            if let Some(held) = &i.held {
                restarts.push_str(&format!(" [held: {held}]"));
            }
            let spared = if i.spared.is_empty() {
                "-".to_string()
            } else {
                i.spared.join(", ")
            };
            [i.scoped_secret.clone(), keys, restarts, spared]
        })
        .collect();
    let header = [
        "SCOPEDSECRET".to_string(),
        "KEYS CHANGED".to_string(),
        "RESTARTS".to_string(),
        "NOT RESTARTED".to_string(),
    ];
    let widths: Vec<usize> = (0..4)
        .map(|c| {
            rows.iter()
                .map(|r| r[c].len())
                .chain([header[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |r: &[String; 4]| {
        format!(
            "{:w0$}  {:w1$}  {:w2$}  {}\n",
            r[0],
            r[1],
            r[2],
            r[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        )
        .trim_end()
        .to_string()
            + "\n"
    };
    let mut out = line(&header);
    for r in &rows {
        out.push_str(&line(r));
    }
    out
}

/// The cluster's ScopedSecrets, stores, namespaces and workloads, with the CLI user's own kube
/// credentials (Argo Rollouts are read from manifests only).
pub async fn cluster_manifests(client: &kube::Client) -> Result<Manifests, String> {
    let why = |what: &str| {
        let what = what.to_string();
        move |e: kube::Error| format!("failed to list {what}: {e}")
    };
    let mut m = super::sync::cluster_objects(client).await?;
    // The ConfigMaps templates read (`templateFrom`), by name.
    for ss in &m.scoped_secrets {
        let ns = ss.metadata.namespace.clone().unwrap_or_default();
        for name in crate::template::config_maps(pipeline::template_spec(ss)) {
            let api = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), &ns);
            if let Some(cm) = api.get_opt(&name).await.map_err(why("configmaps"))? {
                m.config_maps
                    .insert((ns.clone(), name), cm.data.unwrap_or_default());
            }
        }
    }
    let mut add = |items: Vec<Value>| {
        for item in items {
            m.add_value(item, "cluster").ok();
        }
    };
    add(list_values::<Deployment>(client, "deployments").await?);
    add(list_values::<StatefulSet>(client, "statefulsets").await?);
    add(list_values::<DaemonSet>(client, "daemonsets").await?);
    Ok(m)
}

async fn list_values<K>(client: &kube::Client, what: &str) -> Result<Vec<Value>, String>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let list = Api::<K>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("failed to list {what}: {e}"))?;
    Ok(list
        .items
        .into_iter()
        .map(|w| {
            let mut v = serde_json::to_value(&w).expect("a workload serializes");
            v["apiVersion"] = K::api_version(&Default::default()).into_owned().into();
            v["kind"] = K::kind(&Default::default()).into_owned().into();
            v
        })
        .collect())
}

/// Runs the preview of `change` and prints it. `describe` says what the command would do.
pub async fn run(
    args: &PreviewArgs,
    vault: &VaultArgs,
    change: Change,
    describe: &str,
) -> Result<(), CliError> {
    let manifests = if args.files.is_empty() && args.workloads.is_empty() {
        let client = tokio::time::timeout(Duration::from_secs(5), kube::Client::try_default())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| {
                CliError::Usage(
                    "--dry-run needs a kube context, or the manifests: -f <ScopedSecrets, stores, namespaces> --workloads <workloads>".into(),
                )
            })?;
        cluster_manifests(&client).await.map_err(CliError::Usage)?
    } else {
        let mut paths = args.files.clone();
        paths.extend(args.workloads.iter().cloned());
        Manifests::load(&paths, std::io::stdin())?
    };
    let source: Arc<dyn ScopeSource> = Arc::new(DirectSource::new(
        vault.client()?,
        vault.address(),
        Duration::from_secs(10),
    ));
    let results = impact(&manifests, source, &change).await;
    println!("Dry run, nothing written: {describe}");
    let impacts: Vec<Impact> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().cloned())
        .collect();
    if impacts.is_empty() {
        println!(
            "No ScopedSecret reads {}/{} ({} ScopedSecrets looked at).",
            change.mount,
            change.path,
            manifests.scoped_secrets.len()
        );
    } else {
        print!("{}", table(&impacts));
        if let Some(line) = budget(&impacts, args.max_restarts_in_flight) {
            println!("{line}");
        }
    }
    for r in &results {
        if let Err((id, e)) = r {
            println!(
                "ScopedSecret {id}: cannot be resolved today: {}: {e}",
                e.category()
            );
        }
    }
    Ok(())
}

/// `secret … --dry-run`: the change the command would make, previewed. Only commands that
/// change a value can be previewed.
pub async fn run_command(
    cmd: super::secret::SecretCommand,
    vault: &VaultArgs,
    args: &PreviewArgs,
) -> Result<(), CliError> {
    use super::secret::{SecretCommand, generate_value, read_value};
    let (scope_args, key, edit, verb) = match cmd {
        SecretCommand::Set {
            scope,
            key,
            value,
            value_file,
            ..
        } => {
            let value = read_value(value, value_file)?;
            (scope, key, Edit::Set(SecretValue::new(value)), "set")
        }
        SecretCommand::Rotate {
            scope,
            key,
            generate,
            value,
            value_file,
            ..
        } => {
            let value = match generate {
                Some(n) => generate_value(n.clamp(16, 4096)),
                None => read_value(value, value_file)?,
            };
            (scope, key, Edit::Set(SecretValue::new(value)), "rotate")
        }
        SecretCommand::Rm { scope, key, .. } => (scope, key, Edit::Remove, "rm"),
        SecretCommand::Unset { scope, key, .. } => (scope, key, Edit::Tombstone, "unset"),
        _ => {
            return Err(CliError::Usage(
                "--dry-run previews a change: use it with set, rm, unset or rotate".into(),
            ));
        }
    };
    super::check_key(&key)?;
    let (scope, path) = scope_args.scope_path()?;
    let describe = format!(
        "{verb} {key} at {} ({}) = {}/{path}",
        scope.as_str(),
        scope_args.describe(),
        vault.mount
    );
    let change = Change {
        mount: vault.mount.clone(),
        path,
        key,
        edit,
    };
    run(args, vault, change, &describe).await
}

/// The kind of a workload manifest.
pub(crate) fn workload_kind(api_version: &str, kind: &str) -> Option<WorkloadKind> {
    match (api_version, kind) {
        ("apps/v1", k) | ("argoproj.io/v1alpha1", k) => WorkloadKind::parse(k)
            .filter(|w| (*w == WorkloadKind::Rollout) == (api_version == "argoproj.io/v1alpha1")),
        _ => None,
    }
}

/// A workload manifest as the planner sees it; `None` without a name or a pod template.
pub(crate) fn workload_of(value: &Value, kind: WorkloadKind) -> Option<Workload> {
    let w = Workload::new(kind, &serde_json::from_value(value.clone()).ok()?);
    (w.metadata.name.is_some() && w.reads.is_some()).then_some(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(name: &str, container: Value) -> Workload {
        workload_of(
            &json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": name, "namespace": "shop-dev"},
                "spec": {"template": {"spec": {"containers": [container]}}}}),
            WorkloadKind::Deployment,
        )
        .unwrap()
    }

    #[test]
    fn workload_kinds_come_from_api_version_and_kind() {
        assert_eq!(
            workload_kind("apps/v1", "Deployment"),
            Some(WorkloadKind::Deployment)
        );
        assert_eq!(
            workload_kind("argoproj.io/v1alpha1", "Rollout"),
            Some(WorkloadKind::Rollout)
        );
        assert_eq!(workload_kind("apps/v1", "Rollout"), None);
        assert_eq!(workload_kind("v1", "Pod"), None);
    }

    #[test]
    fn the_table_names_changed_keys_and_restarts_but_no_value() {
        let impacts = vec![
            Impact {
                scoped_secret: "shop-dev/api".into(),
                secret: "shop-dev/api".into(),
                changed: ["LOG_LEVEL".to_string()].into(),
                restarts: vec!["Deployment/api".into()],
                spared: vec!["Deployment/worker (KeysUnchanged)".into()],
                held: None,
            },
            Impact {
                scoped_secret: "shop-dev/web".into(),
                secret: "shop-dev/web-env".into(),
                changed: BTreeSet::new(),
                restarts: vec![],
                spared: vec![],
                held: Some("breaker: restarts paused".into()),
            },
        ];
        let t = table(&impacts);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("SCOPEDSECRET"));
        assert!(lines[1].contains("LOG_LEVEL") && lines[1].contains("Deployment/api"));
        assert!(lines[1].contains("Deployment/worker (KeysUnchanged)"));
        assert!(lines[2].contains("overridden") && lines[2].contains("held: breaker"));
    }

    #[test]
    fn the_budget_line_counts_each_workload_once_and_only_past_the_budget() {
        let impact = |ss: &str, restarts: &[&str]| Impact {
            scoped_secret: format!("shop-dev/{ss}"),
            secret: format!("shop-dev/{ss}"),
            changed: ["K".to_string()].into(),
            restarts: restarts.iter().map(|r| r.to_string()).collect(),
            spared: vec![],
            held: None,
        };
        // gateway reads both Secrets: one restart.
        let impacts = vec![
            impact("a", &["Deployment/gateway", "Deployment/a"]),
            impact("b", &["Deployment/gateway", "Deployment/b"]),
        ];
        assert_eq!(budget(&impacts, 3), None);
        let line = budget(&impacts, 2).unwrap();
        assert!(
            line.contains("3 workloads would restart, at most 2 at once: 1 wait"),
            "{line}"
        );
    }

    #[test]
    fn manifests_collect_workloads_by_namespace() {
        let w = deployment(
            "api",
            json!({"name": "c", "image": "x", "envFrom": [{"secretRef": {"name": "api"}}]}),
        );
        assert_eq!(w.name(), "api");
        assert!(w.consumption("api").is_some());
    }
}
