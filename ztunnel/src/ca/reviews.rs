//! The TokenReviews the Kubernetes authorizer sends: cached, de-duplicated and bounded, so that
//! requests, however many and whatever their tokens, are never amplified into more reviews
//! than the API server should answer.
//!
//! Every answer is keyed by the SHA-256 of the token ([`token_hash`]; the token itself is kept
//! only as long as its review is being sent):
//!
//! - an authenticated review is reused for [`REVIEW_TTL`], or until the token's own expiry
//!   (its `exp` claim, read once the API server has authenticated it) when that is sooner,
//!   so a token is never honoured past its end; a refused one (unauthenticated,
//!   which is also what the API server answers for a token not meant for the CA's audience)
//!   for [`NEGATIVE_TTL`]; an error (the API server unreachable, a `5xx`, a malformed answer)
//!   is never kept: the next request asks again;
//! - concurrent requests with the same token share one review: the first sends it, the others
//!   wait for its answer (`joined`); the review runs in a task of its own, so that it ends
//!   (its place freed, its answer kept if it is one) even when every request waiting for it
//!   has given up; one the API server has not answered within [`REVIEW_TIMEOUT`] ends as an
//!   error;
//! - at most [`MAX_IN_FLIGHT`] reviews are being sent at once; a review over it waits for a
//!   place up to [`QUEUE_WAIT`], then is answered [`Denied::Busy`] (`503`,
//!   `token_reviews_busy`), which is not kept either.
//!
//! Sending one review is a [`Reviewer`]'s job (the API server's, [`KubeReviewer`]; a closure in
//! tests); time is passed in (`now`), so expiry is decided by the caller's clock. Counted in
//! `ztunnel_ca_token_reviews_total{result}` (sent) and
//! `ztunnel_ca_token_reviews_saved_total{result}` (not sent: `cached_authenticated`,
//! `cached_rejected`, `joined`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::{FutureExt, Shared};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::PostParams;
use kube::Api;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use super::metrics::CaMetrics;
use super::server::Denied;
use crate::identity::BoxFuture;

/// How long an authenticated TokenReview is reused: a node renewing many certificates sends
/// one review a minute; what the review does not say (the caller's pods) is looked up anew for
/// every request.
pub const REVIEW_TTL: Duration = Duration::from_secs(60);
/// How long a refused TokenReview is reused: a flood of one bad token costs one review per
/// this period, while a token refused because, say, its pod object was not yet visible to the
/// API server is asked about again soon.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// Reviews being sent at once, in all.
pub const MAX_IN_FLIGHT: usize = 64;
/// How long one review may hold its place waiting for the API server: as long as the request
/// that asked for it may wait (the CA's request timeout).
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a review waits for one of those places before its requests are answered `503`.
pub const QUEUE_WAIT: Duration = Duration::from_secs(2);
/// Most cached reviews; beyond it the expired ones go, then all (each node holds one token at
/// a time).
const CACHE_MAX: usize = 20_000;

/// The refusal reason of a request whose review found no place in time.
pub const BUSY: &str = "token_reviews_busy";

/// When a JSON Web Token says it expires (its `exp` claim), read without checking its
/// signature: only for a token the API server has authenticated. `None` when it says nothing
/// readable.
pub fn token_expiry(token: &str) -> Option<SystemTime> {
    use base64::Engine;
    #[derive(serde::Deserialize)]
    struct Claims {
        exp: u64,
    }
    let payload = token.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Claims = serde_json::from_slice(&json).ok()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(claims.exp))
}

/// The cache and de-duplication key of a token.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Sends one TokenReview of a token and returns its status, or why there is none (an error:
/// never cached).
pub trait Reviewer: Send + Sync + 'static {
    fn review(&self, token: String) -> BoxFuture<'static, Result<TokenReviewStatus, String>>;
}

impl<F> Reviewer for F
where
    F: Fn(String) -> BoxFuture<'static, Result<TokenReviewStatus, String>> + Send + Sync + 'static,
{
    fn review(&self, token: String) -> BoxFuture<'static, Result<TokenReviewStatus, String>> {
        self(token)
    }
}

/// TokenReviews through the API server (`authentication.k8s.io/v1`, `spec.audiences =
/// [audience]`).
pub struct KubeReviewer {
    pub api: Api<TokenReview>,
    pub audience: String,
}

impl Reviewer for KubeReviewer {
    fn review(&self, token: String) -> BoxFuture<'static, Result<TokenReviewStatus, String>> {
        let (api, audience) = (self.api.clone(), self.audience.clone());
        Box::pin(async move {
            let req = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token),
                    audiences: Some(vec![audience]),
                },
                ..Default::default()
            };
            match api.create(&PostParams::default(), &req).await {
                Ok(r) => r
                    .status
                    .ok_or_else(|| "the TokenReview came back without a status".to_owned()),
                Err(e) => Err(format!("TokenReview failed: {e}")),
            }
        })
    }
}

/// Kept reviews by token hash, each with its expiry.
#[derive(Default)]
pub struct ReviewCache {
    entries: HashMap<[u8; 32], (Instant, TokenReviewStatus)>,
}

impl ReviewCache {
    pub fn get(&mut self, key: &[u8; 32], now: Instant) -> Option<TokenReviewStatus> {
        match self.entries.get(key) {
            Some((until, s)) if *until > now => Some(s.clone()),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    /// Keeps `status` until `now` + [`REVIEW_TTL`] if it is authenticated (+ `token_left`,
    /// what is left of the token's validity, when that is less), + [`NEGATIVE_TTL`]
    /// otherwise.
    pub fn put(
        &mut self,
        key: [u8; 32],
        status: &TokenReviewStatus,
        now: Instant,
        token_left: Option<Duration>,
    ) {
        let ttl = if authenticated(status) {
            token_left.map_or(REVIEW_TTL, |left| left.min(REVIEW_TTL))
        } else {
            NEGATIVE_TTL
        };
        if self.entries.len() >= CACHE_MAX {
            self.entries.retain(|_, (until, _)| *until > now);
            if self.entries.len() >= CACHE_MAX {
                self.entries.clear();
            }
        }
        self.entries.insert(key, (now + ttl, status.clone()));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn authenticated(s: &TokenReviewStatus) -> bool {
    s.authenticated == Some(true)
}

/// One review being sent, shared by every request waiting for it.
type Pending = Shared<BoxFuture<'static, Result<TokenReviewStatus, Denied>>>;

#[derive(Default)]
struct State {
    cache: ReviewCache,
    pending: HashMap<[u8; 32], Pending>,
}

struct Inner {
    reviewer: Box<dyn Reviewer>,
    state: Mutex<State>,
    places: Semaphore,
    queue_wait: Duration,
    timeout: Duration,
    metrics: Arc<CaMetrics>,
}

/// The reviews of one authorizer ([module docs](self)).
#[derive(Clone)]
pub struct Reviews {
    inner: Arc<Inner>,
}

impl Reviews {
    /// At most [`MAX_IN_FLIGHT`] reviews at once, each waiting at most [`QUEUE_WAIT`] for its
    /// place.
    pub fn new(reviewer: impl Reviewer, metrics: Arc<CaMetrics>) -> Self {
        Self::with_bound(reviewer, metrics, MAX_IN_FLIGHT, QUEUE_WAIT, REVIEW_TIMEOUT)
    }

    /// At most `in_flight` reviews at once, each waiting at most `queue_wait` for its place
    /// and `timeout` for its answer.
    pub fn with_bound(
        reviewer: impl Reviewer,
        metrics: Arc<CaMetrics>,
        in_flight: usize,
        queue_wait: Duration,
        timeout: Duration,
    ) -> Self {
        Reviews {
            inner: Arc::new(Inner {
                reviewer: Box::new(reviewer),
                state: Mutex::default(),
                places: Semaphore::new(in_flight),
                queue_wait,
                timeout,
                metrics,
            }),
        }
    }

    /// The review of `token` as of `now`: kept, being sent for another request, or sent now.
    pub async fn review(&self, token: &str, now: Instant) -> Result<TokenReviewStatus, Denied> {
        let key = token_hash(token);
        let pending = {
            let mut st = self.inner.state.lock();
            if let Some(s) = st.cache.get(&key, now) {
                drop(st);
                self.inner.metrics.token_review_saved(if authenticated(&s) {
                    "cached_authenticated"
                } else {
                    "cached_rejected"
                });
                return Ok(s);
            }
            match st.pending.get(&key) {
                Some(p) => {
                    self.inner.metrics.token_review_saved("joined");
                    p.clone()
                }
                None => {
                    let task = tokio::spawn(send(self.inner.clone(), key, token.to_owned(), now));
                    let p = async move {
                        task.await.unwrap_or_else(|e| {
                            Err(Denied::Unavailable(format!("the TokenReview's task: {e}")))
                        })
                    }
                    .boxed()
                    .shared();
                    st.pending.insert(key, p.clone());
                    p
                }
            }
        };
        pending.await
    }

    /// Reviews kept now (tests and tools).
    pub fn cached(&self) -> usize {
        self.inner.state.lock().cache.len()
    }
}

/// Sends the review of `token` once a place is free, keeps its answer if it is one, and stops
/// being pending either way.
async fn send(
    inner: Arc<Inner>,
    key: [u8; 32],
    token: String,
    now: Instant,
) -> Result<TokenReviewStatus, Denied> {
    let expiry = token_expiry(&token);
    let result = match tokio::time::timeout(inner.queue_wait, inner.places.acquire()).await {
        Ok(Ok(_place)) => match tokio::time::timeout(inner.timeout, inner.reviewer.review(token))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {:?}", inner.timeout)))
        {
            Ok(status) => {
                inner.metrics.token_review(if authenticated(&status) {
                    "authenticated"
                } else {
                    "rejected"
                });
                Ok(status)
            }
            Err(e) => {
                inner.metrics.token_review("error");
                Err(Denied::Unavailable(e))
            }
        },
        // The semaphore is never closed.
        Ok(Err(_)) | Err(_) => Err(Denied::Busy {
            reason: BUSY,
            detail: format!(
                "too many TokenReviews in flight; none free within {:?}",
                inner.queue_wait
            ),
        }),
    };
    let mut st = inner.state.lock();
    st.pending.remove(&key);
    if let Ok(status) = &result {
        let left = expiry.map(|e| e.duration_since(SystemTime::now()).unwrap_or_default());
        st.cache.put(key, status, now, left);
    }
    result
}

#[cfg(test)]
mod tests;
