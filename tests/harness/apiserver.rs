//! A stand-in Kubernetes API server for tests: a real HTTP/1.1 server (hyper) on its own thread
//! and tokio runtime, speaking the list/watch protocol the way the real one does, so that
//! `kube::Client`, `kube::runtime::watcher` and the daemon's and CA's code can be tested
//! against it without a cluster.
//!
//! Contract (shared with every helper, see `notes/contract.md`):
//! - Objects live per collection (apiVersion, kind), keyed by (namespace, name), with one global
//!   `resourceVersion` counter; every change (apply, create, replace, patch, delete) takes the
//!   next version and is recorded in a history that watches replay.
//! - Paths are mapped the way kube maps them: `/api/v1/[namespaces/{ns}/]{plural}[/{name}]`
//!   for the core group, `/apis/{group}/{version}/[namespaces/{ns}/]{plural}[/{name}]` for the
//!   others; the plural is the lowercase kind made plural (`…y` → `…ies`, `…s` → `…ses`), with an
//!   override table (`Endpoints` → `endpoints`). Cluster-scoped kinds are in [`CLUSTER_SCOPED`].
//! - GET list answers `{"kind":"<Kind>List","apiVersion":..,"metadata":{"resourceVersion":..},
//!   "items":[..]}`; `fieldSelector` (any dotted path, `=`, `==`, `!=`, comma-separated) and
//!   `labelSelector` (`k=v`, `k==v`, `k!=v`, `k`, `!k`) filter; `limit` pages the answer (except
//!   at `resourceVersion=0`, answered in one page as the real watch cache does), with a
//!   `continue` token (pages of the current objects, not of a snapshot: a test that changes
//!   objects between pages sees the change; the list's resourceVersion is the first page's).
//! - GET with `watch=1|true` answers 200 and streams one `{"type":..,"object":..}` JSON per line:
//!   without a `resourceVersion` (or with `0`) it starts with ADDED for every current object;
//!   with one, it replays the recorded history newer than it, then live changes. A version older
//!   than the last [`ApiServer::expire_history`] answers one `ERROR` event carrying a 410
//!   `Expired` Status and ends the stream. An object that stops (starts) matching a watch's
//!   selectors is DELETED (ADDED) for that watch. `allowWatchBookmarks` enables BOOKMARK events
//!   ([`ApiServer::bookmark`]); `timeoutSeconds` ends the stream after that long;
//!   [`ApiServer::close_watches`] ends every open stream.
//! - POST create (409 `AlreadyExists`), PUT replace (404; 409 `Conflict` on a stale
//!   `metadata.resourceVersion`), PATCH (JSON merge patch for merge/strategic-merge/apply
//!   patches, apply creating a missing object; RFC 6902 JSON patch), DELETE (answers the deleted
//!   object), with real `Status` bodies. [`ApiServer::on_create`] replaces POST on a path with a
//!   test's handler (e.g. TokenReview).
//! - Every request is logged as `"METHOD /path?query"` ([`ApiServer::requests`]).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::mpsc;

mod paths;
mod selector;

pub use paths::{collection_path, plural, CLUSTER_SCOPED};
use paths::{is_cluster_scoped, parse_path, query_map};
use selector::Selector;

/// Kinds known before any object of them exists, so that an empty collection lists (and
/// watches) instead of answering 404. Any other kind becomes known when first applied.
const KNOWN_KINDS: &[(&str, &str)] = &[
    ("v1", "Namespace"),
    ("v1", "Pod"),
    ("v1", "Service"),
    ("v1", "Endpoints"),
    ("v1", "Node"),
    ("v1", "ConfigMap"),
    ("v1", "Secret"),
    ("v1", "ServiceAccount"),
    ("v1", "Event"),
    ("discovery.k8s.io/v1", "EndpointSlice"),
    ("security.ztunnel.dev/v1", "AuthorizationPolicy"),
    ("security.ztunnel.dev/v1", "PeerAuthentication"),
    ("authentication.k8s.io/v1", "TokenReview"),
    ("coordination.k8s.io/v1", "Lease"),
    ("apps/v1", "DaemonSet"),
    ("apps/v1", "Deployment"),
];

type Key = (String, String); // (namespace or "", name)
type Collection = (String, String); // (apiVersion, kind)
type Body = BoxBody<Bytes, Infallible>;
type CreateHandler = Arc<dyn Fn(Value) -> (u16, Value) + Send + Sync>;

/// One recorded change.
#[derive(Clone)]
struct Change {
    rv: u64,
    collection: Collection,
    /// The object before the change (None for a creation).
    old: Option<Value>,
    /// The object after the change (None for a deletion).
    new: Option<Value>,
}

struct Watch {
    collection: Collection,
    selector: Selector,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Bytes>,
}

impl Watch {
    /// The event this watch sees for a change, if any.
    fn event_for(&self, change: &Change) -> Option<Bytes> {
        if change.collection != self.collection {
            return None;
        }
        let old = change.old.as_ref().filter(|o| self.selector.matches(o));
        let new = change.new.as_ref().filter(|o| self.selector.matches(o));
        let (ty, obj) = match (old, new) {
            (None, None) => return None,
            (None, Some(n)) => ("ADDED", n.clone()),
            (Some(_), Some(n)) => ("MODIFIED", n.clone()),
            (Some(o), None) => {
                // The object as last seen, at the version of its deletion (or of the change
                // that moved it out of the selection).
                let mut o = change.new.clone().unwrap_or_else(|| o.clone());
                o["metadata"]["resourceVersion"] = json!(change.rv.to_string());
                ("DELETED", o)
            }
        };
        Some(event_line(ty, &obj))
    }
}

fn event_line(ty: &str, obj: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": ty, "object": obj})).expect("json");
    line.push(b'\n');
    Bytes::from(line)
}

#[derive(Default)]
struct Store {
    rv: u64,
    /// Versions at or below this one are gone (410).
    compacted: u64,
    objects: BTreeMap<Collection, BTreeMap<Key, Value>>,
    history: Vec<Change>,
    watches: Vec<Watch>,
    /// plural path prefix ("/api/v1/pods" style key: (apiVersion, plural)) → kind
    kinds: HashMap<(String, String), String>,
    handlers: HashMap<String, CreateHandler>,
    requests: Vec<String>,
    next_uid: u64,
    /// New watches answer 503 (an API server going away) while set.
    refuse_watches: bool,
}

impl Store {
    fn new() -> Self {
        let mut s = Store {
            rv: 1000,
            ..Default::default()
        };
        for (av, kind) in KNOWN_KINDS {
            s.learn(av, kind);
        }
        s
    }

    fn learn(&mut self, api_version: &str, kind: &str) {
        self.kinds
            .insert((api_version.into(), plural(kind)), kind.into());
    }

    fn record(&mut self, change: Change) {
        self.watches.retain(|w| match w.event_for(&change) {
            Some(line) => w.tx.send(line).is_ok(),
            None => !w.tx.is_closed(),
        });
        self.history.push(change);
    }

    /// Create or replace; returns the stored object.
    fn put(&mut self, mut obj: Value) -> Value {
        let api_version = obj["apiVersion"].as_str().expect("apiVersion").to_string();
        let kind = obj["kind"].as_str().expect("kind").to_string();
        let name = obj["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_string();
        let ns = if is_cluster_scoped(&kind) {
            if let Some(m) = obj["metadata"].as_object_mut() {
                m.remove("namespace");
            }
            String::new()
        } else {
            let ns = obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            obj["metadata"]["namespace"] = json!(ns);
            ns
        };
        self.learn(&api_version, &kind);
        let collection = (api_version, kind);
        let key = (ns, name);
        let old = self
            .objects
            .get(&collection)
            .and_then(|c| c.get(&key))
            .cloned();
        self.rv += 1;
        let uid = match old.as_ref().and_then(|o| o["metadata"]["uid"].as_str()) {
            Some(u) => u.to_string(),
            None => match obj["metadata"]["uid"].as_str() {
                Some(u) => u.to_string(),
                None => {
                    self.next_uid += 1;
                    format!("00000000-0000-4000-8000-{:012x}", self.next_uid)
                }
            },
        };
        obj["metadata"]["uid"] = json!(uid);
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        if obj["metadata"]["creationTimestamp"].is_null() {
            obj["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        self.objects
            .entry(collection.clone())
            .or_default()
            .insert(key, obj.clone());
        let rv = self.rv;
        self.record(Change {
            rv,
            collection,
            old,
            new: Some(obj.clone()),
        });
        obj
    }

    fn remove(&mut self, collection: &Collection, key: &Key) -> Option<Value> {
        let old = self.objects.get_mut(collection)?.remove(key)?;
        self.rv += 1;
        let rv = self.rv;
        self.record(Change {
            rv,
            collection: collection.clone(),
            old: Some(old.clone()),
            new: None,
        });
        Some(old)
    }

    fn lookup(&self, collection: &Collection, key: &Key) -> Option<Value> {
        self.objects.get(collection)?.get(key).cloned()
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": if code < 400 { "Success" } else { "Failure" },
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn respond(code: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).expect("status code"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).expect("json"))).boxed())
        .expect("response")
}

fn fail(code: u16, reason: &str, message: &str) -> Response<Body> {
    respond(code, &status(code, reason, message))
}

struct Shared {
    store: Mutex<Store>,
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let line = match &query {
        Some(q) => format!("{method} {path}?{q}"),
        None => format!("{method} {path}"),
    };
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return fail(400, "BadRequest", &format!("reading body: {e}")),
    };
    let handler = {
        let mut store = shared.store.lock().unwrap();
        store.requests.push(line);
        if method == Method::POST {
            store.handlers.get(&path).cloned()
        } else {
            None
        }
    };
    if let Some(h) = handler {
        let obj: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return fail(400, "BadRequest", &format!("body: {e}")),
        };
        let (code, answer) = tokio::task::spawn_blocking(move || h(obj))
            .await
            .expect("create handler panicked");
        return respond(code, &answer);
    }
    if path == "/version" {
        return respond(
            200,
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-standin", "platform": "linux/amd64"}),
        );
    }
    let Some(target) = parse_path(&path) else {
        return fail(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    let q = query_map(query.as_deref());
    let mut store = shared.store.lock().unwrap();
    let Some(kind) = store
        .kinds
        .get(&(target.api_version.clone(), target.plural.clone()))
        .cloned()
    else {
        return fail(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    let collection = (target.api_version.clone(), kind.clone());
    let ns_key = if is_cluster_scoped(&kind) {
        String::new()
    } else {
        target.namespace.clone().unwrap_or_default()
    };
    let gr = format!(
        "{} \"{}\"",
        target.plural,
        target.name.clone().unwrap_or_default()
    );

    match (method, &target.name) {
        (Method::GET, None) => {
            let selector = match Selector::parse(
                target
                    .namespace
                    .clone()
                    .filter(|_| !is_cluster_scoped(&kind)),
                q.get("fieldSelector").map(String::as_str).unwrap_or(""),
                q.get("labelSelector").map(String::as_str).unwrap_or(""),
            ) {
                Ok(s) => s,
                Err(e) => return fail(400, "BadRequest", &e),
            };
            let watch = matches!(q.get("watch").map(String::as_str), Some("1" | "true"));
            if watch && store.refuse_watches {
                fail(
                    503,
                    "ServiceUnavailable",
                    "the stand-in refuses watches for now",
                )
            } else if watch {
                start_watch(&mut store, collection, selector, &q)
            } else {
                let items: Vec<Value> = store
                    .objects
                    .get(&collection)
                    .map(|c| {
                        c.values()
                            .filter(|o| selector.matches(o))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                // Pages: `continue` is "<resourceVersion of the first page>/<offset>".
                let (first_rv, offset) = match q.get("continue").filter(|c| !c.is_empty()) {
                    Some(c) => match c.split_once('/').and_then(|(rv, off)| {
                        Some((rv.parse::<u64>().ok()?, off.parse::<usize>().ok()?))
                    }) {
                        Some(t) => t,
                        None => return fail(400, "BadRequest", "invalid continue token"),
                    },
                    None => (store.rv, 0),
                };
                // As the real server: a list at resourceVersion=0 is answered from its watch
                // cache, in one page whatever the limit.
                let from_cache = q.get("resourceVersion").map(String::as_str) == Some("0");
                let limit = q
                    .get("limit")
                    .and_then(|l| l.parse::<usize>().ok())
                    .filter(|l| *l > 0 && !from_cache)
                    .unwrap_or(usize::MAX);
                let end = offset.saturating_add(limit).min(items.len());
                let page: Vec<Value> = items
                    .get(offset.min(items.len())..end)
                    .unwrap_or_default()
                    .to_vec();
                let mut meta = json!({"resourceVersion": first_rv.to_string()});
                if end < items.len() {
                    meta["continue"] = json!(format!("{first_rv}/{end}"));
                }
                respond(
                    200,
                    &json!({
                        "kind": format!("{kind}List"),
                        "apiVersion": target.api_version,
                        "metadata": meta,
                        "items": page,
                    }),
                )
            }
        }
        (Method::GET, Some(name)) => match store.lookup(&collection, &(ns_key, name.clone())) {
            Some(o) => respond(200, &o),
            None => fail(404, "NotFound", &format!("{gr} not found")),
        },
        (Method::POST, None) => {
            let mut obj: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return fail(400, "BadRequest", &format!("body: {e}")),
            };
            obj["apiVersion"] = json!(target.api_version);
            obj["kind"] = json!(kind);
            if !is_cluster_scoped(&kind) {
                if let Some(ns) = &target.namespace {
                    obj["metadata"]["namespace"] = json!(ns);
                }
            }
            let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) else {
                return fail(422, "Invalid", "metadata.name: Required value");
            };
            let ns = if is_cluster_scoped(&kind) {
                String::new()
            } else {
                obj["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default")
                    .to_string()
            };
            if store.lookup(&collection, &(ns, name.clone())).is_some() {
                return fail(
                    409,
                    "AlreadyExists",
                    &format!("{} \"{name}\" already exists", target.plural),
                );
            }
            if let Some(m) = obj["metadata"].as_object_mut() {
                m.remove("resourceVersion");
            }
            let stored = store.put(obj);
            respond(201, &stored)
        }
        (Method::PUT, Some(name)) => {
            let mut obj: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return fail(400, "BadRequest", &format!("body: {e}")),
            };
            let Some(current) = store.lookup(&collection, &(ns_key.clone(), name.clone())) else {
                return fail(404, "NotFound", &format!("{gr} not found"));
            };
            if let Some(rv) = obj["metadata"]["resourceVersion"].as_str() {
                if !rv.is_empty() && Some(rv) != current["metadata"]["resourceVersion"].as_str() {
                    return fail(
                        409,
                        "Conflict",
                        &format!(
                            "Operation cannot be fulfilled on {gr}: the object has been modified; please apply your changes to the latest version and try again"
                        ),
                    );
                }
            }
            obj["apiVersion"] = json!(target.api_version);
            obj["kind"] = json!(kind);
            obj["metadata"]["name"] = json!(name);
            if !ns_key.is_empty() {
                obj["metadata"]["namespace"] = json!(ns_key);
            }
            let stored = store.put(obj);
            respond(200, &stored)
        }
        (Method::PATCH, Some(name)) => {
            let patch: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return fail(400, "BadRequest", &format!("body: {e}")),
            };
            let current = store.lookup(&collection, &(ns_key.clone(), name.clone()));
            let apply = content_type.starts_with("application/apply-patch");
            let mut obj = match current {
                Some(o) => o,
                None if apply => {
                    let mut o = json!({"apiVersion": target.api_version, "kind": kind, "metadata": {"name": name}});
                    if !ns_key.is_empty() {
                        o["metadata"]["namespace"] = json!(ns_key);
                    }
                    o
                }
                None => return fail(404, "NotFound", &format!("{gr} not found")),
            };
            if content_type.starts_with("application/json-patch+json") {
                let p: json_patch::Patch = match serde_json::from_value(patch) {
                    Ok(p) => p,
                    Err(e) => return fail(400, "BadRequest", &format!("json patch: {e}")),
                };
                if let Err(e) = json_patch::patch(&mut obj, &p) {
                    return fail(422, "Invalid", &format!("json patch: {e}"));
                }
            } else {
                json_patch::merge(&mut obj, &patch);
            }
            obj["apiVersion"] = json!(target.api_version);
            obj["kind"] = json!(kind);
            obj["metadata"]["name"] = json!(name);
            if !ns_key.is_empty() {
                obj["metadata"]["namespace"] = json!(ns_key);
            }
            let stored = store.put(obj);
            respond(200, &stored)
        }
        (Method::DELETE, Some(name)) => match store.remove(&collection, &(ns_key, name.clone())) {
            Some(o) => respond(200, &o),
            None => fail(404, "NotFound", &format!("{gr} not found")),
        },
        _ => fail(
            405,
            "MethodNotAllowed",
            "the server does not allow this method",
        ),
    }
}

fn start_watch(
    store: &mut Store,
    collection: Collection,
    selector: Selector,
    q: &HashMap<String, String>,
) -> Response<Body> {
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let from = q.get("resourceVersion").map(String::as_str).unwrap_or("");
    let bookmarks = matches!(
        q.get("allowWatchBookmarks").map(String::as_str),
        Some("1" | "true")
    );
    let watch = Watch {
        collection: collection.clone(),
        selector: selector.clone(),
        bookmarks,
        tx: tx.clone(),
    };
    let mut keep = true;
    if from.is_empty() || from == "0" {
        if let Some(c) = store.objects.get(&collection) {
            for o in c.values().filter(|o| selector.matches(o)) {
                let _ = tx.send(event_line("ADDED", o));
            }
        }
    } else {
        match from.parse::<u64>() {
            Ok(rv) if rv < store.compacted => {
                let st = status(
                    410,
                    "Expired",
                    &format!("too old resource version: {rv} ({})", store.compacted),
                );
                let _ = tx.send(event_line("ERROR", &st));
                keep = false;
            }
            Ok(rv) => {
                for change in store.history.iter().filter(|c| c.rv > rv) {
                    if let Some(line) = watch.event_for(change) {
                        let _ = tx.send(line);
                    }
                }
            }
            Err(_) => {
                return fail(
                    400,
                    "BadRequest",
                    &format!("invalid resource version {from:?}"),
                )
            }
        }
    }
    if keep {
        store.watches.push(watch);
    }
    drop(tx);
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let deadline = tokio::time::Instant::now() + timeout;
    let stream = futures::stream::unfold(rx, move |mut rx| async move {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(line)) => Some((Ok::<_, Infallible>(Frame::data(line)), rx)),
            _ => None,
        }
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("response")
}

/// The stand-in API server. Dropping it stops the server.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiServer {
    /// Starts on 127.0.0.1 on a free port.
    pub fn start() -> ApiServer {
        Self::start_on(TcpListener::bind("127.0.0.1:0").expect("bind the stand-in API server"))
    }

    /// Starts on a listener the caller bound (e.g. inside a test's network namespace).
    pub fn start_on(l: TcpListener) -> ApiServer {
        l.set_nonblocking(true).expect("nonblocking listener");
        let addr = l.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new()),
        });
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("apiserver".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("apiserver runtime");
                rt.block_on(async move {
                    let l = tokio::net::TcpListener::from_std(l).expect("tokio listener");
                    loop {
                        tokio::select! {
                            _ = &mut stopped => break,
                            accepted = l.accept() => {
                                let Ok((stream, _)) = accepted else { continue };
                                let sh = sh.clone();
                                tokio::spawn(async move {
                                    let svc = hyper::service::service_fn(move |req| {
                                        let sh = sh.clone();
                                        async move { Ok::<_, Infallible>(handle(sh, req).await) }
                                    });
                                    let _ = hyper::server::conn::http1::Builder::new()
                                        .serve_connection(TokioIo::new(stream), svc)
                                        .await;
                                });
                            }
                        }
                    }
                });
                rt.shutdown_background();
            })
            .expect("apiserver thread");
        ApiServer {
            shared,
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig (YAML) pointing at this server with a bearer token.
    pub fn write_kubeconfig(&self, path: &Path, token: &str) {
        let cfg = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "standin", "cluster": {"server": self.url()}}],
            "users": [{"name": "standin", "user": {"token": token}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin", "namespace": "default"}}],
            "current-context": "standin",
        });
        std::fs::write(path, serde_yaml::to_string(&cfg).expect("yaml")).expect("write kubeconfig");
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.shared.store.lock().unwrap()
    }

    /// Creates or replaces an object (by apiVersion, kind, namespace, name); sets its uid (kept
    /// across replacements) and resourceVersion; returns the new resourceVersion.
    pub fn apply(&self, obj: Value) -> String {
        let stored = self.store().put(obj);
        stored["metadata"]["resourceVersion"]
            .as_str()
            .expect("rv")
            .to_string()
    }

    pub fn delete(&self, api_version: &str, kind: &str, namespace: Option<&str>, name: &str) {
        let ns = if is_cluster_scoped(kind) {
            String::new()
        } else {
            namespace.unwrap_or("default").to_string()
        };
        self.store()
            .remove(&(api_version.into(), kind.into()), &(ns, name.into()));
    }

    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let ns = if is_cluster_scoped(kind) {
            String::new()
        } else {
            namespace.unwrap_or("default").to_string()
        };
        self.store()
            .lookup(&(api_version.into(), kind.into()), &(ns, name.into()))
    }

    /// Ends every open watch stream (the clients see a clean end of the response).
    pub fn close_watches(&self) {
        self.store().watches.clear();
    }

    /// Forgets the history: every resourceVersion older than the current one answers 410.
    pub fn expire_history(&self) {
        let mut s = self.store();
        s.compacted = s.rv;
        s.history.clear();
    }

    /// While `on`, new watch requests answer 503 (lists still work): with
    /// [`close_watches`](Self::close_watches), a gap in which a test changes objects before
    /// the clients can watch again.
    pub fn refuse_watches(&self, on: bool) {
        self.store().refuse_watches = on;
    }

    /// Sends a BOOKMARK at the current resourceVersion to every watch that allowed them.
    pub fn bookmark(&self) {
        let mut s = self.store();
        let rv = s.rv.to_string();
        s.watches.retain(|w| {
            if !w.bookmarks {
                return !w.tx.is_closed();
            }
            let obj = json!({
                "kind": w.collection.1,
                "apiVersion": w.collection.0,
                "metadata": {"resourceVersion": rv},
            });
            w.tx.send(event_line("BOOKMARK", &obj)).is_ok()
        });
    }

    /// Answers POSTs to `collection_path` with `f(body)` = (status, body) instead of storing.
    pub fn on_create(
        &self,
        collection_path: &str,
        f: impl Fn(Value) -> (u16, Value) + Send + Sync + 'static,
    ) {
        self.store()
            .handlers
            .insert(collection_path.to_string(), Arc::new(f));
    }

    /// Every request so far, as `"METHOD /path?query"`.
    pub fn requests(&self) -> Vec<String> {
        self.store().requests.clone()
    }

    /// The number of watch streams open now.
    pub fn open_watches(&self) -> usize {
        let mut s = self.store();
        s.watches.retain(|w| !w.tx.is_closed());
        s.watches.len()
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> String {
        self.store().rv.to_string()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.close_watches();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests;
