//! The data path measured on real daemon processes: the two-node network-namespace bed of the
//! end-to-end tests (`ztunnel_e2e::testbed`), with its CNI chain, in-pod capture and two
//! `ztunnel` processes, and the applications in the pods. Needs root; run by
//! `cargo bench -p ztunnel-benches --bench daemons -- [REPS] [HELD] [h2|quic|all]` (see
//! `benches/README.md`), never by the test command.
//!
//! Every tunnelled figure has a baseline measured in the same run, interleaved with it: the
//! same applications between two pods of a namespace that is not enrolled (`legacy-1` on n1 to
//! `legacy-2` on n2), whose plain TCP crosses the same veths and bridge without a daemon. Each
//! repetition measures every path once, in turn; a figure is the median of the repetitions.
//!
//! - bulk: 512 MiB sent to a sink, on 1 connection and on 8 at once (64 MiB each), from the
//!   connect to the sink's count of what it received;
//! - round trip: 1 KiB written and echoed back on a held connection, median and p99;
//! - connections: connect, one byte each way, close; one at a time and 8 in parallel;
//! - the daemons' CPU time (`/proc/<pid>/stat`, both nodes) per GiB of bulk and per 1 000
//!   connections;
//! - RSS (first bed only, which runs the defaults): each daemon idle, with `HELD` proxied
//!   connections open and idle (per connection), and 14 s after the last load (against idle).
//!
//! Two beds run one after the other: `h2` with the daemons' defaults (tunnels on HTTP/2), and
//! `quic` with QUIC listening on both daemons and dialled for one server pod (`server-quic`), so
//! that HTTP/2 and QUIC tunnels are measured side by side. QUIC's endpoints hold receive
//! buffers of their own, so the memory figures come from the `h2` bed only.

use std::io;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ztunnel_e2e::procfs::{cpu_time, rss_kib, status_kib};
use ztunnel_e2e::testbed::{default_pods, PodSpec, TestBed};

/// The applications' port in every server pod.
const PORT: u16 = 8080;
const BULK_BYTES: u64 = 512 << 20;
const ROUND_TRIPS: usize = 2_000;
const SERIAL_CONNECTIONS: usize = 500;
const PARALLEL_CONNECTIONS: usize = 1_000;
/// How long after the load RSS is read again (the figure Istio's ztunnel was compared on).
const AFTER_LOAD: Duration = Duration::from_secs(14);

/// A client pod and the server it talks to.
#[derive(Clone, Copy)]
struct Path {
    name: &'static str,
    client: &'static str,
    server: &'static str,
}

const PLAIN: Path = Path {
    name: "plain TCP",
    client: "legacy-1",
    server: "10.20.2.11",
};
const HTTP2: Path = Path {
    name: "HBONE (HTTP/2)",
    client: "client",
    server: "10.20.2.10",
};
const QUIC: Path = Path {
    name: "HBONE (QUIC)",
    client: "client",
    server: "10.20.2.12",
};

/// One repetition's figures for one path.
#[derive(Clone, Debug, Default)]
struct Sample {
    /// Bytes per second.
    bulk_1: f64,
    bulk_8: f64,
    rr_median: Duration,
    rr_p99: Duration,
    /// Connections per second.
    conns_1: f64,
    conns_8: f64,
    /// Both daemons' CPU during the bulk runs and during the connection runs.
    cpu_bulk: Duration,
    cpu_conns: Duration,
}

/// The server application: the first byte of a connection chooses what it does. `S`: a sink
/// that answers with the number of bytes it received (a big-endian u64) once the client
/// half-closes; `E`: echo until the end; `P`: one byte back, then wait for the close.
async fn serve(l: TcpListener) {
    loop {
        let Ok((s, _)) = l.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let _ = answer(s).await;
        });
    }
}

async fn answer(mut s: TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    match s.read_u8().await? {
        b'S' => {
            let mut buf = vec![0u8; 256 << 10];
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            s.write_u64(total).await?;
            s.shutdown().await
        }
        b'E' => {
            let (mut r, mut w) = s.split();
            tokio::io::copy(&mut r, &mut w).await.map(drop)
        }
        b'P' => {
            s.write_all(b"p").await?;
            let mut b = [0u8; 1];
            s.read(&mut b).await.map(drop)
        }
        _ => Ok(()),
    }
}

async fn connect(server: &str, op: u8) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect((server, PORT)).await?;
    s.set_nodelay(true)?;
    s.write_all(&[op]).await?;
    Ok(s)
}

/// `streams` connections at once, each sending `BULK_BYTES / streams` to the sink; the time
/// until every sink has counted all of its bytes.
async fn bulk(server: &'static str, streams: usize) -> io::Result<Duration> {
    let each = BULK_BYTES / streams as u64;
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..streams {
        set.spawn(async move {
            let mut s = connect(server, b'S').await?;
            let buf = vec![0x5au8; 256 << 10];
            let mut left = each;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                s.write_all(&buf[..n]).await?;
                left -= n as u64;
            }
            s.shutdown().await?;
            let got = s.read_u64().await?;
            if got != each {
                return Err(io::Error::other(format!(
                    "the sink counted {got} of {each} bytes"
                )));
            }
            Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r.map_err(io::Error::other)??;
    }
    Ok(start.elapsed())
}

/// `n` round trips of 1 KiB on one held connection (after 100 not counted), each timed.
async fn round_trips(server: &'static str, n: usize) -> io::Result<Vec<Duration>> {
    let mut s = connect(server, b'E').await?;
    let msg = [0x33u8; 1024];
    let mut back = [0u8; 1024];
    let mut times = Vec::with_capacity(n);
    for i in 0..n + 100 {
        let t = Instant::now();
        s.write_all(&msg).await?;
        s.read_exact(&mut back).await?;
        if i >= 100 {
            times.push(t.elapsed());
        }
    }
    if back != msg {
        return Err(io::Error::other("the echo differs from what was sent"));
    }
    Ok(times)
}

/// `total` connections by `workers` workers in parallel, each connection a one-byte exchange;
/// the time they took.
async fn connections(server: &'static str, workers: usize, total: usize) -> io::Result<Duration> {
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        set.spawn(async move {
            for _ in 0..total / workers {
                let mut s = connect(server, b'P').await?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await?;
            }
            Ok::<_, io::Error>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r.map_err(io::Error::other)??;
    }
    Ok(start.elapsed())
}

/// `n` connections opened one after another and proven with a one-byte echo, returned open.
async fn hold(server: &'static str, n: usize) -> io::Result<Vec<TcpStream>> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = connect(server, b'E').await?;
        s.write_all(b"x").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        held.push(s);
    }
    Ok(held)
}

/// The element at `q` (0 to 1) of `v` once sorted.
fn quantile<T: Copy + PartialOrd>(v: &mut [T], q: f64) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).expect("comparable"));
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// A daemon's resident memory, KiB: in all, anonymous (heap, stacks) and mapped from files
/// (its code, mostly).
#[derive(Clone, Copy)]
struct Memory {
    rss: u64,
    anon: u64,
    file: u64,
}

impl Memory {
    /// What `self` holds beyond `before`, as a table cell.
    fn minus(self, before: Memory) -> String {
        let d = |a: u64, b: u64| a as i64 - b as i64;
        format!(
            "{:+} KiB (anonymous {:+}, files {:+})",
            d(self.rss, before.rss),
            d(self.anon, before.anon),
            d(self.file, before.file)
        )
    }
}

struct Bed {
    bed: TestBed,
    pids: [u32; 2],
}

impl Bed {
    fn start(quic: bool) -> Result<Bed> {
        let mut pods = default_pods();
        // The caller's `ZTUNNEL_…` settings reach the daemons (the bed passes on no others),
        // under the bed's own.
        let inherited: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with("ZTUNNEL_"))
            .collect();
        let mut env: Vec<(&str, &str)> = inherited
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        env.push(("RUST_LOG", "info"));
        if quic {
            pods.push(PodSpec {
                name: "server-quic",
                namespace: "demo",
                sa: "server",
                app: "server-quic",
                node: 1,
                ip: QUIC.server,
                ip6: None,
            });
            env.push(("ZTUNNEL_QUIC_LISTEN", "true"));
            env.push(("ZTUNNEL_QUIC_DESTINATIONS", QUIC.server));
        }
        let bed = TestBed::builder().pods(pods).daemon_env(&env).try_start()?;
        let pids = [bed.daemon_pid(0)?, bed.daemon_pid(1)?];
        for server in ["server", "legacy-2", "server-quic"] {
            if bed.pods.iter().any(|p| p.spec.name == server) {
                bed.pod(server).ns.serve(PORT, serve);
            }
        }
        Ok(Bed { bed, pids })
    }

    fn cpu(&self) -> Result<Duration> {
        Ok(cpu_time(self.pids[0])? + cpu_time(self.pids[1])?)
    }

    fn memory(&self) -> Result<[Memory; 2]> {
        let of = |pid: u32| -> Result<Memory> {
            Ok(Memory {
                rss: rss_kib(pid)?,
                anon: status_kib(pid, "RssAnon")?,
                file: status_kib(pid, "RssFile")?,
            })
        };
        Ok([of(self.pids[0])?, of(self.pids[1])?])
    }

    /// Runs `fut` in `path`'s client pod.
    fn client<T: Send + 'static>(
        &self,
        path: Path,
        fut: impl std::future::Future<Output = io::Result<T>> + Send + 'static,
    ) -> Result<T> {
        self.bed
            .pod(path.client)
            .ns
            .block_on(fut)
            .with_context(|| path.name)
    }

    /// One repetition of every measurement on `path`.
    fn sample(&self, path: Path) -> Result<Sample> {
        let s = path.server;
        let cpu = self.cpu()?;
        let one = self.client(path, bulk(s, 1))?;
        let eight = self.client(path, bulk(s, 8))?;
        let cpu_bulk = self.cpu()? - cpu;
        let mut rr = self.client(path, round_trips(s, ROUND_TRIPS))?;
        let cpu = self.cpu()?;
        let serial = self.client(path, connections(s, 1, SERIAL_CONNECTIONS))?;
        let parallel = self.client(path, connections(s, 8, PARALLEL_CONNECTIONS))?;
        let cpu_conns = self.cpu()? - cpu;
        let rate = |bytes: f64, d: Duration| bytes / d.as_secs_f64();
        Ok(Sample {
            bulk_1: rate(BULK_BYTES as f64, one),
            bulk_8: rate(BULK_BYTES as f64, eight),
            rr_median: quantile(&mut rr, 0.5),
            rr_p99: quantile(&mut rr, 0.99),
            conns_1: rate(SERIAL_CONNECTIONS as f64, serial),
            conns_8: rate(PARALLEL_CONNECTIONS as f64, parallel),
            cpu_bulk,
            cpu_conns,
        })
    }

    /// A few connections on every path (certificates fetched, tunnels pooled), not counted.
    fn warm_up(&self, paths: &[Path]) -> Result<()> {
        for &p in paths {
            self.client(p, connections(p.server, 1, 20))?;
        }
        Ok(())
    }

    /// [`Bed::warm_up`], then `reps` repetitions of every path in turn.
    fn measure(&self, paths: &[Path], reps: usize) -> Result<Vec<Vec<Sample>>> {
        self.warm_up(paths)?;
        let mut samples = vec![Vec::new(); paths.len()];
        for rep in 0..reps {
            for (i, &p) in paths.iter().enumerate() {
                eprintln!("repetition {} of {reps}: {}", rep + 1, p.name);
                samples[i].push(self.sample(p)?);
            }
        }
        Ok(samples)
    }
}

/// The medians of one path's repetitions.
fn median(samples: &[Sample]) -> Sample {
    let m = |f: &dyn Fn(&Sample) -> f64| {
        let mut v: Vec<f64> = samples.iter().map(f).collect();
        quantile(&mut v, 0.5)
    };
    let d = |f: &dyn Fn(&Sample) -> Duration| Duration::from_secs_f64(m(&|s| f(s).as_secs_f64()));
    Sample {
        bulk_1: m(&|s| s.bulk_1),
        bulk_8: m(&|s| s.bulk_8),
        rr_median: d(&|s| s.rr_median),
        rr_p99: d(&|s| s.rr_p99),
        conns_1: m(&|s| s.conns_1),
        conns_8: m(&|s| s.conns_8),
        cpu_bulk: d(&|s| s.cpu_bulk),
        cpu_conns: d(&|s| s.cpu_conns),
    }
}

/// How a row compares a tunnelled path with the baseline.
#[derive(Clone, Copy, PartialEq)]
enum Compare {
    /// More is better: the ratio to the baseline.
    Ratio,
    /// A time: what the tunnel adds to the baseline's.
    Added,
    /// The daemons' own cost: the baseline has none, so no comparison with it.
    Own,
}

/// A row of the table: its name (with its unit), what its figure is divided by,
/// how it compares, and the figure of a sample.
type Row = (&'static str, f64, Compare, fn(&Sample) -> f64);

/// Prints the table: a column per path, and each tunnelled path's comparison with the
/// baseline (and, with QUIC, QUIC's ratio to HTTP/2).
fn print_table(paths: &[Path], medians: &[Sample]) {
    let with_quic = paths.len() == 3;
    let mut head = String::from("| measure |");
    for p in paths {
        head += &format!(" {} |", p.name);
    }
    for p in &paths[1..] {
        head += &format!(" {} vs plain |", p.name);
    }
    if with_quic {
        head += " QUIC ÷ HTTP/2 |";
    }
    let columns = head.matches('|').count() - 1;
    println!(
        "{head}
|{}",
        "---|".repeat(columns)
    );
    let bulk_gib = (2 * BULK_BYTES) as f64 / f64::from(1 << 30);
    let thousands = (SERIAL_CONNECTIONS + PARALLEL_CONNECTIONS) as f64 / 1000.0;
    let rows: [Row; 8] = [
        ("bulk, 1 stream (GiB/s)", 1.0, Compare::Ratio, |s| s.bulk_1),
        ("bulk, 8 streams (GiB/s)", 1.0, Compare::Ratio, |s| s.bulk_8),
        ("1 KiB round trip, median (µs)", 1.0, Compare::Added, |s| {
            s.rr_median.as_secs_f64()
        }),
        ("1 KiB round trip, p99 (µs)", 1.0, Compare::Added, |s| {
            s.rr_p99.as_secs_f64()
        }),
        ("connections/s, one at a time", 1.0, Compare::Ratio, |s| {
            s.conns_1
        }),
        ("connections/s, 8 in parallel", 1.0, Compare::Ratio, |s| {
            s.conns_8
        }),
        ("daemons' CPU per GiB (s)", bulk_gib, Compare::Own, |s| {
            s.cpu_bulk.as_secs_f64()
        }),
        (
            "daemons' CPU per 1 000 connections (s)",
            thousands,
            Compare::Own,
            |s| s.cpu_conns.as_secs_f64(),
        ),
    ];
    for (name, per, compare, get) in rows {
        let value = |m: &Sample| get(m) / per;
        let show = |v: f64| {
            if name.contains("GiB/s") {
                format!("{:.2}", v / f64::from(1 << 30))
            } else if name.contains("µs") {
                format!("{:.1}", v * 1e6)
            } else if name.contains("(s)") {
                format!("{v:.3}")
            } else {
                format!("{v:.0}")
            }
        };
        let mut line = format!("| {name} |");
        for m in medians {
            line += &format!(" {} |", show(value(m)));
        }
        let base = value(&medians[0]);
        for m in &medians[1..] {
            line += &match compare {
                Compare::Ratio => format!(" {:.2} |", value(m) / base),
                Compare::Added => format!(" +{} |", show(value(m) - base)),
                Compare::Own => " |".to_owned(),
            };
        }
        if with_quic {
            // QUIC's share of HTTP/2's figure: for a rate more is better, for a time or a
            // cost less is.
            line += &format!(" {:.2} |", value(&medians[2]) / value(&medians[1]));
        }
        println!("{line}");
    }
}

/// The `h2` bed: the table, then memory idle, with `held` connections and after the load.
fn run_h2(reps: usize, held: usize) -> Result<()> {
    let bed = Bed::start(false)?;
    let paths = [PLAIN, HTTP2];
    bed.warm_up(&paths)?;
    std::thread::sleep(Duration::from_secs(2));
    let idle = bed.memory()?;
    let conns = bed.client(HTTP2, hold(HTTP2.server, held))?;
    std::thread::sleep(Duration::from_secs(2));
    let busy = bed.memory()?;
    drop(conns);
    let samples = bed.measure(&paths, reps)?;
    std::thread::sleep(AFTER_LOAD);
    let after = bed.memory()?;
    println!("\n## HTTP/2 tunnels, the daemons' defaults ({reps} repetitions, medians)\n");
    let medians: Vec<Sample> = samples.iter().map(|s| median(s)).collect();
    print_table(&paths, &medians);
    let per = |i: usize| (busy[i].rss.saturating_sub(idle[i].rss) * 1024) as f64 / held as f64;
    println!("\n| memory | n1 (source) | n2 (destination) |\n|---|---|---|");
    let cells = |m: [Memory; 2]| {
        let c = |m: Memory| format!("{} KiB (anonymous {}, files {})", m.rss, m.anon, m.file);
        format!("{} | {}", c(m[0]), c(m[1]))
    };
    println!("| RSS idle | {} |", cells(idle));
    println!(
        "| with {held} idle proxied connections, minus idle | {} | {} |",
        busy[0].minus(idle[0]),
        busy[1].minus(idle[1])
    );
    println!(
        "| per held connection | {:.0} B | {:.0} B |",
        per(0),
        per(1)
    );
    println!(
        "| {} s after the load, minus idle | {} | {} |",
        AFTER_LOAD.as_secs(),
        after[0].minus(idle[0]),
        after[1].minus(idle[1])
    );
    Ok(())
}

/// The `quic` bed: plain, HTTP/2 and QUIC side by side.
fn run_quic(reps: usize) -> Result<()> {
    let bed = Bed::start(true)?;
    let paths = [PLAIN, HTTP2, QUIC];
    let samples = bed.measure(&paths, reps)?;
    println!("\n## HTTP/2 and QUIC tunnels, QUIC listening on both daemons ({reps} repetitions, medians)\n");
    let medians: Vec<Sample> = samples.iter().map(|s| median(s)).collect();
    print_table(&paths, &medians);
    Ok(())
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; the rest are ours.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let num = |i: usize, default: usize| -> Result<usize> {
        args.get(i)
            .map(|a| a.parse().with_context(|| format!("{a:?} is not a count")))
            .transpose()
            .map(|v| v.unwrap_or(default))
    };
    let (reps, held) = (num(0, 3)?, num(1, 2_000)?);
    let which = args.get(2).map(String::as_str).unwrap_or("all");
    if !matches!(which, "h2" | "quic" | "all") {
        anyhow::bail!("expected h2, quic or all, not {which:?}");
    }
    ztunnel_e2e::load::raise_fd_limit(4 * held as u64 + 4096);
    if matches!(which, "h2" | "all") {
        run_h2(reps, held)?;
    }
    if matches!(which, "quic" | "all") {
        run_quic(reps)?;
    }
    Ok(())
}
