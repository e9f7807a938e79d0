//! Discovery from the Kubernetes API server, against the stand-in API server
//! (`harness::apiserver`) speaking the real list/watch protocol over HTTP: the daemon's
//! watchers fill the model from the initial lists, follow adds, updates, deletes and label
//! changes (down to the enrollment decision), resume a watch the server closed, re-list after
//! `410 Gone`, accept bookmarks, and refuse a bad policy while keeping the rest. The last test
//! runs the real `ztunnel run --discovery-source kubernetes` in a network namespace.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use ztunnel::capture::pods::{decide, Decision};
use ztunnel::discovery::{Discovery, State, DATAPLANE_MODE_LABEL};
use ztunnel_e2e::apiserver::ApiServer;

const NODE: &str = "n1";
const POLICY: &str = "security.ztunnel.dev/v1";

fn ns(name: &str, ambient: bool) -> Value {
    let labels = if ambient {
        json!({DATAPLANE_MODE_LABEL: "ambient"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod(ns: &str, name: &str, node: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": "web"}},
        "spec": {"nodeName": node, "serviceAccountName": "web", "containers": [{"name": "c", "image": "i"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

fn svc(ns: &str, name: &str, vip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": vip, "clusterIPs": [vip], "selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}})
}

fn slice(ns: &str, svc: &str, eps: &[(&str, bool)]) -> Value {
    let eps: Vec<_> = eps
        .iter()
        .map(|(ip, ready)| json!({"addresses": [ip], "conditions": {"ready": ready}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{svc}-x1"), "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": eps})
}

fn deny(ns: &str, name: &str, principal: &str) -> Value {
    json!({"apiVersion": POLICY, "kind": "AuthorizationPolicy", "metadata": {"name": name, "namespace": ns},
        "spec": {"action": "DENY", "rules": [{"from": [{"source": {"principals": [principal]}}]}]}})
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

/// Every collection the source watches: namespaces, local and remote pods, services,
/// endpoint slices, two policy kinds.
const WATCHES: usize = 7;

fn seed() -> Vec<Value> {
    vec![
        ns("demo", true),
        ns("legacy", false),
        pod("demo", "local", NODE, "10.0.0.1"),
        pod("demo", "remote", "n2", "10.0.0.2"),
        pod("legacy", "old", "n2", "10.0.0.3"),
        svc("demo", "web", "10.96.0.1"),
        slice("demo", "web", &[("10.0.0.1", true), ("10.0.0.2", true)]),
        deny("demo", "no-evil", "cluster.local/ns/evil/sa/*"),
    ]
}

fn endpoints(s: &State, vip: &str) -> Vec<String> {
    let mut v: Vec<String> = s
        .endpoints_of_vip(ip(vip))
        .iter()
        .map(|w| w.name.to_string())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn the_initial_list_fills_the_model() {
    let b = bed(seed()).await;
    let s = b.disc.current();
    assert_eq!(s.workloads().len(), 3);
    let local = s.workload_by_name("demo", "local").unwrap();
    assert!(!local.uid.is_empty() && local.labels.get("app").is_some());
    assert!(s.enrolled(local));
    let remote = s.workload_by_ip(ip("10.0.0.2")).unwrap();
    assert!(
        remote.uid.is_empty() && remote.labels.is_empty(),
        "remote pods are lean"
    );
    assert_eq!(&*remote.node, "n2");
    assert!(!s.enrolled(s.workload_by_ip(ip("10.0.0.3")).unwrap()));
    let web = s.service_by_vip(ip("10.96.0.1")).unwrap();
    assert_eq!(web.target_port(80), Some(8080), "named targetPort resolved");
    assert_eq!(endpoints(&s, "10.96.0.1"), ["local", "remote"]);
    assert_eq!(s.authorization_policies().len(), 1);
    assert_eq!(s.enrolled_namespaces(), vec![Arc::from("demo")]);
    // Local pods are watched by node, remote ones without this node. The watches open after
    // the initial lists have returned, so wait for them rather than race them.
    b.until_watching(WATCHES).await;
    let w = b.pod_watches();
    assert!(
        w.iter()
            .any(|r| r.contains("fieldSelector=spec.nodeName%3Dn1")),
        "{w:?}"
    );
    assert!(
        w.iter()
            .any(|r| r.contains("fieldSelector=spec.nodeName%21%3Dn1")),
        "{w:?}"
    );
}

#[tokio::test]
async fn adds_updates_and_deletes_reach_the_model() {
    let b = bed(seed()).await;
    let api = &b.api;
    // Pods.
    api.apply(pod("demo", "new", NODE, "10.0.0.4"));
    b.until("pod added", |s| s.workload_by_name("demo", "new").is_some())
        .await;
    api.apply(pod("demo", "new", NODE, "10.0.0.5"));
    b.until("pod updated (new IP)", |s| {
        s.workload_by_ip(ip("10.0.0.5")).is_some() && s.workload_by_ip(ip("10.0.0.4")).is_none()
    })
    .await;
    let mut done = pod("demo", "new", NODE, "10.0.0.5");
    done["status"]["phase"] = json!("Succeeded");
    api.apply(done);
    b.until("terminal pod dropped", |s| {
        s.workload_by_name("demo", "new").is_none()
    })
    .await;
    api.delete("v1", "Pod", Some("demo"), "remote");
    b.until("pod deleted", |s| {
        s.workload_by_ip(ip("10.0.0.2")).is_none()
    })
    .await;
    // Endpoint slices: readiness and deletion.
    api.apply(pod("demo", "remote", "n2", "10.0.0.2"));
    api.apply(slice(
        "demo",
        "web",
        &[("10.0.0.1", false), ("10.0.0.2", true)],
    ));
    b.until("not-ready endpoint dropped", |s| {
        endpoints(s, "10.96.0.1") == ["remote"]
    })
    .await;
    api.delete(
        "discovery.k8s.io/v1",
        "EndpointSlice",
        Some("demo"),
        "web-x1",
    );
    b.until("slice deleted", |s| endpoints(s, "10.96.0.1").is_empty())
        .await;
    // Services.
    api.apply(svc("demo", "api", "10.96.0.2"));
    b.until("service added", |s| {
        s.service_by_vip(ip("10.96.0.2")).is_some()
    })
    .await;
    let mut moved = svc("demo", "api", "10.96.0.3");
    moved["spec"]["ports"][0]["targetPort"] = json!(9090);
    api.apply(moved);
    b.until("service updated", |s| {
        s.service_by_vip(ip("10.96.0.2")).is_none()
            && s.service_by_vip(ip("10.96.0.3"))
                .is_some_and(|v| v.target_port(80) == Some(9090))
    })
    .await;
    api.delete("v1", "Service", Some("demo"), "api");
    b.until("service deleted", |s| {
        s.service_by_vip(ip("10.96.0.3")).is_none()
    })
    .await;
    // Policies.
    api.apply(json!({"apiVersion": POLICY, "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": "demo"}, "spec": {"mtls": {"mode": "STRICT"}}}));
    b.until("peer authentication added", |s| {
        s.peer_authentications().len() == 1
    })
    .await;
    api.apply(deny("demo", "no-evil", "cluster.local/ns/worse/sa/*"));
    b.until("policy updated", |s| {
        s.authorization_policies()[0].spec.rules[0].from[0]
            .source
            .principals
            == ["cluster.local/ns/worse/sa/*"]
    })
    .await;
    api.delete(POLICY, "AuthorizationPolicy", Some("demo"), "no-evil");
    api.delete(POLICY, "PeerAuthentication", Some("demo"), "strict");
    b.until("policies deleted", |s| {
        s.authorization_policies().is_empty() && s.peer_authentications().is_empty()
    })
    .await;
    assert!(b.disc.reloads_ok() > 0);
    assert_eq!(b.disc.reloads_failed(), 0);
}

fn pod_ref(ns: &str, name: &str) -> ztunnel_proto::enroll::PodRef {
    ztunnel_proto::enroll::PodRef {
        namespace: ns.into(),
        name: name.into(),
        uid: String::new(),
    }
}

fn enrolls(s: &State, ns: &str, name: &str, addr: &str) -> bool {
    matches!(
        decide(s, NODE, &pod_ref(ns, name), &[ip(addr)]),
        Decision::Enroll(_)
    )
}

#[tokio::test]
async fn label_changes_reach_the_model_and_the_enrollment_decision() {
    let b = bed(seed()).await;
    let api = &b.api;
    api.apply(pod("legacy", "here", NODE, "10.0.1.1"));
    let s = b
        .until("legacy pod known", |s| {
            s.workload_by_name("legacy", "here").is_some()
        })
        .await;
    assert!(!enrolls(&s, "legacy", "here", "10.0.1.1"));
    assert!(enrolls(&s, "demo", "local", "10.0.0.1"));

    // The namespace gains the label: its pods enroll, remote ones become HBONE.
    api.apply(ns("legacy", true));
    let s = b
        .until("legacy enrolled", |s| s.namespace_enrolled("legacy"))
        .await;
    assert!(enrolls(&s, "legacy", "here", "10.0.1.1"));
    assert!(s.enrolled(s.workload_by_ip(ip("10.0.0.3")).unwrap()));

    // A pod opts out.
    let mut out = pod("demo", "local", NODE, "10.0.0.1");
    out["metadata"]["labels"][DATAPLANE_MODE_LABEL] = json!("none");
    api.apply(out);
    let s = b
        .until("pod opted out", |s| {
            !s.enrolled(s.workload_by_name("demo", "local").unwrap())
        })
        .await;
    assert!(matches!(
        decide(&s, NODE, &pod_ref("demo", "local"), &[ip("10.0.0.1")]),
        Decision::NotEnrolled(ref why) if why.contains("opted out")
    ));
    // A remote pod opts out: outbound to it is plain TCP.
    let mut out = pod("demo", "remote", "n2", "10.0.0.2");
    out["metadata"]["labels"][DATAPLANE_MODE_LABEL] = json!("none");
    api.apply(out);
    b.until("remote pod opted out", |s| {
        !s.enrolled(s.workload_by_ip(ip("10.0.0.2")).unwrap())
    })
    .await;

    // The namespace loses the label: release.
    api.apply(ns("legacy", false));
    let s = b
        .until("legacy released", |s| !s.namespace_enrolled("legacy"))
        .await;
    assert!(matches!(
        decide(&s, NODE, &pod_ref("legacy", "here"), &[ip("10.0.1.1")]),
        Decision::NotEnrolled(_)
    ));
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
    b.api.refuse_watches(true);
    b.api.close_watches();
    b.api.delete("v1", "Pod", Some("demo"), "remote");
    b.api.delete("v1", "Pod", Some("demo"), "local");
    b.api.apply(pod("demo", "fresh", NODE, "10.0.0.9"));
    b.api
        .delete(POLICY, "AuthorizationPolicy", Some("demo"), "no-evil");
    b.api.expire_history();
    b.api.refuse_watches(false);
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
async fn bookmarks_are_accepted() {
    let b = bed(seed()).await;
    b.until_watching(WATCHES).await;
    // Other collections move the global version on; pods do not.
    for i in 0..5 {
        b.api.apply(ns(&format!("other{i}"), false));
    }
    let rv = b.api.resource_version();
    b.api.bookmark();
    // Give the bookmark time to arrive (nothing else changes the pods meanwhile).
    b.until("namespaces seen", |s| s.namespace("other4").is_some())
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
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

#[tokio::test]
async fn a_bad_policy_is_refused_and_counted_and_the_rest_stays() {
    let b = bed(seed()).await;
    let http_only = json!({"apiVersion": POLICY, "kind": "AuthorizationPolicy",
        "metadata": {"name": "http", "namespace": "demo"},
        "spec": {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}});
    b.api.apply(http_only);
    b.api.apply(pod("demo", "next", NODE, "10.0.0.8"));
    let s = b
        .until("the pod after the bad policy arrives", |s| {
            s.workload_by_name("demo", "next").is_some()
        })
        .await;
    assert_eq!(b.disc.objects_refused(), 1);
    assert_eq!(s.authorization_policies().len(), 1, "only the good one");
    assert_eq!(s.workloads().len(), 4);
    // A good policy updated into a bad one: refused, and its last good version kept.
    let mut typo = deny("demo", "no-evil", "x");
    typo["spec"]["rules"][0]["from"][0]["source"] = json!({"principalz": ["x"]});
    b.api.apply(typo);
    b.api.apply(pod("demo", "next2", NODE, "10.0.0.10"));
    let s = b
        .until("the next pod arrives", |s| {
            s.workload_by_name("demo", "next2").is_some()
        })
        .await;
    assert_eq!(b.disc.objects_refused(), 2);
    let p = &s.authorization_policies()[0];
    assert_eq!(p.metadata.name, "no-evil");
    assert_eq!(
        p.spec.rules[0].from[0].source.principals,
        ["cluster.local/ns/evil/sa/*"]
    );
    assert_eq!(b.disc.reloads_failed(), 0);
}

/// The real daemon, `--discovery-source kubernetes`, against the stand-in inside its own
/// network namespace: the workload shows in `/config_dump`.
#[test]
fn the_daemon_runs_on_kubernetes_discovery() {
    use ztunnel_e2e::{daemon, netns};
    netns::require_prerequisites();
    let host = netns::Netns::new("kd-n1").unwrap();
    let listener = host
        .block_on(async { std::net::TcpListener::bind("127.0.0.1:0") })
        .unwrap();
    let api = ApiServer::start_on(listener);
    for o in seed() {
        api.apply(o);
    }
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kc, "daemon-token");
    let args: Vec<String> = [
        "run",
        "--capture-mode",
        "node",
        "--node-name",
        NODE,
        "--discovery-source",
        "kubernetes",
        "--kubeconfig",
        kc.to_str().unwrap(),
        "--ca-dir",
        dir.path().join("ca").to_str().unwrap(),
        "--state-dir",
        dir.path().join("state").to_str().unwrap(),
        "--drain-grace",
        "1s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut p = daemon::Process::start(&host, "n1", dir.path(), &args, &[]).unwrap();
    daemon::wait_ready(
        &host,
        &mut p,
        "127.0.0.1:15021",
        "/healthz/ready",
        Duration::from_secs(30),
    )
    .unwrap();
    let dump = |what: &str| -> Value {
        let (code, body) = daemon::http(&host, "GET", "127.0.0.1:15000", "/config_dump").unwrap();
        assert_eq!(code, 200, "{what}: {body}");
        serde_json::from_str(&body).unwrap()
    };
    let names = |d: &Value| -> Vec<String> {
        let mut v: Vec<String> = d["discovery"]["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["name"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&dump("initial")), ["local", "old", "remote"]);
    api.apply(pod("demo", "later", "n2", "10.0.0.6"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !names(&dump("later")).contains(&"later".to_string()) {
        assert!(
            Instant::now() < deadline,
            "the new pod never showed:\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(p.log().contains("discovery loaded from Kubernetes"));
}
