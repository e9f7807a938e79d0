//! Configuration of `ztunnel run` ([`RunConfig`]) and `ztunnel ca` ([`CaConfig`], in `config/ca.rs`), each parsed
//! once from flags and environment variables (flags win) and validated before anything starts.
//!
//! The environment is injected (`env: &dyn Fn(&str) -> Option<String>`), so tests never touch
//! the process environment. Every setting is printed at start by `Display`; the CA token is
//! never read into the configuration (only its path), so there is no secret to leak.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;

mod ca;
mod tunnel;
pub use ca::{CaAuthorizer, CaConfig, CaLimits, CaMaterialSource, NamespacedName};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Cli(#[from] clap::Error),
    #[error("{name} is required (flag --{flag} or environment {env})")]
    Missing {
        name: &'static str,
        flag: &'static str,
        env: &'static str,
    },
    #[error("invalid {setting} {value:?}: {reason}")]
    Invalid {
        setting: &'static str,
        value: String,
        reason: String,
    },
    #[error("{0}")]
    Conflict(String),
}

/// Where discovery comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiscoverySource {
    File(PathBuf),
    /// The API server, through this kubeconfig, or else the standard resolution (in-cluster
    /// ServiceAccount, `KUBECONFIG`, `~/.kube/config`).
    Kubernetes {
        kubeconfig: Option<PathBuf>,
    },
}

/// Who signs workload certificates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaSource {
    /// In-process, from a plugged-in CA directory (created with a fresh root if empty).
    Dir(PathBuf),
    /// A remote `ztunnel ca`.
    Remote {
        address: String,
        root_cert: PathBuf,
        server_name: String,
        token_file: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the proxies' listeners live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureMode {
    /// Inside each enrolled pod's netns, enrolled by the CNI plugin (the product).
    InPod,
    /// On the node's own addresses (`--outbound-addr` …), serving every local workload; for
    /// tests and setups whose capture rules are installed by someone else.
    Node,
}

impl FromStr for CaptureMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "inpod" => Ok(CaptureMode::InPod),
            "node" => Ok(CaptureMode::Node),
            _ => Err("expected inpod or node".into()),
        }
    }
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err("expected text or json".into()),
        }
    }
}

/// Settings of the node daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunConfig {
    pub node_name: String,
    pub trust_domain: String,
    /// The cluster's id, as Istio's telemetry reports it (`*_cluster` labels).
    pub cluster_id: String,
    /// Policies in this namespace apply to the whole mesh.
    pub root_namespace: String,
    /// The Istio-compatible setting (cluster mode only), with Istio's root namespace: the
    /// daemon also reads `security.istio.io/v1` policies and honours the
    /// `istio.io/dataplane-mode` labels. `None`: off.
    pub istio_root_namespace: Option<String>,
    pub discovery: DiscoverySource,
    pub ca: CaSource,
    pub cert_lifetime: Duration,
    pub capture: CaptureMode,
    /// Holds the enrollment socket and the enrolled pods' records.
    pub state_dir: PathBuf,
    /// The enrolled-namespaces file the CNI plugin reads when the daemon is down (in the state
    /// directory unless set; a node's deployment keeps it off tmpfs, so that it survives a
    /// reboot).
    pub enrolled_namespaces_file: PathBuf,
    /// The host's `/proc`, scanned for running pods' network namespaces.
    pub host_proc: PathBuf,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    pub inbound_plaintext_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
    pub pool_max_streams: u32,
    /// Caps on tunnel peers: pending handshakes, authenticated peers, buffered bytes.
    pub tunnel: crate::proxy::TunnelLimits,
    pub pool_idle_timeout: Duration,
    /// Whether tunnels are also accepted on QUIC (UDP, on the inbound tunnel port).
    pub quic_listen: bool,
    /// Tunnel addresses dialled on QUIC first (falling back to HTTP/2); empty: none.
    pub quic_destinations: Vec<ipnet::IpNet>,
    pub connect_timeout: Duration,
    pub drain_grace: Duration,
    pub discovery_poll: Duration,
    pub log_format: LogFormat,
    pub log_filter: String,
    /// The runtime's worker threads: a node daemon takes a fixed, small share of the node's
    /// cores, not one thread per core.
    pub worker_threads: usize,
}

/// `ztunnel run`: every flag also reads the environment variable named in its help.
#[derive(Parser, Debug)]
#[command(about = "The node daemon", disable_version_flag = true)]
struct RunArgs {
    /// This node's name [env: NODE_NAME]
    #[arg(long)]
    node_name: Option<String>,
    /// SPIFFE trust domain [env: TRUST_DOMAIN] [default: cluster.local]
    #[arg(long)]
    trust_domain: Option<String>,
    /// The cluster's id in Istio's telemetry (the source_cluster and destination_cluster labels) [env: CLUSTER_ID] [default: Kubernetes]
    #[arg(long)]
    cluster_id: Option<String>,
    /// The namespace whose policies apply to the whole mesh [env: ZTUNNEL_ROOT_NAMESPACE] [default: ztunnel-system]
    #[arg(long)]
    root_namespace: Option<String>,
    /// Also read Istio's policies (security.istio.io/v1) and istio.io/dataplane-mode labels, for clusters moving from Istio; needs --discovery-source kubernetes: true or false [env: ZTUNNEL_ISTIO_COMPAT] [default: false]
    #[arg(long)]
    istio_compat: Option<String>,
    /// Istio's root namespace, whose policies apply to the whole mesh too, under --istio-compat [env: ZTUNNEL_ISTIO_ROOT_NAMESPACE] [default: istio-system]
    #[arg(long)]
    istio_root_namespace: Option<String>,
    /// The local discovery file (YAML) [env: ZTUNNEL_DISCOVERY_FILE]
    #[arg(long)]
    discovery_file: Option<PathBuf>,
    /// Where discovery comes from, file or kubernetes [env: ZTUNNEL_DISCOVERY_SOURCE] [default: file]
    #[arg(long)]
    discovery_source: Option<String>,
    /// The kubeconfig for `--discovery-source kubernetes` [env: KUBECONFIG] [default: in-cluster]
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// In-process CA from this plugged-in CA directory [env: ZTUNNEL_CA_DIR] [default: /var/lib/ztunnel/ca]
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// host:port of a remote `ztunnel ca` [env: ZTUNNEL_CA_ADDRESS]
    #[arg(long)]
    ca_address: Option<String>,
    /// PEM root that the remote CA's certificate must chain to [env: ZTUNNEL_CA_ROOT_CERT]
    #[arg(long)]
    ca_root_cert: Option<PathBuf>,
    /// Name the remote CA's certificate must carry [env: ZTUNNEL_CA_SERVER_NAME] [default: ztunnel-ca.ztunnel-system.svc]
    #[arg(long)]
    ca_server_name: Option<String>,
    /// File holding the bearer token for the remote CA [env: ZTUNNEL_CA_TOKEN_FILE]
    #[arg(long)]
    ca_token_file: Option<PathBuf>,
    /// Workload certificate lifetime, renewed at half-life [env: ZTUNNEL_CERT_LIFETIME] [default: 24h]
    #[arg(long)]
    cert_lifetime: Option<String>,
    /// Where listeners live: inpod (each enrolled pod's netns) or node (the addresses below) [env: ZTUNNEL_CAPTURE_MODE] [default: inpod]
    #[arg(long)]
    capture_mode: Option<String>,
    /// Enrollment socket and enrolled pods' records [env: ZTUNNEL_STATE_DIR] [default: /var/run/ztunnel]
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The enrolled-namespaces file the CNI plugin reads while the daemon is down [env: ZTUNNEL_ENROLLED_NAMESPACES_FILE] [default: <state dir>/enrolled-namespaces.json]
    #[arg(long)]
    enrolled_namespaces_file: Option<PathBuf>,
    /// The host's /proc, where running pods' netns are found [env: ZTUNNEL_HOST_PROC] [default: /proc]
    #[arg(long)]
    host_proc: Option<String>,
    /// Admin API address, loopback only [env: ZTUNNEL_ADMIN_ADDR] [default: 127.0.0.1:15000]
    #[arg(long)]
    admin_addr: Option<String>,
    /// Prometheus metrics address; [::] is both families [env: ZTUNNEL_METRICS_ADDR] [default: [::]:15020]
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Readiness address; [::] is both families [env: ZTUNNEL_READINESS_ADDR] [default: [::]:15021]
    #[arg(long)]
    readiness_addr: Option<String>,
    /// Outbound capture listener [env: ZTUNNEL_OUTBOUND_ADDR] [default: 0.0.0.0:15001]
    #[arg(long)]
    outbound_addr: Option<String>,
    /// Inbound plaintext listener [env: ZTUNNEL_INBOUND_PLAINTEXT_ADDR] [default: 0.0.0.0:15006]
    #[arg(long)]
    inbound_plaintext_addr: Option<String>,
    /// Inbound tunnel (HBONE) listener [env: ZTUNNEL_INBOUND_ADDR] [default: 0.0.0.0:15008]
    #[arg(long)]
    inbound_addr: Option<String>,
    /// Streams per pooled tunnel connection [env: ZTUNNEL_POOL_MAX_STREAMS] [default: 100]
    #[arg(long)]
    pool_max_streams: Option<String>,
    #[command(flatten)]
    tunnel: tunnel::TunnelArgs,
    /// Idle pooled connections close after [env: ZTUNNEL_POOL_IDLE_TIMEOUT] [default: 5m]
    #[arg(long)]
    pool_idle_timeout: Option<String>,
    /// Worker threads of the daemon's runtime [env: ZTUNNEL_WORKER_THREADS] [default: 2]
    #[arg(long)]
    worker_threads: Option<String>,
    /// Also accept tunnels on QUIC, UDP on the inbound tunnel port: true or false [env: ZTUNNEL_QUIC_LISTEN] [default: false]
    #[arg(long)]
    quic_listen: Option<String>,
    /// Destinations (comma-separated CIDRs or IPs) whose tunnels are tried on QUIC first, falling back to HTTP/2 [env: ZTUNNEL_QUIC_DESTINATIONS] [default: none]
    #[arg(long)]
    quic_destinations: Option<String>,
    /// Timeout of outgoing connects and handshakes; a tunnel stream's request waits twice this for its answer [env: ZTUNNEL_CONNECT_TIMEOUT] [default: 10s]
    #[arg(long)]
    connect_timeout: Option<String>,
    /// How long established connections may drain on SIGTERM [env: ZTUNNEL_DRAIN_GRACE] [default: 30s]
    #[arg(long)]
    drain_grace: Option<String>,
    /// How often the discovery file is checked [env: ZTUNNEL_DISCOVERY_POLL] [default: 1s]
    #[arg(long)]
    discovery_poll: Option<String>,
    /// Log format, text or json [env: ZTUNNEL_LOG_FORMAT] [default: text]; the level comes from RUST_LOG
    #[arg(long)]
    log_format: Option<String>,
}

type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The flag, else the environment variable, else the default; then parsed.
fn setting<T: FromStr>(
    name: &'static str,
    flag: Option<String>,
    env: Env<'_>,
    key: &str,
    default: &str,
) -> Result<T, ConfigError>
where
    T::Err: fmt::Display,
{
    let value = flag
        .or_else(|| env(key))
        .unwrap_or_else(|| default.to_owned());
    value.parse().map_err(|e: T::Err| ConfigError::Invalid {
        setting: name,
        value,
        reason: e.to_string(),
    })
}

/// A whole number from 1 to `max`: the flag, else the environment variable, else `default`.
fn count(
    name: &'static str,
    flag: Option<String>,
    env: Env<'_>,
    key: &str,
    default: u32,
    max: u32,
) -> Result<u32, ConfigError> {
    let value: u32 = setting(name, flag, env, key, &default.to_string())?;
    if !(1..=max).contains(&value) {
        return Err(ConfigError::Invalid {
            setting: name,
            value: value.to_string(),
            reason: format!("must be 1 to {max}"),
        });
    }
    Ok(value)
}

/// A comma-separated list of CIDRs (a bare IP is its own /32 or /128); empty is none.
fn cidrs(
    name: &'static str,
    flag: Option<String>,
    env: Env<'_>,
    key: &str,
) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    let value = flag.or_else(|| env(key)).unwrap_or_default();
    value
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<ipnet::IpNet>()
                .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| ConfigError::Invalid {
                    setting: name,
                    value: value.clone(),
                    reason: format!("{p:?} is not a CIDR or an IP address"),
                })
        })
        .collect()
}

fn duration(
    name: &'static str,
    flag: Option<String>,
    env: Env<'_>,
    key: &str,
    default: &str,
    min: Duration,
) -> Result<Duration, ConfigError> {
    let value = flag
        .or_else(|| env(key))
        .unwrap_or_else(|| default.to_owned());
    let d = humantime::parse_duration(&value).map_err(|e| ConfigError::Invalid {
        setting: name,
        value: value.clone(),
        reason: e.to_string(),
    })?;
    if d < min {
        return Err(ConfigError::Invalid {
            setting: name,
            value,
            reason: format!("must be at least {}", humantime::format_duration(min)),
        });
    }
    Ok(d)
}

/// A duration from `min` to `max`.
fn duration_within(
    name: &'static str,
    flag: Option<String>,
    env: Env<'_>,
    key: &str,
    default: &str,
    (min, max): (Duration, Duration),
) -> Result<Duration, ConfigError> {
    let d = duration(name, flag, env, key, default, min)?;
    if d > max {
        return Err(ConfigError::Invalid {
            setting: name,
            value: humantime::format_duration(d).to_string(),
            reason: format!("must be at most {}", humantime::format_duration(max)),
        });
    }
    Ok(d)
}

fn required<T>(
    v: Option<T>,
    name: &'static str,
    flag: &'static str,
    env: &'static str,
) -> Result<T, ConfigError> {
    v.ok_or(ConfigError::Missing { name, flag, env })
}

fn trust_domain(flag: Option<String>, env: Env<'_>) -> Result<String, ConfigError> {
    let td: String = setting("trust domain", flag, env, "TRUST_DOMAIN", "cluster.local")?;
    crate::identity::Identity::new(&td, "x", "y").map_err(|e| ConfigError::Invalid {
        setting: "trust domain",
        value: td.clone(),
        reason: e.to_string(),
    })?;
    Ok(td)
}

/// The cluster's id: Istio's default, `Kubernetes`, unless set; a label value, so printable
/// ASCII without spaces.
fn cluster_id(flag: Option<String>, env: Env<'_>) -> Result<String, ConfigError> {
    let id = flag
        .or_else(|| env("CLUSTER_ID"))
        .unwrap_or_else(|| "Kubernetes".into());
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::Invalid {
            setting: "cluster id",
            value: id,
            reason: "must be non-empty printable ASCII without spaces".into(),
        });
    }
    Ok(id)
}

fn root_namespace(flag: Option<String>, env: Env<'_>) -> Result<String, ConfigError> {
    namespace_setting(
        "root namespace",
        flag,
        env,
        "ZTUNNEL_ROOT_NAMESPACE",
        crate::policy::ROOT_NAMESPACE,
    )
}

/// Istio's root namespace when `--istio-compat` is on, else `None`; the setting needs
/// Kubernetes discovery (Istio's objects and labels live on the API server).
fn istio_root_namespace(
    compat: Option<String>,
    root: Option<String>,
    env: Env<'_>,
    discovery: &DiscoverySource,
) -> Result<Option<String>, ConfigError> {
    let on: bool = setting("istio compat", compat, env, "ZTUNNEL_ISTIO_COMPAT", "false")?;
    let root = root.or_else(|| env("ZTUNNEL_ISTIO_ROOT_NAMESPACE"));
    if !on {
        return match root {
            Some(_) => Err(ConfigError::Conflict(
                "--istio-root-namespace is for --istio-compat true".into(),
            )),
            None => Ok(None),
        };
    }
    if !matches!(discovery, DiscoverySource::Kubernetes { .. }) {
        return Err(ConfigError::Conflict(
            "--istio-compat reads Istio's objects and labels from the API server: it needs --discovery-source kubernetes".into(),
        ));
    }
    namespace_setting(
        "istio root namespace",
        root,
        env,
        "ZTUNNEL_ISTIO_ROOT_NAMESPACE",
        "istio-system",
    )
    .map(Some)
}

fn namespace_setting(
    name: &'static str,
    flag: Option<String>,
    env: Env<'_>,
    key: &str,
    default: &str,
) -> Result<String, ConfigError> {
    let ns: String = setting(name, flag, env, key, default)?;
    let label = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    if !label(&ns) {
        return Err(ConfigError::Invalid {
            setting: name,
            value: ns.clone(),
            reason: "not a namespace name (a DNS-1123 label)".into(),
        });
    }
    Ok(ns)
}

fn log_filter(env: Env<'_>) -> String {
    env("RUST_LOG")
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "info".into())
}

impl RunConfig {
    /// The namespaces whose policies apply to the whole mesh: ours, then Istio's under the
    /// Istio-compatible setting.
    pub fn root_namespaces(&self) -> Vec<&str> {
        std::iter::once(self.root_namespace.as_str())
            .chain(self.istio_root_namespace.as_deref())
            .collect()
    }

    /// Parses `args` (`args[0]` is the program name) with `env` as the environment.
    pub fn from_sources(args: Vec<String>, env: Env<'_>) -> Result<RunConfig, ConfigError> {
        let a = RunArgs::try_parse_from(args)?;
        let node_name = required(
            a.node_name.or_else(|| env("NODE_NAME")),
            "node name",
            "node-name",
            "NODE_NAME",
        )?;
        let discovery_file = a
            .discovery_file
            .or_else(|| env("ZTUNNEL_DISCOVERY_FILE").map(PathBuf::from));
        let discovery = match a
            .discovery_source
            .or_else(|| env("ZTUNNEL_DISCOVERY_SOURCE"))
            .as_deref()
        {
            None | Some("file") => DiscoverySource::File(required(
                discovery_file,
                "discovery file",
                "discovery-file",
                "ZTUNNEL_DISCOVERY_FILE",
            )?),
            Some("kubernetes") => {
                if discovery_file.is_some() {
                    return Err(ConfigError::Conflict(
                        "--discovery-file is for --discovery-source file, not kubernetes".into(),
                    ));
                }
                DiscoverySource::Kubernetes {
                    kubeconfig: a
                        .kubeconfig
                        .or_else(|| env("KUBECONFIG").map(PathBuf::from)),
                }
            }
            Some(other) => {
                return Err(ConfigError::Invalid {
                    setting: "discovery source",
                    value: other.into(),
                    reason: "must be file or kubernetes".into(),
                })
            }
        };
        let ca_dir = a
            .ca_dir
            .or_else(|| env("ZTUNNEL_CA_DIR").map(PathBuf::from));
        let ca_address = a.ca_address.or_else(|| env("ZTUNNEL_CA_ADDRESS"));
        let ca =
            match (ca_dir, ca_address) {
                (Some(_), Some(_)) => return Err(ConfigError::Conflict(
                    "--ca-dir and --ca-address are exclusive: sign in-process or ask a remote CA"
                        .into(),
                )),
                (Some(dir), None) => CaSource::Dir(dir),
                (None, None) => CaSource::Dir(PathBuf::from("/var/lib/ztunnel/ca")),
                (None, Some(address)) => CaSource::Remote {
                    address,
                    root_cert: required(
                        a.ca_root_cert
                            .or_else(|| env("ZTUNNEL_CA_ROOT_CERT").map(PathBuf::from)),
                        "CA root certificate",
                        "ca-root-cert",
                        "ZTUNNEL_CA_ROOT_CERT",
                    )?,
                    server_name: a
                        .ca_server_name
                        .or_else(|| env("ZTUNNEL_CA_SERVER_NAME"))
                        .unwrap_or_else(|| "ztunnel-ca.ztunnel-system.svc".into()),
                    token_file: required(
                        a.ca_token_file
                            .or_else(|| env("ZTUNNEL_CA_TOKEN_FILE").map(PathBuf::from)),
                        "CA token file",
                        "ca-token-file",
                        "ZTUNNEL_CA_TOKEN_FILE",
                    )?,
                },
            };
        let admin_addr: SocketAddr = setting(
            "admin address",
            a.admin_addr,
            env,
            "ZTUNNEL_ADMIN_ADDR",
            "127.0.0.1:15000",
        )?;
        if !admin_addr.ip().is_loopback() {
            return Err(ConfigError::Invalid {
                setting: "admin address",
                value: admin_addr.to_string(),
                reason: "the admin API is served on loopback only".into(),
            });
        }
        let pool_max_streams = count(
            "pool max streams",
            a.pool_max_streams,
            env,
            "ZTUNNEL_POOL_MAX_STREAMS",
            100,
            10_000,
        )?;
        let tunnel = a.tunnel.resolve(env)?;
        let worker_threads = count(
            "worker threads",
            a.worker_threads,
            env,
            "ZTUNNEL_WORKER_THREADS",
            2,
            1024,
        )? as usize;
        let ms = Duration::from_millis;
        let state_dir = a
            .state_dir
            .or_else(|| env("ZTUNNEL_STATE_DIR").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/var/run/ztunnel"));
        let enrolled_namespaces_file = a
            .enrolled_namespaces_file
            .or_else(|| env("ZTUNNEL_ENROLLED_NAMESPACES_FILE").map(PathBuf::from))
            .unwrap_or_else(|| state_dir.join(crate::capture::store::NAMESPACES_FILE));
        Ok(RunConfig {
            node_name,
            trust_domain: trust_domain(a.trust_domain, env)?,
            cluster_id: cluster_id(a.cluster_id, env)?,
            root_namespace: root_namespace(a.root_namespace, env)?,
            istio_root_namespace: istio_root_namespace(
                a.istio_compat,
                a.istio_root_namespace,
                env,
                &discovery,
            )?,
            discovery,
            ca,
            cert_lifetime: duration(
                "certificate lifetime",
                a.cert_lifetime,
                env,
                "ZTUNNEL_CERT_LIFETIME",
                "24h",
                Duration::from_secs(2),
            )?,
            capture: setting(
                "capture mode",
                a.capture_mode,
                env,
                "ZTUNNEL_CAPTURE_MODE",
                "inpod",
            )?,
            state_dir,
            enrolled_namespaces_file,
            host_proc: setting("host proc", a.host_proc, env, "ZTUNNEL_HOST_PROC", "/proc")?,
            admin_addr,
            metrics_addr: setting(
                "metrics address",
                a.metrics_addr,
                env,
                "ZTUNNEL_METRICS_ADDR",
                "[::]:15020",
            )?,
            readiness_addr: setting(
                "readiness address",
                a.readiness_addr,
                env,
                "ZTUNNEL_READINESS_ADDR",
                "[::]:15021",
            )?,
            outbound_addr: setting(
                "outbound address",
                a.outbound_addr,
                env,
                "ZTUNNEL_OUTBOUND_ADDR",
                "0.0.0.0:15001",
            )?,
            inbound_plaintext_addr: setting(
                "inbound plaintext address",
                a.inbound_plaintext_addr,
                env,
                "ZTUNNEL_INBOUND_PLAINTEXT_ADDR",
                "0.0.0.0:15006",
            )?,
            inbound_addr: setting(
                "inbound address",
                a.inbound_addr,
                env,
                "ZTUNNEL_INBOUND_ADDR",
                "0.0.0.0:15008",
            )?,
            pool_max_streams,
            tunnel,
            worker_threads,
            pool_idle_timeout: duration(
                "pool idle timeout",
                a.pool_idle_timeout,
                env,
                "ZTUNNEL_POOL_IDLE_TIMEOUT",
                "5m",
                ms(100),
            )?,
            quic_listen: setting(
                "QUIC listen",
                a.quic_listen,
                env,
                "ZTUNNEL_QUIC_LISTEN",
                "false",
            )?,
            quic_destinations: cidrs(
                "QUIC destinations",
                a.quic_destinations,
                env,
                "ZTUNNEL_QUIC_DESTINATIONS",
            )?,
            connect_timeout: duration(
                "connect timeout",
                a.connect_timeout,
                env,
                "ZTUNNEL_CONNECT_TIMEOUT",
                "10s",
                ms(100),
            )?,
            drain_grace: duration(
                "drain grace",
                a.drain_grace,
                env,
                "ZTUNNEL_DRAIN_GRACE",
                "30s",
                Duration::ZERO,
            )?,
            discovery_poll: duration(
                "discovery poll",
                a.discovery_poll,
                env,
                "ZTUNNEL_DISCOVERY_POLL",
                "1s",
                ms(10),
            )?,
            log_format: setting(
                "log format",
                a.log_format,
                env,
                "ZTUNNEL_LOG_FORMAT",
                "text",
            )?,
            log_filter: log_filter(env),
        })
    }
}

impl fmt::Display for RunConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let discovery = match &self.discovery {
            DiscoverySource::File(file) => format!("file {}", file.display()),
            DiscoverySource::Kubernetes { kubeconfig: None } => "kubernetes (in-cluster)".into(),
            DiscoverySource::Kubernetes {
                kubeconfig: Some(k),
            } => format!("kubernetes (kubeconfig {})", k.display()),
        };
        let ca = match &self.ca {
            CaSource::Dir(d) => format!("in-process from {}", d.display()),
            CaSource::Remote {
                address,
                root_cert,
                server_name,
                token_file,
            } => format!(
                "remote {address} (name {server_name}, root {}, token from {} <redacted>)",
                root_cert.display(),
                token_file.display()
            ),
        };
        write!(
            f,
            "node={} trust_domain={} cluster_id={} root_namespace={} istio_compat={} discovery=[{discovery}] ca=[{ca}] cert_lifetime={} capture={:?} state_dir={} enrolled_namespaces_file={} host_proc={} admin={} metrics={} readiness={} outbound={} inbound_plaintext={} inbound={} pool_max_streams={} max_pending_handshakes={} max_pending_handshakes_per_peer={} tls_first_bytes_timeout={} max_peer_connections_per_address={} max_peer_connections_per_identity={} max_peer_streams_per_address={} max_peer_streams_per_identity={} max_buffered_mib={} pool_idle_timeout={} quic_listen={} quic_destinations=[{}] connect_timeout={} drain_grace={} discovery_poll={} worker_threads={} log_format={:?} log={}",
            self.node_name,
            self.trust_domain,
            self.cluster_id,
            self.root_namespace,
            match &self.istio_root_namespace {
                Some(root) => format!("on (root namespace {root})"),
                None => "off".into(),
            },
            humantime::format_duration(self.cert_lifetime),
            self.capture,
            self.state_dir.display(),
            self.enrolled_namespaces_file.display(),
            self.host_proc.display(),
            self.admin_addr,
            self.metrics_addr,
            self.readiness_addr,
            self.outbound_addr,
            self.inbound_plaintext_addr,
            self.inbound_addr,
            self.pool_max_streams,
            self.tunnel.handshakes.total,
            self.tunnel.handshakes.per_peer,
            humantime::format_duration(self.tunnel.tls_first_bytes_timeout),
            self.tunnel.peers.connections_per_address,
            self.tunnel.peers.connections_per_identity,
            self.tunnel.peers.streams_per_address,
            self.tunnel.peers.streams_per_identity,
            self.tunnel.buffered_bytes >> 20,
            humantime::format_duration(self.pool_idle_timeout),
            self.quic_listen,
            self.quic_destinations
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
            humantime::format_duration(self.connect_timeout),
            humantime::format_duration(self.drain_grace),
            humantime::format_duration(self.discovery_poll),
            self.worker_threads,
            self.log_format,
            self.log_filter,
        )
    }
}

#[cfg(test)]
mod tests;
