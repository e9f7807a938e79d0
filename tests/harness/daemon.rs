//! Real `ztunnel` processes for the tests: the binary is built once (with the cargo that runs
//! the tests), started inside a host's namespace with `ip netns exec`, its log kept in a file
//! that is printed when a test fails, and its admin, metrics and readiness endpoints read
//! over HTTP from inside that namespace.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::netns::Netns;

/// The target directory of the running test binary (`target/<profile>`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // Tests run from target/<profile>/deps/, binaries from target/<profile>/.
    let mut dir = exe.parent().expect("target dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("target dir");
    }
    dir.to_path_buf()
}

/// Path of a workspace binary, built on first use so a test never runs a stale one.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let dir = target_dir();
        // target/debug is the dev profile; any other directory is named after its profile
        // (release, dist).
        let profile = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| n != "debug");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--workspace", "--bins"]);
        // Cargo gives a test process variables of its own; passing them on would make build
        // scripts that watch the environment rebuild (and the next plain build rebuild
        // again). Build with the environment a shell would have: the user's settings
        // (`CARGO_INCREMENTAL`, `CARGO_PROFILE_*`, ...) kept, so that this build is the one
        // `cargo test` made, not a second one.
        cmd.env_clear();
        for (k, v) in std::env::vars_os() {
            let k_str = k.to_string_lossy();
            let cargo_set = k_str.starts_with("CARGO_PKG_")
                || k_str.starts_with("CARGO_BIN_EXE_")
                || matches!(
                    &*k_str,
                    "CARGO"
                        | "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_BIN_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                        | "CARGO_RUSTC_CURRENT_DIR"
                        | "OUT_DIR"
                        | "RUST_TEST_THREADS"
                );
            if !cargo_set {
                cmd.env(k, v);
            }
        }
        if let Some(profile) = profile {
            cmd.args(["--profile", &profile]);
        }
        let status = cmd
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the binaries failed");
    });
    let p = target_dir().join(name);
    assert!(p.exists(), "{} was not built", p.display());
    p
}

/// Makes the child die with the test: the kernel sends it `SIGKILL` when the thread that
/// spawned it exits, so a test binary killed by a signal (whose `Drop`s never run) leaves no
/// daemon behind. Processes are spawned from the test's own thread, which outlives them.
pub fn die_with_test(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only makes one system call.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        })
    }
}

/// A running daemon process inside a namespace.
pub struct Process {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Process {
    /// Starts `ztunnel <args>` in `ns`, logging to `<dir>/<name>.log`. Its settings are
    /// `args` and `env` only: the test process's own `ZTUNNEL_…` variables are not passed on.
    pub fn start(
        ns: &Netns,
        name: &str,
        dir: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name])
            .arg(binary("ztunnel"))
            .args(args)
            .env("RUST_LOG", "info,ztunnel=debug")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ZTUNNEL_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = die_with_test(&mut cmd).spawn().context("spawn ztunnel")?;
        Ok(Process {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The process id (the daemon itself: `ip netns exec` execs it).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGTERM only: the daemon starts draining and this returns at once ([`Process::stop`]
    /// waits for it to exit).
    pub fn terminate(&self) {
        if let Some(pid) = self.pid() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
    }

    /// SIGKILL: the process dies at once, without draining or cleaning up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then SIGKILL if the process has not exited within `grace`.
    pub fn stop(&mut self, grace: Duration) {
        self.terminate();
        let Some(mut child) = self.child.take() else {
            return;
        };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(2));
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("---- last lines of {} ----", self.name);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// `ztunnel removed --daemonset <daemonset> --kubeconfig <kubeconfig>` run in `ns`, as the CNI
/// installer runs it when stopped: its exit status (0 removed, 1 present, 2 cannot tell) and
/// what it said.
pub fn ztunnel_removed(ns: &Netns, daemonset: &str, kubeconfig: &Path) -> (Option<i32>, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(binary("ztunnel"))
        .args(["removed", "--daemonset", daemonset, "--timeout", "5s"])
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .output()
        .expect("ztunnel removed");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A minimal HTTP/1.1 request from inside `ns`; returns (status, body).
pub fn http(ns: &Netns, method: &str, addr: &str, path: &str) -> Result<(u16, String)> {
    let req = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: 0\r\n\r\n");
    let addr = addr.to_owned();
    ns.block_on(async move {
        let mut s = tokio::net::TcpStream::connect(&addr).await?;
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("no status line")?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        // Chunked bodies: good enough to search in; tests look for lines and JSON keys.
        Ok::<_, anyhow::Error>((status, body))
    })
}

/// Waits until `GET addr path` answers 200.
pub fn wait_ready(
    ns: &Netns,
    proc_: &mut Process,
    addr: &str,
    path: &str,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if !proc_.alive() {
            bail!(
                "{} exited before it was ready:\n{}",
                proc_.name,
                proc_.log()
            );
        }
        if let Ok((200, _)) = http(ns, "GET", addr, path) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} not ready after {timeout:?}:\n{}",
                proc_.name,
                proc_.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The access-log lines of a daemon's log: one JSON object per closed (or refused)
/// connection. Fails the test if an access line is not valid JSON.
pub fn access_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter(|l| l.contains("\"target\":\"access\""))
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("access line is not JSON ({e}): {l}"))
        })
        .collect()
}

/// Reads one sample from an OpenMetrics text exposition (the daemon's `/metrics`): the value
/// of the first series whose name is `name` and whose labels contain every `k="v"` in
/// `labels`. Panics when that series is absent (a renamed metric or label, a reason the daemon
/// does not have: the daemon exports every series of a closed label set from the start, at
/// zero), and when `text` is not a whole exposition (no `# EOF` line: an empty scrape from a
/// daemon that is down, an error page, a cut-off body). So neither a rename nor a dead daemon
/// reads as "nothing counted".
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(text, name, labels)
        .unwrap_or_else(|| panic!("{name}{labels:?}: no such series in the exposition:\n{text}"))
}

/// Asserts that `name{labels}` in the exposition `text` is `want`, showing `text` when it is not.
pub fn expect_metric(text: &str, name: &str, labels: &[(&str, &str)], want: f64) {
    assert_eq!(
        metric(text, name, labels),
        want,
        "{name}{labels:?} in:\n{text}"
    );
}

/// Like [`metric`], 0 when the series is absent: for families whose labels are open (Istio's
/// per-workload series, per-identity certificates), where a series appears when first counted.
pub fn metric_or_zero(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(text, name, labels).unwrap_or(0.0)
}

/// Like [`metric`], `None` when `text` is not a whole exposition or the series is absent (for
/// polling a daemon that may still be starting).
pub fn try_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    whole(text).then(|| find(text, name, labels)).flatten()
}

fn whole(text: &str) -> bool {
    text.lines().any(|l| l.trim_end() == "# EOF")
}

/// The series' value; panics when `text` is not a whole exposition.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    if !whole(text) {
        let start: String = text.chars().take(300).collect();
        panic!("reading {name}: not a whole metrics exposition (no `# EOF`): {start:?}")
    }
    find(text, name, labels)
}

fn find(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (series, ""),
            };
            (n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse().ok())?
        })
        .next()
}

#[cfg(test)]
mod tests {
    use super::{metric, metric_or_zero, try_metric};

    const SCRAPE: &str = "# HELP ztunnel_refusals Refusals.\n# TYPE ztunnel_refusals counter\nztunnel_refusals_total{reason=\"policy_denied\"} 3\n# TYPE ztunnel_enrolled_pods gauge\nztunnel_enrolled_pods 2\n# TYPE ztunnel_latency histogram\nztunnel_latency_bucket{le=\"1\"} 5\nztunnel_latency_count 7\n# EOF\n";

    #[test]
    fn a_series_reads_its_value_and_an_absent_series_or_a_cut_scrape_is_none() {
        let reasons = |r| [("reason", r)];
        assert_eq!(
            try_metric(SCRAPE, "ztunnel_refusals_total", &reasons("policy_denied")),
            Some(3.0)
        );
        assert_eq!(
            try_metric(SCRAPE, "ztunnel_refusals_total", &reasons("other")),
            None,
            "no such series"
        );
        assert_eq!(
            metric_or_zero(SCRAPE, "ztunnel_refusals_total", &reasons("other")),
            0.0
        );
        assert_eq!(try_metric(SCRAPE, "ztunnel_enrolled_pods", &[]), Some(2.0));
        assert_eq!(metric(SCRAPE, "ztunnel_latency_count", &[]), 7.0);
        assert_eq!(try_metric("", "ztunnel_enrolled_pods", &[]), None, "empty");
        let cut = &SCRAPE[..SCRAPE.find("# EOF").unwrap()];
        assert_eq!(
            try_metric(cut, "ztunnel_enrolled_pods", &[]),
            None,
            "cut off"
        );
    }

    #[test]
    #[should_panic(expected = "not a whole metrics exposition")]
    fn a_dead_daemons_empty_scrape_never_reads_as_zero() {
        metric_or_zero("", "ztunnel_refusals_total", &[]);
    }

    #[test]
    #[should_panic(expected = "no such series")]
    fn a_renamed_series_never_reads_as_zero() {
        metric(
            SCRAPE,
            "ztunnel_refusals_total",
            &[("reason", "policy_denid")],
        );
    }
}
