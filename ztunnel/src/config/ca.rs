//! `ztunnel ca`'s configuration ([`CaConfig`]): where the signing material lives, who may have
//! which identity, and how much one caller may ask of the CA ([`CaLimits`]); parsed with the
//! helpers of [`super`], flags winning over the environment.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;

use super::{
    count, duration, duration_within, log_filter, required, setting, trust_domain, ConfigError,
    Env, LogFormat,
};
use crate::gate::Limits;

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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AuthorizerKind {
    Static,
    Kubernetes,
}

impl FromStr for AuthorizerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "static" => Ok(AuthorizerKind::Static),
            "kubernetes" => Ok(AuthorizerKind::Kubernetes),
            _ => Err("expected static or kubernetes".into()),
        }
    }
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
    pub server_names: Vec<String>,
    pub authorizer: CaAuthorizer,
    pub max_lifetime: Duration,
    /// What one caller, and all together, may hold or start ([`crate::ca::limits`] enforces it).
    pub limits: CaLimits,
    pub log_format: LogFormat,
    pub log_filter: String,
}

/// `ztunnel ca`: every flag also reads the environment variable named in its help.
#[derive(Parser, Debug)]
#[command(about = "The certificate authority", disable_version_flag = true)]
struct CaArgs {
    /// Plugged-in CA directory (created with a fresh root if empty) [env: ZTUNNEL_CA_DIR]
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// Signing material from this Secret, namespace/name, created if absent and watched [env: ZTUNNEL_CA_SECRET]
    #[arg(long)]
    ca_secret: Option<String>,
    /// Who may have which identity: static (the token file) or kubernetes (TokenReview + pods on the caller's node) [env: ZTUNNEL_CA_AUTHORIZER] [default: static]
    #[arg(long)]
    authorizer: Option<String>,
    /// Audience the daemons' tokens must carry (kubernetes authorizer) [env: ZTUNNEL_CA_TOKEN_AUDIENCE] [default: ztunnel-ca]
    #[arg(long)]
    token_audience: Option<String>,
    /// The node daemon's ServiceAccount, namespace/name (kubernetes authorizer) [env: ZTUNNEL_CA_DAEMON_SERVICE_ACCOUNT] [default: ztunnel-system/ztunnel]
    #[arg(long)]
    daemon_service_account: Option<String>,
    /// Listen address [env: ZTUNNEL_CA_LISTEN] [default: 0.0.0.0:15012]
    #[arg(long)]
    listen: Option<String>,
    /// SPIFFE trust domain [env: TRUST_DOMAIN] [default: cluster.local]
    #[arg(long)]
    trust_domain: Option<String>,
    /// Names in the CA's serving certificate, repeatable [env: ZTUNNEL_CA_SERVER_NAMES, comma-separated] [default: ztunnel-ca.ztunnel-system.svc, localhost]
    #[arg(long = "server-name")]
    server_names: Vec<String>,
    /// File of accepted bearer tokens, one per line (static authorizer) [env: ZTUNNEL_CA_TOKEN_FILE]
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Longest lifetime the CA issues [env: ZTUNNEL_CA_MAX_LIFETIME] [default: 24h]
    #[arg(long)]
    max_lifetime: Option<String>,
    /// Requests one source address may start at once after a quiet spell [env: ZTUNNEL_CA_PEER_REQUEST_BURST] [default: 256]
    #[arg(long)]
    peer_request_burst: Option<String>,
    /// Then requests per second from one source address [env: ZTUNNEL_CA_PEER_REQUEST_RATE] [default: 20]
    #[arg(long)]
    peer_request_rate: Option<String>,
    /// Connections open, in all; beyond, reset before TLS [env: ZTUNNEL_CA_MAX_CONNECTIONS] [default: 4096]
    #[arg(long)]
    max_connections: Option<String>,
    /// Connections open from one source address [env: ZTUNNEL_CA_MAX_CONNECTIONS_PER_PEER] [default: 32]
    #[arg(long)]
    max_connections_per_peer: Option<String>,
    /// Requests being answered (body read), in all; beyond, 429 [env: ZTUNNEL_CA_MAX_REQUESTS_IN_FLIGHT] [default: 1024]
    #[arg(long)]
    max_requests_in_flight: Option<String>,
    /// Requests being answered from one source address [env: ZTUNNEL_CA_MAX_REQUESTS_IN_FLIGHT_PER_PEER] [default: 64]
    #[arg(long)]
    max_requests_in_flight_per_peer: Option<String>,
    /// From accept until the TLS handshake is done and the HTTP/2 preface received, 100ms to 1m [env: ZTUNNEL_CA_HANDSHAKE_TIMEOUT] [default: 10s]
    #[arg(long)]
    handshake_timeout: Option<String>,
    /// A connection with no stream started for this long and none open is closed, 1s to 1d [env: ZTUNNEL_CA_IDLE_TIMEOUT] [default: 60s]
    #[arg(long)]
    idle_timeout: Option<String>,
    /// Log format, text or json [env: ZTUNNEL_LOG_FORMAT] [default: text]
    #[arg(long)]
    log_format: Option<String>,
}

impl CaConfig {
    pub fn from_sources(args: Vec<String>, env: Env<'_>) -> Result<CaConfig, ConfigError> {
        let a = CaArgs::try_parse_from(args)?;
        let mut server_names = a.server_names.clone();
        if server_names.is_empty() {
            server_names = env("ZTUNNEL_CA_SERVER_NAMES")
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_else(|| {
                    vec!["ztunnel-ca.ztunnel-system.svc".into(), "localhost".into()]
                });
        }
        let ca_dir = a
            .ca_dir
            .clone()
            .or_else(|| env("ZTUNNEL_CA_DIR").map(PathBuf::from));
        let ca_secret = a.ca_secret.clone().or_else(|| env("ZTUNNEL_CA_SECRET"));
        let material = match (ca_dir, ca_secret) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Conflict(
                    "--ca-dir and --ca-secret are exclusive: one source of signing material".into(),
                ))
            }
            (Some(dir), None) => CaMaterialSource::Dir(dir),
            (None, secret) => {
                let value = required(
                    secret,
                    "CA directory or secret",
                    "ca-dir or --ca-secret",
                    "ZTUNNEL_CA_DIR or ZTUNNEL_CA_SECRET",
                )?;
                CaMaterialSource::Secret(value.parse().map_err(|reason| ConfigError::Invalid {
                    setting: "CA secret",
                    value,
                    reason,
                })?)
            }
        };
        let token_file = a
            .token_file
            .clone()
            .or_else(|| env("ZTUNNEL_CA_TOKEN_FILE").map(PathBuf::from));
        let authorizer = match setting(
            "authorizer",
            a.authorizer.clone(),
            env,
            "ZTUNNEL_CA_AUTHORIZER",
            "static",
        )? {
            AuthorizerKind::Static => CaAuthorizer::Static {
                token_file: required(
                    token_file,
                    "token file",
                    "token-file",
                    "ZTUNNEL_CA_TOKEN_FILE",
                )?,
            },
            AuthorizerKind::Kubernetes => {
                if token_file.is_some() {
                    return Err(ConfigError::Conflict(
                        "a token file is only for --authorizer static".into(),
                    ));
                }
                let audience: String = setting(
                    "token audience",
                    a.token_audience.clone(),
                    env,
                    "ZTUNNEL_CA_TOKEN_AUDIENCE",
                    "ztunnel-ca",
                )?;
                if audience.is_empty() {
                    return Err(ConfigError::Invalid {
                        setting: "token audience",
                        value: audience,
                        reason: "must not be empty".into(),
                    });
                }
                CaAuthorizer::Kubernetes {
                    audience,
                    daemon_service_account: setting(
                        "daemon service account",
                        a.daemon_service_account.clone(),
                        env,
                        "ZTUNNEL_CA_DAEMON_SERVICE_ACCOUNT",
                        "ztunnel-system/ztunnel",
                    )?,
                }
            }
        };
        Ok(CaConfig {
            material,
            listen: setting(
                "listen address",
                a.listen.clone(),
                env,
                "ZTUNNEL_CA_LISTEN",
                "0.0.0.0:15012",
            )?,
            trust_domain: trust_domain(a.trust_domain.clone(), env)?,
            server_names,
            authorizer,
            max_lifetime: duration(
                "max lifetime",
                a.max_lifetime.clone(),
                env,
                "ZTUNNEL_CA_MAX_LIFETIME",
                "24h",
                Duration::from_secs(2),
            )?,
            limits: ca_limits(&a, env)?,
            log_format: setting(
                "log format",
                a.log_format.clone(),
                env,
                "ZTUNNEL_LOG_FORMAT",
                "text",
            )?,
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
            "{material} listen={} trust_domain={} server_names={:?} authorizer=[{authorizer}] max_lifetime={} peer_request_burst={} peer_request_refill={:?} max_connections={} max_connections_per_peer={} max_requests_in_flight={} max_requests_in_flight_per_peer={} handshake_timeout={} idle_timeout={} log_format={:?} log={}",
            self.listen,
            self.trust_domain,
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

/// The CA's caps: the per-address request rate (a burst and a rate per second), connections
/// and requests in flight (in all and per address, each 1 to 1 000 000, the per-address one no
/// larger than the total), the handshake deadline (100 ms to 1 min) and the idle timeout (1 s
/// to 1 day).
fn ca_limits(a: &CaArgs, env: Env<'_>) -> Result<CaLimits, ConfigError> {
    let d = CaLimits::default();
    let burst = count(
        "peer request burst",
        a.peer_request_burst.clone(),
        env,
        "ZTUNNEL_CA_PEER_REQUEST_BURST",
        d.burst.get(),
        1_000_000,
    )?;
    let default_rate = (Duration::from_secs(1).as_nanos() / d.refill.as_nanos()) as u32;
    let rate = count(
        "peer request rate",
        a.peer_request_rate.clone(),
        env,
        "ZTUNNEL_CA_PEER_REQUEST_RATE",
        default_rate,
        1_000_000,
    )?;
    Ok(CaLimits {
        burst: NonZeroU32::new(burst).expect("checked above"),
        refill: Duration::from_secs(1) / rate,
        connections: caps(
            ("max connections", "max connections per peer"),
            (
                a.max_connections.clone(),
                a.max_connections_per_peer.clone(),
            ),
            env,
            (
                "ZTUNNEL_CA_MAX_CONNECTIONS",
                "ZTUNNEL_CA_MAX_CONNECTIONS_PER_PEER",
            ),
            d.connections,
        )?,
        requests_in_flight: caps(
            ("max requests in flight", "max requests in flight per peer"),
            (
                a.max_requests_in_flight.clone(),
                a.max_requests_in_flight_per_peer.clone(),
            ),
            env,
            (
                "ZTUNNEL_CA_MAX_REQUESTS_IN_FLIGHT",
                "ZTUNNEL_CA_MAX_REQUESTS_IN_FLIGHT_PER_PEER",
            ),
            d.requests_in_flight,
        )?,
        handshake_timeout: duration_within(
            "handshake timeout",
            a.handshake_timeout.clone(),
            env,
            "ZTUNNEL_CA_HANDSHAKE_TIMEOUT",
            &humantime::format_duration(d.handshake_timeout).to_string(),
            (Duration::from_millis(100), Duration::from_secs(60)),
        )?,
        idle_timeout: duration_within(
            "idle timeout",
            a.idle_timeout.clone(),
            env,
            "ZTUNNEL_CA_IDLE_TIMEOUT",
            &humantime::format_duration(d.idle_timeout).to_string(),
            (Duration::from_secs(1), Duration::from_secs(86_400)),
        )?,
        ..d
    })
}

/// A cap in all and per address: each 1 to 1 000 000, the per-address one no larger.
fn caps(
    (total_name, peer_name): (&'static str, &'static str),
    (total, per_peer): (Option<String>, Option<String>),
    env: Env<'_>,
    (total_key, peer_key): (&str, &str),
    default: Limits,
) -> Result<Limits, ConfigError> {
    let total = count(
        total_name,
        total,
        env,
        total_key,
        default.total as u32,
        1_000_000,
    )? as usize;
    let per_peer = count(
        peer_name,
        per_peer,
        env,
        peer_key,
        default.per_peer as u32,
        1_000_000,
    )? as usize;
    if per_peer > total {
        return Err(ConfigError::Invalid {
            setting: peer_name,
            value: per_peer.to_string(),
            reason: format!("must not exceed {total_name} ({total})"),
        });
    }
    Ok(Limits { total, per_peer })
}
