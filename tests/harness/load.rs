//! Load and faults on the two-node test bed: many connections held at once, then a churn of
//! connections opened and closed continuously (request/response and bulk mixed, every byte
//! checked end to end) during which the destination node's daemon is rolled (a new process
//! beside the old, the old drained) and later killed and restarted.
//!
//! [`run`] drives it and returns a [`Report`]: connections held and checked, the churn's
//! outcomes by phase, and each daemon's resident memory and open descriptors before, while
//! holding, and after. `ztunnel-load` (a binary of this crate) runs the long variant and prints
//! the report; `tests/load.rs` runs a short one and asserts on it.
//!
//! A churn connection's outcome is one of: `completed` (every byte came back as sent),
//! `refused` (no byte came back: the connect failed or the connection was reset or closed
//! first), `broken` (it failed after bytes came back, or did not finish within
//! [`ATTEMPT_TIMEOUT`]) and `corrupted` (bytes came back that were not those sent). Each is
//! tagged with the phases it overlapped, so that a caller can tell what a kill may break from
//! what nothing may.
//!
//! Every connection goes from one client address to one application port. Each closed one
//! waits out TIME_WAIT (60 s) where it was closed first: in the client pod, and in the server
//! pod for the daemon's connection to the application. At hundreds of connections a second
//! beside thousands held, that is more than Linux's default ephemeral range (28 232 ports), so
//! [`run`] gives both pods a wider one ([`PORT_RANGE`]), as a pod under such a load would
//! (`net.ipv4.ip_local_port_range` is a namespaced sysctl that Kubernetes lets pods set).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::testbed::TestBed;

/// A churn connection that has not finished by then is `broken`.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The server pod's application.
const SERVER: (&str, u16) = ("10.20.2.10", 8080);

/// The ephemeral ports of the client and server pods during the load.
pub const PORT_RANGE: &str = "10000 65000";

/// What to run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Connections opened and held at once (each checked with an exchange when opened and
    /// again before it is closed).
    pub held: usize,
    /// How long the churn runs; the roll starts at a third of it, the kill at two thirds.
    pub churn: Duration,
    /// Churn connections in flight at once.
    pub workers: usize,
    /// Bytes each way of a bulk churn connection (every fourth one).
    pub bulk_bytes: usize,
    /// Runs the server pod's echo application as this program in its own process
    /// (`<program> echo-server <port>`, see [`serve_echo`]) rather than in this one: a process
    /// may not hold both ends of many thousand connections under its descriptor limit.
    pub server_program: Option<std::path::PathBuf>,
}

/// The phases of the churn. A connection is tagged with every phase it overlapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Phase {
    Steady = 0,
    /// From starting the new daemon until the old one has exited.
    Roll = 1,
    AfterRoll = 2,
    /// From the kill until the restarted daemon is ready.
    Killed = 3,
    Restarted = 4,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Steady,
            1 => Phase::Roll,
            2 => Phase::AfterRoll,
            3 => Phase::Killed,
            _ => Phase::Restarted,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Refused,
    Broken,
    Corrupted,
}

/// One churn connection.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub outcome: Outcome,
    pub bulk: bool,
    /// The phase when it started and when it ended.
    pub phases: (Phase, Phase),
    pub error: Option<String>,
}

/// A daemon's resident memory (KiB) and open descriptors.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub rss_kib: u64,
    pub fds: usize,
}

/// What [`run`] saw.
#[derive(Debug, Default)]
pub struct Report {
    pub held: usize,
    /// Per node: before the load, with the connections held, after the load.
    pub before: [Usage; 2],
    pub holding: [Usage; 2],
    pub after: [Usage; 2],
    pub attempts: Vec<Attempt>,
    /// Bytes sent and checked on their way back, in the churn.
    pub churn_bytes: u64,
}

impl Report {
    pub fn count(&self, outcome: Outcome) -> usize {
        self.attempts
            .iter()
            .filter(|a| a.outcome == outcome)
            .count()
    }

    /// The attempts that did not complete although they neither started nor ended while the
    /// destination's daemon was killed or down.
    pub fn unexpected_failures(&self) -> Vec<&Attempt> {
        self.attempts
            .iter()
            .filter(|a| a.outcome != Outcome::Completed)
            .filter(|a| !(a.phases.0..=a.phases.1).contains(&Phase::Killed))
            .collect()
    }

    /// RSS added per held connection on node `i`, in bytes.
    pub fn per_connection_bytes(&self, i: usize) -> f64 {
        (self.holding[i]
            .rss_kib
            .saturating_sub(self.before[i].rss_kib)
            * 1024) as f64
            / self.held.max(1) as f64
    }

    pub fn print(&self) {
        let b = |u: Usage| format!("{} KiB RSS, {} fds", u.rss_kib, u.fds);
        for (i, name) in ["n1 (source)", "n2 (destination)"].iter().enumerate() {
            println!(
                "{name}: before {}; holding {} connections {}; after {}",
                b(self.before[i]),
                self.held,
                b(self.holding[i]),
                b(self.after[i])
            );
            println!(
                "  RSS per held connection: {:.0} bytes",
                self.per_connection_bytes(i)
            );
        }
        println!(
            "churn: {} connections ({} bulk), {} completed, {} refused, {} broken, {} corrupted; {} MiB checked end to end",
            self.attempts.len(),
            self.attempts.iter().filter(|a| a.bulk).count(),
            self.count(Outcome::Completed),
            self.count(Outcome::Refused),
            self.count(Outcome::Broken),
            self.count(Outcome::Corrupted),
            self.churn_bytes >> 20
        );
        for phase in [
            Phase::Steady,
            Phase::Roll,
            Phase::AfterRoll,
            Phase::Killed,
            Phase::Restarted,
        ] {
            let started: Vec<_> = self
                .attempts
                .iter()
                .filter(|a| a.phases.0 == phase)
                .collect();
            let failed = started
                .iter()
                .filter(|a| a.outcome != Outcome::Completed)
                .count();
            println!(
                "  started in {phase:?}: {} connections, {failed} not completed",
                started.len()
            );
        }
        let unexpected = self.unexpected_failures();
        println!(
            "  failures outside the kill: {}{}",
            unexpected.len(),
            unexpected
                .first()
                .map(|a| format!(" (first: {a:?})"))
                .unwrap_or_default()
        );
    }
}

/// The daemons' warnings so far, to explain a failure.
pub fn warnings(bed: &TestBed) -> String {
    (0..2)
        .flat_map(|i| {
            bed.log(i)
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("\"level\":\"WARN\""))
                .map(|l| format!("n{}: {l}", i + 1))
                .collect::<Vec<_>>()
        })
        .take(200)
        .collect::<Vec<_>>()
        .join("\n")
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A daemon's usage now.
pub fn usage(pid: u32) -> Result<Usage> {
    let rss_kib = crate::procfs::rss_kib(pid)?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok(Usage { rss_kib, fds })
}

/// Raises this process's descriptor limit (its daemons inherit it): the held connections'
/// both ends are in this process.
pub fn raise_fd_limit(want: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if setrlimit(Resource::RLIMIT_NOFILE, want, want).is_err() {
        if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

fn daemon_usage(bed: &TestBed, i: usize) -> Result<Usage> {
    usage(bed.daemon_pid(i)?)
}

/// The usage of both daemons once it has settled: the figures read twice, a second apart,
/// until two readings agree on the descriptors (connections being closed finish closing).
fn settled(bed: &TestBed) -> Result<[Usage; 2]> {
    let mut last = [daemon_usage(bed, 0)?, daemon_usage(bed, 1)?];
    for _ in 0..20 {
        std::thread::sleep(Duration::from_secs(1));
        let now = [daemon_usage(bed, 0)?, daemon_usage(bed, 1)?];
        let same = now.iter().zip(&last).all(|(a, b)| a.fds == b.fds);
        last = now;
        if same {
            break;
        }
    }
    Ok(last)
}

/// An echo server: every connection's bytes are written back until it half-closes.
async fn echo_server(l: TcpListener) {
    loop {
        let s = match l.accept().await {
            Ok((s, _)) => s,
            Err(e) => panic!("the echo server cannot accept: {e}"),
        };
        tokio::spawn(async move {
            let (mut rd, mut wr) = s.into_split();
            let _ = tokio::io::copy(&mut rd, &mut wr).await;
            let _ = wr.shutdown().await;
        });
    }
}

/// The echo application on `port` in the current network namespace, until killed: what
/// [`Plan::server_program`] runs.
pub fn serve_echo(port: u16) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let l = TcpListener::bind(("0.0.0.0", port)).await?;
        echo_server(l).await;
        Ok(())
    })
}

/// One exchange on a held connection: a byte out, the same byte back.
async fn ping(s: &mut TcpStream, b: u8) -> std::io::Result<()> {
    s.write_all(&[b]).await?;
    let mut got = [0u8; 1];
    s.read_exact(&mut got).await?;
    if got[0] != b {
        return Err(std::io::Error::other("wrong byte back"));
    }
    Ok(())
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    crate::apps::Pattern::new(seed).fill(&mut v);
    v
}

/// One churn connection: `rounds` request/response exchanges of 1 KiB, or one bulk exchange
/// of `bulk` bytes each way; every byte compared.
async fn churn_once(seed: u64, bulk: Option<usize>) -> (Outcome, Option<String>) {
    let mut came_back = 0usize;
    let run = async {
        let s = TcpStream::connect(SERVER).await?;
        let (mut rd, mut wr) = s.into_split();
        let (want, sent) = match bulk {
            Some(len) => {
                let data = pattern(seed, len);
                let writer = async {
                    wr.write_all(&data).await?;
                    wr.shutdown().await
                };
                let mut got = Vec::with_capacity(len);
                let reader = async {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = rd.read(&mut buf).await?;
                        if n == 0 {
                            return Ok::<_, std::io::Error>(());
                        }
                        came_back += n;
                        got.extend_from_slice(&buf[..n]);
                    }
                };
                tokio::try_join!(writer, reader)?;
                (data, got)
            }
            None => {
                let mut want = Vec::new();
                let mut got = Vec::new();
                for round in 0..4u64 {
                    let msg = pattern(seed.wrapping_add(round), 1024);
                    wr.write_all(&msg).await?;
                    let mut back = vec![0u8; msg.len()];
                    let mut filled = 0;
                    while filled < back.len() {
                        let n = rd.read(&mut back[filled..]).await?;
                        if n == 0 {
                            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
                        }
                        filled += n;
                        came_back += n;
                    }
                    want.extend_from_slice(&msg);
                    got.extend_from_slice(&back);
                }
                wr.shutdown().await?;
                let mut rest = Vec::new();
                rd.read_to_end(&mut rest).await?;
                got.extend_from_slice(&rest);
                (want, got)
            }
        };
        Ok::<_, std::io::Error>((want, sent))
    };
    match tokio::time::timeout(ATTEMPT_TIMEOUT, run).await {
        Ok(Ok((want, got))) if want == got => (Outcome::Completed, None),
        Ok(Ok((want, got))) => {
            let why = if got.len() == want.len() {
                "different bytes came back".to_owned()
            } else if want.starts_with(&got) {
                // Cut short cleanly (EOF) but intact: the tunnel ended early.
                return (
                    if got.is_empty() {
                        Outcome::Refused
                    } else {
                        Outcome::Broken
                    },
                    Some(format!(
                        "closed after {} of {} bytes",
                        got.len(),
                        want.len()
                    )),
                );
            } else {
                format!("{} bytes came back for {}", got.len(), want.len())
            };
            (Outcome::Corrupted, Some(why))
        }
        Ok(Err(e)) if came_back == 0 => (Outcome::Refused, Some(e.to_string())),
        Ok(Err(e)) => (Outcome::Broken, Some(e.to_string())),
        Err(_) => (Outcome::Broken, Some("timed out".into())),
    }
}

/// Runs `plan` on a bed with the default pods (`client` on n1, `server` on n2).
pub fn run(bed: &mut TestBed, plan: &Plan) -> Result<Report> {
    let mut report = Report {
        held: plan.held,
        ..Default::default()
    };
    let range = format!("net.ipv4.ip_local_port_range={PORT_RANGE}");
    for pod in ["client", "server"] {
        bed.pod(pod)
            .ns
            .exec("sysctl", &["-w", &range])
            .with_context(|| format!("widen {pod}'s ephemeral ports"))?;
    }
    let server = bed.pod("server");
    let _app = match &plan.server_program {
        Some(program) => {
            let mut cmd = std::process::Command::new("ip");
            cmd.args(["netns", "exec", &server.ns.name])
                .arg(program)
                .args(["echo-server", &SERVER.1.to_string()]);
            let child = crate::daemon::die_with_test(&mut cmd)
                .spawn()
                .context("start the echo server")?;
            Some(KillOnDrop(child))
        }
        None => {
            let l = server
                .ns
                .block_on(async { crate::apps::listen(SERVER.1).await });
            server.ns.spawn(echo_server(l));
            None
        }
    };
    // Warm both paths (certificates, a pooled tunnel), then the baseline. The application
    // may still be starting.
    let client = &bed.pod("client").ns;
    client
        .block_on(async {
            let mut last = None;
            for _ in 0..100 {
                let first = async {
                    let mut s = TcpStream::connect(SERVER).await?;
                    ping(&mut s, 1).await
                };
                match first.await {
                    Ok(()) => return Ok(()),
                    Err(e) => last = Some(e),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(last.expect("tried"))
        })
        .context("a first connection")?;
    report.before = settled(bed)?;

    let held = plan.held;
    let conns = bed
        .pod("client")
        .ns
        .block_on(async move {
            let mut v = Vec::with_capacity(held);
            for i in 0..held {
                let opened = async {
                    let mut s = TcpStream::connect(SERVER).await?;
                    ping(&mut s, i as u8).await?;
                    Ok::<_, std::io::Error>(s)
                };
                match opened.await {
                    Ok(s) => v.push(s),
                    Err(e) => return Err(anyhow::anyhow!("held connection {i}: {e}")),
                }
            }
            Ok(v)
        })
        .with_context(|| warnings(bed))?;
    report.holding = settled(bed)?;
    bed.pod("client")
        .ns
        .block_on(async move {
            for (i, mut s) in conns.into_iter().enumerate() {
                ping(&mut s, !(i as u8)).await?;
            }
            Ok::<_, std::io::Error>(())
        })
        .context("the held connections, checked again before closing")?;

    report.attempts = churn(bed, plan)?;
    report.churn_bytes = report
        .attempts
        .iter()
        .filter(|a| a.outcome == Outcome::Completed)
        .map(|a| if a.bulk { plan.bulk_bytes as u64 } else { 4096 })
        .sum();
    report.after = settled(bed)?;
    Ok(report)
}

fn churn(bed: &mut TestBed, plan: &Plan) -> Result<Vec<Attempt>> {
    let phase = Arc::new(AtomicU8::new(Phase::Steady as u8));
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..plan.workers)
        .map(|w| {
            let (phase, stop, attempts) = (phase.clone(), stop.clone(), attempts.clone());
            let bulk_bytes = plan.bulk_bytes;
            bed.pod("client").ns.spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let bulk = i % 4 == 3;
                    let start = Phase::from_u8(phase.load(Ordering::SeqCst));
                    let seed = (w as u64) << 32 | i;
                    let (outcome, error) = churn_once(seed, bulk.then_some(bulk_bytes)).await;
                    let end = Phase::from_u8(phase.load(Ordering::SeqCst));
                    attempts.lock().unwrap().push(Attempt {
                        outcome,
                        bulk,
                        phases: (start, end),
                        error,
                    });
                    i += 1;
                }
            })
        })
        .collect();
    let third = plan.churn / 3;
    let began = Instant::now();
    std::thread::sleep(third);
    phase.store(Phase::Roll as u8, Ordering::SeqCst);
    let newer = bed.spawn_daemon(1, "-next")?;
    let mut old = bed.nodes[1].daemon.replace(newer).context("n2's daemon")?;
    old.stop(Duration::from_secs(10));
    phase.store(Phase::AfterRoll as u8, Ordering::SeqCst);
    std::thread::sleep((2 * third).saturating_sub(began.elapsed()));
    phase.store(Phase::Killed as u8, Ordering::SeqCst);
    bed.kill_daemon(1);
    bed.start_daemon(1)?;
    phase.store(Phase::Restarted as u8, Ordering::SeqCst);
    std::thread::sleep(plan.churn.saturating_sub(began.elapsed()));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        bed.pod("client").ns.join(w);
    }
    let v = std::mem::take(&mut *attempts.lock().unwrap());
    Ok(v)
}
