//! The certificate authority: signing material from a plugged-in CA directory or a Secret
//! ([`LocalCa`], also used in-process by a daemon; [`secret`]), the `ztunnel ca` server
//! ([`server`]), who may have which identity (a static token list or Kubernetes: [`kube`], whose
//! TokenReviews are cached, shared and bounded: [`reviews`]), and the daemon's client of it
//! ([`CaClient`]). The API is in `ztunnel_proto::ca`.
//!
//! [`run`] starts, in order: the signing material (Secret or directory: read or created, then
//! watched), the
//! authorizer (Kubernetes: the pod index is listed completely before the first request is
//! served), then the listener. When a watch ends (it panicked), [`run`] ends with an error, so
//! the CA is restarted rather than sign from a frozen view.

mod client;
mod dir;
pub mod kube;
pub mod limits;
mod local;
pub mod metrics;
pub mod pods;
pub mod reviews;
pub mod secret;
pub mod server;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

pub use client::CaClient;
#[cfg(test)]
pub(crate) use local::{intermediate_of, issue_with_uris};
pub use local::{issue, CaMaterial, LocalCa, DEFAULT_MAX_LIFETIME};
pub use server::{Denied, SignAuthorizer, StaticTokenAuthorizer};

use crate::config::{CaAuthorizer, CaConfig, CaMaterialSource};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CA directory {dir} is incomplete (missing {missing}); refusing to overwrite it")]
    Incomplete { dir: PathBuf, missing: String },
    #[error("invalid CA material: {0}")]
    Invalid(String),
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0}")]
    Identity(#[from] crate::identity::Error),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("token file {path}: {reason}")]
    Token { path: PathBuf, reason: String },
    #[error("Kubernetes API: {0}")]
    Kube(String),
    #[error("{0}; the CA cannot go on without it")]
    Stopped(String),
    #[error("shut down before the CA was ready")]
    Shutdown,
}

/// Runs `ztunnel ca` until `shutdown` resolves.
pub async fn run(
    cfg: &CaConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    crate::identity::tls::use_key_exchange(cfg.tls_key_exchange)?;
    tokio::pin!(shutdown);
    let metrics = Arc::new(metrics::CaMetrics::default());
    let needs_api = matches!(cfg.material, CaMaterialSource::Secret(_))
        || matches!(cfg.authorizer, CaAuthorizer::Kubernetes { .. });
    let client = if needs_api {
        Some(
            ::kube::Client::try_default()
                .await
                .map_err(|e| Error::Kube(format!("client configuration: {e}")))?,
        )
    } else {
        None
    };
    let mut tasks = Vec::new();
    let ca = match (&cfg.material, &client) {
        (CaMaterialSource::Secret(s), Some(client)) => {
            let w = secret::SecretWatch {
                secrets: ::kube::Api::namespaced(client.clone(), &s.namespace),
                configmaps: ::kube::Api::namespaced(client.clone(), &s.namespace),
                name: s.name.clone(),
                trust_domain: cfg.trust_domain.clone(),
                max_lifetime: cfg.max_lifetime,
                metrics: metrics.clone(),
            };
            let (rx, task) = tokio::select! {
                r = w.start() => r?,
                _ = &mut shutdown => return Err(Error::Shutdown),
            };
            tracing::info!(secret = %s, "CA: signing material from the Secret");
            tasks.push(("Secret watch", task));
            rx
        }
        (CaMaterialSource::Dir(d), _) => {
            let ca =
                LocalCa::load_or_create(d, &cfg.trust_domain)?.with_max_lifetime(cfg.max_lifetime);
            tracing::info!(dir = %d.display(), "CA: signing material from the directory, watched");
            let (rx, task) = dir::watch(
                d.clone(),
                ca,
                cfg.trust_domain.clone(),
                cfg.max_lifetime,
                metrics.clone(),
            );
            tasks.push(("CA directory watch", task));
            rx
        }
        (CaMaterialSource::Secret(_), None) => unreachable!("a Secret needs the API"),
    };
    let auth: Arc<dyn SignAuthorizer> = match (&cfg.authorizer, &client) {
        (CaAuthorizer::Static { token_file }, _) => {
            Arc::new(StaticTokenAuthorizer::from_file(token_file)?)
        }
        (
            CaAuthorizer::Kubernetes {
                audience,
                daemon_service_account,
            },
            Some(client),
        ) => {
            let index = Arc::new(RwLock::new(pods::PodIndex::default()));
            let (synced_tx, mut synced) = tokio::sync::watch::channel(false);
            tasks.push((
                "pod watch",
                pods::spawn_watcher(::kube::Api::all(client.clone()), index.clone(), synced_tx),
            ));
            tracing::info!("CA: listing pods before serving");
            tokio::select! {
                r = synced.wait_for(|s| *s) => { r.map_err(|_| Error::Kube("pod watcher ended".into()))?; }
                _ = &mut shutdown => return Err(Error::Shutdown),
            }
            Arc::new(kube::KubeAuthorizer::new(
                client.clone(),
                kube::KubeAuthzConfig {
                    audience: audience.clone(),
                    daemon_namespace: daemon_service_account.namespace.clone(),
                    daemon_service_account: daemon_service_account.name.clone(),
                    trust_domain: cfg.trust_domain.clone(),
                },
                index,
                metrics.clone(),
            ))
        }
        (CaAuthorizer::Kubernetes { .. }, None) => unreachable!("kubernetes needs the API"),
    };
    let listener = crate::net::listen(cfg.listen).map_err(|source| Error::Io {
        path: PathBuf::from(cfg.listen.to_string()),
        source,
    })?;
    tracing::info!(listen = %cfg.listen, "CA serving");
    crate::residency::release_startup_pages_logged();
    let serve = server::serve(
        listener,
        ca,
        auth,
        cfg.server_names.clone(),
        metrics,
        cfg.limits,
        shutdown,
    );
    // A watch that ends (it panicked) would leave its material or pod index as it was: a
    // deleted daemon pod's token would keep signing. The CA exits instead, to be restarted.
    let result = tokio::select! {
        r = serve => r,
        ended = crate::task::first_ended(&mut tasks) => Err(Error::Stopped(ended)),
    };
    for (_, t) in tasks {
        t.abort();
    }
    result
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::CaLimits;
    use crate::identity::{generate_csr, CertSigner, Identity, SignError, WorkloadCert};
    use ztunnel_proto::ca::SignRequest;

    async fn start() -> (tempfile::TempDir, Arc<LocalCa>, String) {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(LocalCa::load_or_create(dir.path(), "cluster.local").unwrap());
        let auth = Arc::new(StaticTokenAuthorizer::new(vec!["s3cret".into()]).unwrap());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(server::serve(
            l,
            tokio::sync::watch::channel(ca.clone()).1,
            auth,
            vec!["localhost".into()],
            Arc::new(metrics::CaMetrics::default()),
            CaLimits::default(),
            std::future::pending(),
        ));
        (dir, ca, addr)
    }

    fn request(id: &Identity) -> (rcgen::KeyPair, SignRequest) {
        let kc = generate_csr(id).unwrap();
        let r = SignRequest {
            csr_pem: kc.csr_pem,
            identity: id.to_string(),
            lifetime_secs: 600,
        };
        (kc.key, r)
    }

    #[tokio::test]
    async fn signs_over_the_network_with_the_right_token() {
        let (_d, ca, addr) = start().await;
        let client = CaClient::new(
            addr,
            "localhost".into(),
            &ca.root_pem(),
            Some("s3cret".into()),
        )
        .unwrap();
        let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let (key, req) = request(&id);
        let resp = client.sign(req).await.unwrap();
        let cert = WorkloadCert::from_signed(
            id.clone(),
            &key,
            &resp.cert_chain_pem,
            &resp.roots_pem,
            std::time::SystemTime::now(),
        )
        .unwrap();
        assert_eq!(cert.identity, id);
        let life = cert
            .not_after
            .duration_since(std::time::SystemTime::now())
            .unwrap();
        assert!(life <= Duration::from_secs(600));
    }

    /// Whether a leaf chain verifies (webpki, as a client certificate) against `roots_pem`.
    pub(crate) fn chains_to(chain_pem: &[String], roots_pem: &str) -> bool {
        use rustls::server::WebPkiClientVerifier;
        let chain = crate::identity::parse_pem_certs(chain_pem).unwrap();
        let roots = crate::identity::root_store(
            &crate::identity::parse_pem_certs(&[roots_pem.to_owned()]).unwrap(),
        )
        .unwrap();
        let v = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            crate::identity::tls::provider(),
        )
        .build()
        .unwrap();
        v.verify_client_cert(&chain[0], &chain[1..], rustls_pki_types::UnixTime::now())
            .is_ok()
    }

    /// A CA server (token `s3cret`) signing with what the returned sender sends; its address.
    async fn serve_watched(ca: Arc<LocalCa>) -> (tokio::sync::watch::Sender<Arc<LocalCa>>, String) {
        let (tx, rx) = tokio::sync::watch::channel(ca);
        let auth = Arc::new(StaticTokenAuthorizer::new(vec!["s3cret".into()]).unwrap());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(server::serve(
            l,
            rx,
            auth,
            vec!["localhost".into()],
            Arc::new(metrics::CaMetrics::default()),
            CaLimits::default(),
            std::future::pending(),
        ));
        (tx, addr)
    }

    /// The material a rotation publishes: a new signing root, and a bundle with both roots.
    fn rotated(old: &LocalCa) -> CaMaterial {
        let fresh = CaMaterial::generate("cluster.local").unwrap();
        CaMaterial {
            root_cert: format!("{}{}", old.root_pem(), fresh.root_cert),
            ..fresh
        }
    }

    #[tokio::test]
    async fn rotation_swaps_the_signer_and_the_serving_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let old = Arc::new(LocalCa::load_or_create(dir.path(), "cluster.local").unwrap());
        let (tx, addr) = serve_watched(old.clone()).await;
        let client = |root: &str| {
            CaClient::new(
                addr.clone(),
                "localhost".into(),
                root,
                Some("s3cret".into()),
            )
            .unwrap()
        };
        let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let resp = client(&old.root_pem()).sign(request(&id).1).await.unwrap();
        assert_eq!(resp.roots_pem.len(), 1);

        let m = rotated(&old);
        let new = Arc::new(LocalCa::from_material(&m, "cluster.local").unwrap());
        assert_eq!(new.root_count(), 2);
        tx.send_replace(new.clone());
        // A daemon that only knows the new root can reach the CA: the serving certificate
        // was re-issued from the new material.
        let new_root_only = m.ca_cert.clone(); // the new root signs
        let (key, req) = request(&id);
        let resp = client(&new_root_only).sign(req).await.unwrap();
        assert_eq!(resp.roots_pem.len(), 2, "both roots served");
        // The leaf is signed by the new root, and verifies against the bundle.
        let cert = WorkloadCert::from_signed(
            id.clone(),
            &key,
            &resp.cert_chain_pem,
            &resp.roots_pem,
            std::time::SystemTime::now(),
        )
        .unwrap();
        assert_eq!(cert.chain.len(), 1);
        assert!(chains_to(&resp.cert_chain_pem, &new_root_only));
        assert!(!chains_to(&resp.cert_chain_pem, &old.root_pem()));
        // A daemon holding the bundle trusts the CA too.
        client(&m.root_cert)
            .sign(request(&"spiffe://cluster.local/ns/a/sa/c".parse().unwrap()).1)
            .await
            .unwrap();
    }

    /// A root rotation in two phases, as a daemon lives it with its bundle file: the CA first
    /// publishes both roots (signing with the old key), then signs and serves from the new
    /// one. The same client, never restarted, follows the file: with the old root alone it
    /// cannot reach the CA once the CA serves from the new root; with both it can, in both
    /// phases.
    #[tokio::test]
    async fn a_client_follows_its_root_bundle_file_through_a_two_phase_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let old_material = CaMaterial::generate("cluster.local").unwrap();
        let old = Arc::new(LocalCa::from_material(&old_material, "cluster.local").unwrap());
        let (tx, addr) = serve_watched(old.clone()).await;
        let (roots, token) = (dir.path().join("roots.pem"), dir.path().join("token"));
        std::fs::write(&roots, old.root_pem()).unwrap();
        std::fs::write(&token, "s3cret").unwrap();
        let client = CaClient::with_files(addr, "localhost".into(), roots.clone(), token).unwrap();
        let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let sign = || async {
            // Each request on a new connection, as after the CA closed an idle one.
            client.redial().await;
            client.sign(request(&id).1).await
        };
        sign().await.unwrap();

        // Phase 1: both roots published, the old key still signs and serves.
        let fresh = CaMaterial::generate("cluster.local").unwrap();
        let bundle = format!("{}{}", old.root_pem(), fresh.root_cert);
        let phase1 = CaMaterial {
            root_cert: bundle.clone(),
            ..old_material.clone()
        };
        tx.send_replace(Arc::new(
            LocalCa::from_material(&phase1, "cluster.local").unwrap(),
        ));
        assert_eq!(sign().await.unwrap().roots_pem.len(), 2);
        std::fs::write(&roots, &bundle).unwrap();
        sign().await.unwrap();

        // Phase 2: the new key signs and serves; the client trusts it from its file.
        let phase2 = CaMaterial {
            root_cert: bundle.clone(),
            ..fresh.clone()
        };
        tx.send_replace(Arc::new(
            LocalCa::from_material(&phase2, "cluster.local").unwrap(),
        ));
        let resp = sign().await.unwrap();
        assert!(chains_to(&resp.cert_chain_pem, &fresh.root_cert));
        // Had the file kept the old root alone, the CA would be out of reach.
        std::fs::write(&roots, old.root_pem()).unwrap();
        assert!(sign().await.is_err());
        // An unusable file keeps the last good bundle (here the old root alone).
        std::fs::write(&roots, "garbage").unwrap();
        assert!(sign().await.is_err());
        std::fs::write(&roots, &bundle).unwrap();
        sign().await.unwrap();
    }

    #[tokio::test]
    async fn the_token_file_is_read_for_every_request() {
        let (_d, ca, addr) = start().await;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        let client =
            CaClient::with_token_file(addr, "localhost".into(), &ca.root_pem(), file.clone())
                .unwrap();
        let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        client.sign(request(&id).1).await.unwrap();
        std::fs::write(&file, "rotated-away").unwrap();
        let err = client.sign(request(&id).1).await.unwrap_err();
        assert!(
            matches!(err, SignError::Refused { status: 401, .. }),
            "{err}"
        );
        std::fs::write(&file, "s3cret").unwrap();
        client.sign(request(&id).1).await.unwrap();
        std::fs::remove_file(&file).unwrap();
        let err = client.sign(request(&id).1).await.unwrap_err();
        assert!(err.to_string().contains("token"), "{err}");
    }

    #[tokio::test]
    async fn refuses_bad_tokens_and_garbage() {
        let (_d, ca, addr) = start().await;
        let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        for token in [Some("wrong".to_string()), None] {
            let client =
                CaClient::new(addr.clone(), "localhost".into(), &ca.root_pem(), token).unwrap();
            let err = client.sign(request(&id).1).await.unwrap_err();
            assert!(
                matches!(err, SignError::Refused { status: 401, .. }),
                "{err}"
            );
        }
        let client = CaClient::new(
            addr.clone(),
            "localhost".into(),
            &ca.root_pem(),
            Some("s3cret".into()),
        )
        .unwrap();
        let (status, _) = client
            .request(bytes::Bytes::from_static(b"{not json"))
            .await
            .unwrap();
        assert_eq!(status, 400);
        // A CA whose certificate does not chain to the root we were given is not trusted.
        let other = tempfile::tempdir().unwrap();
        let stranger = LocalCa::load_or_create(other.path(), "cluster.local").unwrap();
        let client = CaClient::new(
            addr,
            "localhost".into(),
            &stranger.root_pem(),
            Some("s3cret".into()),
        )
        .unwrap();
        let err = client.sign(request(&id).1).await.unwrap_err();
        assert!(matches!(err, SignError::Transport(_)), "{err}");
    }
}
