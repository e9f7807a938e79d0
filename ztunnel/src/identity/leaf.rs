//! The SPIFFE identities a leaf certificate carries in its URI SANs: all of them, or the one
//! in a given trust domain. Both the checks of a signed chain ([`super::cert`]) and the TLS
//! verifiers ([`super::tls`]) read identity through these.

use x509_parser::prelude::{GeneralName, X509Certificate};

use super::{Error, Identity};

/// The SPIFFE identities of a leaf certificate, in the order of its URI SANs. A URI SAN that
/// is not a ServiceAccount's SPIFFE ID is skipped, as Istio skips it; at least one must be.
pub fn leaf_identities(cert: &X509Certificate<'_>) -> Result<Vec<Identity>, Error> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| Error::Certificate(format!("bad SAN extension: {e}")))?
        .ok_or_else(|| Error::Certificate("no subject alternative name".into()))?;
    let mut uris = 0;
    let ids: Vec<Identity> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .inspect(|_| uris += 1)
        .filter_map(|u| u.parse().ok())
        .collect();
    match (ids.is_empty(), uris) {
        (false, _) => Ok(ids),
        (true, 0) => Err(Error::Certificate("no URI SAN".into())),
        (true, n) => Err(Error::Certificate(format!(
            "none of its {n} URI SANs is a ServiceAccount's SPIFFE ID"
        ))),
    }
}

/// The identity of a leaf certificate in `trust_domain`: the first of its
/// [`leaf_identities`] there.
pub fn leaf_identity_in(cert: &X509Certificate<'_>, trust_domain: &str) -> Result<Identity, Error> {
    let ids = leaf_identities(cert)?;
    ids.iter()
        .find(|id| id.trust_domain() == trust_domain)
        .cloned()
        .ok_or_else(|| {
            let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
            Error::Certificate(format!(
                "no identity in trust domain {trust_domain}: {}",
                ids.join(", ")
            ))
        })
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, SanType};
    use x509_parser::prelude::{FromDer, X509Certificate};

    use super::{leaf_identities, leaf_identity_in};

    /// A self-signed certificate with these subject alternative names.
    fn cert_with(sans: Vec<SanType>) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn identities_are_the_spiffe_uri_sans_in_order_and_the_one_in_a_trust_domain_is_the_first_there(
    ) {
        let alice = "spiffe://cluster.local/ns/demo/sa/alice";
        let bob = "spiffe://cluster.local/ns/demo/sa/bob";
        let other = "spiffe://other.example/ns/demo/sa/alice";
        type Case = (
            &'static str,
            Vec<SanType>,
            Result<Vec<&'static str>, &'static str>,
            Result<&'static str, &'static str>,
        );
        let cases: Vec<Case> = vec![
            (
                "one SPIFFE URI",
                vec![uri(alice)],
                Ok(vec![alice]),
                Ok(alice),
            ),
            (
                "beside a DNS name",
                vec![
                    SanType::DnsName("alice.demo".try_into().unwrap()),
                    uri(alice),
                ],
                Ok(vec![alice]),
                Ok(alice),
            ),
            (
                "no SAN at all",
                vec![],
                Err("no subject alternative name"),
                Err("no subject alternative name"),
            ),
            (
                "a DNS name only",
                vec![SanType::DnsName("alice.demo".try_into().unwrap())],
                Err("no URI SAN"),
                Err("no URI SAN"),
            ),
            (
                "two SPIFFE URIs: both, the first is the identity",
                vec![uri(alice), uri(bob)],
                Ok(vec![alice, bob]),
                Ok(alice),
            ),
            (
                "another trust domain's first: ours is the identity",
                vec![uri(other), uri(bob)],
                Ok(vec![other, bob]),
                Ok(bob),
            ),
            (
                "only another trust domain's",
                vec![uri(other)],
                Ok(vec![other]),
                Err("no identity in trust domain cluster.local"),
            ),
            (
                "a URI that is not SPIFFE is skipped",
                vec![uri("https://alice.demo/"), uri(alice)],
                Ok(vec![alice]),
                Ok(alice),
            ),
            (
                "a URI that is not SPIFFE alone",
                vec![uri("https://alice.demo/")],
                Err("none of its 1 URI SANs"),
                Err("none of its 1 URI SANs"),
            ),
            (
                "a SPIFFE URI that is not a ServiceAccount's",
                vec![uri("spiffe://cluster.local/alice")],
                Err("none of its 1 URI SANs"),
                Err("none of its 1 URI SANs"),
            ),
        ];
        for (what, sans, want_all, want_ours) in cases {
            let der = cert_with(sans);
            let (_, x) = X509Certificate::from_der(&der).unwrap();
            let all = leaf_identities(&x)
                .map(|ids| ids.iter().map(ToString::to_string).collect::<Vec<_>>());
            match (all, want_all) {
                (Ok(ids), Ok(want)) => assert_eq!(ids, want, "{what}"),
                (Err(e), Err(want)) => assert!(e.to_string().contains(want), "{what}: {e}"),
                (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
            }
            match (leaf_identity_in(&x, "cluster.local"), want_ours) {
                (Ok(id), Ok(want)) => assert_eq!(id.to_string(), want, "{what}"),
                (Err(e), Err(want)) => assert!(e.to_string().contains(want), "{what}: {e}"),
                (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
            }
        }
    }
}
