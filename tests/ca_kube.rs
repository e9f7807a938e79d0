//! `ztunnel ca` for a cluster, as a real process of the built binary, against the real
//! Kubernetes control plane (`harness::controlplane`): `deploy/base` applied, the CA running
//! with a token of its own ServiceAccount (`ztunnel-system/ztunnel-ca`, so `deploy/`'s RBAC is
//! what it has), daemons' tokens issued by the TokenRequest API and bound to Pod objects on
//! their nodes, as the kubelet's projected tokens are.
//!
//! In one test, `the_ca_on_the_real_api_server`, in turn:
//! - `authorizes_nodes_by_token_and_pods`: a token for another audience, of another
//!   ServiceAccount, unknown, expired, or bound to a pod since deleted is refused (401/403); a
//!   request for an identity with no active pod on the caller's node — none at all, one on
//!   another node, one finished — is refused (403); a Pending pod on the node gets its
//!   certificate (leaf URI SAN checked), as does a Running one; pods added and deleted later
//!   change the answers; TokenReviews are cached; no token ever reaches the log.
//! - `secret_is_created_reused_and_rotated`: the Secret is created when absent, the bundle is
//!   published in the ConfigMap, the Secret is reused on restart; a rotation (a second root in
//!   `root-cert.pem`, a new signing key) is picked up live: both roots are served, the leaf
//!   and the CA's serving certificate chain to the new root; an invalid update is refused and
//!   the CA keeps signing; the revocation lists are published from the Secret's `ca-crl.pem`
//!   into their ConfigMap (empty before), and lists that do not parse are refused;
//! - `replicas_starting_together_agree_on_one_root`: two replicas that both found no Secret
//!   both create it: one create wins, the other (409) takes the winner's material; and two CA
//!   processes started at once on a namespace without the Secret create it once between them
//!   and serve, sign with and publish the same root;
//! - `deploy/`'s RBAC for the CA's ServiceAccount checked against the API server's audit log:
//!   every verb it grants was used, no request was forbidden.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use serde_json::json;
use ztunnel::ca::{secret, CaClient, CaMaterial};
use ztunnel::identity::{generate_csr, CertSigner, Identity, SignError, WorkloadCert};
use ztunnel_e2e::controlplane::{self, ControlPlane, KubePod};
use ztunnel_e2e::daemon::{binary, die_with_test};
use ztunnel_e2e::netns::Netns;
use ztunnel_proto::ca::{SignRequest, SignResponse};

const TIMEOUT: Duration = Duration::from_secs(30);
const SECRET: &str = "cacerts";
const CONFIGMAP: &str = "ztunnel-ca-root";
const SYSTEM: &str = controlplane::SYSTEM_NAMESPACE;
const CA_PORT: u16 = 15012;

/// A host attached to the control plane, where the CA runs and the test's clients connect
/// from.
struct Host {
    ns: Netns,
    addr: String,
}

fn host(cp: &ControlPlane, name: &str) -> Host {
    let ns = Netns::new(&format!("{}-{name}", ztunnel_e2e::netns::unique_prefix())).unwrap();
    let addr = cp.attach(&ns).unwrap();
    Host { ns, addr }
}

/// A `ztunnel ca` process; killed on drop, its log printed when the test fails.
struct CaProcess {
    child: Child,
    log: PathBuf,
    addr: String,
}

/// A kubeconfig holding a token of `ztunnel-system/ztunnel-ca` bound to a Pod object of that
/// ServiceAccount, as in the CA Deployment.
fn ca_kubeconfig(cp: &ControlPlane, dir: &Path, name: &str) -> PathBuf {
    let pod = format!("ztunnel-ca-{name}-{}", std::process::id());
    let token = cp
        .system_pod_token("ztunnel-ca", &pod, "cp", &[controlplane::ISSUER])
        .unwrap();
    cp.token_kubeconfig(dir, &format!("{name}.kubeconfig"), &token)
        .unwrap()
}

impl CaProcess {
    /// Starts the CA in `host` with a kubeconfig from [`ca_kubeconfig`].
    fn start(cp: &ControlPlane, host: &Host, dir: &Path, name: &str, args: &[&str]) -> CaProcess {
        let kubeconfig = ca_kubeconfig(cp, dir, name);
        let mut p = Self::launch(host, dir, name, &kubeconfig, args);
        p.wait_listening(host);
        p
    }

    /// Starts the CA in `host` with `kubeconfig`, without waiting for it to listen.
    fn launch(host: &Host, dir: &Path, name: &str, kubeconfig: &Path, args: &[&str]) -> CaProcess {
        let addr = format!("{}:{CA_PORT}", host.addr);
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = die_with_test(Command::new("ip").args(["netns", "exec", &host.ns.name]))
            .arg(binary("ztunnel"))
            .arg("ca")
            .args(["--listen", &addr, "--server-name", "localhost"])
            .args(args)
            .env_clear()
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start ztunnel ca");
        CaProcess { child, log, addr }
    }

    fn wait_listening(&mut self, host: &Host) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("ztunnel ca exited ({status}):\n{}", self.log_text());
            }
            let addr = self.addr.clone();
            if host
                .ns
                .block_on(async move { tokio::net::TcpStream::connect(addr).await })
                .is_ok()
            {
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

/// Asks the CA for `id` with a fresh key, from `host`, with `token`; returns the answer and
/// checks a signed leaf's URI SAN.
fn sign(
    host: &Host,
    ca: &CaProcess,
    roots: &str,
    token: Option<&str>,
    id: &str,
) -> Result<SignResponse, SignError> {
    let (addr, roots, token, id) = (
        ca.addr.clone(),
        roots.to_string(),
        token.map(String::from),
        id.to_string(),
    );
    host.ns.block_on(async move {
        let c = CaClient::new(addr, "localhost".into(), &roots, token).unwrap();
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
    })
}

fn status_of(r: Result<SignResponse, SignError>) -> u16 {
    match r {
        Ok(_) => 200,
        Err(SignError::Refused { status, .. }) => status,
        Err(e) => panic!("not an answer: {e}"),
    }
}

/// The CA's `/metrics`, from `host`.
fn ca_metrics(host: &Host, ca: &CaProcess, roots: &str, token: &str) -> String {
    let (addr, roots, token) = (ca.addr.clone(), roots.to_string(), token.to_string());
    host.ns.block_on(async move {
        let c = CaClient::new(addr, "localhost".into(), &roots, Some(token)).unwrap();
        let (status, body) = c.get("/metrics").await.unwrap();
        assert_eq!(status, 200);
        body
    })
}

/// Polls `f` until it returns true.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    controlplane::wait_until(what, TIMEOUT, &mut f).unwrap();
}

fn configmap_crl(cp: &ControlPlane) -> Option<String> {
    cp.get("v1", "ConfigMap", Some(SYSTEM), secret::CRL_CONFIGMAP)
        .and_then(|cm| cm["data"][secret::CRL_KEY].as_str().map(String::from))
}

fn configmap_root(cp: &ControlPlane) -> Option<String> {
    cp.get("v1", "ConfigMap", Some(SYSTEM), CONFIGMAP)
        .and_then(|cm| cm["data"]["root-cert.pem"].as_str().map(String::from))
}

fn secret_material(cp: &ControlPlane) -> Option<CaMaterial> {
    let v = cp.get("v1", "Secret", Some(SYSTEM), SECRET)?;
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

fn put_secret(cp: &ControlPlane, m: &CaMaterial) {
    put_secret_with_crl(cp, m, None)
}

/// The Secret holding `m`, and `crl` under `ca-crl.pem` when given.
fn put_secret_with_crl(cp: &ControlPlane, m: &CaMaterial, crl: Option<&str>) {
    let mut s = ztunnel::ca::secret::secret_of(SECRET, m);
    s.metadata.namespace = Some(SYSTEM.into());
    if let Some(crl) = crl {
        s.data.get_or_insert_with(Default::default).insert(
            secret::CRL_KEY.into(),
            k8s_openapi::ByteString(crl.as_bytes().to_vec()),
        );
    }
    let mut v = serde_json::to_value(&s).unwrap();
    v["apiVersion"] = json!("v1");
    v["kind"] = json!("Secret");
    cp.apply(v).unwrap();
}

/// The CA's Secret and ConfigMap removed, for a test that starts from none.
fn fresh_ca_objects(cp: &ControlPlane) {
    cp.delete("v1", "Secret", Some(SYSTEM), SECRET).unwrap();
    cp.delete("v1", "ConfigMap", Some(SYSTEM), CONFIGMAP)
        .unwrap();
    cp.delete("v1", "ConfigMap", Some(SYSTEM), secret::CRL_CONFIGMAP)
        .unwrap();
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
        Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
    )
    .build()
    .unwrap();
    v.verify_client_cert(&chain[0], &chain[1..], rustls_pki_types::UnixTime::now())
        .is_ok()
}

/// Both scenarios, one after the other (they share the CA's Secret and ConfigMap, which
/// `deploy/`'s Role names), then `deploy/`'s RBAC for the CA against what it did: every grant
/// used, nothing forbidden.
#[test]
fn the_ca_on_the_real_api_server() {
    let cp = controlplane::shared().install_base();
    authorizes_nodes_by_token_and_pods(cp);
    secret_is_created_reused_and_rotated(cp);
    replicas_starting_together_agree_on_one_root(cp);
    let problems = cp.rbac_problems(SYSTEM, "ztunnel-ca").unwrap();
    assert!(
        problems.is_empty(),
        "deploy/'s RBAC for the CA: {problems:#?}"
    );
}

fn authorizes_nodes_by_token_and_pods(cp: &ControlPlane) {
    fresh_ca_objects(cp);
    let dir = tempfile::tempdir().unwrap();
    let ns = cp.namespace("ca-authz");
    cp.create_namespace(&ns, json!({})).unwrap();
    let (n1, n2) = (format!("{ns}-n1"), format!("{ns}-n2"));
    let pod = |name: &'static str, sa: &'static str, node: &str, phase: Option<&str>| {
        let mut p = KubePod::running(&ns, name, sa, node, &["10.99.0.1"]);
        p.phase = phase;
        cp.run_pod(&p).unwrap()
    };
    pod("web-1", "web", &n1, Some("Running"));
    pod("init-1", "init", &n1, Some("Pending"));
    pod("fresh-1", "fresh", &n1, None);
    pod("db-1", "db", &n2, Some("Running"));
    pod("job-1", "job", &n1, Some("Succeeded"));
    // The daemons' pods, and their projected tokens (audience ztunnel-ca, bound to the pod).
    let daemon_token = |node: &str, pod: &str| {
        cp.system_pod_token("ztunnel", pod, node, &["ztunnel-ca"])
            .unwrap()
    };
    let tok_n1 = daemon_token(&n1, &format!("ztunnel-{n1}"));
    let tok_n2 = daemon_token(&n2, &format!("ztunnel-{n2}"));
    let gone_pod = format!("ztunnel-{n1}-gone");
    let tok_gone = daemon_token(&n1, &gone_pod);
    cp.delete("v1", "Pod", Some(SYSTEM), &gone_pod).unwrap();
    let tok_expired = cp.expired_copy(&tok_n1).unwrap();
    // The API server's own audience, and a workload's ServiceAccount with the right audience.
    let n1_uid = cp
        .get("v1", "Pod", Some(SYSTEM), &format!("ztunnel-{n1}"))
        .unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let tok_api_audience = cp
        .token(
            SYSTEM,
            "ztunnel",
            &[controlplane::ISSUER],
            3600,
            Some((&format!("ztunnel-{n1}"), &n1_uid)),
        )
        .unwrap();
    let web_uid = cp.get("v1", "Pod", Some(&ns), "web-1").unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let tok_web = cp
        .token(&ns, "web", &["ztunnel-ca"], 3600, Some(("web-1", &web_uid)))
        .unwrap();

    let h = host(cp, "ca");
    let ca = CaProcess::start(
        cp,
        &h,
        dir.path(),
        "ca",
        &[
            "--authorizer",
            "kubernetes",
            "--ca-secret",
            &format!("{SYSTEM}/{SECRET}"),
        ],
    );
    let root = configmap_root(cp).expect("the bundle is published before serving");

    let id = |sa: &str| format!("spiffe://cluster.local/ns/{ns}/sa/{sa}");
    let cases: Vec<(&str, &str, String, u16)> = vec![
        ("another audience", &tok_api_audience, id("web"), 401),
        ("unknown token", "not-a-token", id("web"), 401),
        ("expired", &tok_expired, id("web"), 401),
        ("bound to a deleted pod", &tok_gone, id("web"), 401),
        ("another ServiceAccount", &tok_web, id("web"), 403),
        ("pod on another node", &tok_n1, id("db"), 403),
        ("no pod at all", &tok_n1, id("ghost"), 403),
        ("pod finished", &tok_n1, id("job"), 403),
        ("n2 for n1's pod", &tok_n2, id("web"), 403),
        ("Running pod", &tok_n1, id("web"), 200),
        ("Pending pod", &tok_n1, id("init"), 200),
        ("pod without a status yet", &tok_n1, id("fresh"), 200),
        ("n2's own pod", &tok_n2, id("db"), 200),
        ("again, cached review", &tok_n1, id("web"), 200),
    ];
    for (what, token, identity, want) in &cases {
        let got = status_of(sign(&h, &ca, &root, Some(token), identity));
        assert_eq!(got, *want, "{what}: asking for {identity}");
    }
    assert_eq!(status_of(sign(&h, &ca, &root, None, &id("web"))), 401);

    // Pods come and go: a new pod on n1 makes its identity signable, its deletion refuses
    // it again.
    pod("api-1", "api", &n1, Some("Running"));
    eventually("the new pod to be signable", || {
        status_of(sign(&h, &ca, &root, Some(&tok_n1), &id("api"))) == 200
    });
    cp.delete("v1", "Pod", Some(&ns), "api-1").unwrap();
    eventually("the deleted pod to be refused", || {
        status_of(sign(&h, &ca, &root, Some(&tok_n1), &id("api"))) == 403
    });

    // A mirror pod (a kubelet's static pod, which names no ServiceAccount; a node's own
    // credential can create one in any namespace) lends its node no identity, not even the
    // namespace's `default`. A pod created after it being signable shows the CA has seen it.
    cp.apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "static-1", "namespace": ns,
                     "annotations": {"kubernetes.io/config.mirror": "static-1-hash"}},
        "spec": {"nodeName": n1, "containers": [{"name": "app", "image": "registry.invalid/app"}]}}))
    .unwrap();
    let mirror = cp.get("v1", "Pod", Some(&ns), "static-1").unwrap();
    assert_eq!(
        mirror["spec"]["serviceAccountName"].as_str().unwrap_or(""),
        "",
        "the API server gave the mirror pod a ServiceAccount: {mirror}"
    );
    pod("after-1", "after", &n1, Some("Running"));
    eventually("the pod after the mirror pod to be signable", || {
        status_of(sign(&h, &ca, &root, Some(&tok_n1), &id("after"))) == 200
    });
    assert_eq!(
        status_of(sign(&h, &ca, &root, Some(&tok_n1), &id("default"))),
        403,
        "a mirror pod lent its node the namespace's default identity"
    );

    // A daemon pod deleted after its token's review was kept gets nothing more: the CA looks
    // the token's pod up for every request, whatever the kept review says.
    let late = format!("ztunnel-{n1}-late");
    let tok_late = daemon_token(&n1, &late);
    eventually("the new daemon pod's token to be honoured", || {
        status_of(sign(&h, &ca, &root, Some(&tok_late), &id("web"))) == 200
    });
    cp.delete("v1", "Pod", Some(SYSTEM), &late).unwrap();
    eventually("the deleted daemon pod's token to be refused", || {
        status_of(sign(&h, &ca, &root, Some(&tok_late), &id("web"))) == 403
    });

    // Every refusal was counted, by reason; n1's many requests were reviewed once.
    let metrics = ca_metrics(&h, &ca, &root, &tok_n1);
    let count = |series: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
    };
    assert!(count("ztunnel_ca_refusals_total{reason=\"no_pod_on_node\"}") >= 6);
    assert!(count("ztunnel_ca_refusals_total{reason=\"no_node\"}") >= 1);
    assert_eq!(count("ztunnel_ca_refusals_total{reason=\"not_daemon\"}"), 1);
    assert_eq!(
        count("ztunnel_ca_refusals_total{reason=\"unauthenticated\"}"),
        4
    );
    assert_eq!(count("ztunnel_ca_refusals_total{reason=\"no_token\"}"), 1);
    assert!(count("ztunnel_ca_signed_total") >= 6);
    let reviews_of_n1 = cp
        .audit_events()
        .iter()
        .filter(|e| {
            e["objectRef"]["resource"] == "tokenreviews"
                && e["stage"] == "ResponseComplete"
                && e["user"]["extra"]["authentication.kubernetes.io/pod-name"][0]
                    == format!("ztunnel-ca-ca-{}", std::process::id())
        })
        .count();
    let n1_requests = cases.iter().filter(|c| c.1 == tok_n1).count() + 2;
    assert!(
        reviews_of_n1 >= 1 && reviews_of_n1 < cases.len() + n1_requests,
        "{reviews_of_n1} reviews: not cached"
    );

    let log = ca.stop();
    for reason in [
        "not_daemon",
        "no_pod_on_node",
        "unauthenticated",
        "no_token",
    ] {
        assert!(log.contains(reason), "refusal {reason} not logged:\n{log}");
    }
    for token in [&tok_n1, &tok_n2, &tok_web, &tok_gone, &tok_expired] {
        let sig = token.rsplit('.').next().unwrap();
        assert!(!log.contains(sig), "a token reached the log:\n{log}");
    }
    // Once serving, the CA gave back the code pages only its start-up ran, as the daemon does.
    assert!(
        log.contains("released the code pages only start-up used")
            && !log.contains("could not release start-up code pages"),
        "start-up pages not released:\n{log}"
    );
}

fn secret_is_created_reused_and_rotated(cp: &ControlPlane) {
    fresh_ca_objects(cp);
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("tokens");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let secret_arg = format!("{SYSTEM}/{SECRET}");
    let args = [
        "--ca-secret",
        &secret_arg,
        "--token-file",
        token_file.to_str().unwrap(),
    ];
    let h = host(cp, "rot");
    let ca = CaProcess::start(cp, &h, dir.path(), "ca-1", &args);
    let first = secret_material(cp).expect("the Secret was created");
    assert_eq!(
        configmap_root(cp).as_deref(),
        Some(first.root_cert.as_str())
    );
    let id = "spiffe://cluster.local/ns/demo/sa/web";
    let resp = sign(&h, &ca, &first.root_cert, Some("s3cret"), id).unwrap();
    assert_eq!(resp.roots_pem.len(), 1);
    assert!(chains_to(&resp.cert_chain_pem, &first.root_cert));
    ca.stop();

    // Restart: the same Secret is reused, not replaced.
    let rv = cp.get("v1", "Secret", Some(SYSTEM), SECRET).unwrap()["metadata"]["resourceVersion"]
        .clone();
    let ca = CaProcess::start(cp, &h, dir.path(), "ca-2", &args);
    assert_eq!(secret_material(cp).unwrap(), first);
    let after = cp.get("v1", "Secret", Some(SYSTEM), SECRET).unwrap();
    assert_eq!(
        after["metadata"]["resourceVersion"], rv,
        "the Secret was rewritten"
    );
    let resp = sign(&h, &ca, &first.root_cert, Some("s3cret"), id).unwrap();
    assert!(chains_to(&resp.cert_chain_pem, &first.root_cert));

    // Rotation: a new root signs; the bundle holds the old and the new root.
    let fresh = CaMaterial::generate("cluster.local").unwrap();
    let new_root = fresh.root_cert.clone();
    let rotated = CaMaterial {
        root_cert: format!("{}{}", first.root_cert, fresh.root_cert),
        ..fresh
    };
    put_secret(cp, &rotated);
    let mut resp = None;
    eventually("the rotated material to be served", || {
        // A fresh connection each time, from a daemon that knows only the new root: the
        // serving certificate must have been re-issued from the new material.
        resp = sign(&h, &ca, &new_root, Some("s3cret"), id)
            .ok()
            .filter(|r| r.roots_pem.len() == 2);
        resp.is_some()
    });
    let resp = resp.unwrap();
    assert!(
        chains_to(&resp.cert_chain_pem, &new_root),
        "signed by the new root"
    );
    assert!(!chains_to(&resp.cert_chain_pem, &first.root_cert));
    assert!(chains_to(&resp.cert_chain_pem, &rotated.root_cert));
    eventually("the ConfigMap to hold both roots", || {
        configmap_root(cp).as_deref() == Some(rotated.root_cert.as_str())
    });

    // A bad update (a key that is not the signing certificate's) is refused: the CA keeps
    // signing with the rotated material.
    let bad = CaMaterial {
        ca_key: first.ca_key.clone(),
        ..rotated.clone()
    };
    put_secret(cp, &bad);
    eventually("the bad update to be refused", || {
        ca.log_text().contains("refusing an invalid update")
    });
    let resp = sign(&h, &ca, &rotated.root_cert, Some("s3cret"), id).unwrap();
    assert_eq!(resp.roots_pem.len(), 2);
    assert!(chains_to(&resp.cert_chain_pem, &new_root));
    assert_eq!(
        configmap_root(cp).as_deref(),
        Some(rotated.root_cert.as_str())
    );
    // A wrong static token is still refused.
    assert_eq!(
        status_of(sign(&h, &ca, &rotated.root_cert, Some("nope"), id)),
        401
    );

    // Revocation lists: none in the Secret, an empty ConfigMap; then the Secret's are
    // published; lists that do not parse are refused and the published ones kept.
    assert_eq!(configmap_crl(cp).as_deref(), Some(""));
    let signer = ztunnel::ca::LocalCa::from_material(&rotated, "cluster.local").unwrap();
    let now = std::time::SystemTime::now();
    let lists = signer
        .revocation_list(&["0a0b0c"], 1, now, Duration::from_secs(3600))
        .unwrap();
    put_secret_with_crl(cp, &rotated, Some(&lists));
    eventually("the revocation lists to be published", || {
        configmap_crl(cp).as_deref() == Some(lists.as_str())
    });
    let garbled = "-----BEGIN X509 CRL-----\nbm90IGEgbGlzdA==\n-----END X509 CRL-----\n";
    put_secret_with_crl(cp, &rotated, Some(garbled));
    eventually("the garbled lists to be refused", || {
        ca.log_text()
            .contains("refusing the Secret's revocation lists")
    });
    assert_eq!(configmap_crl(cp).as_deref(), Some(lists.as_str()));
    let resp = sign(&h, &ca, &rotated.root_cert, Some("s3cret"), id).unwrap();
    assert!(chains_to(&resp.cert_chain_pem, &new_root), "still signing");

    // The published ConfigMaps, deleted or changed by another hand, are written back with
    // what the Secret holds (its lists good again).
    put_secret_with_crl(cp, &rotated, Some(&lists));
    cp.delete("v1", "ConfigMap", Some(SYSTEM), secret::CRL_CONFIGMAP)
        .unwrap();
    eventually("the revocation lists written back", || {
        configmap_crl(cp).as_deref() == Some(lists.as_str())
    });
    cp.apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": CONFIGMAP, "namespace": SYSTEM},
        "data": {"root-cert.pem": "tampered"}}))
        .unwrap();
    eventually("the trust bundle written back", || {
        configmap_root(cp).as_deref() == Some(rotated.root_cert.as_str())
    });
    ca.stop();
}

fn replicas_starting_together_agree_on_one_root(cp: &ControlPlane) {
    // Deterministically, in this process, as the CA's ServiceAccount: two replicas both find
    // no Secret, then both create one with their own root. One create wins; the other is a
    // 409 and that replica takes the winner's material. Nothing overwrites the Secret.
    fresh_ca_objects(cp);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ca_kubeconfig(cp, dir.path(), "racer");
    let (a, b) = (
        CaMaterial::generate("cluster.local").unwrap(),
        CaMaterial::generate("cluster.local").unwrap(),
    );
    let (got_a, got_b) = {
        let (a, b) = (a.clone(), b.clone());
        cp.ns.block_on(async move {
            let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
            let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .unwrap();
            let api: kube::Api<Secret> =
                kube::Api::namespaced(kube::Client::try_from(cfg).unwrap(), SYSTEM);
            let (ra, rb) = tokio::join!(secret::read(&api, SECRET), secret::read(&api, SECRET));
            assert!(ra.unwrap().is_none() && rb.unwrap().is_none());
            let (ga, gb) = tokio::join!(
                secret::create_or_adopt(&api, SECRET, a),
                secret::create_or_adopt(&api, SECRET, b)
            );
            (ga.unwrap(), gb.unwrap())
        })
    };
    assert_eq!(got_a, got_b, "the replicas disagree");
    assert!(got_a == a || got_a == b);
    assert_eq!(secret_material(cp).as_ref(), Some(&got_a));

    // And as processes, both started before either is waited for, on an empty namespace: one
    // root, created once, served by both.
    let token_file = dir.path().join("tokens");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let secret_arg = format!("{SYSTEM}/{SECRET}");
    let args = [
        "--ca-secret",
        &secret_arg,
        "--token-file",
        token_file.to_str().unwrap(),
    ];
    let hosts = [host(cp, "rep-a"), host(cp, "rep-b")];
    let id = "spiffe://cluster.local/ns/demo/sa/web";
    fresh_ca_objects(cp);
    let kubeconfigs: Vec<PathBuf> = (0..2)
        .map(|i| ca_kubeconfig(cp, dir.path(), &format!("rep-{i}")))
        .collect();
    let mut cas: Vec<CaProcess> = hosts
        .iter()
        .zip(&kubeconfigs)
        .enumerate()
        .map(|(i, (h, kc))| CaProcess::launch(h, dir.path(), &format!("rep-{i}"), kc, &args))
        .collect();
    for (ca, h) in cas.iter_mut().zip(&hosts) {
        ca.wait_listening(h);
    }
    let m = secret_material(cp).expect("the Secret was created");
    for (ca, h) in cas.iter().zip(&hosts) {
        let resp = sign(h, ca, &m.root_cert, Some("s3cret"), id)
            .unwrap_or_else(|e| panic!("{e}\n{}", ca.log_text()));
        assert_eq!(resp.roots_pem, std::slice::from_ref(&m.root_cert));
        assert!(chains_to(&resp.cert_chain_pem, &m.root_cert));
    }
    assert_eq!(configmap_root(cp).as_deref(), Some(m.root_cert.as_str()));
    let logs: Vec<String> = cas.into_iter().map(CaProcess::stop).collect();
    let creators = logs
        .iter()
        .filter(|l| l.contains("created a new self-signed root"))
        .count();
    assert_eq!(creators, 1, "{logs:#?}");
    assert_eq!(
        secret_material(cp).as_ref(),
        Some(&m),
        "the Secret was rewritten"
    );
}
