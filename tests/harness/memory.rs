//! Measures the daemon's memory on the two-node test bed (in-pod capture, real processes):
//! the idle RSS of each daemon, then the RSS added per idle proxied connection when `N`
//! connections from pod `client` (node n1) to pod `server` (node n2) are open and idle.
//! A measurement, not a test: it prints figures (see `benches/README.md`).
//! Run as root: `cargo run -p ztunnel-e2e --bin ztunnel-memory [--release] -- [N]`.

use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ztunnel_e2e::testbed::TestBed;

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")
}

fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn main() -> Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(2000);
    raise_fd_limit();
    let bed = TestBed::start_with(ztunnel_e2e::testbed::default_pods())?;
    let pid = |i: usize| {
        bed.nodes[i]
            .daemon
            .as_ref()
            .and_then(|d| d.pid())
            .context("pid")
    };
    let (p1, p2) = (pid(0)?, pid(1)?);
    // Warm both paths once (certificates, the pooled tunnel), then let things settle.
    let server = bed.pod("server");
    server.ns.spawn(async move {
        let l = TcpListener::bind(("0.0.0.0", 8080)).await.expect("bind");
        let mut held = Vec::new();
        loop {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut b = [0u8; 1];
            let _ = s.read_exact(&mut b).await;
            let _ = s.write_all(b"k").await;
            held.push(s);
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let client = bed.pod("client");
    client.ns.block_on(async {
        let mut s = TcpStream::connect(("10.20.2.10", 8080)).await?;
        s.write_all(b"x").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await
    })?;
    std::thread::sleep(Duration::from_secs(2));
    let (idle1, idle2) = (rss_kib(p1)?, rss_kib(p2)?);
    println!("idle RSS (2 enrolled pods on n1, 1 on n2, one pooled tunnel): n1 {idle1} KiB, n2 {idle2} KiB");

    let conns = client.ns.block_on(async move {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let mut s = TcpStream::connect(("10.20.2.10", 8080)).await?;
            s.write_all(b"x").await?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await?;
            v.push(s);
        }
        Ok::<_, std::io::Error>(v)
    })?;
    std::thread::sleep(Duration::from_secs(2));
    let (busy1, busy2) = (rss_kib(p1)?, rss_kib(p2)?);
    let per = |idle: u64, busy: u64| (busy.saturating_sub(idle) * 1024) as f64 / n as f64;
    println!("{n} idle proxied connections open: n1 {busy1} KiB, n2 {busy2} KiB");
    println!(
        "per idle proxied connection: {:.0} bytes on the source node (outbound), {:.0} bytes on the destination node (inbound)",
        per(idle1, busy1),
        per(idle2, busy2)
    );
    drop(conns);
    Ok(())
}
