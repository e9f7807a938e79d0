//! The TLS configurations of the tunnel, both ends, as DESIGN.md fixes them: TLS 1.3 only,
//! AES-256-GCM and AES-128-GCM suites, ALPN `h2` (a server also accepts no ALPN), no SNI,
//! no session resumption (every handshake checks identity anew), and mutual authentication.
//! The crypto is aws-lc-rs, whose key exchanges include the post-quantum hybrid
//! X25519MLKEM768: it is preferred, and classical groups are taken from peers without it unless
//! the process runs [`KeyExchange::PqcOnly`] ([`use_key_exchange`]). The checks:
//!
//! - server: the client's chain must end in our roots, and one of its leaf's URI SANs must be a
//!   SPIFFE ID in our trust domain: the first such is the client's identity;
//! - client: the server's chain must end in our roots (its DNS name is not checked), and one of
//!   its leaf's SPIFFE IDs must be one of the identities the destination is expected to have.
//!
//! Both then check the chain against the revocation lists in force ([`super::crl`]), if any.
//!
//! A leaf with several URI SANs is accepted as Istio accepts it: any SAN may satisfy each check.
//! The identity a server reads for policy is the first in its own trust domain (Istio takes the
//! first SAN, even from a trust domain no check has looked at).

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::{CryptoProvider, SupportedKxGroup, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::crl::{Revocation, Usage};
use super::leaf::{leaf_identities, leaf_identity_in};
use super::{Error, Identity};

/// Which key exchanges a TLS handshake of this process offers and accepts
/// ([`use_key_exchange`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyExchange {
    /// The post-quantum hybrid X25519MLKEM768 first, then X25519, P-256 and P-384 for peers
    /// without it: two daemons of this project, or one and an Istio ztunnel built on
    /// aws-lc-rs, agree on the hybrid.
    #[default]
    Hybrid,
    /// X25519MLKEM768 only, as Istio's `COMPLIANCE_POLICY=pqc`: a peer without it is refused.
    PqcOnly,
}

impl KeyExchange {
    /// The groups, most preferred first: a client sends a key share for the first (and for its
    /// X25519 half), and a server takes the first of these the client has a share for.
    fn groups(self) -> Vec<&'static dyn SupportedKxGroup> {
        use rustls::crypto::aws_lc_rs::kx_group::{SECP256R1, SECP384R1, X25519, X25519MLKEM768};
        match self {
            KeyExchange::Hybrid => vec![X25519MLKEM768, X25519, SECP256R1, SECP384R1],
            KeyExchange::PqcOnly => vec![X25519MLKEM768],
        }
    }
}

impl std::fmt::Display for KeyExchange {
    /// As the flag spells it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use clap::ValueEnum;
        match self.to_possible_value() {
            Some(v) => f.write_str(v.get_name()),
            None => write!(f, "{self:?}"),
        }
    }
}

static KEY_EXCHANGE: OnceLock<KeyExchange> = OnceLock::new();

/// Makes every TLS configuration this process builds from now on use `kx` (the default is
/// [`KeyExchange::Hybrid`]): the daemon's and the CA's own ([`provider`]), and those that
/// libraries build on the process's default provider (the Kubernetes client), which keeps
/// aws-lc-rs's other suites and TLS 1.2 for servers that need them. Called once at start,
/// before any TLS configuration is built; an error if the process already settled on another.
pub fn use_key_exchange(kx: KeyExchange) -> Result<(), Error> {
    let settled = *KEY_EXCHANGE.get_or_init(|| kx);
    if settled != kx {
        return Err(Error::Tls(format!(
            "the key exchange is already {settled}, not {kx}"
        )));
    }
    // Only the first install counts: a default installed before this one must have the same
    // groups, or the libraries' handshakes would not follow the setting.
    let _ = CryptoProvider {
        kx_groups: kx.groups(),
        ..rustls::crypto::aws_lc_rs::default_provider()
    }
    .install_default();
    let names =
        |groups: &[&dyn SupportedKxGroup]| -> Vec<_> { groups.iter().map(|g| g.name()).collect() };
    match CryptoProvider::get_default() {
        Some(p) if names(&p.kx_groups) == names(&kx.groups()) => Ok(()),
        _ => Err(Error::Tls(format!(
            "the process's default TLS provider was set before the key exchange ({kx})"
        ))),
    }
}

/// The crypto provider of every TLS connection of the daemon and the CA: aws-lc-rs with only
/// the two AES-GCM TLS 1.3 suites, and the key exchanges of [`use_key_exchange`].
pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| provider_for(*KEY_EXCHANGE.get_or_init(KeyExchange::default)))
        .clone()
}

/// The provider of [`provider`] for the key exchanges `kx`.
pub fn provider_for(kx: KeyExchange) -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider};
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_AES_128_GCM_SHA256,
        ],
        kx_groups: kx.groups(),
        ..default_provider()
    })
}

const ALPN_H2: &[u8] = ztunnel_proto::hbone::ALPN_H2;

/// The SPIFFE identity of a peer in `trust_domain`, read from its presented chain (leaf
/// first): the first of its URI SANs that is a ServiceAccount's SPIFFE ID there.
pub fn peer_identity(certs: &[CertificateDer<'_>], trust_domain: &str) -> Result<Identity, Error> {
    leaf_identity_in(&parse_leaf(certs)?, trust_domain)
}

/// Every SPIFFE identity of a peer's leaf certificate, in the order of its URI SANs.
fn peer_identities(certs: &[CertificateDer<'_>]) -> Result<Vec<Identity>, Error> {
    leaf_identities(&parse_leaf(certs)?)
}

fn parse_leaf<'a>(certs: &'a [CertificateDer<'_>]) -> Result<X509Certificate<'a>, Error> {
    let leaf = certs
        .first()
        .ok_or_else(|| Error::Certificate("peer presented no certificate".into()))?;
    let (_, x) = X509Certificate::from_der(leaf)
        .map_err(|e| Error::Certificate(format!("cannot parse peer certificate: {e}")))?;
    Ok(x)
}

fn bad_identity(msg: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        Error::Certificate(msg),
    ))))
}

/// Server side: webpki chain verification, then the trust-domain check, then revocation.
#[derive(Debug)]
struct ClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
    revocation: Revocation,
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if let Err(e) = peer_identity(std::slice::from_ref(end_entity), &self.trust_domain) {
            crate::warn_throttled!(ours = %self.trust_domain, error = %e, "client certificate carries no identity of our trust domain");
            return Err(bad_identity(e.to_string()));
        }
        let (roots, algs) = (&self.roots, self.algs);
        self.revocation
            .verify(end_entity, intermediates, roots, algs, Usage::Client, now)?;
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: chain to our roots (no name check), then the expected-identity check, then
/// revocation.
#[derive(Debug)]
struct ServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
    algs: WebPkiSupportedAlgorithms,
    revocation: Revocation,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let ids = peer_identities(std::slice::from_ref(end_entity))
            .map_err(|e| bad_identity(e.to_string()))?;
        if !ids.iter().any(|id| self.expected.contains(id)) {
            let expected: Vec<String> = self.expected.iter().map(|e| e.to_string()).collect();
            let ids: Vec<String> = ids.iter().map(|e| e.to_string()).collect();
            crate::warn_throttled!(peer = ?ids, ?expected, "server identity is not the expected one");
            return Err(bad_identity(format!(
                "server identities {ids:?} not in expected {expected:?}"
            )));
        }
        let (roots, algs) = (&self.roots, self.algs);
        self.revocation
            .verify(end_entity, intermediates, roots, algs, Usage::Server, now)?;
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The tunnel server's TLS configuration, on `provider` ([`provider`] in the daemon).
pub fn server_config(
    provider: Arc<CryptoProvider>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    trust_domain: &str,
    revocation: Revocation,
) -> Result<ServerConfig, Error> {
    let inner = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| Error::Tls(e.to_string()))?;
    let verifier = Arc::new(ClientVerifier {
        inner,
        trust_domain: trust_domain.to_owned(),
        roots,
        algs: provider.signature_verification_algorithms,
        revocation,
    });
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    Ok(cfg)
}

/// The tunnel client's TLS configuration, on `provider` ([`provider`] in the daemon).
pub fn client_config(
    provider: Arc<CryptoProvider>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
    revocation: Revocation,
) -> Result<ClientConfig, Error> {
    let verifier = Arc::new(ServerVerifier {
        roots,
        expected,
        algs: provider.signature_verification_algorithms,
        revocation,
    });
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.enable_sni = false;
    cfg.resumption = Resumption::disabled();
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls_pki_types::ServerName;
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::ca::{issue, LocalCa};
    use crate::identity::WorkloadCert;

    const DAY: Duration = Duration::from_secs(86400);

    fn id(s: &str) -> Identity {
        s.parse().unwrap()
    }

    struct Cas {
        _dir: tempfile::TempDir,
        main: LocalCa,
        /// The same root, issuing in another trust domain.
        other_td: LocalCa,
        /// An unrelated root.
        untrusted: LocalCa,
    }

    fn cas() -> Cas {
        let dir = tempfile::tempdir().unwrap();
        let main = LocalCa::load_or_create(&dir.path().join("a"), "cluster.local").unwrap();
        let other_td = LocalCa::load_or_create(&dir.path().join("a"), "other.local").unwrap();
        let untrusted = LocalCa::load_or_create(&dir.path().join("b"), "cluster.local").unwrap();
        Cas {
            _dir: dir,
            main,
            other_td,
            untrusted,
        }
    }

    /// Runs a handshake; returns (client result, server result with the peer identity).
    async fn handshake(
        client: Arc<ClientConfig>,
        server: &WorkloadCert,
    ) -> (Result<(), String>, Result<Identity, String>) {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let acceptor = TlsAcceptor::from(server.server_config());
        let connector = TlsConnector::from(client);
        let server = async move {
            let mut tls = acceptor.accept(s).await.map_err(|e| e.to_string())?;
            let conn = tls.get_ref().1;
            assert_eq!(
                conn.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );
            let suite = conn.negotiated_cipher_suite().unwrap().suite();
            assert!(
                [
                    rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
                    rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                ]
                .contains(&suite),
                "{suite:?}"
            );
            let id = peer_identity(conn.peer_certificates().unwrap(), "cluster.local")
                .map_err(|e| e.to_string())?;
            use tokio::io::AsyncWriteExt;
            tls.write_all(b"k").await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            // Keep the connection open until the client has read.
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(id)
        };
        let client = async move {
            let name = ServerName::try_from("10.0.0.1").unwrap();
            let mut tls = connector
                .connect(name, c)
                .await
                .map_err(|e| e.to_string())?;
            // TLS 1.3 client authentication failures surface on the first read.
            use tokio::io::AsyncReadExt;
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            Ok(())
        };
        tokio::join!(client, server)
    }

    #[tokio::test]
    async fn same_ca_mutual_tls_reads_the_client_identity() {
        let cas = cas();
        let client = issue(&cas.main, &id("spiffe://cluster.local/ns/a/sa/client"), DAY).unwrap();
        let server = issue(&cas.main, &id("spiffe://cluster.local/ns/b/sa/server"), DAY).unwrap();
        let cfg = client.client_config(std::slice::from_ref(&server.identity));
        assert_eq!(cfg.alpn_protocols, vec![b"h2".to_vec()]);
        let (c, s) = handshake(cfg, &server).await;
        c.unwrap();
        assert_eq!(s.unwrap(), client.identity);
    }

    #[tokio::test]
    async fn client_without_alpn_is_accepted() {
        let cas = cas();
        let client = issue(&cas.main, &id("spiffe://cluster.local/ns/a/sa/client"), DAY).unwrap();
        let server = issue(&cas.main, &id("spiffe://cluster.local/ns/b/sa/server"), DAY).unwrap();
        let mut cfg = (*client.client_config(std::slice::from_ref(&server.identity))).clone();
        cfg.alpn_protocols.clear();
        let (c, s) = handshake(Arc::new(cfg), &server).await;
        c.unwrap();
        s.unwrap();
    }

    #[tokio::test]
    async fn client_from_another_trust_domain_is_refused() {
        let cas = cas();
        let client = issue(
            &cas.other_td,
            &id("spiffe://other.local/ns/a/sa/client"),
            DAY,
        )
        .unwrap();
        let server = issue(&cas.main, &id("spiffe://cluster.local/ns/b/sa/server"), DAY).unwrap();
        let (_, s) = handshake(
            client.client_config(std::slice::from_ref(&server.identity)),
            &server,
        )
        .await;
        let e = s.unwrap_err();
        assert!(e.contains("trust domain"), "{e}");
    }

    #[tokio::test]
    async fn client_from_an_untrusted_ca_is_refused() {
        let cas = cas();
        let client = issue(
            &cas.untrusted,
            &id("spiffe://cluster.local/ns/a/sa/client"),
            DAY,
        )
        .unwrap();
        let server = issue(&cas.main, &id("spiffe://cluster.local/ns/b/sa/server"), DAY).unwrap();
        // The client trusts nothing the server has either: both sides refuse.
        let (c, s) = handshake(
            client.client_config(std::slice::from_ref(&server.identity)),
            &server,
        )
        .await;
        assert!(c.is_err());
        assert!(s.is_err());
    }

    #[tokio::test]
    async fn server_with_an_unexpected_identity_is_refused() {
        let cas = cas();
        let client = issue(&cas.main, &id("spiffe://cluster.local/ns/a/sa/client"), DAY).unwrap();
        let server = issue(
            &cas.main,
            &id("spiffe://cluster.local/ns/b/sa/impostor"),
            DAY,
        )
        .unwrap();
        let (c, _) = handshake(
            client.client_config(&[id("spiffe://cluster.local/ns/b/sa/server")]),
            &server,
        )
        .await;
        let e = c.unwrap_err();
        assert!(e.contains("impostor"), "{e}");
        let (c, _) = handshake(client.client_config(&[]), &server).await;
        assert!(c.is_err(), "an empty expected set accepts nobody");
    }

    /// A leaf with several URI SANs, as Istio accepts it: the server reads the first identity
    /// of its trust domain, the client accepts a server any of whose identities it expects.
    #[tokio::test]
    async fn leaves_with_several_uri_sans_are_read_as_istio_reads_them() {
        let cas = cas();
        let ours = "spiffe://cluster.local/ns/a/sa/client";
        let client = crate::ca::issue_with_uris(
            &cas.main,
            &id(ours),
            &[
                "spiffe://other.local/ns/a/sa/x",
                ours,
                "spiffe://cluster.local/ns/a/sa/later",
            ],
        )
        .unwrap();
        let server_id = "spiffe://cluster.local/ns/b/sa/server";
        let server = crate::ca::issue_with_uris(
            &cas.main,
            &id(server_id),
            &["spiffe://cluster.local/ns/b/sa/alias", server_id],
        )
        .unwrap();
        let cfg = client.client_config(&[id(server_id)]);
        let (c, s) = handshake(cfg, &server).await;
        c.unwrap();
        assert_eq!(
            s.unwrap(),
            id(ours),
            "the first identity of the server's trust domain"
        );
        // Neither of the server's identities expected: refused.
        let cfg = client.client_config(&[id("spiffe://cluster.local/ns/b/sa/other")]);
        let (c, _) = handshake(cfg, &server).await;
        assert!(c.unwrap_err().contains("alias"));
        // A client none of whose identities is in the server's trust domain: refused.
        let foreign = crate::ca::issue_with_uris(
            &cas.main,
            &id("spiffe://other.local/ns/a/sa/x"),
            &[
                "spiffe://other.local/ns/a/sa/x",
                "spiffe://third.local/ns/a/sa/x",
            ],
        )
        .unwrap();
        let (_, s) = handshake(foreign.client_config(&[id(server_id)]), &server).await;
        assert!(s.unwrap_err().contains("trust domain"));
    }

    /// A TLS 1.3 client of `server` with `provider`'s suites, and no certificate of its own.
    fn anonymous_client(server: &WorkloadCert, provider: Arc<CryptoProvider>) -> Arc<ClientConfig> {
        let algs = provider.signature_verification_algorithms;
        let mut cfg = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ServerVerifier {
                roots: server.roots.clone(),
                revocation: Revocation::default(),
                expected: vec![server.identity.clone()],
                algs,
            }))
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(cfg)
    }

    #[tokio::test]
    async fn client_without_certificate_is_refused() {
        let cas = cas();
        let server = issue(&cas.main, &id("spiffe://cluster.local/ns/b/sa/server"), DAY).unwrap();
        let (_, s) = handshake(anonymous_client(&server, provider()), &server).await;
        assert!(s.is_err());
    }

    /// A client offering only suites other than the two the daemons speak is refused at the
    /// handshake, for that reason. (TLS 1.2 is not built in at all: rustls without `tls12`.)
    #[tokio::test]
    async fn a_client_offering_only_other_suites_is_refused() {
        use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider};
        let cas = cas();
        let server = issue(&cas.main, &id("spiffe://cluster.local/ns/b/sa/server"), DAY).unwrap();
        let chacha = Arc::new(CryptoProvider {
            cipher_suites: vec![cipher_suite::TLS13_CHACHA20_POLY1305_SHA256],
            ..default_provider()
        });
        let (_, s) = handshake(anonymous_client(&server, chacha), &server).await;
        let e = s.unwrap_err();
        assert!(e.contains("NoCipherSuitesInCommon"), "{e}");
    }

    /// A trust bundle of two roots (a root rotation in progress): each side's leaf chains to a
    /// different root, and both handshakes complete, each reading the other's identity.
    #[tokio::test]
    async fn bundle_with_two_roots_trusts_leaves_of_both() {
        let cas = cas();
        let both = Arc::new(
            crate::identity::root_store(
                &crate::identity::parse_pem_certs(&[cas.main.root_pem(), cas.untrusted.root_pem()])
                    .unwrap(),
            )
            .unwrap(),
        );
        let mut old = issue(&cas.main, &id("spiffe://cluster.local/ns/a/sa/old"), DAY).unwrap();
        let mut new = issue(
            &cas.untrusted,
            &id("spiffe://cluster.local/ns/b/sa/new"),
            DAY,
        )
        .unwrap();
        old.roots = both.clone();
        new.roots = both;
        for (client, server) in [(&old, &new), (&new, &old)] {
            let (c, s) = handshake(
                client.client_config(std::slice::from_ref(&server.identity)),
                server,
            )
            .await;
            c.unwrap_or_else(|e| panic!("{} to {}: {e}", client.identity, server.identity));
            assert_eq!(s.unwrap(), client.identity);
        }
    }

    /// The group a handshake between `client` and `server` agrees on, as each end reports it;
    /// `Err` when the client's handshake fails.
    async fn agreed_group(
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
    ) -> Result<rustls::NamedGroup, String> {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let group = |conn: &rustls::CommonState| {
            conn.negotiated_key_exchange_group()
                .map(|g| g.name())
                .ok_or("no group")
        };
        let server = async move {
            let tls = TlsAcceptor::from(server).accept(s).await;
            tls.map_err(|e| e.to_string())
                .and_then(|tls| Ok(group(tls.get_ref().1)?))
        };
        let client = async move {
            let name = ServerName::try_from("10.0.0.1").unwrap();
            let tls = TlsConnector::from(client).connect(name, c).await;
            tls.map_err(|e| e.to_string())
                .and_then(|tls| Ok(group(tls.get_ref().1)?))
        };
        let (c, s) = tokio::join!(client, server);
        if let Ok(g) = &c {
            assert_eq!(s.as_ref(), Ok(g), "both ends agree");
        }
        c
    }

    /// Both ends prefer the post-quantum hybrid and take a classical group from a peer without
    /// it (Istio's ztunnel built on ring offers X25519, its FIPS builds P-256 and P-384);
    /// `pqc-only` takes nothing else, either way.
    #[tokio::test]
    async fn key_exchanges_prefer_the_hybrid_and_pqc_only_takes_nothing_else() {
        use rustls::crypto::aws_lc_rs::kx_group::{SECP256R1, SECP384R1, X25519, X25519MLKEM768};
        use rustls::NamedGroup as G;
        let cas = cas();
        let client = issue(&cas.main, &id("spiffe://cluster.local/ns/a/sa/client"), DAY).unwrap();
        let server = issue(&cas.main, &id("spiffe://cluster.local/ns/b/sa/server"), DAY).unwrap();
        let hybrid = || provider_for(KeyExchange::Hybrid);
        let pqc_only = || provider_for(KeyExchange::PqcOnly);
        let only = |groups: Vec<&'static dyn SupportedKxGroup>| {
            Arc::new(CryptoProvider {
                kx_groups: groups,
                ..(*hybrid()).clone()
            })
        };
        let cases = [
            (
                "hybrid both ends",
                hybrid(),
                hybrid(),
                Some(G::X25519MLKEM768),
            ),
            (
                "an X25519 client",
                only(vec![X25519]),
                hybrid(),
                Some(G::X25519),
            ),
            (
                "a P-256 and P-384 client",
                only(vec![SECP256R1, SECP384R1]),
                hybrid(),
                Some(G::secp256r1),
            ),
            (
                "an X25519 server",
                hybrid(),
                only(vec![X25519]),
                Some(G::X25519),
            ),
            (
                "pqc-only server",
                hybrid(),
                pqc_only(),
                Some(G::X25519MLKEM768),
            ),
            (
                "pqc-only client",
                pqc_only(),
                hybrid(),
                Some(G::X25519MLKEM768),
            ),
            (
                "an X25519 client, pqc-only server",
                only(vec![X25519]),
                pqc_only(),
                None,
            ),
            (
                "pqc-only client, an X25519 server",
                pqc_only(),
                only(vec![X25519]),
                None,
            ),
            (
                "a client with the hybrid last",
                only(vec![X25519, X25519MLKEM768]),
                pqc_only(),
                Some(G::X25519MLKEM768),
            ),
        ];
        for (what, c, s, want) in cases {
            let cfg = client.client_config_with(c, std::slice::from_ref(&server.identity));
            let got = agreed_group(cfg, server.server_config_with(s)).await;
            match want {
                Some(g) => assert_eq!(got, Ok(g), "{what}"),
                None => assert!(got.is_err(), "{what}: {got:?}"),
            }
        }
        // The process's provider is the hybrid one unless told otherwise.
        assert_eq!(provider().kx_groups[0].name(), G::X25519MLKEM768);
    }

    /// The setting is the process's: its own provider and the default one that libraries
    /// build on follow it, and another setting later is refused rather than half applied.
    #[test]
    fn the_key_exchange_is_settled_once_for_the_whole_process() {
        use_key_exchange(KeyExchange::Hybrid).unwrap();
        use_key_exchange(KeyExchange::Hybrid).unwrap();
        let e = use_key_exchange(KeyExchange::PqcOnly).unwrap_err();
        assert!(e.to_string().contains("already hybrid"), "{e}");
        let default = CryptoProvider::get_default().unwrap();
        assert_eq!(
            default.kx_groups[0].name(),
            rustls::NamedGroup::X25519MLKEM768
        );
        assert_eq!(default.kx_groups.len(), 4);
        assert_eq!(KeyExchange::PqcOnly.to_string(), "pqc-only");
    }
}
