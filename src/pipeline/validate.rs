//! The `validate` stage (pure): from a ScopedSecret, its namespace's labels and its store to
//! coordinates, paths, an auth plan and an access decision — or a precise refusal.

use std::collections::BTreeMap;
use std::time::Duration;

use kube::core::{Selector, SelectorExt};

use crate::api::v1alpha1::{ClusterVaultStoreSpec, ScopedSecret, StoreConnection, StoreKind};
use crate::controller::Error;
use crate::render::FORBIDDEN_TYPE;
use crate::scope::{Coordinates, Layout};
use crate::vault::{AuthPlan, SecretKeyLocation};
use crate::{ENVIRONMENT_LABEL, PROJECT_LABEL};

/// Default refresh interval.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(60);
/// Shortest refresh interval accepted: protects Vault from a typo like `1ms`.
pub const MIN_REFRESH: Duration = Duration::from_secs(10);
/// Default timeout of a Vault call.
pub const DEFAULT_VAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest timeout of a Vault call (also in the CRD schema): an address that never answers
/// holds a reconcile worker this long.
pub const MAX_VAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Parses a Go-style duration (`30s`, `1m`, `1h30m`, `500ms`).
pub fn parse_duration(field: &str, value: &str) -> Result<Duration, Error> {
    let bad = || {
        Error::InvalidSpec(format!(
            "{field} {value:?} is not a duration like 30s, 5m or 1h30m"
        ))
    };
    // "ms" before "m".
    let units = [
        ("ms", Duration::from_millis(1)),
        ("s", Duration::from_secs(1)),
        ("m", Duration::from_secs(60)),
        ("h", Duration::from_secs(3600)),
    ];
    let (mut total, mut rest) = (Duration::ZERO, value);
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).filter(|d| *d > 0);
        let digits = digits.ok_or_else(bad)?;
        let n: u32 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (suffix, unit) = units
            .iter()
            .find(|(u, _)| rest.starts_with(u))
            .ok_or_else(bad)?;
        let term = unit.checked_mul(n).ok_or_else(bad)?;
        total = total.checked_add(term).ok_or_else(bad)?;
        rest = &rest[suffix.len()..];
    }
    Ok(total)
}

/// What the ScopedSecret asks for, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub coordinates: Coordinates,
    pub secret_name: String,
    pub refresh: Duration,
}

/// Checks the ScopedSecret's own fields and fills defaults from its namespace's labels.
pub fn request(
    ss: &ScopedSecret,
    namespace_labels: &BTreeMap<String, String>,
) -> Result<Request, Error> {
    let name = ss.metadata.name.as_deref().unwrap_or_default();
    let ns = ss.metadata.namespace.as_deref().unwrap_or_default();
    let spec = &ss.spec;
    let project = spec
        .project
        .as_deref()
        .or(namespace_labels.get(PROJECT_LABEL).map(String::as_str))
        .ok_or_else(|| {
            Error::InvalidSpec(format!(
                "no project: set spec.project, or label namespace {ns} with {PROJECT_LABEL}=<project>"
            ))
        })?;
    let environment = spec
        .environment
        .as_deref()
        .or(namespace_labels.get(ENVIRONMENT_LABEL).map(String::as_str));
    let service = spec.service.as_deref().unwrap_or(name);
    let coordinates = Coordinates::new(project, environment, Some(service)).map_err(|e| {
        let hint = if spec.service.is_none() && e.to_string().starts_with("service") {
            " (the service defaults to the ScopedSecret's name; set spec.service)"
        } else {
            ""
        };
        Error::InvalidSpec(format!("{e}{hint}"))
    })?;

    let target = spec.target.clone().unwrap_or_default();
    if target.type_.as_deref() == Some(FORBIDDEN_TYPE) {
        return Err(Error::InvalidSpec(format!(
            "spec.target.type {FORBIDDEN_TYPE} is refused: it would mint a token for any ServiceAccount in the namespace"
        )));
    }
    let refresh = match &spec.refresh_interval {
        Some(v) => parse_duration("spec.refreshInterval", v)?,
        None => DEFAULT_REFRESH,
    };
    if refresh < MIN_REFRESH {
        return Err(Error::InvalidSpec(format!(
            "spec.refreshInterval {:?} is shorter than the minimum 10s",
            spec.refresh_interval.as_deref().unwrap_or_default()
        )));
    }
    for r in &spec.rotation {
        parse_duration(&format!("spec.rotation[{}].overlap", r.key), &r.overlap)?;
    }
    Ok(Request {
        coordinates,
        secret_name: secret_name(ss),
        refresh,
    })
}

/// The Secret a ScopedSecret writes: `spec.target.name`, by default its own name.
pub fn secret_name(ss: &ScopedSecret) -> String {
    ss.spec
        .target
        .as_ref()
        .and_then(|t| t.name.clone())
        .unwrap_or_else(|| ss.metadata.name.clone().unwrap_or_default())
}

/// Whether a ClusterVaultStore serves `namespace` (with `labels`) for `coordinates`.
///
/// Without rules a namespace reads only its labelled project and, when it has the
/// environment label, only that environment. With rules, one rule selecting the namespace
/// must admit the project, the environment and the service together. A spec that names
/// another project or environment than the namespace's labels is refused here, before
/// anything is read from Vault.
pub fn check_access(
    store_name: &str,
    store: &ClusterVaultStoreSpec,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    coordinates: &Coordinates,
) -> Result<(), Error> {
    let project = coordinates.project.as_str();
    let environment = coordinates.environment.as_deref();
    let service = coordinates.service.as_deref();
    let env_label = labels.get(ENVIRONMENT_LABEL).map(String::as_str);
    if store.access.is_empty() {
        let denied = |detail: String| {
            Error::AccessDenied(format!(
                "ClusterVaultStore {store_name} has no spec.access rules, so {detail}"
            ))
        };
        match labels.get(PROJECT_LABEL) {
            Some(p) if p == project => {}
            Some(p) => {
                return Err(denied(format!(
                    "namespace {namespace} may read only project {p:?} (its label {PROJECT_LABEL}), not {project:?}; add a spec.access rule selecting this namespace with projects [{project:?}]"
                )));
            }
            None => {
                return Err(denied(format!(
                    "namespace {namespace} has no label {PROJECT_LABEL} and may read nothing; label the namespace {PROJECT_LABEL}={project} or add a spec.access rule selecting it with projects [{project:?}]"
                )));
            }
        }
        return match (env_label, environment) {
            (Some(own), Some(env)) if own != env => Err(denied(format!(
                "namespace {namespace} may read only environment {own:?} (its label {ENVIRONMENT_LABEL}), not {env:?}; remove spec.environment, or add a spec.access rule selecting this namespace with projects [{project:?}] and environments [{env:?}]"
            ))),
            _ => Ok(()),
        };
    }

    // The closest a rule came, to say what would admit the request.
    let mut closest = Closest::NoRuleSelects;
    for (i, rule) in store.access.iter().enumerate() {
        let selector = Selector::try_from(rule.namespace_selector.clone()).map_err(|e| {
            Error::InvalidStore(format!(
                "ClusterVaultStore {store_name} spec.access[{i}].namespaceSelector is invalid: {e}"
            ))
        })?;
        if !selector.matches(labels) {
            continue;
        }
        if !admits(&rule.projects, project) {
            closest = closest.max(Closest::Project);
            continue;
        }
        let environment_ok = match (environment, &rule.environments) {
            (None, _) => true,
            (Some(env), Some(listed)) => admits(listed, env),
            // Omitted: only the namespace's own labelled environment.
            (Some(env), None) => env_label == Some(env),
        };
        if !environment_ok {
            closest = closest.max(Closest::Environment(i));
            continue;
        }
        if let (Some(svc), Some(listed)) = (service, &rule.services)
            && !admits(listed, svc)
        {
            closest = closest.max(Closest::Service(i));
            continue;
        }
        return Ok(());
    }
    let prefix = format!("ClusterVaultStore {store_name}");
    Err(Error::AccessDenied(match closest {
        Closest::NoRuleSelects => format!(
            "no spec.access rule of {prefix} selects namespace {namespace}; add a rule whose namespaceSelector matches its labels, with projects [{project:?}]"
        ),
        Closest::Project => format!(
            "the spec.access rules of {prefix} that select namespace {namespace} do not list project {project:?}; add it to a rule's projects"
        ),
        Closest::Environment(i) => {
            let env = environment.unwrap_or_default();
            let own = match (&store.access[i].environments, env_label) {
                (Some(_), _) => String::new(),
                (None, Some(own)) => format!(
                    " (without spec.access[{i}].environments it admits only the namespace's own environment {own:?}, from its label {ENVIRONMENT_LABEL})"
                ),
                (None, None) => format!(
                    " (without spec.access[{i}].environments it admits no environment, since the namespace has no label {ENVIRONMENT_LABEL})"
                ),
            };
            format!(
                "spec.access[{i}] of {prefix} admits namespace {namespace} to project {project:?} but not to environment {env:?}{own}; add {env:?} to its environments, or correct spec.environment"
            )
        }
        Closest::Service(i) => format!(
            "spec.access[{i}] of {prefix} admits namespace {namespace} to project {project:?} but not to service {:?}; add it to its services, or correct spec.service",
            service.unwrap_or_default()
        ),
    }))
}

/// How far the best rule got, in the order the checks run (for the refusal message).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Closest {
    NoRuleSelects,
    Project,
    Environment(usize),
    Service(usize),
}

/// Whether a rule's list admits `name` (`*` admits every name).
fn admits(listed: &[String], name: &str) -> bool {
    listed.iter().any(|l| l == "*" || l == name)
}

/// Turns the store's `auth` into a plan with every namespace decided. A namespaced
/// VaultStore may only use credentials of its own namespace (no confused deputy); a
/// ClusterVaultStore must name the namespace of its credential Secrets.
pub fn auth_plan(
    kind: StoreKind,
    store_name: &str,
    store_namespace: Option<&str>,
    conn: &StoreConnection,
    requester_namespace: &str,
) -> Result<AuthPlan, Error> {
    let invalid =
        |detail: String| Error::InvalidStore(format!("{} {store_name}: {detail}", kind.as_str()));
    let auth = &conn.auth;
    let set = [
        auth.kubernetes.is_some(),
        auth.app_role.is_some(),
        auth.token.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if set != 1 {
        return Err(invalid(format!(
            "spec.auth must set exactly one of kubernetes, appRole, token ({set} set)"
        )));
    }
    if conn.kv.version != 2 {
        return Err(invalid("spec.kv.version must be 2".into()));
    }
    let secret_location = |field: &str,
                           r: &crate::api::v1alpha1::SecretKeyRef|
     -> Result<SecretKeyLocation, Error> {
        let namespace = match (kind, &r.namespace, store_namespace) {
            (StoreKind::VaultStore, Some(ns), Some(own)) if ns != own => {
                return Err(invalid(format!(
                    "{field}.namespace {ns:?}: a VaultStore may only read Secrets of its own namespace {own:?}"
                )));
            }
            (StoreKind::VaultStore, _, Some(own)) => own.to_string(),
            (_, Some(ns), _) => ns.clone(),
            (_, None, _) => {
                return Err(invalid(format!(
                    "{field}.namespace is required on a ClusterVaultStore"
                )));
            }
        };
        Ok(SecretKeyLocation {
            namespace,
            name: r.name.clone(),
            key: r.key.clone(),
        })
    };
    if let Some(k) = &auth.kubernetes {
        let sa_ns = match (kind, &k.service_account.namespace) {
            (StoreKind::VaultStore, Some(ns)) if Some(ns.as_str()) != store_namespace => {
                return Err(invalid(format!(
                    "spec.auth.kubernetes.serviceAccount.namespace {ns:?}: a VaultStore may only use ServiceAccounts of its own namespace"
                )));
            }
            (_, Some(ns)) => ns.clone(),
            (_, None) => requester_namespace.to_string(),
        };
        return Ok(AuthPlan::Kubernetes {
            mount: k.mount_path.clone().unwrap_or_else(|| "kubernetes".into()),
            role: k.role.clone(),
            audience: k.audience.clone().unwrap_or_else(|| "vault".into()),
            service_account_namespace: sa_ns,
            service_account: k.service_account.name.clone(),
        });
    }
    if let Some(a) = &auth.app_role {
        return Ok(AuthPlan::AppRole {
            mount: a.mount_path.clone().unwrap_or_else(|| "approle".into()),
            role_id: a.role_id.clone(),
            secret_id: secret_location("spec.auth.appRole.secretRef", &a.secret_ref)?,
        });
    }
    let t = auth.token.as_ref().expect("exactly one auth method is set");
    Ok(AuthPlan::Token {
        token: secret_location("spec.auth.token.secretRef", &t.secret_ref)?,
    })
}

/// The store's path layout and Vault timeout.
pub fn layout_and_timeout(
    kind: StoreKind,
    store_name: &str,
    conn: &StoreConnection,
) -> Result<(Layout, Duration), Error> {
    let invalid =
        |detail: String| Error::InvalidStore(format!("{} {store_name}: {detail}", kind.as_str()));
    let layout = Layout::from_templates(&conn.paths).map_err(|e| invalid(e.to_string()))?;
    let timeout = match &conn.timeout {
        Some(t) => parse_duration("spec.timeout", t).map_err(|e| invalid(e.to_string()))?,
        None => DEFAULT_VAULT_TIMEOUT,
    };
    if timeout > MAX_VAULT_TIMEOUT {
        let limit = MAX_VAULT_TIMEOUT.as_secs();
        return Err(invalid(format!(
            "spec.timeout {:?} is longer than the limit of {limit}s; set it to {limit}s or less (an address that never answers holds a reconcile worker for the whole timeout)",
            conn.timeout.as_deref().unwrap_or_default(),
        )));
    }
    Ok((layout, timeout.max(Duration::from_millis(100))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::v1alpha1::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn ss(spec: ScopedSecretSpec) -> ScopedSecret {
        let mut ss = ScopedSecret::new("api", spec);
        ss.metadata.namespace = Some("shop-dev".into());
        ss
    }

    #[test]
    fn coordinates_default_to_namespace_labels_and_the_object_name() {
        let r = request(
            &ss(ScopedSecretSpec::default()),
            &labels(&[(PROJECT_LABEL, "shop"), (ENVIRONMENT_LABEL, "dev")]),
        )
        .unwrap();
        assert_eq!(
            r.coordinates,
            Coordinates::new("shop", Some("dev"), Some("api")).unwrap()
        );
        assert_eq!(r.secret_name, "api");
        assert_eq!(r.refresh, DEFAULT_REFRESH);
    }

    #[test]
    fn spec_fields_win_over_namespace_labels() {
        let r = request(
            &ss(ScopedSecretSpec {
                project: Some("bank".into()),
                environment: Some("prod".into()),
                service: Some("web".into()),
                target: Some(Box::new(Target {
                    name: Some("web-env".into()),
                    ..Default::default()
                })),
                refresh_interval: Some("5m".into()),
                ..Default::default()
            }),
            &labels(&[(PROJECT_LABEL, "shop"), (ENVIRONMENT_LABEL, "dev")]),
        )
        .unwrap();
        assert_eq!(
            r.coordinates,
            Coordinates::new("bank", Some("prod"), Some("web")).unwrap()
        );
        assert_eq!(r.secret_name, "web-env");
        assert_eq!(r.refresh, Duration::from_secs(300));
    }

    #[test]
    fn missing_project_bad_names_short_refresh_and_sa_token_type_are_invalid_spec() {
        let cases: Vec<(ScopedSecretSpec, &str)> = vec![
            (ScopedSecretSpec::default(), "no project"),
            (
                ScopedSecretSpec {
                    project: Some("a/b".into()),
                    ..Default::default()
                },
                "project \"a/b\"",
            ),
            (
                ScopedSecretSpec {
                    project: Some("p".into()),
                    environment: Some("..".into()),
                    ..Default::default()
                },
                "environment",
            ),
            (
                ScopedSecretSpec {
                    project: Some("p".into()),
                    refresh_interval: Some("1s".into()),
                    ..Default::default()
                },
                "minimum 10s",
            ),
            (
                ScopedSecretSpec {
                    project: Some("p".into()),
                    refresh_interval: Some("soon".into()),
                    ..Default::default()
                },
                "not a duration",
            ),
            (
                ScopedSecretSpec {
                    project: Some("p".into()),
                    target: Some(Box::new(Target {
                        type_: Some(FORBIDDEN_TYPE.into()),
                        ..Default::default()
                    })),
                    ..Default::default()
                },
                "refused",
            ),
        ];
        for (spec, want) in cases {
            let err = request(&ss(spec), &BTreeMap::new()).unwrap_err();
            assert_eq!(err.category(), "InvalidSpec");
            assert!(err.to_string().contains(want), "{err}");
        }
    }

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(
            parse_duration("f", "1h30m").unwrap(),
            Duration::from_secs(5400)
        );
        assert_eq!(
            parse_duration("f", "500ms").unwrap(),
            Duration::from_millis(500)
        );
        for bad in ["", "1", "m", "1d", "1.5h", "-1s", "1m 2s"] {
            assert!(parse_duration("f", bad).is_err(), "{bad:?}");
        }
    }

    fn cluster_store(access: Vec<AccessRule>) -> ClusterVaultStoreSpec {
        ClusterVaultStoreSpec {
            access,
            ..Default::default()
        }
    }

    fn rule(match_labels: &[(&str, &str)], projects: &[&str]) -> AccessRule {
        AccessRule {
            namespace_selector: LabelSelector {
                match_labels: Some(labels(match_labels)),
                ..Default::default()
            },
            projects: projects.iter().map(|p| p.to_string()).collect(),
            environments: None,
            services: None,
        }
    }

    fn list(names: &[&str]) -> Option<Vec<String>> {
        Some(names.iter().map(|n| n.to_string()).collect())
    }

    fn at(project: &str, environment: Option<&str>, service: &str) -> Coordinates {
        Coordinates::new(project, environment, Some(service)).unwrap()
    }

    #[test]
    fn without_rules_a_namespace_reads_only_its_labelled_project() {
        let store = cluster_store(vec![]);
        let shop = labels(&[(PROJECT_LABEL, "shop")]);
        assert!(check_access("vault", &store, "shop-dev", &shop, &at("shop", None, "api")).is_ok());
        let err =
            check_access("vault", &store, "shop-dev", &shop, &at("bank", None, "api")).unwrap_err();
        assert_eq!(err.category(), "AccessDenied");
        assert!(err.to_string().contains("not \"bank\""), "{err}");
        let err = check_access(
            "vault",
            &store,
            "x",
            &BTreeMap::new(),
            &at("shop", None, "api"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("has no label"), "{err}");
    }

    #[test]
    fn without_rules_a_namespace_labelled_with_an_environment_reads_only_that_environment() {
        let store = cluster_store(vec![]);
        let dev = labels(&[(PROJECT_LABEL, "shop"), (ENVIRONMENT_LABEL, "dev")]);
        assert!(
            check_access(
                "vault",
                &store,
                "shop-dev",
                &dev,
                &at("shop", Some("dev"), "api")
            )
            .is_ok()
        );
        let err = check_access(
            "vault",
            &store,
            "shop-dev",
            &dev,
            &at("shop", Some("prod"), "api"),
        )
        .unwrap_err();
        assert_eq!(err.category(), "AccessDenied");
        let msg = err.to_string();
        assert!(msg.contains(ENVIRONMENT_LABEL), "names the label: {msg}");
        assert!(msg.contains("not \"prod\""), "{msg}");
        assert!(
            msg.contains("environments [\"prod\"]"),
            "names the rule that admits it: {msg}"
        );
        // Any service of the admitted project and environment.
        assert!(
            check_access(
                "vault",
                &store,
                "shop-dev",
                &dev,
                &at("shop", Some("dev"), "web")
            )
            .is_ok()
        );
        // Unlabelled environment: every environment of the labelled project (documented).
        let shop = labels(&[(PROJECT_LABEL, "shop")]);
        assert!(
            check_access(
                "vault",
                &store,
                "shop",
                &shop,
                &at("shop", Some("prod"), "api")
            )
            .is_ok()
        );
    }

    /// Every combination of project, environment and service against one rule.
    #[test]
    fn a_rule_admits_a_request_only_when_project_environment_and_service_all_match() {
        let ns = labels(&[("team", "shop"), (ENVIRONMENT_LABEL, "dev")]);
        let unlabelled = labels(&[("team", "shop")]);
        let other_team = labels(&[("team", "bank")]);
        let mut open_env = rule(&[("team", "shop")], &["shop"]);
        open_env.environments = list(&["*"]);
        let mut listed = rule(&[("team", "shop")], &["shop"]);
        listed.environments = list(&["staging", "prod"]);
        listed.services = list(&["api"]);
        let default_env = rule(&[("team", "shop")], &["shop"]);
        // (rule, namespace labels, coordinates, admitted)
        let cases: Vec<(&AccessRule, &BTreeMap<String, String>, Coordinates, bool)> = vec![
            // environments omitted: the namespace's labelled environment only.
            (&default_env, &ns, at("shop", Some("dev"), "api"), true),
            (&default_env, &ns, at("shop", Some("prod"), "api"), false),
            (&default_env, &ns, at("shop", None, "api"), true),
            (
                &default_env,
                &unlabelled,
                at("shop", Some("dev"), "api"),
                false,
            ),
            (&default_env, &unlabelled, at("shop", None, "api"), true),
            (&default_env, &ns, at("bank", Some("dev"), "api"), false),
            // environments: ["*"] opens every environment; services omitted: every service.
            (&open_env, &ns, at("shop", Some("prod"), "web"), true),
            (
                &open_env,
                &unlabelled,
                at("shop", Some("prod"), "api"),
                true,
            ),
            (&open_env, &ns, at("bank", Some("prod"), "api"), false),
            // Listed environments and services, both must match.
            (&listed, &ns, at("shop", Some("prod"), "api"), true),
            (&listed, &ns, at("shop", Some("staging"), "api"), true),
            (&listed, &ns, at("shop", Some("dev"), "api"), false),
            (&listed, &ns, at("shop", Some("prod"), "web"), false),
            (&listed, &ns, at("shop", None, "api"), true),
            (&listed, &ns, at("shop", None, "web"), false),
            // A rule that does not select the namespace admits nothing.
            (
                &open_env,
                &other_team,
                at("shop", Some("dev"), "api"),
                false,
            ),
        ];
        for (i, (rule, ns_labels, coordinates, admitted)) in cases.into_iter().enumerate() {
            let store = cluster_store(vec![rule.clone()]);
            let result = check_access("vault", &store, "ns", ns_labels, &coordinates);
            assert_eq!(
                result.is_ok(),
                admitted,
                "case {i}: {coordinates} -> {result:?}"
            );
            if let Err(e) = result {
                assert_eq!(e.category(), "AccessDenied", "case {i}");
            }
        }
    }

    #[test]
    fn one_rule_must_admit_the_whole_request() {
        // One rule admits prod for web only, another every environment's api only: prod/api
        // is admitted by neither, even though each axis is admitted by some rule.
        let mut web_prod = rule(&[("team", "shop")], &["shop"]);
        web_prod.environments = list(&["prod"]);
        web_prod.services = list(&["web"]);
        let mut api_dev = rule(&[("team", "shop")], &["shop"]);
        api_dev.environments = list(&["dev"]);
        api_dev.services = list(&["api"]);
        let store = cluster_store(vec![web_prod, api_dev]);
        let ns = labels(&[("team", "shop")]);
        assert!(check_access("vault", &store, "ns", &ns, &at("shop", Some("prod"), "web")).is_ok());
        assert!(check_access("vault", &store, "ns", &ns, &at("shop", Some("dev"), "api")).is_ok());
        let err =
            check_access("vault", &store, "ns", &ns, &at("shop", Some("prod"), "api")).unwrap_err();
        // The closest rule (project and environment admitted) is the one named.
        assert!(err.to_string().contains("spec.access[0]"), "{err}");
    }

    #[test]
    fn refusals_say_which_rule_field_would_admit_the_request() {
        let ns = labels(&[("team", "shop"), (ENVIRONMENT_LABEL, "dev")]);
        let store = cluster_store(vec![rule(&[("team", "shop")], &["shop"])]);
        let err = check_access(
            "vault",
            &store,
            "shop-dev",
            &ns,
            &at("shop", Some("prod"), "api"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("spec.access[0]"), "{err}");
        assert!(err.contains("environments"), "{err}");
        assert!(err.contains("own environment \"dev\""), "{err}");
        let mut services = rule(&[("team", "shop")], &["shop"]);
        services.services = list(&["web"]);
        let store = cluster_store(vec![services]);
        let err = check_access(
            "vault",
            &store,
            "shop-dev",
            &ns,
            &at("shop", Some("dev"), "api"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not to service \"api\""), "{err}");
    }

    #[test]
    fn rules_admit_selected_namespaces_to_listed_projects_only() {
        let mut ops = rule(&[("team", "ops")], &["*"]);
        ops.environments = list(&["*"]);
        let store = cluster_store(vec![rule(&[("team", "shop")], &["shop"]), ops]);
        let shop = labels(&[("team", "shop")]);
        assert!(check_access("vault", &store, "ns", &shop, &at("shop", None, "api")).is_ok());
        let err = check_access("vault", &store, "ns", &shop, &at("bank", None, "api")).unwrap_err();
        assert!(
            err.to_string().contains("do not list project \"bank\""),
            "{err}"
        );
        let err = check_access(
            "vault",
            &store,
            "ns",
            &labels(&[("team", "other")]),
            &at("shop", None, "api"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("no spec.access rule"), "{err}");
        assert!(
            check_access(
                "vault",
                &store,
                "ns",
                &labels(&[("team", "ops")]),
                &at("anything", Some("prod"), "x")
            )
            .is_ok()
        );
        // The namespace's own project label grants nothing once rules exist.
        let err = check_access(
            "vault",
            &store,
            "ns",
            &labels(&[(PROJECT_LABEL, "bank")]),
            &at("bank", None, "api"),
        );
        assert!(err.is_err());
    }

    fn conn(auth: Auth) -> StoreConnection {
        StoreConnection {
            address: "http://vault:8200".into(),
            auth,
            ..Default::default()
        }
    }

    fn secret_ref(ns: Option<&str>) -> SecretKeyRef {
        SecretKeyRef {
            name: "vault-token".into(),
            key: "token".into(),
            namespace: ns.map(Into::into),
        }
    }

    #[test]
    fn a_vault_store_cannot_borrow_credentials_of_another_namespace() {
        let c = conn(Auth {
            token: Some(TokenAuth {
                secret_ref: secret_ref(Some("scoped-secrets")),
            }),
            ..Default::default()
        });
        let err =
            auth_plan(StoreKind::VaultStore, "s", Some("shop-dev"), &c, "shop-dev").unwrap_err();
        assert_eq!(err.category(), "InvalidStore");
        let c = conn(Auth {
            token: Some(TokenAuth {
                secret_ref: secret_ref(None),
            }),
            ..Default::default()
        });
        let plan = auth_plan(StoreKind::VaultStore, "s", Some("shop-dev"), &c, "shop-dev").unwrap();
        assert_eq!(
            plan,
            AuthPlan::Token {
                token: SecretKeyLocation {
                    namespace: "shop-dev".into(),
                    name: "vault-token".into(),
                    key: "token".into()
                }
            }
        );
        let c = conn(Auth {
            kubernetes: Some(KubernetesAuth {
                role: "r".into(),
                service_account: ServiceAccountRef {
                    name: "sa".into(),
                    namespace: Some("kube-system".into()),
                },
                ..Default::default()
            }),
            ..Default::default()
        });
        assert!(auth_plan(StoreKind::VaultStore, "s", Some("shop-dev"), &c, "shop-dev").is_err());
    }

    #[test]
    fn kubernetes_auth_defaults_to_the_requesting_namespace() {
        let c = conn(Auth {
            kubernetes: Some(KubernetesAuth {
                role: "scoped-secrets".into(),
                service_account: ServiceAccountRef {
                    name: "scoped-secrets".into(),
                    namespace: None,
                },
                ..Default::default()
            }),
            ..Default::default()
        });
        let plan = auth_plan(StoreKind::ClusterVaultStore, "vault", None, &c, "shop-dev").unwrap();
        assert_eq!(
            plan,
            AuthPlan::Kubernetes {
                mount: "kubernetes".into(),
                role: "scoped-secrets".into(),
                audience: "vault".into(),
                service_account_namespace: "shop-dev".into(),
                service_account: "scoped-secrets".into(),
            }
        );
    }

    #[test]
    fn cluster_store_credentials_need_a_namespace_and_exactly_one_method() {
        let c = conn(Auth {
            token: Some(TokenAuth {
                secret_ref: secret_ref(None),
            }),
            ..Default::default()
        });
        let err = auth_plan(StoreKind::ClusterVaultStore, "vault", None, &c, "x").unwrap_err();
        assert!(err.to_string().contains("namespace is required"), "{err}");
        let err = auth_plan(
            StoreKind::ClusterVaultStore,
            "vault",
            None,
            &conn(Auth::default()),
            "x",
        )
        .unwrap_err();
        assert!(err.to_string().contains("exactly one"), "{err}");
    }

    #[test]
    fn a_store_timeout_above_30s_is_refused_naming_the_field_and_the_limit() {
        let with_timeout = |t: &str| StoreConnection {
            timeout: Some(t.into()),
            ..conn(Auth::default())
        };
        for ok in ["30s", "29s999ms", "500ms"] {
            let (_, timeout) =
                layout_and_timeout(StoreKind::VaultStore, "s", &with_timeout(ok)).unwrap();
            assert!(timeout <= MAX_VAULT_TIMEOUT, "{ok}");
        }
        for too_long in ["31s", "30s1ms", "1m", "1h"] {
            let err = layout_and_timeout(
                StoreKind::ClusterVaultStore,
                "vault",
                &with_timeout(too_long),
            )
            .unwrap_err();
            assert_eq!(err.category(), "InvalidStore");
            let msg = err.to_string();
            assert!(
                msg.contains("ClusterVaultStore vault: spec.timeout")
                    && msg.contains(too_long)
                    && msg.contains("limit of 30s"),
                "{msg}"
            );
        }
        let (_, default) =
            layout_and_timeout(StoreKind::VaultStore, "s", &conn(Auth::default())).unwrap();
        assert_eq!(default, DEFAULT_VAULT_TIMEOUT);
    }

    #[test]
    fn the_crd_schema_caps_the_store_timeout_at_the_same_limit() {
        use kube::CustomResourceExt;
        let rule = format!(
            "duration(self) <= duration('{}s')",
            MAX_VAULT_TIMEOUT.as_secs()
        );
        for crd in [VaultStore::crd(), ClusterVaultStore::crd()] {
            let crd = serde_json::to_value(crd).unwrap();
            let timeout = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
                ["properties"]["timeout"];
            assert_eq!(
                timeout["x-kubernetes-validations"][0]["rule"], rule,
                "{timeout}"
            );
        }
    }
}
