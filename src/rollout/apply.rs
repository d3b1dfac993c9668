//! Reading the workloads of a namespace and applying restart decisions.
//!
//! The restart is a server-side apply of the one pod-template annotation, under a field
//! manager of its own per Secret (`scoped-secrets-rollout.<secret>`), so that the annotations
//! of two Secrets on one workload never remove each other and nothing else of the workload is
//! claimed. A workload deleted between listing and patching is skipped; a refused patch
//! (409/422) is reported, not retried forever.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::{Change, Decision, Skip, Workload, WorkloadKind, annotation_key, decide, targets};
use crate::api::v1alpha1::Rollout;
use crate::render::HmacKey;

/// What happened to one workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub kind: WorkloadKind,
    pub name: String,
    /// The hash written (or found) in its annotation.
    pub hash: Option<String>,
    /// `Restarted`, `Skipped:<reason>`, or `Failed:<reason>`.
    pub result: String,
    /// A sentence for the event, naming no value.
    pub note: String,
}

/// What one content change did about restarts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub outcomes: Vec<Outcome>,
    /// Why restarts are paused (the breaker tripped), if they are.
    pub paused: Option<String>,
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

/// Deployments, StatefulSets and DaemonSets of `namespace`.
pub async fn list_workloads(
    client: &Client,
    namespace: &str,
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
    Ok(out)
}

/// The field manager of the restart annotation of `secret`.
pub fn field_manager(secret: &str) -> String {
    // Field manager names are at most 128 characters.
    let mut m = format!("scoped-secrets-rollout.{secret}");
    m.truncate(128);
    m
}

async fn patch(
    client: &Client,
    ns: &str,
    kind: WorkloadKind,
    name: &str,
    secret: &str,
    hash: &str,
) -> Result<(), kube::Error> {
    let (api_version, kind_str) = ("apps/v1", kind.as_str());
    let body = json!({
        "apiVersion": api_version,
        "kind": kind_str,
        "metadata": {"name": name, "namespace": ns},
        "spec": {"template": {"metadata": {"annotations": {annotation_key(secret): hash}}}}
    });
    let pp = PatchParams::apply(&field_manager(secret)).force();
    match kind {
        WorkloadKind::Deployment => Api::<Deployment>::namespaced(client.clone(), ns)
            .patch(name, &pp, &Patch::Apply(&body))
            .await
            .map(|_| ()),
        WorkloadKind::StatefulSet => Api::<StatefulSet>::namespaced(client.clone(), ns)
            .patch(name, &pp, &Patch::Apply(&body))
            .await
            .map(|_| ()),
        WorkloadKind::DaemonSet => Api::<DaemonSet>::namespaced(client.clone(), ns)
            .patch(name, &pp, &Patch::Apply(&body))
            .await
            .map(|_| ()),
    }
}

/// Restarts the consumers of `secret` in `ns` that `change` affects; returns one outcome per
/// targeted workload.
#[allow(clippy::too_many_arguments)]
pub async fn restart_consumers(
    client: &Client,
    ns: &str,
    secret: &str,
    rollout: Option<&Rollout>,
    workloads: &[Workload],
    change: &Change,
    key: &HmacKey,
    data: &BTreeMap<String, ByteString>,
) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    for (w, consumption) in targets(rollout, workloads, secret) {
        let decision = decide(w, &consumption, secret, change, key, data);
        let what = format!("{}/{}", w.kind.as_str(), w.name);
        let outcome = match decision {
            Decision::Skip(skip) => Outcome {
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
                    Skip::AlreadyCurrent => {
                        format!("{what} already runs with the current content of Secret {secret}")
                    }
                },
            },
            Decision::Restart {
                hash,
                live_reload_refused,
            } => match patch(client, ns, w.kind, &w.name, secret, &hash).await {
                Ok(()) => Outcome {
                    kind: w.kind,
                    name: w.name.clone(),
                    hash: Some(hash),
                    result: "Restarted".into(),
                    note: if live_reload_refused {
                        format!(
                            "restarted {what} for Secret {secret}: it asked for live reload but reads the Secret through env or subPath, which only a restart refreshes"
                        )
                    } else {
                        format!("restarted {what}: Secret {secret} changed keys it reads")
                    },
                },
                Err(kube::Error::Api(s)) if s.code == 404 => Outcome {
                    kind: w.kind,
                    name: w.name.clone(),
                    hash: None,
                    result: "Skipped:Deleted".into(),
                    note: format!("{what} was deleted before it could be restarted"),
                },
                Err(e) => Outcome {
                    kind: w.kind,
                    name: w.name.clone(),
                    hash: Some(hash),
                    result: match &e {
                        kube::Error::Api(s) if s.code == 403 => "Failed:Forbidden".into(),
                        kube::Error::Api(s) if s.code == 409 || s.code == 422 => {
                            "Failed:Refused".into()
                        }
                        _ => "Failed:KubernetesError".into(),
                    },
                    note: format!("failed to restart {what} for Secret {secret}: {e}"),
                },
            },
        };
        outcomes.push(outcome);
    }
    outcomes
}
