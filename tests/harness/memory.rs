//! Measures the daemon's memory on the two-node test bed (in-pod capture, real processes):
//! the idle RSS of each daemon, then the RSS added per idle proxied connection when `N`
//! connections from pod `client` (node n1) to pod `server` (node n2) are open and idle.
//! A measurement, not a test: it prints figures (see `benches/README.md`).
//! Run as root: `cargo run -p ztunnel-e2e --bin ztunnel-memory --profile dist -- [N]` (the
//! shipped build; `--release` measures the benchmarks' build).
//!
//! Most of an idle daemon's RSS is its own code, mapped from the page cache, and how much of
//! it is mapped depends on how the binary's pages got there: the kernel maps a whole cached
//! folio on a fault, and a file just written by the linker or `cp` is cached in larger folios
//! than one read back by page faults. To measure the same way every time, the binary is
//! evicted from the page cache first, as after a reboot or a reclaim. Each daemon's RSS is
//! also printed split by mapping (the binary, each library, heap, stacks).
//!
//! With `discovery [WORKLOADS] [SERVICES] [POLICIES]` it measures instead a daemon loading a
//! large local discovery file (default 100 000 workloads in 1 000 namespaces on 5 000 nodes,
//! 10 000 services of ten endpoints each, and 10 000 policies), against one loading only the
//! policies: the time until ready, the settled RSS and the peak RSS (`VmHWM`); the
//! differences, per workload, are what the workloads and services cost.

use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ztunnel_e2e::procfs::{rss_by_mapping, rss_kib, status_kib};
use ztunnel_e2e::testbed::TestBed;

/// Drops `path`'s clean pages from the page cache (see the module doc).
fn evict_from_page_cache(path: &std::path::Path) -> Result<()> {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
    let f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    f.sync_all()?;
    posix_fadvise(&f, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED)
        .with_context(|| format!("posix_fadvise {}", path.display()))?;
    Ok(())
}

fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// A discovery file with `workloads` remote workloads in 1 000 namespaces on 5 000 nodes,
/// `services` services (ten per namespace, each selecting ten of its workloads when there are
/// 100 per namespace) and `policies` policies.
fn big_mesh(workloads: usize, services: usize, policies: usize) -> String {
    use std::fmt::Write;
    let mut y = String::from("trustDomain: cluster.local\nnamespaces:\n");
    for i in 0..1000 {
        let _ = writeln!(
            y,
            "  - {{name: ns-{i}, labels: {{ztunnel.dev/dataplane-mode: ambient}}}}"
        );
    }
    y.push_str("workloads:\n");
    for i in 0..workloads {
        let _ = writeln!(
            y,
            "  - {{uid: {:08x}-6c1e-4d2a-9b7f-{:012x}, name: app-{}-7d4b9c-{:05}, namespace: ns-{}, serviceAccount: sa-{}, node: node-{}, ips: [10.{}.{}.{}], labels: {{app: app-{}, shard: s-{}, version: v1}}}}",
            i, i, i % 500, i, i % 1000, i % 500, i % 5000, (i >> 16) & 255, (i >> 8) & 255, i & 255, i % 500, (i / 10_000) % 10
        );
    }
    y.push_str("services:\n");
    for i in 0..services {
        let (ns, shard) = (i % 1000, (i / 1000) % 10);
        let _ = writeln!(
            y,
            "  - {{name: svc-{i}, namespace: ns-{ns}, vips: [172.{}.{}.{}], ports: [{{port: 80, targetPort: 8080}}], selector: {{app: app-{}, shard: s-{shard}}}}}",
            16 + ((i >> 16) & 15), (i >> 8) & 255, i & 255, ns % 500
        );
    }
    y.push_str("policies:\n");
    for i in 0..policies {
        let _ = writeln!(
            y,
            "  - {{apiVersion: security.ztunnel.dev/v1, kind: AuthorizationPolicy, metadata: {{name: p-{i}, namespace: ns-{}}}, spec: {{selector: {{matchLabels: {{app: app-{}}}}}, action: ALLOW, rules: [{{from: [{{source: {{principals: [cluster.local/ns/ns-{}/sa/*], ipBlocks: [10.0.0.0/8]}}}}], to: [{{operation: {{ports: ['8080']}}}}]}}]}}}}",
            i % 1000, i % 500, (i + 1) % 1000
        );
    }
    y
}

/// What one daemon loading a discovery file measured.
struct Loaded {
    /// From the process's start to its readiness (which waits for discovery).
    ready: Duration,
    /// RSS once ready and settled, KiB.
    settled: u64,
    /// The highest RSS it reached (`VmHWM`), KiB.
    peak: u64,
}

/// Starts a daemon on `file` in its own namespace, waits until ready and settled.
fn load_discovery(dir: &std::path::Path, name: &str, file: &std::path::Path) -> Result<Loaded> {
    let ns =
        ztunnel_e2e::netns::Netns::new(&format!("{}-{name}", ztunnel_e2e::netns::unique_prefix()))?;
    let args: Vec<String> = [
        "run",
        "--node-name",
        "this-node",
        "--discovery-file",
        &file.display().to_string(),
        "--ca-dir",
        &dir.join("ca").display().to_string(),
        "--state-dir",
        &dir.join(format!("{name}-state")).display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let start = std::time::Instant::now();
    let mut p = ztunnel_e2e::daemon::Process::start(&ns, name, dir, &args, &[])?;
    ztunnel_e2e::daemon::wait_ready(
        &ns,
        &mut p,
        "127.0.0.1:15021",
        "/healthz/ready",
        Duration::from_secs(300),
    )?;
    let ready = start.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let pid = p.pid().context("pid")?;
    let loaded = Loaded {
        ready,
        settled: rss_kib(pid)?,
        peak: status_kib(pid, "VmHWM")?,
    };
    p.stop(Duration::from_secs(2));
    Ok(loaded)
}

/// The discovery-scale measurement: a daemon on a file with the policies only (the
/// baseline), then one on the same file with the workloads and services too.
fn discovery_scale(workloads: usize, services: usize, policies: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let only_policies = dir.path().join("policies.yaml");
    std::fs::write(&only_policies, big_mesh(0, 0, policies))?;
    let full = dir.path().join("full.yaml");
    let yaml = big_mesh(workloads, services, policies);
    println!(
        "discovery file: {workloads} workloads, {services} services, {policies} policies, {} MiB of YAML",
        yaml.len() >> 20
    );
    std::fs::write(&full, yaml)?;
    evict_from_page_cache(&ztunnel_e2e::daemon::binary("ztunnel"))?;
    let base = load_discovery(dir.path(), "policies", &only_policies)?;
    let all = load_discovery(dir.path(), "full", &full)?;
    let per = |kib: u64| (kib * 1024) as f64 / workloads.max(1) as f64;
    let (settled, peak) = (
        all.settled.saturating_sub(base.settled),
        all.peak.saturating_sub(base.peak),
    );
    println!("| | policies only | full | added |");
    println!("|---|---|---|---|");
    println!(
        "| ready after | {:.2} s | {:.2} s | {:.2} s |",
        base.ready.as_secs_f64(),
        all.ready.as_secs_f64(),
        all.ready.as_secs_f64() - base.ready.as_secs_f64()
    );
    println!(
        "| settled RSS | {} KiB | {} KiB | {settled} KiB ({:.0} B per workload) |",
        base.settled,
        all.settled,
        per(settled)
    );
    println!(
        "| peak RSS | {} KiB | {} KiB | {peak} KiB ({:.0} B per workload; {:.2}x settled) |",
        base.peak,
        all.peak,
        per(peak),
        peak as f64 / settled.max(1) as f64
    );
    Ok(())
}

fn main() -> Result<()> {
    if std::env::args().nth(1).as_deref() == Some("discovery") {
        let arg = |i: usize, d: usize| -> Result<usize> {
            Ok(std::env::args()
                .nth(i)
                .map(|a| a.parse())
                .transpose()?
                .unwrap_or(d))
        };
        return discovery_scale(arg(2, 100_000)?, arg(3, 10_000)?, arg(4, 10_000)?);
    }
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(2000);
    raise_fd_limit();
    evict_from_page_cache(&ztunnel_e2e::daemon::binary("ztunnel"))?;
    let bed = TestBed::builder().try_start()?;
    let (p1, p2) = (bed.daemon_pid(0)?, bed.daemon_pid(1)?);
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
    for (name, pid) in [("n1", p1), ("n2", p2)] {
        println!(
            "  {name}: {} KiB anonymous (heap, stacks), {} KiB mapped from the binary and libraries",
            status_kib(pid, "RssAnon")?,
            status_kib(pid, "RssFile")?
        );
        let parts: Vec<String> = rss_by_mapping(pid)?
            .into_iter()
            .map(|(name, kib)| format!("{name} {kib}"))
            .collect();
        println!("    by mapping (KiB): {}", parts.join(", "));
    }

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
