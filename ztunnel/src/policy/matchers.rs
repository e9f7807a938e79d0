//! The compiled forms of policy fields, as Istio's ambient mode converts them (istiod's
//! `stringToMatch`, `stringToIP`, `stringToPort`) and Istio's ztunnel matches them: string
//! matchers with `*` wildcards, address blocks and ports, each parsed once when discovery
//! changes so that a decision does no parsing.

use std::net::{IpAddr, Ipv6Addr};

use ipnet::IpNet;

/// A principal or namespace pattern: `*` (any non-empty value), `*suffix`, `prefix*`, or
/// exact; checked in that order (so `*a*` is a suffix match on `a*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StrMatch {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    /// Any non-empty value.
    Presence,
}

impl StrMatch {
    pub fn parse(s: &str) -> StrMatch {
        if s == "*" {
            StrMatch::Presence
        } else if let Some(p) = s.strip_prefix('*') {
            StrMatch::Suffix(p.into())
        } else if let Some(p) = s.strip_suffix('*') {
            StrMatch::Prefix(p.into())
        } else {
            StrMatch::Exact(s.into())
        }
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(e) => v == &**e,
            StrMatch::Prefix(p) => v.starts_with(&**p),
            StrMatch::Suffix(p) => v.ends_with(&**p),
            StrMatch::Presence => !v.is_empty(),
        }
    }
}

/// An address block as istiod reads it (Go's `netip`): a CIDR (`a/n`, `n` in decimal without
/// a leading zero) or one address, an IPv6 one with or without a zone (`fe80::1%eth0`, the zone
/// dropped); `None` for what istiod would skip (empty or unparsable).
pub fn ip_block(s: &str) -> Option<IpNet> {
    if s.is_empty() {
        return None;
    }
    if let Some((_, bits)) = s.split_once('/') {
        let decimal = !bits.is_empty() && bits.bytes().all(|b| b.is_ascii_digit());
        if !decimal || (bits.len() > 1 && bits.starts_with('0')) {
            return None;
        }
        return s.parse::<IpNet>().ok();
    }
    match s.split_once('%') {
        None => s.parse::<IpAddr>().ok().map(IpNet::from),
        Some((_, "")) => None,
        Some((v6, _zone)) => v6
            .parse::<Ipv6Addr>()
            .ok()
            .map(|a| IpNet::from(IpAddr::V6(a))),
    }
}

/// A port as istiod reads it: decimal, 0-65535; `None` for what istiod would skip.
pub fn port(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = s.trim_start_matches('0');
    if digits.len() > 5 {
        return None;
    }
    if digits.is_empty() {
        return Some(0);
    }
    digits
        .parse::<u32>()
        .ok()
        .and_then(|p| u16::try_from(p).ok())
}

/// Whether any of `blocks` contains `ip`.
pub fn in_blocks(blocks: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    blocks.iter().any(|b| b.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// istio/istio `pilot/pkg/serviceregistry/ambient/authorization.go` (stringToMatch) and
    /// istio/ztunnel `src/rbac.rs` (StringMatch::matches).
    #[test]
    fn wildcards_as_istio_converts_them() {
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
            ("*", "", false),
            ("*a*", "xa*", true),
            ("*a*", "xab", false),
        ];
        for (pattern, v, want) in cases {
            assert_eq!(
                StrMatch::parse(pattern).matches(v),
                want,
                "{pattern} vs {v}"
            );
        }
    }

    /// istio/istio `pkg/config/security/security.go` (ValidatePorts, ValidateIPs) and
    /// `authorization.go` (stringToPort, stringToIP).
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
        assert!(in_blocks(
            &[ip_block("10.1.2.3/16").unwrap()],
            "10.1.9.9".parse().unwrap()
        ));
        assert!(ip_block("10.0.0.0/33").is_none());
        assert!(ip_block("nope").is_none());
        assert!(ip_block("").is_none());
        // Go's `netip.ParseAddr` takes an IPv6 zone (`AsSlice` drops it); not on IPv4, not
        // empty, and `ParsePrefix` takes none.
        assert_eq!(ip_block("fe80::1%eth0"), ip_block("fe80::1"));
        // `ParsePrefix` takes the length in decimal, without a leading zero.
        assert_eq!(ip_block("10.0.0.0/0").map(|n| n.prefix_len()), Some(0));
        for bad in [
            "fe80::1%",
            "10.0.0.1%eth0",
            "fe80::1%eth0/64",
            "%eth0",
            "10.0.0.0/08",
            "10.0.0.0/+8",
            "10.0.0.0/",
            "fd00::/0128",
        ] {
            assert_eq!(ip_block(bad), None, "{bad}");
        }
        assert_eq!(port("8080"), Some(8080));
        assert_eq!(port("0"), Some(0));
        assert_eq!(port("0080"), Some(80));
        assert_eq!(port("65535"), Some(65535));
        for bad in [
            "65536",
            "http",
            "",
            "+80",
            "80-90",
            "-1",
            "99999999999999999999",
        ] {
            assert_eq!(port(bad), None, "{bad}");
        }
    }
}
