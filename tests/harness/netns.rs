//! Network namespaces as test hosts: created with `ip netns add`, wired with veth pairs into a
//! bridge that lives in its own "switch" namespace, each with a tokio runtime whose worker
//! threads have entered the namespace, so sockets the test opens there belong to that host.
//! Everything is torn down on drop. Nothing touches the machine's own namespace.

use std::fs::File;
use std::future::Future;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};

/// Runs a command and fails with its stderr when it fails.
pub fn sh(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program} (is it installed?)"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program` with `stdin` as its standard input; returns its standard output, or fails
/// with its stderr.
pub fn sh_stdin(program: &str, args: &[&str], stdin: &str) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {program} (is it installed?)"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fails loudly unless the tests can build hosts: root, `ip` and `nft`.
pub fn require_prerequisites() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the end-to-end tests need root (network namespaces, nftables); run them as root"
    );
    for tool in ["ip", "nft"] {
        assert!(
            Command::new(tool).arg("-V").output().is_ok(),
            "`{tool}` is missing: install iproute2 and nftables (see .ci/run)"
        );
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A unique short prefix for one topology's namespace and link names. The first call of a
/// test process also deletes the namespaces that earlier test processes left behind.
pub fn unique_prefix() -> String {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(sweep_leftovers);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("zt{}x{n}", std::process::id() % 100_000)
}

/// Deletes the test namespaces (`zt<pid>x<n>-…`) of other processes that no thread is in any
/// more: those of a test binary killed by a signal, whose `Drop`s never ran (its daemons die
/// with it, see [`crate::daemon::die_with_test`]). A live test's namespaces always hold its
/// runtime's worker threads, a daemon or a pause process.
fn sweep_leftovers() {
    use std::collections::HashSet;
    use std::os::unix::fs::MetadataExt;
    let mine = format!("zt{}x", std::process::id() % 100_000);
    let ours = |name: &str| {
        name.strip_prefix("zt")
            .and_then(|r| r.split_once('x'))
            .is_some_and(|(pid, _)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
    };
    let Ok(dir) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    let candidates: Vec<(String, (u64, u64))> = dir
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let m = e.metadata().ok()?;
            (ours(&name) && !name.starts_with(&mine)).then(|| (name, (m.dev(), m.ino())))
        })
        .collect();
    if candidates.is_empty() {
        return;
    }
    // Every namespace some thread of some process is in.
    let mut in_use = HashSet::new();
    for proc_entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let tasks = proc_entry.path().join("task");
        for task in std::fs::read_dir(tasks).into_iter().flatten().flatten() {
            if let Ok(m) = std::fs::metadata(task.path().join("ns/net")) {
                in_use.insert((m.dev(), m.ino()));
            }
        }
    }
    for (name, id) in candidates {
        if !in_use.contains(&id) {
            eprintln!("deleting the network namespace {name}, left behind by a dead test process");
            let _ = sh("ip", &["netns", "del", &name]);
        }
    }
}

/// One network namespace with a runtime inside it.
pub struct Netns {
    pub name: String,
    rt: tokio::runtime::Runtime,
}

impl Netns {
    /// Creates the namespace with `lo` up.
    pub fn new(name: &str) -> Result<Self> {
        crate::watchdog::arm();
        let _ = sh("ip", &["netns", "del", name]);
        sh("ip", &["netns", "add", name])?;
        sh("ip", &["-n", name, "link", "set", "lo", "up"])?;
        let path = format!("/var/run/netns/{name}");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .on_thread_start(move || {
                let f = File::open(&path).expect("open netns");
                setns(f, CloneFlags::CLONE_NEWNET).expect("setns");
            })
            .build()?;
        Ok(Netns {
            name: name.to_owned(),
            rt,
        })
    }

    /// Runs `args` with `ip -n <ns>`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        sh("ip", &a)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut a = vec!["netns", "exec", &self.name, program];
        a.extend_from_slice(args);
        sh("ip", &a)
    }

    /// Loads an nftables ruleset inside the namespace.
    pub fn nft(&self, ruleset: &str) -> Result<()> {
        sh_stdin(
            "ip",
            &["netns", "exec", &self.name, "nft", "-f", "-"],
            ruleset,
        )
        .map(|_| ())
    }

    /// Runs `fut` on a runtime thread inside the namespace and waits for it.
    pub fn block_on<F>(&self, fut: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let h = self.rt.spawn(fut);
        self.rt.block_on(h).expect("task panicked")
    }

    /// Starts `fut` inside the namespace without waiting.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.rt.spawn(fut)
    }

    /// Binds `port` on every IPv4 address of this host, then runs `serve` on the listener inside
    /// the namespace: a client started once this returns finds the port open, with no wait.
    pub fn serve<F, Fut>(&self, port: u16, serve: F) -> tokio::task::JoinHandle<Fut::Output>
    where
        F: FnOnce(tokio::net::TcpListener) -> Fut,
        Fut: Future + Send + 'static,
        Fut::Output: Send + 'static,
    {
        let l = self.block_on(crate::apps::listen(port));
        self.spawn(serve(l))
    }

    /// Like [`Netns::serve`], on `[::]`: both address families.
    pub fn serve_dual<F, Fut>(&self, port: u16, serve: F) -> tokio::task::JoinHandle<Fut::Output>
    where
        F: FnOnce(tokio::net::TcpListener) -> Fut,
        Fut: Future + Send + 'static,
        Fut::Output: Send + 'static,
    {
        let l = self.block_on(async move {
            tokio::net::TcpListener::bind(("::", port))
                .await
                .expect("bind test app on [::]")
        });
        self.spawn(serve(l))
    }

    /// Waits for a task started with [`Netns::spawn`].
    pub fn join<T: Send + 'static>(&self, h: tokio::task::JoinHandle<T>) -> T {
        self.rt.block_on(h).expect("task panicked")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh("ip", &["netns", "del", &self.name]);
    }
}

/// A layer-2 segment: a bridge in its own namespace, hosts attached by veth pairs.
pub struct Switch {
    pub ns: Netns,
    prefix: String,
    ports: AtomicU32,
}

impl Switch {
    pub fn new(prefix: &str) -> Result<Self> {
        let ns = Netns::new(&format!("{prefix}-sw"))?;
        ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        Ok(Switch {
            ns,
            prefix: prefix.to_owned(),
            ports: AtomicU32::new(0),
        })
    }

    /// Attaches `host` with `cidr` (e.g. `10.9.0.1/24`) on its `eth0`; returns the name of
    /// the switch port (in the switch's namespace), where a capture sees the host's traffic.
    pub fn attach(&self, host: &Netns, cidr: &str) -> Result<String> {
        let n = self.ports.fetch_add(1, Ordering::Relaxed);
        let outer = format!("{}p{n}", self.prefix);
        let tmp = format!("{}h{n}", self.prefix);
        sh(
            "ip",
            &[
                "link",
                "add",
                &outer,
                "netns",
                &self.ns.name,
                "type",
                "veth",
                "peer",
                "name",
                &tmp,
                "netns",
                &host.name,
            ],
        )?;
        self.ns
            .ip(&["link", "set", &outer, "master", "br0", "up"])?;
        host.ip(&["link", "set", &tmp, "name", "eth0"])?;
        host.ip(&["addr", "add", cidr, "dev", "eth0"])?;
        host.ip(&["link", "set", "eth0", "up"])?;
        Ok(outer)
    }
}
