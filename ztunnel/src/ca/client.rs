//! The daemon's client of `ztunnel ca`: one HTTP/2 connection over TLS, verified against the
//! configured root bundle (one or more roots, so a CA rotating its root stays trusted) and
//! server name, re-dialled when it fails or has been closed (the CA closes idle connections).
//! A bundle given as a file is read again at every dial, so a daemon follows a root rotation
//! (the CA publishes both roots, then serves from the new one) without a restart; a file that
//! cannot be read or holds no root keeps the last good bundle, logged;
//! a request that fails on a kept connection before any answer is tried once more on a new
//! one. One dial at a time: the requests that waited for a dial that failed fail with it
//! rather than each dialling in turn behind the others (a CA that drops packets would take
//! every waiter's full timeout, one after another). The token is sent as a bearer token and
//! never logged. A token file is re-read for every signing request: projected ServiceAccount
//! tokens are rotated by the kubelet.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::client::SendRequest;
use http::{Method, Request};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use ztunnel_proto::ca::{ErrorBody, SignRequest, SignResponse, MAX_BODY, SIGN_PATH};

use super::Error;
use crate::identity::{
    parse_pem_certs, root_store, tls::provider, BoxFuture, CertSigner, SignError,
};

const TIMEOUT: Duration = Duration::from_secs(10);

/// Where the bearer token comes from.
enum Token {
    None,
    Fixed(String),
    /// Read for every request.
    File(PathBuf),
}

/// Reads a token file: its trimmed content, which must not be empty.
fn read_token(path: &Path) -> Result<String, String> {
    let t = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let t = t.trim();
    if t.is_empty() {
        return Err(format!("{}: empty token", path.display()));
    }
    Ok(t.to_owned())
}

/// Where the root bundle comes from.
enum Roots {
    Fixed(Arc<rustls::ClientConfig>),
    /// Read at every dial; the last good bundle (its text) and its configuration.
    File {
        path: PathBuf,
        last: parking_lot::Mutex<(String, Arc<rustls::ClientConfig>)>,
    },
}

/// A client of a remote CA.
pub struct CaClient {
    addr: String,
    server_name: ServerName<'static>,
    roots: Roots,
    token: Token,
    conn: tokio::sync::Mutex<Option<Pooled>>,
    /// Dials that failed so far, and the last one's error.
    failed_dials: parking_lot::Mutex<(u64, Option<SignError>)>,
}

/// The TLS configuration that trusts the roots of `root_pem`.
fn tls_config(root_pem: &str) -> Result<Arc<rustls::ClientConfig>, Error> {
    let roots = root_store(&parse_pem_certs(&[root_pem.to_owned()])?)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(tls))
}

/// The kept connection: its handle, and the task driving it (finished once it is closed).
struct Pooled {
    send: SendRequest<Bytes>,
    task: tokio::task::JoinHandle<()>,
}

/// A failed exchange; `unanswered` when no answer had begun (safe to try again elsewhere).
struct Failed {
    error: SignError,
    unanswered: bool,
}

impl CaClient {
    /// `addr` is `host:port`; the CA's certificate must chain to `root_pem` and name
    /// `server_name`.
    pub fn new(
        addr: String,
        server_name: String,
        root_pem: &str,
        token: Option<String>,
    ) -> Result<Self, Error> {
        Self::build(
            addr,
            server_name,
            root_pem,
            token.map_or(Token::None, Token::Fixed),
        )
    }

    /// Like [`CaClient::new`], with the token read from `token_file` for every request; the
    /// file must be readable now.
    pub fn with_token_file(
        addr: String,
        server_name: String,
        root_pem: &str,
        token_file: PathBuf,
    ) -> Result<Self, Error> {
        read_token(&token_file).map_err(|reason| Error::Token {
            path: token_file.clone(),
            reason,
        })?;
        Self::build(addr, server_name, root_pem, Token::File(token_file))
    }

    /// Like [`CaClient::with_token_file`], with the root bundle read from `root_file` at
    /// every dial; the file must hold a good bundle now.
    pub fn with_files(
        addr: String,
        server_name: String,
        root_file: PathBuf,
        token_file: PathBuf,
    ) -> Result<Self, Error> {
        let pem = std::fs::read_to_string(&root_file).map_err(|source| Error::Io {
            path: root_file.clone(),
            source,
        })?;
        let mut c = Self::with_token_file(addr, server_name, &pem, token_file)?;
        let tls = c.tls();
        c.roots = Roots::File {
            path: root_file,
            last: parking_lot::Mutex::new((pem, tls)),
        };
        Ok(c)
    }

    fn build(
        addr: String,
        server_name: String,
        root_pem: &str,
        token: Token,
    ) -> Result<Self, Error> {
        let server_name = ServerName::try_from(server_name)
            .map_err(|e| Error::Invalid(format!("CA server name: {e}")))?;
        Ok(CaClient {
            addr,
            server_name,
            roots: Roots::Fixed(tls_config(root_pem)?),
            token,
            conn: tokio::sync::Mutex::new(None),
            failed_dials: Default::default(),
        })
    }

    /// Drops the kept connection, so that the next request dials (for tests of what a dial
    /// reads).
    #[cfg(test)]
    pub(crate) async fn redial(&self) {
        *self.conn.lock().await = None;
    }

    /// The TLS configuration for the next dial: the bundle file's, read now, when there is
    /// one.
    fn tls(&self) -> Arc<rustls::ClientConfig> {
        let (path, last) = match &self.roots {
            Roots::Fixed(tls) => return tls.clone(),
            Roots::File { path, last } => (path, last),
        };
        let mut last = last.lock();
        match std::fs::read_to_string(path) {
            Ok(pem) if pem == last.0 => {}
            Ok(pem) => match tls_config(&pem) {
                Ok(tls) => {
                    tracing::info!(path = %path.display(), "CA root bundle changed; trusting it from now on");
                    *last = (pem, tls);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "CA root bundle unusable; keeping the last good one");
                }
            },
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "CA root bundle unreadable; keeping the last good one");
            }
        }
        last.1.clone()
    }

    async fn dial(&self) -> Result<Pooled, SignError> {
        let t = |e: String| SignError::Transport(format!("{}: {e}", self.addr));
        let tcp = tokio::time::timeout(TIMEOUT, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| t("connect timed out".into()))?
            .map_err(|e| t(e.to_string()))?;
        let tls = tokio::time::timeout(
            TIMEOUT,
            TlsConnector::from(self.tls()).connect(self.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| t("TLS handshake timed out".into()))?
        .map_err(|e| t(e.to_string()))?;
        let (send, conn) = h2::client::handshake(tls)
            .await
            .map_err(|e| t(e.to_string()))?;
        let task = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "CA connection ended");
            }
        });
        Ok(Pooled { send, task })
    }

    pub(super) async fn request(
        &self,
        body: Bytes,
    ) -> Result<(http::StatusCode, Bytes), SignError> {
        self.call(Method::POST, SIGN_PATH, Some(body)).await
    }

    /// `GET path` on the CA (e.g. `/metrics`): the status and the body as text.
    pub async fn get(&self, path: &str) -> Result<(u16, String), SignError> {
        let (status, body) = self.call(Method::GET, path, None).await?;
        Ok((status.as_u16(), String::from_utf8_lossy(&body).into_owned()))
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<(http::StatusCode, Bytes), SignError> {
        // On a kept connection, once more on a new one if it failed before any answer (the CA
        // may have closed it meanwhile); never more than once.
        let mut tried_again = false;
        loop {
            let (send, task, kept) = {
                let failed_before = self.failed_dials.lock().0;
                let mut guard = self.conn.lock().await;
                match guard.as_ref() {
                    Some(p) if !p.task.is_finished() => (p.send.clone(), p.task.id(), true),
                    _ => {
                        // A dial made while this request waited has failed: its error is
                        // this request's too.
                        let shared = {
                            let failed = self.failed_dials.lock();
                            (failed.0 != failed_before).then(|| failed.1.clone())
                        };
                        if let Some(Some(e)) = shared {
                            return Err(e);
                        }
                        let p = match self.dial().await {
                            Ok(p) => p,
                            Err(e) => {
                                let mut failed = self.failed_dials.lock();
                                *failed = (failed.0 + 1, Some(e.clone()));
                                return Err(e);
                            }
                        };
                        let got = (p.send.clone(), p.task.id(), false);
                        *guard = Some(p);
                        got
                    }
                }
            };
            match self
                .exchange(send, method.clone(), path, body.clone())
                .await
            {
                Ok(r) => return Ok(r),
                Err(failed) => {
                    let mut guard = self.conn.lock().await;
                    if guard.as_ref().is_some_and(|p| p.task.id() == task) {
                        *guard = None;
                    }
                    if tried_again || !(kept && failed.unanswered) {
                        return Err(failed.error);
                    }
                    tried_again = true;
                    tracing::debug!(error = %failed.error, "CA connection lost; dialling again");
                }
            }
        }
    }

    async fn exchange(
        &self,
        send: SendRequest<Bytes>,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<(http::StatusCode, Bytes), Failed> {
        let t = |e: h2::Error| SignError::Transport(e.to_string());
        // Before the answer's headers nothing has been answered.
        let unanswered = |e: h2::Error| Failed {
            error: t(e),
            unanswered: true,
        };
        let answered = |error: SignError| Failed {
            error,
            unanswered: false,
        };
        let mut b = Request::builder()
            .method(method)
            .uri(format!("https://{}{path}", self.addr))
            .header(http::header::CONTENT_TYPE, "application/json");
        let token = match &self.token {
            Token::None => None,
            Token::Fixed(t) => Some(t.clone()),
            Token::File(p) => Some(
                read_token(p)
                    .map_err(|e| answered(SignError::Invalid(format!("CA token file {e}"))))?,
            ),
        };
        if let Some(tok) = token {
            b = b.header(http::header::AUTHORIZATION, format!("Bearer {tok}"));
        }
        let req = b
            .body(())
            .map_err(|e| answered(SignError::Invalid(e.to_string())))?;
        let fut = async {
            let mut send = send.ready().await.map_err(unanswered)?;
            let (resp, mut stream) = send.send_request(req, body.is_none()).map_err(unanswered)?;
            if let Some(body) = body {
                stream.send_data(body, true).map_err(unanswered)?;
            }
            let resp = resp.await.map_err(unanswered)?;
            let status = resp.status();
            let mut body = resp.into_body();
            let mut buf = BytesMut::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.map_err(|e| answered(t(e)))?;
                let _ = body.flow_control().release_capacity(chunk.len());
                if buf.len() + chunk.len() > MAX_BODY * 4 {
                    return Err(answered(SignError::Invalid("CA answer too large".into())));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok((status, buf.freeze()))
        };
        tokio::time::timeout(TIMEOUT, fut)
            .await
            .map_err(|_| answered(SignError::Transport("CA request timed out".into())))?
    }
}

impl CertSigner for CaClient {
    fn sign(&self, req: SignRequest) -> BoxFuture<'_, Result<SignResponse, SignError>> {
        Box::pin(async move {
            let body = serde_json::to_vec(&req).map_err(|e| SignError::Invalid(e.to_string()))?;
            let (status, body) = self.request(body.into()).await?;
            if status != http::StatusCode::OK {
                let message = serde_json::from_slice::<ErrorBody>(&body)
                    .map(|e| e.error)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
                return Err(SignError::Refused {
                    status: status.as_u16(),
                    message,
                });
            }
            serde_json::from_slice(&body)
                .map_err(|e| SignError::Invalid(format!("bad CA answer: {e}")))
        })
    }
}
