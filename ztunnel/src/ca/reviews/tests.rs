//! The reviews' cache, de-duplication and bound, with a reviewer that answers by token and
//! holds each review until the test lets it go: no API server, time passed in.

use std::sync::atomic::{AtomicUsize, Ordering};

use futures::future::join_all;

use super::*;

/// Answers `good` (and any token with a `.`, a JWT) authenticated, `error` with an error,
/// anything else refused; each review
/// waits for a place of `gate` (the test adds places to let reviews finish).
struct Fake {
    gate: Semaphore,
    calls: AtomicUsize,
    active: AtomicUsize,
    max_active: AtomicUsize,
}

impl Default for Fake {
    fn default() -> Self {
        Fake {
            gate: Semaphore::new(0),
            calls: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            max_active: AtomicUsize::new(0),
        }
    }
}

fn status(authenticated: bool) -> TokenReviewStatus {
    TokenReviewStatus {
        authenticated: Some(authenticated),
        ..Default::default()
    }
}

fn reviewer(fake: &Arc<Fake>) -> impl Reviewer {
    let fake = fake.clone();
    move |token: String| -> BoxFuture<'static, Result<TokenReviewStatus, String>> {
        let fake = fake.clone();
        Box::pin(async move {
            fake.calls.fetch_add(1, Ordering::SeqCst);
            let now = fake.active.fetch_add(1, Ordering::SeqCst) + 1;
            fake.max_active.fetch_max(now, Ordering::SeqCst);
            fake.gate.acquire().await.unwrap().forget();
            fake.active.fetch_sub(1, Ordering::SeqCst);
            match token.as_str() {
                "good" => Ok(status(true)),
                "error" => Err("the API server is down".into()),
                t if t.contains('.') => Ok(status(true)),
                _ => Ok(status(false)),
            }
        })
    }
}

/// Lets `n` reviews finish.
fn release(fake: &Fake, n: usize) {
    fake.gate.add_permits(n);
}

fn reviews(fake: &Arc<Fake>, bound: usize, wait: Duration) -> (Reviews, Arc<CaMetrics>) {
    let metrics = Arc::new(CaMetrics::default());
    (
        Reviews::with_bound(reviewer(fake), metrics.clone(), bound, wait, LONG),
        metrics,
    )
}

/// Yields until `done`: the other futures of this task, or other tasks, make progress.
async fn until(done: impl Fn() -> bool) {
    while !done() {
        tokio::task::yield_now().await;
    }
}

const LONG: Duration = Duration::from_secs(3600);

#[test]
fn the_cache_keeps_authenticated_reviews_a_minute_and_refused_ones_a_few_seconds() {
    let mut c = ReviewCache::default();
    let t0 = Instant::now();
    c.put(token_hash("good"), &status(true), t0, None);
    c.put(token_hash("bad"), &status(false), t0, None);
    assert_eq!(c.get(&token_hash("good"), t0), Some(status(true)));
    assert_eq!(c.get(&token_hash("bad"), t0), Some(status(false)));
    assert_eq!(c.get(&token_hash("other"), t0), None);
    let later = t0 + NEGATIVE_TTL;
    assert_eq!(c.get(&token_hash("bad"), later), None);
    assert_eq!(c.get(&token_hash("good"), later), Some(status(true)));
    assert_eq!(c.get(&token_hash("good"), t0 + REVIEW_TTL), None);
    assert!(c.is_empty());
}

/// An authenticated review is not reused past the token's own expiry; a refused one keeps
/// its few seconds whatever the token says.
#[test]
fn an_authenticated_review_ends_with_its_token() {
    let mut c = ReviewCache::default();
    let t0 = Instant::now();
    let left = Some(Duration::from_secs(10));
    c.put(token_hash("ending"), &status(true), t0, left);
    c.put(token_hash("bad"), &status(false), t0, Some(Duration::ZERO));
    c.put(token_hash("long"), &status(true), t0, Some(LONG));
    let soon = t0 + Duration::from_secs(10);
    assert_eq!(c.get(&token_hash("ending"), soon), None);
    assert_eq!(
        c.get(&token_hash("bad"), soon - Duration::from_secs(6)),
        Some(status(false))
    );
    assert_eq!(c.get(&token_hash("long"), soon), Some(status(true)));
    assert_eq!(c.get(&token_hash("long"), t0 + REVIEW_TTL), None);
}

/// A token about to expire is reviewed again once it has, not a minute after its review.
#[tokio::test]
async fn a_token_about_to_expire_is_not_honoured_from_the_cache_after_it() {
    use base64::Engine;
    let fake = Arc::new(Fake::default());
    release(&fake, 10);
    let (r, metrics) = reviews(&fake, 4, LONG);
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 2;
    let claims = format!(r#"{{"exp":{exp}}}"#);
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let token = format!("{}.{}.c2ln", b64(r#"{"alg":"RS256"}"#), b64(&claims));
    let t0 = Instant::now();
    assert_eq!(r.review(&token, t0).await, Ok(status(true)));
    assert_eq!(r.review(&token, t0).await, Ok(status(true)));
    assert_eq!(metrics.token_reviews_saved("cached_authenticated"), 1);
    assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
    // Past its expiry (well within a minute of its review): asked about again.
    assert_eq!(
        r.review(&token, t0 + Duration::from_secs(3)).await,
        Ok(status(true))
    );
    assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
}

/// A token's `exp` claim, as the API server writes it in a ServiceAccount token.
#[test]
fn a_tokens_expiry_is_its_exp_claim() {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let jwt = |claims: &str| format!("{}.{}.c2ln", b64(r#"{"alg":"RS256"}"#), b64(claims));
    let at = |secs| Some(std::time::UNIX_EPOCH + Duration::from_secs(secs));
    assert_eq!(
        token_expiry(&jwt(r#"{"exp":1800000000,"iss":"k"}"#)),
        at(1_800_000_000)
    );
    assert_eq!(token_expiry(&jwt(r#"{"iss":"k"}"#)), None);
    assert_eq!(token_expiry(&jwt(r#"{"exp":"soon"}"#)), None);
    assert_eq!(token_expiry("not-a-token"), None);
    assert_eq!(token_expiry("a.!!!.c"), None);
}

#[tokio::test]
async fn a_hundred_requests_with_one_bad_token_send_one_review_until_it_expires() {
    let fake = Arc::new(Fake::default());
    let (r, metrics) = reviews(&fake, 4, LONG);
    let t0 = Instant::now();
    let (answers, ()) = tokio::join!(
        join_all((0..100).map(|_| r.review("bad-token", t0))),
        async {
            // Every request is waiting on the one review before it is answered.
            until(|| metrics.token_reviews_saved("joined") == 99).await;
            release(&fake, 1);
        }
    );
    for a in answers {
        assert_eq!(a, Ok(status(false)));
    }
    assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
    assert_eq!(metrics.token_reviews("rejected"), 1);
    // Kept for a few seconds: no review.
    release(&fake, 10);
    let soon = t0 + NEGATIVE_TTL - Duration::from_millis(1);
    assert_eq!(r.review("bad-token", soon).await, Ok(status(false)));
    assert_eq!(metrics.token_reviews_saved("cached_rejected"), 1);
    assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
    // Then it is asked about again.
    assert_eq!(
        r.review("bad-token", t0 + NEGATIVE_TTL).await,
        Ok(status(false))
    );
    assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    // An authenticated review is kept for longer.
    assert_eq!(r.review("good", t0).await, Ok(status(true)));
    assert_eq!(
        r.review("good", t0 + REVIEW_TTL - Duration::from_millis(1))
            .await,
        Ok(status(true))
    );
    assert_eq!(metrics.token_reviews_saved("cached_authenticated"), 1);
    assert_eq!(fake.calls.load(Ordering::SeqCst), 3);
    assert_eq!(metrics.token_reviews("authenticated"), 1);
}

#[tokio::test]
async fn errors_are_shared_by_concurrent_requests_but_never_kept() {
    let fake = Arc::new(Fake::default());
    let (r, metrics) = reviews(&fake, 4, LONG);
    let t0 = Instant::now();
    let (answers, ()) = tokio::join!(join_all((0..10).map(|_| r.review("error", t0))), async {
        until(|| metrics.token_reviews_saved("joined") == 9).await;
        release(&fake, 1);
    });
    for a in answers {
        let d = a.unwrap_err();
        assert_eq!((d.status().as_u16(), d.reason()), (500, "unavailable"));
    }
    assert_eq!(r.cached(), 0);
    // The next request asks again.
    release(&fake, 1);
    assert!(r.review("error", t0).await.is_err());
    assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    assert_eq!(metrics.token_reviews("error"), 2);
}

#[tokio::test]
async fn reviews_in_flight_are_bounded_and_those_over_wait_then_get_503() {
    let fake = Arc::new(Fake::default());
    let (r, metrics) = reviews(&fake, 2, LONG);
    let t0 = Instant::now();
    // Three distinct tokens: two reviews are sent, the third waits for a place.
    let tokens = ["a", "b", "c"];
    let (answers, ()) = tokio::join!(join_all(tokens.map(|t| r.review(t, t0))), async {
        until(|| fake.calls.load(Ordering::SeqCst) == 2).await;
        // However long the others are held, the third is not sent until one is done.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
        release(&fake, 1);
        until(|| fake.calls.load(Ordering::SeqCst) == 3).await;
        release(&fake, 2);
    });
    assert!(answers.iter().all(|a| a == &Ok(status(false))));
    assert_eq!(fake.max_active.load(Ordering::SeqCst), 2);

    // With a short wait, a review finding no place is answered 503 and not kept.
    let fake = Arc::new(Fake::default());
    let (r, metrics2) = reviews(&fake, 1, Duration::from_millis(20));
    let (held, busy) = tokio::join!(r.review("a", t0), async {
        until(|| fake.calls.load(Ordering::SeqCst) == 1).await;
        let busy = r.review("b", t0).await;
        release(&fake, 1);
        busy
    });
    assert_eq!(held, Ok(status(false)));
    let d = busy.unwrap_err();
    assert_eq!((d.status().as_u16(), d.reason()), (503, BUSY));
    assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
    release(&fake, 1);
    assert_eq!(r.review("b", t0).await, Ok(status(false)));
    assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    assert_eq!(metrics.token_reviews("rejected"), 3);
    assert_eq!(metrics2.token_reviews("rejected"), 2);
}

/// A review whose requests all gave up runs on: its place is freed for others and its answer
/// kept, so the next request with the token is answered from the cache.
#[tokio::test]
async fn a_review_whose_requests_all_gave_up_ends_on_its_own() {
    let fake = Arc::new(Fake::default());
    let (r, _) = reviews(&fake, 1, Duration::from_millis(50));
    let t0 = Instant::now();
    let gave_up = tokio::time::timeout(Duration::from_millis(20), r.review("good", t0)).await;
    assert!(gave_up.is_err());
    assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
    release(&fake, 1);
    let kept = tokio::time::timeout(Duration::from_secs(5), until(|| r.cached() == 1)).await;
    assert!(kept.is_ok(), "the abandoned review ended and was kept");
    // Its place is free: another token's review is sent.
    release(&fake, 1);
    assert_eq!(r.review("other", t0).await, Ok(status(false)));
    assert_eq!(r.review("good", t0).await, Ok(status(true)));
    assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
}

/// A review the API server does not answer in time ends as an error, not kept, and gives its
/// place back.
#[tokio::test]
async fn a_review_never_answered_ends_at_its_timeout() {
    let fake = Arc::new(Fake::default());
    let metrics = Arc::new(CaMetrics::default());
    let timeout = Duration::from_millis(100);
    let r = Reviews::with_bound(reviewer(&fake), metrics.clone(), 1, LONG, timeout);
    let t0 = Instant::now();
    let started = Instant::now();
    let d = r.review("good", t0).await.unwrap_err();
    assert_eq!(d.reason(), "unavailable");
    assert!(started.elapsed() >= timeout);
    assert_eq!(metrics.token_reviews("error"), 1);
    assert_eq!(r.cached(), 0);
    release(&fake, 1);
    assert_eq!(r.review("other", t0).await, Ok(status(false)));
}
