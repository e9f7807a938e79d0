//! Certificate revocation: the lists (CRLs) a daemon reads from a file, and the check that a
//! peer's chain is not revoked, at its handshake and for as long as its connection lasts.
//!
//! A file holds PEM text with one or more `X509 CRL` blocks, or one DER list; a file that is
//! empty (or only whitespace) revokes nothing. Each list is parsed when the file is read
//! ([`CrlFile`]), so a malformed one is refused then: at start the daemon does not start, and
//! later the lists in force stay as they were ([`Revocation`] only ever holds lists that
//! parsed).
//!
//! A chain is checked as Istio's ztunnel checks it: every certificate of the path to our
//! roots (not only the leaf) against the lists of its issuer, whose signature on the list
//! must verify; a certificate whose issuer published no list passes (its status is unknown,
//! not revoked), and a list past its next update still counts (a revocation does not lapse
//! because the file went stale). The check runs after the handshake's own verification, so
//! it can only refuse more.
//!
//! A verdict is kept per chain (with the roots it was verified against) until the lists
//! change, so a peer that dials again costs a digest rather than a check (the check verifies a
//! path and the list's signature over its whole body: hundreds of microseconds for a long
//! list). A connection keeps the chain its peer presented ([`PeerChain`]), judged again each
//! time the lists change, at the time of its handshake (a certificate that expires during a
//! connection is not what revocation is about), so the many streams of one connection cost
//! one check.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::{CertificateError, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use tokio::sync::watch;
use webpki::{
    CertRevocationList, EndEntityCert, ExpirationPolicy, KeyUsage, OwnedCertRevocationList,
    RevocationCheckDepth, RevocationOptionsBuilder, UnknownStatusPolicy,
};

/// Why a revocation file could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum CrlError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("PEM: {0}")]
    Pem(String),
    #[error("PEM text without an X509 CRL block")]
    NoList,
    #[error("revocation list {index}: {error:?}")]
    List { index: usize, error: webpki::Error },
}

/// A set of parsed revocation lists.
#[derive(Debug, Default)]
pub struct Crls {
    lists: Vec<CertRevocationList<'static>>,
}

impl Crls {
    /// The lists in a file's contents: PEM with `X509 CRL` blocks (other blocks and text
    /// around them are skipped), one DER list, or nothing.
    pub fn parse(bytes: &[u8]) -> Result<Crls, CrlError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Crls::default());
        }
        // A DER list is one SEQUENCE; anything else is read as PEM text, which may have lines
        // before its first block (and a byte-order mark, which would hide a first one).
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        let ders: Vec<CertificateRevocationListDer<'static>> = if bytes.first() != Some(&0x30) {
            let ders = CertificateRevocationListDer::pem_slice_iter(bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| CrlError::Pem(e.to_string()))?;
            if ders.is_empty() {
                return Err(CrlError::NoList);
            }
            ders
        } else {
            vec![CertificateRevocationListDer::from(bytes.to_vec())]
        };
        let lists = ders
            .iter()
            .enumerate()
            .map(|(index, der)| {
                OwnedCertRevocationList::from_der(der.as_ref())
                    .map(CertRevocationList::from)
                    .map_err(|error| CrlError::List {
                        index: index + 1,
                        error,
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Crls { lists })
    }

    /// How many lists the set holds.
    pub fn len(&self) -> usize {
        self.lists.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lists.is_empty()
    }

    /// Whether the chain of `leaf` and `intermediates` is revoked anywhere on its path to
    /// `roots`, as of `time`; when it is not, the digests of the intermediates on that path.
    fn check(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        roots: &RootCertStore,
        algs: WebPkiSupportedAlgorithms,
        usage: Usage,
        time: UnixTime,
    ) -> Result<Vec<[u8; 32]>, webpki::Error> {
        if self.lists.is_empty() {
            return Ok(Vec::new());
        }
        let lists: Vec<&CertRevocationList<'_>> = self.lists.iter().collect();
        let Ok(options) = RevocationOptionsBuilder::new(&lists) else {
            return Ok(Vec::new());
        };
        let options = options
            .with_depth(RevocationCheckDepth::Chain)
            .with_status_policy(UnknownStatusPolicy::Allow)
            .with_expiration_policy(ExpirationPolicy::Ignore)
            .build();
        let leaf = EndEntityCert::try_from(leaf)?;
        let usage = match usage {
            Usage::Client => KeyUsage::client_auth(),
            Usage::Server => KeyUsage::server_auth(),
        };
        leaf.verify_for_usage(
            algs.all,
            &roots.roots,
            intermediates,
            time,
            usage,
            Some(options),
            None,
        )
        .map(|path| {
            path.intermediate_certificates()
                .map(|c| digest(&c.der()))
                .collect()
        })
    }
}

/// The revocation file, as last read.
#[derive(Debug)]
pub struct CrlFile {
    path: PathBuf,
    last: Option<Vec<u8>>,
    /// The last read error, so that a file that stays unreadable is reported once.
    failing: Option<std::io::ErrorKind>,
}

impl CrlFile {
    /// Reads the file at start: its lists, none while it is missing (it may be mounted
    /// later), or the error that keeps the daemon from starting.
    pub fn open(path: &Path) -> Result<(CrlFile, Crls), CrlError> {
        let mut file = CrlFile {
            path: path.to_owned(),
            last: None,
            failing: None,
        };
        match std::fs::read(path) {
            Ok(bytes) => {
                let crls = Crls::parse(&bytes)?;
                file.last = Some(bytes);
                Ok((file, crls))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(path = %path.display(), "no revocation file yet; no certificate is revoked until it appears");
                Ok((file, Crls::default()))
            }
            Err(source) => Err(file.read_error(source)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file again: `Ok(None)` when it is unchanged or gone (the lists in force are
    /// kept: a revocation does not lapse because a file vanished), `Ok(Some(lists))` when it
    /// changed, `Err` when it cannot be read or parsed (once for each change, or for each
    /// new read error).
    pub async fn reread(&mut self) -> Result<Option<Crls>, CrlError> {
        let bytes = match tokio::fs::read(&self.path).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) if self.failing == Some(e.kind()) => return Ok(None),
            Err(source) => {
                self.failing = Some(source.kind());
                return Err(self.read_error(source));
            }
        };
        self.failing = None;
        if self.last.as_ref() == Some(&bytes) {
            return Ok(None);
        }
        let parsed = Crls::parse(&bytes);
        self.last = Some(bytes);
        parsed.map(Some)
    }

    fn read_error(&self, source: std::io::Error) -> CrlError {
        CrlError::Read {
            path: self.path.display().to_string(),
            source,
        }
    }
}

/// Which end of a handshake presented a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// A tunnel client (the inbound side checks it).
    Client,
    /// A tunnel server (the outbound side checks it).
    Server,
}

/// The revocation lists in force for a daemon, shared by its TLS verifiers and its live
/// connections; none when no file is configured. Replacing the lists wakes every
/// [`PeerChain::until_revoked`].
#[derive(Clone, Debug, Default)]
pub struct Revocation(Option<Arc<Shared>>);

#[derive(Debug)]
struct Shared {
    /// The lists in force and their generation (one more at each replacement), read together.
    lists: watch::Sender<(u64, Arc<Crls>)>,
    /// The verdicts on chains already checked, by [`verdict_key`], and the generation of the
    /// lists they were given under: a peer that dials again costs a few digests, not a check.
    verdicts: Mutex<(u64, Verdicts)>,
}

/// Verdicts by [`verdict_key`] (a leaf, the roots, the end), each with the digests of the
/// intermediates its check used (the path it built; for a refusal, every one presented):
/// a later chain with that leaf gets the verdict when it presents all of them, whatever else
/// it presents, so certificates added to a chain neither miss the verdict nor crowd others
/// out.
type Verdicts = HashMap<[u8; 32], (Vec<[u8; 32]>, Result<(), rustls::Error>)>;

/// At most this many verdicts are kept (one leaf each); beyond it one is let go for each new
/// one, and all when the lists change. Only chains that verified against our roots reach the
/// check, so the distinct leaves are the mesh's certificates.
const VERDICTS: usize = 4096;

impl Revocation {
    /// Checks against `crls`, until [`Self::replace`]d.
    pub fn new(crls: Crls) -> Revocation {
        Revocation(Some(Arc::new(Shared {
            lists: watch::Sender::new((1, Arc::new(crls))),
            verdicts: Mutex::new((1, HashMap::new())),
        })))
    }

    /// Whether lists are configured at all.
    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Verdicts kept now.
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.0.as_ref().map_or(0, |s| s.verdicts.lock().1.len())
    }

    /// Puts `crls` in force: new handshakes are checked against them, and every
    /// [`PeerChain`] is judged again.
    pub fn replace(&self, crls: Crls) {
        if let Some(s) = &self.0 {
            s.lists.send_modify(|(generation, lists)| {
                *generation += 1;
                *lists = Arc::new(crls);
            });
        }
    }

    /// How many lists are in force; `None` when no lists are configured.
    pub fn lists_in_force(&self) -> Option<usize> {
        self.0.as_ref().map(|s| s.lists.borrow().1.len())
    }

    /// Resolves when the lists are replaced next; never when no lists are configured.
    pub async fn changed(&self) {
        let Some(s) = &self.0 else {
            return std::future::pending().await;
        };
        let mut changes = s.lists.subscribe();
        if changes.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    fn generation(&self) -> u64 {
        self.0.as_ref().map_or(0, |s| s.lists.borrow().0)
    }

    /// Checks a chain (`leaf` and `intermediates`) a handshake has verified against the lists
    /// in force, as the TLS error that refuses it (`Revoked` when a list revokes one of its
    /// certificates). Nothing is done when no lists are configured.
    pub fn verify(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        roots: &RootCertStore,
        algs: WebPkiSupportedAlgorithms,
        usage: Usage,
        time: UnixTime,
    ) -> Result<(), rustls::Error> {
        let Some(s) = &self.0 else { return Ok(()) };
        let (generation, lists) = s.lists.borrow().clone();
        let key = verdict_key(leaf, roots, usage);
        let presented: Vec<[u8; 32]> = intermediates.iter().map(|c| digest(c)).collect();
        {
            let verdicts = s.verdicts.lock();
            if verdicts.0 == generation {
                if let Some((used, v)) = verdicts.1.get(&key) {
                    if used.iter().all(|u| presented.contains(u)) {
                        return v.clone();
                    }
                }
            }
        }
        let (used, verdict) = match lists.check(leaf, intermediates, roots, algs, usage, time) {
            Ok(used) => (used, Ok(())),
            Err(e) => (presented, Err(tls_error(e))),
        };
        let mut verdicts = s.verdicts.lock();
        if verdicts.0 < generation {
            *verdicts = (generation, HashMap::new());
        }
        if verdicts.0 == generation {
            if verdicts.1.len() >= VERDICTS && !verdicts.1.contains_key(&key) {
                if let Some(k) = verdicts.1.keys().next().copied() {
                    verdicts.1.remove(&k);
                }
            }
            verdicts.1.insert(key, (used, verdict.clone()));
        }
        verdict
    }
}

/// What a verdict is kept under, besides the lists: the leaf, the roots it was verified
/// against, and which end presented it (SHA-256 of each, length-prefixed); the intermediates
/// are kept beside it ([`Verdicts`]).
fn verdict_key(leaf: &CertificateDer<'_>, roots: &RootCertStore, usage: Usage) -> [u8; 32] {
    let mut d = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut add = |bytes: &[u8]| {
        d.update(&(bytes.len() as u64).to_be_bytes());
        d.update(bytes);
    };
    add(&[usage as u8]);
    add(leaf.as_ref());
    for r in &roots.roots {
        add(r.subject.as_ref());
        add(r.subject_public_key_info.as_ref());
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(d.finish().as_ref());
    key
}

/// SHA-256 of a certificate.
fn digest(c: &CertificateDer<'_>) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, c.as_ref()).as_ref());
    out
}

/// The TLS error for a failed revocation check.
fn tls_error(e: webpki::Error) -> rustls::Error {
    let e = match e {
        webpki::Error::CertRevoked => CertificateError::Revoked,
        webpki::Error::UnknownRevocationStatus => CertificateError::UnknownRevocationStatus,
        webpki::Error::InvalidCrlSignatureForPublicKey => CertificateError::BadSignature,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(e)
}

/// Whether a TLS handshake's error (as tokio-rustls reports it) is this end's refusal of a
/// revoked peer certificate.
pub fn is_revoked_io(e: &std::io::Error) -> bool {
    matches!(
        e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::InvalidCertificate(CertificateError::Revoked))
    )
}

/// Whether a QUIC handshake's error is this end's refusal of a revoked peer certificate: the
/// TLS alert `certificate_revoked` (44), sent by this end.
pub fn is_revoked_quic(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::TransportError(t)
        if t.code == quinn::TransportErrorCode::crypto(CERTIFICATE_REVOKED_ALERT))
}

/// The TLS alert rustls sends for a revoked certificate.
const CERTIFICATE_REVOKED_ALERT: u8 = 44;

/// The chain a peer presented, kept with its connection so that it can be judged again when
/// the lists of the daemon that verified it change (the certificate manager keeps its own
/// certificates' chains so, to renew one the lists revoke).
#[derive(Debug)]
pub struct PeerChain {
    chain: Vec<CertificateDer<'static>>,
    roots: Arc<RootCertStore>,
    usage: Usage,
    revocation: Revocation,
    algs: WebPkiSupportedAlgorithms,
    verified_at: UnixTime,
    /// The generation last judged, and whether the chain was still trusted then.
    judged: Mutex<(u64, bool)>,
}

impl PeerChain {
    /// The chain `chain` (leaf first) that a handshake verified against `roots` (or a
    /// certificate of our own), to be judged with the signature algorithms `algs` at its first
    /// [`Self::trusted`] and again whenever the lists of `revocation` change: the lists a
    /// handshake checked it against may have been replaced before its connection keeps it;
    /// copied only when lists are configured (without, it is never judged).
    pub fn new(
        chain: &[CertificateDer<'_>],
        roots: Arc<RootCertStore>,
        usage: Usage,
        revocation: Revocation,
        algs: WebPkiSupportedAlgorithms,
    ) -> Self {
        let chain = match revocation.enabled() {
            true => chain.iter().map(|c| c.clone().into_owned()).collect(),
            false => Vec::new(),
        };
        PeerChain {
            chain,
            roots,
            usage,
            revocation,
            algs,
            verified_at: UnixTime::now(),
            // Generations start at 1 when lists are configured; without, it stays 0.
            judged: Mutex::new((0, true)),
        }
    }

    /// Whether no list in force revokes the chain (judged again only when they changed).
    pub fn trusted(&self) -> bool {
        let generation = self.revocation.generation();
        let mut judged = self.judged.lock();
        if judged.0 != generation {
            let (roots, algs, time) = (&self.roots, self.algs, self.verified_at);
            let ok = self.chain.split_first().is_some_and(|(leaf, rest)| {
                let verdict = self
                    .revocation
                    .verify(leaf, rest, roots, algs, self.usage, time);
                verdict.is_ok()
            });
            *judged = (generation, ok);
        }
        judged.1
    }

    /// Resolves once the lists in force revoke the chain; never when no lists are configured.
    pub async fn until_revoked(&self) {
        let Some(s) = &self.revocation.0 else {
            return std::future::pending().await;
        };
        let mut changes = s.lists.subscribe();
        loop {
            if !self.trusted() {
                return;
            }
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::ca::{issue, LocalCa};
    use crate::identity::{Identity, WorkloadCert};

    const DAY: Duration = Duration::from_secs(86400);

    fn id(s: &str) -> Identity {
        s.parse().unwrap()
    }

    fn algs() -> WebPkiSupportedAlgorithms {
        crate::identity::tls::provider().signature_verification_algorithms
    }

    fn list(ca: &LocalCa, serials: &[&str]) -> String {
        ca.revocation_list(serials, 1, SystemTime::now(), DAY)
            .unwrap()
    }

    #[test]
    fn files_are_parsed_as_pem_der_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path(), "cluster.local").unwrap();
        let one = list(&ca, &["0a1b"]);
        let two = format!("{one}{}", list(&ca, &["0c"]));
        let der = CertificateRevocationListDer::from_pem_slice(one.as_bytes()).unwrap();
        let with_cert = format!("{}{one}", ca.root_pem());
        let cases: Vec<(&str, Vec<u8>, Result<usize, &str>)> = vec![
            ("empty", vec![], Ok(0)),
            ("whitespace", b" \n\t\n".to_vec(), Ok(0)),
            ("one PEM list", one.clone().into_bytes(), Ok(1)),
            ("two PEM lists", two.into_bytes(), Ok(2)),
            ("a certificate beside a list", with_cert.into_bytes(), Ok(1)),
            ("one DER list", der.as_ref().to_vec(), Ok(1)),
            (
                "PEM without a list",
                ca.root_pem().into_bytes(),
                Err("without an X509 CRL"),
            ),
            (
                "PEM after a blank line and text",
                format!("\n# revoked today\n{one}").into_bytes(),
                Ok(1),
            ),
            (
                "PEM after a byte-order mark",
                format!("\u{feff}{one}").into_bytes(),
                Ok(1),
            ),
            (
                "garbage",
                b"not a list".to_vec(),
                Err("without an X509 CRL"),
            ),
            (
                "garbage that looks like DER",
                b"0 not a list".to_vec(),
                Err("revocation list 1"),
            ),
            (
                "a truncated list",
                der.as_ref()[..der.as_ref().len() / 2].to_vec(),
                Err("revocation list 1"),
            ),
        ];
        for (name, bytes, want) in cases {
            let got = Crls::parse(&bytes)
                .map(|c| c.len())
                .map_err(|e| e.to_string());
            match (got, want) {
                (Ok(n), Ok(w)) => assert_eq!(n, w, "{name}"),
                (Err(e), Err(w)) => assert!(e.contains(w), "{name}: {e}"),
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    /// A handshake between `client` (expecting `server`'s identity) and `server`: the
    /// client's and the server's errors, if any.
    async fn handshake(
        client: &WorkloadCert,
        server: &WorkloadCert,
    ) -> (Option<std::io::Error>, Option<std::io::Error>) {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let acceptor = TlsAcceptor::from(server.server_config());
        let connector =
            TlsConnector::from(client.client_config(std::slice::from_ref(&server.identity)));
        let name =
            rustls_pki_types::ServerName::IpAddress(std::net::IpAddr::from([10, 0, 0, 1]).into());
        let (c, s) = tokio::join!(connector.connect(name, c), acceptor.accept(s));
        (c.err(), s.err())
    }

    /// Lists for one end, from the client's and the server's serials.
    type Lists = Box<dyn Fn(&str, &str) -> Option<String>>;

    #[derive(Debug, PartialEq)]
    enum Want {
        Pass,
        ClientRefusesRevoked,
        ServerRefusesRevoked,
        ClientRefuses,
    }

    /// Which end refuses, and whether it says the other is revoked: each end's own lists are
    /// checked against the chain the other presents, and only lists signed by the chain's
    /// issuer count.
    #[tokio::test]
    async fn each_end_refuses_a_peer_its_lists_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(LocalCa::load_or_create(&dir.path().join("a"), "cluster.local").unwrap());
        // Another issuer, and one with our issuer's name but another key (a forged list).
        let other =
            Arc::new(LocalCa::load_or_create(&dir.path().join("b"), "other.local").unwrap());
        let forger =
            Arc::new(LocalCa::load_or_create(&dir.path().join("c"), "cluster.local").unwrap());
        let none = || -> Lists { Box::new(|_, _| None) };
        let by = |ca: &Arc<LocalCa>, pick: fn(&str, &str) -> Vec<String>| -> Lists {
            let ca = ca.clone();
            Box::new(move |c, s| {
                let serials = pick(c, s);
                let serials: Vec<&str> = serials.iter().map(String::as_str).collect();
                Some(list(&ca, &serials))
            })
        };
        let client_serial = |c: &str, _: &str| vec![c.to_owned()];
        let server_serial = |_: &str, s: &str| vec![s.to_owned()];
        let others = |_: &str, _: &str| vec!["01".to_owned(), "02".to_owned()];
        let nothing = |_: &str, _: &str| vec![];
        let cases: Vec<(&str, Lists, Lists, Want)> = vec![
            ("no lists", none(), none(), Want::Pass),
            (
                "lists that revoke nothing",
                by(&ca, nothing),
                by(&ca, nothing),
                Want::Pass,
            ),
            (
                "lists of other serials",
                by(&ca, others),
                by(&ca, others),
                Want::Pass,
            ),
            (
                "the server's lists revoke the client",
                none(),
                by(&ca, client_serial),
                Want::ServerRefusesRevoked,
            ),
            (
                "the client's lists revoke the server",
                by(&ca, server_serial),
                none(),
                Want::ClientRefusesRevoked,
            ),
            (
                "a server's lists that revoke itself",
                none(),
                by(&ca, server_serial),
                Want::Pass,
            ),
            (
                "another issuer's list with the server's serial",
                by(&other, server_serial),
                none(),
                Want::Pass,
            ),
            (
                "a forged list in our issuer's name",
                by(&forger, nothing),
                none(),
                Want::ClientRefuses,
            ),
        ];
        for (name, client_lists, server_lists, want) in cases {
            let client = issue(&ca, &id("spiffe://cluster.local/ns/a/sa/client"), DAY).unwrap();
            let server = issue(&ca, &id("spiffe://cluster.local/ns/b/sa/server"), DAY).unwrap();
            let rev = |lists: &Lists| {
                lists(&client.serial, &server.serial).map_or(Revocation::default(), |pem| {
                    Revocation::new(Crls::parse(pem.as_bytes()).unwrap())
                })
            };
            let (c_rev, s_rev) = (rev(&client_lists), rev(&server_lists));
            let (client, server) = (client.with_revocation(c_rev), server.with_revocation(s_rev));
            let got = match handshake(&client, &server).await {
                (None, None) => Want::Pass,
                (Some(e), _) if is_revoked_io(&e) => Want::ClientRefusesRevoked,
                (_, Some(e)) if is_revoked_io(&e) => Want::ServerRefusesRevoked,
                (Some(_), _) => Want::ClientRefuses,
                (None, Some(e)) => panic!("{name}: server error {e}"),
            };
            assert_eq!(got, want, "{name}");
        }
    }

    /// A connection's chain is judged against the lists in force when it is kept, and again
    /// when they change, and only then; without lists it is never revoked.
    #[tokio::test]
    async fn a_kept_chain_is_judged_again_when_the_lists_change() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path(), "cluster.local").unwrap();
        let peer = issue(&ca, &id("spiffe://cluster.local/ns/a/sa/peer"), DAY).unwrap();
        let roots = peer.roots.clone();
        let rev = Revocation::new(Crls::default());
        // Lists that revoke it, put in force after the handshake checked it and before its
        // connection keeps it: judged against them.
        rev.replace(Crls::parse(list(&ca, &[&peer.serial]).as_bytes()).unwrap());
        let late = PeerChain::new(
            &peer.chain,
            roots.clone(),
            Usage::Client,
            rev.clone(),
            algs(),
        );
        assert!(!late.trusted());
        rev.replace(Crls::default());
        let chain = PeerChain::new(
            &peer.chain,
            roots.clone(),
            Usage::Client,
            rev.clone(),
            algs(),
        );
        assert!(chain.trusted());

        let revoked = chain.until_revoked();
        tokio::pin!(revoked);
        // Lists that name other serials: still trusted, still waiting.
        rev.replace(Crls::parse(list(&ca, &["01"]).as_bytes()).unwrap());
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut revoked)
                .await
                .is_err()
        );
        assert!(chain.trusted());
        // Lists that name its serial: revoked, and the waiter wakes.
        rev.replace(Crls::parse(list(&ca, &[&peer.serial]).as_bytes()).unwrap());
        tokio::time::timeout(Duration::from_secs(5), &mut revoked)
            .await
            .expect("woken by the change");
        assert!(!chain.trusted());
        // Taken back: trusted again.
        rev.replace(Crls::default());
        assert!(chain.trusted());

        let unchecked = PeerChain::new(
            &peer.chain,
            roots,
            Usage::Client,
            Revocation::default(),
            algs(),
        );
        assert!(unchecked.trusted());
        assert!(
            tokio::time::timeout(Duration::from_millis(50), unchecked.until_revoked())
                .await
                .is_err()
        );
    }

    /// A verdict is kept per leaf with the intermediates its path used: a chain with other
    /// certificates added gets it (and takes no other place), one without the intermediate
    /// is checked again, and lists that revoke the intermediate refuse the leaf however it is
    /// presented.
    #[test]
    fn a_verdict_is_kept_per_leaf_whatever_else_a_chain_carries() {
        let root = crate::ca::CaMaterial::generate("cluster.local").unwrap();
        let (material, intermediate) = crate::ca::intermediate_of(&root).unwrap();
        let root_ca = LocalCa::from_material(&root, "cluster.local").unwrap();
        let ca = LocalCa::from_material(&material, "cluster.local").unwrap();
        let peer = issue(&ca, &id("spiffe://cluster.local/ns/a/sa/peer"), DAY).unwrap();
        let other = issue(&ca, &id("spiffe://cluster.local/ns/a/sa/other"), DAY).unwrap();
        let (leaf, inter) = (&peer.chain[0], &peer.chain[1]);
        let roots = &peer.roots;
        let now = UnixTime::now();
        let rev = Revocation::new(Crls::parse(list(&root_ca, &["01"]).as_bytes()).unwrap());
        let verify = |rev: &Revocation, leaf, rest: &[CertificateDer<'static>]| {
            rev.verify(leaf, rest, roots, algs(), Usage::Client, now)
        };
        assert!(verify(&rev, leaf, std::slice::from_ref(inter)).is_ok());
        assert_eq!(rev.kept(), 1);
        // Other certificates beside the intermediate, in any number: the same verdict, no
        // other place taken.
        for junk in 0..20 {
            let mut rest = vec![other.chain[0].clone(); junk % 3];
            rest.push(inter.clone());
            assert!(verify(&rev, leaf, &rest).is_ok());
        }
        assert_eq!(rev.kept(), 1);
        // The lists revoke the intermediate: refused, with or without extras.
        let revoked = list(&root_ca, &[&intermediate]);
        rev.replace(Crls::parse(revoked.as_bytes()).unwrap());
        assert!(verify(&rev, leaf, std::slice::from_ref(inter)).is_err());
        let with_extra = [other.chain[0].clone(), inter.clone()];
        assert!(verify(&rev, leaf, &with_extra).is_err());
        assert!(verify(&rev, leaf, std::slice::from_ref(inter)).is_err());
        assert_eq!(rev.kept(), 1, "one place per leaf");
    }

    /// The file is read at start (missing: no lists yet; malformed: an error), and again
    /// only when its bytes change; a malformed or vanished file keeps the lists in force.
    #[tokio::test]
    async fn the_file_is_read_again_only_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(&dir.path().join("ca"), "cluster.local").unwrap();
        let path = dir.path().join("crl.pem");
        let (mut file, crls) = CrlFile::open(&path).unwrap();
        assert!(crls.is_empty());
        assert!(file.reread().await.unwrap().is_none());

        let one = list(&ca, &["01"]);
        std::fs::write(&path, &one).unwrap();
        assert_eq!(file.reread().await.unwrap().map(|c| c.len()), Some(1));
        assert!(file.reread().await.unwrap().is_none(), "unchanged");

        std::fs::write(&path, "garbage").unwrap();
        assert!(file.reread().await.is_err());
        assert!(
            file.reread().await.unwrap().is_none(),
            "refused once per change"
        );

        std::fs::remove_file(&path).unwrap();
        assert!(file.reread().await.unwrap().is_none(), "gone: lists kept");

        std::fs::create_dir(&path).unwrap();
        assert!(file.reread().await.is_err(), "unreadable");
        assert!(file.reread().await.unwrap().is_none(), "reported once");
        std::fs::remove_dir(&path).unwrap();

        std::fs::write(&path, "garbage").unwrap();
        assert!(CrlFile::open(&path).is_err(), "malformed at start");
    }
}
