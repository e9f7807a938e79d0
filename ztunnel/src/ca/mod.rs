//! The certificate authority: signing material from a plugged-in CA directory ([`LocalCa`],
//! also used in-process by a daemon), the `ztunnel ca` server ([`server`]) and the daemon's
//! client of it ([`CaClient`]). The API is in `ztunnel_proto::ca`.

mod client;
mod local;
pub mod server;

use std::path::PathBuf;
use std::sync::Arc;

pub use client::CaClient;
pub use local::{issue, LocalCa, DEFAULT_MAX_LIFETIME};
pub use server::{SignAuthorizer, StaticTokenAuthorizer};

use crate::config::CaConfig;

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
}

/// Runs `ztunnel ca` until `shutdown` resolves.
pub async fn run(
    cfg: &CaConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let ca = Arc::new(
        LocalCa::load_or_create(&cfg.ca_dir, &cfg.trust_domain)?
            .with_max_lifetime(cfg.max_lifetime),
    );
    let auth = Arc::new(StaticTokenAuthorizer::from_file(&cfg.token_file)?);
    let listener = crate::net::listen(cfg.listen).map_err(|source| Error::Io {
        path: PathBuf::from(cfg.listen.to_string()),
        source,
    })?;
    tracing::info!(listen = %cfg.listen, "CA serving");
    server::serve(listener, ca, auth, cfg.server_names.clone(), shutdown).await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
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
            ca.clone(),
            auth,
            vec!["localhost".into()],
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
