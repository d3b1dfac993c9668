//! An in-memory Kubernetes API server for reconcile tests, behind a real `kube::Client`.
//!
//! The operator's code runs unchanged — typed `Api<K>` calls, server-side apply, the status
//! subresource, events, TokenRequests — against a store of JSON objects, and every request is
//! recorded so tests can assert the exact writes (and that there were none).
//!
//! Modelled: get / list (label and field selectors) / create / replace / delete; patches of
//! type server-side apply (single-manager semantics: fields a manager applied before and no
//! longer applies are removed, arrays are atomic, an unchanged object keeps its
//! resourceVersion), JSON merge and strategic merge (treated as merge); the `status`
//! subresource (writes there change only `status`, writes to the main resource never change
//! `status` of a resource that has the subresource); `metadata.generation` bumped only by
//! changes outside metadata and status; `uid`, `resourceVersion`, `creationTimestamp`;
//! TokenRequest; injected failures; discovery of the API groups registered with
//! `serve_group` (any other discovery path answers 404, as for a CRD not installed).
//! Not modelled: watches (answered 405), garbage collection, finalizers, admission,
//! field-manager conflicts (every apply acts as forced), dry-run.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use kube::client::Body;
use serde_json::{Map, Value, json};

/// One recorded request.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: Option<String>,
    pub body: Option<Value>,
}

type Key = (String, Option<String>, String, String);

#[derive(Default)]
struct State {
    objects: BTreeMap<Key, Value>,
    /// Last object each field manager applied, per object.
    applied: BTreeMap<(Key, String), Value>,
    requests: Vec<Recorded>,
    failures: VecDeque<(String, String, u16)>,
    counter: u64,
    /// Discovery documents served at `/apis/<group>/<version>`, by group-version.
    groups: BTreeMap<String, Value>,
}

/// The fake API server. Clones share one store.
#[derive(Clone, Default)]
pub struct FakeKube {
    state: Arc<Mutex<State>>,
}

/// Resources with a `status` subresource: writes to the main resource leave status alone.
const WITH_STATUS: [&str; 7] = [
    "scopedsecrets",
    "deployments",
    "statefulsets",
    "daemonsets",
    "namespaces",
    "vaultstores",
    "rollouts",
];

impl FakeKube {
    pub fn new() -> Self {
        Self::default()
    }

    /// A kube client whose requests this fake answers. Must be called inside a Tokio runtime.
    pub fn client(&self) -> kube::Client {
        let fake = self.clone();
        let service = tower::service_fn(move |req: Request<Body>| {
            let fake = fake.clone();
            async move { Ok::<_, Infallible>(fake.handle(req).await) }
        });
        kube::Client::new(service, "default")
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Every request that is not a GET.
    pub fn writes(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.method != "GET")
            .collect()
    }

    /// Writes to one resource type (by plural, e.g. `secrets`, `scopedsecrets`, `events`).
    pub fn writes_to(&self, plural: &str) -> Vec<Recorded> {
        self.writes()
            .into_iter()
            .filter(|r| parse_path(&r.path).is_some_and(|p| p.plural == plural))
            .collect()
    }

    pub fn clear_requests(&self) {
        self.state.lock().unwrap().requests.clear();
    }

    /// The next request whose method matches and whose path contains `path_contains` answers
    /// `status`. Queue several for several failures.
    pub fn fail_next(&self, method: &str, path_contains: &str, status: u16) {
        self.state.lock().unwrap().failures.push_back((
            method.to_string(),
            path_contains.to_string(),
            status,
        ));
    }

    /// Serves discovery for `group_version` (e.g. `argoproj.io/v1alpha1`) listing namespaced
    /// resources `(plural, kind)`, as when a CRD of that group is installed.
    pub fn serve_group(&self, group_version: &str, resources: &[(&str, &str)]) {
        let resources: Vec<Value> = resources
            .iter()
            .map(|(plural, kind)| {
                json!({"name": plural, "singularName": "", "namespaced": true, "kind": kind,
                       "verbs": ["get", "list", "watch", "patch"]})
            })
            .collect();
        self.state.lock().unwrap().groups.insert(
            group_version.to_string(),
            json!({"kind": "APIResourceList", "apiVersion": "v1",
                   "groupVersion": group_version, "resources": resources}),
        );
    }

    /// Stores an object directly (not recorded), as the API server would after a create or
    /// replace: server fields are filled in, status is kept as given.
    pub fn insert(&self, obj: Value) -> Value {
        let key = key_of(&obj);
        let mut state = self.state.lock().unwrap();
        let existing = state.objects.get(&key).cloned();
        state.store(key, obj, existing.as_ref(), false)
    }

    pub fn get(&self, prefix: &str, ns: Option<&str>, plural: &str, name: &str) -> Option<Value> {
        let key = (
            prefix.to_string(),
            ns.map(String::from),
            plural.to_string(),
            name.to_string(),
        );
        self.state.lock().unwrap().objects.get(&key).cloned()
    }

    pub fn remove(
        &self,
        prefix: &str,
        ns: Option<&str>,
        plural: &str,
        name: &str,
    ) -> Option<Value> {
        let key = (
            prefix.to_string(),
            ns.map(String::from),
            plural.to_string(),
            name.to_string(),
        );
        self.state.lock().unwrap().objects.remove(&key)
    }

    pub fn get_typed<K>(&self, ns: Option<&str>, name: &str) -> Option<K>
    where
        K: kube::Resource<DynamicType = ()> + serde::de::DeserializeOwned,
    {
        let api_version = K::api_version(&());
        let prefix = if api_version.contains('/') {
            format!("apis/{api_version}")
        } else {
            format!("api/{api_version}")
        };
        self.get(&prefix, ns, &K::plural(&()), name)
            .map(|v| serde_json::from_value(v).expect("stored object deserialises"))
    }

    /// Objects of one resource type, all namespaces.
    pub fn list_values(&self, plural: &str) -> Vec<Value> {
        let state = self.state.lock().unwrap();
        state
            .objects
            .iter()
            .filter(|(k, _)| k.2 == plural)
            .map(|(_, v)| v.clone())
            .collect()
    }

    async fn handle(&self, req: Request<Body>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let bytes = body.collect_bytes().await.unwrap_or_default();
        let body: Option<Value> = if bytes.is_empty() {
            None
        } else {
            serde_json::from_slice(&bytes).ok()
        };
        let method = parts.method.as_str().to_string();
        let path = parts.uri.path().to_string();
        let query = parts.uri.query().unwrap_or("").to_string();
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let mut state = self.state.lock().unwrap();
        state.requests.push(Recorded {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            content_type: content_type.clone(),
            body: body.clone(),
        });
        if let Some(i) = state
            .failures
            .iter()
            .position(|(m, p, _)| *m == method && path.contains(p.as_str()))
        {
            let (_, _, code) = state.failures.remove(i).unwrap();
            return status_response(code, "injected failure");
        }
        if method == "GET"
            && let Some(doc) = path
                .strip_prefix("/apis/")
                .and_then(|gv| state.groups.get(gv.trim_end_matches('/')))
        {
            return respond(200, &doc.clone());
        }
        let Some(p) = parse_path(&path) else {
            return status_response(404, &format!("no such path {path}"));
        };
        let params = parse_query(&query);
        if params.get("watch").map(String::as_str) == Some("true") {
            return status_response(405, "watches are not modelled by the fake");
        }
        state.dispatch(&method, p, &params, content_type.as_deref(), body)
    }
}

struct Path {
    prefix: String,
    ns: Option<String>,
    plural: String,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_path(path: &str) -> Option<Path> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match *segs.first()? {
        "api" => (format!("api/{}", segs.get(1)?), &segs[2..]),
        "apis" => (
            format!("apis/{}/{}", segs.get(1)?, segs.get(2)?),
            &segs[3..],
        ),
        _ => return None,
    };
    let (ns, rest) = if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        (Some(rest[1].to_string()), &rest[2..])
    } else {
        (None, rest)
    };
    Some(Path {
        prefix,
        ns,
        plural: rest.first()?.to_string(),
        name: rest.get(1).map(|s| s.to_string()),
        sub: rest.get(2).map(|s| s.to_string()),
    })
}

fn parse_query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Derives the storage key of an object from its apiVersion, kind, namespace and name.
fn key_of(obj: &Value) -> Key {
    let api_version = obj["apiVersion"].as_str().expect("object has apiVersion");
    let kind = obj["kind"].as_str().expect("object has kind");
    let prefix = if api_version.contains('/') {
        format!("apis/{api_version}")
    } else {
        format!("api/{api_version}")
    };
    let plural = match kind {
        "Namespace" => "namespaces".to_string(),
        "Secret" => "secrets".to_string(),
        "ServiceAccount" => "serviceaccounts".to_string(),
        "ConfigMap" => "configmaps".to_string(),
        "Event" => "events".to_string(),
        "Deployment" => "deployments".to_string(),
        "StatefulSet" => "statefulsets".to_string(),
        "DaemonSet" => "daemonsets".to_string(),
        "Lease" => "leases".to_string(),
        "ScopedSecret" => "scopedsecrets".to_string(),
        "VaultStore" => "vaultstores".to_string(),
        "ClusterVaultStore" => "clustervaultstores".to_string(),
        other => format!("{}s", other.to_lowercase()),
    };
    let ns = obj["metadata"]["namespace"].as_str().map(String::from);
    let name = obj["metadata"]["name"]
        .as_str()
        .expect("object has a name")
        .to_string();
    (prefix, ns, plural, name)
}

fn status_response(code: u16, message: &str) -> Response<Full<Bytes>> {
    let reason = match code {
        400 => "BadRequest",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        422 => "Invalid",
        503 => "ServiceUnavailable",
        _ => "InternalError",
    };
    respond(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}),
    )
}

fn respond(code: u16, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// Leaf paths of a JSON value (maps recurse, everything else is a leaf).
fn leaves(v: &Value, prefix: &mut Vec<String>, out: &mut BTreeSet<Vec<String>>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, sub) in m {
                prefix.push(k.clone());
                leaves(sub, prefix, out);
                prefix.pop();
            }
        }
        _ => {
            out.insert(prefix.clone());
        }
    }
}

fn remove_path(v: &mut Value, path: &[String]) {
    if path.is_empty() {
        return;
    }
    if let Some(m) = v.as_object_mut() {
        if path.len() == 1 {
            m.remove(&path[0]);
        } else if let Some(sub) = m.get_mut(&path[0]) {
            remove_path(sub, &path[1..]);
            if sub.as_object().is_some_and(|o| o.is_empty()) {
                m.remove(&path[0]);
            }
        }
    }
}

fn spec_part(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    v
}

impl State {
    /// Stores `obj` under `key`, filling server fields; bumps resourceVersion only on change.
    fn store(
        &mut self,
        key: Key,
        mut obj: Value,
        existing: Option<&Value>,
        keep_existing_status: bool,
    ) -> Value {
        if keep_existing_status && WITH_STATUS.contains(&key.2.as_str()) {
            match existing.and_then(|e| e.get("status")) {
                Some(s) => obj["status"] = s.clone(),
                None => {
                    if let Some(m) = obj.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        let meta = obj["metadata"]
            .as_object_mut()
            .expect("metadata is an object");
        if let Some(ns) = &key.1 {
            meta.insert("namespace".into(), json!(ns));
        }
        meta.insert("name".into(), json!(key.3));
        match existing {
            Some(old) => {
                for f in ["uid", "creationTimestamp", "resourceVersion", "generation"] {
                    if let Some(v) = old["metadata"].get(f) {
                        meta.insert(f.into(), v.clone());
                    }
                }
                let changed = &obj != old;
                if changed {
                    self.counter += 1;
                    obj["metadata"]["resourceVersion"] = json!(self.counter.to_string());
                    if spec_part(&obj) != spec_part(old) {
                        let g = old["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
                        obj["metadata"]["generation"] = json!(g);
                    }
                }
            }
            None => {
                self.counter += 1;
                meta.insert("uid".into(), json!(format!("uid-{}", self.counter)));
                meta.insert("resourceVersion".into(), json!(self.counter.to_string()));
                meta.insert("creationTimestamp".into(), json!("2026-01-01T00:00:00Z"));
                meta.insert("generation".into(), json!(1));
            }
        }
        self.objects.insert(key, obj.clone());
        obj
    }

    fn dispatch(
        &mut self,
        method: &str,
        p: Path,
        params: &BTreeMap<String, String>,
        content_type: Option<&str>,
        body: Option<Value>,
    ) -> Response<Full<Bytes>> {
        let Some(name) = p.name.clone() else {
            return match method {
                "GET" => self.list(&p, params),
                "POST" => self.create(&p, body.unwrap_or(Value::Null)),
                _ => status_response(405, "collection verb not modelled"),
            };
        };
        let key: Key = (
            p.prefix.clone(),
            p.ns.clone(),
            p.plural.clone(),
            name.clone(),
        );
        if p.sub.as_deref() == Some("token") && p.plural == "serviceaccounts" && method == "POST" {
            return self.token_request(&key, body.unwrap_or(Value::Null));
        }
        let existing = self.objects.get(&key).cloned();
        let on_status = p.sub.as_deref() == Some("status");
        match method {
            "GET" => match existing {
                Some(obj) => respond(200, &obj),
                None => status_response(404, &format!("{} \"{name}\" not found", p.plural)),
            },
            "DELETE" => match self.objects.remove(&key) {
                Some(obj) => respond(200, &obj),
                None => status_response(404, &format!("{} \"{name}\" not found", p.plural)),
            },
            "PUT" => {
                let Some(old) = existing else {
                    return status_response(404, &format!("{} \"{name}\" not found", p.plural));
                };
                let mut new = body.unwrap_or(Value::Null);
                if let Some(rv) = new["metadata"]["resourceVersion"].as_str()
                    && Some(rv) != old["metadata"]["resourceVersion"].as_str()
                {
                    return status_response(409, "the object has been modified");
                }
                if on_status {
                    let mut obj = old.clone();
                    obj["status"] = new["status"].take();
                    let stored = self.store(key, obj, Some(&old), false);
                    return respond(200, &stored);
                }
                let stored = self.store(key, new, Some(&old), true);
                respond(200, &stored)
            }
            "PATCH" => {
                let patch = body.unwrap_or(Value::Null);
                let is_apply =
                    content_type.is_some_and(|c| c.starts_with("application/apply-patch"));
                if existing.is_none() && !is_apply {
                    return status_response(404, &format!("{} \"{name}\" not found", p.plural));
                }
                let manager = params.get("fieldManager").cloned().unwrap_or_default();
                let created = existing.is_none();
                let base = existing.clone().unwrap_or_else(|| {
                    json!({"apiVersion": patch["apiVersion"], "kind": patch["kind"], "metadata": {"name": name}})
                });
                let mut obj = base.clone();
                // The part of the object this write may touch.
                let scoped = |v: &Value| -> Value {
                    if on_status {
                        json!({"status": v.get("status").cloned().unwrap_or(Value::Null)})
                    } else {
                        v.clone()
                    }
                };
                let patch = scoped(&patch);
                if is_apply {
                    let apply_key = (
                        key.clone(),
                        format!("{manager}{}", if on_status { "/status" } else { "" }),
                    );
                    let mut before = BTreeSet::new();
                    if let Some(prev) = self.applied.get(&apply_key) {
                        leaves(prev, &mut Vec::new(), &mut before);
                    }
                    let mut now = BTreeSet::new();
                    leaves(&patch, &mut Vec::new(), &mut now);
                    for gone in before.difference(&now) {
                        if gone.first().map(String::as_str) != Some("apiVersion")
                            && gone.first().map(String::as_str) != Some("kind")
                        {
                            remove_path(&mut obj, gone);
                        }
                    }
                    let mut clean = patch.clone();
                    strip_nulls(&mut clean);
                    merge_patch(&mut obj, &clean);
                    self.applied.insert(apply_key, patch);
                } else if content_type.is_some_and(|c| c.contains("json-patch")) {
                    return status_response(415, "json-patch is not modelled by the fake");
                } else {
                    // A resourceVersion in a merge patch is a precondition, as on the API
                    // server: a patch computed from an older read fails with 409.
                    if let (Some(want), Some(old)) = (
                        patch["metadata"]["resourceVersion"].as_str(),
                        existing.as_ref(),
                    ) && Some(want) != old["metadata"]["resourceVersion"].as_str()
                    {
                        return status_response(409, "the object has been modified");
                    }
                    merge_patch(&mut obj, &patch);
                }
                let stored = if on_status {
                    let mut full = base.clone();
                    full["status"] = obj.get("status").cloned().unwrap_or(Value::Null);
                    if full["status"].is_null() {
                        full.as_object_mut().unwrap().remove("status");
                    }
                    self.store(key, full, Some(&base), false)
                } else {
                    self.store(key, obj, existing.as_ref(), true)
                };
                respond(if created { 201 } else { 200 }, &stored)
            }
            _ => status_response(405, "verb not modelled"),
        }
    }

    fn create(&mut self, p: &Path, mut obj: Value) -> Response<Full<Bytes>> {
        if let Some(ns) = &p.ns {
            obj["metadata"]["namespace"] = json!(ns);
        }
        if obj["metadata"]["name"].as_str().is_none() {
            let base = obj["metadata"]["generateName"]
                .as_str()
                .unwrap_or("obj-")
                .to_string();
            self.counter += 1;
            obj["metadata"]["name"] = json!(format!("{base}{:05x}", self.counter));
        }
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        let key: Key = (
            p.prefix.clone(),
            p.ns.clone(),
            p.plural.clone(),
            name.clone(),
        );
        if self.objects.contains_key(&key) {
            return status_response(409, &format!("{} \"{name}\" already exists", p.plural));
        }
        let stored = self.store(key, obj, None, false);
        respond(201, &stored)
    }

    fn list(&self, p: &Path, params: &BTreeMap<String, String>) -> Response<Full<Bytes>> {
        let labels = params.get("labelSelector").cloned().unwrap_or_default();
        let fields = params.get("fieldSelector").cloned().unwrap_or_default();
        let items: Vec<Value> = self
            .objects
            .iter()
            .filter(|(k, _)| k.0 == p.prefix && k.2 == p.plural && (p.ns.is_none() || k.1 == p.ns))
            .map(|(_, v)| v.clone())
            .filter(|v| label_match(&labels, &v["metadata"]["labels"]) && field_match(&fields, v))
            .collect();
        respond(
            200,
            &json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": self.counter.to_string()}, "items": items}),
        )
    }

    fn token_request(&mut self, key: &Key, body: Value) -> Response<Full<Bytes>> {
        let sa_key = (
            "api/v1".to_string(),
            key.1.clone(),
            "serviceaccounts".to_string(),
            key.3.clone(),
        );
        if !self.objects.contains_key(&sa_key) {
            return status_response(404, &format!("serviceaccounts \"{}\" not found", key.3));
        }
        self.counter += 1;
        let audiences = body["spec"]["audiences"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        let mut out = body.clone();
        out["status"] = json!({
            "token": format!("fake-sa-token:{}:{}:{audiences}:{}", key.1.as_deref().unwrap_or(""), key.3, self.counter),
            "expirationTimestamp": "2099-01-01T00:00:00Z"
        });
        respond(201, &out)
    }
}

fn strip_nulls(v: &mut Value) {
    if let Some(m) = v.as_object_mut() {
        m.retain(|_, v| !v.is_null());
        for sub in m.values_mut() {
            strip_nulls(sub);
        }
    }
}

fn label_match(selector: &str, labels: &Value) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            labels[k.trim()].as_str() != Some(v.trim())
        } else if let Some((k, v)) = term.split_once('=') {
            labels[k.trim().trim_end_matches('=')].as_str() == Some(v.trim())
        } else if let Some(k) = term.strip_prefix('!') {
            labels.get(k.trim()).is_none()
        } else {
            labels.get(term.trim()).is_some()
        }
    })
}

fn field_match(selector: &str, obj: &Value) -> bool {
    selector
        .split(',')
        .filter(|s| !s.is_empty())
        .all(|term| match term.split_once('=') {
            Some(("metadata.name", v)) => obj["metadata"]["name"].as_str() == Some(v),
            Some(("metadata.namespace", v)) => obj["metadata"]["namespace"].as_str() == Some(v),
            _ => true,
        })
}
