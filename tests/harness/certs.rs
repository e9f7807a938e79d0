//! Workload certificates a test makes itself, outside the daemon and its CA's API: signed with
//! rcgen by the bed's CA key (the `--ca-dir` layout), with whatever URI SANs a test needs
//! (several, as another CA may issue them), as PEM files for an independent TLS stack and as
//! our TLS configurations for in-process peers.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use rcgen::{
    CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use ztunnel::identity::{Identity, WorkloadCert};

/// A leaf certificate of the bed's CA.
pub struct TestCert {
    /// What our TLS configurations are built from; its identity is the first URI SAN.
    pub cert: WorkloadCert,
    /// Leaf PEM (then the CA certificate when it is not the root).
    pub chain_pem: PathBuf,
    pub key_pem: PathBuf,
    pub roots_pem: PathBuf,
}

impl TestCert {
    /// Our client configuration, expecting a server with one of `expected`.
    pub fn client_config(&self, expected: &[&str]) -> Arc<rustls::ClientConfig> {
        let expected: Vec<Identity> = expected.iter().map(|e| e.parse().unwrap()).collect();
        self.cert.client_config(&expected)
    }

    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.cert.server_config()
    }
}

/// Signs a leaf with the URI SANs `uris` (each a SPIFFE ID) by the CA in `ca_dir`, writing its
/// files as `<dir>/<name>-{chain,key,roots}.pem`.
pub fn issue(ca_dir: &Path, dir: &Path, name: &str, uris: &[&str]) -> Result<TestCert> {
    let read = |f: &str| {
        std::fs::read_to_string(ca_dir.join(f)).with_context(|| format!("{f} in {ca_dir:?}"))
    };
    let (ca_cert, ca_key, root) = (
        read("ca-cert.pem")?,
        read("ca-key.pem")?,
        read("root-cert.pem")?,
    );
    let issuer = Issuer::from_ca_cert_pem(&ca_cert, KeyPair::from_pem(&ca_key)?)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = uris
        .iter()
        .map(|u| Ok(SanType::URI(u.to_string().try_into()?)))
        .collect::<Result<_>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(60)).into();
    params.not_after = (now + Duration::from_secs(3600)).into();
    let leaf = params.signed_by(&key, &issuer)?.pem();
    let mut chain = vec![leaf];
    if ca_cert.trim() != root.trim() {
        chain.push(ca_cert);
    }
    let first: Identity = uris
        .first()
        .context("at least one URI SAN")?
        .parse()
        .context("the first URI SAN is a SPIFFE ID")?;
    let cert = WorkloadCert::from_signed(first, &key, &chain, std::slice::from_ref(&root), now)?;
    let path = |what: &str| dir.join(format!("{name}-{what}.pem"));
    std::fs::write(path("chain"), chain.concat())?;
    std::fs::write(path("key"), key.serialize_pem())?;
    std::fs::write(path("roots"), &root)?;
    Ok(TestCert {
        cert,
        chain_pem: path("chain"),
        key_pem: path("key"),
        roots_pem: path("roots"),
    })
}
