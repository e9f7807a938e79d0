//! Enrollment driven by the cluster state, on the two-node test bed (`harness/testbed.rs`):
//! pods that run unenrolled in a plain namespace are enrolled without any CNI call when the
//! namespace is labelled ambient in the mesh file (the daemon finds each pod's netns itself by
//! its IP under /proc), released when a pod opts out or the label goes, released by a later
//! CNI DEL, and served again by a restarted daemon; a netns it cannot tell apart is refused,
//! and so is one that holds a pod's IP but whose processes are another pod's (by the UID
//! their cgroups name).
//! The pod annotation is tested against the real API server (`harness::controlplane`) with
//! the daemon's own credentials (a token of `ztunnel-system/ztunnel` bound to a daemon Pod on
//! the annotated pods' node): in-process through the annotator, and end to end with the bed's
//! daemons discovering the cluster from that API server (`harness::kubebed`).
//!
//! Each test pod gets a `sleep` process in its netns and its pod cgroup (a sandbox's
//! `pause`), since the daemon finds namespaces through processes. Pod IPs (10.20.x.8x) are unused by other tests, so test
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
use ztunnel::net::netns::Netns as ZNetns;
use ztunnel_e2e::apps;
use ztunnel_e2e::controlplane::{self, KubePod};
use ztunnel_e2e::daemon::{self, access_lines, die_with_test, metric, metric_or_zero};
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
    /// Starts the sandbox process of `bed`'s pod `name`, in the pod's cgroup, on its node.
    fn of(bed: &TestBed, name: &str) -> Pause {
        let p = Pause::start(&bed.pod(name).ns);
        bed.run_in_pod(name, p.0.id()).unwrap();
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

/// Connections either node's daemon has proxied, in every direction. A daemon counts a
/// connection before it connects the application, so once an application has answered, a
/// connection that went through a daemon is counted: no wait is needed to see that none did.
fn proxied(bed: &TestBed) -> f64 {
    (0..2)
        .map(|i| {
            let m = bed.metrics(i);
            ztunnel::metrics::DIRECTIONS
                .iter()
                .map(|d| metric(&m, "ztunnel_proxied_connections_total", &[("direction", d)]))
                .sum::<f64>()
        })
        .sum()
}

/// Passes node `i`'s reconciler has completed.
fn reconciler_passes(bed: &TestBed, i: usize) -> f64 {
    metric(&bed.metrics(i), "ztunnel_reconciler_passes_total", &[])
}

fn reconciler(bed: &TestBed, i: usize, action: &str, reason: &str) -> f64 {
    metric_or_zero(
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
    let bed = TestBed::builder()
        .pods(vec![web, api])
        .known(vec![dup])
        .start();
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
    // Two sandboxes of the pod `dup` (its cgroup) hold its address.
    for ns in &dups {
        let p = Pause::start(ns);
        ztunnel_e2e::cgroup::put_in_pod(bed.prefix(), "uid-shop-dup", p.0.id()).unwrap();
        bed.run_on_node(0, p.0.id()).unwrap();
        _pauses.push(p);
    }
    let (web, api) = (bed.pod("web"), bed.pod("api"));
    let _srv = api.ns.serve_dual(8080, apps::whoami_server);
    let _echo = api
        .ns
        .serve(9090, |l| async move { apps::hold_server(l).await });

    // Not ambient: the CNI ADD left them alone, their traffic is plain.
    assert!(!has_table(&web.ns) && !has_table(&api.ns));
    let before = proxied(&bed);
    assert_eq!(web.ns.block_on(whoami("10.20.2.80", 8080)), "10.20.1.80");
    assert_eq!(proxied(&bed), before, "plain traffic went through a daemon");
    assert!(
        api_lines(&bed, 1).is_empty(),
        "plain traffic logged by a daemon"
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
    let before = proxied(&bed);
    assert_eq!(web.ns.block_on(whoami("10.20.2.80", 8080)), "10.20.1.80");
    assert_eq!(proxied(&bed), before, "released traffic still proxied");
    // Neither pod is enrolled again on the next passes.
    let passes = [reconciler_passes(&bed, 0), reconciler_passes(&bed, 1)];
    wait_for("a later pass on each node", || {
        reconciler_passes(&bed, 0) > passes[0] && reconciler_passes(&bed, 1) > passes[1]
    });
    assert!(!has_table(&web.ns) && !has_table(&api.ns));
}

#[test]
fn a_reconciler_enrollment_survives_a_restart_and_a_cni_del_releases_it() {
    let cart = spec("cart", "cart", 0, "10.20.1.82");
    let mut bed = TestBed::builder().pods(vec![cart]).start();
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
    assert!(
        del.len() == 2 && del.iter().all(|o| o.code == 0),
        "both plugins of the chain succeed: {del:?}"
    );
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
    let bed = TestBed::builder().pods(vec![cart]).start();
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
fn finding_a_netns_by_ip_and_uid_refuses_ambiguity_the_host_and_another_pods_namespace() {
    use std::os::unix::fs::MetadataExt;
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
                                               // Another pod's namespace holding a victim's address, as a pod with CAP_NET_ADMIN can.
    let evil = make("evil", "10.77.0.4/32");
    let nobody = make("nobody", "10.77.0.5/32"); // its process is in no pod's cgroup
                                                 // The victim's own namespace and an impostor's holding the same address.
    let victim = make("victim", "10.77.0.6/32");
    let impostor = make("impostor", "10.77.0.6/32");
    let pauses: Vec<Pause> = [&one, &a, &b, &evil, &nobody, &victim, &impostor]
        .into_iter()
        .map(Pause::start)
        .collect();
    let put = |i: usize, uid: &str| {
        ztunnel_e2e::cgroup::put_in_pod(&prefix, uid, pauses[i].0.id()).unwrap()
    };
    put(0, "uid-one");
    put(1, "uid-a");
    put(2, "uid-a"); // two sandboxes of one pod
    put(3, "uid-evil");
    put(5, "uid-victim2");
    put(6, "uid-evil");
    let seen = find::scan(std::path::Path::new("/proc"), ZNetns::host()).unwrap();
    let host_ips = find::local_addresses().unwrap();
    let ip = |s: &str| vec![s.parse().unwrap()];
    let found = find::choose(&ip("10.77.0.1"), "uid-one", &host_ips, &seen).unwrap();
    let want = std::fs::metadata(format!("/var/run/netns/{}", one.name)).unwrap();
    assert_eq!(found.id, (want.dev(), want.ino()));
    assert_eq!(found.uids, ["uid-one"]);
    assert!(matches!(
        find::choose(&ip("10.77.0.2"), "uid-a", &host_ips, &seen),
        Err(FindError::Ambiguous { count: 2, .. })
    ));
    assert!(matches!(
        find::choose(&ip("10.77.0.3"), "uid-quiet", &host_ips, &seen),
        Err(FindError::NotFound(_))
    ));
    // The victim's address in the attacker's namespace: refused, naming the attacker's UID.
    match find::choose(&ip("10.77.0.4"), "uid-victim", &host_ips, &seen) {
        Err(FindError::UidMismatch { found, .. }) => assert_eq!(found, ["uid-evil"]),
        other => panic!("another pod's namespace accepted: {other:?}"),
    }
    assert!(matches!(
        find::choose(&ip("10.77.0.5"), "uid-nobody", &host_ips, &seen),
        Err(FindError::UidMismatch { .. })
    ));
    // The impostor beside the victim neither takes its place nor keeps it out.
    let found = find::choose(&ip("10.77.0.6"), "uid-victim2", &host_ips, &seen).unwrap();
    let want = std::fs::metadata(format!("/var/run/netns/{}", victim.name)).unwrap();
    assert_eq!(found.id, (want.dev(), want.ino()));
    drop(quiet);
    // A pod whose address is one of the node's own (host network) is never given a namespace:
    // with each of this machine's addresses, and with one given to the node for the test (a
    // machine may have loopback only).
    let mut node_ips = host_ips.clone();
    node_ips.push("192.0.2.10".parse().unwrap());
    for h in &node_ips {
        assert!(
            matches!(
                find::choose(&[*h], "uid-host", &node_ips, &seen),
                Err(FindError::HostNetwork(_))
            ),
            "{h}"
        );
    }
    drop(pauses);
    ztunnel_e2e::cgroup::remove(&prefix);
}

/// The attack: a pod adds the IP of a pod whose sandbox is not running (being re-created) to
/// its own namespace, and waits for the daemon to enroll that namespace as the victim, with
/// the victim's identity. The daemon finds the namespace by the IP, sees that its processes
/// are another pod's, and refuses (counted, logged, the victim's annotation says why); once
/// the victim's own sandbox runs with its address, that one is enrolled.
#[test]
fn a_pod_holding_another_pods_ip_is_not_enrolled_as_it() {
    let attacker = spec("evil", "evil", 0, "10.20.1.87");
    let victim = spec("cart3", "cart", 0, "10.20.1.86");
    let bed = TestBed::builder()
        .pods(vec![attacker])
        .known(vec![victim])
        .start();
    let evil = bed.pod("evil");
    evil.ns
        .ip(&["addr", "add", "10.20.1.86/32", "dev", "lo"])
        .unwrap();
    let _pause = Pause::of(&bed, "evil");
    bed.apply_labels(namespaces(ambient()), json!({})).unwrap();
    wait_for("the refusal", || {
        reconciler(&bed, 0, "enroll_failed", "netns_uid_mismatch") >= 1.0
    });
    // The attacker is enrolled as itself (its own IP, its namespace, its cgroup) and never
    // as the victim: one enrolled pod, the attacker's, and its listeners answer as `evil`.
    wait_for("the attacker enrolled as itself", || {
        reconciler(&bed, 0, "enroll", "running_pod") == 1.0
    });
    // The pass that enrolled it has completed: whatever it would do to the victim is done.
    let passes = reconciler_passes(&bed, 0);
    wait_for("the reconciler's pass completed", || {
        reconciler_passes(&bed, 0) > passes
    });
    let m = bed.metrics(0);
    assert_eq!(metric(&m, "ztunnel_enrolled_pods", &[]), 1.0, "{m}");
    let records: Vec<String> = std::fs::read_dir(bed.nodes[0].state_dir.join("pods"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        records,
        ["ztunnel-reconciled-uid-shop-evil.eth0.json"],
        "no record for the victim"
    );
    let log = bed.log(0);
    assert!(
        log.lines()
            .any(|l| l.contains("uid-shop-evil") && l.contains("is pod uid-shop-cart3's")),
        "no refusal naming both pods:\n{log}"
    );
}

#[test]
fn the_annotation_follows_the_enrollment_status_through_the_api() {
    // On the real API server, with the daemon's credentials: a token of
    // ztunnel-system/ztunnel bound to a daemon Pod on the node of the annotated pod (deploy/'s
    // admission policy refuses the daemon other nodes' pods).
    let cp = controlplane::shared().install_base();
    let shop = cp.namespace("shop");
    let node = format!("{shop}-n1");
    cp.create_namespace(&shop, json!({})).unwrap();
    cp.run_pod(&KubePod::running(
        &shop,
        "web",
        "web",
        &node,
        &["10.30.0.1"],
    ))
    .unwrap();
    cp.apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": shop, "labels": {"app": "web"},
                     "annotations": {"other": "kept"}},
        "spec": {"nodeName": node, "serviceAccountName": "web", "hostNetwork": false,
                 "containers": [{"name": "app", "image": "registry.invalid/app"}]}}))
        .unwrap();
    let daemon_pod = format!("ztunnel-{node}");
    let uid = cp
        .run_pod(&KubePod {
            labels: json!({"app": "ztunnel"}),
            ..KubePod::running("ztunnel-system", &daemon_pod, "ztunnel", &node, &[])
        })
        .unwrap();
    let token = cp
        .token(
            "ztunnel-system",
            "ztunnel",
            &[controlplane::ISSUER],
            3600,
            Some((&daemon_pod, &uid)),
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kc = cp
        .token_kubeconfig(dir.path(), "daemon.kubeconfig", &token)
        .unwrap();
    let metrics = Arc::new(ztunnel::metrics::Metrics::default());
    // The annotators' workers run on the control plane host's runtime.
    let (annotator, unreachable) = {
        let metrics = metrics.clone();
        cp.ns.block_on(async move {
            let client = ztunnel::discovery::kube::client(Some(&kc)).await.unwrap();
            let nowhere =
                kube::Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap()))
                    .expect("client");
            (
                KubeAnnotator::start(client, metrics.clone()),
                KubeAnnotator::start(nowhere, metrics),
            )
        })
    };
    let pod = |name: &str| PodRef {
        namespace: shop.clone(),
        name: name.into(),
        uid: String::new(),
    };
    let annotations =
        || cp.get("v1", "Pod", Some(&shop), "web").expect("pod")["metadata"]["annotations"].clone();
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
    // An enrolled pod whose certificate the CA refuses shows it, until it is issued.
    annotator.annotate(&pod("web"), Status::Enrolled);
    annotator.certificate(&pod("web"), Some("403 no active pod".into()));
    wait_for("the refusal shown", || {
        annotations()[ANNOTATION] == "enrolled; certificate refused: 403 no active pod"
    });
    annotator.certificate(&pod("web"), None);
    wait_for("the refusal gone", || {
        annotations()[ANNOTATION] == "enrolled"
    });
    annotator.annotate(&pod("web"), Status::Released);
    wait_for("released", || annotations()[ANNOTATION] == Value::Null);
    // A pod that is gone is not a failure; an unreachable API server is, counted and retried.
    annotator.annotate(&pod("gone"), Status::Enrolled);
    unreachable.annotate(&pod("web"), Status::Enrolled);
    wait_for("failures counted", || {
        metrics.annotation_failures.get() >= 2
    });
    wait_for("the gone pod's patch, answered 404", || {
        cp.audit_events().iter().any(|e| {
            e["verb"] == "patch"
                && e["stage"] == "ResponseComplete"
                && e["objectRef"]["namespace"] == shop.as_str()
                && e["objectRef"]["name"] == "gone"
                && e["user"]["extra"]["authentication.kubernetes.io/pod-name"][0]
                    == daemon_pod.as_str()
                && e["responseStatus"]["code"] == 404
        })
    });
    // The daemon's patches were all allowed (the admission policy let them through).
    let refused: Vec<Value> = cp
        .audit_events()
        .into_iter()
        .filter(|e| {
            e["user"]["extra"]["authentication.kubernetes.io/pod-name"][0] == daemon_pod.as_str()
                && e["stage"] == "ResponseComplete"
                && e["responseStatus"]["code"]
                    .as_u64()
                    .is_some_and(|c| c >= 400 && c != 404)
        })
        .collect();
    assert!(refused.is_empty(), "{refused:#?}");
}

/// Whether node `i`'s daemon knows workload `name`.
fn knows(bed: &TestBed, i: usize, name: &str) -> bool {
    daemon::http(&bed.nodes[i].ns, "GET", "127.0.0.1:15000", "/config_dump")
        .ok()
        .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
        .and_then(|d| d["discovery"]["workloads"].as_array().cloned())
        .is_some_and(|ws| ws.iter().any(|w| w["name"] == name))
}

/// The daemons of the in-pod bed on the real API server (`harness::kubebed`, with deploy/'s
/// credentials): pods of the bed's `plain` namespace annotated as they are enrolled and
/// released.
#[test]
fn the_daemon_annotates_pods_from_the_api_server_as_it_enrolls_and_releases_them() {
    let mut bed = TestBed::builder()
        .pods(vec![])
        .kube(json!({}))
        .try_start()
        .expect("the bed on the real API server");
    let cp = bed.kube.as_ref().unwrap().cp;
    let plain = bed.api_namespace("plain");
    let annotation = |name: &str| {
        cp.get("v1", "Pod", Some(&plain), name).expect("pod")["metadata"]["annotations"][ANNOTATION]
            .clone()
    };
    let plain_pod = |name: &'static str, ip: &'static str| PodSpec {
        name,
        namespace: "plain",
        sa: name,
        app: name,
        node: 0,
        ip,
        ip6: None,
    };

    // web starts in the unlabelled namespace: CNI leaves it alone, nothing is annotated.
    bed.add_pod(plain_pod("web", "10.20.1.86")).unwrap();
    let _pause = Pause::of(&bed, "web");
    assert!(!has_table(&bed.pod("web").ns));
    assert_eq!(annotation("web"), Value::Null);

    // The namespace is labelled through the API: the reconciler enrolls web and annotates it.
    bed.label_namespace("plain", ambient()).unwrap();
    wait_for("web enrolled and annotated", || {
        has_table(&bed.pod("web").ns) && annotation("web") == "enrolled"
    });

    // A pod created in the ambient namespace is enrolled at CNI ADD, and annotated too. As on
    // a real cluster, the API has it scheduled but without an IP when the plugin runs (the
    // bed writes its status once the sandbox is up): the IP is the one the chain just
    // assigned, which the plugin passes to the daemon. Then the pod becomes a workload like
    // any other.
    bed.add_pod(plain_pod("web2", "10.20.1.87")).unwrap();
    assert!(has_table(&bed.pod("web2").ns));
    wait_for("web2 annotated", || annotation("web2") == "enrolled");
    wait_for("web2 known to the daemon", || knows(&bed, 0, "web2"));

    // The label goes: both are released and their annotations removed.
    bed.label_namespace("plain", json!({})).unwrap();
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

/// One identity the CA refuses is that identity's matter, shown where its users look: on the
/// real API server, with the daemons asking a `ztunnel ca` that answers but issues for another
/// trust domain only, an enrolled pod's annotation says its certificate is refused and why, the
/// refusal is counted against its identity, and neither the node's readiness nor the CNI
/// plugin's STATUS turns to failed.
#[test]
fn a_refused_certificate_shows_on_its_pod_and_fails_neither_readiness_nor_status() {
    let cp = controlplane::shared().install_base();
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("refusing-ca");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "a-token\n").unwrap();
    let address = format!("{}:15013", controlplane::API_IP);
    let args: Vec<String> = [
        "ca",
        "--ca-dir",
        &ca_dir.display().to_string(),
        "--trust-domain",
        "other.local",
        "--listen",
        &address,
        "--token-file",
        &tokens.display().to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    let ca = daemon::Process::start(&cp.ns, "refusing-ca", dir.path(), &args, &[]).unwrap();
    let root = ca_dir.join("root-cert.pem");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(root.exists() && ca.log().contains("CA serving")) {
        assert!(
            Instant::now() < deadline,
            "the CA did not start:\n{}",
            ca.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (root, tokens) = (root.display().to_string(), tokens.display().to_string());
    let env = [
        ("ZTUNNEL_CA_ADDRESS", address.as_str()),
        ("ZTUNNEL_CA_ROOT_CERT", root.as_str()),
        ("ZTUNNEL_CA_TOKEN_FILE", tokens.as_str()),
    ];
    let web = ztunnel_e2e::kubebed::spec("web", "demo", 0, "10.20.1.88");
    let bed = TestBed::builder()
        .pods(vec![web])
        .daemon_env(&env)
        .kube(json!({}))
        .try_start()
        .expect("the bed");
    let demo = bed.api_namespace("demo");
    let annotation = || {
        cp.get("v1", "Pod", Some(&demo), "web").expect("pod")["metadata"]["annotations"][ANNOTATION]
            .clone()
    };
    wait_for("the refusal on the pod", || {
        annotation()
            .as_str()
            .is_some_and(|a| a.starts_with("enrolled; certificate refused: "))
    });
    let shown = annotation();
    assert!(
        shown.as_str().unwrap().contains("other.local"),
        "why: {shown}"
    );
    let identity = format!("spiffe://cluster.local/ns/{demo}/sa/web");
    let m = bed.metrics(0);
    assert!(
        metric_or_zero(
            &m,
            "ztunnel_certificate_refusals_total",
            &[("identity", &identity)]
        ) >= 1.0,
        "{m}"
    );
    let (ready, _) = daemon::http(&bed.nodes[0].ns, "GET", "127.0.0.1:15021", "/healthz/ready")
        .expect("readiness answers");
    assert_eq!(ready, 200);
    let node = &bed.nodes[0];
    let ours = node.conflist["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["type"] == "ztunnel-cni")
        .unwrap()
        .clone();
    let mut conf = ztunnel_e2e::cni::Runtime::plugin_conf(&node.conflist, &ours, None);
    conf["cniVersion"] = json!("1.1.0"); // STATUS is a CNI 1.1 verb
    let status = node
        .runtime
        .exec(
            "ztunnel-cni",
            "STATUS",
            &bed.pod("web").attachment,
            &conf.to_string(),
        )
        .unwrap();
    assert_eq!(status.code, 0, "STATUS: {status:?}");
}
