//! A real Kubernetes control plane for the tests: `etcd` and `kube-apiserver`, built from
//! their Go modules by `tools/controlplane/build.sh` (cached outside the clone), the way
//! controller-runtime's envtest runs them: no kubelet, no controllers; the tests play their
//! parts.
//!
//! One control plane per test binary ([`shared`]), started on first use inside its own network
//! namespace (the "cp" host), with the API server on [`API_IP`]`:6443`:
//! - etcd on the cp host's loopback, its data in a directory removed when the binary exits
//!   (or, if it was killed, by the next binary to start one);
//! - kube-apiserver with RBAC authorization, ServiceAccount token signing and issuing
//!   (`--service-account-issuer`, a P-256 key of its own), client-certificate authentication
//!   (the tests' admin is `system:masters`), a serving certificate from a CA made here;
//! - both spawned from a thread that lives as long as the test binary, with
//!   `PR_SET_PDEATHSIG`, so they die with it and are never left running.
//!
//! Test hosts reach it through [`ControlPlane::attach`] (a veth into the cp host's bridge, an
//! address in `10.254.0.0/16`); the test itself talks to it as admin through
//! [`ControlPlane::run`] or `kubectl` ([`ControlPlane::kubectl`]). Every test works in
//! namespaces of its own ([`ControlPlane::namespace`]), so tests stay parallel.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::ApiResource;
use serde_json::{json, Value};

mod istio;
mod rbac;
pub use istio::ISTIO_GRANTS;

use crate::daemon::die_with_test;
use crate::netns::{self, Netns};

/// The API server's address on the cp host's bridge, reachable from attached hosts.
pub const API_IP: &str = "10.254.0.1";
pub const API_PORT: u16 = 6443;
/// The namespace of `deploy/base`'s components.
pub const SYSTEM_NAMESPACE: &str = "ztunnel-system";
/// The issuer (and default audience) of the ServiceAccount tokens the API server signs.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// The running control plane of this test binary.
pub struct ControlPlane {
    /// The cp host: the bridge `br0` with [`API_IP`], etcd and the API server.
    pub ns: Netns,
    pub dir: PathBuf,
    /// The CA that signed the API server's serving certificate and the admin's client one.
    pub ca_pem: String,
    /// An admin kubeconfig (`system:masters`) for hosts attached with [`Self::attach`] and
    /// for `kubectl` run inside the cp host.
    pub admin_kubeconfig: PathBuf,
    client: kube::Client,
    next_host: AtomicU32,
    next_ns: AtomicU32,
    logs: Vec<PathBuf>,
}

/// The control plane of this test binary, started on first use. Fails the test loudly when
/// a prerequisite is missing (root, `ip`, the built binaries).
pub fn shared() -> &'static ControlPlane {
    static CP: OnceLock<ControlPlane> = OnceLock::new();
    CP.get_or_init(|| ControlPlane::start().unwrap_or_else(|e| panic!("{e:#}")))
}

/// Deletes the namespace `name` when the test binary exits. The shared control plane lives in
/// a `static`, whose `Drop` never runs, so its namespace would otherwise stay until the next
/// test binary sweeps it.
fn delete_at_exit(name: &str) {
    static NAME: OnceLock<String> = OnceLock::new();
    extern "C" fn delete() {
        if let Some(name) = NAME.get() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
    if NAME.set(name.to_owned()).is_ok() {
        // SAFETY: `delete` is an `extern "C" fn` with no arguments that does not unwind.
        unsafe { libc::atexit(delete) };
    }
}

/// The directory holding `kube-apiserver` and `etcd`: `$ZTUNNEL_CONTROLPLANE_DIR`, or what
/// `tools/controlplane/build.sh` prints (it builds them on a machine that lacks them).
pub fn binaries() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("ZTUNNEL_CONTROLPLANE_DIR") {
        return Ok(PathBuf::from(d));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/controlplane/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed: the tests need a real kube-apiserver and etcd (scripts/prereqs.sh builds them)",
            script.display()
        );
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// Spawns `cmd` from a thread that never exits, so that the child's `PR_SET_PDEATHSIG`
/// (which fires when the spawning *thread* ends) kills it only when the test binary ends.
fn spawn_for_the_binary(mut cmd: Command) -> Result<u32> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("controlplane-child".into())
        .spawn(move || {
            let child: std::io::Result<Child> = die_with_test(&mut cmd).spawn();
            let mut child = match child {
                Ok(c) => {
                    let _ = tx.send(Ok(c.id()));
                    c
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = child.wait();
            // Keep the thread (and so the death signal's trigger) for the binary's life.
            loop {
                std::thread::park();
            }
        })?;
    Ok(rx.recv()??)
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("write {}", path.display()))
}

/// The certificates: a CA, the API server's serving certificate, the admin's client
/// certificate, and the ServiceAccount signing key.
fn make_pki(dir: &Path) -> Result<String> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, SanType,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "ztunnel-tests-kubernetes-ca");
    let ca_pem = ca.self_signed(&ca_key)?.pem();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;

    let serving_key = KeyPair::generate()?;
    let mut serving = CertificateParams::new(vec![
        "kubernetes".to_string(),
        "kubernetes.default.svc".to_string(),
        "localhost".to_string(),
    ])?;
    for ip in [API_IP, "127.0.0.1", "10.96.0.1"] {
        serving
            .subject_alt_names
            .push(SanType::IpAddress(ip.parse()?));
    }
    serving
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_pem = serving.signed_by(&serving_key, &issuer)?.pem();

    let admin_key = KeyPair::generate()?;
    let mut admin = CertificateParams::new(Vec::<String>::new())?;
    admin.distinguished_name.push(DnType::CommonName, "admin");
    admin
        .distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_pem = admin.signed_by(&admin_key, &issuer)?.pem();

    let sa_key = KeyPair::generate()?;
    write(&dir.join("ca.crt"), &ca_pem)?;
    write(&dir.join("serving.crt"), &serving_pem)?;
    write(&dir.join("serving.key"), &serving_key.serialize_pem())?;
    write(&dir.join("admin.crt"), &admin_pem)?;
    write(&dir.join("admin.key"), &admin_key.serialize_pem())?;
    write(&dir.join("sa.key"), &sa_key.serialize_pem())?;
    write(&dir.join("sa.pub"), &sa_key.public_key_pem())?;
    Ok(ca_pem)
}

/// A kubeconfig for `server`, trusting the CA in file `ca`, with the given user entry
/// (`{"token": …}` or client-certificate files).
pub fn kubeconfig(ca: &Path, server: &str, user: Value) -> String {
    let doc = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "test", "cluster": {
            "server": server, "certificate-authority": ca}}],
        "users": [{"name": "user", "user": user}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user"}}],
        "current-context": "test",
    });
    serde_json::to_string_pretty(&doc).expect("kubeconfig")
}

/// Removes the data directories of earlier test binaries that are no longer running.
fn sweep_old_dirs(root: &Path) {
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("cp-").and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if pid != std::process::id() as i32 && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl ControlPlane {
    fn start() -> Result<ControlPlane> {
        netns::require_prerequisites();
        let bin = binaries()?;
        for b in ["etcd", "kube-apiserver"] {
            if !bin.join(b).exists() {
                bail!(
                    "{} is missing (run scripts/prereqs.sh)",
                    bin.join(b).display()
                );
            }
        }
        let root = std::env::temp_dir().join("ztunnel-controlplane");
        std::fs::create_dir_all(&root)?;
        sweep_old_dirs(&root);
        let dir = root.join(format!("cp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let ca_pem = make_pki(&dir)?;

        let prefix = netns::unique_prefix();
        let ns = Netns::new(&format!("{prefix}-cp"))?;
        delete_at_exit(&ns.name);
        ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        ns.ip(&["addr", "add", &format!("{API_IP}/16"), "dev", "br0"])?;
        ns.ip(&["link", "set", "br0", "up"])?;

        let etcd_log = dir.join("etcd.log");
        let mut etcd = Command::new("ip");
        etcd.args(["netns", "exec", &ns.name])
            .arg(bin.join("etcd"))
            .args([
                "--name=test",
                "--listen-client-urls=http://127.0.0.1:2379",
                "--advertise-client-urls=http://127.0.0.1:2379",
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                "--initial-cluster=test=http://127.0.0.1:2380",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ])
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&etcd_log)?)
            .stderr(std::fs::File::create(dir.join("etcd.err"))?);
        spawn_for_the_binary(etcd)?;

        // Every request's metadata (user, verb, resource, answer), for the tests that check
        // what the daemons and the CA did with their permissions.
        write(
            &dir.join("audit-policy.yaml"),
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n  - level: Metadata\n",
        )?;
        let api_log = dir.join("kube-apiserver.log");
        let d = |f: &str| dir.join(f).display().to_string();
        let mut api = Command::new("ip");
        api.args(["netns", "exec", &ns.name])
            .arg(bin.join("kube-apiserver"))
            .args([
                "--etcd-servers=http://127.0.0.1:2379".to_string(),
                format!("--bind-address={API_IP}"),
                format!("--advertise-address={API_IP}"),
                format!("--secure-port={API_PORT}"),
                format!("--tls-cert-file={}", d("serving.crt")),
                format!("--tls-private-key-file={}", d("serving.key")),
                format!("--client-ca-file={}", d("ca.crt")),
                format!("--cert-dir={}", d("certs")),
                format!("--service-account-issuer={ISSUER}"),
                format!("--service-account-key-file={}", d("sa.pub")),
                format!("--service-account-signing-key-file={}", d("sa.key")),
                "--authorization-mode=RBAC".to_string(),
                "--service-cluster-ip-range=10.96.0.0/16".to_string(),
                "--allow-privileged=true".to_string(),
                "--enable-priority-and-fairness=false".to_string(),
                "--endpoint-reconciler-type=none".to_string(),
                "--profiling=false".to_string(),
                format!("--audit-policy-file={}", d("audit-policy.yaml")),
                format!("--audit-log-path={}", d("audit.log")),
                "--audit-log-format=json".to_string(),
                "--audit-log-mode=blocking".to_string(),
                "--v=1".to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&api_log)?)
            .stderr(std::fs::File::create(dir.join("kube-apiserver.err"))?);
        spawn_for_the_binary(api)?;

        let admin_kubeconfig = dir.join("admin.kubeconfig");
        write(
            &admin_kubeconfig,
            &kubeconfig(
                &dir.join("ca.crt"),
                &format!("https://{API_IP}:{API_PORT}"),
                json!({"client-certificate": d("admin.crt"), "client-key": d("admin.key")}),
            ),
        )?;
        let kc = admin_kubeconfig.clone();
        let client = ns.block_on(async move {
            let kc = kube::config::Kubeconfig::read_from(&kc)?;
            let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
            Ok::<_, anyhow::Error>(kube::Client::try_from(cfg)?)
        })?;
        let cp = ControlPlane {
            ns,
            dir: dir.clone(),
            ca_pem,
            admin_kubeconfig,
            client,
            next_host: AtomicU32::new(0),
            next_ns: AtomicU32::new(0),
            logs: vec![
                dir.join("etcd.err"),
                dir.join("kube-apiserver.err"),
                etcd_log,
                api_log,
            ],
        };
        cp.wait_ready(Duration::from_secs(120))?;
        Ok(cp)
    }

    fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.kubectl(&["get", "--raw", "/readyz"]) {
                Ok(out) if out.trim() == "ok" => {
                    // RBAC's bootstrap roles are in once `system:node` exists.
                    if self
                        .kubectl(&["get", "clusterrole", "system:auth-delegator"])
                        .is_ok()
                    {
                        return Ok(());
                    }
                }
                Ok(out) => last = out,
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        bail!(
            "the API server was not ready within {timeout:?}: {last}\n{}",
            self.log_tail()
        )
    }

    /// The last lines of etcd's and the API server's logs, for a failing test.
    pub fn log_tail(&self) -> String {
        let mut out = String::new();
        for l in &self.logs {
            let text = std::fs::read_to_string(l).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("---- {} ----\n", l.display()));
            for line in &lines[lines.len().saturating_sub(40)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// The API server's URL.
    pub fn url(&self) -> String {
        format!("https://{API_IP}:{API_PORT}")
    }

    /// Runs `kubectl` as admin inside the cp host; fails with its stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let kc = format!("--kubeconfig={}", self.admin_kubeconfig.display());
        let mut a = vec![kc.as_str()];
        a.extend_from_slice(args);
        self.ns.exec("kubectl", &a)
    }

    /// Runs `kubectl` as admin with `stdin` (e.g. `apply -f -`).
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Result<String> {
        let kc = format!("--kubeconfig={}", self.admin_kubeconfig.display());
        let mut a = vec!["netns", "exec", &self.ns.name, "kubectl", &kc];
        a.extend_from_slice(args);
        netns::sh_stdin("ip", &a, stdin)
    }

    /// Runs `f(admin client)` on the cp host and waits for it.
    pub fn run<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce(kube::Client) -> Fut,
        Fut: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        self.ns.block_on(f(self.client.clone()))
    }

    /// A fresh namespace name for one test: `<base>-<n>` (not created).
    pub fn namespace(&self, base: &str) -> String {
        let n = self.next_ns.fetch_add(1, Ordering::Relaxed);
        format!("{base}-{n}")
    }

    /// Attaches `host` to the cp host's bridge with a fresh address; the API server is then
    /// at [`Self::url`] from `host`. Returns the host's address.
    pub fn attach(&self, host: &Netns) -> Result<String> {
        let n = self.next_host.fetch_add(1, Ordering::Relaxed) + 2;
        let addr = format!("10.254.{}.{}", n / 250, n % 250 + 2);
        let outer = format!("cpv{}x{n}", std::process::id() % 100_000);
        let inner = format!("cpw{}x{n}", std::process::id() % 100_000);
        netns::sh(
            "ip",
            &[
                "link",
                "add",
                &outer,
                "netns",
                &self.ns.name,
                "type",
                "veth",
                "peer",
                "name",
                &inner,
                "netns",
                &host.name,
            ],
        )?;
        self.ns
            .ip(&["link", "set", &outer, "master", "br0", "up"])?;
        host.ip(&["link", "set", &inner, "name", "cp0"])?;
        host.ip(&["addr", "add", &format!("{addr}/16"), "dev", "cp0"])?;
        host.ip(&["link", "set", "cp0", "up"])?;
        Ok(addr)
    }

    /// Server-side applies `objects` (one JSON object or an array), as admin, with field
    /// manager `tests`; returns the objects the server holds afterwards.
    pub fn apply(&self, objects: Value) -> Result<Vec<Value>> {
        let list = match objects {
            Value::Array(v) => v,
            o => vec![o],
        };
        self.run(|client| async move {
            let mut out = Vec::new();
            for o in list {
                let (api, name) = dynamic_api(&client, &o).await?;
                let pp = PatchParams::apply("tests").force();
                let got = api
                    .patch(&name, &pp, &Patch::Apply(&o))
                    .await
                    .with_context(|| format!("apply {}", describe(&o)))?;
                out.push(serde_json::to_value(got)?);
            }
            Ok(out)
        })
    }

    /// Server-side applies one object's `status` (the status subresource), as a kubelet or
    /// controller would write it.
    pub fn apply_status(&self, object: Value) -> Result<Value> {
        self.run(|client| async move {
            let (api, name) = dynamic_api(&client, &object).await?;
            let pp = PatchParams::apply("tests-status").force();
            let got = api
                .patch_status(&name, &pp, &Patch::Apply(&object))
                .await
                .with_context(|| format!("apply the status of {}", describe(&object)))?;
            Ok(serde_json::to_value(got)?)
        })
    }

    /// The object (`None` when it does not exist).
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let o = json!({"apiVersion": api_version, "kind": kind,
                       "metadata": {"name": name, "namespace": ns}});
        self.run(|client| async move {
            let (api, name) = dynamic_api(&client, &o).await.ok()?;
            let got = api.get_opt(&name).await.ok()??;
            serde_json::to_value(got).ok()
        })
    }

    /// Deletes the object (not found is fine) at once: no kubelet runs here to confirm a
    /// graceful deletion, so a pod would otherwise stay, terminating, for ever.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
    ) -> Result<()> {
        let o = json!({"apiVersion": api_version, "kind": kind,
                       "metadata": {"name": name, "namespace": ns}});
        self.run(|client| async move {
            let (api, name) = dynamic_api(&client, &o).await?;
            let dp = kube::api::DeleteParams::default().grace_period(0);
            match api.delete(&name, &dp).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                Err(e) => Err(e).with_context(|| format!("delete {}", describe(&o))),
            }
        })
    }

    /// Creates namespace `name` with `labels`, and its `default` ServiceAccount (no
    /// controller manager runs here to make it).
    pub fn create_namespace(&self, name: &str, labels: Value) -> Result<()> {
        self.apply(json!([
            {"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": name, "labels": labels}},
            {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": "default", "namespace": name}},
        ]))?;
        Ok(())
    }

    /// Creates a Pod as the kubelet would see it once it runs: the object with
    /// `spec.nodeName`, then its `status` (phase, podIP(s), Ready) through the status
    /// subresource. Creates the ServiceAccount first if missing. Returns the pod's uid.
    pub fn run_pod(&self, p: &KubePod<'_>) -> Result<String> {
        self.apply(json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": p.service_account, "namespace": p.namespace}}))?;
        let pod = self.apply(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": p.name, "namespace": p.namespace, "labels": p.labels},
            "spec": {"nodeName": p.node, "serviceAccountName": p.service_account,
                     "containers": [{"name": "app", "image": "registry.invalid/app"}]}}))?;
        let uid = pod[0]["metadata"]["uid"]
            .as_str()
            .context("pod without uid")?
            .to_string();
        if let Some(phase) = p.phase {
            self.set_pod_status(p.namespace, p.name, phase, p.ips)?;
        }
        Ok(uid)
    }

    /// Writes a pod's status as the kubelet does.
    pub fn set_pod_status(&self, ns: &str, name: &str, phase: &str, ips: &[&str]) -> Result<()> {
        let ready = if phase == "Running" { "True" } else { "False" };
        let mut status = json!({"phase": phase,
            "conditions": [{"type": "Ready", "status": ready}]});
        if let Some(first) = ips.first() {
            status["podIP"] = json!(first);
            status["podIPs"] = json!(ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>());
        }
        self.apply_status(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns}, "status": status}))?;
        Ok(())
    }

    /// A ServiceAccount token from the TokenRequest API: for `audiences`, valid for
    /// `seconds`, bound to pod `bound_pod` (`(name, uid)`) when given, as the kubelet
    /// requests a projected token for a pod.
    pub fn token(
        &self,
        ns: &str,
        sa: &str,
        audiences: &[&str],
        seconds: i64,
        bound_pod: Option<(&str, &str)>,
    ) -> Result<String> {
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: audiences.iter().map(|a| a.to_string()).collect(),
                expiration_seconds: Some(seconds),
                bound_object_ref: bound_pod.map(|(name, uid)| BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(name.into()),
                    uid: Some(uid.into()),
                }),
            },
            ..Default::default()
        };
        let (ns, sa) = (ns.to_string(), sa.to_string());
        self.run(|client| async move {
            let api: Api<ServiceAccount> = Api::namespaced(client, &ns);
            let got: TokenRequest = api
                .create_token_request(&sa, &PostParams::default(), &req)
                .await
                .with_context(|| format!("TokenRequest for {ns}/{sa}"))?;
            Ok(got.status.context("no token in the answer")?.token)
        })
    }

    /// What the kubelet gives a system component's pod: a Running pod `pod` of ServiceAccount
    /// `ztunnel-system/<sa>` on `node`, and a projected token of that ServiceAccount for
    /// `audiences`, bound to the pod (so it names the node). Returns the token.
    pub fn system_pod_token(
        &self,
        sa: &str,
        pod: &str,
        node: &str,
        audiences: &[&str],
    ) -> Result<String> {
        let uid = self.run_pod(&KubePod {
            labels: json!({"app": sa}),
            ..KubePod::running(SYSTEM_NAMESPACE, pod, sa, node, &[])
        })?;
        self.token(SYSTEM_NAMESPACE, sa, audiences, 3600, Some((pod, &uid)))
    }

    /// A kubeconfig file in `dir` that reaches the API server from an attached host with
    /// `token`.
    pub fn token_kubeconfig(&self, dir: &Path, name: &str, token: &str) -> Result<PathBuf> {
        let path = dir.join(name);
        write(
            &path,
            &kubeconfig(
                &self.dir.join("ca.crt"),
                &self.url(),
                json!({"token": token}),
            ),
        )?;
        Ok(path)
    }

    /// `deploy/base` applied (once per test binary) and its CRDs established: the namespace,
    /// the CRDs, the daemon's and the CA's ServiceAccounts and RBAC, the admission policy,
    /// the CA Deployment and the DaemonSet (which nothing runs here).
    pub fn install_base(&self) -> &Self {
        static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
        let done = DONE.get_or_init(|| {
            let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base");
            self.apply_kustomization(&base)
                .and_then(|_| {
                    self.kubectl(&[
                        "wait",
                        "--for=condition=Established",
                        "--timeout=60s",
                        "crd/authorizationpolicies.security.ztunnel.dev",
                        "crd/peerauthentications.security.ztunnel.dev",
                    ])
                })
                .map(|_| ())
                .map_err(|e| format!("{e:#}"))
        });
        if let Err(e) = done {
            panic!("applying deploy/base to the real API server failed: {e}");
        }
        self
    }

    /// `token` (a ServiceAccount JWT this API server signed) with its validity moved an hour
    /// into the past, signed again with the API server's key: an expired token that is
    /// otherwise genuine.
    pub fn expired_copy(&self, token: &str) -> Result<String> {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
        use base64::Engine;
        let mut parts = token.split('.');
        let (Some(header), Some(claims)) = (parts.next(), parts.next()) else {
            bail!("not a JWT");
        };
        let mut claims: Value = serde_json::from_slice(&B64.decode(claims)?)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        claims["iat"] = json!(now - 7200);
        claims["nbf"] = json!(now - 7200);
        claims["exp"] = json!(now - 3600);
        let signed = format!("{header}.{}", B64.encode(serde_json::to_vec(&claims)?));
        let key_pem = std::fs::read_to_string(self.dir.join("sa.key"))?;
        let der = pem::parse(key_pem)?;
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let key = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            der.contents(),
        )
        .map_err(|e| anyhow::anyhow!("the signing key: {e}"))?;
        let sig = key
            .sign(&rng, signed.as_bytes())
            .map_err(|e| anyhow::anyhow!("sign: {e}"))?;
        Ok(format!("{signed}.{}", B64.encode(sig.as_ref())))
    }

    /// Renders a kustomization (`kubectl kustomize`) and applies it server-side, as admin.
    pub fn apply_kustomization(&self, dir: &Path) -> Result<String> {
        let rendered = netns::sh("kubectl", &["kustomize", &dir.display().to_string()])?;
        self.kubectl_stdin(
            &["apply", "--server-side", "--field-manager=tests", "-f", "-"],
            &rendered,
        )
    }
}

/// A pod for [`ControlPlane::run_pod`].
#[derive(Clone, Debug)]
pub struct KubePod<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub service_account: &'a str,
    pub node: &'a str,
    pub labels: Value,
    /// `None`: created without a status (scheduled, not yet started by the kubelet).
    pub phase: Option<&'a str>,
    pub ips: &'a [&'a str],
}

impl<'a> KubePod<'a> {
    /// A Running pod with one IP.
    pub fn running(
        namespace: &'a str,
        name: &'a str,
        sa: &'a str,
        node: &'a str,
        ips: &'a [&'a str],
    ) -> Self {
        KubePod {
            namespace,
            name,
            service_account: sa,
            node,
            labels: json!({"app": name}),
            phase: Some("Running"),
            ips,
        }
    }
}

fn describe(o: &Value) -> String {
    format!(
        "{} {}/{}",
        o["kind"].as_str().unwrap_or("?"),
        o["metadata"]["namespace"].as_str().unwrap_or(""),
        o["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// The dynamic API for the object's kind (found through the server's discovery).
async fn dynamic_api(client: &kube::Client, o: &Value) -> Result<(Api<DynamicObject>, String)> {
    let api_version = o["apiVersion"].as_str().context("no apiVersion")?;
    let kind = o["kind"].as_str().context("no kind")?;
    let name = o["metadata"]["name"]
        .as_str()
        .context("no name")?
        .to_string();
    let (group, version) = match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    };
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (ar, caps): (ApiResource, _) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .with_context(|| format!("discover {api_version} {kind}"))?;
    let api = match (caps.scope, o["metadata"]["namespace"].as_str()) {
        (kube::discovery::Scope::Namespaced, Some(ns)) => {
            Api::namespaced_with(client.clone(), ns, &ar)
        }
        (kube::discovery::Scope::Namespaced, None) => bail!("{kind} {name} needs a namespace"),
        (kube::discovery::Scope::Cluster, _) => Api::all_with(client.clone(), &ar),
    };
    Ok((api, name))
}

/// Waits until `f` holds, polling every 50 ms; fails with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
