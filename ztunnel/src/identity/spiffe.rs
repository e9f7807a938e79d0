//! SPIFFE workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Parsing is strict: exactly the four path segments `ns/<ns>/sa/<sa>`, no empty segment, no
//! query, fragment, port or user info, and a trust domain made of lowercase letters, digits, `.`,
//! `-` and `_` as the SPIFFE specification allows. Identity is only ever taken from this form.

use std::fmt;
use std::str::FromStr;

/// The SPIFFE ID of a Kubernetes ServiceAccount.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("identity {0:?} does not start with spiffe://")]
    Scheme(String),
    #[error("identity {0:?} is not of the form spiffe://<td>/ns/<ns>/sa/<sa>")]
    Shape(String),
    #[error("identity {0:?} has an invalid trust domain")]
    TrustDomain(String),
    #[error("identity {0:?} has an invalid path segment")]
    Segment(String),
}

fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
}

fn valid_segment(s: &str) -> bool {
    // Kubernetes names are DNS labels/subdomains; SPIFFE allows a little more.
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
}

impl Identity {
    /// Builds an identity, validating every part.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, ParseError> {
        Self::check(trust_domain, namespace, service_account)?;
        Ok(Identity {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    /// Whether [`Identity::new`] would accept these parts; allocates only to say why not.
    pub fn check(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<(), ParseError> {
        let id = || format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}");
        if !valid_trust_domain(trust_domain) {
            return Err(ParseError::TrustDomain(id()));
        }
        if !valid_segment(namespace) || !valid_segment(service_account) {
            return Err(ParseError::Segment(id()));
        }
        Ok(())
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| ParseError::Scheme(s.to_owned()))?;
        let mut parts = rest.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) => {
                if !valid_trust_domain(td) {
                    return Err(ParseError::TrustDomain(s.to_owned()));
                }
                if !valid_segment(ns) || !valid_segment(sa) {
                    return Err(ParseError::Segment(s.to_owned()));
                }
                Ok(Identity {
                    trust_domain: td.to_owned(),
                    namespace: ns.to_owned(),
                    service_account: sa.to_owned(),
                })
            }
            _ => Err(ParseError::Shape(s.to_owned())),
        }
    }
}

impl serde::Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Identity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let id: Identity = "spiffe://cluster.local/ns/demo/sa/web".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "demo");
        assert_eq!(id.service_account(), "web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/demo/sa/web");
        assert_eq!(Identity::new("cluster.local", "demo", "web").unwrap(), id);
    }

    #[test]
    fn rejects_malformed() {
        let cases = [
            ("http://cluster.local/ns/a/sa/b", "scheme"),
            ("spiffe://cluster.local/ns/a/sa/b/extra", "shape"),
            ("spiffe://cluster.local/ns/a/sa", "shape"),
            ("spiffe://cluster.local/sa/a/ns/b", "shape"),
            ("spiffe://cluster.local/ns//sa/b", "segment"),
            ("spiffe://cluster.local/ns/a/sa/b?x=1", "segment"),
            ("spiffe://Cluster.Local/ns/a/sa/b", "td"),
            ("spiffe://cluster.local:8080/ns/a/sa/b", "td"),
            ("spiffe://user@cluster.local/ns/a/sa/b", "td"),
            ("spiffe:///ns/a/sa/b", "td"),
            ("spiffe://cluster.local/ns/../sa/b", "segment"),
            ("", "scheme"),
        ];
        for (input, kind) in cases {
            let err = input.parse::<Identity>().unwrap_err();
            let got = match err {
                ParseError::Scheme(_) => "scheme",
                ParseError::Shape(_) => "shape",
                ParseError::TrustDomain(_) => "td",
                ParseError::Segment(_) => "segment",
            };
            assert_eq!(got, kind, "{input}");
        }
    }
}
