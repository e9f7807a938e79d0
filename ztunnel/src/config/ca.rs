//! `ztunnel ca`'s configuration ([`CaConfig`]): where the signing material lives, who may have
//! which identity, and how much one caller may ask of the CA ([`CaLimits`]). Its flags are
//! parsed by [`super::settings`] (a flag wins over its environment variable, which wins over
//! the default), typed and bounded by their parsers; [`CaConfig::from_sources`] checks what
//! spans several flags.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;

use super::settings::{
    self, at_least, caps, count, duration, log_filter, names, non_empty, path, CommonArgs, Env,
};
use super::{ConfigError, LogFormat};
use crate::gate::Limits;
use crate::identity::tls::KeyExchange;

/// The CA's caps; [`Default`] is what `ztunnel ca` runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaLimits {
    pub connections: Limits,
    pub streams_per_connection: u32,
    pub requests_in_flight: Limits,
    /// Requests one address may start at once after a quiet spell.
    pub burst: NonZeroU32,
    /// Then one more per this period.
    pub refill: Duration,
    /// From accept until the TLS handshake is done and the HTTP/2 client preface read.
    pub handshake_timeout: Duration,
    /// A connection on which no stream has started for this long, and none is open, is closed.
    pub idle_timeout: Duration,
    /// To send a request's whole body (from its headers); then, again, to answer it.
    pub request_timeout: Duration,
}

impl Default for CaLimits {
    /// A node's daemon asks for at most one certificate per identity on the node at once (a
    /// few hundred on a full node), over one connection.
    fn default() -> Self {
        CaLimits {
            connections: Limits {
                total: 4096,
                per_peer: 32,
            },
            streams_per_connection: 64,
            requests_in_flight: Limits {
                total: 1024,
                per_peer: 64,
            },
            burst: NonZeroU32::new(256).expect("non-zero"),
            refill: Duration::from_millis(50),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// `namespace/name` of a Kubernetes object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespacedName {
    pub namespace: String,
    pub name: String,
}

impl FromStr for NamespacedName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let valid = |p: &str| {
            !p.is_empty()
                && p.len() <= 253
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b))
        };
        match s.split_once('/') {
            Some((ns, name)) if valid(ns) && valid(name) => Ok(NamespacedName {
                namespace: ns.into(),
                name: name.into(),
            }),
            _ => Err("expected namespace/name (lowercase DNS names)".into()),
        }
    }
}

impl fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Where the CA's signing material lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaMaterialSource {
    /// A plugged-in CA directory (created with a fresh root if empty).
    Dir(PathBuf),
    /// A Secret in the same layout, read and watched through the API (created if absent).
    Secret(NamespacedName),
}

/// The `--authorizer` choices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum AuthorizerKind {
    Static,
    Kubernetes,
}

/// Who may have which identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaAuthorizer {
    /// Holders of a token from this file (one per line) may have any identity.
    Static { token_file: PathBuf },
    /// Node daemons, by their projected ServiceAccount token (TokenReview), for the
    /// ServiceAccounts of the active (Pending or Running) pods on their node.
    Kubernetes {
        audience: String,
        daemon_service_account: NamespacedName,
    },
}

/// Settings of the certificate authority.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaConfig {
    pub material: CaMaterialSource,
    pub listen: SocketAddr,
    pub trust_domain: String,
    /// The key exchanges of the CA's TLS handshakes.
    pub tls_key_exchange: KeyExchange,
    pub server_names: Vec<String>,
    pub authorizer: CaAuthorizer,
    pub max_lifetime: Duration,
    /// What one caller, and all together, may hold or start ([`crate::ca::limits`] enforces it).
    pub limits: CaLimits,
    pub log_format: LogFormat,
    pub log_filter: String,
}

/// `ztunnel ca`'s flags, each also read from the environment variable its help names.
#[derive(Parser, Debug)]
#[command(about = "The certificate authority", disable_version_flag = true)]
pub(super) struct CaArgs {
    /// Plugged-in CA directory (created with a fresh root if empty)
    #[arg(long, env = "ZTUNNEL_CA_DIR", value_parser = path)]
    ca_dir: Option<PathBuf>,
    /// Signing material from this Secret, namespace/name, created if absent and watched
    #[arg(long, env = "ZTUNNEL_CA_SECRET")]
    ca_secret: Option<NamespacedName>,
    /// Who may have which identity: static (the token file) or kubernetes (TokenReview + pods
    /// on the caller's node)
    #[arg(
        long,
        env = "ZTUNNEL_CA_AUTHORIZER",
        value_enum,
        default_value = "static"
    )]
    authorizer: AuthorizerKind,
    /// Audience the daemons' tokens must carry (kubernetes authorizer)
    #[arg(long, env = "ZTUNNEL_CA_TOKEN_AUDIENCE", default_value = "ztunnel-ca",
          value_parser = non_empty)]
    token_audience: String,
    /// The node daemon's ServiceAccount, namespace/name (kubernetes authorizer)
    #[arg(
        long,
        env = "ZTUNNEL_CA_DAEMON_SERVICE_ACCOUNT",
        default_value = "ztunnel-system/ztunnel"
    )]
    daemon_service_account: NamespacedName,
    /// Listen address
    #[arg(long, env = "ZTUNNEL_CA_LISTEN", default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    #[command(flatten)]
    common: CommonArgs,
    /// Names in the CA's serving certificate, repeatable or comma-separated
    // Spelt `std::vec::Vec` so that clap takes each occurrence's list as one value.
    #[arg(long = "server-name", env = "ZTUNNEL_CA_SERVER_NAMES", value_parser = names,
          default_value = "ztunnel-ca.ztunnel-system.svc,localhost")]
    server_names: Vec<std::vec::Vec<String>>,
    /// File of accepted bearer tokens, one per line (static authorizer)
    #[arg(long, env = "ZTUNNEL_CA_TOKEN_FILE", value_parser = path)]
    token_file: Option<PathBuf>,
    /// Longest lifetime the CA issues
    #[arg(long, env = "ZTUNNEL_CA_MAX_LIFETIME", default_value = "24h",
          value_parser = at_least(Duration::from_secs(2)))]
    max_lifetime: Duration,
    /// Requests one source address may start at once after a quiet spell
    #[arg(long, env = "ZTUNNEL_CA_PEER_REQUEST_BURST", value_parser = count(MILLION),
          default_value_t = CaLimits::default().burst.get())]
    peer_request_burst: u32,
    /// Then requests per second from one source address
    #[arg(long, env = "ZTUNNEL_CA_PEER_REQUEST_RATE", value_parser = count(MILLION),
          default_value_t = per_second(CaLimits::default().refill))]
    peer_request_rate: u32,
    /// Connections open, in all; beyond, reset before TLS
    #[arg(long, env = "ZTUNNEL_CA_MAX_CONNECTIONS", value_parser = count(MILLION),
          default_value_t = CaLimits::default().connections.total as u32)]
    max_connections: u32,
    /// Connections open from one source address
    #[arg(long, env = "ZTUNNEL_CA_MAX_CONNECTIONS_PER_PEER", value_parser = count(MILLION),
          default_value_t = CaLimits::default().connections.per_peer as u32)]
    max_connections_per_peer: u32,
    /// Requests being answered (body read), in all; beyond, 429
    #[arg(long, env = "ZTUNNEL_CA_MAX_REQUESTS_IN_FLIGHT", value_parser = count(MILLION),
          default_value_t = CaLimits::default().requests_in_flight.total as u32)]
    max_requests_in_flight: u32,
    /// Requests being answered from one source address
    #[arg(long, env = "ZTUNNEL_CA_MAX_REQUESTS_IN_FLIGHT_PER_PEER", value_parser = count(MILLION),
          default_value_t = CaLimits::default().requests_in_flight.per_peer as u32)]
    max_requests_in_flight_per_peer: u32,
    /// From accept until the TLS handshake is done and the HTTP/2 preface received, 100ms to 1m
    #[arg(long, env = "ZTUNNEL_CA_HANDSHAKE_TIMEOUT", default_value = "10s",
          value_parser = duration(Duration::from_millis(100), Duration::from_secs(60)))]
    handshake_timeout: Duration,
    /// A connection with no stream started for this long and none open is closed, 1s to 1d
    #[arg(long, env = "ZTUNNEL_CA_IDLE_TIMEOUT", default_value = "60s",
          value_parser = duration(Duration::from_secs(1), Duration::from_secs(86_400)))]
    idle_timeout: Duration,
}

const MILLION: u32 = 1_000_000;

/// How many `period`s fit in a second.
fn per_second(period: Duration) -> u32 {
    (Duration::from_secs(1).as_nanos() / period.as_nanos()) as u32
}

impl CaConfig {
    /// The environment's `ZTUNNEL_…` variables (of `names`) that no setting of `ca` reads.
    pub fn unknown_variables(names: impl IntoIterator<Item = String>) -> Vec<String> {
        settings::unknown_variables::<CaArgs>(names)
    }

    /// Parses `args` (`args[0]` is the program name) with `env` as the environment.
    pub fn from_sources(args: Vec<String>, env: Env<'_>) -> Result<CaConfig, ConfigError> {
        let (a, origins) = settings::parse::<CaArgs>(&args, env)?;
        let material = match (a.ca_dir, a.ca_secret) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Conflict(
                    "--ca-dir and --ca-secret are exclusive: one source of signing material".into(),
                ))
            }
            (Some(dir), None) => CaMaterialSource::Dir(dir),
            (None, Some(secret)) => CaMaterialSource::Secret(secret),
            (None, None) => {
                return Err(origins.missing("CA directory or secret", &["ca_dir", "ca_secret"]))
            }
        };
        let authorizer = match a.authorizer {
            AuthorizerKind::Static => CaAuthorizer::Static {
                token_file: a
                    .token_file
                    .ok_or_else(|| origins.missing("token file", &["token_file"]))?,
            },
            AuthorizerKind::Kubernetes => {
                if a.token_file.is_some() {
                    return Err(ConfigError::Conflict(
                        "a token file is only for --authorizer static".into(),
                    ));
                }
                CaAuthorizer::Kubernetes {
                    audience: a.token_audience,
                    daemon_service_account: a.daemon_service_account,
                }
            }
        };
        let limits = CaLimits {
            burst: NonZeroU32::new(a.peer_request_burst).expect("at least 1 by its parser"),
            refill: Duration::from_secs(1) / a.peer_request_rate,
            connections: caps(
                &origins,
                (a.max_connections, "max_connections"),
                (a.max_connections_per_peer, "max_connections_per_peer"),
            )?,
            requests_in_flight: caps(
                &origins,
                (a.max_requests_in_flight, "max_requests_in_flight"),
                (
                    a.max_requests_in_flight_per_peer,
                    "max_requests_in_flight_per_peer",
                ),
            )?,
            handshake_timeout: a.handshake_timeout,
            idle_timeout: a.idle_timeout,
            ..CaLimits::default()
        };
        Ok(CaConfig {
            material,
            listen: a.listen,
            trust_domain: a.common.trust_domain,
            tls_key_exchange: a.common.tls_key_exchange,
            server_names: a.server_names.concat(),
            authorizer,
            max_lifetime: a.max_lifetime,
            limits,
            log_format: a.common.log_format,
            log_filter: log_filter(env),
        })
    }
}

impl fmt::Display for CaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let material = match &self.material {
            CaMaterialSource::Dir(d) => format!("ca_dir={}", d.display()),
            CaMaterialSource::Secret(s) => format!("ca_secret={s}"),
        };
        let authorizer = match &self.authorizer {
            CaAuthorizer::Static { token_file } => {
                format!("static token_file={} <redacted>", token_file.display())
            }
            CaAuthorizer::Kubernetes {
                audience,
                daemon_service_account,
            } => format!(
                "kubernetes audience={audience} daemon_service_account={daemon_service_account}"
            ),
        };
        write!(
            f,
            "{material} listen={} trust_domain={} tls_key_exchange={} server_names={:?} authorizer=[{authorizer}] max_lifetime={} peer_request_burst={} peer_request_refill={:?} max_connections={} max_connections_per_peer={} max_requests_in_flight={} max_requests_in_flight_per_peer={} handshake_timeout={} idle_timeout={} log_format={:?} log={}",
            self.listen,
            self.trust_domain,
            self.tls_key_exchange,
            self.server_names,
            humantime::format_duration(self.max_lifetime),
            self.limits.burst,
            self.limits.refill,
            self.limits.connections.total,
            self.limits.connections.per_peer,
            self.limits.requests_in_flight.total,
            self.limits.requests_in_flight.per_peer,
            humantime::format_duration(self.limits.handshake_timeout),
            humantime::format_duration(self.limits.idle_timeout),
            self.log_format,
            self.log_filter
        )
    }
}
