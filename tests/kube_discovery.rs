//! Discovery from the Kubernetes API server, against the real control plane
//! (`harness::controlplane`: kube-apiserver and etcd, `deploy/base` applied): the daemon's
//! watchers (`ztunnel::discovery::watch_kubernetes`, run in-process on the control plane
//! host's runtime) use a ServiceAccount token of `ztunnel-system/ztunnel` bound to a daemon
//! Pod on the test's node, so they have exactly `deploy/`'s permissions. They fill the model
//! from the initial lists (local pods watched by node, remote ones without it, every watch
//! asking for bookmarks, as the audit log shows), follow adds, updates and
//! deletes of pods, services, endpoint slices and both policy kinds, namespace and pod label
//! changes down to the enrollment decision, and refuse a policy the CRD admits but the
//! daemon cannot enforce while keeping the rest; under `--istio-compat`, they refuse to start
//! without read access to Istio's policy kinds, and start where the Gateway API is not
//! installed (with the identity of an older `deploy/istio-compat`, which may read Istio's
//! policy kinds only), knowing no waypoint ready. The last test runs the real
//! `ztunnel run --discovery-source kubernetes` in a network namespace attached to the control
//! plane, its API client taking the post-quantum hybrid key exchange alone (`pqc-only`).
//!
//! The API server is shared by every test of the binary, and the daemon sees every object of
//! the cluster: each test works in namespaces and on nodes of its own, gives its pods
//! addresses of its own (`10.<net>.0.x`), and asserts only on its own objects. Faults the real
//! server will not produce on demand (a watch closed mid-stream, `410 Gone`, a bookmark before
//! a closed watch) are tested against the stand-in in `kube_faults.rs`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use ztunnel::capture::decide::{decide, Decision};
use ztunnel::discovery::policy::PolicyObject;
use ztunnel::discovery::{Discovery, State, DATAPLANE_MODE_LABEL};
use ztunnel::policy::status_of;
use ztunnel_e2e::controlplane::{self, ControlPlane, KubePod};
use ztunnel_e2e::objects::{deny, namespace, service, slice, POLICY};

// The faults the real server will not produce, against the stand-in, in this binary (they do
// not use the shared control plane).
mod kube_faults;

const DAEMON_USER: &str = "system:serviceaccount:ztunnel-system:ztunnel";

/// Every collection the source watches: namespaces, nodes, local and remote pods, services,
/// endpoint slices, two policy kinds.
const WATCHES: usize = 8;

/// The second octet of each test's pod addresses.
static NEXT_NET: AtomicU8 = AtomicU8::new(40);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// One test's objects on the shared API server: namespaces `demo` (ambient) and `legacy`,
/// nodes `node` (the daemon's) and `other`, pod addresses `10.<net>.0.x`, and the daemon's
/// Pod and kubeconfig.
struct Names {
    cp: &'static ControlPlane,
    demo: String,
    legacy: String,
    node: String,
    other: String,
    net: u8,
    daemon_pod: String,
    kubeconfig: PathBuf,
    dir: tempfile::TempDir,
}

impl Names {
    /// The namespaces, the seed objects and the daemon's Pod and token.
    fn seeded() -> Names {
        let cp = controlplane::shared().install_base();
        let demo = cp.namespace("demo");
        let legacy = cp.namespace("legacy");
        let node = format!("{demo}-n1");
        let other = format!("{demo}-n2");
        let net = NEXT_NET.fetch_add(1, Ordering::Relaxed);
        cp.create_namespace(&demo, json!({DATAPLANE_MODE_LABEL: "ambient"}))
            .unwrap();
        cp.create_namespace(&legacy, json!({})).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let daemon_pod = format!("ztunnel-{node}");
        let token = cp
            .system_pod_token("ztunnel", &daemon_pod, &node, &[controlplane::ISSUER])
            .unwrap();
        let kubeconfig = cp
            .token_kubeconfig(dir.path(), "daemon.kubeconfig", &token)
            .unwrap();
        let n = Names {
            cp,
            demo,
            legacy,
            node,
            other,
            net,
            daemon_pod,
            kubeconfig,
            dir,
        };
        let (demo, legacy) = (n.demo.clone(), n.legacy.clone());
        let (node, other) = (n.node.clone(), n.other.clone());
        n.pod(&demo, "local", &node, "0.1", json!({}));
        n.pod(&demo, "remote", &other, "0.2", json!({}));
        n.pod(&legacy, "old", &other, "0.3", json!({}));
        cp.apply(service(&demo, "web", None)).unwrap();
        cp.apply(slice(
            &demo,
            "web",
            &[(&n.addr("0.1"), true), (&n.addr("0.2"), true)],
        ))
        .unwrap();
        cp.apply(deny(&demo, "no-evil", "cluster.local/ns/evil/sa/*"))
            .unwrap();
        n
    }

    /// This test's address `10.<net>.<host>`.
    fn addr(&self, host: &str) -> String {
        format!("10.{}.{host}", self.net)
    }

    /// A Running pod of ServiceAccount `web` at `10.<net>.<host>` with labels `app: <name>`
    /// and `extra`.
    fn pod(&self, ns: &str, name: &str, node: &str, host: &str, extra: Value) {
        let mut labels = json!({"app": name});
        for (k, v) in extra.as_object().into_iter().flatten() {
            labels[k] = v.clone();
        }
        let addr = self.addr(host);
        self.cp
            .run_pod(&KubePod {
                labels,
                ..KubePod::running(ns, name, "web", node, &[&addr])
            })
            .unwrap();
    }

    /// The Service's cluster IP (the API server allocates it).
    fn vip(&self, ns: &str, name: &str) -> String {
        self.cp.get("v1", "Service", Some(ns), name).unwrap()["spec"]["clusterIP"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The audit events of requests made with this test's daemon token.
    fn daemon_requests(&self) -> Vec<Value> {
        self.cp
            .audit_events()
            .into_iter()
            .filter(|e| {
                e["user"]["username"] == DAEMON_USER
                    && e["user"]["extra"]["authentication.kubernetes.io/pod-name"][0]
                        == self.daemon_pod.as_str()
            })
            .collect()
    }

    /// The request URIs of the daemon's watches, as they started.
    fn watches(&self) -> Vec<String> {
        self.daemon_requests()
            .iter()
            .filter(|e| e["verb"] == "watch" && e["stage"] == "ResponseStarted")
            .filter_map(|e| e["requestURI"].as_str().map(String::from))
            .collect()
    }
}

struct Bed {
    n: Names,
    disc: Discovery,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The seeded objects, and the daemon's Kubernetes source for the test's node on them.
fn bed() -> Bed {
    let n = Names::seeded();
    let (kc, node) = (n.kubeconfig.clone(), n.node.clone());
    let (disc, task) = n.cp.ns.block_on(async move {
        let client = ztunnel::discovery::kube::client(Some(&kc)).await.unwrap();
        tokio::time::timeout(
            Duration::from_secs(20),
            ztunnel::discovery::watch_kubernetes(
                client,
                "cluster.local".into(),
                node,
                Default::default(),
                Duration::from_millis(20),
            ),
        )
        .await
        .expect("the initial lists complete")
        .unwrap()
    });
    Bed { n, disc, task }
}

impl Bed {
    /// The workloads of this test's namespaces, by name.
    fn mine(&self, s: &State) -> Vec<String> {
        let mut v: Vec<String> = s
            .workloads()
            .iter()
            .filter(|w| *w.namespace == *self.n.demo || *w.namespace == *self.n.legacy)
            .map(|w| w.name.to_string())
            .collect();
        v.sort();
        v
    }

    /// This test's AuthorizationPolicies.
    fn policies(&self, s: &State) -> Vec<ztunnel::discovery::policy::AuthorizationPolicy> {
        s.authorization_policies()
            .iter()
            .filter(|p| p.metadata.namespace == self.n.demo)
            .cloned()
            .collect()
    }

    /// Waits until the published state satisfies `f` (what: for the failure message).
    fn until(&self, what: &str, f: impl Fn(&State) -> bool) -> Arc<State> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.disc.current();
            if f(&s) {
                return s;
            }
            if Instant::now() > deadline {
                let mine: Vec<Value> = s.dump()["workloads"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|w| w["namespace"] == self.n.demo.as_str())
                    .cloned()
                    .collect();
                panic!(
                    "{what}: not reached; workloads of {}: {mine:#?}",
                    self.n.demo
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn until_watching(&self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let w = self.n.watches();
            if w.len() >= WATCHES {
                return w;
            }
            assert!(Instant::now() < deadline, "watches not opened: {w:#?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pod(&self, ns: &str, name: &str, node: &str, host: &str) {
        self.n.pod(ns, name, node, host, json!({}));
    }

    fn apply(&self, o: Value) {
        self.n.cp.apply(o).unwrap();
    }

    fn delete(&self, api_version: &str, kind: &str, ns: &str, name: &str) {
        self.n.cp.delete(api_version, kind, Some(ns), name).unwrap();
    }
}

fn endpoints(s: &State, vip: &str) -> Vec<String> {
    let mut v: Vec<String> = s
        .endpoints_of_vip(ip(vip))
        .map(|w| w.name.to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn the_initial_list_fills_the_model() {
    let b = bed();
    let n = &b.n;
    let s = b.disc.current();
    assert_eq!(b.mine(&s), ["local", "old", "remote"]);
    let local = s.workload_by_name(&n.demo, "local").unwrap();
    assert!(!local.uid.is_empty() && local.labels.get("app").is_some());
    assert!(s.enrolled(local));
    let remote = s.workload_by_ip(ip(&n.addr("0.2"))).unwrap();
    assert!(
        remote.uid.is_empty() && remote.labels.is_empty(),
        "remote pods are lean"
    );
    assert_eq!(*remote.node, *n.other);
    assert!(!s.enrolled(s.workload_by_ip(ip(&n.addr("0.3"))).unwrap()));
    let vip = n.vip(&n.demo, "web");
    let web = s.service_by_vip(ip(&vip)).unwrap();
    assert_eq!(web.target_port(80), Some(8080), "named targetPort resolved");
    assert_eq!(endpoints(&s, &vip), ["local", "remote"]);
    assert_eq!(b.policies(&s).len(), 1);
    let enrolled = s.enrolled_namespaces();
    assert!(enrolled.contains(&Arc::from(n.demo.as_str())));
    assert!(!enrolled.contains(&Arc::from(n.legacy.as_str())));

    // What the daemon asked the API server, from its audit log: local pods watched by node,
    // remote ones without this node, every watch allowing bookmarks, every list answered from
    // the watch cache. A resource whose cache is still filling (a CRD installed moments before,
    // when this test runs first) answers `429`; the daemon lists it again until it gets `200`.
    // The watches open after the initial lists have returned, so wait for them rather than
    // race them.
    let w = b.until_watching();
    let sel = |op: &str| format!("fieldSelector=spec.nodeName{op}{}", n.node);
    assert!(
        w.iter()
            .any(|r| r.starts_with("/api/v1/pods?") && r.contains(&sel("%3D"))),
        "{w:#?}"
    );
    assert!(
        w.iter()
            .any(|r| r.starts_with("/api/v1/pods?") && r.contains(&sel("%21%3D"))),
        "{w:#?}"
    );
    assert!(
        w.iter().all(|r| r.contains("allowWatchBookmarks=true")),
        "{w:#?}"
    );
    let lists: Vec<Value> = n
        .daemon_requests()
        .into_iter()
        .filter(|e| e["verb"] == "list" && e["stage"] == "ResponseComplete")
        .collect();
    assert!(lists.len() >= WATCHES, "{lists:#?}");
    // The last answer for each list (the audit log is in order; a list asked again has the
    // same URI).
    let mut last = std::collections::BTreeMap::new();
    for l in &lists {
        let code = &l["responseStatus"]["code"];
        assert!(*code == 200 || *code == 429, "{l:#}");
        // From the API server's watch cache, in one answer: not a paged read of etcd.
        let uri = l["requestURI"].as_str().unwrap_or_default();
        assert!(
            uri.contains("resourceVersion=0") && !uri.contains("limit="),
            "{uri}"
        );
        last.insert(uri, code.clone());
    }
    assert!(last.len() >= WATCHES, "{last:#?}");
    assert!(last.values().all(|c| *c == 200), "{last:#?}");
}

#[test]
fn adds_updates_and_deletes_reach_the_model() {
    let b = bed();
    let n = &b.n;
    let (demo, node, other) = (n.demo.as_str(), n.node.as_str(), n.other.as_str());
    // Pods. Scheduled without an address (the kubelet has not reported one) it is no
    // workload; a pod created after it, on the same watch, shows that it was seen.
    n.cp.run_pod(&KubePod {
        phase: None,
        ..KubePod::running(demo, "new", "web", node, &[])
    })
    .unwrap();
    b.pod(demo, "marker", node, "0.9");
    let s = b.until("the pod after the scheduled one", |s| {
        s.workload_by_name(demo, "marker").is_some()
    });
    assert!(s.workload_by_name(demo, "new").is_none(), "no address yet");
    let new_ip = n.addr("0.4");
    n.cp.set_pod_status(demo, "new", "Running", &[&new_ip])
        .unwrap();
    b.until("pod updated (running, its address)", |s| {
        s.workload_by_ip(ip(&new_ip))
            .is_some_and(|w| &*w.name == "new")
    });
    n.pod(demo, "new", node, "0.4", json!({"tier": "front"}));
    b.until("pod labels updated", |s| {
        s.workload_by_name(demo, "new")
            .is_some_and(|w| w.labels.get("tier").map(|v| &**v) == Some("front"))
    });
    n.cp.set_pod_status(demo, "new", "Succeeded", &[&new_ip])
        .unwrap();
    b.until("terminal pod dropped", |s| {
        s.workload_by_name(demo, "new").is_none()
    });
    b.delete("v1", "Pod", demo, "remote");
    b.until("pod deleted", |s| {
        s.workload_by_ip(ip(&n.addr("0.2"))).is_none()
    });
    // Endpoint slices: readiness and deletion.
    let vip = n.vip(demo, "web");
    b.pod(demo, "remote", other, "0.2");
    b.apply(slice(
        demo,
        "web",
        &[(&n.addr("0.1"), false), (&n.addr("0.2"), true)],
    ));
    b.until("not-ready endpoint dropped", |s| {
        endpoints(s, &vip) == ["remote"]
    });
    b.delete("discovery.k8s.io/v1", "EndpointSlice", demo, "web-x1");
    b.until("slice deleted", |s| endpoints(s, &vip).is_empty());
    // Services (a cluster IP cannot change: the target port does).
    b.apply(service(demo, "api", None));
    let api_vip = n.vip(demo, "api");
    b.until("service added", |s| {
        s.service_by_vip(ip(&api_vip))
            .is_some_and(|v| &*v.name == "api")
    });
    let mut moved = service(demo, "api", None);
    moved["spec"]["ports"][0]["targetPort"] = json!(9090);
    b.apply(moved);
    b.until("service updated", |s| {
        s.service_by_vip(ip(&api_vip))
            .is_some_and(|v| v.target_port(80) == Some(9090))
    });
    b.delete("v1", "Service", demo, "api");
    b.until("service deleted", |s| {
        s.service_by_vip(ip(&api_vip)).is_none()
    });
    // Policies.
    b.apply(json!({"apiVersion": POLICY, "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": demo}, "spec": {"mtls": {"mode": "STRICT"}}}));
    b.until("peer authentication added", |s| {
        s.peer_authentications()
            .iter()
            .any(|p| p.metadata.namespace == demo)
    });
    b.apply(deny(demo, "no-evil", "cluster.local/ns/worse/sa/*"));
    b.until("policy updated", |s| {
        b.policies(s)[0].spec.rules[0].from[0].source.principals == ["cluster.local/ns/worse/sa/*"]
    });
    b.delete(POLICY, "AuthorizationPolicy", demo, "no-evil");
    b.delete(POLICY, "PeerAuthentication", demo, "strict");
    b.until("policies deleted", |s| {
        b.policies(s).is_empty()
            && !s
                .peer_authentications()
                .iter()
                .any(|p| p.metadata.namespace == demo)
    });
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

fn enrolls(s: &State, node: &str, ns: &str, name: &str, addr: &str) -> bool {
    matches!(
        decide(s, node, &pod_ref(ns, name), &[ip(addr)]),
        Decision::Enroll(_)
    )
}

#[test]
fn label_changes_reach_the_model_and_the_enrollment_decision() {
    let b = bed();
    let n = &b.n;
    let (demo, legacy, node) = (n.demo.as_str(), n.legacy.as_str(), n.node.as_str());
    let (here, local) = (n.addr("1.1"), n.addr("0.1"));
    b.pod(legacy, "here", node, "1.1");
    let s = b.until("legacy pod known", |s| {
        s.workload_by_name(legacy, "here").is_some()
    });
    assert!(!enrolls(&s, node, legacy, "here", &here));
    assert!(enrolls(&s, node, demo, "local", &local));

    // The namespace gains the label: its pods enroll, remote ones become HBONE.
    b.apply(namespace(legacy, true));
    let s = b.until("legacy enrolled", |s| s.namespace_enrolled(legacy));
    assert!(enrolls(&s, node, legacy, "here", &here));
    assert!(s.enrolled(s.workload_by_ip(ip(&n.addr("0.3"))).unwrap()));

    // A pod opts out.
    n.pod(
        demo,
        "local",
        node,
        "0.1",
        json!({DATAPLANE_MODE_LABEL: "none"}),
    );
    let s = b.until("pod opted out", |s| {
        !s.enrolled(s.workload_by_name(demo, "local").unwrap())
    });
    assert!(matches!(
        decide(&s, node, &pod_ref(demo, "local"), &[ip(&local)]),
        Decision::NotEnrolled(ref why) if why.contains("opted out")
    ));
    // A remote pod opts out: outbound to it is plain TCP.
    n.pod(
        demo,
        "remote",
        &n.other,
        "0.2",
        json!({DATAPLANE_MODE_LABEL: "none"}),
    );
    b.until("remote pod opted out", |s| {
        !s.enrolled(s.workload_by_ip(ip(&n.addr("0.2"))).unwrap())
    });

    // The namespace loses the label: release.
    b.apply(namespace(legacy, false));
    let s = b.until("legacy released", |s| !s.namespace_enrolled(legacy));
    assert!(matches!(
        decide(&s, node, &pod_ref(legacy, "here"), &[ip(&here)]),
        Decision::NotEnrolled(_)
    ));
}

#[test]
fn a_policy_the_daemon_cannot_read_is_kept_and_fails_closed() {
    let b = bed();
    let n = &b.n;
    let demo = n.demo.as_str();
    let refused = b.disc.objects_refused();
    // The CRD's pattern for IPv6 blocks is loose: the API server admits this, no daemon can
    // read it. The policy is kept, marked unreadable (so it fails closed), never skipped.
    let unreadable = json!({"apiVersion": POLICY, "kind": "AuthorizationPolicy",
        "metadata": {"name": "unreadable", "namespace": demo},
        "spec": {"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["1:2:3:4:5:6:7:8:9"]}}]}]}});
    b.apply(unreadable);
    let s = b.until("the unreadable policy arrives", |s| {
        b.policies(s)
            .iter()
            .any(|p| p.metadata.name == "unreadable")
    });
    let p = b
        .policies(&s)
        .into_iter()
        .find(|p| p.metadata.name == "unreadable")
        .unwrap();
    let status = status_of(&PolicyObject::Authorization(p));
    assert!(
        status.fail_closed && status.message.contains("1:2:3:4:5:6:7:8:9"),
        "{status:?}"
    );
    assert_eq!(b.policies(&s).len(), 2, "the good one stays");
    // A good policy updated into one the daemon cannot read: the new version is what counts
    // (it fails closed), not the last good one, which could allow what the user now denies.
    let mut typo = deny(demo, "no-evil", "x");
    typo["spec"]["rules"][0]["from"][0]["source"] = json!({"ipBlocks": ["fd00::1::2"]});
    b.apply(typo);
    let fails_closed = |p: &ztunnel::discovery::policy::AuthorizationPolicy| {
        status_of(&PolicyObject::Authorization(p.clone())).fail_closed
    };
    let s = b.until("the updated policy arrives", |s| {
        b.policies(s)
            .iter()
            .any(|p| p.metadata.name == "no-evil" && fails_closed(p))
    });
    assert_eq!(b.policies(&s).len(), 2);
    assert_eq!(
        b.disc.objects_refused(),
        refused,
        "policies are never refused"
    );
    assert_eq!(b.disc.reloads_failed(), 0);
}

/// Under `--istio-compat`, a daemon that may not read Istio's policy kinds (`deploy/base`
/// grants ours only; the `istio-compat` overlay adds Istio's) refuses to start, naming what it
/// could not list, rather than run without Istio's policies or wait for ever on their watch.
#[test]
fn istio_compat_refuses_to_start_without_istios_policies() {
    let n = Names::seeded();
    let error = match n.cp.istio_discovery(&n.kubeconfig, &n.node) {
        Err(e) => e,
        Ok(_) => panic!("the watchers started without Istio's policies"),
    };
    assert!(
        error.contains("--istio-compat: cannot list security.istio.io/v1 authorizationpolicies")
            && error.contains("forbidden"),
        "{error}"
    );
}

/// Under `--istio-compat` on an API server without the Gateway API (this binary never installs
/// it), a daemon granted Istio's kinds but not the Gateway API's starts: the API server's
/// discovery, which it may read, says there are no Gateways, which it may not list. What
/// names a waypoint is then refused: no waypoint is known ready.
#[test]
fn istio_compat_without_the_gateway_api_starts_and_refuses_what_names_a_waypoint() {
    let n = Names::seeded();
    n.cp.install_istio_crds();
    n.cp.kubectl(&[
        "label",
        "namespace",
        &n.demo,
        "istio.io/use-waypoint=waypoint",
    ])
    .unwrap();
    let kc =
        n.cp.istio_kubeconfig_without(n.dir.path(), &n.node, "gateway.networking.k8s.io")
            .unwrap();
    let s =
        n.cp.istio_discovery(&kc, &n.node)
            .expect("started without the Gateway API")
            .current();
    let w = s.workload_by_ip(n.addr("0.1").parse().unwrap());
    let svc = s.service_by_vip(n.vip(&n.demo, "web").parse().unwrap());
    let got = (
        s.workload_waypoint(w.expect("the pod")),
        s.waypoint_of(svc.expect("the Service")),
    );
    let want = Some(format!("{}/waypoint", n.demo));
    assert_eq!(got, (want.clone(), want));
}

/// The real daemon, `--discovery-source kubernetes`, in a network namespace attached to the
/// control plane, with its bound token: its workloads show in `/config_dump` and follow the
/// API server.
#[test]
fn the_daemon_runs_on_kubernetes_discovery() {
    use ztunnel_e2e::{daemon, netns};
    let n = Names::seeded();
    let host = netns::Netns::new("kd-n1").unwrap();
    n.cp.attach(&host).unwrap();
    let dir = n.dir.path();
    let args: Vec<String> = [
        "run",
        "--capture-mode",
        "node",
        "--node-name",
        &n.node,
        "--discovery-source",
        "kubernetes",
        "--kubeconfig",
        n.kubeconfig.to_str().unwrap(),
        "--ca-dir",
        dir.join("ca").to_str().unwrap(),
        "--state-dir",
        dir.join("state").to_str().unwrap(),
        "--drain-grace",
        "1s",
        // Its API client too takes the post-quantum hybrid alone: the real API server offers
        // it (the other tests run on the default, which prefers it).
        "--tls-key-exchange",
        "pqc-only",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut p = daemon::Process::start(&host, "n1", dir, &args, &[]).unwrap();
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
            .filter(|w| w["namespace"] == n.demo.as_str() || w["namespace"] == n.legacy.as_str())
            .map(|w| w["name"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&dump("initial")), ["local", "old", "remote"]);
    n.pod(&n.demo, "later", &n.other, "0.6", json!({}));
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
    // Nothing it asked was forbidden.
    let forbidden: Vec<Value> = n
        .daemon_requests()
        .into_iter()
        .filter(|e| e["responseStatus"]["code"] == 403)
        .collect();
    assert!(forbidden.is_empty(), "{forbidden:#?}");
}
