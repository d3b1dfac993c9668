//! Workloads as the restart tests create them: Deployments and the pod specs that read
//! Secrets.

use serde_json::{Value, json};

/// A Deployment whose rollouts complete at once (its status has observed every generation).
pub fn deployment(ns: &str, name: &str, pod: Value) -> Value {
    let mut d = rolling_deployment(ns, name, pod);
    d["status"]["observedGeneration"] = json!(1_000_000);
    d
}

/// A Deployment whose rollouts complete only when its status is moved on (by the test, as the
/// Deployment controller would).
pub fn rolling_deployment(ns: &str, name: &str, pod: Value) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}}, "spec": pod}},
        "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1}
    })
}

/// A pod reading every key of each of `secrets` through `envFrom`.
pub fn env_from(secrets: &[&str]) -> Value {
    let refs: Vec<Value> = secrets
        .iter()
        .map(|s| json!({"secretRef": {"name": s}}))
        .collect();
    json!({"containers": [{"name": "c", "image": "x", "envFrom": refs}]})
}

/// A pod reading the one key `key` of `secret`.
pub fn key_ref(secret: &str, key: &str) -> Value {
    json!({"containers": [{"name": "c", "image": "x", "env": [{"name": "V", "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}]}]})
}
