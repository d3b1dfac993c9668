//! An in-memory Kubernetes API server for tests, behind a real `kube::Client` (in process) or
//! served over HTTP/1.1 on TCP ([`FakeKube::serve_tcp`], for a client in another process).
//!
//! The operator's code runs unchanged — typed `Api<K>` calls, kube-runtime's watchers,
//! reflectors and `Controller`, server-side apply, the status subresource, events,
//! TokenRequests — against a store of JSON objects, and every request is recorded so tests
//! can assert the exact calls and writes (and that there were none).
//!
//! Modelled:
//! - get / list (label and field selectors, `limit` + `continue` pages, the collection's
//!   resourceVersion) / create / replace / delete;
//! - watches as the API server streams them: newline-separated `{"type", "object"}` events in
//!   a chunked body; `resourceVersion=N` replays the events after N from a bounded history per
//!   resource type, then streams live ones; an N older than the history is an `ERROR` event
//!   carrying a 410 `Expired` Status ([`FakeKube::compact`] forces it); `resourceVersion` 0 or
//!   empty, or `sendInitialEvents=true`, starts with the current objects (and, with bookmarks,
//!   the `k8s.io/initial-events-end` bookmark); `allowWatchBookmarks` sends a BOOKMARK every
//!   [`FakeKube::bookmark_interval`] and one when `timeoutSeconds` ends the stream; an object
//!   that starts or stops matching a watch's selectors arrives as ADDED or DELETED;
//! - metadata-only requests (`Accept: …;as=PartialObjectMetadata[List]`) for get, list and
//!   watch answer `PartialObjectMetadata` objects: no data or spec reaches the client;
//! - server-side apply with per-manager field ownership, shown in `metadata.managedFields`
//!   (`fieldsV1`, operation `Apply`/`Update`): fields a manager applied before and no longer
//!   applies are removed unless another manager owns them; changing a field another manager
//!   owns is a 409 `Conflict` naming the field and manager, unless forced (then ownership
//!   moves); create, replace and merge patches give the fields they change to their
//!   `fieldManager` (default `unknown`); arrays are atomic (one field); an unchanged object
//!   keeps its resourceVersion;
//! - JSON merge and strategic merge patches (treated as merge); a `resourceVersion` in a
//!   replace, merge patch or apply (status subresource included) is a precondition (409 when
//!   stale);
//! - the `status` subresource (writes there change only `status`; writes to the main resource
//!   never change `status` of a resource that has the subresource);
//! - `metadata.generation` bumped only by changes outside metadata and status; `uid`,
//!   `resourceVersion` (one counter for the whole store), `creationTimestamp`;
//! - garbage collection by owner reference (background propagation): deleting an object
//!   deletes, recursively, every object whose owner references all name missing uids;
//! - TokenRequest; injected failures ([`FakeKube::fail_next`]); discovery of the API groups
//!   registered with [`FakeKube::serve_group`] (any other discovery path answers 404, as for
//!   a CRD not installed).
//!
//! Not modelled: finalizers and `deletionTimestamp` (a delete removes at once), foreground
//! or orphan propagation, admission and validation, associative lists in field ownership
//! (`k:` keys), JSON patches (415), dry-run, authentication and RBAC.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

/// Body of the fake's responses: whole JSON documents, or a watch's event stream.
pub type FakeBody = UnsyncBoxBody<Bytes, Infallible>;

/// One recorded request.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: Option<String>,
    /// The JSON body, unless [`FakeKube::record_bodies`] turned recording off.
    pub body: Option<Value>,
}

impl Recorded {
    /// The API verb: `watch`, `list`, `get`, `create`, `update`, `patch`, `delete` (and
    /// `discovery` for a GET of an API group).
    pub fn verb(&self) -> &'static str {
        let Some(path) = parse_path(&self.path) else {
            return "discovery";
        };
        let is_collection = path.name.is_none();
        let query = parse_query(&self.query);
        match self.method.as_str() {
            "GET" if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) => {
                "watch"
            }
            "GET" if is_collection => "list",
            "GET" => "get",
            "POST" => "create",
            "PUT" => "update",
            "PATCH" => "patch",
            "DELETE" => "delete",
            _ => "other",
        }
    }
}

/// Storage key: API prefix (`api/v1`, `apis/<group>/<version>`), namespace, plural, name.
type Key = (String, Option<String>, String, String);
/// A resource type: API prefix and plural.
type Res = (String, String);
/// A field path in an object (map keys; arrays are leaves).
type FieldPath = Vec<String>;

/// Who owns fields of an object: field manager, operation (`Apply` or `Update`), and
/// whether the writes went through the status subresource.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Owner {
    manager: String,
    operation: &'static str,
    status: bool,
}

/// One change of one object, as kept in the history and sent to watchers.
struct Change {
    rv: u64,
    kind: &'static str,
    object: Value,
    /// The object before a modification: which watches it matched decides ADDED / DELETED.
    previous: Option<Value>,
}

/// One open watch.
struct Watcher {
    ns: Option<String>,
    labels: String,
    fields: String,
    meta_only: bool,
    tx: mpsc::UnboundedSender<Bytes>,
}

impl Watcher {
    fn matches(&self, obj: &Value) -> bool {
        (self.ns.is_none() || obj["metadata"]["namespace"].as_str() == self.ns.as_deref())
            && label_match(&self.labels, &obj["metadata"]["labels"])
            && field_match(&self.fields, obj)
    }

    /// The event this watcher sees for `change`, if any: an object leaving the selection is
    /// DELETED, one entering it is ADDED, as with the API server.
    fn line(&self, change: &Change) -> Option<Bytes> {
        let now = self.matches(&change.object);
        let before = change.previous.as_ref().is_some_and(|p| self.matches(p));
        let kind = match (change.kind, before, now) {
            ("MODIFIED", true, true) => "MODIFIED",
            ("MODIFIED", false, true) | ("ADDED", _, true) => "ADDED",
            ("MODIFIED", true, false) | ("DELETED", _, true) => "DELETED",
            _ => return None,
        };
        Some(event_line(kind, &change.object, self.meta_only))
    }
}

fn event_line(kind: &str, object: &Value, meta_only: bool) -> Bytes {
    let object = if meta_only {
        partial_metadata(object)
    } else {
        object.clone()
    };
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// The `PartialObjectMetadata` form of an object: its metadata only.
fn partial_metadata(obj: &Value) -> Value {
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
           "metadata": obj["metadata"]})
}

struct State {
    objects: BTreeMap<Key, Value>,
    /// Field ownership per object.
    owners: BTreeMap<Key, BTreeMap<Owner, BTreeSet<FieldPath>>>,
    requests: Vec<Recorded>,
    record_bodies: bool,
    failures: VecDeque<(String, String, u16)>,
    counter: u64,
    /// Discovery documents served at `/apis/<group>/<version>`, by group-version.
    groups: BTreeMap<String, Value>,
    /// Recent changes per resource type, oldest first, at most `history_limit` each.
    history: HashMap<Res, VecDeque<Change>>,
    history_limit: usize,
    /// Per resource type, the newest resourceVersion dropped from its history: a watch from
    /// an older one cannot be served (410).
    compacted: HashMap<Res, u64>,
    /// Every resourceVersion up to this one was dropped from every history by `compact`.
    compacted_all: u64,
    watchers: HashMap<Res, Vec<Watcher>>,
    bookmark_interval: Duration,
    /// Per resource type (plural), how late its watch events arrive ([`FakeKube::delay_watch`]).
    watch_delays: HashMap<String, Duration>,
    /// Uids of the stored objects, and per uid the objects naming it as an owner: what the
    /// garbage collector looks at when it is deleted.
    uids: HashSet<String>,
    dependents: HashMap<String, BTreeSet<Key>>,
}

impl Default for State {
    fn default() -> Self {
        State {
            objects: BTreeMap::new(),
            owners: BTreeMap::new(),
            requests: Vec::new(),
            record_bodies: true,
            failures: VecDeque::new(),
            // As etcd's revisions, never 0: a list's resourceVersion "0" would mean "any".
            counter: 1,
            groups: BTreeMap::new(),
            history: HashMap::new(),
            history_limit: 1000,
            compacted: HashMap::new(),
            compacted_all: 0,
            watchers: HashMap::new(),
            bookmark_interval: Duration::from_secs(1),
            watch_delays: HashMap::new(),
            uids: HashSet::new(),
            dependents: HashMap::new(),
        }
    }
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
        let service = tower::service_fn(move |req: Request<kube::client::Body>| {
            let fake = fake.clone();
            async move { Ok::<_, Infallible>(fake.handle(req).await) }
        });
        kube::Client::new(service, "default")
    }

    /// Serves the API on `listener` over plain HTTP/1.1 until the future is dropped, so that
    /// a `kube::Client` configured with `cluster_url = http://<address>` (another process,
    /// as the scale bench runs it) works against it.
    pub async fn serve_tcp(&self, listener: std::net::TcpListener) -> std::io::Result<()> {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let fake = self.clone();
        let app = axum::Router::new().fallback_service(tower::service_fn(
            move |req: axum::extract::Request| {
                let fake = fake.clone();
                async move {
                    Ok::<_, Infallible>(fake.handle(req).await.map(axum::body::Body::new))
                }
            },
        ));
        axum::serve(listener, app).await
    }

    /// A kube client reaching the fake over TCP at `addr` (what another process would build).
    pub fn tcp_client(addr: std::net::SocketAddr) -> kube::Client {
        let config = kube::Config::new(format!("http://{addr}").parse().expect("a URL"));
        kube::Client::try_from(config).expect("a client for the fake")
    }

    /// Whether request bodies are kept in the request log (on by default). Off for runs with
    /// thousands of objects, where the log would hold every object written.
    pub fn record_bodies(&self, on: bool) {
        self.state.lock().unwrap().record_bodies = on;
    }

    /// Changes kept per resource type for watches to resume from (1,000 by default).
    pub fn history_limit(&self, limit: usize) {
        self.state.lock().unwrap().history_limit = limit;
    }

    /// How often watches with `allowWatchBookmarks=true` get a BOOKMARK (1 s by default).
    pub fn bookmark_interval(&self, every: Duration) {
        self.state.lock().unwrap().bookmark_interval = every;
    }

    /// Watches of `plural` opened from now on deliver each event `delay` after it happened
    /// (in order), as a loaded API server or a slow network does: a client's cache then lags
    /// the writes it made itself.
    pub fn delay_watch(&self, plural: &str, delay: Duration) {
        self.state
            .lock()
            .unwrap()
            .watch_delays
            .insert(plural.to_string(), delay);
    }

    /// Drops the whole event history, as an etcd compaction does: a watch resuming from a
    /// resourceVersion before now gets 410 Expired (and kube's watcher lists again).
    pub fn compact(&self) {
        let mut state = self.state.lock().unwrap();
        state.history.clear();
        state.compacted_all = state.counter;
    }

    /// Ends every open watch, as an API server restart does (watchers resume from their last
    /// resourceVersion).
    pub fn close_watches(&self) {
        self.state.lock().unwrap().watchers.clear();
    }

    /// Open watches (all resource types).
    pub fn open_watches(&self) -> usize {
        let mut state = self.state.lock().unwrap();
        for ws in state.watchers.values_mut() {
            ws.retain(|w| !w.tx.is_closed());
        }
        state.watchers.values().map(Vec::len).sum()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Recorded requests per verb (`watch`, `list`, `get`, `create`, `update`, `patch`,
    /// `delete`), optionally only those to one resource type (plural).
    pub fn count_by_verb(&self, plural: Option<&str>) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        for r in self.state.lock().unwrap().requests.iter() {
            if plural.is_some_and(|pl| parse_path(&r.path).is_none_or(|p| p.plural != pl)) {
                continue;
            }
            *counts.entry(r.verb()).or_default() += 1;
        }
        counts
    }

    /// Recorded requests per verb and resource, keyed `"<verb> <plural>[/<subresource>]"`
    /// (`"patch scopedsecrets/status"`, `"get secrets"`), so a count says what was asked of what.
    pub fn count_by_verb_and_resource(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for r in self.state.lock().unwrap().requests.iter() {
            let resource = match parse_path(&r.path) {
                Some(Path {
                    plural,
                    sub: Some(sub),
                    ..
                }) => format!("{plural}/{sub}"),
                Some(p) => p.plural,
                None => r.path.clone(),
            };
            *counts
                .entry(format!("{} {resource}", r.verb()))
                .or_default() += 1;
        }
        counts
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

    /// Stores an object directly (not recorded, no field manager), as the API server would
    /// after a create or replace: server fields are filled in, status is kept as given, and
    /// watches see the change.
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

    /// Deletes an object directly (not recorded): watches see it, and what it owned is
    /// garbage-collected.
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
        self.state.lock().unwrap().delete(&key)
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

    async fn handle<B>(&self, req: Request<B>) -> Response<FakeBody>
    where
        B: http_body::Body,
    {
        let (parts, body) = req.into_parts();
        let bytes = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => Bytes::new(),
        };
        let body: Option<Value> = if bytes.is_empty() {
            None
        } else {
            serde_json::from_slice(&bytes).ok()
        };
        let method = parts.method.as_str().to_string();
        let path = parts.uri.path().to_string();
        let query = parts.uri.query().unwrap_or("").to_string();
        let header = |name: http::header::HeaderName| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        };
        let content_type = header(http::header::CONTENT_TYPE);
        let accept = header(http::header::ACCEPT).unwrap_or_default();
        let mut state = self.state.lock().unwrap();
        let recorded_body = if state.record_bodies {
            body.clone()
        } else {
            None
        };
        state.requests.push(Recorded {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            content_type: content_type.clone(),
            body: recorded_body,
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
        // kube asks for `PartialObjectMetadata` (get, watch) or `…List` (list) in Accept.
        let meta_only = accept.contains("as=PartialObjectMetadata");
        if method == "GET" && matches!(params.get("watch").map(String::as_str), Some("true" | "1"))
        {
            return state.watch(&self.state, p, &params, meta_only);
        }
        state.dispatch(
            &method,
            p,
            &params,
            content_type.as_deref(),
            body,
            meta_only,
        )
    }
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
    let ns = obj["metadata"]["namespace"].as_str().map(String::from);
    let name = obj["metadata"]["name"]
        .as_str()
        .expect("object has a name")
        .to_string();
    (prefix, ns, plural_of(kind), name)
}

fn plural_of(kind: &str) -> String {
    match kind {
        "Ingress" => "ingresses".to_string(),
        "Endpoints" => "endpoints".to_string(),
        other => format!("{}s", other.to_lowercase()),
    }
}

fn status_response(code: u16, message: &str) -> Response<FakeBody> {
    let reason = match code {
        400 => "BadRequest",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        410 => "Expired",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        503 => "ServiceUnavailable",
        _ => "InternalError",
    };
    respond(code, &status_object(code, reason, message))
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn respond(code: u16, body: &Value) -> Response<FakeBody> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed_unsync())
        .unwrap()
}

/// A watch's response body: the lines sent to its channel, a BOOKMARK every `interval` when
/// asked for, and the end at `timeoutSeconds`.
struct WatchStream {
    rx: mpsc::UnboundedReceiver<Bytes>,
    state: Arc<Mutex<State>>,
    bookmark: Option<(Value, tokio::time::Interval)>,
    deadline: tokio::time::Instant,
    done: bool,
}

impl WatchStream {
    /// A BOOKMARK at the current resourceVersion, behind every event already queued: the
    /// store's lock is held while the queue is drained, so no event at or below that version
    /// can still be on its way.
    fn bookmark_line(&mut self) -> Bytes {
        let state = self.state.lock().unwrap();
        let mut out = Vec::new();
        while let Ok(line) = self.rx.try_recv() {
            out.extend_from_slice(&line);
        }
        if let Some((template, _)) = &self.bookmark {
            let mut object = template.clone();
            object["metadata"]["resourceVersion"] = json!(state.counter.to_string());
            out.extend_from_slice(&event_line("BOOKMARK", &object, false));
        }
        Bytes::from(out)
    }

    fn into_body(self) -> FakeBody {
        let frames = futures::stream::unfold(self, |mut ws| async move {
            if ws.done {
                return None;
            }
            enum Next {
                Line(Option<Bytes>),
                Tick,
                Timeout,
            }
            let WatchStream {
                rx,
                bookmark,
                deadline,
                ..
            } = &mut ws;
            let tick = async {
                match bookmark.as_mut() {
                    Some((_, interval)) => {
                        interval.tick().await;
                    }
                    None => std::future::pending().await,
                }
            };
            let next = tokio::select! {
                biased;
                line = rx.recv() => Next::Line(line),
                () = tick => Next::Tick,
                () = tokio::time::sleep_until(*deadline) => Next::Timeout,
            };
            let data = match next {
                Next::Line(Some(line)) => line,
                Next::Line(None) => return None,
                Next::Tick => ws.bookmark_line(),
                Next::Timeout => {
                    ws.done = true;
                    ws.bookmark_line()
                }
            };
            Some((Ok::<_, Infallible>(Frame::data(data)), ws))
        });
        StreamBody::new(frames).boxed_unsync()
    }
}

/// Leaf field paths of `v` that field ownership tracks: the `status` subresource's writes own
/// `status` only; other writes own everything but server-set metadata (and `status` when the
/// resource has the subresource).
fn owned_leaves(v: &Value, status_write: bool, has_status: bool) -> BTreeSet<FieldPath> {
    let mut out = BTreeSet::new();
    let Some(map) = v.as_object() else {
        return out;
    };
    for (k, sub) in map {
        let take = match k.as_str() {
            "apiVersion" | "kind" => false,
            "status" => status_write || !has_status,
            "metadata" => !status_write,
            _ => !status_write,
        };
        if !take {
            continue;
        }
        if k == "metadata" {
            for field in ["labels", "annotations", "ownerReferences", "finalizers"] {
                if let Some(m) = sub.get(field).filter(|m| !m.is_null()) {
                    leaves(
                        m,
                        &mut vec!["metadata".to_string(), field.to_string()],
                        &mut out,
                    );
                }
            }
        } else if !sub.is_null() {
            leaves(sub, &mut vec![k.clone()], &mut out);
        }
    }
    // An empty map sets no field.
    out.retain(|p| value_at(v, p).is_none_or(|x| x.as_object().is_none_or(|m| !m.is_empty())));
    out
}

/// The uids an object's owner references name.
fn owner_uids(obj: &Value) -> Vec<String> {
    obj["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["uid"].as_str().map(String::from))
        .collect()
}

fn value_at<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

/// `managedFields` entries as the API server shows them (`fieldsV1` with `f:` keys).
fn managed_fields(owners: &BTreeMap<Owner, BTreeSet<FieldPath>>, api_version: &Value) -> Value {
    let entries: Vec<Value> = owners
        .iter()
        .filter(|(_, fields)| !fields.is_empty())
        .map(|(owner, fields)| {
            let mut tree = Value::Object(Map::new());
            for path in fields {
                let mut node = &mut tree;
                for k in path {
                    node = node
                        .as_object_mut()
                        .unwrap()
                        .entry(format!("f:{k}"))
                        .or_insert_with(|| json!({}));
                }
            }
            let mut entry = json!({
                "manager": owner.manager, "operation": owner.operation,
                "apiVersion": api_version, "time": "2026-01-01T00:00:00Z",
                "fieldsType": "FieldsV1", "fieldsV1": tree,
            });
            if owner.status {
                entry["subresource"] = json!("status");
            }
            entry
        })
        .collect();
    Value::Array(entries)
}

impl State {
    /// Stores `obj` under `key`, filling server fields and `managedFields`; bumps
    /// resourceVersion only on change, and tells the watches.
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
        let api_version = obj["apiVersion"].clone();
        let managed = self
            .owners
            .get(&key)
            .map(|o| managed_fields(o, &api_version))
            .filter(|m| m.as_array().is_some_and(|a| !a.is_empty()));
        let meta = obj["metadata"]
            .as_object_mut()
            .expect("metadata is an object");
        if let Some(ns) = &key.1 {
            meta.insert("namespace".into(), json!(ns));
        }
        meta.insert("name".into(), json!(key.3));
        match managed {
            Some(m) => meta.insert("managedFields".into(), m),
            None => meta.remove("managedFields"),
        };
        match existing {
            Some(old) => {
                for f in ["uid", "creationTimestamp", "resourceVersion", "generation"] {
                    if let Some(v) = old["metadata"].get(f) {
                        meta.insert(f.into(), v.clone());
                    }
                }
                if &obj == old {
                    return obj;
                }
                self.counter += 1;
                obj["metadata"]["resourceVersion"] = json!(self.counter.to_string());
                if spec_part(&obj) != spec_part(old) {
                    let g = old["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
                    obj["metadata"]["generation"] = json!(g);
                }
                self.put(key.clone(), obj.clone());
                self.emit(&key, "MODIFIED", obj.clone(), Some(old.clone()));
            }
            None => {
                self.counter += 1;
                meta.insert("uid".into(), json!(format!("uid-{}", self.counter)));
                meta.insert("resourceVersion".into(), json!(self.counter.to_string()));
                meta.insert("creationTimestamp".into(), json!("2026-01-01T00:00:00Z"));
                meta.insert("generation".into(), json!(1));
                self.put(key.clone(), obj.clone());
                self.emit(&key, "ADDED", obj.clone(), None);
            }
        }
        obj
    }

    /// Records a change in its type's history and sends it to the matching watches; drops
    /// the watches whose client went away.
    fn emit(&mut self, key: &Key, kind: &'static str, object: Value, previous: Option<Value>) {
        let res: Res = (key.0.clone(), key.2.clone());
        let change = Change {
            rv: self.counter,
            kind,
            object,
            previous,
        };
        if let Some(watchers) = self.watchers.get_mut(&res) {
            watchers.retain(|w| match w.line(&change) {
                Some(line) => w.tx.send(line).is_ok(),
                None => !w.tx.is_closed(),
            });
        }
        let history = self.history.entry(res.clone()).or_default();
        history.push_back(change);
        while history.len() > self.history_limit {
            let dropped = history.pop_front().unwrap();
            self.compacted.insert(res.clone(), dropped.rv);
        }
    }

    /// Stores `obj` under `key`, keeping the uid and owner-reference indexes.
    fn put(&mut self, key: Key, obj: Value) {
        if let Some(old) = self.objects.get(&key) {
            for uid in owner_uids(old) {
                if let Some(deps) = self.dependents.get_mut(&uid) {
                    deps.remove(&key);
                }
            }
        }
        for uid in owner_uids(&obj) {
            self.dependents.entry(uid).or_default().insert(key.clone());
        }
        if let Some(uid) = obj["metadata"]["uid"].as_str() {
            self.uids.insert(uid.to_string());
        }
        self.objects.insert(key, obj);
    }

    /// Removes the object under `key`, keeping the indexes.
    fn take(&mut self, key: &Key) -> Option<Value> {
        let obj = self.objects.remove(key)?;
        for uid in owner_uids(&obj) {
            if let Some(deps) = self.dependents.get_mut(&uid) {
                deps.remove(key);
            }
        }
        if let Some(uid) = obj["metadata"]["uid"].as_str() {
            self.uids.remove(uid);
        }
        self.owners.remove(key);
        Some(obj)
    }

    /// Deletes one object: a DELETED event carrying a new resourceVersion.
    fn delete_one(&mut self, key: &Key) -> Option<Value> {
        let mut obj = self.take(key)?;
        self.counter += 1;
        obj["metadata"]["resourceVersion"] = json!(self.counter.to_string());
        self.emit(key, "DELETED", obj.clone(), None);
        Some(obj)
    }

    /// Deletes an object, then, as the garbage collector does with background propagation,
    /// every object whose owner references all name objects that no longer exist, and their
    /// dependents in turn.
    fn delete(&mut self, key: &Key) -> Option<Value> {
        let deleted = self.delete_one(key)?;
        let mut gone: Vec<String> = deleted["metadata"]["uid"]
            .as_str()
            .map(String::from)
            .into_iter()
            .collect();
        while let Some(uid) = gone.pop() {
            for dependent in self.dependents.remove(&uid).unwrap_or_default() {
                let orphaned = self
                    .objects
                    .get(&dependent)
                    .is_some_and(|o| owner_uids(o).iter().all(|u| !self.uids.contains(u)));
                if orphaned && let Some(obj) = self.delete_one(&dependent) {
                    gone.extend(obj["metadata"]["uid"].as_str().map(String::from));
                }
            }
        }
        Some(deleted)
    }

    /// Gives `owner` the fields a non-apply write changed (taking them from any other
    /// manager, as the API server does for updates) and forgets fields the write removed.
    fn record_update(
        &mut self,
        key: &Key,
        owner: Owner,
        old: Option<&Value>,
        new: &Value,
        has_status: bool,
    ) {
        let status_write = owner.status;
        let after = owned_leaves(new, status_write, has_status);
        let before = old
            .map(|o| owned_leaves(o, status_write, has_status))
            .unwrap_or_default();
        let changed: Vec<FieldPath> = after
            .iter()
            .filter(|p| old.and_then(|o| value_at(o, p)) != value_at(new, p))
            .cloned()
            .collect();
        let owners = self.owners.entry(key.clone()).or_default();
        for fields in owners.values_mut() {
            for gone in before.difference(&after) {
                fields.remove(gone);
            }
            for p in &changed {
                fields.remove(p);
            }
        }
        owners.entry(owner).or_default().extend(changed);
        owners.retain(|_, f| !f.is_empty());
    }

    fn dispatch(
        &mut self,
        method: &str,
        p: Path,
        params: &BTreeMap<String, String>,
        content_type: Option<&str>,
        body: Option<Value>,
        meta_only: bool,
    ) -> Response<FakeBody> {
        let manager = params
            .get("fieldManager")
            .cloned()
            .unwrap_or_else(|| "unknown".to_string());
        let has_status = WITH_STATUS.contains(&p.plural.as_str());
        let Some(name) = p.name.clone() else {
            return match method {
                "GET" => self.list(&p, params, meta_only),
                "POST" => self.create(&p, body.unwrap_or(Value::Null), manager, has_status),
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
        let not_found = || status_response(404, &format!("{} \"{name}\" not found", p.plural));
        match method {
            "GET" => match existing {
                Some(obj) if meta_only => respond(200, &partial_metadata(&obj)),
                Some(obj) => respond(200, &obj),
                None => not_found(),
            },
            "DELETE" => match self.delete(&key) {
                Some(obj) => respond(200, &obj),
                None => not_found(),
            },
            "PUT" => {
                let Some(old) = existing else {
                    return not_found();
                };
                let mut new = body.unwrap_or(Value::Null);
                if let Some(rv) = new["metadata"]["resourceVersion"].as_str()
                    && Some(rv) != old["metadata"]["resourceVersion"].as_str()
                {
                    return status_response(409, "the object has been modified");
                }
                let owner = Owner {
                    manager,
                    operation: "Update",
                    status: on_status,
                };
                if on_status {
                    let mut obj = old.clone();
                    obj["status"] = new["status"].take();
                    self.record_update(&key, owner, Some(&old), &obj, has_status);
                    let stored = self.store(key, obj, Some(&old), false);
                    return respond(200, &stored);
                }
                self.record_update(&key, owner, Some(&old), &new, has_status);
                let stored = self.store(key, new, Some(&old), true);
                respond(200, &stored)
            }
            "PATCH" => {
                let patch = body.unwrap_or(Value::Null);
                let is_apply =
                    content_type.is_some_and(|c| c.starts_with("application/apply-patch"));
                // An apply creates a missing object, but not through the status subresource.
                if existing.is_none() && (!is_apply || on_status) {
                    return not_found();
                }
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
                // A resourceVersion in a patch (merge or apply) is a precondition, as on the
                // API server: a patch computed from an older read fails with 409.
                if let (Some(want), Some(old)) = (
                    patch["metadata"]["resourceVersion"].as_str(),
                    existing.as_ref(),
                ) && Some(want) != old["metadata"]["resourceVersion"].as_str()
                {
                    return status_response(409, "the object has been modified");
                }
                let patch = scoped(&patch);
                if is_apply {
                    let force = params.get("force").map(String::as_str) == Some("true");
                    if let Err(conflict) = self.apply(
                        &key, &manager, on_status, has_status, force, &patch, &mut obj,
                    ) {
                        return respond(409, &conflict);
                    }
                } else if content_type.is_some_and(|c| c.contains("json-patch")) {
                    return status_response(415, "json-patch is not modelled by the fake");
                } else {
                    merge_patch(&mut obj, &patch);
                    let owner = Owner {
                        manager,
                        operation: "Update",
                        status: on_status,
                    };
                    self.record_update(&key, owner, Some(&base), &obj, has_status);
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

    /// Server-side apply of `patch` by `manager` onto `obj` (the object so far), with field
    /// ownership: a field another manager owns and this apply changes is a conflict unless
    /// `force`; fields this manager applied before and no longer applies are removed unless
    /// someone else owns them. The error is the 409 `Status` naming each conflict.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &mut self,
        key: &Key,
        manager: &str,
        on_status: bool,
        has_status: bool,
        force: bool,
        patch: &Value,
        obj: &mut Value,
    ) -> Result<(), Value> {
        let me = Owner {
            manager: manager.to_string(),
            operation: "Apply",
            status: on_status,
        };
        let mut clean = patch.clone();
        strip_nulls(&mut clean);
        let now = owned_leaves(&clean, on_status, has_status);
        let owners = self.owners.entry(key.clone()).or_default();
        let mut conflicts: Vec<(String, FieldPath)> = Vec::new();
        for path in &now {
            let current = value_at(obj, path);
            if current.is_none() || current == value_at(&clean, path) {
                continue;
            }
            for (owner, fields) in owners.iter() {
                if owner.manager != manager && fields.contains(path) {
                    conflicts.push((owner.manager.clone(), path.clone()));
                }
            }
        }
        if !conflicts.is_empty() && !force {
            let field = |p: &FieldPath| format!(".{}", p.join("."));
            let causes: Vec<Value> = conflicts
                .iter()
                .map(|(m, p)| {
                    json!({"reason": "FieldManagerConflict",
                           "message": format!("conflict with \"{m}\""), "field": field(p)})
                })
                .collect();
            let list: Vec<String> = conflicts
                .iter()
                .map(|(m, p)| format!("conflict with \"{m}\": {}", field(p)))
                .collect();
            let mut status = status_object(
                409,
                "Conflict",
                &format!(
                    "Apply failed with {} conflict{}: {}",
                    conflicts.len(),
                    if conflicts.len() == 1 { "" } else { "s" },
                    list.join("; ")
                ),
            );
            status["details"] = json!({"name": key.3, "kind": key.2, "causes": causes});
            return Err(status);
        }
        for (m, path) in &conflicts {
            for (owner, fields) in owners.iter_mut() {
                if &owner.manager == m {
                    fields.remove(path);
                }
            }
        }
        let before = owners.get(&me).cloned().unwrap_or_default();
        for gone in before.difference(&now) {
            let shared = owners
                .iter()
                .any(|(o, fields)| *o != me && fields.contains(gone));
            if !shared {
                remove_path(obj, gone);
            }
        }
        merge_patch(obj, &clean);
        owners.insert(me, now);
        owners.retain(|_, f| !f.is_empty());
        Ok(())
    }

    fn create(
        &mut self,
        p: &Path,
        mut obj: Value,
        manager: String,
        has_status: bool,
    ) -> Response<FakeBody> {
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
        self.owners.remove(&key);
        let owner = Owner {
            manager,
            operation: "Update",
            status: false,
        };
        self.record_update(&key, owner, None, &obj, has_status);
        let stored = self.store(key, obj, None, false);
        respond(201, &stored)
    }

    /// Objects of the path's collection matching the selectors, in key order.
    fn selected<'a>(
        &'a self,
        p: &'a Path,
        params: &'a BTreeMap<String, String>,
    ) -> impl Iterator<Item = (&'a Key, &'a Value)> + 'a {
        let labels = params
            .get("labelSelector")
            .map(String::as_str)
            .unwrap_or("");
        let fields = params
            .get("fieldSelector")
            .map(String::as_str)
            .unwrap_or("");
        self.objects
            .iter()
            .filter(move |(k, _)| {
                k.0 == p.prefix && k.2 == p.plural && (p.ns.is_none() || k.1 == p.ns)
            })
            .filter(move |(_, v)| {
                label_match(labels, &v["metadata"]["labels"]) && field_match(fields, v)
            })
    }

    /// A list, in pages of `limit` when asked: the continue token holds the list's
    /// resourceVersion and the last key served.
    fn list(
        &self,
        p: &Path,
        params: &BTreeMap<String, String>,
        meta_only: bool,
    ) -> Response<FakeBody> {
        let limit = params
            .get("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|l| *l > 0);
        let (rv, after) = match params.get("continue").filter(|c| !c.is_empty()) {
            Some(token) => {
                let mut parts = token.splitn(3, ':');
                let rv = parts.next().unwrap_or_default().to_string();
                let ns = parts.next().unwrap_or_default().to_string();
                let name = parts.next().unwrap_or_default().to_string();
                (rv, Some((ns, name)))
            }
            None => (self.counter.to_string(), None),
        };
        let mut items = Vec::new();
        let mut more = false;
        for (k, v) in self.selected(p, params) {
            let pos = (k.1.clone().unwrap_or_default(), k.3.clone());
            if after.as_ref().is_some_and(|a| pos <= *a) {
                continue;
            }
            if limit.is_some_and(|l| items.len() == l) {
                more = true;
                break;
            }
            items.push(if meta_only {
                partial_metadata(v)
            } else {
                v.clone()
            });
        }
        let mut metadata = json!({"resourceVersion": rv});
        if more && let Some(last) = items.last() {
            metadata["continue"] = json!(format!(
                "{rv}:{}:{}",
                last["metadata"]["namespace"].as_str().unwrap_or(""),
                last["metadata"]["name"].as_str().unwrap_or("")
            ));
        }
        let (api_version, kind) = if meta_only {
            ("meta.k8s.io/v1", "PartialObjectMetadataList")
        } else {
            ("v1", "List")
        };
        respond(
            200,
            &json!({"kind": kind, "apiVersion": api_version, "metadata": metadata, "items": items}),
        )
    }

    /// Opens a watch: replays what the client has not seen, then streams live changes.
    fn watch(
        &mut self,
        shared: &Arc<Mutex<State>>,
        p: Path,
        params: &BTreeMap<String, String>,
        meta_only: bool,
    ) -> Response<FakeBody> {
        let res: Res = (p.prefix.clone(), p.plural.clone());
        let mut fields = params.get("fieldSelector").cloned().unwrap_or_default();
        if let Some(name) = &p.name {
            fields = format!("metadata.name={name},{fields}");
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let watcher = Watcher {
            ns: p.ns.clone(),
            labels: params.get("labelSelector").cloned().unwrap_or_default(),
            fields,
            meta_only,
            tx,
        };
        let rv = params.get("resourceVersion").cloned().unwrap_or_default();
        let initial_events = params.get("sendInitialEvents").map(String::as_str) == Some("true");
        let bookmarks = params.get("allowWatchBookmarks").map(String::as_str) == Some("true");
        let bookmark_template = if meta_only {
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": {}})
        } else {
            let (api_version, kind) = self.type_of(&res);
            json!({"apiVersion": api_version, "kind": kind, "metadata": {}})
        };
        let mut registered = true;
        if initial_events || rv.is_empty() || rv == "0" {
            // "Any" version: the current state as ADDED events.
            for (_, obj) in self
                .objects
                .iter()
                .filter(|(k, _)| k.0 == res.0 && k.2 == res.1)
            {
                if watcher.matches(obj) {
                    let _ = watcher.tx.send(event_line("ADDED", obj, meta_only));
                }
            }
            if initial_events && bookmarks {
                let mut end = bookmark_template.clone();
                end["metadata"] = json!({"resourceVersion": self.counter.to_string(),
                    "annotations": {"k8s.io/initial-events-end": "true"}});
                let _ = watcher.tx.send(event_line("BOOKMARK", &end, false));
            }
        } else {
            let Ok(from) = rv.parse::<u64>() else {
                return status_response(400, &format!("invalid resourceVersion {rv:?}"));
            };
            let oldest = self
                .compacted
                .get(&res)
                .copied()
                .unwrap_or(0)
                .max(self.compacted_all);
            if from < oldest {
                // What the API server sends: 200, one ERROR event, end of stream.
                let status = status_object(
                    410,
                    "Expired",
                    &format!("too old resource version: {from} ({oldest})"),
                );
                let _ = watcher.tx.send(event_line("ERROR", &status, false));
                registered = false;
            } else if let Some(history) = self.history.get(&res) {
                for change in history.iter().filter(|c| c.rv > from) {
                    if let Some(line) = watcher.line(change) {
                        let _ = watcher.tx.send(line);
                    }
                }
            }
        }
        let timeout = params
            .get("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .map_or(Duration::from_secs(3600), Duration::from_secs);
        let every = self.bookmark_interval;
        let rx = match self.watch_delays.get(&p.plural) {
            Some(delay) => delayed(rx, *delay),
            None => rx,
        };
        let stream = WatchStream {
            rx: {
                let rx = rx;
                if registered {
                    self.watchers.entry(res).or_default().push(watcher);
                }
                rx
            },
            state: shared.clone(),
            bookmark: (bookmarks && registered).then(|| {
                let start = tokio::time::Instant::now() + every;
                (bookmark_template, tokio::time::interval_at(start, every))
            }),
            deadline: tokio::time::Instant::now() + timeout,
            done: false,
        };
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(stream.into_body())
            .unwrap()
    }

    /// apiVersion and kind of a resource type, from a stored object or its history.
    fn type_of(&self, res: &Res) -> (String, String) {
        let api_version = res
            .0
            .strip_prefix("api/")
            .or_else(|| res.0.strip_prefix("apis/"))
            .unwrap_or(&res.0)
            .to_string();
        let kind = self
            .objects
            .iter()
            .find(|(k, _)| k.0 == res.0 && k.2 == res.1)
            .map(|(_, o)| o)
            .or_else(|| {
                self.history
                    .get(res)
                    .and_then(|h| h.back())
                    .map(|c| &c.object)
            })
            .and_then(|o| o["kind"].as_str())
            .map(String::from)
            .unwrap_or_else(|| {
                let known = [
                    ("configmaps", "ConfigMap"),
                    ("serviceaccounts", "ServiceAccount"),
                    ("statefulsets", "StatefulSet"),
                    ("daemonsets", "DaemonSet"),
                    ("scopedsecrets", "ScopedSecret"),
                    ("vaultstores", "VaultStore"),
                    ("clustervaultstores", "ClusterVaultStore"),
                ];
                if let Some((_, kind)) = known.iter().find(|(plural, _)| *plural == res.1) {
                    return kind.to_string();
                }
                // Singular, capitalised: enough for a bookmark's kind.
                let singular = res.1.trim_end_matches('s');
                let mut c = singular.chars();
                c.next()
                    .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                    .unwrap_or_default()
            });
        (api_version, kind)
    }

    fn token_request(&mut self, key: &Key, body: Value) -> Response<FakeBody> {
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

/// The lines of `rx`, each delivered `delay` after it was sent (in order): one task stamps
/// each line as it arrives, another holds it until its time.
fn delayed(
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    delay: Duration,
) -> mpsc::UnboundedReceiver<Bytes> {
    let (stamped_tx, mut stamped) = mpsc::unbounded_channel();
    let (tx, out) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(line) = rx.recv().await {
            if stamped_tx
                .send((tokio::time::Instant::now(), line))
                .is_err()
            {
                break;
            }
        }
    });
    tokio::spawn(async move {
        while let Some((at, line)) = stamped.recv().await {
            tokio::time::sleep_until(at + delay).await;
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    out
}
