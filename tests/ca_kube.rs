//! `ztunnel ca` for a cluster, as a real process of the built binary on loopback, against the
//! stand-in API server (`harness::apiserver`), which answers TokenReviews per token the way a
//! real API server would (authenticated or not, audiences, user, extra).
//!
//! - `authorizes_nodes_by_token_and_pods`: a token for the wrong audience (401), a token of a
//!   non-daemon ServiceAccount (403), a request for an identity with no Running pod on the
//!   caller's node — none at all, one on another node, one not Running — (403) are refused;
//!   the right requests are signed (leaf URI SAN checked), with the node taken from the token's
//!   node-name extra or from its bound pod; pods added and deleted later change the answers;
//!   TokenReviews are sent with our audience and cached; no token ever reaches the log.
//! - `secret_is_created_reused_and_rotated`: the Secret is created when absent, the bundle is
//!   published in the ConfigMap, the Secret is reused on restart; a rotation (a second root in
//!   `root-cert.pem`, a new signing key) is picked up live: both roots are served, the leaf
//!   and the CA's serving certificate chain to the new root; an invalid update is refused and
//!   the CA keeps signing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use serde_json::{json, Value};
use ztunnel::ca::{CaClient, CaMaterial};
use ztunnel::identity::{generate_csr, CertSigner, Identity, SignError, WorkloadCert};
use ztunnel_e2e::apiserver::ApiServer;
use ztunnel_e2e::daemon::{binary, die_with_test};
use ztunnel_proto::ca::{SignRequest, SignResponse};

const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
const DAEMON_USER: &str = "system:serviceaccount:ztunnel-system:ztunnel";
const NODE_EXTRA: &str = "authentication.kubernetes.io/node-name";
const TIMEOUT: Duration = Duration::from_secs(30);

/// A `ztunnel ca` process; killed on drop, its log printed when the test fails.
struct CaProcess {
    child: Child,
    log: PathBuf,
    addr: String,
}

impl CaProcess {
    fn start(dir: &Path, name: &str, api: &ApiServer, args: &[&str]) -> CaProcess {
        let kubeconfig = dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig, "ca-sa-token");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = die_with_test(&mut Command::new(binary("ztunnel")))
            .arg("ca")
            .args(["--listen", &addr, "--server-name", "localhost"])
            .args(args)
            .env_clear()
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start ztunnel ca");
        let mut p = CaProcess { child, log, addr };
        p.wait_listening();
        p
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("ztunnel ca exited ({status}):\n{}", self.log_text());
            }
            if std::net::TcpStream::connect(&self.addr).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ztunnel ca not listening:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log_text()
    }
}

impl Drop for CaProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- ztunnel ca log ---\n{}", self.log_text());
        }
    }
}

fn pod(ns: &str, name: &str, sa: &str, node: &str, phase: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "c", "image": "i"}]},
        "status": {"phase": phase}
    })
}

/// What the stand-in says about a token.
#[derive(Clone)]
struct TokenInfo {
    user: &'static str,
    /// The token's own audiences.
    audiences: &'static [&'static str],
    /// true: answered as a real API server does (the audiences asked for that the token has;
    /// none → not authenticated); false: an authenticator that ignores the audiences asked
    /// for and answers with the token's own (to exercise the CA's own audience check).
    honours_audiences: bool,
    extra: Vec<(&'static str, String)>,
}

/// (token, audiences asked) of every TokenReview the stand-in answered.
type Reviews = Arc<Mutex<Vec<(String, Vec<String>)>>>;

/// Installs a TokenReview handler: answers per token, records the audiences each review asked.
fn review_tokens(api: &ApiServer, tokens: HashMap<&'static str, TokenInfo>) -> Reviews {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    api.on_create(TOKEN_REVIEWS, move |body: Value| {
        let token = body["spec"]["token"].as_str().unwrap_or_default().to_string();
        let asked: Vec<String> = body["spec"]["audiences"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
            .unwrap_or_default();
        log.lock().unwrap().push((token.clone(), asked.clone()));
        let status = match tokens.get(token.as_str()) {
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
            Some(t) => {
                let audiences: Vec<String> = if t.honours_audiences {
                    asked.iter().filter(|a| t.audiences.contains(&a.as_str())).cloned().collect()
                } else {
                    t.audiences.iter().map(|s| s.to_string()).collect()
                };
                if t.honours_audiences && audiences.is_empty() {
                    json!({"authenticated": false, "error": "token audiences are invalid for the target audiences"})
                } else {
                    let extra: serde_json::Map<String, Value> = t
                        .extra
                        .iter()
                        .map(|(k, v)| (k.to_string(), json!([v])))
                        .collect();
                    json!({"authenticated": true, "audiences": audiences,
                           "user": {"username": t.user, "uid": "u", "groups": ["system:serviceaccounts"], "extra": extra}})
                }
            }
        };
        (
            201,
            json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                   "metadata": {"creationTimestamp": null}, "spec": body["spec"], "status": status}),
        )
    });
    seen
}

fn client(ca: &CaProcess, root_pem: &str, token: &str) -> CaClient {
    CaClient::new(
        ca.addr.clone(),
        "localhost".into(),
        root_pem,
        Some(token.into()),
    )
    .unwrap()
}

/// Asks for `id` with a fresh key; returns the answer and checks a signed leaf's URI SAN.
async fn sign(c: &CaClient, id: &str) -> Result<SignResponse, SignError> {
    let id: Identity = id.parse().unwrap();
    let kc = generate_csr(&id).unwrap();
    let resp = c
        .sign(SignRequest {
            csr_pem: kc.csr_pem,
            identity: id.to_string(),
            lifetime_secs: 600,
        })
        .await?;
    // The leaf's only URI SAN is the requested identity and carries our key.
    WorkloadCert::from_signed(
        id,
        &kc.key,
        &resp.cert_chain_pem,
        &resp.roots_pem,
        std::time::SystemTime::now(),
    )
    .expect("a valid leaf for the requested identity");
    Ok(resp)
}

fn status_of(r: Result<SignResponse, SignError>) -> u16 {
    match r {
        Ok(_) => 200,
        Err(SignError::Refused { status, .. }) => status,
        Err(e) => panic!("not an answer: {e}"),
    }
}

/// Polls `f` until it returns true.
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let deadline = Instant::now() + TIMEOUT;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn configmap_root(api: &ApiServer) -> Option<String> {
    api.get("v1", "ConfigMap", Some("ztunnel-system"), "ztunnel-ca-root")
        .and_then(|cm| cm["data"]["root-cert.pem"].as_str().map(String::from))
}

fn secret_material(api: &ApiServer, name: &str) -> Option<CaMaterial> {
    let v = api.get("v1", "Secret", Some("ztunnel-system"), name)?;
    let s: Secret = serde_json::from_value(v).unwrap();
    let data = s.data.unwrap();
    let get = |k: &str| String::from_utf8(data[k].0.clone()).unwrap();
    Some(CaMaterial {
        ca_cert: get("ca-cert.pem"),
        ca_key: get("ca-key.pem"),
        root_cert: get("root-cert.pem"),
        cert_chain: get("cert-chain.pem"),
    })
}

fn put_secret(api: &ApiServer, name: &str, m: &CaMaterial) {
    let mut s = ztunnel::ca::secret::secret_of(name, m);
    s.metadata.namespace = Some("ztunnel-system".into());
    let mut v = serde_json::to_value(&s).unwrap();
    v["apiVersion"] = json!("v1");
    v["kind"] = json!("Secret");
    api.apply(v);
}

/// Whether a chain verifies (webpki, as a client certificate) against the roots in `roots_pem`.
fn chains_to(chain_pem: &[String], roots_pem: &str) -> bool {
    let chain = ztunnel::identity::parse_pem_certs(chain_pem).unwrap();
    let roots = ztunnel::identity::root_store(
        &ztunnel::identity::parse_pem_certs(&[roots_pem.to_owned()]).unwrap(),
    )
    .unwrap();
    let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    v.verify_client_cert(&chain[0], &chain[1..], rustls_pki_types::UnixTime::now())
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorizes_nodes_by_token_and_pods() {
    let dir = tempfile::tempdir().unwrap();
    let api = ApiServer::start();
    api.apply(pod(
        "ztunnel-system",
        "ztunnel-n1",
        "ztunnel",
        "n1",
        "Running",
    ));
    api.apply(pod("demo", "web-1", "web", "n1", "Running"));
    api.apply(pod("demo", "db-1", "db", "n2", "Running"));
    api.apply(pod("demo", "job-1", "job", "n1", "Pending"));
    let daemon_uid = api
        .get("v1", "Pod", Some("ztunnel-system"), "ztunnel-n1")
        .unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let daemon = |extra: Vec<(&'static str, String)>| TokenInfo {
        user: DAEMON_USER,
        audiences: &["ztunnel-ca"],
        honours_audiences: true,
        extra,
    };
    let tokens = HashMap::from([
        ("tok-daemon-n1", daemon(vec![(NODE_EXTRA, "n1".into())])),
        ("tok-daemon-n2", daemon(vec![(NODE_EXTRA, "n2".into())])),
        (
            "tok-daemon-bound",
            daemon(vec![
                ("authentication.kubernetes.io/pod-name", "ztunnel-n1".into()),
                ("authentication.kubernetes.io/pod-uid", daemon_uid),
            ]),
        ),
        (
            // A token for the API server's audience, reviewed by an authenticator that does
            // not filter audiences: the CA's own check must refuse it.
            "tok-wrong-aud-lax",
            TokenInfo {
                audiences: &["https://kubernetes.default.svc"],
                honours_audiences: false,
                ..daemon(vec![(NODE_EXTRA, "n1".into())])
            },
        ),
        (
            // The same, reviewed the way a real API server does (not authenticated).
            "tok-wrong-aud",
            TokenInfo {
                audiences: &["https://kubernetes.default.svc"],
                ..daemon(vec![(NODE_EXTRA, "n1".into())])
            },
        ),
        (
            "tok-web",
            TokenInfo {
                user: "system:serviceaccount:demo:web",
                ..daemon(vec![(NODE_EXTRA, "n1".into())])
            },
        ),
    ]);
    let reviews = review_tokens(&api, tokens);
    let ca = CaProcess::start(
        dir.path(),
        "ca",
        &api,
        &[
            "--authorizer",
            "kubernetes",
            "--ca-secret",
            "ztunnel-system/ztunnel-ca",
        ],
    );
    let root = configmap_root(&api).expect("the bundle is published before serving");

    let web = "spiffe://cluster.local/ns/demo/sa/web";
    // (token, identity, expected status)
    let cases: &[(&str, &str, u16)] = &[
        ("tok-wrong-aud-lax", web, 401),
        ("tok-wrong-aud", web, 401),
        ("tok-unknown", web, 401),
        ("tok-web", web, 403),
        ("tok-daemon-n1", "spiffe://cluster.local/ns/demo/sa/db", 403), // its pod is on n2
        (
            "tok-daemon-n1",
            "spiffe://cluster.local/ns/demo/sa/ghost",
            403,
        ), // no pod at all
        (
            "tok-daemon-n1",
            "spiffe://cluster.local/ns/demo/sa/job",
            403,
        ), // not Running
        ("tok-daemon-n2", web, 403),
        ("tok-daemon-n1", web, 200),
        ("tok-daemon-bound", web, 200), // node from the bound pod
        ("tok-daemon-n2", "spiffe://cluster.local/ns/demo/sa/db", 200),
        ("tok-daemon-n1", web, 200),
        ("tok-daemon-n1", web, 200),
    ];
    for (token, id, want) in cases {
        let got = status_of(sign(&client(&ca, &root, token), id).await);
        assert_eq!(got, *want, "{token} asking for {id}");
    }
    // A wrong token over a fresh connection, and no token at all.
    let anon = CaClient::new(ca.addr.clone(), "localhost".into(), &root, None).unwrap();
    assert_eq!(status_of(sign(&anon, web).await), 401);

    // Pods come and go: a new Running pod on n1 makes its identity signable, its deletion
    // refuses it again.
    api.apply(pod("demo", "api-1", "api", "n1", "Running"));
    let n1 = &client(&ca, &root, "tok-daemon-n1");
    let api_id = "spiffe://cluster.local/ns/demo/sa/api";
    eventually("the new pod to be signable", move || async move {
        status_of(sign(n1, api_id).await) == 200
    })
    .await;
    api.delete("v1", "Pod", Some("demo"), "api-1");
    eventually("the deleted pod to be refused", move || async move {
        status_of(sign(n1, api_id).await) == 403
    })
    .await;

    // Every review asked for our audience; the daemon's many requests sent few reviews.
    let reviews = reviews.lock().unwrap().clone();
    assert!(
        reviews
            .iter()
            .all(|(_, aud)| aud == &["ztunnel-ca".to_string()]),
        "{reviews:?}"
    );
    let n1_requests = cases.iter().filter(|c| c.0 == "tok-daemon-n1").count() + 2;
    let n1_reviews = reviews.iter().filter(|(t, _)| t == "tok-daemon-n1").count();
    assert!(
        n1_reviews < n1_requests,
        "{n1_reviews} reviews for {n1_requests} requests: not cached"
    );

    // Every refusal was counted, by reason.
    let (status, metrics) = n1.get("/metrics").await.unwrap();
    assert_eq!(status, 200);
    let count = |series: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
    };
    assert!(count("ztunnel_ca_refusals_total{reason=\"no_pod_on_node\"}") >= 5);
    assert_eq!(count("ztunnel_ca_refusals_total{reason=\"not_daemon\"}"), 1);
    assert_eq!(count("ztunnel_ca_refusals_total{reason=\"audience\"}"), 1);
    assert_eq!(
        count("ztunnel_ca_refusals_total{reason=\"unauthenticated\"}"),
        2
    );
    assert_eq!(count("ztunnel_ca_refusals_total{reason=\"no_token\"}"), 1);
    assert!(count("ztunnel_ca_signed_total") >= 6);

    let log = ca.stop();
    for reason in [
        "audience",
        "not_daemon",
        "no_pod_on_node",
        "unauthenticated",
        "no_token",
    ] {
        assert!(log.contains(reason), "refusal {reason} not logged:\n{log}");
    }
    for token in ["tok-daemon", "tok-web", "tok-wrong", "tok-unknown"] {
        assert!(!log.contains(token), "a token reached the log:\n{log}");
    }
    // Once serving, the CA gave back the code pages only its start-up ran, as the daemon does.
    assert!(
        log.contains("released the code pages only start-up used")
            && !log.contains("could not release start-up code pages"),
        "start-up pages not released:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_is_created_reused_and_rotated() {
    let dir = tempfile::tempdir().unwrap();
    let api = ApiServer::start();
    let token_file = dir.path().join("tokens");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let args = [
        "--ca-secret",
        "ztunnel-system/ztunnel-ca",
        "--token-file",
        token_file.to_str().unwrap(),
    ];
    assert!(secret_material(&api, "ztunnel-ca").is_none());
    let ca = CaProcess::start(dir.path(), "ca-1", &api, &args);
    let first = secret_material(&api, "ztunnel-ca").expect("the Secret was created");
    assert_eq!(
        configmap_root(&api).as_deref(),
        Some(first.root_cert.as_str())
    );
    let id = "spiffe://cluster.local/ns/demo/sa/web";
    let resp = sign(&client(&ca, &first.root_cert, "s3cret"), id)
        .await
        .unwrap();
    assert_eq!(resp.roots_pem.len(), 1);
    assert!(chains_to(&resp.cert_chain_pem, &first.root_cert));
    ca.stop();

    // Restart: the same Secret is reused, not replaced.
    let rv = api
        .get("v1", "Secret", Some("ztunnel-system"), "ztunnel-ca")
        .unwrap()["metadata"]["resourceVersion"]
        .clone();
    let ca = CaProcess::start(dir.path(), "ca-2", &api, &args);
    let again = secret_material(&api, "ztunnel-ca").unwrap();
    assert_eq!(again, first);
    let after = api
        .get("v1", "Secret", Some("ztunnel-system"), "ztunnel-ca")
        .unwrap();
    assert_eq!(
        after["metadata"]["resourceVersion"], rv,
        "the Secret was rewritten"
    );
    let resp = sign(&client(&ca, &first.root_cert, "s3cret"), id)
        .await
        .unwrap();
    assert!(chains_to(&resp.cert_chain_pem, &first.root_cert));

    // Rotation: a new root signs; the bundle holds the old and the new root.
    let fresh = CaMaterial::generate("cluster.local").unwrap();
    let new_root = fresh.root_cert.clone();
    let rotated = CaMaterial {
        root_cert: format!("{}{}", first.root_cert, fresh.root_cert),
        ..fresh
    };
    put_secret(&api, "ztunnel-ca", &rotated);
    let deadline = Instant::now() + TIMEOUT;
    let resp = loop {
        // A fresh connection each time, from a daemon that knows only the new root: the
        // serving certificate must have been re-issued from the new material.
        if let Ok(r) = sign(&client(&ca, &new_root, "s3cret"), id).await {
            if r.roots_pem.len() == 2 {
                break r;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the rotated material was not served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        chains_to(&resp.cert_chain_pem, &new_root),
        "signed by the new root"
    );
    assert!(!chains_to(&resp.cert_chain_pem, &first.root_cert));
    assert!(chains_to(&resp.cert_chain_pem, &rotated.root_cert));
    let want = rotated.root_cert.clone();
    eventually("the ConfigMap to hold both roots", || {
        let r = configmap_root(&api);
        let want = want.clone();
        async move { r == Some(want) }
    })
    .await;

    // A bad update (a key that is not the signing certificate's) is refused: the CA keeps
    // signing with the rotated material.
    let bad = CaMaterial {
        ca_key: first.ca_key.clone(),
        ..rotated.clone()
    };
    put_secret(&api, "ztunnel-ca", &bad);
    eventually("the bad update to be refused", || {
        let log = std::fs::read_to_string(&ca.log).unwrap_or_default();
        async move { log.contains("refusing an invalid update") }
    })
    .await;
    let resp = sign(&client(&ca, &rotated.root_cert, "s3cret"), id)
        .await
        .unwrap();
    assert_eq!(resp.roots_pem.len(), 2);
    assert!(chains_to(&resp.cert_chain_pem, &new_root));
    assert_eq!(
        configmap_root(&api).as_deref(),
        Some(rotated.root_cert.as_str())
    );
    // A wrong static token is still refused.
    assert_eq!(
        status_of(sign(&client(&ca, &rotated.root_cert, "nope"), id).await),
        401
    );
    ca.stop();
}
