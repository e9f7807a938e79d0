//! The certificate manager: one certificate per identity the node serves, fetched on first
//! use and renewed in the background at half-life.
//!
//! Each identity has a task that signs, publishes the certificate, sleeps until renewal is
//! due, and signs again; failures back off (1 s doubling to 30 s) while the previous
//! certificate, if still valid, stays in use, and once it has expired the failure is what
//! callers get. Concurrent first callers of [`CertManager::fetch`] share the one signing
//! request. A renewal only swaps the published `Arc`: connections made with the old
//! certificate keep it and are not disturbed.
//!
//! Renewal is due by the wall clock, which certificates are judged by, not by the time the
//! task has slept: it looks again every [`RECHECK`], so that a clock stepped forward (an NTP
//! correction, a suspended machine) renews within that time rather than after expiry; a
//! caller that finds the certificate expired all the same has it renewed at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{watch, Notify};
use ztunnel_proto::ca::SignRequest;

use super::crl::{PeerChain, Revocation};
use super::{generate_csr, CertSigner, Error, Identity, SignError, WorkloadCert};

#[derive(Clone, Debug)]
enum Slot {
    Pending,
    Ready(Arc<WorkloadCert>),
    Failed(Failure),
}

/// Why the last signing failed. A refusal by the CA keeps its type through [`CertManager::fetch`]:
/// readiness tells one identity's refusal from a CA that cannot be reached.
#[derive(Clone, Debug)]
enum Failure {
    Refused(SignError),
    Other(String),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        match e {
            Error::Sign(refused @ SignError::Refused { .. }) => Failure::Refused(refused),
            e => Failure::Other(e.to_string()),
        }
    }
}

struct Entry {
    slot: watch::Receiver<Slot>,
    task: tokio::task::JoinHandle<()>,
    /// Told by a caller that found the certificate expired: renew now.
    renew: Arc<Notify>,
    /// How many times the CA has refused this identity.
    refused: Counter,
}

#[derive(Default)]
struct Counters {
    issued: Counter,
    renewed: Counter,
    failed: Counter,
}

/// The wall clock certificates are judged by (injected in tests).
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// Certificates of the identities this node serves.
pub struct CertManager {
    signer: Arc<dyn CertSigner>,
    lifetime: Duration,
    clock: Clock,
    /// What the certificates' TLS configurations check peers against.
    revocation: Revocation,
    entries: Mutex<HashMap<Identity, Entry>>,
    counters: Arc<Counters>,
}

const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often a certificate's task looks at the wall clock while it waits for renewal.
const RECHECK: Duration = Duration::from_secs(10);

impl CertManager {
    /// Certificates from `signer`, of `lifetime`, whose TLS configurations check peers against
    /// `revocation`.
    pub fn new(
        signer: Arc<dyn CertSigner>,
        lifetime: Duration,
        revocation: Revocation,
    ) -> Arc<Self> {
        Self::with_clock(signer, lifetime, revocation, Arc::new(SystemTime::now))
    }

    /// [`CertManager::new`], judging certificates by `clock`.
    pub fn with_clock(
        signer: Arc<dyn CertSigner>,
        lifetime: Duration,
        revocation: Revocation,
        clock: Clock,
    ) -> Arc<Self> {
        Arc::new(CertManager {
            signer,
            lifetime,
            clock,
            revocation,
            entries: Mutex::default(),
            counters: Arc::default(),
        })
    }

    /// The current certificate of `id`, signing it first if needed. Never an expired one.
    pub async fn fetch(&self, id: &Identity) -> Result<Arc<WorkloadCert>, Error> {
        let mut rx = {
            let mut entries = self.entries.lock();
            match entries.get(id) {
                Some(e) => {
                    if matches!(&*e.slot.borrow(), Slot::Ready(c) if c.expired((self.clock)())) {
                        e.renew.notify_waiters();
                    }
                    e.slot.clone()
                }
                None => {
                    let (tx, rx) = watch::channel(Slot::Pending);
                    let renew = Arc::new(Notify::new());
                    let refused = Counter::default();
                    let task = tokio::spawn(keep(
                        Keeper {
                            signer: self.signer.clone(),
                            id: id.clone(),
                            lifetime: self.lifetime,
                            revocation: self.revocation.clone(),
                            counters: self.counters.clone(),
                            renew: renew.clone(),
                            refused: refused.clone(),
                            clock: self.clock.clone(),
                        },
                        tx,
                    ));
                    entries.insert(
                        id.clone(),
                        Entry {
                            slot: rx.clone(),
                            task,
                            renew,
                            refused,
                        },
                    );
                    rx
                }
            }
        };
        let slot = rx
            .wait_for(|s| match s {
                Slot::Pending => false,
                Slot::Ready(c) => !c.expired((self.clock)()),
                Slot::Failed(_) => true,
            })
            .await
            .map_err(|_| Error::Certificate(format!("certificate of {id} is no longer managed")))?
            .clone();
        match slot {
            Slot::Ready(c) => Ok(c),
            Slot::Failed(Failure::Refused(e)) => Err(Error::Sign(e)),
            Slot::Failed(Failure::Other(e)) => {
                Err(Error::Certificate(format!("no certificate for {id}: {e}")))
            }
            Slot::Pending => unreachable!("waited past pending"),
        }
    }

    /// How many times the CA has refused `id` since its certificate has been kept.
    pub fn refusals(&self, id: &Identity) -> u64 {
        self.entries.lock().get(id).map_or(0, |e| e.refused.get())
    }

    /// The identities whose certificates are kept.
    pub fn identities(&self) -> Vec<Identity> {
        self.entries.lock().keys().cloned().collect()
    }

    /// Stops renewing `id` and drops its certificate.
    pub fn forget(&self, id: &Identity) {
        if let Some(e) = self.entries.lock().remove(id) {
            e.task.abort();
        }
    }

    /// The certificates currently held (for the admin API; no keys are reachable from here
    /// but through the TLS configurations).
    /// The revocation lists the certificates' TLS configurations check peers against.
    pub fn revocation(&self) -> &Revocation {
        &self.revocation
    }

    pub fn certs(&self) -> Vec<Arc<WorkloadCert>> {
        let entries = self.entries.lock();
        let mut out: Vec<_> = entries
            .values()
            .filter_map(|e| match &*e.slot.borrow() {
                Slot::Ready(c) => Some(c.clone()),
                _ => None,
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    pub fn issued_total(&self) -> u64 {
        self.counters.issued.get()
    }
    pub fn renewed_total(&self) -> u64 {
        self.counters.renewed.get()
    }
    pub fn failed_total(&self) -> u64 {
        self.counters.failed.get()
    }

    /// Exports the signing counts in `registry` (which prefixes nothing).
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        let zt = registry.sub_registry_with_prefix("ztunnel");
        zt.register(
            "certificates_issued",
            "Workload certificates issued (first ones)",
            self.counters.issued.clone(),
        );
        zt.register(
            "certificate_renewals",
            "Workload certificates renewed",
            self.counters.renewed.clone(),
        );
        zt.register(
            "certificate_signing_failures",
            "Signing attempts that failed (refused by the CA or unanswered), each retried",
            self.counters.failed.clone(),
        );
    }
}

impl Drop for CertManager {
    fn drop(&mut self) {
        for e in self.entries.get_mut().values() {
            e.task.abort();
        }
    }
}

async fn sign_once(
    signer: &dyn CertSigner,
    id: &Identity,
    lifetime: Duration,
    now: SystemTime,
) -> Result<WorkloadCert, Error> {
    let kc = generate_csr(id)?;
    let resp = signer
        .sign(SignRequest {
            csr_pem: kc.csr_pem,
            identity: id.to_string(),
            lifetime_secs: lifetime.as_secs(),
        })
        .await?;
    WorkloadCert::from_signed(
        id.clone(),
        &kc.key,
        &resp.cert_chain_pem,
        &resp.roots_pem,
        now,
    )
}

/// Waits until a certificate is due for renewal: at half-life (`due`, by the wall clock,
/// looked at every [`RECHECK`]), when a caller found it expired (`renew`), or as soon as the
/// revocation lists revoke it (`own` is its chain), so that its workload's peers do not refuse
/// it until then. One issued revoked already (its issuer's certificate is revoked, say) is
/// renewed when the lists change next, not at once, so that the CA is not asked in a loop.
async fn until_renewal_due(k: &Keeper, due: SystemTime, own: &PeerChain) {
    let (id, rev) = (&k.id, &k.revocation);
    let half_life = async {
        while let Ok(left) = due.duration_since((k.clock)()) {
            tokio::time::sleep(left.min(RECHECK)).await;
        }
    };
    let revoked = async {
        if own.trusted() {
            own.until_revoked().await;
            tracing::warn!(identity = %id, "the certificate is revoked by the lists in force; renewing it now");
        } else {
            tracing::error!(identity = %id, "the certificate just issued is revoked by the lists in force (its issuer's certificate?); renewed when the lists change, or at half-life");
            rev.changed().await;
        }
    };
    tokio::select! {
        () = half_life => {}
        () = revoked => {}
        () = k.renew.notified() => {
            tracing::warn!(identity = %id, "the certificate has expired before its renewal (the clock stepped forward?); renewing it now");
        }
    }
}

/// What one identity's task works with.
struct Keeper {
    signer: Arc<dyn CertSigner>,
    id: Identity,
    lifetime: Duration,
    revocation: Revocation,
    counters: Arc<Counters>,
    /// Told by a caller that found the certificate expired.
    renew: Arc<Notify>,
    /// Counts the CA's refusals.
    refused: Counter,
    clock: Clock,
}

/// The per-identity task: sign, publish, sleep to half-life (or until the certificate is
/// revoked, or found expired), repeat.
async fn keep(k: Keeper, tx: watch::Sender<Slot>) {
    let (id, counters, revocation) = (&k.id, &k.counters, &k.revocation);
    let mut backoff = MIN_BACKOFF;
    let mut have_one = false;
    loop {
        match sign_once(&*k.signer, id, k.lifetime, (k.clock)()).await {
            Ok(cert) => {
                let cert = Arc::new(cert.with_revocation(revocation.clone()));
                let now = (k.clock)();
                // Due already: this clock is ahead of the CA's by half a lifetime or more.
                // Renewing at once would ask the CA in a loop for as long as that lasts.
                let due = match cert.refresh_at() > now {
                    true => cert.refresh_at(),
                    false => {
                        tracing::warn!(identity = %id, "the certificate just issued is due for renewal already: this node's clock is ahead of the CA's; renewing it again later");
                        now + MAX_BACKOFF
                    }
                };
                if have_one {
                    counters.renewed.inc();
                    tracing::info!(identity = %id, serial = %cert.serial, "certificate renewed");
                } else {
                    counters.issued.inc();
                    tracing::info!(identity = %id, serial = %cert.serial, "certificate issued");
                }
                have_one = true;
                backoff = MIN_BACKOFF;
                let own = cert.own_chain();
                tx.send_replace(Slot::Ready(cert));
                until_renewal_due(&k, due, &own).await;
            }
            Err(e) => {
                counters.failed.inc();
                tracing::warn!(identity = %id, error = %e, retry_in = ?backoff, "certificate signing failed");
                let failure: Failure = e.into();
                if let Failure::Refused(_) = failure {
                    k.refused.inc();
                }
                let failure = Slot::Failed(failure);
                let expiry = match &*tx.borrow() {
                    Slot::Ready(c) => c.not_after,
                    _ => SystemTime::UNIX_EPOCH,
                };
                let retry = tokio::time::sleep(backoff);
                tokio::pin!(retry);
                match expiry.duration_since((k.clock)()) {
                    // Still valid: kept until it expires (or a caller finds it expired, the
                    // clock having stepped), then the failure is what callers get.
                    Ok(left) => tokio::select! {
                        () = &mut retry => {}
                        () = tokio::time::sleep(left) => {
                            tx.send_replace(failure);
                            retry.await;
                        }
                        () = k.renew.notified() => {
                            tx.send_replace(failure);
                            retry.await;
                        }
                    },
                    Err(_) => {
                        tx.send_replace(failure);
                        retry.await;
                    }
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    use ztunnel_proto::ca::SignResponse;

    use super::*;
    use crate::ca::LocalCa;
    use crate::identity::{BoxFuture, SignError};

    /// Counts calls; fails while `fail` is set, refuses while `refuse` is; signs as of
    /// `clock`'s time when set.
    struct Counting {
        ca: LocalCa,
        calls: AtomicUsize,
        fail: std::sync::atomic::AtomicBool,
        refuse: std::sync::atomic::AtomicBool,
        clock: Option<Clock>,
    }

    impl CertSigner for Counting {
        fn sign(&self, req: SignRequest) -> BoxFuture<'_, Result<SignResponse, SignError>> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                if self.fail.load(Ordering::SeqCst) {
                    return Err(SignError::Transport("down".into()));
                }
                if self.refuse.load(Ordering::SeqCst) {
                    return Err(SignError::Refused {
                        status: 403,
                        message: "no such pod on this node".into(),
                    });
                }
                match &self.clock {
                    Some(clock) => self
                        .ca
                        .sign(&req, clock())
                        .map_err(|e| SignError::Transport(e.to_string())),
                    None => CertSigner::sign(&self.ca, req).await,
                }
            })
        }
    }

    fn signer() -> (tempfile::TempDir, Arc<Counting>) {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path(), "cluster.local").unwrap();
        let s = Arc::new(Counting {
            ca,
            calls: AtomicUsize::new(0),
            fail: Default::default(),
            refuse: Default::default(),
            clock: None,
        });
        (dir, s)
    }

    /// A clock `ahead` seconds ahead of this machine's, and a manager judging by it whose
    /// signer signs by it too (a certificate of an hour).
    fn stepped() -> (
        tempfile::TempDir,
        Arc<Counting>,
        Arc<CertManager>,
        Arc<AtomicU64>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let ahead = Arc::new(AtomicU64::new(0));
        let a = ahead.clone();
        let clock: Clock =
            Arc::new(move || SystemTime::now() + Duration::from_secs(a.load(Ordering::SeqCst)));
        let s = Arc::new(Counting {
            ca: LocalCa::load_or_create(dir.path(), "cluster.local").unwrap(),
            calls: AtomicUsize::new(0),
            fail: Default::default(),
            refuse: Default::default(),
            clock: Some(clock.clone()),
        });
        let hour = Duration::from_secs(3600);
        let m = CertManager::with_clock(s.clone(), hour, Revocation::default(), clock);
        (dir, s, m, ahead)
    }

    /// The wall clock stepped forward past half-life (a suspended machine, an NTP correction)
    /// while the task slept less than that: renewed within a recheck, not when its sleep ends.
    #[tokio::test(start_paused = true)]
    async fn renewal_is_due_by_the_wall_clock() {
        let (_d, _s, m, ahead) = stepped();
        let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let first = m.fetch(&id).await.unwrap();
        ahead.store(2000, Ordering::SeqCst);
        let renewed = async {
            while m.fetch(&id).await.unwrap().serial == first.serial {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        };
        tokio::time::timeout(RECHECK * 2, renewed)
            .await
            .expect("renewed within a recheck");
    }

    /// With the CA down and the task backing off while its certificate is still valid, a
    /// caller that finds it expired (the clock stepped) gets the failure at once, not at the
    /// end of the backoff.
    #[tokio::test(start_paused = true)]
    async fn an_expired_certificate_during_the_backoff_is_refused_at_once() {
        let (_d, s, m, ahead) = stepped();
        let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        m.fetch(&id).await.unwrap();
        s.fail.store(true, Ordering::SeqCst);
        // Past half-life: renewals fail, backing off up to 30 s, the certificate still valid.
        ahead.store(2000, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(85)).await;
        assert!(m.failed_total() >= 5, "{}", m.failed_total());
        ahead.store(4000, Ordering::SeqCst);
        let got = tokio::time::timeout(Duration::from_secs(1), m.fetch(&id))
            .await
            .expect("answered at once");
        assert!(got.is_err());
    }

    /// A certificate found expired (the clock stepped past its expiry) is renewed at once for
    /// its caller; with the CA down, the caller gets the failure instead of waiting.
    #[tokio::test(start_paused = true)]
    async fn an_expired_certificate_is_renewed_or_refused_at_once() {
        for ca_up in [true, false] {
            let (_d, s, m, ahead) = stepped();
            let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
            let first = m.fetch(&id).await.unwrap();
            s.fail.store(!ca_up, Ordering::SeqCst);
            ahead.store(4000, Ordering::SeqCst);
            let got = tokio::time::timeout(Duration::from_secs(5), m.fetch(&id))
                .await
                .expect("answered");
            match got {
                Ok(c) => {
                    assert!(ca_up);
                    assert_ne!(c.serial, first.serial);
                }
                Err(e) => assert!(!ca_up && e.to_string().contains("down"), "{e}"),
            }
        }
    }

    #[tokio::test]
    async fn concurrent_first_fetches_share_one_signing() {
        let (_d, s) = signer();
        let m = CertManager::new(s.clone(), Duration::from_secs(3600), Revocation::default());
        let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let (a, b, c) = tokio::join!(m.fetch(&id), m.fetch(&id), m.fetch(&id));
        let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
        assert_eq!(s.calls.load(Ordering::SeqCst), 1);
        assert_eq!((a.serial == b.serial, b.serial == c.serial), (true, true));
        assert_eq!(m.issued_total(), 1);
        assert_eq!(m.certs().len(), 1);
    }

    #[tokio::test]
    async fn renews_at_half_life_and_keeps_the_old_arc_usable() {
        let (_d, s) = signer();
        let m = CertManager::new(s.clone(), Duration::from_secs(2), Revocation::default());
        let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let first = m.fetch(&id).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let second = m.fetch(&id).await.unwrap();
        assert_ne!(first.serial, second.serial, "renewed by now");
        assert!(m.renewed_total() >= 1);
        // The old certificate still builds a working configuration.
        let _ = first.server_config();
    }

    /// A refusal reaches the caller as a refusal (readiness counts it against the identity, not
    /// the node); an unreachable CA as another error.
    #[tokio::test]
    async fn a_refusal_keeps_its_type_through_fetch() {
        let (_d, s) = signer();
        s.refuse.store(true, Ordering::SeqCst);
        let m = CertManager::new(s.clone(), Duration::from_secs(3600), Revocation::default());
        let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let e = m.fetch(&id).await.unwrap_err();
        assert!(
            matches!(&e, Error::Sign(SignError::Refused { status: 403, .. })),
            "{e:?}"
        );
        // Counted once per refusal by the CA (a caller asking again counts nothing), and
        // exported under the names the README gives them.
        assert!(m.fetch(&id).await.is_err());
        assert_eq!(m.refusals(&id), 1);
        crate::metrics::assert_exported(
            |r| m.register(r),
            &[
                "ztunnel_certificate_signing_failures_total 1",
                "ztunnel_certificates_issued_total 0",
                "ztunnel_certificate_renewals_total 0",
            ],
        );
        let (_d, s) = signer();
        s.fail.store(true, Ordering::SeqCst);
        let m = CertManager::new(s, Duration::from_secs(3600), Revocation::default());
        let e = m.fetch(&id).await.unwrap_err();
        assert!(
            !matches!(&e, Error::Sign(SignError::Refused { .. })),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn signing_failure_is_an_error_and_counted() {
        let (_d, s) = signer();
        s.fail.store(true, Ordering::SeqCst);
        let m = CertManager::new(s.clone(), Duration::from_secs(3600), Revocation::default());
        let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let e = m.fetch(&id).await.unwrap_err();
        assert!(e.to_string().contains("down"), "{e}");
        assert_eq!(m.failed_total(), 1);
        // Once the CA is back, the retry gives a certificate.
        s.fail.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1200)).await;
        m.fetch(&id).await.unwrap();
    }

    /// Lists that come to revoke a held certificate have it renewed at once (a new serial the
    /// lists do not name), not at half-life.
    #[tokio::test]
    async fn a_revoked_certificate_is_renewed_at_once() {
        let (_d, s) = signer();
        let rev = Revocation::new(Default::default());
        let m = CertManager::new(s.clone(), Duration::from_secs(3600), rev.clone());
        let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let first = m.fetch(&id).await.unwrap();
        let now = SystemTime::now();
        let list =
            s.ca.revocation_list(&[&first.serial], 1, now, Duration::from_secs(60));
        rev.replace(super::super::crl::Crls::parse(list.unwrap().as_bytes()).unwrap());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let second = loop {
            let c = m.fetch(&id).await.unwrap();
            if c.serial != first.serial {
                break c;
            }
            assert!(tokio::time::Instant::now() < deadline, "not renewed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(m.renewed_total(), 1);
        // The new one is trusted: it is kept until half-life.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(m.fetch(&id).await.unwrap().serial, second.serial);
        assert_eq!(s.calls.load(Ordering::SeqCst), 2);
    }

    /// A certificate issued revoked already (its issuer, an intermediate, is revoked) is not
    /// renewed in a loop: once the lists change.
    #[tokio::test]
    async fn one_issued_revoked_already_waits_for_the_lists_to_change() {
        let root = crate::ca::CaMaterial::generate("cluster.local").unwrap();
        let (material, intermediate) = crate::ca::intermediate_of(&root).unwrap();
        let root_ca = LocalCa::from_material(&root, "cluster.local").unwrap();
        let now = SystemTime::now();
        let list = root_ca.revocation_list(&[&intermediate], 1, now, Duration::from_secs(60));
        let rev =
            Revocation::new(super::super::crl::Crls::parse(list.unwrap().as_bytes()).unwrap());
        let s = Arc::new(Counting {
            ca: LocalCa::from_material(&material, "cluster.local").unwrap(),
            calls: AtomicUsize::new(0),
            fail: Default::default(),
            refuse: Default::default(),
            clock: None,
        });
        let m = CertManager::new(s.clone(), Duration::from_secs(3600), rev.clone());
        let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let first = m.fetch(&id).await.unwrap();
        assert_eq!(first.chain.len(), 2, "leaf and intermediate");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            s.calls.load(Ordering::SeqCst),
            1,
            "not asked again in a loop"
        );
        // The lists change: it is renewed once.
        rev.replace(Default::default());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while m.fetch(&id).await.unwrap().serial == first.serial {
            assert!(tokio::time::Instant::now() < deadline, "not renewed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(s.calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn refresh_is_due_half_way() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path(), "cluster.local").unwrap();
        let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let c = crate::ca::issue(&ca, &id, Duration::from_secs(100)).unwrap();
        let t0 = c.received_at;
        assert!(!c.needs_refresh(t0 + Duration::from_secs(49)));
        assert!(c.needs_refresh(t0 + Duration::from_secs(51)));
        assert!(!c.expired(t0 + Duration::from_secs(99)));
        assert!(c.expired(t0 + Duration::from_secs(101)));
    }
}
