//! The in-pod test bed ([`crate::testbed`]) with its daemons discovering the cluster from the
//! real API server ([`crate::controlplane`]) instead of the discovery file, the test playing
//! the kubelet's and the controllers' parts:
//!
//! - each node is attached to the control plane and has its Node object (its underlay address
//!   as `InternalIP`); its daemon runs with a kubeconfig holding a
//!   ServiceAccount token of `ztunnel-system/ztunnel` from the TokenRequest API, bound to a Pod
//!   object of that ServiceAccount on the node (as the DaemonSet's projected token is), so it
//!   has exactly `deploy/`'s permissions;
//! - the bed's namespaces are Kubernetes namespaces prefixed with the bed's name
//!   ([`TestBed::api_namespace`]); `demo` is labelled ambient, `plain` is not;
//! - a pod is created as the scheduler leaves it (`spec.nodeName`, no status), then the
//!   runtime's CNI ADD runs (retried on code 11, as the kubelet retries a sandbox), then its
//!   status is written through the status subresource (Running, its IPs, Ready), and the
//!   Service `server`'s EndpointSlice is written as the endpoint-slice controller would.
//!
//! Every bed uses the same pod addresses (10.20.x.x) and each daemon sees every pod of the
//! cluster, so one bed of a test binary runs on the API server at a time ([`KubeSource`] holds
//! the turn), and its pods are deleted when it ends (no kubelet confirms a deletion here: they
//! are removed at once, as `--force` does).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::controlplane::{self, ControlPlane, KubePod};
use crate::testbed::{PodSpec, TestBed};

const SYSTEM: &str = controlplane::SYSTEM_NAMESPACE;
const AMBIENT: &str = "ztunnel.dev/dataplane-mode";

/// The Kubernetes namespace of a bed's namespace `ns`.
pub(crate) fn namespace_of(prefix: &str, ns: &str) -> String {
    format!("{prefix}-{ns}")
}

/// One bed at a time on the API server (see the module doc).
static TURN: Mutex<()> = Mutex::new(());

/// What a bed on the real API server keeps.
pub struct KubeSource {
    pub cp: &'static ControlPlane,
    /// Each node's daemon kubeconfig.
    kubeconfigs: Vec<PathBuf>,
    /// The uid of each pod the bed created, by (namespace, name).
    uids: Mutex<HashMap<(String, String), String>>,
    /// The cluster IP the API server gave the Service `server`.
    pub vip: String,
    /// The bed's Kubernetes namespaces, nodes and its daemons' pods, deleted at the end.
    namespaces: Vec<String>,
    nodes: Vec<String>,
    daemon_pods: Vec<String>,
    /// Released last, once the bed's pods are gone.
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = self.cp.kubectl(&[
                "delete",
                "pods",
                "--all",
                "-n",
                ns,
                "--grace-period=0",
                "--force",
            ]);
        }
        for node in &self.nodes {
            let _ = self.cp.delete("v1", "Node", None, node);
        }
        for pod in &self.daemon_pods {
            let _ = self.cp.kubectl(&[
                "delete",
                "pod",
                "-n",
                SYSTEM,
                pod,
                "--grace-period=0",
                "--force",
            ]);
        }
    }
}

impl KubeSource {
    /// Attaches the bed's nodes to the control plane and creates what exists before any pod:
    /// the namespaces, the Service, the daemons' pods and tokens.
    pub(crate) fn set_up(
        cp: &'static ControlPlane,
        bed: &TestBed,
        plain_labels: Value,
    ) -> Result<KubeSource> {
        let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        for (i, node) in bed.nodes.iter().enumerate() {
            let addr = cp.attach(&node.ns)?;
            // The API server answers pods directly, as a cluster's control plane routes to
            // its pod subnets (they reach it through the `kubernetes` Service's endpoint).
            let pods = format!("10.20.{}.0/24", i + 1);
            cp.ns.ip(&["route", "replace", &pods, "via", &addr])?;
            // Its Node object, with the address the kubelet reports (the underlay's).
            cp.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node.name}}))?;
            cp.apply_status(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node.name},
                "status": {"addresses": [{"type": "InternalIP", "address": format!("192.168.77.{}", i + 1)},
                                         {"type": "Hostname", "address": node.name}]}}))?;
        }
        // The `kubernetes` Service's slice, as the API server's endpoint reconciler writes it
        // (this one runs without it): its own address, naming no pod.
        cp.apply(
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "kubernetes", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "kubernetes"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [controlplane::API_IP], "conditions": {"ready": true}}],
            "ports": [{"name": "https", "port": controlplane::API_PORT, "protocol": "TCP"}]}),
        )?;
        // `bed.api_namespace` maps names only once `bed.kube` is set, after this.
        let demo = namespace_of(bed.prefix(), "demo");
        let plain = namespace_of(bed.prefix(), "plain");
        cp.create_namespace(&demo, json!({AMBIENT: "ambient"}))?;
        cp.create_namespace(&plain, plain_labels)?;
        let svc = cp.apply(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "server", "namespace": demo},
            "spec": {"selector": {"app": "server"},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}))?;
        let vip = svc[0]["spec"]["clusterIP"]
            .as_str()
            .context("the Service got no cluster IP")?
            .to_string();
        let mut kubeconfigs = Vec::new();
        let mut daemon_pods = Vec::new();
        for node in &bed.nodes {
            let pod = format!("ztunnel-{}", node.name);
            daemon_pods.push(pod.clone());
            let token =
                cp.system_pod_token("ztunnel", &pod, &node.name, &[controlplane::ISSUER])?;
            kubeconfigs.push(cp.token_kubeconfig(
                bed.dir(),
                &format!("{}.kubeconfig", node.name),
                &token,
            )?);
        }
        Ok(KubeSource {
            cp,
            kubeconfigs,
            uids: Mutex::new(HashMap::new()),
            vip,
            namespaces: vec![demo, plain],
            nodes: bed.nodes.iter().map(|n| n.name.clone()).collect(),
            daemon_pods,
            _turn: turn,
        })
    }

    /// The daemon's discovery arguments on node `i`.
    pub(crate) fn daemon_args(&self, i: usize) -> Vec<String> {
        vec![
            "--discovery-source".into(),
            "kubernetes".into(),
            "--kubeconfig".into(),
            self.kubeconfigs[i].display().to_string(),
        ]
    }

    /// The uid the API server gave pod `ns/name` (empty before it exists).
    pub(crate) fn uid(&self, ns: &str, name: &str) -> String {
        self.uids
            .lock()
            .unwrap()
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
            .unwrap_or_default()
    }
}

impl TestBed {
    /// What node `i`'s CNI installer asks when it is stopped (`ztunnel removed` about
    /// `deploy/base`'s DaemonSet), with the node's credentials: the exit status (0 removed, 1
    /// present, 2 cannot tell) and what it said.
    pub fn installer_removal_check(&self, i: usize) -> (Option<i32>, String) {
        crate::daemon::ztunnel_removed(
            &self.nodes[i].ns,
            "ztunnel-system/ztunnel",
            &self.kube_source().kubeconfigs[i],
        )
    }

    fn kube_source(&self) -> &KubeSource {
        self.kube.as_ref().expect("a bed on the real API server")
    }

    /// A pod's life on a real node: scheduled, sandbox (CNI ADD, retried while the daemon
    /// answers "try again"), status reported.
    pub(crate) fn add_kube_pod(&mut self, spec: PodSpec) -> Result<()> {
        let k = self.kube_source();
        let ns = self.api_namespace(spec.namespace);
        let node = self.nodes[spec.node].name.clone();
        let uid = k.cp.run_pod(&KubePod {
            labels: json!({"app": spec.app}),
            phase: None,
            ..KubePod::running(&ns, spec.name, spec.sa, &node, &[])
        })?;
        k.uids
            .lock()
            .unwrap()
            .insert((ns.clone(), spec.name.to_string()), uid);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (outs, pod) = self.try_add_pod(spec.clone())?;
            if outs.iter().all(|o| o.code == 0) {
                self.pods.push(pod);
                break;
            }
            let code = outs.last().and_then(|o| o.error_code());
            if code != Some(11) || Instant::now() > deadline {
                bail!("ADD of {} failed: {outs:?}", spec.name);
            }
            let node = &self.nodes[spec.node];
            node.runtime.del(&node.conflist, &pod.attachment, None)?;
            drop(pod);
            std::thread::sleep(Duration::from_millis(250));
        }
        let k = self.kube_source();
        k.cp.set_pod_status(&ns, spec.name, "Running", &spec.ips())?;
        self.sync_endpoints()
    }

    /// The Service `server`'s EndpointSlice, as the endpoint-slice controller writes it: the
    /// bed's running pods of app `server` in `demo`, ready.
    pub fn sync_endpoints(&self) -> Result<()> {
        let k = self.kube_source();
        let ns = self.api_namespace("demo");
        let endpoints: Vec<Value> = self
            .pods
            .iter()
            .filter(|p| p.spec.namespace == "demo" && p.spec.app == "server")
            .map(|p| {
                json!({"addresses": [p.spec.ip], "conditions": {"ready": true},
                       "nodeName": self.nodes[p.spec.node].name,
                       "targetRef": {"kind": "Pod", "namespace": ns, "name": p.spec.name,
                                     "uid": k.uid(&ns, p.spec.name)}})
            })
            .collect();
        k.cp.apply(
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "server-ipv4", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": "server"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints}),
        )?;
        Ok(())
    }

    /// The Service `server`'s cluster IP.
    pub fn service_vip(&self) -> String {
        self.kube_source().vip.clone()
    }

    /// Labels the bed's namespace `ns` (`demo`, `plain`) with `labels` (replacing the ones the
    /// tests manage).
    pub fn label_namespace(&self, ns: &str, labels: Value) -> Result<()> {
        self.kube_source()
            .cp
            .apply(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": self.api_namespace(ns), "labels": labels}}))?;
        Ok(())
    }

    /// Applies policy objects (JSON), their `metadata.namespace` a bed namespace (`demo`, …)
    /// mapped to its Kubernetes namespace.
    pub fn apply_kube_policies(&self, policies: Value) -> Result<Vec<Value>> {
        let mut list = match policies {
            Value::Array(v) => v,
            o => vec![o],
        };
        for p in &mut list {
            let ns = p["metadata"]["namespace"]
                .as_str()
                .context("a policy without a namespace")?;
            p["metadata"]["namespace"] = json!(self.api_namespace(ns));
        }
        self.kube_source().cp.apply(Value::Array(list))
    }
}

/// Waits up to 20 s for `f`; fails with `what` otherwise.
pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether a pod's netns holds the capture rules.
pub fn has_table(ns: &crate::netns::Netns) -> bool {
    ns.exec("nft", &["list", "table", "inet", "ztunnel"])
        .is_ok()
}

/// A process holding a pod's netns, as a pod sandbox's `pause` does, in the pod's cgroup and
/// visible to its node's daemon (which finds a running pod's netns by scanning processes);
/// killed on drop.
pub struct Pause(std::process::Child);

impl Pause {
    pub fn of(bed: &TestBed, name: &str) -> Pause {
        use std::os::unix::fs::MetadataExt;
        let pod = bed.pod(name);
        let child = crate::daemon::die_with_test(&mut std::process::Command::new("ip"))
            .args(["netns", "exec", &pod.ns.name, "sleep", "600"])
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("spawn sleep in the pod's netns");
        let id = |p: String| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
        let want = id(format!("/var/run/netns/{}", pod.ns.name));
        let pid = child.id();
        wait_for("the pause process in its netns", || {
            id(format!("/proc/{pid}/ns/net")) == want
        });
        bed.run_in_pod(name, pid).unwrap();
        Pause(child)
    }
}

impl Drop for Pause {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A pod of the bed whose ServiceAccount and `app` label are its name.
pub fn spec(name: &'static str, ns: &'static str, node: usize, ip: &'static str) -> PodSpec {
    PodSpec {
        name,
        namespace: ns,
        sa: name,
        app: name,
        node,
        ip,
        ip6: None,
    }
}

/// What the whoami application at `ip:port` saw of a connection from pod `from`.
/// What pod `from` is answered when it sends a plain HTTP request to `ip:port`, read until the
/// far end closes (within 5 s).
pub fn http_get(bed: &TestBed, from: &str, ip: &str, port: u16) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = format!("{ip}:{port}");
    bed.pod(from).ns.block_on(async move {
        let exchange = async {
            let mut s = tokio::net::TcpStream::connect(&addr).await?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
            let mut got = Vec::new();
            s.read_to_end(&mut got).await?;
            Ok(String::from_utf8_lossy(&got).into_owned())
        };
        tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    })
}

pub fn whoami(bed: &TestBed, from: &str, ip: &str, port: u16) -> std::io::Result<String> {
    let ip = ip.to_string();
    bed.pod(from)
        .ns
        .block_on(async move { crate::apps::whoami(&ip, port, "who").await })
}
