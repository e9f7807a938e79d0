//! Runs the built `ztunnel-cni` binary as a container runtime would (environment variables,
//! the network configuration on stdin) against a fake daemon serving the enrollment protocol on
//! a Unix socket, and checks stdout carries only the result or error object.

use std::fmt;
use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;
use ztunnel_proto::enroll::{
    read_frame, write_frame, Attachment, ErrorKind, PodAdd, PodDel, PodRef, Reply, Request,
};

/// A previous result with a deliberately unsorted key order and odd whitespace.
const PREV: &str = r#"{"cniVersion":"1.0.0", "ips":[{"address":"10.1.0.5/24","gateway":"10.1.0.1","interface":0},{"address":"fd00::5/64"}],"interfaces":[{"name":"eth0","sandbox":"/var/run/netns/p1","mac":"0a:58:0a:01:00:05"}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{"nameservers":["10.96.0.10"]},"zeta":1,"alpha":{"z":1,"a":2}}"#;

const ARGS: &str =
    "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=c1;K8S_POD_UID=uid-1";

/// A daemon answering the scripted replies in order, one per connection, recording requests.
struct FakeDaemon {
    socket: PathBuf,
    seen: Arc<Mutex<Vec<Request>>>,
}

impl FakeDaemon {
    fn serve(dir: &Path, replies: Vec<Reply>) -> FakeDaemon {
        let socket = dir.join("cni.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        std::thread::spawn(move || {
            for reply in replies {
                let (mut conn, _) = listener.accept().unwrap();
                let req: Request = read_frame(&mut conn).unwrap();
                log.lock().unwrap().push(req);
                write_frame(&mut conn, &reply).unwrap();
            }
        });
        FakeDaemon { socket, seen }
    }

    fn requests(&self) -> Vec<Request> {
        self.seen.lock().unwrap().clone()
    }
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The one JSON document on stdout (and nothing else there).
    fn json(&self) -> Value {
        assert!(
            self.stdout.ends_with('\n') && self.stdout.matches('\n').count() == 1,
            "stdout is not one line: {:?}",
            self.stdout
        );
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{e}: {:?}", self.stdout))
    }

    /// Asserts the run failed with the error object of `code`.
    fn assert_error(&self, code: u64) -> Value {
        assert!(!self.ok, "expected failure, stderr: {}", self.stderr);
        let v = self.json();
        assert_eq!(v["code"], code, "{v}\nstderr: {}", self.stderr);
        assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(v["cniVersion"].is_string(), "{v}");
        assert!(v.get("details").is_some(), "{v}");
        v
    }

    fn assert_silent_success(&self) {
        assert!(self.ok, "stdout: {} stderr: {}", self.stdout, self.stderr);
        assert_eq!(self.stdout, "", "stderr: {}", self.stderr);
    }
}

fn plugin(vars: &[(&str, &str)], stdin: Option<&str>) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ztunnel-cni"));
    cmd.env_clear()
        .envs(vars.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    // A plugin that is still running after 30 s is killed: the test fails instead of hanging.
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (exited, wait) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if wait.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    });
    let out = child.wait_with_output().unwrap();
    let _ = exited.send(());
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn env<'a>(command: &'a str, netns: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        ("CNI_ARGS", ARGS),
    ]
}

fn conf(socket: &Path, ns_file: &Path, extra: &str) -> String {
    format!(
        r#"{{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"ztunnel-cni","socket":{},"timeout":"2s","enrolledNamespacesFile":{},"unknownField":[1,2],"prevResult":{PREV}{extra}}}"#,
        serde_json::to_string(socket.to_str().unwrap()).unwrap(),
        serde_json::to_string(ns_file.to_str().unwrap()).unwrap(),
    )
}

/// A configuration whose daemon is unreachable (no socket) and whose snapshot is `ns_file`.
fn unreachable_conf(dir: &Path) -> String {
    conf(&dir.join("absent.sock"), &dir.join("enrolled.json"), "")
}

fn pod_add() -> PodAdd {
    PodAdd {
        attachment: Attachment {
            container_id: "c1".into(),
            ifname: "eth0".into(),
        },
        netns: "/var/run/netns/p1".into(),
        pod: PodRef {
            namespace: "demo".into(),
            name: "web-0".into(),
            uid: "uid-1".into(),
        },
        ips: vec!["10.1.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
    }
}

/// The object's keys in document order, at the top level.
struct Keys(Vec<String>);

impl<'de> Deserialize<'de> for Keys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Keys;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Keys, A::Error> {
                let mut keys = Vec::new();
                while let Some((k, IgnoredAny)) = map.next_entry::<String, IgnoredAny>()? {
                    keys.push(k);
                }
                Ok(Keys(keys))
            }
        }
        d.deserialize_map(V)
    }
}

/// Asserts `run` printed `PREV` unchanged: same value, same key order, same bytes.
fn assert_passed_through(run: &Run) {
    assert!(run.ok, "stdout: {} stderr: {}", run.stdout, run.stderr);
    let got = run.json();
    assert_eq!(got, serde_json::from_str::<Value>(PREV).unwrap());
    let order = |s: &str| serde_json::from_str::<Keys>(s).unwrap().0;
    assert_eq!(order(&run.stdout), order(PREV));
    assert_eq!(
        order(&run.stdout),
        [
            "cniVersion",
            "ips",
            "interfaces",
            "routes",
            "dns",
            "zeta",
            "alpha"
        ]
    );
    assert_eq!(run.stdout.trim_end(), PREV);
}

#[test]
fn version() {
    // (stdin, the version answered in: the input's when supported)
    let cases = [
        (None, "1.1.0"),
        (Some(""), "1.1.0"),
        (Some(r#"{"cniVersion":"1.0.0"}"#), "1.0.0"),
        (Some(r#"{"cniVersion":"0.4.0"}"#), "0.4.0"),
        (Some(r#"{"cniVersion":"9.9.9"}"#), "1.1.0"),
        (Some(r#"{"cniVersion":1}"#), "1.1.0"),
    ];
    for (stdin, answered) in cases {
        let run = plugin(&[("CNI_COMMAND", "VERSION")], stdin);
        assert!(run.ok, "{}", run.stderr);
        let v = run.json();
        assert_eq!(v["cniVersion"], answered, "{stdin:?}");
        assert_eq!(
            v["supportedVersions"],
            serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
    }
}

#[test]
fn add_enrolled_passes_prev_result_through() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = FakeDaemon::serve(dir.path(), vec![Reply::Enrolled]);
    let run = plugin(
        &env("ADD", "/var/run/netns/p1"),
        Some(&conf(&daemon.socket, &dir.path().join("ns.json"), "")),
    );
    assert_passed_through(&run);
    assert_eq!(daemon.requests(), vec![Request::Add(pod_add())]);
}

#[test]
fn add_not_enrolled_passes_prev_result_through() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = FakeDaemon::serve(
        dir.path(),
        vec![Reply::NotEnrolled {
            reason: "namespace demo is not enrolled".into(),
        }],
    );
    let run = plugin(
        &env("ADD", "/var/run/netns/p1"),
        Some(&conf(&daemon.socket, &dir.path().join("ns.json"), "")),
    );
    assert_passed_through(&run);
    assert!(run.stderr.contains("not enrolled"), "{}", run.stderr);
    assert_eq!(daemon.requests(), vec![Request::Add(pod_add())]);
}

#[test]
fn add_try_again_is_11() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = FakeDaemon::serve(
        dir.path(),
        vec![Reply::Error {
            kind: ErrorKind::TryAgain,
            message: "netns not ready".into(),
        }],
    );
    let run = plugin(
        &env("ADD", "/var/run/netns/p1"),
        Some(&conf(&daemon.socket, &dir.path().join("ns.json"), "")),
    );
    let v = run.assert_error(11);
    assert_eq!(v["cniVersion"], "1.0.0");
    assert_eq!(v["details"], "netns not ready");
    assert_eq!(daemon.requests(), vec![Request::Add(pod_add())]);
}

#[test]
fn add_with_a_silent_daemon_times_out_with_11() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cni.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    // The daemon accepts and never answers until the plugin has exited: only the plugin's
    // own deadline can end the call.
    let (done, plugin_exited) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let _ = plugin_exited.recv();
        drop(conn);
    });
    let input = conf(&socket, &dir.path().join("ns.json"), "").replace("\"2s\"", "\"300ms\"");
    let run = plugin(&env("ADD", "/var/run/netns/p1"), Some(&input));
    let _ = done.send(());
    let v = run.assert_error(11);
    assert!(
        v["details"]
            .as_str()
            .is_some_and(|d| d.contains("timed out")),
        "{v}"
    );
}

#[test]
fn malformed_stdin_is_6() {
    plugin(
        &env("ADD", "/var/run/netns/p1"),
        Some(r#"{"cniVersion":"1.0.0","#),
    )
    .assert_error(6);
    plugin(&env("ADD", "/var/run/netns/p1"), None).assert_error(6);
}

#[test]
fn missing_environment_is_4() {
    let dir = tempfile::tempdir().unwrap();
    let input = unreachable_conf(dir.path());
    let mut vars = env("ADD", "");
    plugin(&vars, Some(&input)).assert_error(4);
    vars.retain(|(k, _)| *k != "CNI_NETNS");
    plugin(&vars, Some(&input)).assert_error(4);
    let no_id: Vec<_> = env("DEL", "")
        .into_iter()
        .filter(|(k, _)| *k != "CNI_CONTAINERID")
        .collect();
    plugin(&no_id, Some(&input)).assert_error(4);
    plugin(&[], Some(&input)).assert_error(4);
}

#[test]
fn unknown_cni_version_is_1() {
    let dir = tempfile::tempdir().unwrap();
    let input = unreachable_conf(dir.path()).replace(
        r#""cniVersion":"1.0.0","name""#,
        r#""cniVersion":"9.9.9","name""#,
    );
    assert!(input.contains("9.9.9"));
    let v = plugin(&env("ADD", "/var/run/netns/p1"), Some(&input)).assert_error(1);
    assert_eq!(v["cniVersion"], "1.1.0");
}

#[test]
fn invalid_config_is_7() {
    let dir = tempfile::tempdir().unwrap();
    let bad_timeout = unreachable_conf(dir.path()).replace("\"2s\"", "\"soon\"");
    plugin(&env("ADD", "/var/run/netns/p1"), Some(&bad_timeout)).assert_error(7);
    let no_prev = r#"{"cniVersion":"1.0.0","name":"k8s","type":"ztunnel-cni"}"#;
    plugin(&env("ADD", "/var/run/netns/p1"), Some(no_prev)).assert_error(7);
}

/// With the daemon unreachable, ADD and CHECK go by its snapshot: a pod passes (ADD hands
/// `prevResult` on, CHECK succeeds) only when the snapshot is usable and its namespace
/// (`demo`) is not listed, and the daemon's rules do not let a pod's own labels enroll it.
/// Else both fail with 11.
#[test]
fn unreachable_daemon_goes_by_its_snapshot() {
    // (snapshot, whether the pod passes)
    let cases = [
        (Some(r#"["kube-system","demo"]"#), false),
        (Some(r#"["mesh-a","mesh-b"]"#), true),
        (
            Some(r#"{"namespaces":["mesh-a"],"podLabelsEnroll":false}"#),
            true,
        ),
        (
            Some(r#"{"namespaces":["demo"],"podLabelsEnroll":false}"#),
            false,
        ),
        (
            Some(r#"{"namespaces":["mesh-a"],"podLabelsEnroll":true}"#),
            false,
        ),
        (
            Some(r#"{"namespaces":[],"podLabelsEnroll":false,"newRule":1}"#),
            false,
        ),
        (Some("[\"mesh-a\""), false),
        (None, false),
    ];
    for (snapshot, passes) in cases {
        let dir = tempfile::tempdir().unwrap();
        if let Some(s) = snapshot {
            std::fs::write(dir.path().join("enrolled.json"), s).unwrap();
        }
        let input = unreachable_conf(dir.path());
        let add = plugin(&env("ADD", "/var/run/netns/p1"), Some(&input));
        let check = plugin(&env("CHECK", "/var/run/netns/p1"), Some(&input));
        if passes {
            assert_passed_through(&add);
            assert!(add.stderr.contains("unreachable"), "{}", add.stderr);
            check.assert_silent_success();
        } else {
            for run in [add, check] {
                let v = run.assert_error(11);
                assert_eq!(v["msg"], "ztunnel daemon is unreachable", "{snapshot:?}");
            }
        }
    }
}

#[test]
fn del_with_unreachable_daemon_succeeds_twice() {
    let dir = tempfile::tempdir().unwrap();
    let input = unreachable_conf(dir.path());
    for _ in 0..2 {
        let run = plugin(&env("DEL", ""), Some(&input));
        run.assert_silent_success();
        assert!(run.stderr.contains("DEL"), "{}", run.stderr);
    }
}

#[test]
fn del_sends_the_attachment_and_pod() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = FakeDaemon::serve(
        dir.path(),
        vec![
            Reply::Ok,
            Reply::Error {
                kind: ErrorKind::Invalid,
                message: "unknown pod".into(),
            },
        ],
    );
    let input = conf(&daemon.socket, &dir.path().join("ns.json"), "");
    plugin(&env("DEL", "/var/run/netns/p1"), Some(&input)).assert_silent_success();
    plugin(&env("DEL", ""), Some(&input)).assert_silent_success();
    let del = |netns: &str| {
        Request::Del(PodDel {
            attachment: pod_add().attachment,
            netns: netns.into(),
            pod: Some(pod_add().pod),
        })
    };
    assert_eq!(daemon.requests(), vec![del("/var/run/netns/p1"), del("")]);
}

#[test]
fn check_failed_is_101() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = FakeDaemon::serve(
        dir.path(),
        vec![
            Reply::Ok,
            Reply::Error {
                kind: ErrorKind::CheckFailed,
                message: "capture rules missing".into(),
            },
        ],
    );
    let input = conf(&daemon.socket, &dir.path().join("ns.json"), "");
    plugin(&env("CHECK", "/var/run/netns/p1"), Some(&input)).assert_silent_success();
    let v = plugin(&env("CHECK", "/var/run/netns/p1"), Some(&input)).assert_error(101);
    assert_eq!(v["details"], "capture rules missing");
    assert_eq!(
        daemon.requests(),
        vec![Request::Check(pod_add()), Request::Check(pod_add())]
    );
}

/// STATUS succeeds without a daemon to ask.
#[test]
fn status_succeeds_without_a_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let input = format!(
        r#"{{"cniVersion":"1.1.0","name":"k8s","type":"ztunnel-cni","socket":{}}}"#,
        serde_json::to_string(dir.path().join("absent.sock").to_str().unwrap()).unwrap()
    );
    let vars = [("CNI_COMMAND", "STATUS"), ("CNI_PATH", "/opt/cni/bin")];
    plugin(&vars, Some(&input)).assert_silent_success();
}

#[test]
fn gc_sends_the_valid_attachments() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = FakeDaemon::serve(dir.path(), vec![Reply::Ok]);
    let input = format!(
        r#"{{"cniVersion":"1.1.0","name":"k8s","type":"ztunnel-cni","socket":{},
            "cni.dev/valid-attachments":[{{"containerID":"c1","ifname":"eth0"}},
                                         {{"containerID":"c2","ifname":"net1"}}]}}"#,
        serde_json::to_string(daemon.socket.to_str().unwrap()).unwrap()
    );
    plugin(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
        Some(&input),
    )
    .assert_silent_success();
    let at = |c: &str, i: &str| Attachment {
        container_id: c.into(),
        ifname: i.into(),
    };
    assert_eq!(
        daemon.requests(),
        vec![Request::Gc {
            valid: vec![at("c1", "eth0"), at("c2", "net1")]
        }]
    );

    // Unreachable: the runtime must retry later.
    let absent = input.replace("cni.sock", "absent.sock");
    plugin(&[("CNI_COMMAND", "GC")], Some(&absent)).assert_error(11);
}

/// A real network namespace (`ip netns add`), deleted on drop. Needs root and `ip`.
struct Namespace(String);

impl Namespace {
    fn new(tag: &str) -> Namespace {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test enters a real network namespace: run it as root (scripts/test.sh)"
        );
        let name = format!("ztcni-{tag}-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("`ip` (apt-get install iproute2)")
            .success();
        assert!(ok, "ip netns add {name}");
        Namespace(name)
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }

    fn migrate_req(&self) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "sysctl", "-n"])
            .arg("net.ipv4.tcp_migrate_req")
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn add_of_an_enrolled_pod_lets_its_listeners_hand_over_queued_connections() {
    // The daemon's container cannot write the pod's /proc/sys; the plugin, run by the
    // runtime on the host, sets tcp_migrate_req in an enrolled pod's netns, and only there.
    for (reply, want) in [
        (Reply::Enrolled, "1"),
        (
            Reply::NotEnrolled {
                reason: "namespace not labelled".into(),
            },
            "0",
        ),
    ] {
        let ns = Namespace::new(if want == "1" { "in" } else { "out" });
        assert_eq!(ns.migrate_req(), "0", "a new namespace's default");
        let dir = tempfile::tempdir().unwrap();
        let daemon = FakeDaemon::serve(dir.path(), vec![reply]);
        let path = ns.path();
        let run = plugin(
            &env("ADD", &path),
            Some(&conf(&daemon.socket, &dir.path().join("ns.json"), "")),
        );
        assert_passed_through(&run);
        assert!(!run.stderr.contains("cannot set"), "{}", run.stderr);
        assert_eq!(ns.migrate_req(), want, "{}", run.stderr);
    }
}
