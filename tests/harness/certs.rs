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

/// A plugged-in CA directory made with the `openssl` command line the way Istio's
/// documentation makes one (`tools/certs`): an RSA 4096 root, an RSA 4096 intermediate
/// (`pathlen:0`) that signs, `cert-chain.pem` the intermediate then the root. The root's key
/// is PKCS#8 (what `openssl genrsa` writes today), the intermediate's PKCS#1 (`RSA PRIVATE
/// KEY`, as in Istio's `samples/certs`). Returns the directory (`<dir>/cacerts`).
pub fn openssl_cacerts(dir: &Path) -> Result<PathBuf> {
    let run = |args: &[&str]| -> Result<()> {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("run openssl (is it installed?)")?;
        anyhow::ensure!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let conf = |name: &str, ext: &str, dn: &str| -> Result<()> {
        let text = format!(
            "[ req ]\nprompt = no\nencrypt_key = no\ndefault_md = sha256\n\
             distinguished_name = req_dn\nreq_extensions = req_ext\nx509_extensions = req_ext\n\
             [ req_ext ]\nsubjectKeyIdentifier = hash\n{ext}\n[ req_dn ]\n{dn}\n"
        );
        std::fs::write(dir.join(name), text).context("write an openssl configuration")
    };
    conf(
        "root.conf",
        "basicConstraints = critical, CA:true\n\
         keyUsage = critical, digitalSignature, nonRepudiation, keyEncipherment, keyCertSign",
        "O = Istio\nCN = Root CA",
    )?;
    conf(
        "intermediate.conf",
        "basicConstraints = critical, CA:true, pathlen:0\n\
         keyUsage = critical, digitalSignature, nonRepudiation, keyEncipherment, keyCertSign\n\
         subjectAltName = DNS:istiod.istio-system.svc",
        "O = Istio\nCN = Intermediate CA\nL = cluster1",
    )?;
    run(&["genrsa", "-out", "root-key.pem", "4096"])?;
    run(&[
        "req",
        "-new",
        "-sha256",
        "-key",
        "root-key.pem",
        "-config",
        "root.conf",
        "-out",
        "root.csr",
    ])?;
    run(&[
        "x509",
        "-req",
        "-sha256",
        "-days",
        "3650",
        "-signkey",
        "root-key.pem",
        "-extensions",
        "req_ext",
        "-extfile",
        "root.conf",
        "-in",
        "root.csr",
        "-out",
        "root-cert.pem",
    ])?;
    run(&["genrsa", "-traditional", "-out", "ca-key.pem", "4096"])?;
    run(&[
        "req",
        "-new",
        "-sha256",
        "-key",
        "ca-key.pem",
        "-config",
        "intermediate.conf",
        "-out",
        "ca.csr",
    ])?;
    run(&[
        "x509",
        "-req",
        "-sha256",
        "-days",
        "3650",
        "-CA",
        "root-cert.pem",
        "-CAkey",
        "root-key.pem",
        "-CAcreateserial",
        "-extensions",
        "req_ext",
        "-extfile",
        "intermediate.conf",
        "-in",
        "ca.csr",
        "-out",
        "ca-cert.pem",
    ])?;
    let out = dir.join("cacerts");
    std::fs::create_dir_all(&out)?;
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).with_context(|| f.to_owned());
    let key = read("ca-key.pem")?;
    anyhow::ensure!(
        key.starts_with("-----BEGIN RSA PRIVATE KEY-----"),
        "openssl wrote the signing key in another format than PKCS#1"
    );
    std::fs::write(out.join("ca-key.pem"), key)?;
    std::fs::write(out.join("ca-cert.pem"), read("ca-cert.pem")?)?;
    std::fs::write(out.join("root-cert.pem"), read("root-cert.pem")?)?;
    std::fs::write(
        out.join("cert-chain.pem"),
        read("ca-cert.pem")? + &read("root-cert.pem")?,
    )?;
    Ok(out)
}
