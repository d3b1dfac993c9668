//! Talking to the API server about workloads: the one patch that restarts a workload (or
//! records a baseline), and whether its rollout has completed.
//!
//! A patch is one server-side apply under the field manager `scoped-secrets-rollout`, forcing
//! only the fields it carries: every `checksum.scopedsecrets.io/*` annotation this manager
//! owns on the pod template and on the workload's metadata, with the new values on top —
//! applying fewer would make the server drop the ones applied before. However many Secrets
//! changed: one patch, one rollout.

use std::collections::BTreeMap;

use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::{Value, json};

use super::{CHECKSUM_PREFIX, RESTARTED_AT_ANNOTATION, Workload, WorkloadKind};

/// The field manager of the restart annotations.
pub const FIELD_MANAGER: &str = "scoped-secrets-rollout";

/// Whether the API server serves Argo Rollouts (`rollouts.argoproj.io`): `Ok(false)` when the
/// group is not found; an error when discovery failed (the caller asks again).
pub async fn argo_rollouts_served(client: &Client) -> Result<bool, kube::Error> {
    match client
        .list_api_group_resources("argoproj.io/v1alpha1")
        .await
    {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == "rollouts")),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// The annotations one patch applies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Annotations {
    /// Pod-template annotations: a change rolls the pods.
    pub template: BTreeMap<String, String>,
    /// Workload metadata annotations (baselines, `restarted-at`): roll nothing.
    pub metadata: BTreeMap<String, String>,
}

impl Annotations {
    /// What this manager holds on `w` now: its checksum annotations and restart time.
    pub fn held(w: &Workload) -> Self {
        let ours = |pairs: &[(String, String)]| {
            let ours = |k: &str| k.starts_with(CHECKSUM_PREFIX) || k == RESTARTED_AT_ANNOTATION;
            pairs.iter().filter(|(k, _)| ours(k)).cloned().collect()
        };
        Annotations {
            template: ours(&w.template),
            metadata: ours(&w.annotations),
        }
    }
}

/// The server-side apply body for `w`. Without template annotations the body has no `spec`
/// at all: an empty map where the template had none could change the pod template's hash and
/// roll the pods.
pub fn patch_body(w: &Workload, a: &Annotations) -> Value {
    let mut body = json!({
        "apiVersion": w.kind.resource().api_version,
        "kind": w.kind.as_str(),
        "metadata": {"name": w.name(), "namespace": w.metadata.namespace, "annotations": a.metadata},
    });
    if !a.template.is_empty() {
        body["spec"] = json!({"template": {"metadata": {"annotations": a.template}}});
    }
    body
}

/// Applies `annotations` to `w`.
pub async fn apply(
    client: &Client,
    w: &Workload,
    annotations: &Annotations,
) -> Result<(), kube::Error> {
    let ns = w.metadata.namespace.as_deref().unwrap_or_default();
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), ns, &w.kind.resource());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let body = patch_body(w, annotations);
    api.patch(w.name(), &params, &Patch::Apply(&body))
        .await
        .map(|_| ())
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

/// Whether the rollout that a patch started has completed, from the workload as cached —
/// the rules of `kubectl rollout status`. A workload that does not roll on its own
/// (`OnDelete`) is complete at once.
pub fn rollout_complete(kind: WorkloadKind, obj: &DynamicObject) -> bool {
    let generation = obj.metadata.generation.unwrap_or(0);
    let (spec, status) = (&obj.data["spec"], &obj.data["status"]);
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
    fn a_patch_carries_every_annotation_this_manager_holds() {
        let obj = json!({
            "metadata": {"name": "db", "annotations": {
                "checksum.scopedsecrets.io/b": "2", (RESTARTED_AT_ANNOTATION): "t",
                "kubectl.kubernetes.io/last-applied-configuration": "{}"}},
            "spec": {"template": {"metadata": {"annotations": {
                "checksum.scopedsecrets.io/a": "1", "other": "x"}}}},
        });
        let w = Workload::new(
            WorkloadKind::StatefulSet,
            &serde_json::from_value(obj).unwrap(),
        );
        let held = Annotations::held(&w);
        assert_eq!(held.template.len(), 1);
        assert_eq!(held.metadata.len(), 2);
        let body = patch_body(&w, &held);
        assert_eq!(body["apiVersion"], "apps/v1");
        assert_eq!(
            body["spec"]["template"]["metadata"]["annotations"]["checksum.scopedsecrets.io/a"],
            "1"
        );
        assert_eq!(
            body["metadata"]["annotations"]["checksum.scopedsecrets.io/b"],
            "2"
        );
    }

    fn rollout_complete(kind: WorkloadKind, obj: &Value) -> bool {
        super::rollout_complete(kind, &serde_json::from_value(obj.clone()).unwrap())
    }

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
