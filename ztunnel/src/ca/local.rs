//! The CA's signing material and the signing itself, from a directory in the layout Istio
//! users keep for a plugged-in CA:
//!
//! | file | content |
//! |---|---|
//! | `ca-cert.pem` | the signing certificate |
//! | `ca-key.pem` | its private key (mode 0600) |
//! | `root-cert.pem` | the trust bundle: one or more roots |
//! | `cert-chain.pem` | the chain from the signing certificate up to the root |
//!
//! An empty or missing directory gets a fresh self-signed ECDSA P-256 root (10 years) in all
//! four files; a directory with only some of them is an error, never overwritten.
//!
//! Signing checks that the CSR is validly signed, that its only SAN is the URI SAN of the
//! requested SPIFFE ID, and that the ID is in the CA's trust domain. Leaves get that URI SAN
//! only, EKU serverAuth + clientAuth, a random 128-bit serial, and the requested lifetime
//! capped by the CA's maximum.

use std::fs;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use ztunnel_proto::ca::{SignRequest, SignResponse};

use super::Error;
use crate::identity::{parse_pem_certs, BoxFuture, CertSigner, Identity, SignError};

const FILES: [&str; 4] = [
    "ca-cert.pem",
    "ca-key.pem",
    "root-cert.pem",
    "cert-chain.pem",
];
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// Default cap on issued lifetimes.
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// A certificate authority loaded from (or created in) a plugged-in CA directory.
pub struct LocalCa {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// Certificates sent after a leaf: the signing certificate and intermediates, no root.
    intermediates_pem: Vec<String>,
    roots_pem: Vec<String>,
    max_lifetime: Duration,
}

fn pem_of(der: &CertificateDer<'_>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

fn read(dir: &Path, name: &str) -> Result<String, Error> {
    let path = dir.join(name);
    fs::read_to_string(&path).map_err(|source| Error::Io { path, source })
}

fn write(path: PathBuf, content: &str, mode: u32) -> Result<(), Error> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&path)
        .map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
    f.write_all(content.as_bytes())
        .map_err(|source| Error::Io { path, source })
}

fn offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut b)
        .expect("system randomness");
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // no leading zero byte
    SerialNumber::from_slice(&b)
}

impl LocalCa {
    /// Loads the CA from `dir`, creating a fresh root there when the directory is empty.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Self, Error> {
        let present: Vec<&str> = FILES
            .iter()
            .copied()
            .filter(|f| dir.join(f).exists())
            .collect();
        if present.is_empty() {
            Self::create(dir, trust_domain)?;
        } else if present.len() != FILES.len() {
            let missing: Vec<&str> = FILES
                .iter()
                .copied()
                .filter(|f| !present.contains(f))
                .collect();
            return Err(Error::Incomplete {
                dir: dir.to_path_buf(),
                missing: missing.join(", "),
            });
        }
        Self::load(dir, trust_domain)
    }

    fn create(dir: &Path, trust_domain: &str) -> Result<(), Error> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| Error::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "ztunnel root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = offset(now - Duration::from_secs(3600));
        params.not_after = offset(now + ROOT_LIFETIME);
        params.serial_number = Some(random_serial());
        let root = params.self_signed(&key)?;
        let root_pem = root.pem();
        write(dir.join("ca-key.pem"), &key.serialize_pem(), 0o600)?;
        write(dir.join("ca-cert.pem"), &root_pem, 0o644)?;
        write(dir.join("root-cert.pem"), &root_pem, 0o644)?;
        write(dir.join("cert-chain.pem"), &root_pem, 0o644)?;
        tracing::info!(dir = %dir.display(), "created a new self-signed root CA");
        Ok(())
    }

    fn load(dir: &Path, trust_domain: &str) -> Result<Self, Error> {
        let ca_cert = read(dir, "ca-cert.pem")?;
        let key = KeyPair::from_pem(&read(dir, "ca-key.pem")?)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_cert, key)?;
        let roots = parse_pem_certs(&[read(dir, "root-cert.pem")?])?;
        if roots.is_empty() {
            return Err(Error::Invalid("root-cert.pem holds no certificate".into()));
        }
        let signing = parse_pem_certs(&[ca_cert])?;
        let chain = parse_pem_certs(&[read(dir, "cert-chain.pem")?])?;
        let mut intermediates: Vec<CertificateDer<'static>> = Vec::new();
        for c in signing.iter().chain(chain.iter()) {
            if !roots.contains(c) && !intermediates.contains(c) {
                intermediates.push(c.clone());
            }
        }
        Ok(LocalCa {
            trust_domain: trust_domain.to_owned(),
            issuer,
            intermediates_pem: intermediates.iter().map(pem_of).collect(),
            roots_pem: roots.iter().map(pem_of).collect(),
            max_lifetime: DEFAULT_MAX_LIFETIME,
        })
    }

    /// Caps issued lifetimes at `max`.
    pub fn with_max_lifetime(mut self, max: Duration) -> Self {
        self.max_lifetime = max;
        self
    }

    /// The trust bundle, PEM.
    pub fn root_pem(&self) -> String {
        self.roots_pem.concat()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Signs a workload CSR at time `now`.
    pub fn sign(&self, req: &SignRequest, now: SystemTime) -> Result<SignResponse, Error> {
        let id: Identity = req
            .identity
            .parse()
            .map_err(|e| Error::BadRequest(format!("{e}")))?;
        if id.trust_domain() != self.trust_domain {
            return Err(Error::BadRequest(format!(
                "{id} is not in trust domain {}",
                self.trust_domain
            )));
        }
        let mut csr = CertificateSigningRequestParams::from_pem(&req.csr_pem)
            .map_err(|e| Error::BadRequest(format!("bad CSR: {e}")))?;
        let want = SanType::URI(id.to_string().try_into()?);
        if csr.params.subject_alt_names != [want.clone()] {
            return Err(Error::BadRequest(format!(
                "the CSR's SANs are not exactly the URI SAN {id}"
            )));
        }
        let lifetime = match Duration::from_secs(req.lifetime_secs) {
            d if d.is_zero() => self.max_lifetime,
            d => d.min(self.max_lifetime),
        };
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![want];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = offset(now - CLOCK_SKEW);
        params.not_after = offset(now + lifetime);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        csr.params = params;
        let leaf = csr.signed_by(&self.issuer)?;
        let mut chain = vec![leaf.pem()];
        chain.extend(self.intermediates_pem.iter().cloned());
        Ok(SignResponse {
            cert_chain_pem: chain,
            roots_pem: self.roots_pem.clone(),
        })
    }

    /// A serving certificate for the CA's own TLS endpoint: (chain PEM, key PEM).
    pub fn issue_server_cert(&self, names: &[String]) -> Result<(String, String), Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "ztunnel ca");
        params.distinguished_name = dn;
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n.clone().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = offset(now - CLOCK_SKEW);
        params.not_after = offset(now + Duration::from_secs(365 * 24 * 3600));
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut chain = cert.pem();
        for i in &self.intermediates_pem {
            chain.push_str(i);
        }
        Ok((chain, key.serialize_pem()))
    }
}

impl CertSigner for LocalCa {
    fn sign(&self, req: SignRequest) -> BoxFuture<'_, Result<SignResponse, SignError>> {
        Box::pin(async move {
            LocalCa::sign(self, &req, SystemTime::now()).map_err(|e| match e {
                Error::BadRequest(m) => SignError::Refused {
                    status: 400,
                    message: m,
                },
                other => SignError::Invalid(other.to_string()),
            })
        })
    }
}

/// Issues a certificate for `id` from `ca` in-process (tests, benchmarks, tools).
pub fn issue(
    ca: &LocalCa,
    id: &Identity,
    lifetime: Duration,
) -> Result<crate::identity::WorkloadCert, Error> {
    let kc = crate::identity::generate_csr(id)?;
    let now = SystemTime::now();
    let resp = ca.sign(
        &SignRequest {
            csr_pem: kc.csr_pem,
            identity: id.to_string(),
            lifetime_secs: lifetime.as_secs(),
        },
        now,
    )?;
    Ok(crate::identity::WorkloadCert::from_signed(
        id.clone(),
        &kc.key,
        &resp.cert_chain_pem,
        &resp.roots_pem,
        now,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::{FromDer, X509Certificate};

    fn id(s: &str) -> Identity {
        s.parse().unwrap()
    }

    #[test]
    fn creates_then_reloads_the_same_root() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let a = LocalCa::load_or_create(&ca_dir, "cluster.local").unwrap();
        for f in FILES {
            assert!(ca_dir.join(f).exists(), "{f}");
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(ca_dir.join("ca-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = LocalCa::load_or_create(&ca_dir, "cluster.local").unwrap();
        assert_eq!(a.root_pem(), b.root_pem());
    }

    #[test]
    fn partial_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        LocalCa::load_or_create(dir.path(), "cluster.local").unwrap();
        fs::remove_file(dir.path().join("cert-chain.pem")).unwrap();
        let err = LocalCa::load_or_create(dir.path(), "cluster.local")
            .err()
            .unwrap();
        assert!(err.to_string().contains("cert-chain.pem"), "{err}");
    }

    #[test]
    fn issued_leaf_has_uri_san_both_ekus_and_capped_lifetime() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path(), "cluster.local")
            .unwrap()
            .with_max_lifetime(Duration::from_secs(3600));
        let me = id("spiffe://cluster.local/ns/demo/sa/web");
        let cert = issue(&ca, &me, Duration::from_secs(48 * 3600)).unwrap();
        let (_, leaf) = X509Certificate::from_der(&cert.chain[0]).unwrap();
        assert_eq!(crate::identity::leaf_identity(&leaf).unwrap(), me);
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!leaf.is_ca());
        let life = cert.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(life <= Duration::from_secs(3600), "{life:?}");
        assert!(life > Duration::from_secs(3500), "{life:?}");
    }

    #[test]
    fn refuses_mismatched_csr_and_foreign_trust_domain() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path(), "cluster.local").unwrap();
        let kc =
            crate::identity::generate_csr(&id("spiffe://cluster.local/ns/demo/sa/web")).unwrap();
        let other = SignRequest {
            csr_pem: kc.csr_pem.clone(),
            identity: "spiffe://cluster.local/ns/demo/sa/admin".into(),
            lifetime_secs: 60,
        };
        assert!(matches!(
            ca.sign(&other, SystemTime::now()),
            Err(Error::BadRequest(_))
        ));
        let foreign =
            crate::identity::generate_csr(&id("spiffe://evil.local/ns/demo/sa/web")).unwrap();
        let req = SignRequest {
            csr_pem: foreign.csr_pem,
            identity: "spiffe://evil.local/ns/demo/sa/web".into(),
            lifetime_secs: 60,
        };
        assert!(matches!(
            ca.sign(&req, SystemTime::now()),
            Err(Error::BadRequest(_))
        ));
        let garbage = SignRequest {
            csr_pem: "not a csr".into(),
            identity: "spiffe://cluster.local/ns/demo/sa/web".into(),
            lifetime_secs: 60,
        };
        assert!(matches!(
            ca.sign(&garbage, SystemTime::now()),
            Err(Error::BadRequest(_))
        ));
    }
}
