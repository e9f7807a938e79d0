//! Configuration of `ztunnel run` ([`RunConfig`]) and `ztunnel ca` ([`CaConfig`], in
//! `config/ca.rs`), each parsed once from flags and environment variables and validated before
//! anything starts. Each flag declares its variable, default and typed parser;
//! `config/settings.rs` parses (a flag wins over its variable, which wins over the default) and
//! holds what both commands share; `from_sources` checks what spans several flags.
//!
//! The environment is injected ([`Env`]), so tests never touch the process environment. Every
//! setting is printed at start by `Display`; the CA token is never read into the configuration
//! (only its path), so there is no secret to leak.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};

use crate::identity::tls::KeyExchange;

mod ca;
mod settings;
mod tunnel;
pub use ca::{CaAuthorizer, CaConfig, CaLimits, CaMaterialSource, NamespacedName};
pub use settings::Env;
use settings::{
    at_least, cidrs, count, dns_domain, label_value, log_filter, loopback, namespace, namespaces,
    path, CommonArgs,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Cli(#[from] clap::Error),
    /// A required setting left unset: what it is, its flags and its variables.
    #[error("{name} is required (flag {flag} or environment {env})")]
    Missing {
        name: &'static str,
        flag: String,
        env: String,
    },
    /// A refused value, with the flag or the variable it came from.
    #[error("invalid {setting} {value:?}: {reason}")]
    Invalid {
        setting: String,
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

/// The format of the daemon's log lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the proxies' listeners live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CaptureMode {
    /// Inside each enrolled pod's netns, enrolled by the CNI plugin (the product).
    #[value(name = "inpod")]
    InPod,
    /// On the node's own addresses (`--outbound-addr` …), serving every local workload; for
    /// tests and setups whose capture rules are installed by someone else.
    Node,
}

/// Settings of the node daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunConfig {
    pub node_name: String,
    pub trust_domain: String,
    /// The key exchanges of every TLS handshake (tunnels both ways, the remote CA, the
    /// Kubernetes API).
    pub tls_key_exchange: KeyExchange,
    /// The cluster's id, as Istio's telemetry reports it (`*_cluster` labels).
    pub cluster_id: String,
    /// The cluster's DNS domain, in service hostnames (tunnel requests naming a service,
    /// Istio's `destination_service` label).
    pub cluster_domain: String,
    /// Namespaces whose pods are never enrolled, whatever their labels.
    pub exclude_namespaces: Vec<String>,
    /// Policies in this namespace apply to the whole mesh.
    pub root_namespace: String,
    /// The Istio-compatible setting (cluster mode only), with Istio's root namespace: the
    /// daemon also reads `security.istio.io/v1` policies and honours the
    /// `istio.io/dataplane-mode` labels. `None`: off.
    pub istio_root_namespace: Option<String>,
    pub discovery: DiscoverySource,
    pub ca: CaSource,
    pub cert_lifetime: Duration,
    /// The certificate revocation lists' file, read again when it changes; `None`: no lists.
    pub crl_path: Option<PathBuf>,
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

/// Where discovery comes from, as `--discovery-source` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum DiscoveryKind {
    File,
    Kubernetes,
}

/// `ztunnel run`'s flags, each also read from the environment variable its help names.
#[derive(Parser, Debug)]
#[command(about = "The node daemon", disable_version_flag = true)]
struct RunArgs {
    /// This node's name (required)
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    #[command(flatten)]
    common: CommonArgs,
    /// The cluster's id in Istio's telemetry (the source_cluster and destination_cluster labels)
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes", value_parser = label_value)]
    cluster_id: String,
    /// The cluster's DNS domain: service hostnames are `<name>.<namespace>.svc.<domain>`
    #[arg(long, env = "CLUSTER_DOMAIN", default_value = crate::discovery::DEFAULT_CLUSTER_DOMAIN,
          value_parser = dns_domain)]
    cluster_domain: String,
    /// Namespaces whose pods are never enrolled, whatever their labels (comma-separated; empty
    /// for none): the cluster's own and the mesh's CA. The CNI installer's
    /// `--exclude-namespaces` must name the same
    // Spelt `std::vec::Vec` so that clap takes the whole list as one value.
    #[arg(long, env = "ZTUNNEL_EXCLUDE_NAMESPACES", default_value = "kube-system,ztunnel-system",
          value_parser = namespaces)]
    exclude_namespaces: std::vec::Vec<String>,
    /// The namespace whose policies apply to the whole mesh
    #[arg(long, env = "ZTUNNEL_ROOT_NAMESPACE", default_value = crate::policy::ROOT_NAMESPACE,
          value_parser = namespace)]
    root_namespace: String,
    /// Also read Istio's policies (security.istio.io/v1) and istio.io/dataplane-mode labels, for
    /// clusters moving from Istio; needs --discovery-source kubernetes
    #[arg(long, env = "ZTUNNEL_ISTIO_COMPAT", action = ArgAction::Set, default_value_t = false)]
    istio_compat: bool,
    /// Istio's root namespace, whose policies apply to the whole mesh too, under --istio-compat
    #[arg(long, env = "ZTUNNEL_ISTIO_ROOT_NAMESPACE", default_value = "istio-system",
          value_parser = namespace)]
    istio_root_namespace: String,
    /// The local discovery file (YAML), required with --discovery-source file
    #[arg(long, env = "ZTUNNEL_DISCOVERY_FILE", value_parser = path)]
    discovery_file: Option<PathBuf>,
    /// Where discovery comes from
    #[arg(
        long,
        env = "ZTUNNEL_DISCOVERY_SOURCE",
        value_enum,
        default_value = "file"
    )]
    discovery_source: DiscoveryKind,
    /// The kubeconfig for --discovery-source kubernetes; unset: in-cluster
    #[arg(long, env = "KUBECONFIG", value_parser = path)]
    kubeconfig: Option<PathBuf>,
    /// In-process CA from this plugged-in CA directory, unless --ca-address
    #[arg(long, env = "ZTUNNEL_CA_DIR", default_value = "/var/lib/ztunnel/ca", value_parser = path)]
    ca_dir: PathBuf,
    /// host:port of a remote `ztunnel ca`
    #[arg(long, env = "ZTUNNEL_CA_ADDRESS")]
    ca_address: Option<String>,
    /// PEM root that the remote CA's certificate must chain to
    #[arg(long, env = "ZTUNNEL_CA_ROOT_CERT", value_parser = path)]
    ca_root_cert: Option<PathBuf>,
    /// Name the remote CA's certificate must carry
    #[arg(
        long,
        env = "ZTUNNEL_CA_SERVER_NAME",
        default_value = "ztunnel-ca.ztunnel-system.svc"
    )]
    ca_server_name: String,
    /// File holding the bearer token for the remote CA
    #[arg(long, env = "ZTUNNEL_CA_TOKEN_FILE", value_parser = path)]
    ca_token_file: Option<PathBuf>,
    /// Certificate revocation lists (PEM or DER) that peers' chains are checked against,
    /// read again when the file changes; unset: none
    #[arg(long, env = "ZTUNNEL_CRL_PATH", value_parser = path)]
    crl_path: Option<PathBuf>,
    /// Workload certificate lifetime, renewed at half-life
    #[arg(long, env = "ZTUNNEL_CERT_LIFETIME", default_value = "24h",
          value_parser = at_least(Duration::from_secs(2)))]
    cert_lifetime: Duration,
    /// Where the proxies' listeners live
    #[arg(
        long,
        env = "ZTUNNEL_CAPTURE_MODE",
        value_enum,
        default_value = "inpod"
    )]
    capture_mode: CaptureMode,
    /// Enrollment socket and enrolled pods' records
    #[arg(long, env = "ZTUNNEL_STATE_DIR", default_value = "/var/run/ztunnel", value_parser = path)]
    state_dir: PathBuf,
    /// The enrolled-namespaces file the CNI plugin reads while the daemon is down; unset: in
    /// the state directory
    #[arg(long, env = "ZTUNNEL_ENROLLED_NAMESPACES_FILE", value_parser = path)]
    enrolled_namespaces_file: Option<PathBuf>,
    /// The host's /proc, where running pods' netns are found
    #[arg(long, env = "ZTUNNEL_HOST_PROC", default_value = "/proc", value_parser = path)]
    host_proc: PathBuf,
    /// Admin API address, loopback only
    #[arg(long, env = "ZTUNNEL_ADMIN_ADDR", default_value = "127.0.0.1:15000",
          value_parser = loopback)]
    admin_addr: SocketAddr,
    /// Prometheus metrics address; [::] is both families
    #[arg(long, env = "ZTUNNEL_METRICS_ADDR", default_value = "[::]:15020")]
    metrics_addr: SocketAddr,
    /// Readiness address; [::] is both families
    #[arg(long, env = "ZTUNNEL_READINESS_ADDR", default_value = "[::]:15021")]
    readiness_addr: SocketAddr,
    /// Outbound capture listener
    #[arg(long, env = "ZTUNNEL_OUTBOUND_ADDR", default_value = "0.0.0.0:15001")]
    outbound_addr: SocketAddr,
    /// Inbound plaintext listener
    #[arg(
        long,
        env = "ZTUNNEL_INBOUND_PLAINTEXT_ADDR",
        default_value = "0.0.0.0:15006"
    )]
    inbound_plaintext_addr: SocketAddr,
    /// Inbound tunnel (HBONE) listener
    #[arg(long, env = "ZTUNNEL_INBOUND_ADDR", default_value = "0.0.0.0:15008")]
    inbound_addr: SocketAddr,
    /// Streams per pooled tunnel connection
    #[arg(long, env = "ZTUNNEL_POOL_MAX_STREAMS", default_value_t = 100,
          value_parser = count(10_000))]
    pool_max_streams: u32,
    #[command(flatten)]
    tunnel: tunnel::TunnelArgs,
    /// Idle pooled connections close after
    #[arg(long, env = "ZTUNNEL_POOL_IDLE_TIMEOUT", default_value = "5m",
          value_parser = at_least(Duration::from_millis(100)))]
    pool_idle_timeout: Duration,
    /// Worker threads of the daemon's runtime
    #[arg(long, env = "ZTUNNEL_WORKER_THREADS", default_value_t = 2, value_parser = count(1024))]
    worker_threads: u32,
    /// Also accept tunnels on QUIC, UDP on the inbound tunnel port
    #[arg(long, env = "ZTUNNEL_QUIC_LISTEN", action = ArgAction::Set, default_value_t = false)]
    quic_listen: bool,
    /// Destinations (comma-separated CIDRs or IPs) whose tunnels are tried on QUIC first,
    /// falling back to HTTP/2; unset or empty: none
    // Spelt `std::vec::Vec` so that clap takes the whole list as one value.
    #[arg(long, env = "ZTUNNEL_QUIC_DESTINATIONS", value_parser = cidrs)]
    quic_destinations: Option<std::vec::Vec<ipnet::IpNet>>,
    /// Timeout of outgoing connects and handshakes; a tunnel stream's request waits twice this
    /// for its answer
    #[arg(long, env = "ZTUNNEL_CONNECT_TIMEOUT", default_value = "10s",
          value_parser = at_least(Duration::from_millis(100)))]
    connect_timeout: Duration,
    /// How long established connections may drain on SIGTERM
    #[arg(long, env = "ZTUNNEL_DRAIN_GRACE", default_value = "30s",
          value_parser = at_least(Duration::ZERO))]
    drain_grace: Duration,
    /// How often the discovery file is checked
    #[arg(long, env = "ZTUNNEL_DISCOVERY_POLL", default_value = "1s",
          value_parser = at_least(Duration::from_millis(10)))]
    discovery_poll: Duration,
}

impl RunConfig {
    /// The namespaces whose policies apply to the whole mesh: ours, then Istio's under the
    /// Istio-compatible setting.
    pub fn root_namespaces(&self) -> Vec<&str> {
        std::iter::once(self.root_namespace.as_str())
            .chain(self.istio_root_namespace.as_deref())
            .collect()
    }

    /// The environment's `ZTUNNEL_…` variables (of `names`) that no setting of `run` reads
    /// (misspelt or retired settings, not Kubernetes service links): the daemon warns of each
    /// at start.
    pub fn unknown_variables(names: impl IntoIterator<Item = String>) -> Vec<String> {
        settings::unknown_variables::<RunArgs>(names)
    }

    /// Parses `args` (`args[0]` is the program name) with `env` as the environment.
    pub fn from_sources(args: Vec<String>, env: Env<'_>) -> Result<RunConfig, ConfigError> {
        let (a, origins) = settings::parse::<RunArgs>(&args, env)?;
        let node_name = a
            .node_name
            .ok_or_else(|| origins.missing("node name", &["node_name"]))?;
        let discovery = match a.discovery_source {
            DiscoveryKind::File => DiscoverySource::File(
                a.discovery_file
                    .ok_or_else(|| origins.missing("discovery file", &["discovery_file"]))?,
            ),
            DiscoveryKind::Kubernetes => {
                if a.discovery_file.is_some() {
                    return Err(ConfigError::Conflict(
                        "--discovery-file is for --discovery-source file, not kubernetes".into(),
                    ));
                }
                DiscoverySource::Kubernetes {
                    kubeconfig: a.kubeconfig,
                }
            }
        };
        // Istio's objects and labels live on the API server.
        let istio_root_namespace = match (a.istio_compat, &discovery) {
            (false, _) if origins.is_set("istio_root_namespace") => {
                return Err(ConfigError::Conflict(
                    "--istio-root-namespace is for --istio-compat true".into(),
                ))
            }
            (false, _) => None,
            (true, DiscoverySource::File(_)) => return Err(ConfigError::Conflict(
                "--istio-compat reads Istio's objects and labels from the API server: it needs --discovery-source kubernetes".into(),
            )),
            (true, DiscoverySource::Kubernetes { .. }) => Some(a.istio_root_namespace),
        };
        let ca =
            match a.ca_address {
                Some(_) if origins.is_set("ca_dir") => return Err(ConfigError::Conflict(
                    "--ca-dir and --ca-address are exclusive: sign in-process or ask a remote CA"
                        .into(),
                )),
                None => CaSource::Dir(a.ca_dir),
                Some(address) => CaSource::Remote {
                    address,
                    root_cert: a
                        .ca_root_cert
                        .ok_or_else(|| origins.missing("CA root certificate", &["ca_root_cert"]))?,
                    server_name: a.ca_server_name,
                    token_file: a
                        .ca_token_file
                        .ok_or_else(|| origins.missing("CA token file", &["ca_token_file"]))?,
                },
            };
        let enrolled_namespaces_file = a
            .enrolled_namespaces_file
            .unwrap_or_else(|| a.state_dir.join(crate::capture::store::NAMESPACES_FILE));
        Ok(RunConfig {
            node_name,
            trust_domain: a.common.trust_domain,
            tls_key_exchange: a.common.tls_key_exchange,
            cluster_id: a.cluster_id,
            cluster_domain: a.cluster_domain,
            exclude_namespaces: a.exclude_namespaces,
            root_namespace: a.root_namespace,
            istio_root_namespace,
            discovery,
            ca,
            cert_lifetime: a.cert_lifetime,
            crl_path: a.crl_path,
            capture: a.capture_mode,
            state_dir: a.state_dir,
            enrolled_namespaces_file,
            host_proc: a.host_proc,
            admin_addr: a.admin_addr,
            metrics_addr: a.metrics_addr,
            readiness_addr: a.readiness_addr,
            outbound_addr: a.outbound_addr,
            inbound_plaintext_addr: a.inbound_plaintext_addr,
            inbound_addr: a.inbound_addr,
            pool_max_streams: a.pool_max_streams,
            tunnel: a.tunnel.resolve(&origins)?,
            pool_idle_timeout: a.pool_idle_timeout,
            quic_listen: a.quic_listen,
            quic_destinations: a.quic_destinations.unwrap_or_default(),
            connect_timeout: a.connect_timeout,
            drain_grace: a.drain_grace,
            discovery_poll: a.discovery_poll,
            log_format: a.common.log_format,
            log_filter: log_filter(env),
            worker_threads: a.worker_threads as usize,
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
            "node={} trust_domain={} tls_key_exchange={} cluster_id={} cluster_domain={} exclude_namespaces=[{}] root_namespace={} istio_compat={} discovery=[{discovery}] ca=[{ca}] cert_lifetime={} crl={} capture={:?} state_dir={} enrolled_namespaces_file={} host_proc={} admin={} metrics={} readiness={} outbound={} inbound_plaintext={} inbound={} pool_max_streams={} max_pending_handshakes={} max_pending_handshakes_per_peer={} tls_first_bytes_timeout={} max_peer_connections_per_address={} max_peer_connections_per_identity={} max_peer_streams_per_address={} max_peer_streams_per_identity={} max_buffered_mib={} max_connections_per_source={} max_proxied_connections={} pool_idle_timeout={} quic_listen={} quic_destinations=[{}] connect_timeout={} drain_grace={} discovery_poll={} worker_threads={} log_format={:?} log={}",
            self.node_name,
            self.trust_domain,
            self.tls_key_exchange,
            self.cluster_id,
            self.cluster_domain,
            self.exclude_namespaces.join(","),
            self.root_namespace,
            match &self.istio_root_namespace {
                Some(root) => format!("on (root namespace {root})"),
                None => "off".into(),
            },
            humantime::format_duration(self.cert_lifetime),
            self.crl_path
                .as_deref()
                .map_or("none".into(), |p| p.display().to_string()),
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
            self.tunnel.connections_per_source,
            self.tunnel.proxied_connections,
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
