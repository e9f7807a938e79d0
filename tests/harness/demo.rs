//! The local demo (README command one): builds the binaries, brings up the test bed (two
//! nodes with a daemon each, one host outside the mesh), sends traffic across it, shows what
//! the mesh did, and cleans up. Run as root: `cargo run -p ztunnel-e2e --bin ztunnel-demo`.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztunnel_e2e::daemon::metric;
use ztunnel_e2e::mesh::{Mesh, A_IP, B_IP, C_IP};

const MARKER: &str = "ZT-DEMO-PLAINTEXT-MARKER";

fn step(s: &str) {
    println!("\n==> {s}");
}

/// Accepts one connection on `port` and answers `<name> got: <request>`.
async fn reply_once(port: u16, name: &'static str) -> Result<String> {
    let l = ztunnel_e2e::apps::listen(port).await;
    let (mut s, peer) = l.accept().await?;
    let mut req = Vec::new();
    s.read_to_end(&mut req).await?;
    let req = String::from_utf8_lossy(&req).into_owned();
    s.write_all(format!("{name} got: {req}").as_bytes()).await?;
    s.shutdown().await?;
    Ok(format!("{name} saw a connection from {peer}"))
}

async fn request(ip: &'static str, port: u16, body: String) -> Result<String> {
    let mut s = TcpStream::connect((ip, port)).await?;
    s.write_all(body.as_bytes()).await?;
    s.shutdown().await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

fn main() -> Result<()> {
    step("starting two nodes (10.77.0.1 = node-a/client, 10.77.0.2 = node-b/server) and an outside host (10.77.0.3)");
    let mesh = Mesh::default_pair();
    println!(
        "both daemons are ready; logs in {}",
        mesh.dir.path().display()
    );

    step("capturing the wire between the nodes (node-b's switch port) while client → server:8080");
    let pcap = mesh.dir.path().join("wire.pcap");
    let mut tcpdump = Command::new("ip")
        .args([
            "netns",
            "exec",
            &mesh.sw.ns.name,
            "tcpdump",
            "-i",
            &mesh.b_port,
            "-U",
            "--immediate-mode",
            "-w",
        ])
        .arg(&pcap)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("tcpdump (apt-get install tcpdump)")?;
    std::thread::sleep(Duration::from_millis(1500));
    let server = mesh.b.spawn(reply_once(8080, "server"));
    std::thread::sleep(Duration::from_millis(100));
    let answer = mesh
        .a
        .block_on(request(B_IP, 8080, format!("hello from client {MARKER}")))?;
    println!("client got back: {answer}");
    println!("{}", mesh.b.join(server)?);
    std::thread::sleep(Duration::from_millis(1000));
    let pid = nix::unistd::Pid::from_raw(tcpdump.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let _ = tcpdump.wait();
    let wire = std::fs::read(&pcap)?;
    let plaintext_seen = wire.windows(MARKER.len()).any(|w| w == MARKER.as_bytes());
    let dump = Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(&pcap)
        .arg("tcp")
        .output()?;
    let lines = String::from_utf8_lossy(&dump.stdout).into_owned();
    let to_15008 = lines.lines().filter(|l| l.contains(".15008")).count();
    let to_8080 = lines.lines().filter(|l| l.contains(".8080")).count();
    println!("TCP packets on the wire: {} in all, {to_15008} to/from port 15008 (HBONE), {to_8080} to/from port 8080", lines.lines().count());
    for line in lines.lines().take(8) {
        println!("  | {line}");
    }
    println!("application marker visible on the wire: {plaintext_seen}");
    ensure!(
        !plaintext_seen && to_15008 > 0 && to_8080 == 0,
        "traffic did not cross as mTLS only"
    );

    step("client → outside host 10.77.0.3:9090 (not in the mesh: plain TCP passthrough)");
    let outside = mesh.c.spawn(reply_once(9090, "outside"));
    std::thread::sleep(Duration::from_millis(100));
    println!(
        "client got back: {}",
        mesh.a.block_on(request(C_IP, 9090, "hi outside".into()))?
    );
    println!("{}", mesh.c.join(outside)?);

    step("outside host → server:8080 (plaintext, taken in by node-b's daemon on 15006)");
    let server = mesh.b.spawn(reply_once(8080, "server"));
    std::thread::sleep(Duration::from_millis(100));
    println!(
        "outside got back: {}",
        mesh.c.block_on(request(B_IP, 8080, "hi server".into()))?
    );
    println!("{}", mesh.b.join(server)?);

    step("what the daemons know");
    for (name, ns) in [("node-a", &mesh.a), ("node-b", &mesh.b)] {
        let dump = Mesh::config_dump(ns);
        for c in dump["certificates"].as_array().into_iter().flatten() {
            println!(
                "{name}: certificate {} (serial {}, expires {})",
                c["identity"], c["serial"], c["notAfter"]
            );
        }
        let m = Mesh::metrics(ns);
        for dir in ["outbound", "passthrough", "inbound", "inbound_plaintext"] {
            let n = metric(
                &m,
                "ztunnel_proxied_connections_total",
                &[("direction", dir)],
            );
            if n > 0.0 {
                println!("{name}: {n} {dir} connection(s)");
            }
        }
        let opened = metric(&m, "ztunnel_pool_connections_opened_total", &[]);
        if opened > 0.0 {
            println!("{name}: {opened} mTLS tunnel connection(s) opened by the pool");
        }
    }
    let a_log = mesh.a_daemon.log();
    println!("\nnode-a access log:");
    for l in a_log.lines().filter(|l| l.contains("connection closed")) {
        println!("  {l}");
    }
    step("cleaning up");
    drop(mesh);
    println!(
        "done: {A_IP} → {B_IP} crossed as mutual TLS on port 15008; no plaintext on the wire."
    );
    Ok(())
}
