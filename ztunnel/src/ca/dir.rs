//! A plugged-in CA directory, watched: `ztunnel ca --ca-dir` reads the four files of the
//! layout again every [`POLL`] and, when they changed, swaps in the new material if it is
//! consistent ([`LocalCa::from_material`]: the key is the signing certificate's, the bundle
//! holds a root). Each change is counted in `ztunnel_ca_material_reloads_total{result}`,
//! `applied` or `refused`; a refused one (a rotation half written, a key that is not the
//! certificate's) keeps the last good material, and is tried again on the next change. So a
//! root rotation needs no restart, as with the Secret.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::local::{CaMaterial, LocalCa};
use super::metrics::CaMetrics;

/// How often the directory is read.
pub const POLL: Duration = Duration::from_secs(1);

/// Watches `dir`, whose material `ca` was loaded from; the receiver always holds the last
/// good material.
pub fn watch(
    dir: PathBuf,
    ca: LocalCa,
    trust_domain: String,
    max_lifetime: Duration,
    metrics: Arc<CaMetrics>,
) -> (watch::Receiver<Arc<LocalCa>>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(Arc::new(ca));
    let mut seen = CaMaterial::read(&dir).ok();
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(POLL).await;
            let now = match CaMaterial::read(&dir) {
                Ok(m) => m,
                Err(e) => {
                    if seen.take().is_some() {
                        tracing::warn!(dir = %dir.display(), error = %e, "CA directory unreadable; keeping the material in use");
                    }
                    continue;
                }
            };
            if seen.as_ref() == Some(&now) {
                continue;
            }
            match LocalCa::from_material(&now, &trust_domain) {
                Ok(ca) => {
                    tracing::info!(dir = %dir.display(), roots = ca.root_count(), "CA material changed; signing with it");
                    metrics.reload(true);
                    tx.send_replace(Arc::new(ca.with_max_lifetime(max_lifetime)));
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "CA material changed but is unusable; keeping the material in use");
                    metrics.reload(false);
                }
            }
            seen = Some(now);
        }
    });
    (rx, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rotation written into the directory is applied; a half-written one is refused and
    /// the material in use kept, until the writing is complete.
    #[tokio::test]
    async fn a_changed_directory_is_applied_when_consistent() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path(), "cluster.local").unwrap();
        let old_root = ca.root_pem();
        let metrics = Arc::new(CaMetrics::default());
        let (mut rx, _task) = watch(
            dir.path().to_path_buf(),
            ca,
            "cluster.local".into(),
            Duration::from_secs(3600),
            metrics.clone(),
        );
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        let fresh = CaMaterial::generate("cluster.local").unwrap();
        let changed = |rx: &mut watch::Receiver<Arc<LocalCa>>| {
            let mut rx = rx.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(20), rx.changed())
                    .await
                    .expect("applied in time")
                    .unwrap();
            }
        };
        // Phase 1: both roots.
        write("root-cert.pem", &format!("{old_root}{}", fresh.root_cert));
        changed(&mut rx).await;
        rx.borrow_and_update();
        assert_eq!(rx.borrow().root_count(), 2);
        // Half of phase 2: the new certificate without its key is refused (once it has been
        // seen), and the material in use kept.
        write("ca-cert.pem", &fresh.ca_cert);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while metrics.reloads_refused() == 0 {
            assert!(std::time::Instant::now() < deadline, "never refused");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!rx.has_changed().unwrap(), "kept");
        // The key too: applied, signing under the new root.
        write("ca-key.pem", &fresh.ca_key);
        write("cert-chain.pem", &fresh.cert_chain);
        changed(&mut rx).await;
        let ca = rx.borrow().clone();
        assert_eq!(ca.root_count(), 2);
        let id: crate::identity::Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let cert = crate::ca::issue(&ca, &id, Duration::from_secs(60)).unwrap();
        let issuer = x509_issuer(&cert.chain[0]);
        assert_eq!(issuer, x509_issuer_of_root(&fresh.root_cert));
    }

    fn x509_issuer(der: &[u8]) -> String {
        use x509_parser::prelude::{FromDer, X509Certificate};
        X509Certificate::from_der(der)
            .unwrap()
            .1
            .issuer()
            .to_string()
    }

    fn x509_issuer_of_root(pem: &str) -> String {
        let der = crate::identity::parse_pem_certs(&[pem.to_owned()]).unwrap();
        use x509_parser::prelude::{FromDer, X509Certificate};
        X509Certificate::from_der(&der[0])
            .unwrap()
            .1
            .subject()
            .to_string()
    }
}
