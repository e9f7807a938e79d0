//! Enrollment driven by the cluster state, on the two-node test bed (`harness/testbed.rs`):
//! pods that run unenrolled in a plain namespace are enrolled without any CNI call when the
//! namespace is labelled ambient in the mesh file (the daemon finds each pod's netns itself by
//! its IP under /proc), released when a pod opts out or the label goes, released by a later
//! CNI DEL, and served again by a restarted daemon; a netns it cannot tell apart is refused.
//! The pod annotation is tested in-process against the stand-in API server, and end to end
//! with a daemon whose discovery is that stand-in.
//!
//! Each test pod gets a `sleep` process in its netns (a sandbox's `pause`), since the daemon
//! finds namespaces through processes. Pod IPs (10.20.x.8x) are unused by other tests, so test
//! beds of other test binaries on the same machine cannot make a pod's IP ambiguous. Needs
//! root, `ip`, `nft` and `containernetworking-plugins`.

use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztunnel::capture::annotate::{Annotator, KubeAnnotator, Status, ANNOTATION};
use ztunnel::capture::find::{self, FindError};
use ztunnel::capture::netns::Netns as ZNetns;
use ztunnel_e2e::apiserver::ApiServer;
use ztunnel_e2e::apps;
use ztunnel_e2e::daemon::{self, access_lines, die_with_test, metric, Process};
use ztunnel_e2e::netns::{self, Netns};
use ztunnel_e2e::testbed::{PodSpec, TestBed};
use ztunnel_proto::enroll::{self, Attachment, PodAdd, PodRef, Reply, Request};

fn spec(name: &'static str, sa: &'static str, node: usize, ip: &'static str) -> PodSpec {
    PodSpec {
        name,
        namespace: "shop",
        sa,
        app: name,
        node,
        ip,
        ip6: None,
    }
}

/// A process holding a netns, as a pod sandbox's `pause` does; killed on drop.
struct Pause(Child);

impl Pause {
    /// Starts the sandbox process of `bed`'s pod `name`, on the pod's node.
    fn of(bed: &TestBed, name: &str) -> Pause {
        let pod = bed.pod(name);
        let p = Pause::start(&pod.ns);
        bed.run_on_node(pod.spec.node, p.0.id()).unwrap();
        p
    }

    /// Starts it and waits until it is inside `ns`.
    fn start(ns: &Netns) -> Pause {
        use std::os::unix::fs::MetadataExt;
        let child = die_with_test(&mut Command::new("ip"))
            .args(["netns", "exec", &ns.name, "sleep", "600"])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep in the pod's netns");
        let id = |p: String| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
        let want = id(format!("/var/run/netns/{}", ns.name));
        let pid = child.id();
        wait_for("the pause process in its netns", || {
            id(format!("/proc/{pid}/ns/net")) == want
        });
        Pause(child)
    }
}

impl Drop for Pause {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn namespaces(shop_labels: Value) -> Value {
    json!([
        {"name": "demo", "labels": {"ztunnel.dev/dataplane-mode": "ambient"}},
        {"name": "plain", "labels": {}},
        {"name": "shop", "labels": shop_labels},
    ])
}

fn ambient() -> Value {
    json!({"ztunnel.dev/dataplane-mode": "ambient"})
}

fn has_table(ns: &Netns) -> bool {
    ns.exec("nft", &["list", "table", "inet", "ztunnel"])
        .is_ok()
}

/// Waits up to 10 s for `f`; fails with `what` otherwise.
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn whoami(ip: &'static str, port: u16) -> String {
    let io = async {
        let mut s = TcpStream::connect((ip, port)).await?;
        s.write_all(b"who").await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .expect("whoami timed out")
        .expect("whoami")
}

/// Fails unless the peer closes `s` (end or reset) within 5 s.
async fn closed_promptly(mut s: TcpStream) {
    let mut b = [0u8; 8];
    match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
        Ok(Ok(0) | Err(_)) => {}
        Ok(Ok(n)) => panic!("unexpected bytes {:?}", &b[..n]),
        Err(_) => panic!("the connection of a released pod stalled"),
    }
}

/// Writes `msg` on `s` and reads it echoed back.
async fn echo(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
        .await
        .expect("echo timed out")
        .expect("echo");
    assert_eq!(got, msg);
}

/// Access lines of node `i` for connections to `shop/api`.
fn api_lines(bed: &TestBed, i: usize) -> Vec<Value> {
    access_lines(&bed.log(i))
        .into_iter()
        .filter(|l| l["message"] == "connection closed" && l["dst_workload"] == "shop/api")
        .collect()
}

fn reconciler(bed: &TestBed, i: usize, action: &str, reason: &str) -> f64 {
    metric(
        &bed.metrics(i),
        "ztunnel_reconciler_actions_total",
        &[("action", action), ("reason", reason)],
    )
}

#[test]
fn relabelling_enrolls_and_releases_running_pods_without_cni() {
    let web = spec("web", "web", 0, "10.20.1.80");
    let api = spec("api", "api", 1, "10.20.2.80");
    // Known to discovery on n1, but its IP is held by two namespaces: never guessed.
    let dup = spec("dup", "dup", 0, "10.20.1.85");
    let bed = TestBed::start_known(vec![web, api], vec![dup]).expect("test bed");
    let prefix = netns::unique_prefix();
    let dups: Vec<Netns> = (0..2)
        .map(|i| {
            let ns = Netns::new(&format!("{prefix}-dup{i}")).unwrap();
            ns.ip(&["addr", "add", "10.20.1.85/32", "dev", "lo"])
                .unwrap();
            ns
        })
        .collect();
    let mut _pauses = vec![Pause::of(&bed, "web"), Pause::of(&bed, "api")];
    for ns in &dups {
        let p = Pause::start(ns);
        bed.run_on_node(0, p.0.id()).unwrap();
        _pauses.push(p);
    }
    let (web, api) = (bed.pod("web"), bed.pod("api"));
    let _srv = api.ns.spawn(apps::whoami_server(8080));
    let _echo = api
        .ns
        .spawn(async { apps::hold_server(apps::listen(9090).await).await });
    std::thread::sleep(Duration::from_millis(100));

    // Not ambient: the CNI ADD left them alone, their traffic is plain.
    assert!(!has_table(&web.ns) && !has_table(&api.ns));
    assert_eq!(web.ns.block_on(whoami("10.20.2.80", 8080)), "10.20.1.80");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        api_lines(&bed, 1).is_empty(),
        "plain traffic went through a daemon"
    );

    // The namespace is labelled ambient: both running pods are enrolled, no CNI involved.
    bed.apply_labels(namespaces(ambient()), json!({})).unwrap();
    wait_for("web and api enrolled", || {
        has_table(&web.ns) && has_table(&api.ns)
    });
    wait_for("the reconciler's counts", || {
        reconciler(&bed, 0, "enroll", "running_pod") == 1.0
            && reconciler(&bed, 1, "enroll", "running_pod") == 1.0
    });
    let m1 = bed.metrics(0);
    assert_eq!(metric(&m1, "ztunnel_enrolled_pods", &[]), 1.0, "{m1}");
    // The reconciler records the pod like CNI does.
    assert!(bed.nodes[0]
        .state_dir
        .join("pods/ztunnel-reconciled-uid-shop-web.eth0.json")
        .exists());
    // The pod whose IP two namespaces hold: refused, counted, logged, neither touched.
    wait_for("the ambiguous pod refused", || {
        reconciler(&bed, 0, "enroll_failed", "netns_ambiguous") == 1.0
    });
    assert!(bed.log(0).contains("refusing to guess"), "{}", bed.log(0));
    assert!(dups.iter().all(|d| !has_table(d)));

    // Traffic now goes through the tunnel: n2's daemon logs the connection with both
    // identities, and the application still sees the real client address.
    assert_eq!(web.ns.block_on(whoami("10.20.2.80", 8080)), "10.20.1.80");
    wait_for("the tunnelled connection's access line", || {
        api_lines(&bed, 1).iter().any(|l| {
            l["direction"] == "inbound"
                && l["src_identity"] == "spiffe://cluster.local/ns/shop/sa/web"
                && l["dst_identity"] == "spiffe://cluster.local/ns/shop/sa/api"
        })
    });

    // A long-lived connection from web to api, through the tunnel.
    let held = web.ns.block_on(async {
        let mut s = TcpStream::connect("10.20.2.80:9090").await.unwrap();
        echo(&mut s, b"one").await;
        s
    });
    assert_eq!(
        metric(&bed.metrics(0), "ztunnel_pool_connections", &[]),
        1.0
    );

    // web opts out: released (rules and record gone), api stays.
    bed.apply_labels(
        namespaces(ambient()),
        json!({"web": {"ztunnel.dev/dataplane-mode": "none"}}),
    )
    .unwrap();
    wait_for("web released", || !has_table(&web.ns));
    assert!(has_table(&api.ns));
    wait_for("web's release counted", || {
        reconciler(&bed, 0, "release", "opted_out") == 1.0
    });
    assert!(!bed.nodes[0]
        .state_dir
        .join("pods/ztunnel-reconciled-uid-shop-web.eth0.json")
        .exists());
    // Its established connection could not outlive web's rules: the daemon closed it first,
    // so the application sees the end instead of a stall.
    web.ns.block_on(closed_promptly(held));
    wait_for("web's closed connection's access line", || {
        access_lines(&bed.log(0)).iter().any(|l| {
            l["direction"] == "outbound" && l["error"] == "closed: the source pod left the mesh"
        })
    });
    // The tunnel connection that left from web's netns is closed too, not kept idle.
    wait_for("web's tunnel connection closed", || {
        metric(&bed.metrics(0), "ztunnel_pool_connections", &[]) == 0.0
    });
    // A new connection from web is plain now, and reaches api through its plaintext inbound.
    let held = web.ns.block_on(async {
        let mut s = TcpStream::connect("10.20.2.80:9090").await.unwrap();
        echo(&mut s, b"two").await;
        s
    });

    // The label goes: api is released; traffic is plain again. The connection that api's
    // daemon was carrying is closed too.
    bed.apply_labels(namespaces(json!({})), json!({})).unwrap();
    wait_for("api released", || !has_table(&api.ns));
    web.ns.block_on(closed_promptly(held));
    wait_for("api's closed connection's access line", || {
        api_lines(&bed, 1).iter().any(|l| {
            l["direction"] == "inbound_plaintext"
                && l["error"] == "closed: the destination pod left the mesh"
        })
    });
    wait_for("api's release counted", || {
        reconciler(&bed, 1, "release", "namespace_not_ambient") == 1.0
    });
    let m2 = bed.metrics(1);
    assert_eq!(metric(&m2, "ztunnel_enrolled_pods", &[]), 0.0, "{m2}");
    let before = api_lines(&bed, 1).len();
    assert_eq!(web.ns.block_on(whoami("10.20.2.80", 8080)), "10.20.1.80");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        api_lines(&bed, 1).len(),
        before,
        "released traffic still proxied"
    );
    // Neither pod is enrolled again on the next passes.
    assert!(!has_table(&web.ns) && !has_table(&api.ns));
}

#[test]
fn a_reconciler_enrollment_survives_a_restart_and_a_cni_del_releases_it() {
    let cart = spec("cart", "cart", 0, "10.20.1.82");
    let mut bed = TestBed::start_with(vec![cart]).expect("test bed");
    let mut pause = Some(Pause::of(&bed, "cart"));
    bed.apply_labels(namespaces(ambient()), json!({})).unwrap();
    wait_for("cart enrolled", || {
        reconciler(&bed, 0, "enroll", "running_pod") == 1.0
    });
    assert!(has_table(&bed.pod("cart").ns));

    // Restart: the new daemon recovers the pod from its record (it does not enroll it anew).
    bed.kill_daemon(0);
    bed.start_daemon(0).unwrap();
    let m = bed.metrics_when(0, "ztunnel_enrolled_pods", &[], 1.0);
    assert_eq!(metric(&m, "ztunnel_enrolled_pods", &[]), 1.0, "{m}");
    assert_eq!(reconciler(&bed, 0, "enroll", "running_pod"), 0.0, "{m}");
    assert!(has_table(&bed.pod("cart").ns));

    // The pod is deleted: its sandbox goes, the runtime runs DEL with the pod's CNI args.
    pause.take();
    let pod = bed.pod("cart");
    let node = &bed.nodes[0];
    let del = node
        .runtime
        .del(&node.conflist, &pod.attachment, Some(&pod.result))
        .unwrap();
    assert!(del.iter().all(|o| o.code == 0), "{del:?}");
    assert!(!has_table(&pod.ns), "DEL left the reconciler's rules");
    let records = std::fs::read_dir(node.state_dir.join("pods"))
        .unwrap()
        .count();
    assert_eq!(records, 0, "DEL left the reconciler's record");
    let m = bed.metrics_when(0, "ztunnel_enrolled_pods", &[], 0.0);
    assert_eq!(metric(&m, "ztunnel_enrolled_pods", &[]), 0.0, "{m}");
}

/// One request to node `i`'s enrollment socket, as the CNI plugin sends it.
fn cni_request(bed: &TestBed, i: usize, req: &Request) -> Reply {
    let mut s = UnixStream::connect(bed.nodes[i].state_dir.join("cni.sock")).unwrap();
    enroll::write_frame(&mut s, req).unwrap();
    enroll::read_frame(&mut s).unwrap()
}

#[test]
fn a_cni_add_takes_over_a_pod_the_reconciler_enrolled() {
    let cart = spec("cart2", "cart", 0, "10.20.1.83");
    let bed = TestBed::start_with(vec![cart]).expect("test bed");
    let pod = bed.pod("cart2");
    let _pause = Pause::of(&bed, "cart2");
    bed.apply_labels(namespaces(ambient()), json!({})).unwrap();
    wait_for("cart2 enrolled", || has_table(&pod.ns));
    let records = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(bed.nodes[0].state_dir.join("pods"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    wait_for("the reconciler's record", || {
        records() == ["ztunnel-reconciled-uid-shop-cart2.eth0.json"]
    });

    // The runtime (re)runs ADD for the same sandbox: CNI's attachment replaces the
    // reconciler's, in the same netns, with the rules in place throughout.
    let add = PodAdd {
        attachment: Attachment {
            container_id: pod.attachment.container_id.clone(),
            ifname: "eth0".into(),
        },
        netns: pod.attachment.netns.display().to_string(),
        pod: PodRef {
            namespace: "shop".into(),
            name: "cart2".into(),
            uid: "uid-shop-cart2".into(),
        },
        ips: vec!["10.20.1.83".parse().unwrap()],
    };
    // CHECK from the runtime finds the reconciler's enrollment under the pod.
    assert_eq!(
        cni_request(&bed, 0, &Request::Check(add.clone())),
        Reply::Ok
    );
    assert_eq!(cni_request(&bed, 0, &Request::Add(add)), Reply::Enrolled);
    assert_eq!(
        records(),
        [format!("{}.eth0.json", pod.attachment.container_id)]
    );
    assert!(has_table(&pod.ns));
    let m = bed.metrics(0);
    assert_eq!(metric(&m, "ztunnel_enrolled_pods", &[]), 1.0, "{m}");
    // GC with an empty valid list releases CNI attachments only; here that is the pod.
    assert_eq!(
        cni_request(&bed, 0, &Request::Gc { valid: vec![] }),
        Reply::Ok
    );
    assert!(records().is_empty());
}

#[test]
fn finding_a_netns_by_ip_refuses_ambiguity_and_the_host() {
    netns::require_prerequisites();
    let prefix = netns::unique_prefix();
    let make = |n: &str, ip: &str| {
        let ns = Netns::new(&format!("{prefix}-{n}")).unwrap();
        ns.ip(&["addr", "add", ip, "dev", "lo"]).unwrap();
        ns
    };
    let one = make("one", "10.77.0.1/32");
    let a = make("a", "10.77.0.2/32");
    let b = make("b", "10.77.0.2/32");
    let quiet = make("quiet", "10.77.0.3/32"); // no process: not found through /proc
    let _p: Vec<Pause> = [&one, &a, &b].into_iter().map(Pause::start).collect();
    let seen = find::scan(std::path::Path::new("/proc"), ZNetns::host()).unwrap();
    let host_ips = find::local_addresses().unwrap();
    let ip = |s: &str| vec![s.parse().unwrap()];
    let found = find::choose(&ip("10.77.0.1"), &host_ips, &seen).unwrap();
    let want = std::fs::metadata(format!("/var/run/netns/{}", one.name)).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(found.id, (want.dev(), want.ino()));
    assert!(matches!(
        find::choose(&ip("10.77.0.2"), &host_ips, &seen),
        Err(FindError::Ambiguous { count: 2, .. })
    ));
    assert!(matches!(
        find::choose(&ip("10.77.0.3"), &host_ips, &seen),
        Err(FindError::NotFound(_))
    ));
    drop(quiet);
    if let Some(h) = host_ips.first() {
        assert!(matches!(
            find::choose(&[*h], &host_ips, &seen),
            Err(FindError::HostNetwork(_))
        ));
    }
}

#[test]
fn the_annotation_follows_the_enrollment_status_through_the_api() {
    let server = ApiServer::start();
    server.apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop", "annotations": {"other": "kept"}},
        "spec": {"containers": [{"name": "app", "image": "app"}]}}));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_rt = rt.enter();
    let client = |url: &str| {
        kube::Client::try_from(kube::Config::new(url.parse().unwrap())).expect("client")
    };
    let metrics = Arc::new(ztunnel::metrics::Metrics::default());
    let annotator = KubeAnnotator::start(client(&server.url()), metrics.clone());
    let pod = |name: &str| PodRef {
        namespace: "shop".into(),
        name: name.into(),
        uid: String::new(),
    };
    let annotations = || {
        server.get("v1", "Pod", Some("shop"), "web").expect("pod")["metadata"]["annotations"]
            .clone()
    };
    for (status, want) in [
        (Status::Enrolled, json!("enrolled")),
        (
            Status::Failed("no netns holds 10.0.0.1".into()),
            json!("failed: no netns holds 10.0.0.1"),
        ),
        (Status::Released, Value::Null),
    ] {
        annotator.annotate(&pod("web"), status.clone());
        wait_for(&format!("annotation after {status:?}"), || {
            annotations()[ANNOTATION] == want && annotations()["other"] == "kept"
        });
    }
    // A pod that is gone is not a failure; an unreachable API server is, counted and retried.
    annotator.annotate(&pod("gone"), Status::Enrolled);
    let unreachable = KubeAnnotator::start(client("http://127.0.0.1:1"), metrics.clone());
    unreachable.annotate(&pod("web"), Status::Enrolled);
    wait_for("failures counted", || {
        metrics.annotation_failures.get() >= 2
    });
    wait_for("the gone pod's patch", || {
        server
            .requests()
            .iter()
            .any(|r| r.starts_with("PATCH /api/v1/namespaces/shop/pods/gone"))
    });
}

/// ADD through the chain, retried while the daemon answers "try again" (code 11: it has not
/// seen the pod yet), after a DEL of the failed attempt: what the kubelet does.
fn add_pod_as_kubelet_does(bed: &mut TestBed, spec: PodSpec) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (outs, pod) = bed.try_add_pod(spec.clone()).unwrap();
        if outs.iter().all(|o| o.code == 0) {
            bed.pods.push(pod);
            return;
        }
        let code = outs.last().and_then(|o| o.error_code());
        assert!(
            code == Some(11) && Instant::now() < deadline,
            "ADD of {} failed: {outs:?}",
            spec.name
        );
        let node = &bed.nodes[spec.node];
        node.runtime
            .del(&node.conflist, &pod.attachment, None)
            .unwrap();
        drop(pod);
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Whether node `i`'s daemon knows workload `name`.
fn knows(bed: &TestBed, i: usize, name: &str) -> bool {
    daemon::http(&bed.nodes[i].ns, "GET", "127.0.0.1:15000", "/config_dump")
        .ok()
        .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
        .and_then(|d| d["discovery"]["workloads"].as_array().cloned())
        .is_some_and(|ws| ws.iter().any(|w| w["name"] == name))
}

fn pod_object(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": name}},
        "spec": {"nodeName": "n1", "serviceAccountName": name,
                 "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

#[test]
fn the_daemon_annotates_pods_from_the_api_server_as_it_enrolls_and_releases_them() {
    let mut bed = TestBed::start_with(vec![]).expect("test bed");
    // The stand-in API server listens inside node n1's namespace, where the daemon runs.
    let l = bed.nodes[0]
        .ns
        .block_on(async { std::net::TcpListener::bind("127.0.0.1:0") })
        .unwrap();
    let server = ApiServer::start_on(l);
    let kubeconfig = bed.dir().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig, "token");
    let ns_object = |labels: Value| {
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": "shop", "labels": labels}})
    };
    server.apply(ns_object(json!({})));
    server.apply(pod_object("web", "10.20.1.86"));
    let annotation = |name: &str| {
        server.get("v1", "Pod", Some("shop"), name).expect("pod")["metadata"]["annotations"]
            [ANNOTATION]
            .clone()
    };

    // n1's daemon, now with Kubernetes discovery.
    bed.kill_daemon(0);
    let node = &bed.nodes[0];
    let args: Vec<String> = [
        "run",
        "--node-name",
        "n1",
        "--discovery-source",
        "kubernetes",
        "--kubeconfig",
        &kubeconfig.display().to_string(),
        "--ca-dir",
        &bed.ca_dir.display().to_string(),
        "--state-dir",
        &node.state_dir.display().to_string(),
        "--drain-grace",
        "1s",
    ]
    .map(String::from)
    .to_vec();
    let host_proc = node.proc_dir.display().to_string();
    let env = [("ZTUNNEL_HOST_PROC", host_proc.as_str())];
    let mut p = Process::start(&node.ns, "n1-kube", bed.dir(), &args, &env).unwrap();
    daemon::wait_ready(
        &node.ns,
        &mut p,
        "127.0.0.1:15021",
        "/healthz/ready",
        Duration::from_secs(20),
    )
    .unwrap();
    bed.nodes[0].daemon = Some(p);

    // web starts in the unlabelled namespace: CNI leaves it alone, nothing is annotated.
    bed.add_pod(spec("web", "web", 0, "10.20.1.86")).unwrap();
    let _pause = Pause::of(&bed, "web");
    assert!(!has_table(&bed.pod("web").ns));
    assert_eq!(annotation("web"), Value::Null);

    // The namespace is labelled through the API: the reconciler enrolls web and annotates it.
    server.apply(ns_object(ambient()));
    wait_for("web enrolled and annotated", || {
        has_table(&bed.pod("web").ns) && annotation("web") == "enrolled"
    });

    // A pod created in the ambient namespace is enrolled at CNI ADD, and annotated too. As on
    // a real cluster, the API has it scheduled but without an IP when the plugin runs: the
    // IP is the one the chain just assigned, which the plugin passes to the daemon.
    let mut pending = pod_object("web2", "10.20.1.87");
    pending["status"] = json!({"phase": "Pending"});
    server.apply(pending);
    add_pod_as_kubelet_does(&mut bed, spec("web2", "web2", 0, "10.20.1.87"));
    assert!(
        !knows(&bed, 0, "web2"),
        "a pod without an IP is not a workload"
    );
    assert!(has_table(&bed.pod("web2").ns));
    wait_for("web2 annotated", || annotation("web2") == "enrolled");
    // Then the kubelet reports the IP, and the pod becomes a workload like any other.
    server.apply(pod_object("web2", "10.20.1.87"));
    wait_for("web2 known to the daemon", || knows(&bed, 0, "web2"));

    // The label goes: both are released and their annotations removed.
    server.apply(ns_object(json!({})));
    wait_for("both released, annotations removed", || {
        !has_table(&bed.pod("web").ns)
            && !has_table(&bed.pod("web2").ns)
            && annotation("web") == Value::Null
            && annotation("web2") == Value::Null
    });
    let m = bed.metrics(0);
    assert_eq!(
        metric(&m, "ztunnel_annotation_failures_total", &[]),
        0.0,
        "{m}"
    );
}
