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
//! The same four texts can come from elsewhere (a Secret, see `super::secret`) through
//! [`CaMaterial`] and [`LocalCa::from_material`]; material whose key does not match its
//! signing certificate is refused.
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
    BasicConstraints, CertificateParams, CertificateRevocationListParams,
    CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams, SanType,
    SerialNumber,
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

/// The four PEM texts of the plugged-in CA layout.
#[derive(Clone, PartialEq, Eq)]
pub struct CaMaterial {
    /// `ca-cert.pem`: the signing certificate.
    pub ca_cert: String,
    /// `ca-key.pem`: its private key.
    pub ca_key: String,
    /// `root-cert.pem`: the trust bundle, one or more roots.
    pub root_cert: String,
    /// `cert-chain.pem`: the chain from the signing certificate up to the root.
    pub cert_chain: String,
}

impl std::fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaMaterial")
            .field("ca_cert", &self.ca_cert)
            .field("ca_key", &"<redacted>")
            .field("root_cert", &self.root_cert)
            .finish_non_exhaustive()
    }
}

impl CaMaterial {
    /// The file (or Secret key) names, in the order of [`CaMaterial::files`].
    pub const NAMES: [&'static str; 4] = FILES;

    /// The four files of the layout in `dir`, as they are now (not checked).
    pub fn read(dir: &Path) -> Result<Self, Error> {
        Ok(CaMaterial {
            ca_cert: read(dir, "ca-cert.pem")?,
            ca_key: read(dir, "ca-key.pem")?,
            root_cert: read(dir, "root-cert.pem")?,
            cert_chain: read(dir, "cert-chain.pem")?,
        })
    }

    /// A fresh self-signed ECDSA P-256 root (10 years) that is also the signing certificate.
    pub fn generate(trust_domain: &str) -> Result<Self, Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "ztunnel root CA");
        let mut params = ca_params(dn, SystemTime::now(), ROOT_LIFETIME);
        params.serial_number = Some(random_serial());
        let root = params.self_signed(&key)?.pem();
        Ok(CaMaterial {
            ca_cert: root.clone(),
            ca_key: key.serialize_pem(),
            root_cert: root.clone(),
            cert_chain: root,
        })
    }

    /// (name, content) of each of the four files.
    pub fn files(&self) -> [(&'static str, &str); 4] {
        [
            (FILES[0], &self.ca_cert),
            (FILES[1], &self.ca_key),
            (FILES[2], &self.root_cert),
            (FILES[3], &self.cert_chain),
        ]
    }
}

fn pem_of(der: &CertificateDer<'_>) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
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

/// A CA certificate's parameters: `dn`, signing certificates and lists, valid from an hour
/// before `now` for `lifetime`.
fn ca_params(dn: DistinguishedName, now: SystemTime, lifetime: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = offset(now - Duration::from_secs(3600));
    params.not_after = offset(now + lifetime);
    params
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).expect("system randomness");
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
        let m = CaMaterial::generate(trust_domain)?;
        write(dir.join("ca-key.pem"), &m.ca_key, 0o600)?;
        write(dir.join("ca-cert.pem"), &m.ca_cert, 0o644)?;
        write(dir.join("root-cert.pem"), &m.root_cert, 0o644)?;
        write(dir.join("cert-chain.pem"), &m.cert_chain, 0o644)?;
        tracing::info!(dir = %dir.display(), "created a new self-signed root CA");
        Ok(())
    }

    fn load(dir: &Path, trust_domain: &str) -> Result<Self, Error> {
        Self::from_material(&CaMaterial::read(dir)?, trust_domain)
    }

    /// Loads the CA from the four PEM texts of the plugged-in CA layout (e.g. a Secret's data).
    pub fn from_material(m: &CaMaterial, trust_domain: &str) -> Result<Self, Error> {
        let key = KeyPair::from_pem(&m.ca_key)?;
        let issuer = Issuer::from_ca_cert_pem(&m.ca_cert, key)?;
        let roots = parse_pem_certs(std::slice::from_ref(&m.root_cert))?;
        if roots.is_empty() {
            return Err(Error::Invalid("root-cert.pem holds no certificate".into()));
        }
        let signing = parse_pem_certs(std::slice::from_ref(&m.ca_cert))?;
        if signing.is_empty() {
            return Err(Error::Invalid("ca-cert.pem holds no certificate".into()));
        }
        let chain = parse_pem_certs(std::slice::from_ref(&m.cert_chain))?;
        let mut intermediates: Vec<CertificateDer<'static>> = Vec::new();
        for c in signing.iter().chain(chain.iter()) {
            if !roots.contains(c) && !intermediates.contains(c) {
                intermediates.push(c.clone());
            }
        }
        let ca = LocalCa {
            trust_domain: trust_domain.to_owned(),
            issuer,
            intermediates_pem: intermediates.iter().map(pem_of).collect(),
            roots_pem: roots.iter().map(pem_of).collect(),
            max_lifetime: DEFAULT_MAX_LIFETIME,
        };
        ca.check_key_matches(&signing[0])?;
        Ok(ca)
    }

    /// Refuses material whose key does not belong to its signing certificate: a leaf signed
    /// with the wrong key would never verify, so such an update must not replace a good one.
    fn check_key_matches(&self, signing: &CertificateDer<'_>) -> Result<(), Error> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, cert) = X509Certificate::from_der(signing)
            .map_err(|e| Error::Invalid(format!("ca-cert.pem: {e}")))?;
        let spki = cert.public_key().subject_public_key.data.as_ref();
        if spki != rcgen::PublicKeyData::der_bytes(self.issuer.key()) {
            return Err(Error::Invalid(
                "ca-key.pem is not the key of ca-cert.pem".into(),
            ));
        }
        Ok(())
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

    /// How many roots the trust bundle holds (two during a rotation).
    pub fn root_count(&self) -> usize {
        self.roots_pem.len()
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
        check_csr_key(&req.csr_pem)?;
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
        csr.params = leaf_params(vec![want], now, lifetime);
        let leaf = csr.signed_by(&self.issuer)?;
        let mut chain = vec![leaf.pem()];
        chain.extend(self.intermediates_pem.iter().cloned());
        Ok(SignResponse {
            cert_chain_pem: chain,
            roots_pem: self.roots_pem.clone(),
        })
    }

    /// A certificate revocation list (PEM) signed by this CA, revoking the certificates it
    /// issued with the serial numbers `serials` (hex, as [`crate::identity::WorkloadCert`]
    /// gives them): list `number`, issued at `now`, next update after `validity`.
    pub fn revocation_list(
        &self,
        serials: &[&str],
        number: u64,
        now: SystemTime,
        validity: Duration,
    ) -> Result<String, Error> {
        let revoked_certs = serials
            .iter()
            .map(|hex| {
                let bytes = (0..hex.len())
                    .step_by(2)
                    .map(|i| {
                        hex.get(i..i + 2)
                            .and_then(|b| u8::from_str_radix(b, 16).ok())
                    })
                    .collect::<Option<Vec<u8>>>()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| Error::BadRequest(format!("bad serial number {hex:?}")))?;
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&bytes),
                    revocation_time: offset(now),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let params = CertificateRevocationListParams {
            this_update: offset(now),
            next_update: offset(now + validity),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
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

/// The parameters of a workload leaf with `sans`, valid from `now` (less the clock skew) for
/// `lifetime`: no CA, for both TLS ends.
fn leaf_params(sans: Vec<SanType>, now: SystemTime, lifetime: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
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
    params
}

/// A workload certificate for `id` whose leaf carries the URI SANs `uris` (in that order), as a
/// CA other than ours may issue: for tests of how such a peer is read.
#[cfg(test)]
pub(crate) fn issue_with_uris(
    ca: &LocalCa,
    id: &Identity,
    uris: &[&str],
) -> Result<crate::identity::WorkloadCert, Error> {
    let kc = crate::identity::generate_csr(id)?;
    let now = SystemTime::now();
    let mut csr = CertificateSigningRequestParams::from_pem(&kc.csr_pem)
        .map_err(|e| Error::BadRequest(format!("bad CSR: {e}")))?;
    let sans = uris
        .iter()
        .map(|u| Ok(SanType::URI(u.to_string().try_into()?)))
        .collect::<Result<_, Error>>()?;
    csr.params = leaf_params(sans, now, Duration::from_secs(3600));
    let leaf = csr.signed_by(&ca.issuer)?;
    let mut chain = vec![leaf.pem()];
    chain.extend(ca.intermediates_pem.iter().cloned());
    Ok(crate::identity::WorkloadCert::from_signed(
        id.clone(),
        &kc.key,
        &chain,
        &ca.roots_pem,
        now,
    )?)
}

/// Signing material whose signing certificate is an intermediate that `root`'s signing
/// certificate issued, and that intermediate's serial (hex): for tests of chains longer than
/// a leaf and its root.
#[cfg(test)]
pub(crate) fn intermediate_of(root: &CaMaterial) -> Result<(CaMaterial, String), Error> {
    let issuer = Issuer::from_ca_cert_pem(&root.ca_cert, KeyPair::from_pem(&root.ca_key)?)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "ztunnel intermediate CA");
    let day = Duration::from_secs(86400);
    let mut params = ca_params(dn, SystemTime::now(), day);
    let serial = random_serial();
    let hex: String = serial
        .to_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    params.serial_number = Some(serial);
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer)?.pem();
    let material = CaMaterial {
        ca_cert: cert.clone(),
        ca_key: key.serialize_pem(),
        root_cert: root.root_cert.clone(),
        cert_chain: format!("{cert}{}", root.root_cert),
    };
    Ok((material, hex))
}

/// Refuses a CSR whose key is not ECDSA P-256 signed with SHA-256: workload keys are P-256
/// (the identity contract), and a certificate for another key, signed as if it were one,
/// would not even parse.
fn check_csr_key(csr_pem: &str) -> Result<(), Error> {
    use x509_parser::oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ECDSA_WITH_SHA256,
    };
    use x509_parser::prelude::{FromDer, X509CertificationRequest};
    let bad = |why: &str| Error::BadRequest(format!("bad CSR: {why}"));
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(csr_pem.as_bytes()).map_err(|_| bad("not PEM"))?;
    let (_, csr) =
        X509CertificationRequest::from_der(&pem.contents).map_err(|_| bad("not a CSR"))?;
    let key = &csr.certification_request_info.subject_pki.algorithm;
    let curve = key.parameters.as_ref().and_then(|p| p.as_oid().ok());
    if key.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve.as_ref() != Some(&OID_EC_P256) {
        return Err(bad("the key is not ECDSA P-256"));
    }
    if csr.signature_algorithm.algorithm != OID_SIG_ECDSA_WITH_SHA256 {
        return Err(bad("not signed with ECDSA and SHA-256"));
    }
    Ok(())
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
    fn material_from_bytes_checks_the_key_and_keeps_every_root() {
        let a = CaMaterial::generate("cluster.local").unwrap();
        let b = CaMaterial::generate("cluster.local").unwrap();
        let ca = LocalCa::from_material(&a, "cluster.local").unwrap();
        assert_eq!(ca.root_count(), 1);
        let mismatched = CaMaterial {
            ca_key: b.ca_key.clone(),
            ..a.clone()
        };
        let err = LocalCa::from_material(&mismatched, "cluster.local")
            .err()
            .unwrap();
        assert!(err.to_string().contains("not the key"), "{err}");
        let no_roots = CaMaterial {
            root_cert: String::new(),
            ..a.clone()
        };
        assert!(LocalCa::from_material(&no_roots, "cluster.local").is_err());
        let garbage = CaMaterial {
            ca_cert: "junk".into(),
            ..a.clone()
        };
        assert!(LocalCa::from_material(&garbage, "cluster.local").is_err());
        // Rotation: b signs, the bundle holds both roots; leaves verify against it.
        let both = CaMaterial {
            root_cert: format!("{}{}", a.root_cert, b.root_cert),
            ..b.clone()
        };
        let ca = LocalCa::from_material(&both, "cluster.local").unwrap();
        assert_eq!(ca.root_count(), 2);
        let cert = issue(
            &ca,
            &id("spiffe://cluster.local/ns/d/sa/w"),
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(cert.chain.len(), 1, "a root signs: no intermediates sent");
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
        assert_eq!(crate::identity::leaf_identities(&leaf).unwrap(), vec![me]);
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!leaf.is_ca());
        let life = cert.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(life <= Duration::from_secs(3600), "{life:?}");
        assert!(life > Duration::from_secs(3500), "{life:?}");
    }

    /// Workload keys are P-256: a CSR for another key is refused, whatever it asks for.
    #[test]
    fn refuses_a_csr_whose_key_is_not_p256() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path(), "cluster.local").unwrap();
        let me = id("spiffe://cluster.local/ns/demo/sa/web");
        for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
            let key = KeyPair::generate_for(alg).unwrap();
            let mut params = CertificateParams::default();
            params.subject_alt_names = vec![SanType::URI(me.to_string().try_into().unwrap())];
            let csr = params.serialize_request(&key).unwrap().pem().unwrap();
            let req = SignRequest {
                csr_pem: csr,
                identity: me.to_string(),
                lifetime_secs: 60,
            };
            let err = ca.sign(&req, SystemTime::now()).unwrap_err();
            assert!(err.to_string().contains("not ECDSA P-256"), "{err}");
        }
        let ok = crate::identity::generate_csr(&me).unwrap();
        let req = SignRequest {
            csr_pem: ok.csr_pem,
            identity: me.to_string(),
            lifetime_secs: 60,
        };
        ca.sign(&req, SystemTime::now())
            .expect("a P-256 CSR is signed");
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
