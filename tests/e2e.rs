//! End-to-end: the built binary against a real cluster and a real Vault / OpenBao.
//!
//! Skipped unless `SCOPED_SECRETS_E2E=1`, with `KUBECONFIG` (or a current kube context) and
//! `VAULT_ADDR` / `VAULT_TOKEN` (a token that may write `secret/` and read it back). Run it
//! as you would on kind:
//!
//! ```text
//! kind create cluster
//! bao server -dev -dev-root-token-id=root -dev-listen-address=127.0.0.1:8200 &
//! SCOPED_SECRETS_E2E=1 VAULT_ADDR=http://127.0.0.1:8200 VAULT_TOKEN=root \
//!   cargo nextest run --test e2e --no-capture
//! ```
//!
//! The operator runs on this machine (outside the cluster), so the Vault address must be
//! reachable from here; the ClusterVaultStore it creates points at the same address. Every
//! object it creates is named with a random run id and removed at the end. Each step says
//! exactly what it waited for and what it saw last when it fails.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt, ResourceExt};
use scoped_secrets::api::v1alpha1::{ClusterVaultStore, ScopedSecret, VaultStore};
use serde_json::json;

const CANARY: &str = "canary-e2e-7f3a9c";

fn enabled() -> bool {
    std::env::var("SCOPED_SECRETS_E2E").as_deref() == Ok("1")
}

struct Operator {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Operator {
    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    let mut last = String::from("(nothing observed)");
    while start.elapsed() < timeout {
        match probe().await {
            Ok(v) => return v,
            Err(seen) => last = seen,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("timed out after {timeout:?} waiting for: {what}\n  last observed: {last}");
}

fn decoded(secret: &Secret) -> BTreeMap<String, String> {
    secret
        .data
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
        .collect()
}

async fn vault_put(path: &str, data: serde_json::Value) {
    let addr = std::env::var("VAULT_ADDR").expect("VAULT_ADDR");
    let token = std::env::var("VAULT_TOKEN").expect("VAULT_TOKEN");
    let client = vaultrs::client::VaultClient::new(
        vaultrs::client::VaultClientSettingsBuilder::default()
            .address(&addr)
            .token(&token)
            .build()
            .unwrap(),
    )
    .unwrap();
    vaultrs::kv2::set(&client, "secret", path, &data)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "failed to write secret/{path} at {addr}: {e}; does VAULT_TOKEN may write secret/?"
            )
        });
}

async fn apply_json<K>(api: &Api<K>, name: &str, obj: serde_json::Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(
        name,
        &PatchParams::apply("scoped-secrets-e2e").force(),
        &Patch::Apply(obj),
    )
    .await
    .unwrap_or_else(|e| panic!("failed to apply {name}: {e}"));
}

async fn ss_status(
    api: &Api<ScopedSecret>,
    name: &str,
) -> Result<(String, String, ScopedSecret), String> {
    let ss = api.get(name).await.map_err(|e| e.to_string())?;
    let ready = ss
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| (c.status.clone(), c.reason.clone()))
        .ok_or_else(|| {
            format!(
                "ScopedSecret {name} has no Ready condition yet: {:?}",
                ss.status
            )
        })?;
    Ok((ready.0, ready.1, ss))
}

#[tokio::test]
async fn operator_syncs_inherited_values_repairs_drift_and_enforces_access() {
    if !enabled() {
        eprintln!(
            "skipped: set SCOPED_SECRETS_E2E=1 with KUBECONFIG and VAULT_ADDR/VAULT_TOKEN to run"
        );
        return;
    }
    let client = Client::try_default()
        .await
        .expect("no usable kube context: set KUBECONFIG or select a context");
    let run = format!("{:x}", rand_id());
    let project = format!("e2e{run}");
    let (sys_ns, dev_ns, other_ns) = (
        format!("ss-e2e-{run}-system"),
        format!("ss-e2e-{run}-dev"),
        format!("ss-e2e-{run}-other"),
    );
    let store_name = format!("e2e-{run}");
    eprintln!("e2e run {run}: project {project}, namespaces {sys_ns} {dev_ns} {other_ns}");

    // CRDs, applied like `kubectl apply -f crds/`.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in [
        ScopedSecret::crd(),
        VaultStore::crd(),
        ClusterVaultStore::crd(),
    ] {
        let name = crd.name_any();
        crds.patch(
            &name,
            &PatchParams::apply("scoped-secrets-e2e").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("failed to apply CRD {name}: {e}"));
        wait_for(
            &format!("CRD {name} Established"),
            Duration::from_secs(30),
            || {
                let crds = crds.clone();
                let name = name.clone();
                async move {
                    let c = crds.get(&name).await.map_err(|e| e.to_string())?;
                    let est = c
                        .status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True");
                    if est {
                        Ok(())
                    } else {
                        Err("not established".into())
                    }
                }
            },
        )
        .await;
    }

    // Namespaces: the dev one is labelled with project/environment and the team the store
    // admits; the other one claims the same project but is not admitted.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for (ns, labels) in [
        (&sys_ns, json!({})),
        (
            &dev_ns,
            json!({"scopedsecrets.io/project": project, "scopedsecrets.io/environment": "dev", "e2e-team": run}),
        ),
        (
            &other_ns,
            json!({"scopedsecrets.io/project": project, "scopedsecrets.io/environment": "dev"}),
        ),
    ] {
        apply_json(&namespaces, ns, json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}})).await;
    }
    let cleanup = Cleanup {
        client: client.clone(),
        namespaces: vec![sys_ns.clone(), dev_ns.clone(), other_ns.clone()],
        store: store_name.clone(),
    };

    // Vault scopes with inheritance and a tombstone.
    vault_put(
        &project,
        json!({"LOG_LEVEL": "info", "DB_HOST": "db", "FEATURE_X": "off"}),
    )
    .await;
    vault_put(
        &format!("{project}/services/api"),
        json!({"API_TIMEOUT": "5s"}),
    )
    .await;
    vault_put(
        &format!("{project}/envs/dev"),
        json!({"LOG_LEVEL": "debug", "DB_HOST": "db.dev"}),
    )
    .await;
    vault_put(
        &format!("{project}/envs/dev/services/api"),
        json!({"DB_PASSWORD": CANARY, "FEATURE_X": null}),
    )
    .await;

    let secrets_sys: Api<Secret> = Api::namespaced(client.clone(), &sys_ns);
    secrets_sys
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "vault-token"},
                "stringData": {"token": std::env::var("VAULT_TOKEN").unwrap()}
            }))
            .unwrap(),
        )
        .await
        .expect("failed to create the Vault token Secret");
    let stores: Api<ClusterVaultStore> = Api::all(client.clone());
    apply_json(&stores, &store_name, json!({
        "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ClusterVaultStore",
        "metadata": {"name": store_name},
        "spec": {
            "address": std::env::var("VAULT_ADDR").unwrap(),
            "auth": {"token": {"secretRef": {"namespace": sys_ns, "name": "vault-token", "key": "token"}}},
            "access": [{"namespaceSelector": {"matchLabels": {"e2e-team": run}}, "projects": [project]}]
        }
    })).await;

    // The operator, from the built binary.
    let log = std::env::temp_dir().join(format!("scoped-secrets-e2e-{run}.log"));
    let child = Command::new(env!("CARGO_BIN_EXE_scoped-secrets"))
        .args([
            "run",
            "--namespace",
            &sys_ns,
            "--log-level",
            "debug",
            "--metrics-addr",
            "127.0.0.1:0",
            "--restart-window-seconds",
            "3",
        ])
        .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
        .stderr(Stdio::from(
            std::fs::File::create(&log).unwrap().try_clone().unwrap(),
        ))
        .spawn()
        .expect("failed to start the scoped-secrets binary");
    let operator = Operator { child, log };
    eprintln!("operator log: {}", operator.log.display());

    let scoped: Api<ScopedSecret> = Api::namespaced(client.clone(), &dev_ns);
    apply_json(&scoped, "api", json!({
        "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
        "metadata": {"name": "api"},
        "spec": {"storeRef": {"kind": "ClusterVaultStore", "name": store_name}, "refreshInterval": "10s"}
    })).await;

    // 1. Inheritance lands in the Secret.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &dev_ns);
    let want: BTreeMap<String, String> = [
        ("LOG_LEVEL", "debug"),
        ("DB_HOST", "db.dev"),
        ("API_TIMEOUT", "5s"),
        ("DB_PASSWORD", CANARY),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    wait_for(
        "Secret api with the inherited values (FEATURE_X hidden by a tombstone)",
        Duration::from_secs(60),
        || {
            let secrets = secrets.clone();
            let want = want.clone();
            async move {
                let s = secrets
                    .get_opt("api")
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or("Secret api does not exist")?;
                let got = decoded(&s);
                if got == want {
                    Ok(())
                } else {
                    Err(format!("keys {:?}", got.keys().collect::<Vec<_>>()))
                }
            }
        },
    )
    .await;
    let (ready, reason, ss) = wait_for(
        "ScopedSecret api Ready=True",
        Duration::from_secs(30),
        || {
            let scoped = scoped.clone();
            async move {
                let (r, why, ss) = ss_status(&scoped, "api").await?;
                if r == "True" {
                    Ok((r, why, ss))
                } else {
                    Err(format!("Ready={r} reason={why}"))
                }
            }
        },
    )
    .await;
    assert_eq!((ready.as_str(), reason.as_str()), ("True", "Synced"));
    let status = ss.status.clone().unwrap();
    let source = |k: &str| {
        status
            .keys
            .iter()
            .find(|s| s.name == k)
            .map(|s| (s.scope.clone(), s.path.clone()))
    };
    assert_eq!(
        source("LOG_LEVEL"),
        Some(("environment".into(), format!("{project}/envs/dev"))),
        "status.keys source of LOG_LEVEL"
    );
    assert_eq!(
        source("DB_PASSWORD"),
        Some((
            "environment-service".into(),
            format!("{project}/envs/dev/services/api")
        ))
    );
    assert!(
        status
            .content_hash
            .as_deref()
            .unwrap_or("")
            .starts_with("hmac-sha256:"),
        "contentHash {:?}",
        status.content_hash
    );

    // 2. A value changed in Vault arrives on force-sync, and restarts exactly the consumer
    //    that reads a changed key (a Deployment controller is needed for the rollout itself;
    //    what is checked is the pod-template annotation the operator writes).
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &dev_ns);
    for (name, env) in [
        (
            "reads-log-level",
            json!([{"name": "L", "valueFrom": {"secretKeyRef": {"name": "api", "key": "LOG_LEVEL"}}}]),
        ),
        (
            "reads-timeout",
            json!([{"name": "T", "valueFrom": {"secretKeyRef": {"name": "api", "key": "API_TIMEOUT"}}}]),
        ),
    ] {
        apply_json(&deployments, name, json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": 0, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10", "env": env}]}}}
        })).await;
    }
    vault_put(
        &format!("{project}/envs/dev"),
        json!({"LOG_LEVEL": "warn", "DB_HOST": "db.dev"}),
    )
    .await;
    apply_json(&scoped, "api", json!({
        "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
        "metadata": {"name": "api", "annotations": {"scopedsecrets.io/force-sync": "1"}},
        "spec": {"storeRef": {"kind": "ClusterVaultStore", "name": store_name}, "refreshInterval": "10s"}
    })).await;
    wait_for(
        "LOG_LEVEL=warn in Secret api after force-sync",
        Duration::from_secs(30),
        || {
            let secrets = secrets.clone();
            async move {
                let s = secrets.get("api").await.map_err(|e| e.to_string())?;
                let v = decoded(&s).get("LOG_LEVEL").cloned();
                if v.as_deref() == Some("warn") {
                    Ok(())
                } else {
                    Err(format!("LOG_LEVEL={v:?}"))
                }
            }
        },
    )
    .await;

    let annotation = |d: &Deployment| {
        d.spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get("checksum.scopedsecrets.io/api").cloned())
    };
    wait_for(
        "Deployment reads-log-level restarted (checksum.scopedsecrets.io/api on its pod template)",
        Duration::from_secs(30),
        || {
            let deployments = deployments.clone();
            async move {
                let d = deployments
                    .get("reads-log-level")
                    .await
                    .map_err(|e| e.to_string())?;
                annotation(&d).map(|_| ()).ok_or_else(|| {
                    format!(
                        "pod template annotations {:?}",
                        d.spec
                            .and_then(|s| s.template.metadata)
                            .and_then(|m| m.annotations)
                    )
                })
            }
        },
    )
    .await;
    let untouched = deployments
        .get("reads-timeout")
        .await
        .expect("read Deployment reads-timeout");
    assert!(
        annotation(&untouched).is_none(),
        "Deployment reads-timeout was restarted though API_TIMEOUT did not change"
    );

    // 2b. A project-level value shared by two ScopedSecrets: each consuming Deployment's pod
    //     template changes exactly once — one that reads both Secrets too (the two changes are
    //     coalesced into one patch) — and a live-reload volume reader and an unrelated
    //     Deployment are untouched.
    apply_json(&scoped, "worker", json!({
        "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
        "metadata": {"name": "worker"},
        "spec": {"storeRef": {"kind": "ClusterVaultStore", "name": store_name}, "refreshInterval": "10s"}
    })).await;
    let env_from = |names: &[&str]| {
        json!([{"name": "c", "image": "registry.k8s.io/pause:3.10",
                "envFrom": names.iter().map(|n| json!({"secretRef": {"name": n}})).collect::<Vec<_>>()}])
    };
    let consumers = [
        (
            "reads-both",
            json!({}),
            json!({"containers": env_from(&["api", "worker"])}),
        ),
        (
            "reads-worker",
            json!({}),
            json!({"containers": env_from(&["worker"])}),
        ),
        (
            "live-volume",
            json!({"scopedsecrets.io/reload": "live"}),
            json!({
            "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10",
                            "volumeMounts": [{"name": "s", "mountPath": "/s"}]}],
            "volumes": [{"name": "s", "secret": {"secretName": "api"}}]}),
        ),
        (
            "unrelated",
            json!({}),
            json!({"containers": env_from(&["not-managed"])}),
        ),
    ];
    for (name, annotations, pod) in &consumers {
        apply_json(
            &deployments,
            name,
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": name, "annotations": annotations},
                "spec": {"replicas": 0, "selector": {"matchLabels": {"app": name}},
                         "template": {"metadata": {"labels": {"app": name}}, "spec": pod}}
            }),
        )
        .await;
    }
    wait_for(
        "ScopedSecret worker Ready=True",
        Duration::from_secs(30),
        || {
            let scoped = scoped.clone();
            async move {
                let (r, why, _) = ss_status(&scoped, "worker").await?;
                if r == "True" {
                    Ok(())
                } else {
                    Err(format!("Ready={r} ({why})"))
                }
            }
        },
    )
    .await;
    let generation = |d: &Deployment| d.metadata.generation.unwrap_or_default();
    let mut before = BTreeMap::new();
    for (name, _, _) in &consumers {
        let d = deployments
            .get(name)
            .await
            .expect("read consumer Deployment");
        before.insert(name.to_string(), generation(&d));
    }
    vault_put(
        &project,
        json!({"LOG_LEVEL": "info", "DB_HOST": "db", "FEATURE_X": "off", "SHARED_TOKEN": "t2"}),
    )
    .await;
    for name in ["api", "worker"] {
        scoped
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {"scopedsecrets.io/force-sync": format!("shared-{run}")}}})),
            )
            .await
            .unwrap_or_else(|e| panic!("failed to annotate ScopedSecret {name}: {e}"));
    }
    for name in ["reads-both", "reads-worker"] {
        wait_for(
            &format!(
                "Deployment {name} restarted after the project-level change (generation moved)"
            ),
            Duration::from_secs(60),
            || {
                let deployments = deployments.clone();
                let was = before[name];
                async move {
                    let d = deployments.get(name).await.map_err(|e| e.to_string())?;
                    if generation(&d) > was {
                        Ok(())
                    } else {
                        Err(format!("generation {}", generation(&d)))
                    }
                }
            },
        )
        .await;
    }
    // Longer than the window and a refresh interval: a second patch would show by now.
    tokio::time::sleep(Duration::from_secs(15)).await;
    for (name, _, _) in &consumers {
        let d = deployments
            .get(name)
            .await
            .expect("read consumer Deployment");
        let moved = generation(&d) - before[*name];
        let want = if name.starts_with("reads-") { 1 } else { 0 };
        assert_eq!(
            moved,
            want,
            "Deployment {name}: its pod template changed {moved} times for one project-level change (want {want}); annotations {:?}",
            d.spec
                .and_then(|s| s.template.metadata)
                .and_then(|m| m.annotations)
        );
    }
    let both = deployments
        .get("reads-both")
        .await
        .expect("read reads-both");
    let annotations = both
        .spec
        .and_then(|s| s.template.metadata)
        .and_then(|m| m.annotations)
        .unwrap_or_default();
    for secret in ["api", "worker"] {
        assert!(
            annotations.contains_key(&format!("checksum.scopedsecrets.io/{secret}")),
            "reads-both lacks the annotation of Secret {secret}: {annotations:?}"
        );
    }

    // 3. Drift: a hand edit and a deletion are repaired.
    secrets
        .patch(
            "api",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"LOG_LEVEL": "aGFja2Vk", "EXTRA": "eA=="}})),
        )
        .await
        .expect("failed to hand-edit Secret api");
    wait_for(
        "hand edit of Secret api repaired",
        Duration::from_secs(30),
        || {
            let secrets = secrets.clone();
            async move {
                let s = decoded(&secrets.get("api").await.map_err(|e| e.to_string())?);
                if s.get("LOG_LEVEL").map(String::as_str) == Some("warn")
                    && !s.contains_key("EXTRA")
                {
                    Ok(())
                } else {
                    Err(format!(
                        "keys {:?} LOG_LEVEL={:?}",
                        s.keys().collect::<Vec<_>>(),
                        s.get("LOG_LEVEL")
                    ))
                }
            }
        },
    )
    .await;
    secrets
        .delete("api", &DeleteParams::default())
        .await
        .expect("failed to delete Secret api");
    wait_for(
        "deleted Secret api recreated",
        Duration::from_secs(30),
        || {
            let secrets = secrets.clone();
            async move {
                secrets
                    .get_opt("api")
                    .await
                    .map_err(|e| e.to_string())?
                    .map(|_| ())
                    .ok_or_else(|| "absent".to_string())
            }
        },
    )
    .await;

    // 4. Access: a namespace the store's rules do not select gets AccessDenied and no Secret.
    let scoped_other: Api<ScopedSecret> = Api::namespaced(client.clone(), &other_ns);
    apply_json(
        &scoped_other,
        "api",
        json!({
            "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
            "metadata": {"name": "api"},
            "spec": {"storeRef": {"kind": "ClusterVaultStore", "name": store_name}}
        }),
    )
    .await;
    wait_for(
        "ScopedSecret api in the unadmitted namespace Ready=False AccessDenied",
        Duration::from_secs(30),
        || {
            let scoped_other = scoped_other.clone();
            async move {
                let (r, why, _) = ss_status(&scoped_other, "api").await?;
                if r == "False" && why == "AccessDenied" {
                    Ok(())
                } else {
                    Err(format!("Ready={r} reason={why}"))
                }
            }
        },
    )
    .await;
    let other_secret = Api::<Secret>::namespaced(client.clone(), &other_ns)
        .get_opt("api")
        .await
        .unwrap();
    assert!(
        other_secret.is_none(),
        "a Secret was written in a namespace the store does not admit"
    );

    // 4b. Access covers the environment: the dev namespace asking for prod is refused and
    // nothing is written.
    apply_json(
        &scoped,
        "prod-reader",
        json!({
            "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
            "metadata": {"name": "prod-reader"},
            "spec": {"storeRef": {"kind": "ClusterVaultStore", "name": store_name},
                     "service": "api", "environment": "prod"}
        }),
    )
    .await;
    wait_for(
        "ScopedSecret prod-reader in the dev namespace Ready=False AccessDenied",
        Duration::from_secs(30),
        || {
            let scoped = scoped.clone();
            async move {
                let (r, why, _) = ss_status(&scoped, "prod-reader").await?;
                if r == "False" && why == "AccessDenied" {
                    Ok(())
                } else {
                    Err(format!("Ready={r} reason={why}"))
                }
            }
        },
    )
    .await;
    assert!(
        secrets.get_opt("prod-reader").await.unwrap().is_none(),
        "a dev namespace received a Secret of another environment"
    );

    // 5. Invalid spec: an unknown store is StoreNotFound and does not stall others.
    apply_json(
        &scoped,
        "missing-store",
        json!({
            "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
            "metadata": {"name": "missing-store"},
            "spec": {"storeRef": {"kind": "ClusterVaultStore", "name": "does-not-exist"}}
        }),
    )
    .await;
    wait_for(
        "ScopedSecret missing-store Ready=False StoreNotFound",
        Duration::from_secs(30),
        || {
            let scoped = scoped.clone();
            async move {
                let (r, why, _) = ss_status(&scoped, "missing-store").await?;
                if why == "StoreNotFound" {
                    Ok(())
                } else {
                    Err(format!("Ready={r} reason={why}"))
                }
            }
        },
    )
    .await;

    // 6. Secrecy: the canary is in the Secret and nowhere else we can see.
    let all_status =
        serde_json::to_string(&scoped.list(&ListParams::default()).await.unwrap().items).unwrap();
    assert!(
        !all_status.contains(CANARY),
        "the canary value leaked into a ScopedSecret object/status"
    );
    let events = Api::<Event>::namespaced(client.clone(), &dev_ns)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(
        !serde_json::to_string(&events.items)
            .unwrap()
            .contains(CANARY),
        "the canary value leaked into an Event"
    );
    assert!(
        !operator.logs().contains(CANARY),
        "the canary value leaked into the operator log {}",
        operator.log.display()
    );

    // 7. Deletion: Delete garbage-collects the Secret (needs the cluster's garbage collector).
    scoped
        .delete("api", &DeleteParams::default())
        .await
        .expect("failed to delete ScopedSecret api");
    wait_for(
        "Secret api garbage-collected after its ScopedSecret was deleted (deletionPolicy Delete)",
        Duration::from_secs(60),
        || {
            let secrets = secrets.clone();
            async move {
                match secrets.get_opt("api").await.map_err(|e| e.to_string())? {
                    None => Ok(()),
                    Some(s) => Err(format!(
                        "still there, ownerReferences {:?}",
                        s.metadata.owner_references
                    )),
                }
            }
        },
    )
    .await;
    drop(operator);
    drop(cleanup);
}

/// Removes what the run created, even when a step failed.
struct Cleanup {
    client: Client,
    namespaces: Vec<String>,
    store: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let client = self.client.clone();
        let namespaces = std::mem::take(&mut self.namespaces);
        let store = self.store.clone();
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let ns_api: Api<Namespace> = Api::all(client.clone());
                for ns in namespaces {
                    let _ = ns_api.delete(&ns, &DeleteParams::default()).await;
                }
                let _ = Api::<ClusterVaultStore>::all(client)
                    .delete(&store, &DeleteParams::default())
                    .await;
            });
        });
        let _ = handle.join();
    }
}

fn rand_id() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish() as u32
}
