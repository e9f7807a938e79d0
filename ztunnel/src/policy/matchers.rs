//! The compiled forms of policy fields: string matchers with Istio's `*` wildcards, address
//! blocks and ports, each parsed once when discovery changes so that a decision does no
//! parsing.

use std::net::IpAddr;

use ipnet::IpNet;

/// A principal or namespace pattern: exact, `prefix*`, `*suffix`, or `*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Any,
}

impl StrMatch {
    pub fn parse(s: &str) -> StrMatch {
        if s == "*" {
            StrMatch::Any
        } else if let Some(p) = s.strip_suffix('*') {
            StrMatch::Prefix(p.to_owned())
        } else if let Some(p) = s.strip_prefix('*') {
            StrMatch::Suffix(p.to_owned())
        } else {
            StrMatch::Exact(s.to_owned())
        }
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(e) => v == e,
            StrMatch::Prefix(p) => v.starts_with(p.as_str()),
            StrMatch::Suffix(p) => v.ends_with(p.as_str()),
            StrMatch::Any => true,
        }
    }
}

/// A principal as policies write it: the SPIFFE ID without `spiffe://`
/// (`cluster.local/ns/foo/sa/bar`); a leading `spiffe://` is accepted and dropped.
pub fn principal(s: &str) -> StrMatch {
    StrMatch::parse(s.strip_prefix("spiffe://").unwrap_or(s))
}

/// An address block: a CIDR, or one address.
pub fn ip_block(s: &str) -> Result<IpNet, String> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n.trunc());
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("ipBlocks entry {s:?} is not an address or CIDR"))
}

/// A port (`"80"`): 1–65535; Istio writes ports as strings.
pub fn port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("port {s:?} is not a number from 1 to 65535")),
    }
}

/// Whether any of `ms` matches `v`.
pub fn any(ms: &[StrMatch], v: &str) -> bool {
    ms.iter().any(|m| m.matches(v))
}

/// Whether any of `blocks` contains `ip`.
pub fn in_blocks(blocks: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    blocks.iter().any(|b| b.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_as_istio_users_write_them() {
        let cases = [
            (
                "cluster.local/ns/foo/sa/bar",
                "cluster.local/ns/foo/sa/bar",
                true,
            ),
            (
                "cluster.local/ns/foo/sa/bar",
                "cluster.local/ns/foo/sa/baz",
                false,
            ),
            (
                "cluster.local/ns/foo/sa/*",
                "cluster.local/ns/foo/sa/any",
                true,
            ),
            (
                "cluster.local/ns/foo/sa/*",
                "cluster.local/ns/foobar/sa/any",
                false,
            ),
            ("*/ns/foo/sa/bar", "other.domain/ns/foo/sa/bar", true),
            ("*/ns/foo/sa/bar", "cluster.local/ns/foo/sa/bar2", false),
            ("*", "anything", true),
            (
                "spiffe://cluster.local/ns/a/sa/b",
                "cluster.local/ns/a/sa/b",
                true,
            ),
        ];
        for (pattern, v, want) in cases {
            assert_eq!(principal(pattern).matches(v), want, "{pattern} vs {v}");
        }
    }

    #[test]
    fn blocks_and_ports() {
        let b = [
            ip_block("10.1.0.0/16").unwrap(),
            ip_block("fd00::5").unwrap(),
        ];
        assert!(in_blocks(&b, "10.1.2.3".parse().unwrap()));
        assert!(!in_blocks(&b, "10.2.0.1".parse().unwrap()));
        assert!(in_blocks(&b, "fd00::5".parse().unwrap()));
        assert!(
            in_blocks(&b, "::ffff:10.1.0.9".parse().unwrap()),
            "v4-mapped"
        );
        assert!(ip_block("10.0.0.0/33").is_err());
        assert!(ip_block("nope").is_err());
        assert_eq!(port("8080"), Ok(8080));
        assert!(port("0").is_err() && port("65536").is_err() && port("http").is_err());
    }
}
