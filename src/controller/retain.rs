//! The `Retain` stage: under `deletionPolicy: Retain` the Secret must survive the deletion of
//! its ScopedSecret whatever else is broken, so the owner reference is removed first — with a
//! metadata-only patch, before the store, the namespace or Vault are looked at. A sync that
//! fails later (missing store, Vault down) then cannot leave a Secret that the garbage
//! collector deletes with the ScopedSecret.

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::status::{RETAINED, holding};
use super::{Context, Error, kube_err};
use crate::api::v1alpha1::{DeletionPolicy, ScopedSecret};

/// What the stage established, for the `Retained` condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Retention {
    /// `deletionPolicy: Delete`: the Secret is owned and goes with the ScopedSecret.
    Delete,
    /// No Secret of this ScopedSecret carries its owner reference.
    Retained,
    /// The owner reference could not be removed (the message says why).
    Failed(String),
    /// Not known (the reconcile timed out first): the condition stays as it was.
    Unknown,
}

/// Removes this ScopedSecret's owner reference from the Secrets it manages (the current
/// target and the one recorded in status) when the policy is `Retain`. Reads nothing when
/// the status already reports the current generation retained.
pub async fn release(ss: &ScopedSecret, ctx: &Context) -> Result<Retention, Error> {
    if ss.spec.deletion_policy != DeletionPolicy::Retain {
        return Ok(Retention::Delete);
    }
    // The status already says this generation's Secret is retained.
    if holding(ss, RETAINED).is_some_and(|c| c.observed_generation == ss.metadata.generation) {
        return Ok(Retention::Retained);
    }
    let Some(ns) = ss.namespace() else {
        return Ok(Retention::Retained);
    };
    let uid = ss.meta().uid.clone().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    // The current target and the one last written.
    let current = crate::pipeline::validate::secret_name(ss);
    let previous = ss.status.as_ref().and_then(|s| s.secret_name.clone());
    for name in std::iter::once(current.clone()).chain(previous.filter(|p| *p != current)) {
        let failed = |verb: &str| {
            kube_err(format!(
                "{verb} Secret {ns}/{name} (deletionPolicy: Retain)"
            ))
        };
        let Some(secret) = secrets.get_opt(&name).await.map_err(failed("read"))? else {
            continue;
        };
        let ours = super::reconcile::is_ours(&secret, &ss.name_any());
        let refs = secret.metadata.owner_references.clone().unwrap_or_default();
        if !ours || !refs.iter().any(|r| r.uid == uid) {
            continue;
        }
        let kept: Vec<_> = refs.into_iter().filter(|r| r.uid != uid).collect();
        // The resourceVersion makes the patch conditional: a concurrent change fails it (409)
        // and the reconcile is retried, instead of writing a list read before that change.
        let patch = json!({"metadata": {
            "resourceVersion": secret.resource_version(),
            "ownerReferences": if kept.is_empty() { serde_json::Value::Null } else { json!(kept) },
        }});
        secrets
            .patch(
                &name,
                &super::reconcile::merge_params(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(failed("remove the owner reference from"))?;
        ctx.metrics.wrote("secret_release");
        tracing::info!(
            secret = %name,
            "removed the owner reference: the Secret stays when the ScopedSecret is deleted"
        );
    }
    Ok(Retention::Retained)
}
