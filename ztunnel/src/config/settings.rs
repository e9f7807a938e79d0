//! What `ztunnel run` and `ztunnel ca` share: how their flags are parsed against an injected
//! environment ([`parse`]), where each value came from ([`Origins`]), the typed value parsers,
//! and the flags both commands take ([`CommonArgs`]).
//!
//! Every flag declares its environment variable (`env = …`) and, where it has one, its static
//! default; `--help` shows both ([`command`]). Parsing never reads the process environment: the
//! values of the injected environment become the defaults of the flags absent from the command
//! line, so a flag wins over its variable, which wins over the static default. An invalid value
//! is refused naming the flag, or the variable when it came from there.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{Arg, Args, Command, CommandFactory, FromArgMatches};

use super::{ConfigError, LogFormat};
use crate::identity::tls::KeyExchange;

/// The environment, as a lookup: the process's in the binary, a table in tests.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The flags of both commands.
#[derive(Args, Debug)]
pub(super) struct CommonArgs {
    /// SPIFFE trust domain
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local", value_parser = trust_domain)]
    pub trust_domain: String,
    /// Key exchanges of every TLS handshake: hybrid (X25519MLKEM768 first, classical groups
    /// accepted) or pqc-only (X25519MLKEM768 only, as Istio's COMPLIANCE_POLICY=pqc)
    #[arg(
        long,
        env = "ZTUNNEL_TLS_KEY_EXCHANGE",
        value_enum,
        default_value = "hybrid"
    )]
    pub tls_key_exchange: KeyExchange,
    /// Log format; the level comes from RUST_LOG
    #[arg(long, env = "ZTUNNEL_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// The log filter: `RUST_LOG`, else `info`.
pub(super) fn log_filter(env: Env<'_>) -> String {
    env("RUST_LOG")
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "info".into())
}

/// `A`'s command as `--help` shows it: each flag with its variable's name (not its value).
pub(super) fn command<A: CommandFactory>() -> Command {
    A::command().mut_args(|a| a.hide_env_values(true))
}

/// The names among `names` (the environment's) that look meant for `A` (they start with
/// `ZTUNNEL_`) but that none of its flags reads: a misspelt or retired setting, which would
/// otherwise be ignored without a word. Kubernetes' service links (`<SERVICE>_SERVICE_HOST`,
/// `<SERVICE>_PORT…`, set in every pod of a namespace that has a Service named `ztunnel…`)
/// are not settings and are left out.
pub(super) fn unknown_variables<A: CommandFactory>(
    names: impl IntoIterator<Item = String>,
) -> Vec<String> {
    let cmd = A::command();
    let known: BTreeSet<&str> = cmd
        .get_arguments()
        .filter_map(|a| a.get_env()?.to_str())
        .collect();
    let service_link = |name: &str| {
        name.contains("_SERVICE_HOST")
            || name.contains("_SERVICE_PORT")
            || name.ends_with("_PORT")
            || name.split("_PORT_").skip(1).any(|rest| {
                rest.split('_')
                    .next()
                    .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            })
    };
    let mut unknown: Vec<String> = names
        .into_iter()
        .filter(|n| n.starts_with("ZTUNNEL_") && !known.contains(n.as_str()) && !service_link(n))
        .collect();
    unknown.sort();
    unknown
}

/// Parses `args` (`args[0]` is the program name) into `A`, the variables read from `env`.
///
/// A first pass parses the command line alone, so that its invalid values are named by their
/// flags and the flags present are known; the second gives every absent flag its variable's
/// value, if set, as its default, so that what fails there came from the environment.
pub(super) fn parse<A: CommandFactory + FromArgMatches>(
    args: &[String],
    env: Env<'_>,
) -> Result<(A, Origins), ConfigError> {
    let shown = command::<A>();
    let flags = shown.clone().mut_args(|a| a.env(None));
    let first = match flags.try_get_matches_from(args) {
        Ok(m) => m,
        // Help, rendered from the command that shows the variables; it is answered before
        // any variable is read.
        Err(e) if e.kind() == ErrorKind::DisplayHelp => {
            return Err(ConfigError::Cli(
                shown.clone().try_get_matches_from(args).err().unwrap_or(e),
            ))
        }
        Err(e) => return Err(invalid_value(e, &shown, &BTreeMap::new())),
    };
    let mut on_command_line = BTreeSet::new();
    let mut from_env = BTreeMap::new();
    let with_env = shown.clone().mut_args(|a| {
        let id = a.get_id().as_str().to_owned();
        let value = if first.value_source(&id) == Some(ValueSource::CommandLine) {
            on_command_line.insert(id.clone());
            None
        } else {
            let key = a.get_env().and_then(|k| k.to_str()).map(str::to_owned);
            key.and_then(|k| env(&k).map(|v| (k, v)))
        };
        let a = a.env(None);
        match value {
            Some((key, value)) => {
                from_env.insert(id, key);
                a.default_value(value)
            }
            None => a,
        }
    });
    let matches = with_env
        .try_get_matches_from(args)
        .map_err(|e| invalid_value(e, &shown, &from_env))?;
    let parsed = A::from_arg_matches(&matches)?;
    Ok((
        parsed,
        Origins {
            cmd: shown,
            on_command_line,
            from_env,
        },
    ))
}

/// A clap error about one value as [`ConfigError::Invalid`], naming the flag or, when the value
/// came from there, the variable; any other error as it is.
fn invalid_value(
    e: clap::Error,
    cmd: &Command,
    from_env: &BTreeMap<String, String>,
) -> ConfigError {
    if !matches!(
        e.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return ConfigError::Cli(e);
    }
    let string = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    // Shown as `--flag <VALUE>`.
    let long = string(ContextKind::InvalidArg).and_then(|shown| {
        let flag = shown.split_whitespace().next()?.strip_prefix("--")?;
        Some(flag.to_owned())
    });
    let arg = long.and_then(|l| cmd.get_arguments().find(|a| a.get_long() == Some(&l)));
    let (Some(arg), Some(value)) = (arg, string(ContextKind::InvalidValue)) else {
        return ConfigError::Cli(e);
    };
    let reason = match (e.kind(), e.get(ContextKind::ValidValue)) {
        (ErrorKind::ValueValidation, _) => std::error::Error::source(&e)
            .map(ToString::to_string)
            .unwrap_or_else(|| "invalid value".into()),
        (_, Some(ContextValue::Strings(valid))) if !valid.is_empty() => {
            format!("must be {}", one_of(valid))
        }
        _ if value.is_empty() => "must not be empty".into(),
        _ => "invalid value".into(),
    };
    let setting = match from_env.get(arg.get_id().as_str()) {
        Some(key) => key.clone(),
        None => flag(arg),
    };
    ConfigError::Invalid {
        setting,
        value,
        reason,
    }
}

/// `a`, `a or b`, `a, b or c`.
fn one_of(values: &[String]) -> String {
    match values {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

fn flag(arg: &Arg) -> String {
    format!("--{}", arg.get_long().unwrap_or(arg.get_id().as_str()))
}

/// Where each parsed value came from, to name settings in the checks that span several.
pub(super) struct Origins {
    cmd: Command,
    on_command_line: BTreeSet<String>,
    /// Argument id → the variable its value came from.
    from_env: BTreeMap<String, String>,
}

impl Origins {
    fn arg(&self, id: &str) -> &Arg {
        self.cmd
            .get_arguments()
            .find(|a| a.get_id() == id)
            .unwrap_or_else(|| panic!("no argument {id}"))
    }

    /// Whether the setting was given, on the command line or in the environment, rather
    /// than left to its default.
    pub(super) fn is_set(&self, id: &str) -> bool {
        self.on_command_line.contains(id) || self.from_env.contains_key(id)
    }

    /// The setting as its value was given: its variable if it came from there, else its flag.
    pub(super) fn name(&self, id: &str) -> String {
        match self.from_env.get(id) {
            Some(key) => key.clone(),
            None => flag(self.arg(id)),
        }
    }

    /// The setting's value refused by a check that spans several.
    pub(super) fn invalid(&self, id: &str, value: impl ToString, reason: String) -> ConfigError {
        ConfigError::Invalid {
            setting: self.name(id),
            value: value.to_string(),
            reason,
        }
    }

    /// A required setting left unset: `name`, with the flags and variables that set it.
    pub(super) fn missing(&self, name: &'static str, ids: &[&str]) -> ConfigError {
        let args: Vec<&Arg> = ids.iter().map(|id| self.arg(id)).collect();
        let join =
            |f: &dyn Fn(&Arg) -> String| args.iter().map(|a| f(a)).collect::<Vec<_>>().join(" or ");
        ConfigError::Missing {
            name,
            flag: join(&flag),
            env: join(&|a| {
                a.get_env()
                    .map(|k| k.to_string_lossy().into_owned())
                    .unwrap_or_default()
            }),
        }
    }
}

/// A cap in all and per peer, the per-peer one no larger: `(value, argument id)` each.
pub(super) fn caps(
    origins: &Origins,
    (total, total_id): (u32, &str),
    (per_peer, per_peer_id): (u32, &str),
) -> Result<crate::gate::Limits, ConfigError> {
    if per_peer > total {
        return Err(origins.invalid(
            per_peer_id,
            per_peer,
            format!("must not exceed {} ({total})", origins.name(total_id)),
        ));
    }
    Ok(crate::gate::Limits {
        total: total as usize,
        per_peer: per_peer as usize,
    })
}

// The value parsers. Each is a function of the text, or returns one for given bounds, and
// says what is wrong in words that follow the setting's name.

/// A whole number from 1 to `max`.
pub(super) fn count(max: u32) -> impl Fn(&str) -> Result<u32, String> + Clone + Send + Sync {
    move |s| {
        let n: u32 = s
            .parse()
            .map_err(|e: std::num::ParseIntError| e.to_string())?;
        if !(1..=max).contains(&n) {
            return Err(format!("must be 1 to {max}"));
        }
        Ok(n)
    }
}

/// A duration (`24h`, `5m`, `10s`, `500ms`, …) from `min` to `max`.
pub(super) fn duration(
    min: Duration,
    max: Duration,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync {
    move |s| {
        let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
        if d < min {
            return Err(format!(
                "must be at least {}",
                humantime::format_duration(min)
            ));
        }
        if d > max {
            return Err(format!(
                "must be at most {}",
                humantime::format_duration(max)
            ));
        }
        Ok(d)
    }
}

/// A duration of at least `min` (and at most [`LONGEST`]).
pub(super) fn at_least(
    min: Duration,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync {
    duration(min, LONGEST)
}

/// The longest duration a setting takes: ten years (of 365.25 days, as durations are read),
/// far beyond any use, and far from the overflow of a deadline computed from it.
const LONGEST: Duration = Duration::from_secs(315_576_000);

/// A comma-separated list of CIDRs (a bare IP is its own /32 or /128); empty is none.
pub(super) fn cidrs(s: &str) -> Result<Vec<ipnet::IpNet>, String> {
    list(s)
        .map(|p| {
            p.parse::<ipnet::IpNet>()
                .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| format!("{p:?} is not a CIDR or an IP address"))
        })
        .collect()
}

/// A comma-separated list of namespace names; empty is none.
pub(super) fn namespaces(s: &str) -> Result<Vec<String>, String> {
    list(s)
        .map(|n| namespace(n).map_err(|e| format!("{n:?}: {e}")))
        .collect()
}

/// A comma-separated list of names; empty is none.
pub(super) fn names(s: &str) -> Result<Vec<String>, String> {
    Ok(list(s).map(str::to_owned).collect())
}

fn list(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|p| !p.is_empty())
}

/// A path, as given: any text, the empty one too (the variable of a setting that the chosen
/// mode leaves unused, such as `KUBECONFIG` with a discovery file, is not refused).
pub(super) fn path(s: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(s))
}

/// An address on loopback.
pub(super) fn loopback(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s
        .parse()
        .map_err(|e: std::net::AddrParseError| e.to_string())?;
    if !addr.ip().is_loopback() {
        return Err("the admin API is served on loopback only".into());
    }
    Ok(addr)
}

/// A SPIFFE trust domain.
pub(super) fn trust_domain(s: &str) -> Result<String, String> {
    crate::identity::Identity::new(s, "x", "y").map_err(|e| e.to_string())?;
    Ok(s.to_owned())
}

/// A namespace name (a DNS-1123 label).
pub(super) fn namespace(s: &str) -> Result<String, String> {
    let label = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if !label {
        return Err("not a namespace name (a DNS-1123 label)".into());
    }
    Ok(s.to_owned())
}

/// A DNS domain (a cluster's, `cluster.local`): dot-separated DNS-1123 labels, at most 253
/// characters.
pub(super) fn dns_domain(s: &str) -> Result<String, String> {
    let ok = s.len() <= 253 && s.split('.').all(|l| namespace(l).is_ok());
    if !ok {
        return Err("not a DNS domain (lowercase DNS-1123 labels joined by dots)".into());
    }
    Ok(s.to_owned())
}

/// A label value: non-empty printable ASCII without spaces.
pub(super) fn label_value(s: &str) -> Result<String, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be non-empty printable ASCII without spaces".into());
    }
    Ok(s.to_owned())
}

/// Any text but the empty one.
pub(super) fn non_empty(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    Ok(s.to_owned())
}
