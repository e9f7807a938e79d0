//! The Kubernetes source: watchers on the API server fill a store of compact entries
//! ([`translate::Store`]), from which the same [`State`](super::State) the file source builds
//! is kept up to date and published through the [`Discovery`] handle.
//!
//! Watched (each a `kube::runtime::watcher`: list then watch, resumed from the last
//! resourceVersion when the server closes the stream, re-listed on `410 Gone` with the
//! collection replaced as a whole — so objects deleted during a gap are gone and none is
//! counted twice —, bookmarks accepted, errors retried with `default_backoff`; lists ask for
//! `resourceVersion=0` so the API server answers them from its watch cache, not etcd; each
//! failed attempt is logged and counted by kind, [`Discovery::watch_failures`]):
//! - namespaces (all; small);
//! - nodes (all), decoded into a lean type: their names, labels (for their locality) and
//!   addresses (where Services reach host-network pods) only;
//! - pods on this node (`fieldSelector=spec.nodeName=<node>`), kept in full (labels, uid);
//! - pods on other nodes (`fieldSelector=spec.nodeName!=<node>`), decoded straight into a lean
//!   type and kept lean (see [`objects`]): never a full Pod in memory;
//! - services and `discovery.k8s.io/v1` EndpointSlices (all: any pod may call any service);
//! - `security.ztunnel.dev/v1` AuthorizationPolicy and PeerAuthentication (all); each one's
//!   status condition is kept current by [`status::StatusWriter`];
//! - under the Istio-compatible setting ([`Rules::istio`]), Istio's own
//!   `security.istio.io/v1` AuthorizationPolicy and PeerAuthentication too, decided exactly as
//!   ours and named `istio:namespace/name`, and Istio's `networking.istio.io/v1`
//!   ServiceEntries and WorkloadEntries, of which the addresses and their waypoints are kept
//!   ([`crate::discovery::istio_entries`]). The policies' status is Istio's (istiod writes
//!   it): what the daemons narrow or fail closed in them is logged and shown by `/explain`,
//!   not written there. The daemon refuses to start if the API server does not serve these
//!   four kinds (Istio's CRDs are not installed): a setting that cannot be honoured is an
//!   error, not a silent no-op.
//!   Also, when the API server serves them, the Gateway API's Gateways and GatewayClasses,
//!   which declare Istio's waypoints ([`gateways`]); when it does not at start, it is asked
//!   again every minute, and the watchers started then are no part of the first state.
//!
//! A change marks the store dirty and is recorded with the entry it replaced
//! ([`incremental::Changes`]); an event that leaves an object's entry as it was (a node's
//! status heartbeat, a policy's status written back, a pod's condition) changes nothing.
//! The publisher updates the state at most once per `coalesce` (bursts — a rollout, a
//! re-list — become one update) and counts reloads. An update costs
//! what the changed objects touch, not the cluster ([`incremental::Engine`]); a re-list, a
//! namespace, node, policy, Gateway, GatewayClass, ServiceEntry or WorkloadEntry change
//! rebuilds in full. A policy
//! is never refused: one whose spec cannot be read in full is kept and fails closed (see
//! [`crate::discovery::policy`]), and its status says why. Another object that cannot be in the
//! model (a malformed IP, an object without a name, …) is logged, counted
//! ([`Discovery::objects_refused`]) and skipped; everything else stays. When such an object
//! that was good is updated into a bad one, its last good version is kept (as the file source
//! keeps the last good file). [`watch_kubernetes`] returns once every collection has been
//! listed, so the first state is complete. A watcher that ends (it panicked on an object) ends
//! the publisher, so the daemon restarts rather than keep a kind frozen.

pub mod gateways;
pub mod incremental;
mod networking;
pub mod objects;
pub mod status;
pub mod translate;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource};
use parking_lot::Mutex;
use serde::de::DeserializeOwned;

use super::enrollment::Rules;
use super::policy::PolicyObject;
use super::{Discovery, Error, Stats};
use crate::task::first_ended;
use incremental::{Changes, Engine};
use objects::{Interner, Key};
use translate::Store;

/// A client from `kubeconfig`, or else the standard resolution (in-cluster ServiceAccount,
/// `KUBECONFIG`, `~/.kube/config`).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, Error> {
    let cfg = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| Error::Kube(format!("kubeconfig {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| Error::Kube(format!("kubeconfig {}: {e}", path.display())))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| Error::Kube(format!("no Kubernetes configuration: {e}")))?,
    };
    Client::try_from(cfg).map_err(|e| Error::Kube(e.to_string()))
}

struct Inner {
    store: Store,
    /// What changed in `store` since the model was last updated.
    changes: Changes,
    engine: Engine,
    /// Updates since the interner was last pruned.
    since_prune: u32,
    interner: Interner,
    /// Collections listed at least once.
    synced: usize,
}

struct Shared {
    inner: Mutex<Inner>,
    dirty: tokio::sync::Notify,
    synced: tokio::sync::Notify,
    stats: Arc<Stats>,
}

/// A watcher's progress: the re-list it is receiving, and whether it has listed once.
struct Progress<V> {
    buffer: Option<BTreeMap<Key, V>>,
    listed: bool,
}

impl<V> Default for Progress<V> {
    fn default() -> Self {
        Progress {
            buffer: None,
            listed: false,
        }
    }
}

/// How one watched kind maps into the store.
struct Kind<K, V> {
    what: &'static str,
    /// The entry for an object (`Ok(None)`: not kept), and its key.
    #[allow(clippy::type_complexity)]
    entry: Box<dyn Fn(&K, &mut Interner) -> Result<Option<V>, String> + Send + Sync>,
    slot: fn(&mut Store) -> &mut BTreeMap<Key, V>,
    /// Records that the entry at a key changed, and what it was.
    change: fn(&mut Changes, Key, Option<V>),
}

fn key<K: Resource>(k: &K) -> Key {
    objects::key_of(k.meta())
}

impl Shared {
    /// The empty store and model of the daemon of `node`.
    fn new(trust_domain: &str, node: &str, rules: Rules) -> Shared {
        Shared {
            inner: Mutex::new(Inner {
                store: Store {
                    node: node.to_owned(),
                    ..Store::default()
                },
                changes: Changes::default(),
                engine: Engine::new(trust_domain, node, rules),
                since_prune: 0,
                interner: Interner::default(),
                synced: 0,
            }),
            dirty: tokio::sync::Notify::new(),
            synced: tokio::sync::Notify::new(),
            stats: Arc::new(Stats::default()),
        }
    }

    fn refuse(&self, what: &str, key: &Key, e: &str) {
        self.stats.objects_refused.inc();
        tracing::warn!(kind = what, namespace = %key.0, name = %key.1, error = %e, "Kubernetes object refused; skipped (an earlier good version, if any, is kept)");
    }

    /// Applies one watcher event to the store, with `progress` the watcher's own.
    fn apply<K: Resource, V: Clone + PartialEq>(
        &self,
        kind: &Kind<K, V>,
        ev: watcher::Event<K>,
        progress: &mut Progress<V>,
    ) {
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        let buffer = &mut progress.buffer;
        match ev {
            watcher::Event::Init => *buffer = Some(BTreeMap::new()),
            watcher::Event::InitApply(o) => {
                let k = key(&o);
                let entry = (kind.entry)(&o, &mut inner.interner);
                drop(o);
                let buf = buffer.get_or_insert_with(BTreeMap::new);
                match entry {
                    Ok(Some(v)) => {
                        buf.insert(k, v);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.refuse(kind.what, &k, &e);
                        if let Some(old) = (kind.slot)(&mut inner.store).get(&k) {
                            buf.insert(k, old.clone());
                        }
                    }
                }
            }
            watcher::Event::InitDone => {
                *(kind.slot)(&mut inner.store) = buffer.take().unwrap_or_default();
                inner.changes.full = true;
                // A re-list (after a watch error or `410 Gone`) is no other collection's list.
                if !std::mem::replace(&mut progress.listed, true) {
                    inner.synced += 1;
                    self.synced.notify_one();
                }
                self.dirty.notify_one();
            }
            watcher::Event::Apply(o) => {
                let k = key(&o);
                let entry = (kind.entry)(&o, &mut inner.interner);
                drop(o);
                let slot = (kind.slot)(&mut inner.store);
                match entry {
                    // What the model keeps of it is unchanged (a status heartbeat, a field
                    // the entry drops): nothing to update.
                    Ok(Some(v)) if slot.get(&k) == Some(&v) => return,
                    Ok(Some(v)) => {
                        let old = slot.insert(k.clone(), v);
                        (kind.change)(&mut inner.changes, k, old);
                    }
                    Ok(None) => match slot.remove(&k) {
                        Some(old) => (kind.change)(&mut inner.changes, k, Some(old)),
                        None => return,
                    },
                    Err(e) => {
                        self.refuse(kind.what, &k, &e);
                        return;
                    }
                }
                self.dirty.notify_one();
            }
            watcher::Event::Delete(o) => {
                let k = key(&o);
                if let Some(old) = (kind.slot)(&mut inner.store).remove(&k) {
                    (kind.change)(&mut inner.changes, k, Some(old));
                }
                self.dirty.notify_one();
            }
        }
    }
}

fn node_kind() -> Kind<objects::LeanNode, objects::NodeEntry> {
    Kind {
        what: "Node",
        entry: Box::new(|n, int| Ok(Some(objects::node_entry(n, int)))),
        slot: |s| &mut s.nodes,
        change: |c, _, _| c.full = true,
    }
}

/// The pods of `node` (`local`) or of the other nodes, for the daemon of `node`.
fn pod_kind(node: &str, rules: Rules, local: bool) -> Kind<objects::LeanPod, objects::PodEntry> {
    let node = node.to_owned();
    Kind {
        what: "Pod",
        entry: Box::new(move |p, int| objects::pod_entry(p, &node, rules, int)),
        slot: if local {
            |s| &mut s.pods
        } else {
            |s| &mut s.remote_pods
        },
        change: if local {
            |c, k, old| c.pod(true, k, old)
        } else {
            |c, k, old| c.pod(false, k, old)
        },
    }
}

/// A watcher's task, named by the kind it watches.
type Watcher = (&'static str, tokio::task::JoinHandle<()>);

/// Runs one watcher until the process ends.
fn spawn_watcher<K, V>(
    shared: Arc<Shared>,
    api: Api<K>,
    cfg: watcher::Config,
    kind: Kind<K, V>,
) -> Watcher
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    V: Clone + PartialEq + Send + 'static,
{
    let what = kind.what;
    let task = tokio::spawn(async move {
        // `resourceVersion=0` without a page size: the API server answers the list from its
        // watch cache in one response (kube drops `resourceVersion=0` from paged lists).
        let mut cfg = cfg.any_semantic();
        cfg.page_size = None;
        let mut stream = watcher(api, cfg).default_backoff().boxed();
        let mut progress = Progress::default();
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(ev) => shared.apply(&kind, ev, &mut progress),
                Err(e) => {
                    shared
                        .stats
                        .watch_failures
                        .get_or_create(&super::WatchKind { kind: kind.what })
                        .inc();
                    tracing::warn!(kind = kind.what, error = %e, "Kubernetes watch failed; retrying with backoff")
                }
            }
        }
    });
    (what, task)
}

/// The API group of Istio's policy resources, read under the Istio-compatible setting.
pub const ISTIO_GROUP: &str = "security.istio.io";

/// The `v1` resource `plural` (of `kind`) of API group `group`.
fn v1_resource(group: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.into(),
        version: "v1".into(),
        api_version: format!("{group}/v1"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// A policy resource as the policy parser reads it: kind, name, namespace, creation time
/// (oldest-wins among PeerAuthentications), annotations (`istio.io/dry-run`) and spec.
fn policy_json(o: &DynamicObject, kind: &str) -> serde_json::Value {
    let mut v = serde_json::json!({
        "apiVersion": super::policy::API_VERSION,
        "kind": kind,
        "metadata": {
            "name": o.metadata.name.clone().unwrap_or_default(),
            "namespace": o.metadata.namespace.clone().unwrap_or_default(),
        },
    });
    if let Some(t) = &o.metadata.creation_timestamp {
        v["metadata"]["creationTimestamp"] = serde_json::json!(t.0.to_string());
    }
    if let Some(a) = o.metadata.annotations.as_ref().filter(|a| !a.is_empty()) {
        v["metadata"]["annotations"] = serde_json::json!(a);
    }
    if let Some(spec) = o.data.get("spec") {
        v["spec"] = spec.clone();
    }
    v
}

/// The entry of a policy resource of `kind`, and the status it should carry reported to
/// `writer`; Istio's objects (no writer) are marked as such, and what the daemons do not
/// enforce of them as written is logged.
fn policy_object(
    o: &DynamicObject,
    kind: &'static str,
    writer: Option<&status::StatusWriter>,
) -> Result<PolicyObject, String> {
    let mut p = objects::policy_entry(policy_json(o, kind))?;
    let Some(writer) = writer else {
        match &mut p {
            PolicyObject::Authorization(a) => a.metadata.istio = true,
            PolicyObject::PeerAuthentication(pa) => pa.metadata.istio = true,
        }
        let st = status::status_of(&p);
        if !st.accepted || !st.message.is_empty() {
            tracing::warn!(
                kind,
                namespace = %o.metadata.namespace.as_deref().unwrap_or_default(),
                name = %o.metadata.name.as_deref().unwrap_or_default(),
                reason = st.reason,
                message = %st.message,
                "Istio policy not enforced as written"
            );
        }
        return Ok(p);
    };
    writer.observe(
        &serde_json::json!({"status": o.data.get("status")}),
        status::Wanted {
            kind,
            namespace: o.metadata.namespace.clone().unwrap_or_default(),
            name: o.metadata.name.clone().unwrap_or_default(),
            generation: o.metadata.generation,
            status: status::status_of(&p),
        },
    );
    Ok(p)
}

/// Watches the API server for the daemon of `node`; returns once every collection has been
/// listed, with the first state published.
pub async fn watch_kubernetes(
    client: Client,
    trust_domain: String,
    node: String,
    rules: Rules,
    coalesce: Duration,
) -> Result<(Discovery, tokio::task::JoinHandle<()>), Error> {
    let mut gateways = false;
    if rules.istio {
        istio_served(&client).await?;
        gateways = gateways::served(&client).await?;
    }
    let shared = Arc::new(Shared::new(&trust_domain, &node, rules));
    let mut watchers = AbortOnDrop(Vec::new());
    let tasks = &mut watchers.0;
    tasks.push(spawn_watcher(
        shared.clone(),
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
        Kind {
            what: "Namespace",
            entry: Box::new(|n: &Namespace, int: &mut Interner| {
                Ok(Some(objects::namespace_entry(n, int)))
            }),
            slot: |s| &mut s.namespaces,
            change: |c, _, _| c.full = true,
        },
    ));
    tasks.push(spawn_watcher(
        shared.clone(),
        Api::<objects::LeanNode>::all(client.clone()),
        watcher::Config::default(),
        node_kind(),
    ));
    tasks.push(spawn_watcher(
        shared.clone(),
        Api::<objects::LeanPod>::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={node}")),
        pod_kind(&node, rules, true),
    ));
    tasks.push(spawn_watcher(
        shared.clone(),
        Api::<objects::LeanPod>::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName!={node}")),
        pod_kind(&node, rules, false),
    ));
    tasks.push(spawn_watcher(
        shared.clone(),
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        Kind {
            what: "Service",
            entry: Box::new(objects::service_entry),
            slot: |s| &mut s.services,
            change: |c, k, old| c.service(k, old),
        },
    ));
    tasks.push(spawn_watcher(
        shared.clone(),
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
        Kind {
            what: "EndpointSlice",
            entry: Box::new(|s, _| objects::slice_entry(s)),
            slot: |s| &mut s.slices,
            change: |c, k, old| c.slice(k, old),
        },
    ));
    // Tasks that list nothing before the first state: joined to the watchers after it.
    let mut others = AbortOnDrop(Vec::new());
    let (writer, writing) = status::StatusWriter::start(client.clone());
    others.0.push(("policy status writer", writing));
    tasks.extend(spawn_policy_watchers(
        &shared,
        &client,
        super::policy::GROUP,
        Some(writer),
    ));
    if rules.istio {
        tasks.extend(spawn_policy_watchers(&shared, &client, ISTIO_GROUP, None));
        tasks.extend(networking::spawn(&shared, &client));
    }
    if gateways {
        tasks.extend(gateways::spawn(&shared, &client));
    }
    let total = tasks.len();

    // Wait until every collection has been listed once.
    loop {
        let notified = shared.synced.notified();
        let synced = shared.inner.lock().synced;
        if synced >= total {
            break;
        }
        tracing::debug!(synced, total, "waiting for the initial Kubernetes lists");
        tokio::select! {
            () = notified => {}
            ended = first_ended(tasks) => {
                return Err(Error::Kube(format!("before the first lists were done, {ended}")));
            }
        }
    }
    if rules.istio && !gateways {
        tracing::warn!("the Gateway API is not served: no waypoint is known ready, so what names one is refused; it is checked for again every minute");
        let later = gateways::spawn_when_served(shared.clone(), client.clone());
        others.0.push(later);
    }
    watchers.0.append(&mut others.0);
    let state = update(&shared)?;
    tracing::info!(
        node = %node,
        workloads = state.workloads().len(),
        services = state.services().len(),
        "discovery loaded from Kubernetes"
    );
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(state));
    let disc = Discovery {
        rx,
        stats: shared.stats.clone(),
    };
    let publisher = tokio::spawn(publish(shared, tx, watchers, coalesce));
    Ok((disc, publisher))
}

/// Publishes the store's state at most once per `coalesce` while every watcher runs. When one
/// ends (it panicked on an object), this ends too, and with it the daemon: a kind no longer
/// watched would keep its policies as they were, so a new DENY would never apply.
async fn publish(
    shared: Arc<Shared>,
    tx: tokio::sync::watch::Sender<Arc<super::State>>,
    mut watchers: AbortOnDrop,
    coalesce: Duration,
) {
    let updates = async {
        loop {
            shared.dirty.notified().await;
            tokio::time::sleep(coalesce).await;
            match update(&shared) {
                Ok(state) => {
                    tracing::debug!(
                        workloads = state.workloads().len(),
                        services = state.services().len(),
                        "discovery updated"
                    );
                    shared.stats.reloads_ok.inc();
                    if tx.send(Arc::new(state)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    shared.stats.reloads_failed.inc();
                    tracing::warn!(error = %e, "discovery update failed; keeping the last state");
                }
            }
        }
    };
    tokio::select! {
        () = updates => {}
        ended = first_ended(&mut watchers.0) => {
            tracing::error!(watcher = %ended, "a Kubernetes watch stopped; discovery cannot go on without it");
        }
    }
}

/// The watchers of one group's AuthorizationPolicy and PeerAuthentication: ours, with their
/// status kept by `writer`, or Istio's (no writer).
fn spawn_policy_watchers(
    shared: &Arc<Shared>,
    client: &Client,
    group: &'static str,
    writer: Option<status::StatusWriter>,
) -> [Watcher; 2] {
    let istio = group == ISTIO_GROUP;
    let ar = v1_resource(group, "AuthorizationPolicy", "authorizationpolicies");
    let authz = spawn_watcher(
        shared.clone(),
        Api::<DynamicObject>::all_with(client.clone(), &ar),
        watcher::Config::default(),
        Kind {
            what: if istio {
                "AuthorizationPolicy (security.istio.io)"
            } else {
                "AuthorizationPolicy"
            },
            entry: Box::new({
                let writer = writer.clone();
                move |o, _| match policy_object(o, "AuthorizationPolicy", writer.as_ref())? {
                    PolicyObject::Authorization(a) => Ok(Some(a)),
                    PolicyObject::PeerAuthentication(_) => Err("not an AuthorizationPolicy".into()),
                }
            }),
            slot: if istio {
                |s| &mut s.istio_authz
            } else {
                |s| &mut s.authz
            },
            change: |c, _, _| c.full = true,
        },
    );
    let ar = v1_resource(group, "PeerAuthentication", "peerauthentications");
    let peer = spawn_watcher(
        shared.clone(),
        Api::<DynamicObject>::all_with(client.clone(), &ar),
        watcher::Config::default(),
        Kind {
            what: if istio {
                "PeerAuthentication (security.istio.io)"
            } else {
                "PeerAuthentication"
            },
            entry: Box::new(move |o, _| {
                match policy_object(o, "PeerAuthentication", writer.as_ref())? {
                    PolicyObject::PeerAuthentication(p) => Ok(Some(p)),
                    PolicyObject::Authorization(_) => Err("not a PeerAuthentication".into()),
                }
            }),
            slot: if istio {
                |s| &mut s.istio_peer_authn
            } else {
                |s| &mut s.peer_authn
            },
            change: |c, _, _| c.full = true,
        },
    );
    [authz, peer]
}

/// Fails unless the API server serves Istio's two policy resources to this client, and its
/// ServiceEntries and WorkloadEntries.
async fn istio_served(client: &Client) -> Result<(), Error> {
    let kinds = [
        ("AuthorizationPolicy", "authorizationpolicies"),
        ("PeerAuthentication", "peerauthentications"),
    ];
    let hint = "are Istio's CRDs installed, and may the daemon list them?";
    may_list(client, ISTIO_GROUP, &kinds, hint).await?;
    let group = super::istio_entries::GROUP;
    may_list(client, group, &networking::KINDS, hint).await
}

/// Fails, saying `hint`, unless this client may list each of `kinds` (kind, plural) of
/// `group`'s `v1`, which the Istio-compatible setting reads.
async fn may_list(
    client: &Client,
    group: &str,
    kinds: &[(&str, &str)],
    hint: &str,
) -> Result<(), Error> {
    for (kind, plural) in kinds {
        let api = Api::<DynamicObject>::all_with(client.clone(), &v1_resource(group, kind, plural));
        if let Err(e) = api
            .list_metadata(&kube::api::ListParams::default().limit(1))
            .await
        {
            return Err(Error::Kube(format!(
                "--istio-compat: cannot list {group}/v1 {plural} ({hint}): {e}"
            )));
        }
    }
    Ok(())
}

/// Aborts the watchers when the publisher ends (or the first lists fail).
struct AbortOnDrop(Vec<Watcher>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for (_, t) in &self.0 {
            t.abort();
        }
    }
}

/// The model after the store's changes since the last update (see [`incremental`]).
fn update(shared: &Shared) -> Result<super::State, Error> {
    let mut guard = shared.inner.lock();
    let inner = &mut *guard;
    let changes = std::mem::take(&mut inner.changes);
    let full = changes.full;
    let (state, fresh) = inner.engine.update(&inner.store, changes);
    inner.since_prune += 1;
    if full || inner.since_prune >= PRUNE_EVERY {
        inner.interner.prune();
        inner.since_prune = 0;
    }
    drop(guard);
    for s in &fresh {
        shared.stats.objects_refused.inc();
        tracing::warn!(reason = %s, "Kubernetes object skipped");
    }
    if full {
        release_freed_memory();
    }
    state
}

/// Updates between two prunings of the interner (which walks every string it holds).
const PRUNE_EVERY: u32 = 256;

/// Hands memory freed after a rebuild (the previous state, decoded lists) back to the system;
/// glibc keeps it otherwise.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Whether the store recorded a change since the last call (and forgets it).
    fn changed(sh: &Shared) -> bool {
        let c = std::mem::take(&mut sh.inner.lock().changes);
        c.full || !c.pods.is_empty()
    }

    /// A watcher that panics ends the publisher (and so discovery, and the daemon), which
    /// aborts the other watchers; while they run, it publishes.
    #[tokio::test]
    async fn a_watcher_that_panics_ends_discovery() {
        let shared = Arc::new(Shared::new("cluster.local", "n1", Rules::default()));
        let (tx, mut rx) = tokio::sync::watch::channel(Arc::new(update(&shared).unwrap()));
        let (panic_now, panic_rx) = tokio::sync::oneshot::channel::<()>();
        let other = tokio::spawn(std::future::pending::<()>());
        let other_abort = other.abort_handle();
        let watchers = AbortOnDrop(vec![
            ("Pod", other),
            (
                "AuthorizationPolicy",
                tokio::spawn(async move {
                    let _ = panic_rx.await;
                    panic!("as the test asks");
                }),
            ),
        ]);
        let publisher = tokio::spawn(publish(shared.clone(), tx, watchers, Duration::ZERO));
        shared.dirty.notify_one();
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("published while the watchers run")
            .unwrap();
        assert!(!publisher.is_finished());
        panic_now.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), publisher)
            .await
            .expect("the publisher ends")
            .unwrap();
        tokio::task::yield_now().await;
        assert!(other_abort.is_finished(), "the other watcher is aborted");
    }

    /// An event that leaves what the model keeps of an object as it was records nothing: a
    /// node's status heartbeat no longer rebuilds the model in full.
    #[test]
    fn events_that_leave_an_entry_as_it_was_change_nothing() {
        let sh = Shared::new("cluster.local", "n1", Rules::default());
        let mut buf = Progress::default();
        let node = |zone: &str, heartbeat: &str| -> objects::LeanNode {
            serde_json::from_value(json!({"metadata": {"name": "n2",
                "labels": {"topology.kubernetes.io/zone": zone}},
                "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.2"}],
                           "conditions": [{"type": "Ready", "lastHeartbeatTime": heartbeat}]}}))
            .unwrap()
        };
        let pod = |ip: &str, ready: &str| -> objects::LeanPod {
            serde_json::from_value(
                json!({"metadata": {"name": "p", "namespace": "demo", "uid": "u"},
                "spec": {"nodeName": "n1"},
                "status": {"phase": "Running", "podIPs": [{"ip": ip}],
                           "conditions": [{"type": "Ready", "status": ready}]}}),
            )
            .unwrap()
        };
        let (nodes, pods) = (node_kind(), pod_kind("n1", Rules::default(), true));
        enum Ev {
            Node(objects::LeanNode),
            Pod(objects::LeanPod),
        }
        let cases = [
            ("a new node", Ev::Node(node("z1", "t1")), true),
            ("its heartbeat", Ev::Node(node("z1", "t2")), false),
            ("its zone", Ev::Node(node("z2", "t3")), true),
            ("a new pod", Ev::Pod(pod("10.0.0.1", "False")), true),
            ("its condition", Ev::Pod(pod("10.0.0.1", "True")), false),
            ("its IP", Ev::Pod(pod("10.0.0.2", "True")), true),
        ];
        let mut pod_buf = Progress::default();
        for (what, ev, want) in cases {
            match ev {
                Ev::Node(n) => sh.apply(&nodes, watcher::Event::Apply(n), &mut buf),
                Ev::Pod(p) => sh.apply(&pods, watcher::Event::Apply(p), &mut pod_buf),
            }
            assert_eq!(changed(&sh), want, "{what}");
        }
    }

    /// Each watcher counts once toward the first complete state: a watcher that lists again
    /// (after a watch error) before another has listed at all does not stand in for it.
    #[test]
    fn a_relist_is_not_another_collections_first_list() {
        let sh = Shared::new("cluster.local", "n1", Rules::default());
        let nodes = node_kind();
        let mut progress = Progress::default();
        for _ in 0..3 {
            sh.apply(&nodes, watcher::Event::Init, &mut progress);
            sh.apply(&nodes, watcher::Event::InitDone, &mut progress);
        }
        assert_eq!(sh.inner.lock().synced, 1);
        let pods = pod_kind("n1", Rules::default(), true);
        let mut progress = Progress::default();
        sh.apply(&pods, watcher::Event::Init, &mut progress);
        sh.apply(&pods, watcher::Event::InitDone, &mut progress);
        assert_eq!(sh.inner.lock().synced, 2);
    }
}
