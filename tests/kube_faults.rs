//! Faults of the Kubernetes API server that the real one (`harness::controlplane`, used by
//! `kube_discovery.rs`) will not produce on demand, against the stand-in API server
//! (`harness::apiserver`) speaking the list/watch protocol over HTTP:
//!
//! - a watch the server closes mid-stream, resumed from its resourceVersion without a re-list,
//!   losing and duplicating nothing (the real server closes a watch only at its timeout, about
//!   five minutes for kube's watcher);
//! - `410 Gone` on resuming, answered by a re-list that drops what was deleted in the gap. The
//!   real server answers a resumed watch from its watch cache, whose ring of events does not
//!   follow etcd's compaction: in kube-apiserver 1.36 a compaction (the API server's own, or
//!   one made through etcd's gateway and recorded in `compact_rev_key`) only drops the
//!   cache's list snapshots (`watchCache.Compact`), so a watcher cut off while etcd was
//!   compacted still resumes from its old version. The ring is trimmed only when full, and
//!   it grows to keep at least 75 s of events (up to 100 Ki events), which a test cannot
//!   exhaust; a cache re-initialised from etcd (etcd restarted) would answer 410, but for
//!   every test of the binary at once;
//! - a BOOKMARK followed by a closed watch, resumed from the bookmark's version (the real
//!   server sends bookmarks about once a minute and closes watches only at their timeout);
//! - watches refused (`403`, the daemon's rights taken away) after the streams closed: each
//!   failed attempt counted by kind,
//!   the last state kept, and the watches back once the server answers again.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use ztunnel::discovery::{Discovery, State};
use ztunnel_e2e::apiserver::ApiServer;
use ztunnel_e2e::objects::{deny, namespace, service, slice, POLICY};

const NODE: &str = "n1";

fn pod(ns: &str, name: &str, node: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": "web"}},
        "spec": {"nodeName": node, "serviceAccountName": "web", "containers": [{"name": "c", "image": "i"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

struct Bed {
    api: ApiServer,
    disc: Discovery,
    _dir: tempfile::TempDir,
    _task: tokio::task::JoinHandle<()>,
}

/// The stand-in seeded with `objs`, and the daemon's Kubernetes source for node n1 on it.
async fn bed(objs: Vec<Value>) -> Bed {
    let api = ApiServer::start();
    for o in objs {
        api.apply(o);
    }
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kc, "daemon-token");
    let client = ztunnel::discovery::kube::client(Some(&kc)).await.unwrap();
    let (disc, task) = tokio::time::timeout(
        Duration::from_secs(20),
        ztunnel::discovery::watch_kubernetes(
            client,
            "cluster.local".into(),
            NODE.into(),
            Default::default(),
            Duration::from_millis(20),
        ),
    )
    .await
    .expect("the initial lists complete")
    .unwrap();
    Bed {
        api,
        disc,
        _dir: dir,
        _task: task,
    }
}

impl Bed {
    /// Waits until the published state satisfies `f` (what: for the failure message).
    async fn until(&self, what: &str, f: impl Fn(&State) -> bool) -> Arc<State> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.disc.current();
            if f(&s) {
                return s;
            }
            if Instant::now() > deadline {
                panic!(
                    "{what}: not reached; state: {:#}\nrequests: {:#?}",
                    s.dump(),
                    self.api.requests()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn pod_watches(&self) -> Vec<String> {
        self.api
            .requests()
            .into_iter()
            .filter(|r| r.starts_with("GET /api/v1/pods?") && r.contains("watch=true"))
            .collect()
    }

    fn pod_lists(&self) -> usize {
        self.api
            .requests()
            .iter()
            .filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch="))
            .count()
    }

    async fn until_watching(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.api.open_watches() < n {
            assert!(Instant::now() < deadline, "watches not reopened");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Every collection the source watches: namespaces, nodes, local and remote pods, services,
/// endpoint slices, two policy kinds.
const WATCHES: usize = 8;

fn seed() -> Vec<Value> {
    vec![
        namespace("demo", true),
        namespace("legacy", false),
        pod("demo", "local", NODE, "10.0.0.1"),
        pod("demo", "remote", "n2", "10.0.0.2"),
        pod("legacy", "old", "n2", "10.0.0.3"),
        service("demo", "web", Some("10.96.0.1")),
        slice("demo", "web", &[("10.0.0.1", true), ("10.0.0.2", true)]),
        deny("demo", "no-evil", "cluster.local/ns/evil/sa/*"),
    ]
}

fn endpoints(s: &State, vip: &str) -> Vec<String> {
    let mut v: Vec<String> = s
        .endpoints_of_vip(ip(vip))
        .map(|w| w.name.to_string())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_watch_closed_by_the_server_resumes_without_loss_or_duplicates() {
    let b = bed(seed()).await;
    b.until_watching(WATCHES).await;
    let lists = b.pod_lists();
    for round in 0..3 {
        b.api.close_watches();
        b.api.apply(pod(
            "demo",
            &format!("r{round}"),
            "n2",
            &format!("10.0.2.{round}"),
        ));
        b.until_watching(WATCHES).await;
    }
    let s = b
        .until("pods added across closed watches", |s| {
            s.workload_by_name("demo", "r2").is_some()
        })
        .await;
    assert_eq!(s.workloads().len(), 6, "{:#}", s.dump());
    assert_eq!(b.pod_lists(), lists, "resumed from its version, no re-list");
    // Each resumed watch started at a resourceVersion, not from scratch.
    assert!(b
        .pod_watches()
        .iter()
        .all(|r| r.contains("resourceVersion=") && !r.contains("resourceVersion=0&")));
}

#[tokio::test]
async fn gone_410_relists_and_objects_deleted_in_the_gap_are_gone() {
    let b = bed(seed()).await;
    b.until_watching(WATCHES).await;
    let lists = b.pod_lists();
    b.api.refuse_watches(Some(503));
    b.api.close_watches();
    b.api.delete("v1", "Pod", Some("demo"), "remote");
    b.api.delete("v1", "Pod", Some("demo"), "local");
    b.api.apply(pod("demo", "fresh", NODE, "10.0.0.9"));
    b.api
        .delete(POLICY, "AuthorizationPolicy", Some("demo"), "no-evil");
    b.api.expire_history();
    b.api.refuse_watches(None);
    let s = b
        .until("re-listed after 410", |s| {
            s.workload_by_name("demo", "fresh").is_some()
                && s.workload_by_ip(ip("10.0.0.2")).is_none()
                && s.authorization_policies().is_empty()
        })
        .await;
    assert!(s.workload_by_name("demo", "local").is_none());
    assert_eq!(s.workloads().len(), 2, "{:#}", s.dump());
    assert_eq!(endpoints(&s, "10.96.0.1"), Vec::<String>::new());
    assert!(b.pod_lists() >= lists + 2, "both pod watchers re-listed");
}

#[tokio::test]
async fn failing_watches_are_counted_by_kind_and_the_last_state_kept() {
    let b = bed(seed()).await;
    b.until_watching(WATCHES).await;
    assert_eq!(b.disc.watch_failures("Pod"), 0);
    b.api.refuse_watches(Some(403));
    b.api.close_watches();
    let deadline = Instant::now() + Duration::from_secs(20);
    // Both pod watchers (this node's, the others') and the namespaces' fail.
    while b.disc.watch_failures("Pod") < 2 || b.disc.watch_failures("Namespace") < 1 {
        assert!(
            Instant::now() < deadline,
            "failed watches not counted: Pod {}, Namespace {}",
            b.disc.watch_failures("Pod"),
            b.disc.watch_failures("Namespace")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = b.disc.current();
    assert!(
        s.workload_by_name("demo", "local").is_some(),
        "{:#}",
        s.dump()
    );
    assert_eq!(endpoints(&s, "10.96.0.1").len(), 2);
    let mut registry = prometheus_client::registry::Registry::default();
    b.disc.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("ztunnel_discovery_watch_failures_total{kind=\"Pod\"} ")),
        "{text}"
    );
    b.api.refuse_watches(None);
    b.until_watching(WATCHES).await;
    b.api.apply(pod("demo", "fresh", NODE, "10.0.0.9"));
    b.until("a change after the watches recovered", |s| {
        s.workload_by_name("demo", "fresh").is_some()
    })
    .await;
}

#[tokio::test]
async fn bookmarks_are_accepted() {
    let b = bed(seed()).await;
    b.until_watching(WATCHES).await;
    // Other collections move the global version on; pods do not.
    for i in 0..5 {
        b.api.apply(namespace(&format!("other{i}"), false));
    }
    let rv = b.api.resource_version();
    b.api.bookmark();
    b.until("namespaces seen", |s| s.namespace("other4").is_some())
        .await;
    // The bookmark was queued on every watch stream before the streams are ended, so each
    // watcher reads it before the end of its stream (nothing else changes the pods meanwhile).
    b.api.close_watches();
    b.until_watching(WATCHES).await;
    let w = b.pod_watches();
    assert!(
        w.iter()
            .rev()
            .take(2)
            .all(|r| r.contains(&format!("resourceVersion={rv}&"))
                || r.ends_with(&format!("resourceVersion={rv}"))),
        "pod watches resume from the bookmark's version {rv}: {w:#?}"
    );
    assert!(w.iter().all(|r| r.contains("allowWatchBookmarks=true")));
    b.api.apply(pod("demo", "after", NODE, "10.0.0.7"));
    b.until("still following", |s| {
        s.workload_by_name("demo", "after").is_some()
    })
    .await;
}
