//! The plugin's behaviour, pure apart from the daemon, its snapshot file and the pod's netns:
//! [`run`] takes the environment, stdin, a [`Daemon`] and a [`PodNetns`] and returns an
//! [`Outcome`] (what to print on stdout, or
//! the error object, and the lines to log on stderr). It never touches stdout or stderr itself.
//!
//! STATUS succeeds without asking the daemon: ADD serves every pod at all times, failing (11)
//! only those that must wait for the daemon ([`snapshot`]), while a failed STATUS would take
//! the node's whole network NotReady (containerd and CRI-O report it to the kubelet), so that
//! no pod starts there, the excluded ones (the cluster's own, the CA) included.

use serde::Serialize;
use ztunnel_proto::enroll::{Attachment, ErrorKind, PodAdd, PodDel, PodRef, Reply, Request};

use crate::conf::{self, Command, Env, NetConf, Vars, LATEST_VERSION, SUPPORTED_VERSIONS};
use crate::daemon::{CallError, Daemon, Endpoint};
use crate::error::CniError;
use crate::netns::PodNetns;
use crate::snapshot::{self, Fallback};

/// The result of one invocation.
#[derive(Debug)]
pub struct Outcome {
    /// `Ok(Some(json))`: print it on stdout, exit 0. `Ok(None)`: print nothing, exit 0.
    /// `Err(e)`: print `e`'s error object on stdout, exit non-zero.
    pub result: Result<Option<String>, CniError>,
    /// The `cniVersion` of the error object.
    pub cni_version: String,
    /// Lines for stderr.
    pub logs: Vec<String>,
}

/// Runs one CNI command.
pub fn run(vars: &Vars, stdin: &[u8], daemon: &dyn Daemon, netns: &dyn PodNetns) -> Outcome {
    let text = String::from_utf8_lossy(stdin);
    let mut out = Outcome {
        result: Ok(None),
        cni_version: conf::error_version(&text).to_string(),
        logs: Vec::new(),
    };
    out.result = dispatch(
        vars,
        stdin,
        daemon,
        netns,
        &mut out.logs,
        &mut out.cni_version,
    );
    out
}

fn dispatch(
    vars: &Vars,
    stdin: &[u8],
    daemon: &dyn Daemon,
    netns: &dyn PodNetns,
    logs: &mut Vec<String>,
    cni_version: &mut String,
) -> Result<Option<String>, CniError> {
    let command = conf::parse_command(vars)?;
    let env = conf::parse_env(command, vars)?;
    let text = std::str::from_utf8(stdin)
        .map_err(|e| CniError::Decode(format!("stdin is not UTF-8: {e}")))?;
    if command == Command::Version {
        return version(text);
    }
    let conf = conf::parse_conf(command, text)?;
    cni_version.clone_from(&conf.cni_version);
    let endpoint = Endpoint {
        socket: conf.socket.clone(),
        timeout: conf.timeout,
    };
    let call = |req: &Request| daemon.call(&endpoint, req);
    match command {
        Command::Add => add(&env, &conf, &call, netns, logs),
        Command::Check => check(&env, &conf, &call, logs),
        Command::Del => del(&env, &conf, &call, logs),
        Command::Status => Ok(None),
        Command::Gc => gc(&conf, &call, logs),
        Command::Version => version(text),
    }
}

type Call<'a> = dyn Fn(&Request) -> Result<Reply, CallError> + 'a;

/// VERSION: the versions supported, in the input's `cniVersion` when it is one of them (else
/// the latest).
fn version(stdin: &str) -> Result<Option<String>, CniError> {
    let mut cni_version = LATEST_VERSION;
    if !stdin.trim().is_empty() {
        let fields = conf::decode_object(stdin)?;
        let asked = fields
            .get("cniVersion")
            .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok());
        if let Some(v) = SUPPORTED_VERSIONS
            .iter()
            .find(|v| Some(**v) == asked.as_deref())
        {
            cni_version = v;
        }
    }
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct VersionResult {
        cni_version: &'static str,
        supported_versions: &'static [&'static str],
    }
    let json = serde_json::to_string(&VersionResult {
        cni_version,
        supported_versions: SUPPORTED_VERSIONS,
    })
    .map_err(|e| CniError::TryAgain(e.to_string()))?;
    Ok(Some(json))
}

fn attachment(env: &Env) -> Attachment {
    Attachment {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    }
}

/// ADD and CHECK carry the same payload. A missing `K8S_POD_*` key is sent empty; the daemon
/// decides what that means.
fn pod_add(env: &Env, conf: &NetConf) -> PodAdd {
    let args = &env.args;
    PodAdd {
        attachment: attachment(env),
        netns: env.netns.clone(),
        pod: PodRef {
            namespace: args.pod_namespace.clone().unwrap_or_default(),
            name: args.pod_name.clone().unwrap_or_default(),
            uid: args.pod_uid.clone().unwrap_or_default(),
        },
        ips: conf
            .prev_result
            .as_ref()
            .map(|p| p.ips.clone())
            .unwrap_or_default(),
    }
}

/// Names the attachment in logs.
fn who(env: &Env, conf: &NetConf) -> String {
    let pod = match (&env.args.pod_namespace, &env.args.pod_name) {
        (Some(ns), Some(name)) => format!("pod {ns}/{name} ({})", env.container_id),
        _ => format!("container {}", env.container_id),
    };
    match &conf.name {
        Some(net) => format!("{pod} on network {net}"),
        None => pod,
    }
}

fn from_kind(kind: ErrorKind, message: String) -> CniError {
    match kind {
        ErrorKind::TryAgain => CniError::TryAgain(message),
        ErrorKind::NotAvailable => CniError::NotAvailable(message),
        ErrorKind::Invalid => CniError::InvalidConfig(message),
        ErrorKind::Unsupported => CniError::ProtocolUnsupported(message),
        ErrorKind::CheckFailed => CniError::CheckFailed(message),
    }
}

/// A call that produced no reply, for the commands that fail on it (ADD, CHECK, GC).
impl From<CallError> for CniError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Unreachable(m) => CniError::Unreachable(m),
            CallError::Failed(m) => CniError::TryAgain(format!("ztunnel daemon: {m}")),
            e @ CallError::Version(_) => CniError::ProtocolUnsupported(e.to_string()),
        }
    }
}

fn unexpected(cmd: &str, reply: &Reply) -> String {
    format!("unexpected reply to {cmd} from the ztunnel daemon: {reply:?}")
}

fn add(
    env: &Env,
    conf: &NetConf,
    call: &Call<'_>,
    netns: &dyn PodNetns,
    logs: &mut Vec<String>,
) -> Result<Option<String>, CniError> {
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::InvalidConfig("prevResult is required for ADD".into()))?;
    let pass = || crate::result::in_version(prev.raw.get(), &conf.cni_version).map(Some);
    let who = who(env, conf);
    if excluded(env, conf) {
        logs.push(format!(
            "ADD {who}: namespace excluded (excludeNamespaces); not enrolled, the daemon not asked"
        ));
        return pass();
    }
    match call(&Request::Add(pod_add(env, conf))) {
        Ok(Reply::Enrolled) => {
            logs.push(format!("ADD {who}: enrolled"));
            // Best effort: without it, a rolling restart may reset connections still queued.
            if let Err(e) = netns.enable_listener_migration(std::path::Path::new(&env.netns)) {
                logs.push(format!(
                    "ADD {who}: cannot set tcp_migrate_req in the pod's netns ({e}); a daemon restart may reset connections still queued"
                ));
            }
            pass()
        }
        Ok(Reply::NotEnrolled { reason }) => {
            logs.push(format!("ADD {who}: not enrolled: {reason}"));
            pass()
        }
        Ok(Reply::Error { kind, message }) => Err(from_kind(kind, message)),
        Ok(other @ Reply::Ok) => Err(CniError::TryAgain(unexpected("ADD", &other))),
        Err(CallError::Unreachable(why)) => {
            unreachable(env, conf, "ADD", &who, why, logs)?;
            pass()
        }
        Err(e) => Err(e.into()),
    }
}

/// With the daemon unreachable, whether a pod may go on unenrolled: `Ok` when the daemon's
/// snapshot says its namespace enrolls no pod (logged), else the error to refuse with.
fn unreachable(
    env: &Env,
    conf: &NetConf,
    cmd: &str,
    who: &str,
    why: String,
    logs: &mut Vec<String>,
) -> Result<(), CniError> {
    let snap = snapshot::read(&conf.enrolled_namespaces_file);
    match snapshot::decide(snap, env.args.pod_namespace.as_deref()) {
        Fallback::PassThrough(reason) => {
            logs.push(format!(
                "{cmd} {who}: daemon unreachable ({why}); not enrolled: {reason}"
            ));
            Ok(())
        }
        Fallback::FailClosed(reason) => Err(CniError::Unreachable(format!("{why}; {reason}"))),
    }
}

/// Whether the pod's namespace is one the plugin lets through without asking the daemon.
fn excluded(env: &Env, conf: &NetConf) -> bool {
    env.args
        .pod_namespace
        .as_ref()
        .is_some_and(|ns| conf.exclude_namespaces.contains(ns))
}

fn check(
    env: &Env,
    conf: &NetConf,
    call: &Call<'_>,
    logs: &mut Vec<String>,
) -> Result<Option<String>, CniError> {
    if excluded(env, conf) {
        return Ok(None);
    }
    let reply = match call(&Request::Check(pod_add(env, conf))) {
        Ok(reply) => reply,
        Err(CallError::Unreachable(why)) => {
            unreachable(env, conf, "CHECK", &who(env, conf), why, logs)?;
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    match reply {
        Reply::Ok | Reply::Enrolled => Ok(None),
        Reply::NotEnrolled { reason } => {
            logs.push(format!("CHECK {}: not enrolled: {reason}", who(env, conf)));
            Ok(None)
        }
        Reply::Error { kind, message } => Err(from_kind(kind, message)),
    }
}

/// Best effort and idempotent: every failure is logged, none is returned.
fn del(
    env: &Env,
    conf: &NetConf,
    call: &Call<'_>,
    logs: &mut Vec<String>,
) -> Result<Option<String>, CniError> {
    let args = &env.args;
    let pod = match (&args.pod_namespace, &args.pod_name) {
        (Some(ns), Some(name)) => Some(PodRef {
            namespace: ns.clone(),
            name: name.clone(),
            uid: args.pod_uid.clone().unwrap_or_default(),
        }),
        _ => None,
    };
    let req = Request::Del(PodDel {
        attachment: attachment(env),
        netns: env.netns.clone(),
        pod,
    });
    let who = who(env, conf);
    match call(&req) {
        Ok(Reply::Ok) => {}
        Ok(Reply::Error { kind, message }) => {
            logs.push(format!(
                "DEL {who}: ignored daemon error ({kind:?}): {message}"
            ));
        }
        Ok(other) => logs.push(format!("DEL {who}: ignored {}", unexpected("DEL", &other))),
        Err(e) => logs.push(format!("DEL {who}: ignored: ztunnel daemon: {e}")),
    }
    Ok(None)
}

fn gc(conf: &NetConf, call: &Call<'_>, logs: &mut Vec<String>) -> Result<Option<String>, CniError> {
    let valid = conf.valid_attachments.clone().unwrap_or_default();
    let n = valid.len();
    match call(&Request::Gc { valid })? {
        Reply::Ok => {
            logs.push(format!("GC: done, {n} valid attachments"));
            Ok(None)
        }
        Reply::Error { kind, message } => Err(from_kind(kind, message)),
        other => Err(CniError::TryAgain(unexpected("GC", &other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Answers every call with `reply` and records the requests.
    struct Fake {
        reply: Result<Reply, CallError>,
        seen: RefCell<Vec<(Endpoint, Request)>>,
        /// The netns paths [`PodNetns::enable_listener_migration`] was asked for.
        migrations: RefCell<Vec<std::path::PathBuf>>,
    }

    impl Fake {
        fn new(reply: Result<Reply, CallError>) -> Fake {
            Fake {
                reply,
                seen: RefCell::new(Vec::new()),
                migrations: RefCell::new(Vec::new()),
            }
        }
        fn answering(reply: Reply) -> Fake {
            Fake::new(Ok(reply))
        }
        fn unreachable() -> Fake {
            Fake::new(Err(CallError::Unreachable("connect: no such file".into())))
        }
        fn requests(&self) -> Vec<Request> {
            self.seen.borrow().iter().map(|(_, r)| r.clone()).collect()
        }
    }

    impl PodNetns for Fake {
        fn enable_listener_migration(&self, path: &std::path::Path) -> std::io::Result<()> {
            self.migrations.borrow_mut().push(path.to_owned());
            Err(std::io::Error::other("not in tests"))
        }
    }

    impl Daemon for Fake {
        fn call(&self, endpoint: &Endpoint, request: &Request) -> Result<Reply, CallError> {
            self.seen
                .borrow_mut()
                .push((endpoint.clone(), request.clone()));
            self.reply.clone()
        }
    }

    const PREV: &str = r#"{"cniVersion":"1.1.0","ips":[{"address":"10.1.0.5/24"}],"dns":{}}"#;

    fn env(cmd: &str) -> Vars {
        [
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/p1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web-0;K8S_POD_UID=u1",
            ),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn stdin(extra: &str) -> String {
        format!(
            r#"{{"cniVersion":"1.1.0","name":"k8s","type":"ztunnel-cni","socket":"/t/cni.sock","timeout":"2s","prevResult":{PREV}{extra}}}"#
        )
    }

    fn code(o: &Outcome) -> Option<u32> {
        o.result.as_ref().err().map(CniError::code)
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
                uid: "u1".into(),
            },
            ips: vec!["10.1.0.5".parse().unwrap()],
        }
    }

    #[test]
    fn version_needs_no_config() {
        let fake = Fake::unreachable();
        for (input, answered) in [("", "1.1.0"), (r#"{"cniVersion":"1.0.0"}"#, "1.0.0")] {
            let o = run(&env("VERSION"), input.as_bytes(), &fake, &fake);
            let v: serde_json::Value =
                serde_json::from_str(o.result.unwrap().as_deref().unwrap()).unwrap();
            assert_eq!(v["cniVersion"], answered);
            assert_eq!(v["supportedVersions"].as_array().unwrap().len(), 5);
        }
        assert!(fake.requests().is_empty());
    }

    #[test]
    fn add_passes_prev_result_through_and_sends_the_pod() {
        for reply in [
            Reply::Enrolled,
            Reply::NotEnrolled {
                reason: "namespace not labelled".into(),
            },
        ] {
            let enrolled = reply == Reply::Enrolled;
            let fake = Fake::answering(reply);
            let o = run(&env("ADD"), stdin("").as_bytes(), &fake, &fake);
            assert_eq!(o.result.unwrap().as_deref(), Some(PREV), "{:?}", o.logs);
            // Only an enrolled pod's netns is touched, and its failure is logged, not fatal.
            let want: Vec<std::path::PathBuf> = if enrolled {
                vec!["/var/run/netns/p1".into()]
            } else {
                vec![]
            };
            assert_eq!(*fake.migrations.borrow(), want);
            assert_eq!(
                o.logs
                    .iter()
                    .any(|l| l.contains("cannot set tcp_migrate_req")),
                enrolled,
                "{:?}",
                o.logs
            );
            let seen = fake.seen.borrow();
            assert_eq!(seen.len(), 1);
            assert_eq!(seen[0].1, Request::Add(pod_add()));
            assert_eq!(seen[0].0.socket, std::path::PathBuf::from("/t/cni.sock"));
            assert_eq!(seen[0].0.timeout, std::time::Duration::from_secs(2));
        }
    }

    #[test]
    fn daemon_errors_map_to_codes() {
        let cases = [
            (ErrorKind::TryAgain, 11),
            (ErrorKind::NotAvailable, 50),
            (ErrorKind::Invalid, 7),
            (ErrorKind::Unsupported, 100),
            (ErrorKind::CheckFailed, 101),
        ];
        for (kind, want) in cases {
            for cmd in ["ADD", "CHECK", "GC"] {
                let fake = Fake::answering(Reply::Error {
                    kind,
                    message: "m".into(),
                });
                let input = stdin(r#","cni.dev/valid-attachments":[]"#);
                let o = run(&env(cmd), input.as_bytes(), &fake, &fake);
                assert_eq!(code(&o), Some(want), "{cmd} {kind:?}");
                assert_eq!(o.cni_version, "1.1.0");
            }
        }
    }

    #[test]
    fn call_failures_map_to_codes() {
        let cases: [(CallError, u32); 2] = [
            (CallError::Failed("read: timed out".into()), 11),
            (CallError::Version(2), 100),
        ];
        for (err, want) in cases {
            for cmd in ["ADD", "CHECK", "GC"] {
                let fake = Fake::new(Err(err.clone()));
                let input = stdin(r#","cni.dev/valid-attachments":[]"#);
                let o = run(&env(cmd), input.as_bytes(), &fake, &fake);
                assert_eq!(code(&o), Some(want), "{cmd} {err:?}");
            }
        }
    }

    /// A pod of an excluded namespace is let through without asking the daemon (ADD passes
    /// `prevResult` on, CHECK succeeds), even with the daemon unreachable and no snapshot; by
    /// default `kube-system` and `ztunnel-system`; a configured list replaces the default.
    #[test]
    fn excluded_namespaces_never_wait_on_the_daemon() {
        let in_ns = |cmd: &str, ns: &str| {
            let mut v = env(cmd);
            v.insert(
                "CNI_ARGS".into(),
                format!("K8S_POD_NAMESPACE={ns};K8S_POD_NAME=p;K8S_POD_UID=u"),
            );
            v
        };
        let cases: &[(&str, &str, bool)] = &[
            ("", "kube-system", true),
            ("", "ztunnel-system", true),
            ("", "demo", false),
            (r#","excludeNamespaces":null"#, "kube-system", true),
            (r#","excludeNamespaces":["infra"]"#, "infra", true),
            (r#","excludeNamespaces":["infra"]"#, "kube-system", false),
            (r#","excludeNamespaces":[]"#, "kube-system", false),
        ];
        for &(extra, ns, excluded) in cases {
            let input = stdin(extra);
            let daemon = Fake::unreachable();
            let o = run(&in_ns("ADD", ns), input.as_bytes(), &daemon, &daemon);
            if excluded {
                assert_eq!(o.result.unwrap().as_deref(), Some(PREV), "{extra} {ns}");
                assert!(
                    daemon.requests().is_empty(),
                    "{extra} {ns}: the daemon was asked"
                );
                assert!(
                    o.logs.iter().any(|l| l.contains("excluded")),
                    "{:?}",
                    o.logs
                );
                let o = run(&in_ns("CHECK", ns), input.as_bytes(), &daemon, &daemon);
                assert!(
                    o.result.is_ok() && daemon.requests().is_empty(),
                    "{extra} {ns}"
                );
            } else {
                assert_eq!(
                    code(&o),
                    Some(11),
                    "{extra} {ns}: asked, unreachable, no snapshot"
                );
                assert_eq!(daemon.requests().len(), 1, "{extra} {ns}");
            }
        }
        for bad in [
            r#","excludeNamespaces":"kube-system""#,
            r#","excludeNamespaces":[""]"#,
        ] {
            let daemon = Fake::unreachable();
            let o = run(
                &in_ns("ADD", "demo"),
                stdin(bad).as_bytes(),
                &daemon,
                &daemon,
            );
            assert_eq!(code(&o), Some(7), "{bad}");
        }
    }

    #[test]
    fn unreachable_add_consults_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ns.json");
        let input = stdin(&format!(
            r#","enrolledNamespacesFile":"{}""#,
            file.display()
        ));
        let add = |vars: &Vars| {
            run(
                vars,
                input.as_bytes(),
                &Fake::unreachable(),
                &Fake::unreachable(),
            )
        };

        // No snapshot: fail closed.
        let o = add(&env("ADD"));
        assert_eq!(code(&o), Some(11));
        assert_eq!(
            o.result.unwrap_err().to_string(),
            "ztunnel daemon is unreachable"
        );

        std::fs::write(&file, r#"["demo"]"#).unwrap();
        assert_eq!(code(&add(&env("ADD"))), Some(11));

        std::fs::write(&file, r#"["other"]"#).unwrap();
        let o = add(&env("ADD"));
        assert_eq!(o.result.unwrap().as_deref(), Some(PREV));
        assert!(
            o.logs.iter().any(|l| l.contains("not enrolled")),
            "{:?}",
            o.logs
        );

        // Unknown namespace: fail closed even with a snapshot.
        let mut anon = env("ADD");
        anon.insert("CNI_ARGS".into(), "IgnoreUnknown=1".into());
        assert_eq!(code(&add(&anon)), Some(11));

        std::fs::write(&file, "not json").unwrap();
        assert_eq!(code(&add(&env("ADD"))), Some(11));
    }

    #[test]
    fn del_is_best_effort() {
        let failures = [
            Fake::unreachable(),
            Fake::new(Err(CallError::Failed("eof".into()))),
            Fake::answering(Reply::Error {
                kind: ErrorKind::TryAgain,
                message: "busy".into(),
            }),
            Fake::answering(Reply::Ok),
        ];
        for fake in failures {
            let mut vars = env("DEL");
            vars.insert("CNI_NETNS".into(), String::new());
            let o = run(&vars, stdin("").as_bytes(), &fake, &fake);
            assert_eq!(o.result, Ok(None));
            assert_eq!(
                fake.requests(),
                vec![Request::Del(PodDel {
                    attachment: pod_add().attachment,
                    netns: String::new(),
                    pod: Some(pod_add().pod),
                })]
            );
        }
        let fake = Fake::answering(Reply::Ok);
        let mut vars = env("DEL");
        vars.remove("CNI_ARGS");
        run(&vars, stdin("").as_bytes(), &fake, &fake)
            .result
            .unwrap();
        assert!(matches!(&fake.requests()[0], Request::Del(d) if d.pod.is_none()));
    }

    #[test]
    fn check_accepts_and_refuses() {
        for reply in [
            Reply::Ok,
            Reply::Enrolled,
            Reply::NotEnrolled { reason: "r".into() },
        ] {
            let fake = Fake::answering(reply);
            let o = run(&env("CHECK"), stdin("").as_bytes(), &fake, &fake);
            assert_eq!(o.result, Ok(None));
            assert_eq!(fake.requests(), vec![Request::Check(pod_add())]);
        }
        let o = run(
            &env("CHECK"),
            stdin("").as_bytes(),
            &Fake::unreachable(),
            &Fake::unreachable(),
        );
        assert_eq!(code(&o), Some(11));
    }

    /// STATUS succeeds whatever the daemon would say, and does not ask it.
    #[test]
    fn status_succeeds_without_asking_the_daemon() {
        let input = r#"{"cniVersion":"1.1.0","name":"k8s"}"#;
        let daemons = [
            Fake::answering(Reply::Ok),
            Fake::unreachable(),
            Fake::new(Err(CallError::Failed("eof".into()))),
            Fake::answering(Reply::Error {
                kind: ErrorKind::NotAvailable,
                message: "starting".into(),
            }),
        ];
        for fake in daemons {
            let o = run(&env("STATUS"), input.as_bytes(), &fake, &fake);
            assert_eq!(o.result, Ok(None));
            assert_eq!(fake.requests(), vec![]);
        }
    }

    #[test]
    fn gc_sends_the_valid_list() {
        let input = r#"{"cniVersion":"1.1.0","cni.dev/valid-attachments":[
            {"containerID":"c1","ifname":"eth0"},{"containerID":"c2","ifname":"net1"}]}"#;
        let fake = Fake::answering(Reply::Ok);
        let o = run(
            &Vars::from([("CNI_COMMAND".into(), "GC".into())]),
            input.as_bytes(),
            &fake,
            &fake,
        );
        assert_eq!(o.result, Ok(None));
        let at = |c: &str, i: &str| Attachment {
            container_id: c.into(),
            ifname: i.into(),
        };
        assert_eq!(
            fake.requests(),
            vec![Request::Gc {
                valid: vec![at("c1", "eth0"), at("c2", "net1")]
            }]
        );
        let o = run(
            &env("GC"),
            input.as_bytes(),
            &Fake::unreachable(),
            &Fake::unreachable(),
        );
        assert_eq!(code(&o), Some(11));
        // `null` (a Go runtime's list when no pod is left on the network): none is valid.
        let fake = Fake::answering(Reply::Ok);
        let none = r#"{"cniVersion":"1.1.0","cni.dev/valid-attachments":null}"#;
        let o = run(&env("GC"), none.as_bytes(), &fake, &fake);
        assert_eq!(o.result, Ok(None));
        assert_eq!(fake.requests(), vec![Request::Gc { valid: vec![] }]);
    }

    #[test]
    fn input_errors_never_reach_the_daemon() {
        let mut no_netns = env("ADD");
        no_netns.remove("CNI_NETNS");
        let cases: Vec<(Vars, String, u32, &str)> = vec![
            (Vars::new(), stdin(""), 4, "1.1.0"),
            (no_netns, stdin(""), 4, "1.1.0"),
            (env("ADD"), "{oops".into(), 6, "1.1.0"),
            (env("ADD"), r#"{"cniVersion":"9.9.9"}"#.into(), 1, "1.1.0"),
            (env("ADD"), r#"{"cniVersion":"0.4.0"}"#.into(), 7, "0.4.0"),
            (env("ADD"), stdin(r#","timeout":"x""#), 7, "1.1.0"),
        ];
        for (vars, input, want, version) in cases {
            let fake = Fake::answering(Reply::Enrolled);
            let o = run(&vars, input.as_bytes(), &fake, &fake);
            assert_eq!(code(&o), Some(want), "{input}");
            assert_eq!(o.cni_version, version, "{input}");
            assert!(fake.requests().is_empty());
        }
        let o = run(
            &env("ADD"),
            b"\xff\xfe",
            &Fake::unreachable(),
            &Fake::unreachable(),
        );
        assert_eq!(code(&o), Some(6));
    }
}
