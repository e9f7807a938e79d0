//! Workload certificates: key generation and CSRs on the node, and the validated result of a
//! signing.
//!
//! Keys are ECDSA P-256, generated here; only the CSR leaves the node. A signed chain is
//! accepted only if its leaf's single URI SAN is the requested identity, its public key is
//! the one we generated, and the trust bundle is not empty. Renewal is due at half of the
//! remaining lifetime as seen when the certificate arrived, a pure function of the time given.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::crl::{PeerChain, Revocation, Usage};
use super::leaf::leaf_identities;
use super::{tls, Error, Identity};

/// A workload's issued certificate, its private key and the trust bundle it came with.
pub struct WorkloadCert {
    pub identity: Identity,
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    pub roots: Arc<RootCertStore>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Hex serial number of the leaf.
    pub serial: String,
    /// When this node received it (renewal is planned from here).
    pub received_at: SystemTime,
    /// The revocation lists its TLS configurations check peers against.
    revocation: Revocation,
    server_config: OnceLock<Arc<ServerConfig>>,
}

impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// A fresh key pair and the CSR for `identity`.
pub struct KeyAndCsr {
    pub key: KeyPair,
    pub csr_pem: String,
}

/// Generates an ECDSA P-256 key and a CSR whose only SAN is the URI SAN of `identity`.
pub fn generate_csr(identity: &Identity) -> Result<KeyAndCsr, Error> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    let csr_pem = params.serialize_request(&key)?.pem()?;
    Ok(KeyAndCsr { key, csr_pem })
}

/// Parses every certificate in a list of PEM texts (each may hold several).
pub fn parse_pem_certs(pems: &[String]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let mut out = Vec::new();
    for p in pems {
        for c in CertificateDer::pem_slice_iter(p.as_bytes()) {
            out.push(c.map_err(|e| Error::Pem(e.to_string()))?);
        }
    }
    Ok(out)
}

/// A trust bundle from PEM roots; at least one is required.
pub fn root_store(roots: &[CertificateDer<'static>]) -> Result<RootCertStore, Error> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store
            .add(r.clone())
            .map_err(|e| Error::Pem(format!("bad root certificate: {e}")))?;
    }
    if store.is_empty() {
        return Err(Error::NoRoots);
    }
    Ok(store)
}

fn to_system_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH
    }
}

impl WorkloadCert {
    /// Validates a signing result for `identity` against the key we generated.
    pub fn from_signed(
        identity: Identity,
        key: &KeyPair,
        chain_pem: &[String],
        roots_pem: &[String],
        now: SystemTime,
    ) -> Result<Self, Error> {
        let chain = parse_pem_certs(chain_pem)?;
        let leaf_der = chain
            .first()
            .ok_or_else(|| Error::Certificate("empty chain".into()))?;
        let (_, leaf) = X509Certificate::from_der(leaf_der)
            .map_err(|e| Error::Certificate(format!("cannot parse leaf: {e}")))?;
        let got = leaf_identities(&leaf)?;
        if !got.contains(&identity) {
            let got: Vec<String> = got.iter().map(ToString::to_string).collect();
            return Err(Error::Certificate(format!(
                "leaf is for {}, expected {identity}",
                got.join(", ")
            )));
        }
        if leaf.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(Error::Certificate("leaf public key is not ours".into()));
        }
        let roots = root_store(&parse_pem_certs(roots_pem)?)?;
        let not_before = to_system_time(leaf.validity().not_before);
        let not_after = to_system_time(leaf.validity().not_after);
        if not_after <= now {
            return Err(Error::Certificate("certificate already expired".into()));
        }
        let serial = leaf.raw_serial_as_string().replace(':', "");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok(WorkloadCert {
            identity,
            chain,
            key,
            roots: Arc::new(roots),
            not_before,
            not_after,
            serial,
            received_at: now,
            revocation: Revocation::default(),
            server_config: OnceLock::new(),
        })
    }

    /// When renewal is due: half-way from its arrival to its expiry.
    pub fn refresh_at(&self) -> SystemTime {
        let left = self
            .not_after
            .duration_since(self.received_at)
            .unwrap_or_default();
        self.received_at + left / 2
    }

    /// Whether renewal is due at `now`.
    pub fn needs_refresh(&self, now: SystemTime) -> bool {
        now >= self.refresh_at()
    }

    /// Whether the certificate has expired at `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    /// The certificate whose TLS configurations check peers against `revocation` (none by
    /// default).
    pub fn with_revocation(mut self, revocation: Revocation) -> Self {
        self.revocation = revocation;
        self.server_config = OnceLock::new();
        self
    }

    /// The chain a peer presented (`usage` says which end) in a handshake that this
    /// certificate's configuration verified: kept with the connection, judged against the
    /// lists in force now and again when they change.
    pub fn peer_chain(&self, presented: &[CertificateDer<'_>], usage: Usage) -> PeerChain {
        let algs = tls::provider().signature_verification_algorithms;
        PeerChain::new(
            presented,
            self.roots.clone(),
            usage,
            self.revocation.clone(),
            algs,
        )
    }

    /// This certificate's own chain, to be judged against the lists (it went through no
    /// handshake of ours).
    pub fn own_chain(&self) -> PeerChain {
        let algs = tls::provider().signature_verification_algorithms;
        let (chain, roots) = (&self.chain, self.roots.clone());
        PeerChain::new(chain, roots, Usage::Client, self.revocation.clone(), algs)
    }

    /// The TLS server configuration presenting this certificate (built once).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server_config
            .get_or_init(|| self.server_config_with(tls::provider()))
            .clone()
    }

    /// [`Self::server_config`] on another crypto provider (other key exchanges), built anew.
    pub fn server_config_with(&self, provider: Arc<CryptoProvider>) -> Arc<ServerConfig> {
        Arc::new(
            tls::server_config(
                provider,
                self.chain.clone(),
                self.key.clone_key(),
                self.roots.clone(),
                self.identity.trust_domain(),
                self.revocation.clone(),
            )
            .expect("a validated certificate makes a valid server config"),
        )
    }

    /// A TLS client configuration presenting this certificate and accepting only a server
    /// whose identity is in `expected`.
    pub fn client_config(&self, expected: &[Identity]) -> Arc<ClientConfig> {
        self.client_config_with(tls::provider(), expected)
    }

    /// [`Self::client_config`] on another crypto provider (other key exchanges).
    pub fn client_config_with(
        &self,
        provider: Arc<CryptoProvider>,
        expected: &[Identity],
    ) -> Arc<ClientConfig> {
        Arc::new(
            tls::client_config(
                provider,
                self.chain.clone(),
                self.key.clone_key(),
                self.roots.clone(),
                expected.to_vec(),
                self.revocation.clone(),
            )
            .expect("a validated certificate makes a valid client config"),
        )
    }
}
