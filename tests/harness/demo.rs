//! The local demo (README command one): `sudo ./scripts/demo.sh` on a Debian or Ubuntu
//! machine installs the prerequisites, builds the workspace and runs this binary
//! (`target/debug/ztunnel-demo`, as root). It uses the two-node test bed of
//! `harness/testbed.rs`:
//!
//! ```text
//!  node n1 (netns)                                   node n2 (netns)
//!  cni0 10.20.1.1/24 fd20:1::1/64                    cni0 10.20.2.1/24 fd20:2::1/64
//!    client   10.20.1.10  demo  (enrolled)             server   10.20.2.10  demo  (enrolled)
//!    echo     10.20.1.12  demo  (enrolled)             legacy-2 10.20.2.11  plain
//!    legacy-1 10.20.1.11  plain
//!  ul0 192.168.77.1 fd77::1 ───── underlay ───── ul0 192.168.77.2 fd77::2
//! ```
//! The pods are dual-stack: each also has `fd20:<node>::<same last number>` (client
//! `fd20:1::10`, server `fd20:2::10`, …).
//!
//! 1. Brings up the nodes, one `ztunnel` daemon each (local CA, local discovery file), and
//!    the pods, wired by Debian's `bridge` + `host-local` CNI plugins with `ztunnel-cni`
//!    chained after them; prints the topology, one pod's CNI result and the nftables table
//!    the daemon put into an enrolled pod.
//! 2. Sends traffic: same node, cross node (capturing the underlay: only mutual TLS on port
//!    15008 may cross) over IPv4 and IPv6, to the Service VIP, from an enrolled pod to a pod
//!    outside the mesh and back the other way; every server reports which client address it
//!    saw.
//! 3. Revokes a leaked copy of the client pod's certificate (a revocation list signed by the
//!    bed's CA, in the file both daemons read with `--crl-path`): n2, which took a tunnel
//!    from the copy's holder, refuses it at its handshake (counted), while the client pod, on
//!    its own certificate, still gets through.
//! 4. Shows what the mesh did: each daemon's certificates, counters and access log.
//!
//! Any broken expectation (plaintext on the underlay, a packet between nodes not on 15008,
//! a lost client address, a failed request) ends the demo with a non-zero exit. Everything
//! (daemons, namespaces, files) is removed at the end.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use ztunnel_e2e::daemon::{self, metric};
use ztunnel_e2e::testbed::{self, Pod, TestBed, MARKER, VIP};

/// The server pod's IPv6 address, for the IPv6 step.
const SERVER_IP6: &str = "fd20:2::10";

/// How long any single connection, read or accept may take before the demo gives up.
const PATIENCE: Duration = Duration::from_secs(10);
const TRUST_DOMAIN: &str = "cluster.local";
const ENROLLED_NAMESPACE: &str = "demo";

fn step(s: &str) {
    println!("\n==> {s}");
}

/// Prints `text` indented, as output of something else.
fn indented(text: &str) {
    for l in text.lines() {
        println!("    | {l}");
    }
}

fn enrolled(pod: &Pod) -> bool {
    pod.spec.namespace == ENROLLED_NAMESPACE
}

fn identity(pod: &Pod) -> String {
    if enrolled(pod) {
        format!(
            "spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}",
            pod.spec.namespace, pod.spec.sa
        )
    } else {
        "-".to_owned()
    }
}

/// A tiny server in `pod`'s network namespace: it accepts one connection on `port` (IPv4 or
/// IPv6), reads the request to its end and answers `<pod> saw <peer IP>`. The task resolves to the peer
/// address the application saw. The socket is bound before this returns, so a client may
/// connect at once.
fn serve_once(pod: &Pod, port: u16) -> Result<JoinHandle<Result<IpAddr>>> {
    let listener = pod
        .ns
        .block_on(TcpListener::bind(("::", port)))
        .with_context(|| format!("listen on {}:{port}", pod.spec.name))?;
    let name = pod.spec.name;
    Ok(pod.ns.spawn(async move {
        let (mut s, peer) = timeout(PATIENCE, listener.accept())
            .await
            .with_context(|| format!("no connection reached {name}:{port}"))??;
        let peer = std::net::SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let mut request = Vec::new();
        timeout(PATIENCE, s.read_to_end(&mut request))
            .await
            .context("the request did not end")??;
        s.write_all(format!("{name} saw {}", peer.ip()).as_bytes())
            .await?;
        s.shutdown().await?;
        Ok(peer.ip())
    }))
}

/// Connects to `addr`, sends `msg`, half-closes and returns the answer.
async fn request(addr: String, msg: String) -> Result<String> {
    let exchange = async {
        let mut s = TcpStream::connect(&addr).await?;
        s.write_all(msg.as_bytes()).await?;
        s.shutdown().await?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).await?;
        Ok::<_, anyhow::Error>(answer)
    };
    timeout(PATIENCE, exchange)
        .await
        .with_context(|| format!("no answer from {addr}"))?
        .with_context(|| format!("request to {addr}"))
}

/// Runs a server in pod `to` (listening on `listen_port`) and a client in pod `from` that
/// connects to `addr`; prints what both applications saw and checks that the server saw
/// the client pod's own address (of `addr`'s family).
fn exchange(bed: &TestBed, from: &str, to: &str, addr: &str, listen_port: u16) -> Result<()> {
    let (client, server) = (bed.pod(from), bed.pod(to));
    let task = serve_once(server, listen_port)?;
    let own = |p: &Pod| {
        if addr.starts_with('[') {
            p.spec.ip6.unwrap_or("-")
        } else {
            p.spec.ip
        }
    };
    println!(
        "{from} ({}) connects to {addr}; {to} listens on port {listen_port}",
        own(client)
    );
    let msg = format!("hello from {from} {MARKER}");
    let answer = client.ns.block_on(request(addr.to_owned(), msg));
    let seen = server.ns.join(task);
    let answer = answer?;
    let seen = seen?;
    println!("  {from} got back: \"{answer}\"");
    println!("  {to}'s application saw the connection come from {seen}");
    ensure!(
        seen.to_string() == own(client),
        "{to} saw {seen}, not the client pod's address {}",
        own(client)
    );
    println!("  ok: that is {from}'s own pod IP, not a node or proxy address");
    Ok(())
}

fn topology(bed: &TestBed) -> Result<()> {
    step("the test bed: two nodes, their daemons and five pods");
    println!(
        "Nodes n1 and n2 are network namespaces joined by an underlay link ul0 \
         (192.168.77.1 <-> 192.168.77.2, fd77::1 <-> fd77::2);\neach routes the other's pod \
         subnets over it and \
         runs one ztunnel daemon (local CA, local discovery file).\nNamespace \
         '{ENROLLED_NAMESPACE}' is enrolled in the mesh, 'plain' is not.\n"
    );
    println!(
        "  {:<9} {:<6} {:<5} {:<11} {:<11} {:<9} identity",
        "pod", "ns", "node", "ip", "ipv6", "enrolled"
    );
    for p in &bed.pods {
        println!(
            "  {:<9} {:<6} {:<5} {:<11} {:<11} {:<9} {}",
            p.spec.name,
            p.spec.namespace,
            bed.node_of(p).name,
            p.spec.ip,
            p.spec.ip6.unwrap_or("-"),
            if enrolled(p) { "yes" } else { "no" },
            identity(p)
        );
    }

    step("CNI: each pod was added by the chain bridge -> host-local -> ztunnel-cni");
    let client = bed.pod("client");
    println!(
        "The runtime ran Debian's bridge plugin (with host-local IPAM) and then ztunnel-cni,\n\
         which handed the pod to the node's daemon (over its CNI socket) and passed the result\n\
         on unchanged. The chain's ADD result for pod '{}':",
        client.spec.name
    );
    indented(&serde_json::to_string_pretty(&client.result)?);

    step("in-pod capture: the daemon's nftables table inside an enrolled pod");
    println!(
        "For each enrolled pod the daemon installs a table in the pod's own network namespace\n\
         that sends the pod's TCP to the daemon's listeners (outbound 15001, inbound 15006,\n\
         tunnel 15008). The node's and other pods' rules are untouched."
    );
    println!(
        "$ ip netns exec {} nft list table inet ztunnel    # pod {}",
        client.ns.name, client.spec.name
    );
    let table = client
        .ns
        .exec("nft", &["list", "table", "inet", "ztunnel"])
        .context("the enrolled client pod has no `inet ztunnel` table")?;
    indented(&table);
    let legacy = bed.pod("legacy-1");
    let plain = legacy.ns.exec("nft", &["list", "table", "inet", "ztunnel"]);
    println!(
        "pod {} (namespace plain, not enrolled): {}",
        legacy.spec.name,
        if plain.is_ok() {
            "has a ztunnel table (unexpected)"
        } else {
            "no ztunnel table; its traffic is left alone"
        }
    );
    ensure!(
        plain.is_err(),
        "a pod outside the mesh was given capture rules"
    );
    Ok(())
}

/// Packets crossing the underlay while `f` runs, captured on node n1's `ul0`.
fn on_the_underlay(
    bed: &TestBed,
    name: &str,
    f: impl FnOnce() -> Result<()>,
) -> Result<testbed::Captured> {
    let pcap = bed.dir().join(format!("{name}.pcap"));
    let cap = testbed::start_capture(&bed.nodes[0].ns, "ul0", &pcap)?;
    let result = f();
    let captured = testbed::stop_capture(cap, &pcap)?;
    result?;
    Ok(captured)
}

fn print_capture(captured: &testbed::Captured) {
    println!(
        "  tcpdump on n1's ul0 saw {} TCP packet(s){}",
        captured.lines.len(),
        if captured.lines.len() > 8 {
            "; the first 8:"
        } else {
            ":"
        }
    );
    for l in captured.lines.iter().take(8) {
        println!("    | {l}");
    }
    println!(
        "  the application's marker \"{MARKER}\" on the underlay: {}",
        if captured.marker_seen {
            "VISIBLE"
        } else {
            "not visible"
        }
    );
}

fn traffic(bed: &TestBed) -> Result<()> {
    step("same node: client -> echo (10.20.1.12:8080), both enrolled, both on n1");
    println!(
        "The client pod's capture sends the connection to n1's daemon, which carries it over\n\
         mutual TLS (HBONE) to the echo pod's tunnel port 15008 without leaving the node."
    );
    exchange(bed, "client", "echo", "10.20.1.12:8080", 8080)?;

    step("cross node: client (n1) -> server (10.20.2.10:8080, n2), capturing the underlay");
    println!(
        "The connection to server:8080 leaves n1 as an HTTP/2 CONNECT stream inside mutual TLS\n\
         to server's port 15008 on n2. The request carries the marker; it must not be\n\
         readable between the nodes."
    );
    let captured = on_the_underlay(bed, "cross-node", || {
        exchange(bed, "client", "server", "10.20.2.10:8080", 8080)
    })?;
    print_capture(&captured);
    ensure!(
        !captured.marker_seen,
        "the plaintext marker crossed the underlay"
    );
    ensure!(!captured.lines.is_empty(), "the capture saw no packets");
    let stray: Vec<&String> = captured
        .lines
        .iter()
        .filter(|l| !l.contains(".15008"))
        .collect();
    ensure!(
        stray.is_empty(),
        "TCP between the nodes not to/from port 15008: {stray:#?}"
    );
    println!(
        "  ok: every TCP packet between the nodes is to/from port 15008 (the HBONE tunnel),\n\
         \x20 none to port 8080, and the application's bytes are encrypted"
    );

    step(&format!(
        "cross node over IPv6: client (n1) -> server ([{SERVER_IP6}]:8080, n2), capturing the underlay"
    ));
    println!(
        "The pods are dual-stack, and IPv6 is captured as IPv4 is: the tunnel goes to the\n\
         server pod's IPv6 address, port 15008."
    );
    let captured = on_the_underlay(bed, "cross-node-ipv6", || {
        exchange(
            bed,
            "client",
            "server",
            &format!("[{SERVER_IP6}]:8080"),
            8080,
        )
    })?;
    print_capture(&captured);
    ensure!(
        !captured.marker_seen,
        "the plaintext marker crossed the underlay"
    );
    let tunnel = format!("{SERVER_IP6}.15008");
    ensure!(
        !captured.lines.is_empty() && captured.lines.iter().all(|l| l.contains(&tunnel)),
        "TCP between the nodes other than the IPv6 tunnel to {tunnel}: {:#?}",
        captured.lines
    );
    println!("  ok: only the IPv6 tunnel to port 15008 crossed, encrypted");

    step(&format!(
        "Service VIP: client -> {VIP}:80 (Service demo/server, port 80 -> targetPort 8080)"
    ));
    println!(
        "No kube-proxy here: the client's daemon resolves the VIP from discovery, picks the\n\
         server pod and opens the tunnel to it on port 8080."
    );
    exchange(bed, "client", "server", &format!("{VIP}:80"), 8080)?;

    step("enrolled -> not enrolled: client -> legacy-2 (10.20.2.11:9090, namespace plain)");
    println!(
        "legacy-2 is outside the mesh, so it cannot terminate mutual TLS: n1's daemon passes\n\
         the connection through as plain TCP (the underlay does carry these bytes in clear)."
    );
    let captured = on_the_underlay(bed, "passthrough", || {
        exchange(bed, "client", "legacy-2", "10.20.2.11:9090", 9090)
    })?;
    print_capture(&captured);
    ensure!(
        captured.lines.iter().any(|l| l.contains("10.20.2.11.9090")),
        "the passthrough connection did not go straight to 10.20.2.11:9090"
    );

    step("not enrolled -> enrolled: legacy-2 -> server (10.20.2.10:8080), both on n2");
    println!(
        "legacy-2 sends plain TCP; the server pod's capture hands it to n2's daemon on the\n\
         plaintext inbound port 15006, which delivers it to the application."
    );
    exchange(bed, "legacy-2", "server", "10.20.2.10:8080", 8080)?;
    Ok(())
}

/// Writes `pem` to `path` as a volume update does: a new file renamed over the old.
fn publish(path: &std::path::Path, pem: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, pem)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Waits (up to 10 s) until node `i`'s daemon has put the revocation file's lists in force
/// `times` times since it started.
fn reloaded(bed: &TestBed, i: usize, times: usize) -> Result<()> {
    let deadline = std::time::Instant::now() + PATIENCE;
    while bed.log(i).matches("revocation lists reloaded").count() < times {
        ensure!(
            std::time::Instant::now() < deadline,
            "node {i} did not read the revocation file"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn revocation(bed: &TestBed, crl: &std::path::Path) -> Result<()> {
    step("revocation: a leaked copy of the client's certificate is revoked");
    println!(
        "Say a copy of the client pod's certificate and key leaked. From node n1 (outside any\n\
         pod), a TLS client holding such a copy (issued by the bed's CA for the client's\n\
         identity) opens a tunnel to server:15008, and n2 takes it."
    );
    let client_id: ztunnel::identity::Identity = identity(bed.pod("client")).parse()?;
    let ca = ztunnel::ca::LocalCa::load_or_create(&bed.ca_dir, TRUST_DOMAIN)?;
    let hour = Duration::from_secs(3600);
    let leaked = ztunnel::ca::issue(&ca, &client_id, hour)?;
    let server_id: ztunnel::identity::Identity = identity(bed.pod("server")).parse()?;
    let tls = leaked.client_config(std::slice::from_ref(&server_id));
    let tunnel_with_the_copy = || {
        let tls = tls.clone();
        let opts = ztunnel::net::ConnectOptions {
            mark: None,
            timeout: PATIENCE,
        };
        bed.nodes[0].ns.block_on(async move {
            use ztunnel::hbone::client::{self, ClientError};
            let addr = "10.20.2.10:15008".parse().expect("address");
            let (send, conn) = client::connect(addr, tls, opts).await?;
            tokio::spawn(conn);
            // A request n2 answers, whatever its status, went through the handshake (in TLS
            // 1.3 the server judges the client's certificate after the client is done).
            let target = "10.20.2.10:8081".parse().expect("address");
            let req = client::connect_request(target, &Default::default())?;
            match client::open_stream(send, req).await {
                Ok(_) | Err(ClientError::Status(_)) => Ok(()),
                Err(e) => Err(e),
            }
        })
    };
    tunnel_with_the_copy().context("the copy's tunnel before the revocation")?;
    println!("  the copy's tunnel: taken (serial {})", leaked.serial);
    println!(
        "Both daemons check every tunnel peer against the revocation lists in --crl-path\n\
         ({}), read again every 2 s. The bed's CA signs a list naming the copy's serial.",
        crl.display()
    );
    let now = std::time::SystemTime::now();
    publish(crl, &ca.revocation_list(&[&leaked.serial], 1, now, hour)?)?;
    reloaded(bed, 1, 1)?;
    let refused = tunnel_with_the_copy();
    ensure!(refused.is_err(), "n2 took the revoked copy's tunnel");
    let labels = [("reason", "inbound_peer_revoked")];
    let m = bed.metrics_when(1, "ztunnel_refusals_total", &labels, 1.0);
    let n = daemon::try_metric(&m, "ztunnel_refusals_total", &labels).unwrap_or(0.0);
    ensure!(n >= 1.0, "n2 counted no revoked peer");
    println!(
        "  the copy's tunnel: refused at its handshake ({})\n\
         \x20 n2: ztunnel_refusals_total{{reason=\"inbound_peer_revoked\"}} {n}",
        refused.err().map(|e| e.to_string()).unwrap_or_default()
    );
    println!("The client pod itself holds its own certificate, which the list does not name:");
    exchange(bed, "client", "server", "10.20.2.10:8080", 8080)
}

fn what_the_mesh_did(bed: &TestBed) -> Result<()> {
    for (i, node) in bed.nodes.iter().enumerate() {
        step(&format!("what node {}'s daemon did", node.name));
        let (status, body) = daemon::http(&node.ns, "GET", "127.0.0.1:15000", "/config_dump")?;
        ensure!(status == 200, "config_dump answered {status}: {body}");
        let dump: serde_json::Value = serde_json::from_str(&body).context("config_dump JSON")?;
        let certs = dump["certificates"].as_array().cloned().unwrap_or_default();
        println!(
            "certificates it holds for its enrolled pods (admin API 127.0.0.1:15000/config_dump):"
        );
        for c in &certs {
            println!(
                "  {}  serial {}  valid until {}",
                c["identity"].as_str().unwrap_or("?"),
                c["serial"]
                    .as_str()
                    .map_or_else(|| c["serial"].to_string(), str::to_owned),
                c["notAfter"].as_str().unwrap_or("?")
            );
        }
        for p in bed.pods.iter().filter(|p| p.spec.node == i && enrolled(p)) {
            let id = identity(p);
            ensure!(
                certs.iter().any(|c| c["identity"] == id.as_str()),
                "{} holds no certificate for {id}",
                node.name
            );
        }

        let m = bed.metrics(i);
        println!("metrics (127.0.0.1:15020/metrics):");
        for dir in ["outbound", "inbound", "inbound_plaintext", "passthrough"] {
            let n = metric(
                &m,
                "ztunnel_proxied_connections_total",
                &[("direction", dir)],
            );
            println!("  ztunnel_proxied_connections_total{{direction=\"{dir}\"}} {n}");
        }
        let opened = metric(&m, "ztunnel_pool_connections_opened_total", &[]);
        println!("  ztunnel_pool_connections_opened_total {opened}");

        println!("access log (one line per proxied connection, when it closes):");
        let log = bed.log(i);
        for l in log.lines().filter(|l| l.contains("connection closed")) {
            println!("  {l}");
        }
    }
    Ok(())
}

fn run(bed: &TestBed, crl: &std::path::Path) -> Result<()> {
    topology(bed)?;
    traffic(bed)?;
    revocation(bed, crl)?;
    what_the_mesh_did(bed)
}

/// The last lines of each daemon's log, to explain a failure.
fn print_log_tails(bed: &TestBed) {
    for (i, node) in bed.nodes.iter().enumerate() {
        let log = bed.log(i);
        let lines: Vec<&str> = log.lines().collect();
        eprintln!("---- last lines of {}'s daemon log ----", node.name);
        for l in &lines[lines.len().saturating_sub(30)..] {
            eprintln!("{l}");
        }
    }
}

fn main() -> Result<()> {
    step("starting the test bed (nodes n1 and n2, a ztunnel daemon on each, five pods)");
    println!(
        "this needs root, ip, nft, tcpdump and containernetworking-plugins (scripts/prereqs.sh)"
    );
    // The revocation lists both daemons read (none yet: the file appears in step 3).
    let crl_dir = tempfile::tempdir().context("a directory for the revocation lists")?;
    let crl = crl_dir.path().join("ca-crl.pem");
    let crl_path = crl.display().to_string();
    // `TestBed::start()` with the default pods, but failing with an error rather than a panic.
    let bed = TestBed::builder()
        .pods(testbed::dual_stack_pods())
        .daemon_env(&[("ZTUNNEL_CRL_PATH", crl_path.as_str())])
        .try_start()
        .context("starting the test bed")?;
    println!(
        "both daemons are ready; state, logs and the discovery file are in {} (removed at the end)",
        bed.dir().display()
    );

    let result = run(&bed, &crl);
    if result.is_err() {
        print_log_tails(&bed);
    }

    step("cleaning up");
    drop(bed);
    result?;
    println!("daemons stopped, namespaces deleted. done.");
    Ok(())
}
