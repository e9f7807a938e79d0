//! A stand-in Kubernetes API server, kept for the faults the real one (`controlplane.rs`) will
//! not produce on demand: a watch closed mid-stream, `410 Gone` on resuming, a BOOKMARK at a
//! moment of the test's choosing (used by `tests/kube_faults.rs`). A real HTTP/1.1 server
//! (hyper) on its own thread and tokio runtime, answering the lists and watches of
//! `kube::runtime::watcher` the way the real one does; objects are written by the test
//! ([`ApiServer::apply`], [`ApiServer::delete`]), not through HTTP.
//!
//! - Objects live per collection (apiVersion, kind), keyed by (namespace, name), with one
//!   global `resourceVersion` counter; every change takes the next version and is recorded in
//!   a history that watches replay.
//! - Paths: `/api/v1/[namespaces/{ns}/]{plural}` for the core group,
//!   `/apis/{group}/{version}/[namespaces/{ns}/]{plural}` for the others; the plural is the
//!   lowercase kind made plural (`…y` → `…ies`). `Namespace` and `Node` are the cluster-scoped
//!   kinds.
//! - GET list answers `{"kind":"<Kind>List","apiVersion":..,"metadata":{"resourceVersion":..},
//!   "items":[..]}` in one page (as the real server answers a list at `resourceVersion=0` from
//!   its watch cache, whatever the limit); `fieldSelector` (any dotted path, `=`, `==`, `!=`,
//!   comma-separated) filters.
//! - GET with `watch=1|true` answers 200 and streams one `{"type":..,"object":..}` JSON per
//!   line: without a `resourceVersion` (or with `0`) it starts with ADDED for every current
//!   object; with one, it replays the recorded history newer than it, then live changes. A
//!   version older than the last [`ApiServer::expire_history`] answers one `ERROR` event
//!   carrying a 410 `Expired` Status and ends the stream. An object that stops (starts)
//!   matching a watch's selector is DELETED (ADDED) for that watch. `allowWatchBookmarks`
//!   enables BOOKMARK events ([`ApiServer::bookmark`]); `timeoutSeconds` ends the stream after
//!   that long; [`ApiServer::close_watches`] ends every open stream;
//!   [`ApiServer::refuse_watches`] answers new ones with an error status (`503`, the server
//!   going away, which kube's client retries itself; `403`, the caller's rights taken away).
//! - Any other request answers 405. Every request is logged as `"METHOD /path?query"`
//!   ([`ApiServer::requests`]).

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

use paths::{is_cluster_scoped, parse_path, plural, query_map};
use selector::Selector;

/// The kinds the daemon watches, known before any object of them exists, so that an empty
/// collection lists (and watches) instead of answering 404.
const KNOWN_KINDS: &[(&str, &str)] = &[
    ("v1", "Namespace"),
    ("v1", "Node"),
    ("v1", "Pod"),
    ("v1", "Service"),
    ("discovery.k8s.io/v1", "EndpointSlice"),
    ("security.ztunnel.dev/v1", "AuthorizationPolicy"),
    ("security.ztunnel.dev/v1", "PeerAuthentication"),
];

type Key = (String, String); // (namespace or "", name)
type Collection = (String, String); // (apiVersion, kind)
type Body = BoxBody<Bytes, Infallible>;

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
    requests: Vec<String>,
    next_uid: u64,
    /// New watches answer this status while set.
    refuse_watches: Option<u16>,
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
    let line = match &query {
        Some(q) => format!("{method} {path}?{q}"),
        None => format!("{method} {path}"),
    };
    let mut store = shared.store.lock().unwrap();
    store.requests.push(line);
    if method != Method::GET {
        return fail(
            405,
            "MethodNotAllowed",
            "the stand-in only lists and watches",
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
    let selector = match Selector::parse(
        target
            .namespace
            .clone()
            .filter(|_| !is_cluster_scoped(&kind)),
        q.get("fieldSelector").map(String::as_str).unwrap_or(""),
    ) {
        Ok(s) => s,
        Err(e) => return fail(400, "BadRequest", &e),
    };
    let watch = matches!(q.get("watch").map(String::as_str), Some("1" | "true"));
    if let (true, Some(code)) = (watch, store.refuse_watches) {
        let reason = match code {
            403 => "Forbidden",
            503 => "ServiceUnavailable",
            _ => "InternalError",
        };
        return fail(code, reason, "the stand-in refuses watches for now");
    }
    if watch {
        return start_watch(&mut store, collection, selector, &q);
    }
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
    respond(
        200,
        &json!({
            "kind": format!("{kind}List"),
            "apiVersion": target.api_version,
            "metadata": {"resourceVersion": store.rv.to_string()},
            "items": items,
        }),
    )
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
        let l = TcpListener::bind("127.0.0.1:0").expect("bind the stand-in API server");
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
        std::fs::write(path, serde_saphyr::to_string(&cfg).expect("yaml"))
            .expect("write kubeconfig");
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

    /// While `status` is set, new watch requests answer it (lists still work): with
    /// [`close_watches`](Self::close_watches), a gap in which a test changes objects before
    /// the clients can watch again (`503`), or failing watches (`403`).
    pub fn refuse_watches(&self, status: Option<u16>) {
        self.store().refuse_watches = status;
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
