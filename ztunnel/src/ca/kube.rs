//! The Kubernetes [`SignAuthorizer`]: a node daemon proves who it is with its projected
//! ServiceAccount token, and gets certificates only for the ServiceAccounts of pods running on
//! its own node.
//!
//! For each request (the decision itself is the pure [`authorize`]):
//! 1. the bearer token goes to the API server in a TokenReview (`authentication.k8s.io/v1`,
//!    `spec.audiences = [<audience>]`); refused (401) unless `status.authenticated` and the
//!    audience is in `status.audiences`;
//! 2. refused (403) unless the user is `system:serviceaccount:<daemon ns>:<daemon sa>`;
//! 3. the token must be bound to a pod (`status.user.extra["authentication.kubernetes.io/pod-uid"]`
//!    and `…/pod-name`) that the pod index holds now as a scheduled, unfinished pod of the
//!    daemon's ServiceAccount: the caller's node is that pod's node, and a `…/node-name` the
//!    token also carries (Kubernetes ≥ 1.30) must be the same → else 403. A token bound to a
//!    Node, or to a daemon pod deleted since, gets nothing, whatever its cached review says;
//! 4. the requested SPIFFE ID must be in the CA's trust domain and an active pod (Pending or
//!    Running: not finished) with its namespace/ServiceAccount must be on that node
//!    ([`PodIndex`]) → else 403.
//!
//! Reviews are cached under the SHA-256 of the token (never the token), authenticated ones for
//! a minute, refused ones for a few seconds, de-duplicated while in flight and bounded in all
//! ([`super::reviews`]); a daemon pod deleted or finished meanwhile fails step 3 at once, and a
//! workload's pod step 4, as the pod index is consulted for every request. Tokens are never
//! logged.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use k8s_openapi::api::authentication::v1::TokenReviewStatus;
use kube::Api;

use super::metrics::CaMetrics;
use super::pods::PodIndex;
use super::reviews::{KubeReviewer, Reviews};
use super::server::{Denied, SignAuthorizer};
use crate::identity::{BoxFuture, Identity};

pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// What the decision needs to know about this cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeAuthzConfig {
    /// The audience daemons' tokens must carry (`ztunnel-ca`).
    pub audience: String,
    pub daemon_namespace: String,
    pub daemon_service_account: String,
    pub trust_domain: String,
}

/// A granted request: the node it was granted to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub node: String,
}

fn single<'a>(extra: &'a BTreeMap<String, Vec<String>>, key: &str) -> Option<&'a str> {
    match extra.get(key).map(Vec::as_slice) {
        Some([v]) if !v.is_empty() => Some(v),
        _ => None,
    }
}

/// The decision, from a TokenReview's status, the pod index and the requested identity.
pub fn authorize(
    review: &TokenReviewStatus,
    pods: &PodIndex,
    requested: &Identity,
    cfg: &KubeAuthzConfig,
) -> Result<Grant, Denied> {
    if review.authenticated != Some(true) {
        return Err(Denied::unauthenticated(
            "unauthenticated",
            format!(
                "token not authenticated{}",
                review
                    .error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
        ));
    }
    if !review
        .audiences
        .as_deref()
        .unwrap_or_default()
        .contains(&cfg.audience)
    {
        return Err(Denied::unauthenticated(
            "audience",
            format!("token is not for audience {}", cfg.audience),
        ));
    }
    let user = review.user.clone().unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let daemon = format!(
        "system:serviceaccount:{}:{}",
        cfg.daemon_namespace, cfg.daemon_service_account
    );
    if username != daemon {
        return Err(Denied::forbidden(
            "not_daemon",
            format!("{username:?} is not the node daemon's ServiceAccount ({daemon})"),
        ));
    }
    let extra = user.extra.unwrap_or_default();
    let (Some(pod), Some(uid)) = (
        single(&extra, EXTRA_POD_NAME),
        single(&extra, EXTRA_POD_UID),
    ) else {
        return Err(Denied::forbidden(
            "no_node",
            "the token is not bound to a pod: cannot tell the caller's node",
        ));
    };
    let node = match pods.get(uid) {
        Some(p)
            if p.namespace == cfg.daemon_namespace
                && p.service_account == cfg.daemon_service_account
                && p.active
                && !p.node.is_empty() =>
        {
            p.node.clone()
        }
        _ => {
            return Err(Denied::forbidden(
                "no_node",
                format!(
                "the token's pod {}/{pod} (uid {uid}) is not a scheduled, unfinished daemon pod",
                cfg.daemon_namespace
            ),
            ))
        }
    };
    if let Some(claimed) = single(&extra, EXTRA_NODE_NAME) {
        if claimed != node {
            return Err(Denied::forbidden(
                "no_node",
                format!("the token names node {claimed}, its pod runs on {node}"),
            ));
        }
    }
    if requested.trust_domain() != cfg.trust_domain {
        return Err(Denied::forbidden(
            "trust_domain",
            format!("{requested} is not in trust domain {}", cfg.trust_domain),
        ));
    }
    if !pods.active_on(&node, requested.namespace(), requested.service_account()) {
        return Err(Denied::forbidden(
            "no_pod_on_node",
            format!(
                "no active pod with service account {}/{} on node {node}",
                requested.namespace(),
                requested.service_account()
            ),
        ));
    }
    Ok(Grant { node })
}

/// The authorizer: TokenReviews ([`Reviews`]), the decision against a watched pod index.
pub struct KubeAuthorizer {
    reviews: Reviews,
    cfg: KubeAuthzConfig,
    pods: Arc<RwLock<PodIndex>>,
}

impl KubeAuthorizer {
    /// Reviews through the API server of `client`.
    pub fn new(
        client: kube::Client,
        cfg: KubeAuthzConfig,
        pods: Arc<RwLock<PodIndex>>,
        metrics: Arc<CaMetrics>,
    ) -> Self {
        let reviewer = KubeReviewer {
            api: Api::all(client),
            audience: cfg.audience.clone(),
        };
        Self::with_reviews(Reviews::new(reviewer, metrics), cfg, pods)
    }

    pub fn with_reviews(
        reviews: Reviews,
        cfg: KubeAuthzConfig,
        pods: Arc<RwLock<PodIndex>>,
    ) -> Self {
        KubeAuthorizer { reviews, cfg, pods }
    }
}

impl SignAuthorizer for KubeAuthorizer {
    fn authorize<'a>(
        &'a self,
        token: Option<&'a str>,
        identity: &'a Identity,
    ) -> BoxFuture<'a, Result<(), Denied>> {
        Box::pin(async move {
            let token = token
                .filter(|t| !t.is_empty())
                .ok_or_else(|| Denied::unauthenticated("no_token", "missing bearer token"))?;
            let status = self.reviews.review(token, Instant::now()).await?;
            let pods = self.pods.read().unwrap_or_else(|e| e.into_inner());
            let grant = authorize(&status, &pods, identity, &self.cfg)?;
            tracing::info!(%identity, node = %grant.node, "CA: authorized");
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::super::pods::PodEntry;
    use super::*;

    const DAEMON: &str = "system:serviceaccount:ztunnel-system:ztunnel";

    fn cfg() -> KubeAuthzConfig {
        KubeAuthzConfig {
            audience: "ztunnel-ca".into(),
            daemon_namespace: "ztunnel-system".into(),
            daemon_service_account: "ztunnel".into(),
            trust_domain: "cluster.local".into(),
        }
    }

    fn review(auth: bool, aud: &[&str], user: &str, extra: &[(&str, &str)]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(auth),
            audiences: Some(aud.iter().map(|s| s.to_string()).collect()),
            error: None,
            user: Some(UserInfo {
                username: Some(user.into()),
                extra: Some(
                    extra
                        .iter()
                        .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                        .collect(),
                ),
                ..Default::default()
            }),
        }
    }

    fn pods() -> PodIndex {
        let mut ix = PodIndex::default();
        let mut add = |uid: &str, node: &str, ns: &str, sa: &str, active: bool| {
            ix.apply(
                uid.into(),
                PodEntry {
                    node: node.into(),
                    namespace: ns.into(),
                    service_account: sa.into(),
                    active,
                },
            )
        };
        add("web-1", "n1", "demo", "web", true);
        add("db-1", "n2", "demo", "db", true);
        add("job-1", "n1", "demo", "job", false);
        add("zt-1", "n1", "ztunnel-system", "ztunnel", true);
        add("zt-2", "n2", "ztunnel-system", "ztunnel", true);
        add("zt-old", "n1", "ztunnel-system", "ztunnel", false);
        add("other-1", "n2", "demo", "ztunnel", true);
        ix
    }

    const NODE: (&str, &str) = (EXTRA_NODE_NAME, "n1");
    const POD: (&str, &str) = (EXTRA_POD_NAME, "ztunnel-abc");
    /// A token bound to the running daemon pod `zt-1` on `n1`, naming that node too.
    const BOUND: &[(&str, &str)] = &[NODE, POD, (EXTRA_POD_UID, "zt-1")];

    #[test]
    fn decisions() {
        // (case, review, requested identity, expected: Ok(node) or Err(reason))
        type Case<'a> = (
            &'a str,
            TokenReviewStatus,
            &'a str,
            Result<&'a str, &'a str>,
        );
        let web = "spiffe://cluster.local/ns/demo/sa/web";
        let cases: Vec<Case<'_>> = vec![
            (
                "bound to the daemon pod, naming its node",
                review(true, &["ztunnel-ca"], DAEMON, BOUND),
                web,
                Ok("n1"),
            ),
            (
                "a node claim without a pod (a token bound to a Node)",
                review(true, &["ztunnel-ca"], DAEMON, &[NODE]),
                web,
                Err("no_node"),
            ),
            (
                "a node claim that is not the bound pod's node",
                review(
                    true,
                    &["ztunnel-ca"],
                    DAEMON,
                    &[(EXTRA_NODE_NAME, "n2"), POD, (EXTRA_POD_UID, "zt-1")],
                ),
                "spiffe://cluster.local/ns/demo/sa/db",
                Err("no_node"),
            ),
            (
                "bound daemon pod finished",
                review(
                    true,
                    &["ztunnel-ca"],
                    DAEMON,
                    &[NODE, POD, (EXTRA_POD_UID, "zt-old")],
                ),
                web,
                Err("no_node"),
            ),
            (
                "node from the bound pod",
                review(
                    true,
                    &["ztunnel-ca"],
                    DAEMON,
                    &[POD, (EXTRA_POD_UID, "zt-1")],
                ),
                web,
                Ok("n1"),
            ),
            (
                "not authenticated",
                review(false, &["ztunnel-ca"], DAEMON, BOUND),
                web,
                Err("unauthenticated"),
            ),
            (
                "wrong audience",
                review(true, &["kubernetes"], DAEMON, BOUND),
                web,
                Err("audience"),
            ),
            (
                "no audience",
                review(true, &[], DAEMON, BOUND),
                web,
                Err("audience"),
            ),
            (
                "another ServiceAccount",
                review(
                    true,
                    &["ztunnel-ca"],
                    "system:serviceaccount:demo:web",
                    BOUND,
                ),
                web,
                Err("not_daemon"),
            ),
            (
                "same SA name, other namespace",
                review(
                    true,
                    &["ztunnel-ca"],
                    "system:serviceaccount:demo:ztunnel",
                    BOUND,
                ),
                web,
                Err("not_daemon"),
            ),
            (
                "a user, not a ServiceAccount",
                review(true, &["ztunnel-ca"], "admin", &[NODE]),
                web,
                Err("not_daemon"),
            ),
            (
                "not bound to a pod",
                review(true, &["ztunnel-ca"], DAEMON, &[]),
                web,
                Err("no_node"),
            ),
            (
                "bound pod unknown",
                review(
                    true,
                    &["ztunnel-ca"],
                    DAEMON,
                    &[POD, (EXTRA_POD_UID, "gone")],
                ),
                web,
                Err("no_node"),
            ),
            (
                "bound pod of another ServiceAccount",
                review(
                    true,
                    &["ztunnel-ca"],
                    DAEMON,
                    &[POD, (EXTRA_POD_UID, "other-1")],
                ),
                web,
                Err("no_node"),
            ),
            (
                "pod name without uid",
                review(true, &["ztunnel-ca"], DAEMON, &[POD]),
                web,
                Err("no_node"),
            ),
            (
                "identity on another node",
                review(true, &["ztunnel-ca"], DAEMON, BOUND),
                "spiffe://cluster.local/ns/demo/sa/db",
                Err("no_pod_on_node"),
            ),
            (
                "identity with no pod at all",
                review(true, &["ztunnel-ca"], DAEMON, BOUND),
                "spiffe://cluster.local/ns/demo/sa/ghost",
                Err("no_pod_on_node"),
            ),
            (
                "pod finished",
                review(true, &["ztunnel-ca"], DAEMON, BOUND),
                "spiffe://cluster.local/ns/demo/sa/job",
                Err("no_pod_on_node"),
            ),
            (
                "other trust domain",
                review(true, &["ztunnel-ca"], DAEMON, BOUND),
                "spiffe://evil.local/ns/demo/sa/web",
                Err("trust_domain"),
            ),
            (
                "several audiences, ours among them",
                review(
                    true,
                    &["kubernetes", "ztunnel-ca"],
                    DAEMON,
                    &[(EXTRA_NODE_NAME, "n2"), POD, (EXTRA_POD_UID, "zt-2")],
                ),
                "spiffe://cluster.local/ns/demo/sa/db",
                Ok("n2"),
            ),
        ];
        let ix = pods();
        for (name, r, id, want) in cases {
            let id: Identity = id.parse().unwrap();
            let got = authorize(&r, &ix, &id, &cfg());
            match (got, want) {
                (Ok(g), Ok(node)) => assert_eq!(g.node, node, "{name}"),
                (Err(d), Err(reason)) => {
                    assert_eq!(d.reason(), reason, "{name}: {d}");
                    let status = if matches!(reason, "unauthenticated" | "audience") {
                        401
                    } else {
                        403
                    };
                    assert_eq!(d.status().as_u16(), status, "{name}");
                }
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }
}
