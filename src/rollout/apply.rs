//! Talking to the API server about workloads: listing them, deciding per workload (the
//! outcomes a reconcile reports), and applying one [`Batch`] of the restart queue.
//!
//! A batch is one server-side apply of the workload's pod-template annotations under the one
//! field manager `scoped-secrets-rollout`, forcing only those fields. The patch carries every
//! `checksum.scopedsecrets.io/*` annotation the workload holds (read from the live object just
//! before) with the batch's new hashes on top: applying fewer fields would make the server drop
//! the ones this manager applied before. One patch, however many Secrets changed: one rollout.
//! A workload deleted before its patch is skipped; a refused patch (409/422) is reported, not
//! retried forever.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::queue::{Batch, WorkloadRef};
use super::{
    CHECKSUM_PREFIX, Change, Decision, Skip, Workload, WorkloadKind, annotation_key, decide,
    targets,
};
use crate::api::v1alpha1::Rollout;
use crate::render::HmacKey;

/// The field manager of the restart annotations.
pub const FIELD_MANAGER: &str = "scoped-secrets-rollout";

/// What happened to one workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub kind: WorkloadKind,
    pub name: String,
    /// The hash written (or to be written) in its annotation.
    pub hash: Option<String>,
    /// `Queued`, `Restarted`, `Skipped:<reason>`, or `Failed:<reason>`.
    pub result: String,
    /// A sentence for the event, naming no value.
    pub note: String,
    /// For a queued restart of a workload without the annotation: the hash of what its pods
    /// run (the Secret's content before this change). A later change back to it withdraws
    /// the restart.
    pub baseline: Option<String>,
    /// Whether the note deserves an event on the ScopedSecret (a paused workload, live reload
    /// honoured or refused); the common skips and plain queueing make none.
    pub notable: bool,
}

/// What one content change did about restarts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub outcomes: Vec<Outcome>,
    /// Why restarts are paused (the breaker tripped), if they are.
    pub paused: Option<String>,
    /// The breaker cleared but nothing could be planned (restarts are off, or the workloads
    /// cannot be listed): only `RolloutsPaused` turns `False`; the recorded outcomes stay.
    pub clears_pause_only: bool,
}

/// The Argo Rollouts `Rollout` resource.
pub fn argo_rollout_resource() -> ApiResource {
    ApiResource {
        group: "argoproj.io".into(),
        version: "v1alpha1".into(),
        api_version: "argoproj.io/v1alpha1".into(),
        kind: "Rollout".into(),
        plural: "rollouts".into(),
    }
}

/// Whether the API server serves Argo Rollouts (`rollouts.argoproj.io`): `Some(false)` when
/// the group is not found, `None` when discovery failed (ask again later). Either way a cluster
/// without Argo Rollouts never fails a restart.
pub async fn argo_rollouts_served(client: &Client) -> Option<bool> {
    match client
        .list_api_group_resources("argoproj.io/v1alpha1")
        .await
    {
        Ok(list) => Some(list.resources.iter().any(|r| r.name == "rollouts")),
        Err(kube::Error::Api(s)) if s.code == 404 => Some(false),
        Err(_) => None,
    }
}

fn to_workload(
    kind: WorkloadKind,
    name: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    template: Option<PodTemplateSpec>,
    paused: bool,
) -> Option<Workload> {
    let template = template?;
    Some(Workload {
        kind,
        name,
        labels,
        annotations,
        template_annotations: template
            .metadata
            .and_then(|m| m.annotations)
            .unwrap_or_default(),
        pod_spec: template.spec?,
        paused,
    })
}

/// Deployments, StatefulSets and DaemonSets of `namespace`, and Argo Rollouts when `argo`.
pub async fn list_workloads(
    client: &Client,
    namespace: &str,
    argo: bool,
) -> Result<Vec<Workload>, kube::Error> {
    let lp = ListParams::default();
    let mut out = Vec::new();
    for d in Api::<Deployment>::namespaced(client.clone(), namespace)
        .list(&lp)
        .await?
    {
        let paused = d.spec.as_ref().and_then(|s| s.paused).unwrap_or(false);
        let (labels, annotations, name) =
            (d.labels().clone(), d.annotations().clone(), d.name_any());
        out.extend(to_workload(
            WorkloadKind::Deployment,
            name,
            labels,
            annotations,
            d.spec.map(|s| s.template),
            paused,
        ));
    }
    for s in Api::<StatefulSet>::namespaced(client.clone(), namespace)
        .list(&lp)
        .await?
    {
        let (labels, annotations, name) =
            (s.labels().clone(), s.annotations().clone(), s.name_any());
        out.extend(to_workload(
            WorkloadKind::StatefulSet,
            name,
            labels,
            annotations,
            s.spec.map(|s| s.template),
            false,
        ));
    }
    for d in Api::<DaemonSet>::namespaced(client.clone(), namespace)
        .list(&lp)
        .await?
    {
        let (labels, annotations, name) =
            (d.labels().clone(), d.annotations().clone(), d.name_any());
        out.extend(to_workload(
            WorkloadKind::DaemonSet,
            name,
            labels,
            annotations,
            d.spec.map(|s| s.template),
            false,
        ));
    }
    if argo {
        let api = Api::<DynamicObject>::namespaced_with(
            client.clone(),
            namespace,
            &argo_rollout_resource(),
        );
        // Argo Rollouts are optional: an install whose RBAC lacks them still restarts its
        // Deployments, StatefulSets and DaemonSets.
        let rollouts = match api.list(&lp).await {
            Ok(list) => list.items,
            Err(e) => {
                tracing::warn!(
                    "cannot list Argo Rollouts in namespace {namespace} ({e}): they are not restarted; grant get, list, patch on rollouts.argoproj.io"
                );
                Vec::new()
            }
        };
        for r in rollouts {
            // A Rollout with `workloadRef` has no template of its own: the Deployment it
            // references is a consumer in its own right.
            let template = r.data["spec"]["template"].clone();
            let template: Option<PodTemplateSpec> = serde_json::from_value(template).ok();
            let paused = r.data["spec"]["paused"].as_bool().unwrap_or(false);
            out.extend(to_workload(
                WorkloadKind::Rollout,
                r.name_any(),
                r.labels().clone(),
                r.annotations().clone(),
                template,
                paused,
            ));
        }
    }
    Ok(out)
}

/// The Secret's content a plan decides on.
pub struct Content<'a> {
    pub key: &'a HmacKey,
    pub data: &'a BTreeMap<String, ByteString>,
    /// What the Secret held before this change, when it is known.
    pub previous: Option<&'a BTreeMap<String, ByteString>>,
}

/// Workloads still owed a restart of one Secret, each with the hash of what its pods run
/// when it has no annotation and that is known.
pub type Owed = BTreeMap<(WorkloadKind, String), Option<String>>;

/// Decides for every workload the strategy targets; `Restart` decisions come back as
/// `Queued` outcomes with the hash to write. Workloads in `owed` still wait for a restart from
/// an earlier change of this Secret: they are decided as [`Change::Owed`], so the owed restart
/// is kept (with the current hash) or dropped when they already carry it — or, without an
/// annotation, when the content went back to what their pods run.
pub fn plan(
    secret: &str,
    rollout: Option<&Rollout>,
    workloads: &[Workload],
    change: &Change,
    owed: &Owed,
    content: &Content<'_>,
) -> Vec<Outcome> {
    let (key, data) = (content.key, content.data);
    targets(rollout, workloads, secret)
        .into_iter()
        .map(|(w, consumption)| {
            let what = format!("{}/{}", w.kind.as_str(), w.name);
            let owed_baseline = owed.get(&(w.kind, w.name.clone()));
            let change = if owed_baseline.is_some() {
                &Change::Owed
            } else {
                change
            };
            let unannotated = !w
                .template_annotations
                .contains_key(&super::annotation_key(secret));
            let mut decision = decide(w, &consumption, secret, change, key, data);
            if let Decision::Restart { hash, .. } = &decision
                && unannotated
                && owed_baseline.is_some_and(|b| b.as_ref() == Some(hash))
            {
                decision = Decision::Skip(Skip::AlreadyCurrent);
            }
            let baseline = match (&decision, owed_baseline) {
                (Decision::Restart { .. }, Some(known)) => known.clone(),
                (Decision::Restart { .. }, None) if unannotated => content
                    .previous
                    .map(|p| super::consumer_hash(key, p, &consumption.reads)),
                _ => None,
            };
            match decision {
                Decision::Skip(skip) => Outcome {
                    baseline: None,
                    notable: matches!(skip, Skip::Paused | Skip::LiveReload),
                    kind: w.kind,
                    name: w.name.clone(),
                    hash: None,
                    result: format!("Skipped:{}", skip.as_str()),
                    note: match skip {
                        Skip::Paused => format!(
                            "{what} is paused: not restarted; resume it to pick up Secret {secret}"
                        ),
                        Skip::LiveReload => format!(
                            "{what} reads Secret {secret} through volumes only and asked for live reload: the kubelet refreshes its files"
                        ),
                        Skip::KeysUnchanged => {
                            format!("{what} reads none of the changed keys of Secret {secret}")
                        }
                        Skip::AlreadyCurrent => format!(
                            "{what} already runs with the current content of Secret {secret}"
                        ),
                    },
                },
                Decision::Restart {
                    hash,
                    live_reload_refused,
                } => Outcome {
                    baseline,
                    notable: live_reload_refused,
                    kind: w.kind,
                    name: w.name.clone(),
                    hash: Some(hash),
                    result: "Queued".into(),
                    note: if live_reload_refused {
                        format!(
                            "{what} asked for live reload but reads Secret {secret} through env or subPath, which only a restart refreshes: it will be restarted"
                        )
                    } else {
                        format!("{what} will be restarted: Secret {secret} changed keys it reads")
                    },
                },
            }
        })
        .collect()
}

async fn get_as<K>(api: Api<K>, name: &str) -> Result<Option<Value>, kube::Error>
where
    K: Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    Ok(api
        .get_opt(name)
        .await?
        .map(|o| serde_json::to_value(o).expect("API objects serialize")))
}

/// The live object of `w` as JSON, `None` when it is gone.
pub async fn fetch(client: &Client, w: &WorkloadRef) -> Result<Option<Value>, kube::Error> {
    let (c, ns, name) = (client.clone(), w.namespace.as_str(), w.name.as_str());
    match w.kind {
        WorkloadKind::Deployment => get_as(Api::<Deployment>::namespaced(c, ns), name).await,
        WorkloadKind::StatefulSet => get_as(Api::<StatefulSet>::namespaced(c, ns), name).await,
        WorkloadKind::DaemonSet => get_as(Api::<DaemonSet>::namespaced(c, ns), name).await,
        WorkloadKind::Rollout => {
            let api = Api::<DynamicObject>::namespaced_with(c, ns, &argo_rollout_resource());
            get_as(api, name).await
        }
    }
}

fn json<K: Serialize>(v: Result<K, kube::Error>) -> Result<Value, kube::Error> {
    v.map(|o| serde_json::to_value(o).expect("API objects serialize"))
}

async fn apply(client: &Client, w: &WorkloadRef, body: &Value) -> Result<Value, kube::Error> {
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let patch = Patch::Apply(body);
    let (c, ns, name) = (client.clone(), w.namespace.as_str(), w.name.as_str());
    match w.kind {
        WorkloadKind::Deployment => json(
            Api::<Deployment>::namespaced(c, ns)
                .patch(name, &pp, &patch)
                .await,
        ),
        WorkloadKind::StatefulSet => json(
            Api::<StatefulSet>::namespaced(c, ns)
                .patch(name, &pp, &patch)
                .await,
        ),
        WorkloadKind::DaemonSet => json(
            Api::<DaemonSet>::namespaced(c, ns)
                .patch(name, &pp, &patch)
                .await,
        ),
        WorkloadKind::Rollout => json(
            Api::<DynamicObject>::namespaced_with(c, ns, &argo_rollout_resource())
                .patch(name, &pp, &patch)
                .await,
        ),
    }
}

/// What applying one batch did, per Secret of the batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// Secret name → `Restarted`, `Skipped:<reason>` or `Failed:<reason>`.
    pub results: BTreeMap<String, String>,
    /// Whether a patch went out (the workload now rolls).
    pub patched: bool,
    /// A sentence for events and logs, naming no value.
    pub note: String,
    /// The failure was transient (5xx, 429, transport): worth another attempt.
    pub retryable: bool,
}

impl Applied {
    fn all(batch: &Batch, result: &str, note: String) -> Self {
        Applied {
            results: batch
                .annotations
                .keys()
                .map(|s| (s.clone(), result.to_string()))
                .collect(),
            patched: false,
            note,
            retryable: false,
        }
    }
}

/// The pod-template annotations of a workload object.
fn template_annotations(obj: &Value) -> BTreeMap<String, String> {
    obj["spec"]["template"]["metadata"]["annotations"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// `Kind/name` of the batch's workload and its Secrets' names, for notes.
fn names(batch: &Batch) -> (String, String) {
    let w = &batch.workload;
    let secrets = batch
        .annotations
        .keys()
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    (format!("{}/{}", w.kind.as_str(), w.name), secrets)
}

/// Applies one batch: reads the live workload and checks that the batch's Secrets still exist,
/// then patches it once when any of the batch's annotations differs from what it holds.
pub async fn apply_batch(client: &Client, batch: &Batch) -> Applied {
    let w = &batch.workload;
    let (what, secrets) = names(batch);
    let live = match fetch(client, w).await {
        Ok(Some(live)) => live,
        Ok(None) => {
            return Applied::all(
                batch,
                "Skipped:Deleted",
                format!("{what} was deleted before it could be restarted"),
            );
        }
        Err(e) => return failed(batch, &what, &secrets, e),
    };
    // A Secret deleted since must not restart pods onto a missing Secret. Deleted by hand, the
    // operator recreates it at once (drift repair), so this is retried; if its ScopedSecret was
    // deleted, the retries run out and it stays skipped.
    let mut gone = Vec::new();
    for secret in batch.annotations.keys() {
        match Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &w.namespace)
            .get_metadata_opt(secret)
            .await
        {
            Ok(None) => gone.push(secret.clone()),
            Ok(Some(_)) => {}
            Err(e) => return failed(batch, &what, &secrets, e),
        }
    }
    if gone.is_empty() {
        return apply_to(client, batch, &live).await;
    }
    let mut rest = batch.clone();
    for secret in &gone {
        rest.annotations.remove(secret);
    }
    let mut applied = if rest.annotations.is_empty() {
        Applied::all(
            batch,
            "Skipped:SecretDeleted",
            format!("{what} not restarted: Secret {secrets} was deleted"),
        )
    } else {
        apply_to(client, &rest, &live).await
    };
    for secret in gone {
        applied
            .results
            .insert(secret, "Skipped:SecretDeleted".into());
    }
    applied.retryable = true;
    applied
}

/// Applies `batch` to the workload whose live object is `live`: one patch when any of its
/// annotations differs from what the workload holds.
async fn apply_to(client: &Client, batch: &Batch, live: &Value) -> Applied {
    let w = &batch.workload;
    let (what, secrets) = names(batch);
    if live["spec"]["paused"].as_bool() == Some(true) {
        return Applied::all(
            batch,
            "Skipped:Paused",
            format!("{what} is paused: not restarted; resume it to pick up Secret {secrets}"),
        );
    }
    let current = template_annotations(live);
    let mut results = BTreeMap::new();
    for (secret, hash) in &batch.annotations {
        let same = current.get(&annotation_key(secret)) == Some(hash);
        let result = if same {
            "Skipped:AlreadyCurrent"
        } else {
            "Restarted"
        };
        results.insert(secret.clone(), result.to_string());
    }
    if results.values().all(|r| r != "Restarted") {
        return Applied {
            results,
            patched: false,
            note: format!("{what} already runs with the current content of Secret {secrets}"),
            retryable: false,
        };
    }
    // Every checksum annotation it holds, the batch's on top: none is dropped.
    let mut annotations: BTreeMap<String, String> = current
        .into_iter()
        .filter(|(k, _)| k.starts_with(CHECKSUM_PREFIX))
        .collect();
    for (secret, hash) in &batch.annotations {
        annotations.insert(annotation_key(secret), hash.clone());
    }
    let body = json!({
        "apiVersion": w.kind.api_version(),
        "kind": w.kind.as_str(),
        "metadata": {"name": w.name, "namespace": w.namespace},
        "spec": {"template": {"metadata": {"annotations": annotations}}}
    });
    match apply(client, w, &body).await {
        Ok(_) => {
            let restarted: Vec<&str> = results
                .iter()
                .filter(|(_, r)| *r == "Restarted")
                .map(|(s, _)| s.as_str())
                .collect();
            let on_delete = live["spec"]["updateStrategy"]["type"].as_str() == Some("OnDelete");
            Applied {
                note: if on_delete {
                    format!(
                        "updated the pod template of {what} for Secret {}: its update strategy is OnDelete, so its pods pick the change up only when they are deleted",
                        restarted.join(", ")
                    )
                } else {
                    format!(
                        "restarted {what}: Secret {} changed keys it reads",
                        restarted.join(", ")
                    )
                },
                results,
                patched: true,
                retryable: false,
            }
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Applied::all(
            batch,
            "Skipped:Deleted",
            format!("{what} was deleted before it could be restarted"),
        ),
        Err(e) => failed(batch, &what, &secrets, e),
    }
}

fn failed(batch: &Batch, what: &str, secrets: &str, e: kube::Error) -> Applied {
    let result = match &e {
        kube::Error::Api(s) if s.code == 403 => "Failed:Forbidden",
        kube::Error::Api(s) if s.code == 409 || s.code == 422 => "Failed:Refused",
        _ => "Failed:KubernetesError",
    };
    let hint = if result == "Failed:Forbidden" {
        " (the operator's ClusterRole needs get and patch on this kind)"
    } else {
        ""
    };
    let mut applied = Applied::all(
        batch,
        result,
        format!("failed to restart {what} for Secret {secrets}: {e}{hint}"),
    );
    applied.retryable = result == "Failed:KubernetesError";
    applied
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

/// Whether the rollout that a patch started has completed, from the workload's live object —
/// the rules of `kubectl rollout status`. A workload that does not roll on its own
/// (`OnDelete`) is complete at once.
pub fn rollout_complete(kind: WorkloadKind, obj: &Value) -> bool {
    let generation = int(&obj["metadata"]["generation"]);
    let (spec, status) = (&obj["spec"], &obj["status"]);
    let observed = match &status["observedGeneration"] {
        // Argo Rollouts writes it as a string.
        Value::String(s) => s.parse().unwrap_or(0),
        v => int(v),
    };
    if observed < generation {
        return false;
    }
    let on_delete = spec["updateStrategy"]["type"].as_str() == Some("OnDelete");
    match kind {
        WorkloadKind::Deployment => {
            // A rollout past its progress deadline has failed: it holds no slot any more.
            let stuck = status["conditions"].as_array().is_some_and(|cs| {
                cs.iter().any(|c| {
                    c["type"] == "Progressing" && c["reason"] == "ProgressDeadlineExceeded"
                })
            });
            if stuck {
                return true;
            }
            let replicas = spec["replicas"].as_i64().unwrap_or(1);
            let updated = int(&status["updatedReplicas"]);
            updated >= replicas
                && int(&status["replicas"]) <= updated
                && int(&status["availableReplicas"]) >= updated
        }
        WorkloadKind::StatefulSet => {
            if on_delete {
                return true;
            }
            let replicas = spec["replicas"].as_i64().unwrap_or(1);
            let partition = int(&spec["updateStrategy"]["rollingUpdate"]["partition"]);
            if int(&status["readyReplicas"]) < replicas {
                return false;
            }
            if partition > 0 {
                return int(&status["updatedReplicas"]) >= replicas - partition;
            }
            status["updateRevision"] == status["currentRevision"]
        }
        WorkloadKind::DaemonSet => {
            if on_delete {
                return true;
            }
            let desired = int(&status["desiredNumberScheduled"]);
            int(&status["updatedNumberScheduled"]) >= desired
                && int(&status["numberAvailable"]) >= desired
        }
        WorkloadKind::Rollout => matches!(
            status["phase"].as_str(),
            Some("Healthy" | "Paused" | "Degraded")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollout_completion_follows_kubectl_rollout_status() {
        let dep = |generation: i64, observed: i64, updated: i64, total: i64, available: i64| {
            json!({"metadata": {"generation": generation}, "spec": {"replicas": 3},
                   "status": {"observedGeneration": observed, "updatedReplicas": updated,
                              "replicas": total, "availableReplicas": available}})
        };
        let k = WorkloadKind::Deployment;
        assert!(
            !rollout_complete(k, &dep(2, 1, 3, 3, 3)),
            "not observed yet"
        );
        assert!(!rollout_complete(k, &dep(2, 2, 1, 4, 3)), "still updating");
        assert!(
            !rollout_complete(k, &dep(2, 2, 3, 4, 3)),
            "old pods terminating"
        );
        assert!(
            !rollout_complete(k, &dep(2, 2, 3, 3, 2)),
            "not all available"
        );
        assert!(rollout_complete(k, &dep(2, 2, 3, 3, 3)));
        let mut stuck = dep(2, 2, 1, 4, 3);
        stuck["status"]["conditions"] = json!([{"type": "Progressing", "status": "False",
                                                "reason": "ProgressDeadlineExceeded"}]);
        assert!(
            rollout_complete(k, &stuck),
            "a failed rollout frees its slot"
        );

        let sts = |update: &str, current: &str, ready: i64| {
            json!({"metadata": {"generation": 1}, "spec": {"replicas": 2},
                   "status": {"observedGeneration": 1, "readyReplicas": ready,
                              "updateRevision": update, "currentRevision": current}})
        };
        let k = WorkloadKind::StatefulSet;
        assert!(!rollout_complete(k, &sts("b", "a", 2)));
        assert!(!rollout_complete(k, &sts("b", "b", 1)));
        assert!(rollout_complete(k, &sts("b", "b", 2)));
        let on_delete = json!({"metadata": {"generation": 1},
            "spec": {"updateStrategy": {"type": "OnDelete"}}, "status": {"observedGeneration": 1}});
        assert!(rollout_complete(k, &on_delete));

        let ds = |updated: i64, available: i64| {
            json!({"metadata": {"generation": 4}, "status": {"observedGeneration": 4,
                   "desiredNumberScheduled": 5, "updatedNumberScheduled": updated,
                   "numberAvailable": available}})
        };
        assert!(!rollout_complete(WorkloadKind::DaemonSet, &ds(4, 5)));
        assert!(rollout_complete(WorkloadKind::DaemonSet, &ds(5, 5)));

        let argo = |observed: &str, phase: &str| {
            json!({"metadata": {"generation": 7},
                   "status": {"observedGeneration": observed, "phase": phase}})
        };
        let k = WorkloadKind::Rollout;
        assert!(!rollout_complete(k, &argo("6", "Healthy")));
        assert!(!rollout_complete(k, &argo("7", "Progressing")));
        assert!(rollout_complete(k, &argo("7", "Healthy")));
        assert!(
            rollout_complete(k, &argo("7", "Paused")),
            "a canary step waits on people"
        );
    }
}
