//! Enrollment and daemon lifecycle on the two-node test bed: the CNI chain with a real
//! daemon (prevResult, CHECK, DEL, the spec's errors, ADDs the daemon refuses: not known yet,
//! handled by Istio already, listeners that cannot be bound), a daemon killed (enrolled pods'
//! connections refused, never plaintext; kubelet-style probes still reach the application),
//! a daemon restarted (pods created before it are served again), a new daemon beside the old
//! one taking every new connection, and a rolling restart under a steady stream of new
//! connections (none refused), with HTTP/2 and with QUIC tunnels; a stream refused by a
//! destination draining every pooled connection at once, tried again on a new connection; the
//! admin port's one mutation refused without the node's token; with the daemon down, the
//! cluster's own pods start, and removing the DaemonSet unchains the plugin
//! (`lifecycle/uninstall.rs`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztunnel_e2e::cni::Runtime;
use ztunnel_e2e::testbed::{self, PodSpec, TestBed};
use ztunnel_e2e::transport::Transport;
use ztunnel_e2e::{apps, daemon};

#[path = "lifecycle/uninstall.rs"]
mod uninstall;

// Load and faults on the same bed, in this binary.
mod load;

fn late(name: &'static str, namespace: &'static str, ip: &'static str) -> PodSpec {
    PodSpec {
        name,
        namespace,
        sa: "late",
        app: "late",
        node: 0,
        ip,
        ip6: None,
    }
}

async fn whoami(ip: &str, port: u16) -> std::io::Result<String> {
    apps::whoami(ip, port, "who").await
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
    let bed = TestBed::builder().known(known.clone()).start();
    let node = &bed.nodes[0];

    // ADD: ztunnel-cni passes the bridge plugin's result through unchanged.
    let (outs, pod) = bed.try_add_pod(known[0].clone()).unwrap();
    assert_eq!(outs.len(), 2);
    assert!(
        outs.len() == 2 && outs.iter().all(|o| o.code == 0),
        "both plugins of the chain succeed: {outs:?}"
    );
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

    // CHECK passes, then fails once someone slips an `accept` before the inbound capture
    // (the port's traffic would pass the mesh), and once someone flushes the pod's table.
    let check = node
        .runtime
        .check(&node.conflist, &pod.attachment, &pod.result)
        .unwrap();
    assert!(
        check.len() == 2 && check.iter().all(|o| o.code == 0),
        "both plugins of the chain succeed: {check:?}"
    );
    let bypass = [
        "insert",
        "rule",
        "inet",
        "ztunnel",
        "prerouting_nat",
        "tcp",
        "dport",
        "8080",
        "accept",
    ];
    for change in [&bypass[..], &["flush", "table", "inet", "ztunnel"][..]] {
        pod.ns.exec("nft", change).unwrap();
        let check = node
            .runtime
            .check(&node.conflist, &pod.attachment, &pod.result)
            .unwrap();
        assert_eq!(
            check.last().unwrap().error_code(),
            Some(101),
            "{change:?}: {check:?}"
        );
    }

    // DEL, twice: both succeed; the rules and the pod's record are gone.
    for _ in 0..2 {
        let del = node
            .runtime
            .del(&node.conflist, &pod.attachment, Some(&pod.result))
            .unwrap();
        assert!(
            del.len() == 2 && del.iter().all(|o| o.code == 0),
            "both plugins of the chain succeed: {del:?}"
        );
    }
    assert!(!has_table(&pod.ns));
    let records = std::fs::read_dir(node.state_dir.join("pods"))
        .unwrap()
        .count();
    assert_eq!(records, 2, "the records left are those of client and echo");

    // STATUS succeeds. GC: pods not in the valid list are released.
    let (outs, late2) = bed.try_add_pod(known[1].clone()).unwrap();
    assert!(
        outs.len() == 2 && outs.iter().all(|o| o.code == 0),
        "both plugins of the chain succeed: {outs:?}"
    );
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
    let mut bed = TestBed::builder().known(known.clone()).start();
    bed.kill_daemon(0);
    let (outs, _) = bed.try_add_pod(known[0].clone()).unwrap();
    assert_eq!(outs[0].code, 0, "bridge");
    assert_eq!(outs[1].error_code(), Some(11), "{:?}", outs[1]);
    let (outs, _) = bed.try_add_pod(known[1].clone()).unwrap();
    assert!(
        outs.len() == 2 && outs.iter().all(|o| o.code == 0),
        "both plugins of the chain succeed: {outs:?}"
    );
    assert_eq!(outs[1].json(), outs[0].json());
}

#[test]
fn a_dead_daemon_refuses_enrolled_connections_lets_probes_through_and_a_restart_restores_service() {
    let mut bed = TestBed::start();
    let server = bed.pod("server");
    server.ns.serve_dual(8080, apps::whoami_server);
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
    rolling_restart_refuses_nothing(&mut bed);
}

/// During a rolling update the new daemon, once it listens beside the old one, takes every
/// new connection: each listener steers its `SO_REUSEPORT` group to the newest socket. So
/// nothing is left queued on the old daemon when it closes its listeners, even in a pod
/// without `tcp_migrate_req` (one enrolled by relabelling its namespace); here the client's
/// is set to 0 to be sure.
#[test]
fn a_new_daemon_beside_the_old_one_takes_every_new_connection() {
    let mut bed = TestBed::start();
    let client = &bed.pod("client").ns;
    client
        .exec("sysctl", &["-qw", "net.ipv4.tcp_migrate_req=0"])
        .unwrap();
    bed.pod("server").ns.serve_dual(8080, apps::whoami_server);
    let newer = bed.spawn_daemon(0, "-next").unwrap();
    for i in 0..16 {
        let got = client.block_on(whoami("10.20.2.10", 8080));
        assert!(got.is_ok(), "connection {i}: {got:?}");
    }
    let outbound = |log: &str| {
        daemon::access_lines(log)
            .iter()
            .filter(|l| l["message"] == "connection closed" && l["direction"] == "outbound")
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while outbound(&newer.log()) < 16 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let old = bed.nodes[0].daemon.as_ref().unwrap().log();
    assert_eq!(outbound(&newer.log()), 16, "{}", newer.log());
    assert_eq!(outbound(&old), 0, "the old daemon took some: {old}");
    let mut old = bed.nodes[0].daemon.replace(newer).unwrap();
    old.stop(Duration::from_secs(5));
    let got = bed.pod("client").ns.block_on(whoami("10.20.2.10", 8080));
    assert!(got.is_ok(), "after the old one left: {got:?}");
}

/// The same with QUIC tunnels. The new daemon cannot share the UDP port with the draining
/// one (datagrams of the old one's connections would reach it), so it binds the port once the
/// old one has let it go; meanwhile the draining daemon refuses QUIC dials, which fall back
/// to HTTP/2 for that dial only, and nothing is refused. Afterwards the new daemons carry
/// QUIC tunnels again.
#[test]
fn a_rolling_restart_with_quic_refuses_no_new_connection_and_quic_resumes() {
    let mut bed = TestBed::builder()
        .transport(Transport::Quic)
        .daemon_env(&[
            // So that the tunnel is dialled again once the load stops.
            ("ZTUNNEL_POOL_IDLE_TIMEOUT", "300ms"),
        ])
        .start();
    rolling_restart_refuses_nothing(&mut bed);
    // No QUIC dial went unanswered (n2's old daemon refuses while it drains, and the new one
    // binds the port moments after the old one exits); one would keep n1 off QUIC a minute.
    let log1 = bed.log(0);
    assert!(!log1.contains("no answer on QUIC"), "{log1}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !bed.log(1).contains("QUIC tunnel port bound") {
        assert!(
            std::time::Instant::now() < deadline,
            "n2's new daemon never took the QUIC port: {}",
            bed.log(1)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let m1 = bed.metrics_when(0, "ztunnel_pool_connections", &[], 0.0);
    assert_eq!(
        daemon::metric(&m1, "ztunnel_pool_connections", &[]),
        0.0,
        "{m1}"
    );
    let got = bed
        .pod("client")
        .ns
        .block_on(async { whoami("10.20.2.10", 8080).await });
    assert!(got.is_ok(), "{got:?}");
    let m2 = bed.metrics_when(1, "ztunnel_quic_connections_accepted_total", &[], 1.0);
    assert!(
        daemon::metric(&m2, "ztunnel_quic_connections_accepted_total", &[]) >= 1.0,
        "the new daemon takes QUIC tunnels: {m2}"
    );
}

/// A QUIC tunnel connection that outlives its daemon (a connection held past the drain
/// grace): the daemon that replaces it on the node shares the node's reset secret, so it
/// answers the peer's next packet with a stateless reset the peer accepts. The peer's pooled
/// connection ends at once: a new connection is served and the held one learns it is cut,
/// instead of both hanging until the 20 s idle timeout.
#[test]
fn a_quic_connection_outliving_its_daemon_is_reset_by_the_next_one() {
    let mut bed = TestBed::builder().transport(Transport::Quic).start();
    bed.pod("server").ns.serve(8080, |l| async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let (held, got) = bed
        .pod("client")
        .ns
        .block_on(async {
            let s = TcpStream::connect(("10.20.2.10", 8080)).await?;
            echo_on(s, b"one").await
        })
        .expect("the first connection");
    assert_eq!(got, b"one");
    let m1 = bed.metrics(0);
    assert_eq!(
        daemon::metric(&m1, "ztunnel_quic_fallbacks_total", &[]),
        0.0,
        "the tunnel is QUIC: {m1}"
    );

    // n2's daemon is replaced; the held connection outlives the old one's 2 s drain grace.
    let newer = bed.spawn_daemon(1, "-next").unwrap();
    let mut old = bed.nodes[1].daemon.replace(newer).unwrap();
    old.stop(Duration::from_secs(10));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !bed.log(1).contains("QUIC tunnel port bound") {
        assert!(std::time::Instant::now() < deadline, "{}", bed.log(1));
        std::thread::sleep(Duration::from_millis(50));
    }

    // A new connection rides the pool's connection to the old daemon first: the new daemon's
    // reset ends it, and the stream is carried on a new one.
    let fresh = bed.pod("client").ns.block_on(async {
        let s = TcpStream::connect(("10.20.2.10", 8080)).await?;
        echo_on(s, b"two").await
    });
    assert_eq!(fresh.expect("a new connection is served").1, b"two");
    // The held connection learns that its tunnel is gone.
    let cut = bed.pod("client").ns.block_on(async move {
        let mut held = held;
        let _ = held.write_all(b"three").await;
        let mut buf = [0u8; 16];
        tokio::time::timeout(Duration::from_secs(5), held.read(&mut buf)).await
    });
    match cut {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        other => panic!("the held connection was not cut: {other:?}"),
    }
    let log1 = bed.log(0);
    assert!(!log1.contains("no answer on QUIC"), "{log1}");
}

/// Writes `msg` on `s` and reads its echo (within 3 s).
async fn echo_on(mut s: TcpStream, msg: &'static [u8]) -> std::io::Result<(TcpStream, Vec<u8>)> {
    s.write_all(msg).await?;
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut got))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no echo"))??;
    Ok((s, got))
}

/// Runs four clients back to back from `client` to `server` (n2) while each node's daemon in
/// turn is replaced by a new process (started beside the old, then the old drains), and
/// asserts that no connection failed.
fn rolling_restart_refuses_nothing(bed: &mut TestBed) {
    bed.pod("server").ns.serve_dual(8080, apps::whoami_server);
    bed.pod("server").ns.serve_dual(9090, apps::hold_server);
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    // Four clients back to back, so that connections are always arriving and queued.
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            bed.pod("client").ns.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match whoami("10.20.2.10", 8080).await {
                        Ok(_) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures.lock().unwrap().push(e.to_string()),
                    }
                }
            })
        })
        .collect();
    // Connections go through before, beside and after each change, each phase counted: the
    // load is waited for, not slept through.
    let flowing = |phase: &str| {
        let want = ok.load(Ordering::Relaxed) + 20;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while ok.load(Ordering::Relaxed) < want {
            assert!(
                std::time::Instant::now() < deadline,
                "no load {phase}: {:?}",
                failures.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    flowing("before the restarts");
    // Each node in turn: the new process starts beside the old, then the old one drains while
    // a long-lived connection keeps its tunnel connection open (on the server's node, the
    // client daemon's pooled connection to it, which the new connections share until the
    // drain turns them away).
    for i in 0..2 {
        let held = bed
            .pod("client")
            .ns
            .block_on(apps::open_held("10.20.2.10", 9090, 1))
            .expect("a long-lived connection");
        let newer = bed.spawn_daemon(i, "-next").unwrap();
        flowing("with both processes");
        let mut old = bed.nodes[i].daemon.replace(newer).unwrap();
        old.terminate();
        flowing("while the old process drains");
        drop(held);
        old.stop(Duration::from_secs(5));
        flowing("after the old process left");
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        bed.pod("client").ns.join(l);
    }
    let failures = failures.lock().unwrap();
    let ok = ok.load(Ordering::Relaxed);
    if !failures.is_empty() || ok <= 50 {
        for i in 0..2 {
            for l in bed.log(i).lines().filter(|l| {
                l.contains("WARN") || (l.contains("\"error\":") && !l.contains("\"error\":\"\""))
            }) {
                eprintln!("n{}: {l}", i + 1);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} connections refused: {failures:?}",
        failures.len(),
        ok + failures.len()
    );
    assert!(ok > 50, "the load ran: {ok} connections");
}

#[test]
fn the_enrollment_socket_is_root_only_and_refuses_garbage_without_blocking_others() {
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;
    use ztunnel::capture::store::PodRecord;
    use ztunnel_proto::enroll::{self, ErrorKind, Reply, Request};

    let bed = TestBed::start();
    let node = &bed.nodes[0];
    let sock = node.state_dir.join("cni.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "only root may open the socket");
    let dir_mode = std::fs::metadata(&node.state_dir)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700);

    // A client that connects and says nothing must not hold up anyone else.
    let mut silent = UnixStream::connect(&sock).unwrap();

    let exchange = |bytes: &[u8]| -> Reply {
        let mut c = UnixStream::connect(&sock).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(bytes).unwrap();
        enroll::read_frame(&mut c).expect("a framed reply")
    };
    let frame = |payload: &[u8]| {
        let mut b = (payload.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(payload);
        b
    };
    let kind = |r: Reply| match r {
        Reply::Error { kind, .. } => Some(kind),
        _ => None,
    };
    assert_eq!(
        kind(exchange(&frame(b"{{{ not json"))),
        Some(ErrorKind::Invalid)
    );
    assert_eq!(
        kind(exchange(&frame(br#"{"version":1,"kind":"explode"}"#))),
        Some(ErrorKind::Invalid)
    );
    assert_eq!(
        kind(exchange(&frame(br#"{"version":7,"kind":"status"}"#))),
        Some(ErrorKind::Unsupported)
    );
    assert_eq!(
        kind(exchange(&u32::MAX.to_be_bytes())),
        Some(ErrorKind::Invalid)
    );
    // A well-formed request still works, with the silent client still connected.
    let mut ok = Vec::new();
    enroll::write_frame(&mut ok, &Request::Status).unwrap();
    assert_eq!(exchange(&ok), Reply::Ok);

    let m = bed.metrics(0);
    assert_eq!(
        ztunnel_e2e::daemon::metric(
            &m,
            "ztunnel_refusals_total",
            &[("reason", "enrollment_bad_request")]
        ),
        4.0,
        "{m}"
    );
    // Nothing was enrolled or recorded by any of it.
    let records: Vec<PodRecord> = std::fs::read_dir(node.state_dir.join("pods"))
        .unwrap()
        .map(|e| serde_json::from_slice(&std::fs::read(e.unwrap().path()).unwrap()).unwrap())
        .collect();
    assert_eq!(records.len(), 2, "client and echo only");
    // The silent client is cut off after the request timeout (5 s), and counted.
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = Vec::new();
    assert_eq!(
        silent.read_to_end(&mut rest).unwrap(),
        0,
        "closed without a reply"
    );
    let m = bed.metrics(0);
    assert_eq!(
        ztunnel_e2e::daemon::metric(
            &m,
            "ztunnel_refusals_total",
            &[("reason", "enrollment_timeout")]
        ),
        1.0,
        "{m}"
    );
}

/// `POST /logging` on the admin port, with `token` as a bearer token if given; the status.
fn post_logging(bed: &TestBed, token: Option<&str>) -> u16 {
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "POST /logging?level=debug HTTP/1.1\r\nhost: 127.0.0.1\r\n{auth}connection: close\r\ncontent-length: 0\r\n\r\n"
    );
    let text = bed.nodes[0].ns.block_on(async move {
        let mut s = TcpStream::connect("127.0.0.1:15000").await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf).into_owned()
    });
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The admin port is on the node's loopback, which host-network pods share: the request that
/// changes the daemon needs the token only root on the node can read.
#[test]
fn the_admin_port_changes_nothing_without_the_nodes_token_and_probes_answer_both_families() {
    let bed = TestBed::start();
    let path = bed.nodes[0].state_dir.join("admin-token");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the token file is root's only");
    let token = std::fs::read_to_string(&path).unwrap();
    assert_eq!(post_logging(&bed, None), 401);
    assert_eq!(post_logging(&bed, Some("0000")), 401);
    let m = bed.metrics(0);
    assert_eq!(
        daemon::metric(
            &m,
            "ztunnel_refusals_total",
            &[("reason", "admin_unauthorized")]
        ),
        2.0,
        "{m}"
    );
    assert_eq!(post_logging(&bed, Some(token.trim())), 200);
    // Reading stays open to the node's loopback.
    let (status, _) =
        daemon::http(&bed.nodes[0].ns, "GET", "127.0.0.1:15000", "/config_dump").unwrap();
    assert_eq!(status, 200);
}

/// A destination whose every pooled connection is going away at once (it drains: a GOAWAY on
/// each, their open streams still served) refuses no new connection: the stream the first
/// pooled connection refuses is tried again on a newly dialled one, not on the next pooled
/// connection, which is going away too. Here `a`'s pool holds three connections (two streams
/// each at most) to a hand-driven HBONE server on host `c`, each with one stream open and room
/// for another; the server sends a GOAWAY on each and refuses (`REFUSED_STREAM`) any stream
/// that reaches it before the GOAWAY has reached `a`, and a new client connection from `a`
/// must get through.
#[test]
fn a_stream_refused_by_a_draining_destination_is_retried_on_a_new_connection() {
    use bytes::Bytes;
    use ztunnel_e2e::mesh::{Mesh, NodeOptions, C_IP};

    let a = NodeOptions {
        extra_args: vec!["--pool-max-streams".into(), "2".into()],
        ..Default::default()
    };
    let mesh = Mesh::builder().a(a).destination_on_c("draining").start();
    let tls = mesh.destination_tls();
    // Each accepted connection answers every CONNECT with 200 and echoes its stream; a
    // message on `drain` makes every connection accepted so far send a GOAWAY (counted in
    // `draining`), refuse new streams and go on serving its open ones.
    let (drain, _) = tokio::sync::broadcast::channel::<()>(1);
    let draining_conns = Arc::new(AtomicUsize::new(0));
    let dialled = {
        let (drain, draining_conns) = (drain.clone(), draining_conns.clone());
        mesh.serve_tunnels_on_c(tls, move |mut conn| {
            let mut drain = drain.subscribe();
            let draining_conns = draining_conns.clone();
            async move {
                let mut draining = false;
                loop {
                    tokio::select! {
                        biased;
                        _ = drain.recv(), if !draining => {
                            draining = true;
                            conn.graceful_shutdown();
                            draining_conns.fetch_add(1, Ordering::SeqCst);
                        }
                        r = conn.accept() => {
                            let Some(Ok((req, mut respond))) = r else { return };
                            if draining {
                                respond.send_reset(h2::Reason::REFUSED_STREAM);
                                continue;
                            }
                            let ok = http::Response::builder().status(200).body(()).unwrap();
                            let Ok(mut send) = respond.send_response(ok, false) else { return };
                            tokio::spawn(async move {
                                let mut body = req.into_body();
                                while let Some(Ok(d)) = body.data().await {
                                    let _ = body.flow_control().release_capacity(d.len());
                                    let _ = send.send_data(d, false);
                                }
                                let _ = send.send_data(Bytes::new(), true);
                            });
                        }
                    }
                }
            }
        })
    };
    let echo = |msg: &'static [u8]| async move {
        let s = TcpStream::connect((C_IP, 8080)).await?;
        echo_on(s, msg).await
    };
    // Six client connections: three pooled connections of two streams each. One stream of
    // each ends: each pooled connection has one open and room for one.
    let mut held = mesh.a.block_on(async move {
        let mut held = Vec::new();
        for _ in 0..6 {
            held.push(echo(b"hold").await.expect("through the tunnel").0);
        }
        held
    });
    assert_eq!(
        dialled.load(Ordering::SeqCst),
        3,
        "two streams per pooled connection"
    );
    for i in [4, 2, 0] {
        drop(held.remove(i));
    }
    // The ended streams' places are free once `a` has seen them end; then the destination
    // drains every connection at once. Whether or not a GOAWAY has reached `a` when the new
    // stream is sent, the first pooled connection refuses it.
    let m = Mesh::metrics_when(&mesh.a, "ztunnel_pool_streams", &[], 3.0);
    assert_eq!(daemon::metric(&m, "ztunnel_pool_streams", &[]), 3.0, "{m}");
    drain.send(()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while draining_conns.load(Ordering::SeqCst) < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "every connection drains"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let (_, got) = mesh
        .a
        .block_on(echo(b"after the drain"))
        .expect("a new connection gets through while the destination drains");
    assert_eq!(got, b"after the drain");
    assert_eq!(
        dialled.load(Ordering::SeqCst),
        4,
        "the refused stream went to a newly dialled connection"
    );
    let (_, got) = mesh
        .a
        .block_on(echo_on(held.pop().unwrap(), b"still served"))
        .expect("an open stream of a draining connection is still served");
    assert_eq!(got, b"still served");
}

/// The daemon's reason for refusing an ADD, from the plugin's error object.
fn add_error_details(out: &ztunnel_e2e::cni::Outcome) -> String {
    out.json()["details"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Waits (up to 5 s) until node `i`'s daemon counts `reason` once; asserts it.
fn assert_refused_once(bed: &TestBed, i: usize, reason: &str) {
    let labels = [("reason", reason)];
    let m = bed.metrics_when(i, "ztunnel_refusals_total", &labels, 1.0);
    assert_eq!(
        daemon::metric(&m, "ztunnel_refusals_total", &labels),
        1.0,
        "{m}"
    );
}

/// The ADD of a pod of an enrolled namespace that discovery does not know yet fails with CNI
/// code 11 (the runtime tries again) and the daemon's reason; the pod gets no capture rules;
/// the daemon counts `enrollment_try_again` and logs it.
#[test]
fn an_add_for_a_pod_discovery_does_not_know_yet_fails_to_be_tried_again() {
    let bed = TestBed::start();
    let (outs, pod) = bed
        .try_add_pod(late("stranger", "demo", "10.20.1.30"))
        .unwrap();
    assert_eq!(outs[0].code, 0, "bridge: {:?}", outs[0]);
    assert_eq!(outs[1].error_code(), Some(11), "{:?}", outs[1]);
    let details = add_error_details(&outs[1]);
    assert!(
        details.contains("demo/stranger is not known to discovery yet"),
        "{:?}",
        outs[1]
    );
    assert!(!has_table(&pod.ns), "no capture rules for a refused pod");
    assert_refused_once(&bed, 0, "enrollment_try_again");
    let log = bed.log(0);
    assert!(log.contains("cannot enroll yet"), "{log}");
}

/// The ADD of a pod that Istio already handles (annotated `sidecar.istio.io/status`, in an
/// enrolled namespace) is refused: the plugin answers "not enrolled", so the chain succeeds
/// with the primary plugin's result unchanged, the pod gets no capture rules, and the daemon
/// counts `enrollment_other_mesh` and logs why.
#[test]
fn an_add_for_a_pod_istio_already_handles_is_refused_and_let_through() {
    let known = vec![late("sidecar", "demo", "10.20.1.31")];
    let bed = TestBed::builder().known(known.clone()).start();
    bed.edit_discovery(|doc| {
        for w in doc["workloads"].as_array_mut().expect("workloads") {
            if w["name"] == "sidecar" {
                w["annotations"] = json!({"sidecar.istio.io/status": "{}"});
            }
        }
    })
    .expect("the annotated pod loaded");
    let (outs, pod) = bed.try_add_pod(known[0].clone()).unwrap();
    assert!(outs.iter().all(|o| o.code == 0), "{outs:?}");
    assert_eq!(
        outs[1].json(),
        outs[0].json(),
        "prevResult must pass through"
    );
    assert!(!has_table(&pod.ns), "no capture rules for a refused pod");
    assert_refused_once(&bed, 0, "enrollment_other_mesh");
    let log = bed.log(0);
    let line = log
        .lines()
        .find(|l| l.contains("not enrolled: refused"))
        .unwrap_or_else(|| panic!("no refusal logged:\n{log}"));
    assert!(line.contains("sidecar.istio.io/status"), "{line}");
}

/// The ADD of a pod whose tunnel port (15008) is already held in its netns, so that the
/// daemon cannot bind its listeners there, fails with CNI code 11 and the daemon's error; the
/// daemon counts `enrollment_failed` and logs it.
#[test]
fn an_add_whose_listeners_cannot_be_bound_fails_to_be_tried_again() {
    let known = vec![late("busy", "demo", "10.20.1.32")];
    let bed = TestBed::builder().known(known.clone()).start();
    let mut held = None;
    let (outs, _pod) = bed
        .try_add_pod_after(known[0].clone(), |ns| {
            let l = ns.block_on(async { std::net::TcpListener::bind("0.0.0.0:15008") })?;
            held = Some(l);
            Ok(())
        })
        .unwrap();
    assert!(held.is_some());
    assert_eq!(outs[0].code, 0, "bridge: {:?}", outs[0]);
    assert_eq!(outs[1].error_code(), Some(11), "{:?}", outs[1]);
    let details = add_error_details(&outs[1]);
    assert!(
        details.contains("cannot listen in the pod's netns"),
        "{:?}",
        outs[1]
    );
    assert_refused_once(&bed, 0, "enrollment_failed");
    let log = bed.log(0);
    assert!(log.contains("enrollment failed"), "{log}");
}
