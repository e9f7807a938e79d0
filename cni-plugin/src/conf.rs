//! Parsing of the plugin's inputs, pure: the `CNI_*` environment ([`parse_command`],
//! [`parse_env`]) and the network configuration on stdin ([`parse_conf`]). Every rejection is
//! a [`CniError`] with the specification's code: 4 for the environment, 6 for stdin that is not
//! a JSON object, 1 for a `cniVersion` this plugin does not speak (or that does not allow the
//! command), 7 for any other invalid field. `prevResult` is kept as the exact bytes the runtime
//! sent, so ADD can hand it on unchanged.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::value::RawValue;
use ztunnel_proto::enroll::{Attachment, DEFAULT_SOCKET};

use crate::error::CniError;

/// The CNI specification versions this plugin speaks.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The newest of [`SUPPORTED_VERSIONS`], answered by VERSION and used in error objects when
/// the configuration's version is unknown.
pub const LATEST_VERSION: &str = "1.1.0";
/// The daemon call's deadline when the configuration has no `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Where the daemon keeps the list of enrolled namespaces when the configuration does not say.
pub const DEFAULT_ENROLLED_NAMESPACES_FILE: &str = "/var/run/ztunnel/enrolled-namespaces.json";

/// Namespaces whose pods the plugin lets through without asking the daemon when the
/// configuration does not say (`excludeNamespaces`): the cluster's own pods and the mesh's CA
/// start even when the daemon cannot.
pub const DEFAULT_EXCLUDE_NAMESPACES: &[&str] = &["kube-system", "ztunnel-system"];

/// The environment variables the plugin reads, by name.
pub type Vars = BTreeMap<String, String>;

/// `CNI_COMMAND`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    fn name(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }

    /// The oldest specification version that defines the command.
    fn since(self) -> (u32, u32, u32) {
        match self {
            Command::Check => (0, 4, 0),
            Command::Status | Command::Gc => (1, 1, 0),
            Command::Add | Command::Del | Command::Version => (0, 0, 0),
        }
    }

    /// Whether the command acts on one attachment (needs `CNI_CONTAINERID`, `CNI_IFNAME`).
    fn per_attachment(self) -> bool {
        matches!(self, Command::Add | Command::Del | Command::Check)
    }
}

/// The pod, as `CNI_ARGS` names it; each key is optional.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
}

/// The validated environment of an ADD, DEL or CHECK. For STATUS and GC the strings are
/// whatever the runtime passed (usually empty) and unused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Env {
    pub container_id: String,
    /// Empty is allowed on DEL only.
    pub netns: String,
    pub ifname: String,
    pub args: CniArgs,
}

/// `prevResult`: the exact bytes, and the pod's addresses from `ips[].address`.
#[derive(Clone, Debug)]
pub struct PrevResult {
    pub raw: Box<RawValue>,
    pub ips: Vec<IpAddr>,
}

/// The network configuration, with the plugin's defaults filled in.
#[derive(Clone, Debug)]
pub struct NetConf {
    pub cni_version: String,
    pub name: Option<String>,
    /// The daemon's Unix socket (`socket`).
    pub socket: PathBuf,
    /// The deadline of one daemon call (`timeout`, e.g. "5s", "500ms").
    pub timeout: Duration,
    /// The daemon's snapshot of enrolled namespaces (`enrolledNamespacesFile`).
    pub enrolled_namespaces_file: PathBuf,
    /// Namespaces whose pods are never enrolled and never wait on the daemon
    /// (`excludeNamespaces`, a list of names; [`DEFAULT_EXCLUDE_NAMESPACES`] when absent or
    /// `null`, none when empty).
    pub exclude_namespaces: Vec<String>,
    /// Present, and required, on ADD and CHECK.
    pub prev_result: Option<PrevResult>,
    /// `cni.dev/valid-attachments`: present, and required, on GC.
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// Reads `CNI_COMMAND` (code 4 when missing or unknown).
pub fn parse_command(vars: &Vars) -> Result<Command, CniError> {
    let cmd = non_empty(vars, "CNI_COMMAND")
        .ok_or_else(|| CniError::InvalidEnv("CNI_COMMAND is not set".into()))?;
    Ok(match cmd {
        "ADD" => Command::Add,
        "DEL" => Command::Del,
        "CHECK" => Command::Check,
        "VERSION" => Command::Version,
        "STATUS" => Command::Status,
        "GC" => Command::Gc,
        other => {
            return Err(CniError::InvalidEnv(format!(
                "unknown CNI_COMMAND {other:?}"
            )))
        }
    })
}

/// Reads and checks the variables `command` needs (code 4).
pub fn parse_env(command: Command, vars: &Vars) -> Result<Env, CniError> {
    let get = |k: &str| vars.get(k).cloned().unwrap_or_default();
    if !command.per_attachment() {
        return Ok(Env {
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: CniArgs::default(),
        });
    }
    let mut required = vec!["CNI_CONTAINERID", "CNI_IFNAME"];
    if command != Command::Del {
        required.insert(1, "CNI_NETNS");
    }
    for name in required {
        if non_empty(vars, name).is_none() {
            return Err(CniError::InvalidEnv(format!(
                "{name} is required for {}",
                command.name()
            )));
        }
    }
    Ok(Env {
        container_id: get("CNI_CONTAINERID"),
        netns: get("CNI_NETNS"),
        ifname: get("CNI_IFNAME"),
        args: parse_cni_args(
            vars.get("CNI_ARGS").map(String::as_str).unwrap_or(""),
            command != Command::Del,
        )?,
    })
}

/// Parses `CNI_ARGS`: `;`-separated `KEY=VALUE` pairs. Unknown keys are ignored, empty
/// segments skipped; a segment without `=` is malformed (code 4) when `strict`, else skipped
/// (DEL completes as far as it can).
pub fn parse_cni_args(s: &str, strict: bool) -> Result<CniArgs, CniError> {
    let mut args = CniArgs::default();
    for pair in s.split(';').filter(|p| !p.trim().is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            if !strict {
                continue;
            }
            return Err(CniError::InvalidEnv(format!(
                "CNI_ARGS: {pair:?} is not a KEY=VALUE pair"
            )));
        };
        let slot = match k.trim() {
            "K8S_POD_NAMESPACE" => &mut args.pod_namespace,
            "K8S_POD_NAME" => &mut args.pod_name,
            "K8S_POD_UID" => &mut args.pod_uid,
            _ => continue,
        };
        *slot = Some(v.to_string()).filter(|v| !v.is_empty());
    }
    Ok(args)
}

/// Parses the network configuration for `command` (VERSION does not need one).
pub fn parse_conf(command: Command, stdin: &str) -> Result<NetConf, CniError> {
    let fields = decode_object(stdin)?;

    let cni_version: String = match fields.get("cniVersion") {
        Some(raw) if raw.get() != "null" => field(raw, "cniVersion")?,
        _ => {
            return Err(CniError::IncompatibleVersion(format!(
                "cniVersion is missing (which means 0.1.0); this plugin supports {}",
                SUPPORTED_VERSIONS.join(", ")
            )))
        }
    };
    check_version(command, &cni_version)?;

    let opt = |key: &str| -> Result<Option<String>, CniError> {
        match fields.get(key) {
            Some(raw) if raw.get() != "null" => field(raw, key).map(Some),
            _ => Ok(None),
        }
    };
    let name = opt("name")?;
    let socket = path_field(opt("socket")?, "socket", DEFAULT_SOCKET)?;
    let enrolled_namespaces_file = path_field(
        opt("enrolledNamespacesFile")?,
        "enrolledNamespacesFile",
        DEFAULT_ENROLLED_NAMESPACES_FILE,
    )?;
    let timeout = match opt("timeout")? {
        None => DEFAULT_TIMEOUT,
        Some(t) => parse_timeout(&t)?,
    };
    let exclude_namespaces: Vec<String> = match fields.get("excludeNamespaces") {
        Some(raw) if raw.get() != "null" => field(raw, "excludeNamespaces")?,
        _ => DEFAULT_EXCLUDE_NAMESPACES
            .iter()
            .map(|n| n.to_string())
            .collect(),
    };
    if exclude_namespaces.iter().any(|n| n.is_empty()) {
        return Err(CniError::InvalidConfig(
            "excludeNamespaces: an empty namespace name".into(),
        ));
    }

    let prev_result = match command {
        Command::Add | Command::Check => {
            let raw = fields
                .get("prevResult")
                .filter(|r| r.get() != "null")
                .ok_or_else(|| {
                    CniError::InvalidConfig(format!(
                        "prevResult is required for {}: ztunnel-cni is a chained plugin and \
                         must follow the plugin that sets up the pod's interface",
                        command.name()
                    ))
                })?;
            Some(parse_prev_result(raw)?)
        }
        _ => None,
    };

    // `null` is an empty list: a runtime written in Go sends its nil slice so when no pod is
    // left on the network.
    let valid_attachments = match command {
        Command::Gc => match fields.get("cni.dev/valid-attachments") {
            Some(raw) if raw.get() == "null" => Some(Vec::new()),
            Some(raw) => Some(parse_valid_attachments(raw)?),
            None => {
                return Err(CniError::InvalidConfig(
                    "cni.dev/valid-attachments is required for GC".into(),
                ))
            }
        },
        _ => None,
    };

    Ok(NetConf {
        cni_version,
        name,
        socket,
        timeout,
        enrolled_namespaces_file,
        exclude_namespaces,
        prev_result,
        valid_attachments,
    })
}

/// The version to put in an error object: the configuration's, when this plugin speaks it.
pub fn error_version(stdin: &str) -> &'static str {
    #[derive(Deserialize)]
    struct Head {
        #[serde(rename = "cniVersion")]
        cni_version: Option<String>,
    }
    serde_json::from_str::<Head>(stdin)
        .ok()
        .and_then(|h| h.cni_version)
        .and_then(|v| SUPPORTED_VERSIONS.iter().copied().find(|s| *s == v))
        .unwrap_or(LATEST_VERSION)
}

/// Checks stdin is a JSON object (code 6) and splits it into raw fields.
pub fn decode_object(stdin: &str) -> Result<BTreeMap<String, Box<RawValue>>, CniError> {
    if stdin.trim().is_empty() {
        return Err(CniError::Decode("stdin is empty".into()));
    }
    if !stdin.trim_start().starts_with('{') {
        return Err(CniError::Decode("stdin is not a JSON object".into()));
    }
    // Splitting into raw fields does not check inside them: serde_json skips a string's
    // escapes without checking that a `\u` surrogate is paired. A full parse checks every
    // byte, so that what ADD hands on verbatim (`prevResult`) is JSON.
    serde_json::from_str::<serde_json::Value>(stdin)
        .map_err(|e| CniError::Decode(e.to_string()))?;
    serde_json::from_str(stdin).map_err(|e| CniError::Decode(e.to_string()))
}

fn check_version(command: Command, v: &str) -> Result<(), CniError> {
    if !SUPPORTED_VERSIONS.contains(&v) {
        return Err(CniError::IncompatibleVersion(format!(
            "cniVersion {v:?} is not supported; this plugin supports {}",
            SUPPORTED_VERSIONS.join(", ")
        )));
    }
    let parsed = semver(v).unwrap_or_default();
    if parsed < command.since() {
        let (a, b, c) = command.since();
        return Err(CniError::IncompatibleVersion(format!(
            "{} needs cniVersion {a}.{b}.{c} or later, the configuration says {v}",
            command.name()
        )));
    }
    Ok(())
}

fn semver(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((it.next()??, it.next()??, it.next()??))
}

fn non_empty<'a>(vars: &'a Vars, name: &str) -> Option<&'a str> {
    vars.get(name).map(String::as_str).filter(|v| !v.is_empty())
}

fn field<T: DeserializeOwned>(raw: &RawValue, key: &str) -> Result<T, CniError> {
    serde_json::from_str(raw.get()).map_err(|e| CniError::InvalidConfig(format!("{key}: {e}")))
}

fn path_field(v: Option<String>, key: &str, default: &str) -> Result<PathBuf, CniError> {
    match v {
        None => Ok(PathBuf::from(default)),
        Some(s) if s.is_empty() => Err(CniError::InvalidConfig(format!("{key} is empty"))),
        Some(s) => Ok(PathBuf::from(s)),
    }
}

/// Parses `timeout` ("5s", "500ms", "1m 30s"); zero is refused.
pub fn parse_timeout(s: &str) -> Result<Duration, CniError> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| CniError::InvalidConfig(format!("timeout {s:?}: {e}")))?;
    if d.is_zero() {
        return Err(CniError::InvalidConfig(format!(
            "timeout {s:?} must be greater than zero"
        )));
    }
    if d > LONGEST_TIMEOUT {
        return Err(CniError::InvalidConfig(format!(
            "timeout {s:?} must be at most {}",
            humantime::format_duration(LONGEST_TIMEOUT)
        )));
    }
    Ok(d)
}

/// The longest daemon call a configuration may allow (a runtime gives up on a pod's sandbox
/// long before).
const LONGEST_TIMEOUT: Duration = Duration::from_secs(3600);

/// Reads the pod's addresses from `prevResult.ips[].address` ("10.1.0.5/24" → 10.1.0.5);
/// the same field in the 0.3.x, 0.4.0 and 1.x result formats.
pub fn parse_prev_result(raw: &RawValue) -> Result<PrevResult, CniError> {
    #[derive(Deserialize)]
    struct Ip {
        address: String,
    }
    #[derive(Deserialize)]
    struct Result {
        #[serde(default)]
        ips: Option<Vec<Ip>>,
    }
    if !raw.get().trim_start().starts_with('{') {
        return Err(CniError::InvalidConfig(
            "prevResult must be a JSON object".into(),
        ));
    }
    let parsed: Result = field(raw, "prevResult")?;
    let mut ips: Vec<IpAddr> = Vec::new();
    for ip in parsed.ips.unwrap_or_default() {
        let host = ip
            .address
            .split_once('/')
            .map_or(ip.address.as_str(), |(h, _)| h);
        let addr: IpAddr = host.trim().parse().map_err(|_| {
            CniError::InvalidConfig(format!(
                "prevResult.ips: {:?} is not an address in CIDR form",
                ip.address
            ))
        })?;
        if !ips.contains(&addr) {
            ips.push(addr);
        }
    }
    Ok(PrevResult {
        raw: raw.to_owned(),
        ips,
    })
}

fn parse_valid_attachments(raw: &RawValue) -> Result<Vec<Attachment>, CniError> {
    #[derive(Deserialize)]
    struct Wire {
        #[serde(rename = "containerID")]
        container_id: String,
        ifname: String,
    }
    let list: Vec<Wire> = field(raw, "cni.dev/valid-attachments")?;
    Ok(list
        .into_iter()
        .map(|w| Attachment {
            container_id: w.container_id,
            ifname: w.ifname,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vars {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn code<T>(r: Result<T, CniError>) -> Option<u32> {
        r.err().map(|e| e.code())
    }

    #[test]
    fn stdin_is_json_throughout() {
        let lone = r#"{"cniVersion":"1.0.0","prevResult":{"ips":[],"x":"\udaef"}}"#;
        assert_eq!(code(decode_object(lone)), Some(6));
        assert_eq!(code(parse_conf(Command::Add, lone)), Some(6));
        let paired = r#"{"cniVersion":"1.0.0","prevResult":{"ips":[],"x":"\ud83d\ude00"}}"#;
        let conf = parse_conf(Command::Add, paired).unwrap();
        assert_eq!(
            conf.prev_result.unwrap().raw.get(),
            r#"{"ips":[],"x":"\ud83d\ude00"}"#
        );
    }

    #[test]
    fn commands() {
        let cases: &[(Option<&str>, Option<Command>)] = &[
            (None, None),
            (Some(""), None),
            (Some("add"), None),
            (Some("FROB"), None),
            (Some("ADD"), Some(Command::Add)),
            (Some("DEL"), Some(Command::Del)),
            (Some("CHECK"), Some(Command::Check)),
            (Some("VERSION"), Some(Command::Version)),
            (Some("STATUS"), Some(Command::Status)),
            (Some("GC"), Some(Command::Gc)),
        ];
        for (value, want) in cases {
            let v = match value {
                Some(c) => vars(&[("CNI_COMMAND", c)]),
                None => Vars::new(),
            };
            match (parse_command(&v), want) {
                (Ok(got), Some(want)) => assert_eq!(got, *want),
                (Err(e), None) => assert_eq!(e.code(), 4, "{value:?}"),
                (got, want) => panic!("{value:?}: {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn environment_errors() {
        let full = [
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/p1"),
            ("CNI_IFNAME", "eth0"),
        ];
        let without = |name: &str| -> Vars {
            vars(
                &full
                    .iter()
                    .copied()
                    .filter(|(k, _)| *k != name)
                    .collect::<Vec<_>>(),
            )
        };
        let blank = |name: &str| -> Vars {
            let mut v = vars(&full);
            v.insert(name.to_string(), String::new());
            v
        };
        let with_args = |args: &str| -> Vars {
            let mut v = vars(&full);
            v.insert("CNI_ARGS".into(), args.into());
            v
        };
        let cases: Vec<(Command, Vars, Option<u32>)> = vec![
            (Command::Add, vars(&full), None),
            (Command::Add, without("CNI_NETNS"), Some(4)),
            (Command::Add, blank("CNI_NETNS"), Some(4)),
            (Command::Add, without("CNI_CONTAINERID"), Some(4)),
            (Command::Add, without("CNI_IFNAME"), Some(4)),
            (Command::Check, without("CNI_NETNS"), Some(4)),
            (Command::Check, without("CNI_CONTAINERID"), Some(4)),
            (Command::Check, without("CNI_IFNAME"), Some(4)),
            (Command::Del, without("CNI_NETNS"), None),
            (Command::Del, blank("CNI_NETNS"), None),
            (Command::Del, without("CNI_CONTAINERID"), Some(4)),
            (Command::Del, without("CNI_IFNAME"), Some(4)),
            (Command::Status, Vars::new(), None),
            (Command::Gc, Vars::new(), None),
            (Command::Version, Vars::new(), None),
            (Command::Add, with_args("K8S_POD_NAME=a;junk"), Some(4)),
            (Command::Gc, vars(&[("CNI_ARGS", "junk")]), None),
        ];
        for (cmd, v, want) in cases {
            assert_eq!(code(parse_env(cmd, &v)), want, "{cmd:?} {v:?}");
        }
        let env = parse_env(Command::Add, &vars(&full)).unwrap();
        assert_eq!(env.container_id, "c1");
        assert_eq!(env.netns, "/var/run/netns/p1");
        assert_eq!(env.ifname, "eth0");
    }

    #[test]
    fn cni_args() {
        let all = "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web-0;\
                   K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1";
        let pod = |s: &str, strict| parse_cni_args(s, strict).map(|a| a.pod_name);
        for strict in [true, false] {
            let got = parse_cni_args(all, strict).unwrap();
            assert_eq!(got.pod_namespace.as_deref(), Some("demo"));
            assert_eq!(got.pod_name.as_deref(), Some("web-0"));
            assert_eq!(got.pod_uid.as_deref(), Some("u-1"));
            for empty in ["", ";;", "K8S_POD_NAMESPACE="] {
                assert_eq!(parse_cni_args(empty, strict).unwrap(), CniArgs::default());
            }
            assert_eq!(
                pod("X=a=b;K8S_POD_NAME=p", strict).unwrap().as_deref(),
                Some("p")
            );
        }
        // A segment that is no pair: malformed, unless DEL's best effort skips it.
        assert_eq!(code(pod("IgnoreUnknown;K8S_POD_NAME=p", true)), Some(4));
        assert_eq!(
            pod("IgnoreUnknown;K8S_POD_NAME=p", false)
                .unwrap()
                .as_deref(),
            Some("p")
        );
        let del = vars(&[
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown;K8S_POD_NAME=p"),
        ]);
        assert!(parse_env(Command::Del, &del).is_ok());
    }

    const PREV: &str = r#"{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.5/24"}]}"#;

    #[test]
    fn config_errors() {
        let with = |extra: &str| {
            format!(r#"{{"cniVersion":"1.0.0","name":"k8s","type":"ztunnel-cni"{extra}}}"#)
        };
        let prev = format!(r#","prevResult":{PREV}"#);
        let cases: Vec<(Command, String, Option<u32>)> = vec![
            // Stdin that is not a JSON object: 6.
            (Command::Add, String::new(), Some(6)),
            (Command::Add, "{".into(), Some(6)),
            (Command::Add, "not json".into(), Some(6)),
            (Command::Add, "[1,2]".into(), Some(6)),
            (Command::Del, r#"{"cniVersion":"1.0.0",}"#.into(), Some(6)),
            // cniVersion: 1 when missing or unknown or too old for the command.
            (Command::Add, format!(r#"{{"name":"k8s"{prev}}}"#), Some(1)),
            (Command::Del, r#"{"cniVersion":null}"#.into(), Some(1)),
            (
                Command::Add,
                format!(r#"{{"cniVersion":"9.9.9"{prev}}}"#),
                Some(1),
            ),
            (
                Command::Add,
                format!(r#"{{"cniVersion":"1.0"{prev}}}"#),
                Some(1),
            ),
            (
                Command::Check,
                format!(r#"{{"cniVersion":"0.3.1"{prev}}}"#),
                Some(1),
            ),
            (Command::Status, r#"{"cniVersion":"1.0.0"}"#.into(), Some(1)),
            (
                Command::Gc,
                r#"{"cniVersion":"1.0.0","cni.dev/valid-attachments":[]}"#.into(),
                Some(1),
            ),
            (
                Command::Add,
                format!(r#"{{"cniVersion":1{prev}}}"#),
                Some(7),
            ),
            // Plugin fields: 7.
            (
                Command::Add,
                with(&format!(r#","timeout":"soon"{prev}"#)),
                Some(7),
            ),
            (
                Command::Add,
                with(&format!(r#","timeout":"0s"{prev}"#)),
                Some(7),
            ),
            (
                Command::Add,
                with(&format!(r#","timeout":5{prev}"#)),
                Some(7),
            ),
            (Command::Del, with(r#","timeout":"5 parsecs""#), Some(7)),
            (
                Command::Add,
                with(&format!(r#","socket":""{prev}"#)),
                Some(7),
            ),
            (
                Command::Add,
                with(&format!(r#","socket":["/a"]{prev}"#)),
                Some(7),
            ),
            (
                Command::Add,
                with(&format!(r#","enrolledNamespacesFile":""{prev}"#)),
                Some(7),
            ),
            (Command::Add, with(&format!(r#","name":7{prev}"#)), Some(7)),
            // prevResult: required on ADD and CHECK, must be an object with valid addresses.
            (Command::Add, with(""), Some(7)),
            (Command::Add, with(r#","prevResult":null"#), Some(7)),
            (Command::Check, with(""), Some(7)),
            (Command::Add, with(r#","prevResult":[]"#), Some(7)),
            (Command::Add, with(r#","prevResult":"x""#), Some(7)),
            (Command::Add, with(r#","prevResult":{"ips":{}}"#), Some(7)),
            (
                Command::Add,
                with(r#","prevResult":{"ips":[{"address":"nope/24"}]}"#),
                Some(7),
            ),
            (Command::Add, with(r#","prevResult":{"ips":[{}]}"#), Some(7)),
            // GC: the valid list is required and well-formed.
            (Command::Gc, r#"{"cniVersion":"1.1.0"}"#.into(), Some(7)),
            (
                Command::Gc,
                r#"{"cniVersion":"1.1.0","cni.dev/valid-attachments":[{"ifname":"eth0"}]}"#.into(),
                Some(7),
            ),
            // Accepted.
            (
                Command::Gc,
                r#"{"cniVersion":"1.1.0","cni.dev/valid-attachments":null}"#.into(),
                None,
            ),
            (Command::Add, with(&prev), None),
            (
                Command::Add,
                with(&format!(
                    r#","unknownField":{{"x":[1]}},"timeout":"500ms"{prev}"#
                )),
                None,
            ),
            (Command::Check, with(&prev), None),
            (Command::Del, with(""), None),
            (
                Command::Del,
                with(r#","prevResult":"not checked on DEL""#),
                None,
            ),
            (Command::Status, r#"{"cniVersion":"1.1.0"}"#.into(), None),
            (
                Command::Gc,
                r#"{"cniVersion":"1.1.0","cni.dev/valid-attachments":[]}"#.into(),
                None,
            ),
        ];
        for v in SUPPORTED_VERSIONS {
            let cases_ok = format!(r#"{{"cniVersion":"{v}"{prev}}}"#);
            assert!(parse_conf(Command::Add, &cases_ok).is_ok(), "{v}");
        }
        for (cmd, stdin, want) in cases {
            assert_eq!(code(parse_conf(cmd, &stdin)), want, "{cmd:?} {stdin}");
        }
    }

    #[test]
    fn config_defaults_and_values() {
        let c = parse_conf(
            Command::Add,
            &format!(r#"{{"cniVersion":"1.1.0","prevResult":{PREV}}}"#),
        )
        .unwrap();
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.timeout, Duration::from_secs(5));
        assert_eq!(
            c.enrolled_namespaces_file,
            PathBuf::from(DEFAULT_ENROLLED_NAMESPACES_FILE)
        );
        assert_eq!(c.prev_result.unwrap().raw.get(), PREV);

        let c = parse_conf(
            Command::Gc,
            r#"{"cniVersion":"1.1.0","name":"k8s","socket":"/s.sock","timeout":"1m 500ms",
               "enrolledNamespacesFile":"/ns.json",
               "cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(c.name.as_deref(), Some("k8s"));
        assert_eq!(c.socket, PathBuf::from("/s.sock"));
        assert_eq!(c.timeout, Duration::from_millis(60_500));
        assert_eq!(c.enrolled_namespaces_file, PathBuf::from("/ns.json"));
        assert_eq!(
            c.valid_attachments.unwrap(),
            vec![Attachment {
                container_id: "c1".into(),
                ifname: "eth0".into()
            }]
        );
    }

    #[test]
    fn prev_result_addresses() {
        let raw = RawValue::from_string(
            r#"{"cniVersion":"0.3.1","interfaces":[{"name":"eth0"}],
                "ips":[{"version":"4","address":"10.1.0.5/24","gateway":"10.1.0.1","interface":0},
                       {"address":"fd00::5/64"},{"address":"10.1.0.5/24"},{"address":"10.2.0.9"}]}"#
                .into(),
        )
        .unwrap();
        let p = parse_prev_result(&raw).unwrap();
        let want: Vec<IpAddr> = ["10.1.0.5", "fd00::5", "10.2.0.9"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(p.ips, want);
        let none = RawValue::from_string(r#"{"cniVersion":"1.0.0"}"#.into()).unwrap();
        assert!(parse_prev_result(&none).unwrap().ips.is_empty());
    }

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_timeout("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_timeout("1h").unwrap(), Duration::from_secs(3600));
        for bad in [
            "",
            "5",
            "0ms",
            "-1s",
            "five seconds",
            "61m",
            "300000000000y",
        ] {
            assert_eq!(code(parse_timeout(bad)), Some(7), "{bad:?}");
        }
    }

    #[test]
    fn error_object_version() {
        assert_eq!(error_version(r#"{"cniVersion":"0.4.0"}"#), "0.4.0");
        assert_eq!(error_version(r#"{"cniVersion":"9.9.9"}"#), LATEST_VERSION);
        assert_eq!(error_version("garbage"), LATEST_VERSION);
        assert_eq!(error_version(""), LATEST_VERSION);
    }
}
