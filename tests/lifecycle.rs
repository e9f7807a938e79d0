//! Enrollment and daemon lifecycle on the two-node test bed: the CNI chain with a real
//! daemon (prevResult, CHECK, DEL, the spec's errors), a daemon killed (enrolled pods'
//! connections refused, never plaintext; kubelet-style probes still reach the application),
//! a daemon restarted (pods created before it are served again), and a rolling restart under
//! a steady stream of new connections (none refused).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ztunnel_e2e::cni::Runtime;
use ztunnel_e2e::testbed::{self, default_pods, PodSpec, TestBed};

fn late(name: &'static str, namespace: &'static str, ip: &'static str) -> PodSpec {
    PodSpec {
        name,
        namespace,
        sa: "late",
        app: "late",
        node: 0,
        ip,
    }
}

/// Answers every connection with the peer's address, until the task is dropped.
async fn whoami_server(port: u16) {
    let l = TcpListener::bind(("0.0.0.0", port)).await.expect("bind");
    loop {
        let Ok((mut s, peer)) = l.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut b = [0u8; 64];
            let _ = s.read(&mut b).await;
            let _ = s.write_all(peer.ip().to_string().as_bytes()).await;
        });
    }
}

async fn whoami(ip: &str, port: u16) -> std::io::Result<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect((ip, port)))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    s.write_all(b"who").await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_string(&mut out))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "read timed out"))??;
    if out.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "no answer",
        ));
    }
    Ok(out)
}

fn has_table(ns: &ztunnel_e2e::netns::Netns) -> bool {
    ns.exec("nft", &["list", "table", "inet", "ztunnel"])
        .is_ok()
}

#[test]
fn the_cni_chain_with_a_real_daemon() {
    let known = vec![
        late("late", "demo", "10.20.1.20"),
        late("late-2", "demo", "10.20.1.21"),
        late("late-plain", "plain", "10.20.1.22"),
    ];
    let bed = TestBed::start_known(default_pods(), known.clone()).expect("test bed");
    let node = &bed.nodes[0];

    // ADD: ztunnel-cni passes the bridge plugin's result through unchanged.
    let (outs, pod) = bed.try_add_pod(known[0].clone()).unwrap();
    assert_eq!(outs.len(), 2);
    assert!(outs.iter().all(|o| o.code == 0), "{outs:?}");
    assert_eq!(
        outs[1].json(),
        outs[0].json(),
        "prevResult must pass through"
    );
    assert_eq!(outs[0].json()["ips"][0]["address"], "10.20.1.20/24");
    assert!(
        outs[1].stdout.trim().lines().count() == 1,
        "one JSON result on stdout"
    );
    assert!(has_table(&pod.ns), "an enrolled pod gets its capture table");
    assert!(
        !has_table(&bed.pod("legacy-1").ns),
        "a pod outside the mesh gets none"
    );

    // CHECK passes, then fails once someone flushes the pod's table.
    let check = node
        .runtime
        .check(&node.conflist, &pod.attachment, &pod.result)
        .unwrap();
    assert!(check.iter().all(|o| o.code == 0), "{check:?}");
    pod.ns
        .exec("nft", &["flush", "table", "inet", "ztunnel"])
        .unwrap();
    let check = node
        .runtime
        .check(&node.conflist, &pod.attachment, &pod.result)
        .unwrap();
    assert_eq!(check.last().unwrap().error_code(), Some(101), "{check:?}");

    // DEL, twice: both succeed; the rules and the pod's record are gone.
    for _ in 0..2 {
        let del = node
            .runtime
            .del(&node.conflist, &pod.attachment, Some(&pod.result))
            .unwrap();
        assert!(del.iter().all(|o| o.code == 0), "{del:?}");
    }
    assert!(!has_table(&pod.ns));
    let records = std::fs::read_dir(node.state_dir.join("pods"))
        .unwrap()
        .count();
    assert_eq!(records, 2, "the records left are those of client and echo");

    // STATUS: the daemon is ready. GC: pods not in the valid list are released.
    let (outs, late2) = bed.try_add_pod(known[1].clone()).unwrap();
    assert!(outs.iter().all(|o| o.code == 0), "{outs:?}");
    assert!(has_table(&late2.ns));
    let mut gc = json!({"cniVersion": "1.1.0", "name": "ztnet", "type": "ztunnel-cni",
        "socket": node.state_dir.join("cni.sock")});
    let status = node
        .runtime
        .exec("ztunnel-cni", "STATUS", &late2.attachment, &gc.to_string())
        .unwrap();
    assert_eq!(status.code, 0, "{status:?}");
    let keep: Vec<_> = ["client", "echo"]
        .iter()
        .map(|n| json!({"containerID": bed.pod(n).attachment.container_id, "ifname": "eth0"}))
        .collect();
    gc["cni.dev/valid-attachments"] = json!(keep);
    let out = node
        .runtime
        .exec("ztunnel-cni", "GC", &late2.attachment, &gc.to_string())
        .unwrap();
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        !has_table(&late2.ns),
        "GC releases the pod that is not in the valid list"
    );
    assert!(has_table(&bed.pod("client").ns), "and keeps the others");

    // The spec's errors, from the plugin itself.
    let plugin = json!({"type": "ztunnel-cni", "socket": node.state_dir.join("cni.sock")});
    let prev = pod.result.clone();
    let conf = Runtime::plugin_conf(&node.conflist, &plugin, Some(&prev));
    let run = |stdin: &str, a: &ztunnel_e2e::cni::Attachment| {
        node.runtime.exec("ztunnel-cni", "ADD", a, stdin).unwrap()
    };
    assert_eq!(run("{not json", &pod.attachment).error_code(), Some(6));
    let mut bad_version = conf.clone();
    bad_version["cniVersion"] = json!("9.9.9");
    assert_eq!(
        run(&bad_version.to_string(), &pod.attachment).error_code(),
        Some(1)
    );
    let mut no_netns = pod.attachment.clone();
    no_netns.netns = "".into();
    let out = run(&conf.to_string(), &no_netns);
    assert_eq!(out.error_code(), Some(4), "{out:?}");
    assert!(
        out.json()["msg"].is_string(),
        "spec error object: {}",
        out.stdout
    );
}

#[test]
fn an_unreachable_daemon_fails_enrolled_pods_and_lets_others_through() {
    let known = vec![
        late("late", "demo", "10.20.1.20"),
        late("late-plain", "plain", "10.20.1.22"),
    ];
    let mut bed = TestBed::start_known(default_pods(), known.clone()).expect("test bed");
    bed.kill_daemon(0);
    let (outs, _) = bed.try_add_pod(known[0].clone()).unwrap();
    assert_eq!(outs[0].code, 0, "bridge");
    assert_eq!(outs[1].error_code(), Some(11), "{:?}", outs[1]);
    let (outs, _) = bed.try_add_pod(known[1].clone()).unwrap();
    assert!(outs.iter().all(|o| o.code == 0), "{outs:?}");
    assert_eq!(outs[1].json(), outs[0].json());
}

#[test]
fn a_dead_daemon_refuses_enrolled_connections_lets_probes_through_and_a_restart_restores_service() {
    let mut bed = TestBed::start();
    let server = bed.pod("server");
    server.ns.spawn(whoami_server(8080));
    std::thread::sleep(Duration::from_millis(100));
    let call = |bed: &TestBed| bed.pod("client").ns.block_on(whoami("10.20.2.10", 8080));
    assert_eq!(call(&bed).unwrap(), "10.20.1.10");

    bed.kill_daemon(0);
    bed.kill_daemon(1);
    let pcap = bed.dir().join("underlay.pcap");
    let cap = testbed::start_capture(&bed.nodes[0].ns, "ul0", &pcap).unwrap();
    let down = call(&bed);
    let captured = testbed::stop_capture(cap, &pcap).unwrap();
    assert!(
        down.is_err(),
        "with no daemon the connection must be refused: {down:?}"
    );
    assert!(
        captured.lines.is_empty(),
        "nothing may leave the node: {:?}",
        captured.lines
    );

    // A kubelet-style probe from the node reaches the application, from the probe address.
    let probe = bed.nodes[1].ns.block_on(whoami("10.20.2.10", 8080));
    assert_eq!(probe.unwrap(), "169.254.7.127");

    bed.start_daemon(0).unwrap();
    bed.start_daemon(1).unwrap();
    assert!(bed.log(0).contains("recovered=2"), "{}", bed.log(0));
    assert_eq!(call(&bed).unwrap(), "10.20.1.10");
}

#[test]
fn a_rolling_restart_refuses_no_new_connection() {
    let mut bed = TestBed::start();
    bed.pod("server").ns.spawn(whoami_server(8080));
    std::thread::sleep(Duration::from_millis(100));
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let load = {
        let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
        bed.pod("client").ns.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match whoami("10.20.2.10", 8080).await {
                    Ok(_) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.lock().unwrap().push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    // Each node in turn: the new process starts beside the old, then the old one drains.
    for i in 0..2 {
        let newer = bed.spawn_daemon(i, "-next").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let mut old = bed.nodes[i].daemon.replace(newer).unwrap();
        old.stop(Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, Ordering::Relaxed);
    bed.pod("client").ns.join(load);
    let failures = failures.lock().unwrap();
    let ok = ok.load(Ordering::Relaxed);
    assert!(ok > 50, "the load ran: {ok} connections");
    assert!(
        failures.is_empty(),
        "{} of {} connections refused: {failures:?}",
        failures.len(),
        ok + failures.len()
    );
}
