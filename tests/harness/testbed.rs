//! The in-pod test bed: nodes and pods as network namespaces, pods wired by Debian's real
//! `bridge` + `host-local` plugins with `ztunnel-cni` chained after them by `ztunnel-cni install`
//! (as the DaemonSet chains it on a real node), one daemon process per node (in-pod capture,
//! the default).
//!
//! ```text
//!  node n1 (netns)                                   node n2 (netns)
//!  cni0 10.20.1.1/24 ── pods 10.20.1.x              cni0 10.20.2.1/24 ── pods 10.20.2.x
//!  ul0 192.168.77.1 ──────────── underlay ────────── ul0 192.168.77.2
//! ```
//! Each node routes the other's pod subnet over the underlay (no masquerade), so a capture on
//! `ul0` sees exactly what crosses between nodes. Namespace `demo` is enrolled, `plain` is
//! not. Pods get fixed addresses (the `ips` capability in `runtimeConfig`, which `host-local`
//! honours) so that the discovery file, written before the pods exist, can name them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::cni::{self, Attachment, Runtime};
use crate::daemon::{self, Process};
use crate::netns::{self, Netns};

mod builder;
pub use builder::Builder;

pub const VIP: &str = "10.96.0.10";
/// The service's second VIP, in a dual-stack bed.
pub const VIP6: &str = "fd96::10";
pub const MARKER: &str = "ZT-TESTBED-PLAINTEXT-MARKER";

/// A pod of the test bed.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: &'static str,
    pub namespace: &'static str,
    pub sa: &'static str,
    pub app: &'static str,
    pub node: usize,
    pub ip: &'static str,
    /// The pod's IPv6 address, for a dual-stack pod. A bed with any such pod is dual-stack:
    /// every node's pod network and the underlay carry IPv6 too.
    pub ip6: Option<&'static str>,
}

/// The default pods: on n1 `client` and `echo` (demo) and `legacy-1` (plain); on n2
/// `server` (demo, behind the VIP) and `legacy-2` (plain).
pub fn default_pods() -> Vec<PodSpec> {
    let p = |name, namespace, sa, app, node, ip| PodSpec {
        name,
        namespace,
        sa,
        app,
        node,
        ip,
        ip6: None,
    };
    vec![
        p("client", "demo", "client", "client", 0, "10.20.1.10"),
        p("echo", "demo", "echo", "echo", 0, "10.20.1.12"),
        p("legacy-1", "plain", "default", "legacy", 0, "10.20.1.11"),
        p("server", "demo", "server", "server", 1, "10.20.2.10"),
        p("legacy-2", "plain", "default", "legacy", 1, "10.20.2.11"),
    ]
}

/// The default pods, dual-stack: each has an IPv6 address too, which makes the whole bed
/// dual-stack (`fd20:<node>::/64` pod networks, `fd77::/64` underlay).
pub fn dual_stack_pods() -> Vec<PodSpec> {
    let mut pods = default_pods();
    for p in &mut pods {
        p.ip6 = Some(match p.name {
            "client" => "fd20:1::10",
            "legacy-1" => "fd20:1::11",
            "echo" => "fd20:1::12",
            "server" => "fd20:2::10",
            "legacy-2" => "fd20:2::11",
            other => panic!("no IPv6 address for {other}"),
        });
    }
    pods
}

impl PodSpec {
    /// The pod's addresses: its IPv4 one, then its IPv6 one if it has one.
    pub fn ips(&self) -> Vec<&'static str> {
        std::iter::once(self.ip).chain(self.ip6).collect()
    }
}

/// Whether a bed with `pods` is dual-stack (any pod has an IPv6 address).
fn dual_stack(pods: &[PodSpec]) -> bool {
    pods.iter().any(|p| p.ip6.is_some())
}

pub struct Node {
    pub name: String,
    pub ns: Netns,
    pub runtime: Runtime,
    pub conflist: Value,
    /// The node's CNI directories: `net.d` (the primary conflist, with our plugin chained)
    /// and `bin` (our plugin).
    pub cni_dir: PathBuf,
    pub state_dir: PathBuf,
    /// The node's view of the host's processes (`--host-proc`): links to the processes that
    /// run "on" this node ([`TestBed::run_on_node`]). A daemon on a real node sees only that
    /// node's pods in `/proc`; on this shared machine every bed's pods, with the same
    /// addresses, would be visible to every daemon's netns scan.
    pub proc_dir: PathBuf,
    pub daemon: Option<Process>,
}

pub struct Pod {
    pub spec: PodSpec,
    pub ns: Netns,
    pub attachment: Attachment,
    /// The result of the chain's ADD (kept for DEL and CHECK).
    pub result: Value,
}

pub struct TestBed {
    /// Every pod discovery knows (created or not).
    pub specs: Vec<PodSpec>,
    generation: std::sync::atomic::AtomicUsize,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub dir: tempfile::TempDir,
    pub ca_dir: PathBuf,
    pub discovery: PathBuf,
    prefix: String,
    /// Environment of every daemon the bed starts (settings beyond the defaults).
    daemon_env: Vec<(String, String)>,
    /// Whether pods and nodes carry IPv6 too.
    dual_stack: bool,
    /// Set when the daemons discover the cluster from the real API server instead of the file.
    pub kube: Option<crate::kubebed::KubeSource>,
}

fn uid(spec: &PodSpec) -> String {
    format!("uid-{}-{}", spec.namespace, spec.name)
}

/// The discovery file for `pods`.
pub fn discovery_yaml(pods: &[PodSpec]) -> String {
    discovery_yaml_with(pods, json!([]))
}

/// The discovery file for `pods` with `policies` (a JSON array of policy objects).
pub fn discovery_yaml_with(pods: &[PodSpec], policies: Value) -> String {
    discovery_yaml_gen(pods, policies, 0)
}

/// The same, with a marker namespace `gen-<generation>` by which a test sees that a daemon
/// has loaded this version.
fn discovery_yaml_gen(pods: &[PodSpec], policies: Value, generation: usize) -> String {
    let vips = if dual_stack(pods) {
        vec![VIP, VIP6]
    } else {
        vec![VIP]
    };
    let workloads: Vec<Value> = pods
        .iter()
        .map(|p| {
            json!({"uid": uid(p), "name": p.name, "namespace": p.namespace,
                   "serviceAccount": p.sa, "node": format!("n{}", p.node + 1),
                   "ips": p.ips(), "labels": {"app": p.app},
                   "protocol": if p.namespace == "demo" { "HBONE" } else { "TCP" }})
        })
        .collect();
    let doc = json!({
        "trustDomain": "cluster.local",
        "namespaces": [
            {"name": "demo", "labels": {"ztunnel.dev/dataplane-mode": "ambient"}},
            {"name": "plain", "labels": {}},
            {"name": format!("gen-{generation}"), "labels": {}},
        ],
        "workloads": workloads,
        "services": [{"name": "server", "namespace": "demo", "vips": vips,
                      "ports": [{"port": 80, "targetPort": 8080}], "selector": {"app": "server"}}],
        "policies": policies,
    });
    serde_saphyr::to_string(&doc).expect("yaml")
}

/// The discovery file for `pods` with `namespaces` (a JSON array of `{name, labels}`; the
/// generation marker is added) and extra labels per pod name (`{"web": {"k": "v"}}`). A
/// workload speaks HBONE when its namespace is `ambient` and it did not opt out.
pub fn discovery_yaml_labels(
    pods: &[PodSpec],
    namespaces: &Value,
    pod_labels: &Value,
    generation: usize,
) -> String {
    let mut namespaces = namespaces.as_array().cloned().unwrap_or_default();
    namespaces.push(json!({"name": format!("gen-{generation}"), "labels": {}}));
    let ambient = |ns: &str| {
        namespaces
            .iter()
            .any(|n| n["name"] == ns && n["labels"]["ztunnel.dev/dataplane-mode"] == "ambient")
    };
    let workloads: Vec<Value> = pods
        .iter()
        .map(|p| {
            let mut labels = json!({"app": p.app});
            if let Some(extra) = pod_labels[p.name].as_object() {
                for (k, v) in extra {
                    labels[k] = v.clone();
                }
            }
            let hbone = ambient(p.namespace) && labels["ztunnel.dev/dataplane-mode"] != "none";
            json!({"uid": uid(p), "name": p.name, "namespace": p.namespace,
                   "serviceAccount": p.sa, "node": format!("n{}", p.node + 1),
                   "ips": p.ips(), "labels": labels,
                   "protocol": if hbone { "HBONE" } else { "TCP" }})
        })
        .collect();
    let doc = json!({
        "trustDomain": "cluster.local",
        "namespaces": namespaces,
        "workloads": workloads,
        "services": [],
    });
    serde_saphyr::to_string(&doc).expect("yaml")
}

/// Turns off duplicate address detection in `ns` (so IPv6 addresses are usable at once, not
/// tentative for a second or two) and, for a node, turns on IPv6 forwarding.
fn ipv6_without_dad(ns: &Netns, forward: bool) -> Result<()> {
    let mut keys = vec![
        "net.ipv6.conf.all.accept_dad=0",
        "net.ipv6.conf.default.accept_dad=0",
    ];
    if forward {
        keys.push("net.ipv6.conf.all.forwarding=1");
    }
    for k in keys {
        ns.exec("sysctl", &["-qw", k])?;
    }
    Ok(())
}

impl TestBed {
    /// The default bed (`TestBed::builder().start()`).
    pub fn start() -> TestBed {
        Self::builder().start()
    }

    /// The bed: nodes, underlay, daemons (on the discovery file, or on the real API server
    /// when `kube` is given, with the labels of namespace `plain`), then `pods`.
    fn build(
        pods: Vec<PodSpec>,
        known: Vec<PodSpec>,
        daemon_env: Vec<(String, String)>,
        kube: Option<(
            &'static crate::controlplane::ControlPlane,
            serde_json::Value,
        )>,
    ) -> Result<TestBed> {
        netns::require_prerequisites();
        let prefix = netns::unique_prefix();
        let dir = tempfile::tempdir()?;
        let ca_dir = dir.path().join("ca");
        let discovery = dir.path().join("mesh.yaml");
        let all: Vec<PodSpec> = pods.iter().chain(known.iter()).cloned().collect();
        let v6 = dual_stack(&all);
        std::fs::write(&discovery, discovery_yaml(&all))?;
        let cni_bin = daemon::binary("ztunnel-cni");

        let mut nodes = Vec::new();
        for i in 0..2 {
            // On the real API server node names are cluster-wide: one bed's must not be
            // another's.
            let name = match kube {
                None => format!("n{}", i + 1),
                Some(_) => format!("{prefix}-n{}", i + 1),
            };
            let ns = Netns::new(&format!("{prefix}-n{}", i + 1))?;
            ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
            let mut ranges = vec![json!([{"subnet": format!("10.20.{}.0/24", i + 1)}])];
            let mut routes = vec![json!({"dst": "0.0.0.0/0"})];
            if v6 {
                ipv6_without_dad(&ns, true)?;
                ranges.push(json!([{"subnet": format!("fd20:{}::/64", i + 1)}]));
                routes.push(json!({"dst": "::/0"}));
            }
            let state_dir = dir.path().join(format!("{name}-state"));
            let proc_dir = dir.path().join(format!("{name}-proc"));
            std::fs::create_dir(&proc_dir)?;
            // The node's primary network: Debian's bridge + host-local; `ztunnel-cni install`
            // chains our plugin into it, as the DaemonSet does on a real node.
            let primary = json!({
                "cniVersion": "1.0.0",
                "name": "ztnet",
                "plugins": [
                    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
                     "capabilities": {"ips": true},
                     "ipam": {"type": "host-local", "dataDir": dir.path().join(format!("{name}-ipam")),
                              "ranges": ranges, "routes": routes}},
                ],
            });
            let cni_dir = dir.path().join(format!("{name}-cni"));
            let (conflist, installed) = install_cni(&cni_dir, &primary, &cni_bin, &state_dir)?;
            let runtime = Runtime::new(&ns.name, &installed)?;
            nodes.push(Node {
                name,
                ns,
                runtime,
                conflist,
                cni_dir,
                state_dir,
                proc_dir,
                daemon: None,
            });
        }
        // The underlay.
        let (n1, n2) = (&nodes[0].ns.name, &nodes[1].ns.name);
        netns::sh(
            "ip",
            &[
                "link", "add", "ul0", "netns", n1, "type", "veth", "peer", "name", "ul0", "netns",
                n2,
            ],
        )?;
        for (i, node) in nodes.iter().enumerate() {
            let other = 2 - i;
            node.ns.ip(&[
                "addr",
                "add",
                &format!("192.168.77.{}/24", i + 1),
                "dev",
                "ul0",
            ])?;
            node.ns.ip(&["link", "set", "ul0", "up"])?;
            node.ns.ip(&[
                "route",
                "add",
                &format!("10.20.{other}.0/24"),
                "via",
                &format!("192.168.77.{other}"),
            ])?;
            if v6 {
                let addr = format!("fd77::{}/64", i + 1);
                node.ns
                    .ip(&["-6", "addr", "add", &addr, "dev", "ul0", "nodad"])?;
                let (net, via) = (format!("fd20:{other}::/64"), format!("fd77::{other}"));
                node.ns.ip(&["-6", "route", "add", &net, "via", &via])?;
            }
        }
        let mut bed = TestBed {
            specs: all,
            generation: Default::default(),
            nodes,
            pods: Vec::new(),
            dir,
            ca_dir,
            discovery,
            prefix,
            daemon_env,
            dual_stack: v6,
            kube: None,
        };
        if let Some((cp, plain_labels)) = kube {
            bed.kube = Some(crate::kubebed::KubeSource::set_up(cp, &bed, plain_labels)?);
        }
        for i in 0..2 {
            bed.start_daemon(i)?;
        }
        for spec in pods {
            bed.add_pod(spec)?;
        }
        Ok(bed)
    }

    /// Starts node `i`'s daemon and waits until it is ready.
    pub fn start_daemon(&mut self, i: usize) -> Result<()> {
        let p = self.spawn_daemon(i, "")?;
        self.nodes[i].daemon = Some(p);
        Ok(())
    }

    /// Starts another daemon process on node `i` (beside a running one, for a rolling
    /// restart), waits until it is ready and returns it.
    pub fn spawn_daemon(&self, i: usize, suffix: &str) -> Result<Process> {
        let node = &self.nodes[i];
        let mut args: Vec<String> = [
            "run",
            "--node-name",
            &node.name,
            "--state-dir",
            &node.state_dir.display().to_string(),
            "--drain-grace",
            "2s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // The bed's CA, in-process, unless the daemons are told to ask a remote one.
        if !self
            .daemon_env
            .iter()
            .any(|(k, _)| k == "ZTUNNEL_CA_ADDRESS")
        {
            args.extend(["--ca-dir".to_string(), self.ca_dir.display().to_string()]);
        }
        match &self.kube {
            None => args.extend([
                "--discovery-file".to_string(),
                self.discovery.display().to_string(),
                "--discovery-poll".to_string(),
                "100ms".to_string(),
            ]),
            Some(k) => args.extend(k.daemon_args(i)),
        }
        let host_proc = node.proc_dir.display().to_string();
        let env: Vec<(&str, &str)> = [("ZTUNNEL_HOST_PROC", host_proc.as_str())]
            .into_iter()
            .chain(
                self.daemon_env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .collect();
        let mut p = Process::start(
            &node.ns,
            &format!("{}{suffix}", node.name),
            self.dir.path(),
            &args,
            &env,
        )?;
        daemon::wait_ready(
            &node.ns,
            &mut p,
            "127.0.0.1:15021",
            "/healthz/ready",
            Duration::from_secs(20),
        )?;
        // With two daemons on the node, readiness may have been answered by the other one:
        // wait for this one's own report that it has taken over the recorded pods.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !p.log().contains("enrolled pods recovered") {
            anyhow::ensure!(p.alive(), "daemon exited:\n{}", p.log());
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "daemon did not start:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(p)
    }

    fn attachment(&self, spec: &PodSpec, ns: &Netns) -> Attachment {
        let uid = self.uid_of(spec);
        Attachment {
            container_id: format!("{}-{}", self.prefix, spec.name),
            netns: PathBuf::from(format!("/var/run/netns/{}", ns.name)),
            ifname: "eth0".into(),
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={uid}",
                self.api_namespace(spec.namespace),
                spec.name,
            ),
            runtime_config: json!({"ips": spec.ips()}),
        }
    }

    /// Creates the pod's netns and runs the node's CNI chain (and `loopback`) for it, as a
    /// runtime would; fails when any plugin fails.
    pub fn add_pod(&mut self, spec: PodSpec) -> Result<()> {
        if self.kube.is_some() {
            return self.add_kube_pod(spec);
        }
        let (outs, pod) = self.try_add_pod(spec)?;
        anyhow::ensure!(
            outs.iter().all(|o| o.code == 0),
            "ADD of {} failed: {outs:?}",
            pod.spec.name
        );
        self.pods.push(pod);
        Ok(())
    }

    /// Creates the pod's netns and runs ADD; returns every plugin's outcome and the pod
    /// (whose `result` is the last plugin's output), without judging them.
    pub fn try_add_pod(&self, spec: PodSpec) -> Result<(Vec<cni::Outcome>, Pod)> {
        self.try_add_pod_after(spec, |_| Ok(()))
    }

    /// Like [`TestBed::try_add_pod`], running `prepare` in the pod's new netns before the
    /// chain's ADD (to hold a port there, say, as a process of the sandbox may).
    pub fn try_add_pod_after(
        &self,
        spec: PodSpec,
        prepare: impl FnOnce(&Netns) -> Result<()>,
    ) -> Result<(Vec<cni::Outcome>, Pod)> {
        let ns = Netns::new(&format!("{}-{}", self.prefix, spec.name))?;
        if self.dual_stack {
            ipv6_without_dad(&ns, false)?;
        }
        prepare(&ns)?;
        let a = self.attachment(&spec, &ns);
        let node = &self.nodes[spec.node];
        let lo = node.runtime.add(&cni::loopback_list(), &a)?;
        anyhow::ensure!(lo.iter().all(|o| o.code == 0), "loopback: {lo:?}");
        let outs = node.runtime.add(&node.conflist, &a)?;
        let result = outs.last().context("no plugin ran")?.json();
        Ok((
            outs,
            Pod {
                spec,
                ns,
                attachment: a,
                result,
            },
        ))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.spec.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// The UID of pod `name`: the discovery file's, or the one the API server gave it.
    pub fn pod_uid(&self, name: &str) -> String {
        self.uid_of(&self.pod(name).spec)
    }

    fn uid_of(&self, spec: &PodSpec) -> String {
        match &self.kube {
            None => uid(spec),
            Some(k) => k.uid(&self.api_namespace(spec.namespace), spec.name),
        }
    }

    /// Makes process `pid` a process of pod `name` (in the pod's cgroup, as the kubelet puts
    /// a sandbox's `pause`), then visible to the pod's node's daemon.
    pub fn run_in_pod(&self, name: &str, pid: u32) -> Result<()> {
        crate::cgroup::put_in_pod(self.prefix(), &self.pod_uid(name), pid)?;
        self.run_on_node(self.pod(name).spec.node, pid)
    }

    /// Makes process `pid` visible to node `i`'s daemon (in its `--host-proc`), as a process
    /// running on that node (in no pod's cgroup: see [`TestBed::run_in_pod`]).
    pub fn run_on_node(&self, i: usize, pid: u32) -> Result<()> {
        let link = self.nodes[i].proc_dir.join(pid.to_string());
        std::os::unix::fs::symlink(format!("/proc/{pid}"), link)?;
        Ok(())
    }

    pub fn node_of(&self, pod: &Pod) -> &Node {
        &self.nodes[pod.spec.node]
    }

    /// Kills node `i`'s daemon at once (SIGKILL): no drain, no cleanup.
    pub fn kill_daemon(&mut self, i: usize) {
        if let Some(mut d) = self.nodes[i].daemon.take() {
            d.kill();
        }
    }

    /// The process id of node `i`'s daemon, for reading its figures from `/proc`.
    pub fn daemon_pid(&self, i: usize) -> Result<u32> {
        self.nodes[i]
            .daemon
            .as_ref()
            .and_then(|d| d.pid())
            .with_context(|| format!("node {i} has no running daemon"))
    }

    /// The daemon's Prometheus metrics.
    pub fn metrics(&self, i: usize) -> String {
        daemon::http(&self.nodes[i].ns, "GET", "127.0.0.1:15020", "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// Waits (up to 5 s) until node `i`'s metric reaches `want`; returns the last exposition.
    pub fn metrics_when(&self, i: usize, name: &str, labels: &[(&str, &str)], want: f64) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let m = self.metrics(i);
            if daemon::try_metric(&m, name, labels) == Some(want)
                || std::time::Instant::now() > deadline
            {
                return m;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's live connections (admin API).
    pub fn connections(&self, i: usize) -> Value {
        let (_, body) = daemon::http(&self.nodes[i].ns, "GET", "127.0.0.1:15000", "/connections")
            .expect("admin");
        serde_json::from_str(&body).expect("JSON")
    }

    /// All logs of node `i`'s daemon(s) so far.
    pub fn log(&self, i: usize) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&self.nodes[i].name) && name.ends_with(".log") {
                out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        out
    }

    /// Rewrites the discovery file with `policies` and waits until both daemons serve them.
    pub fn apply_policies(&self, policies: Value) -> Result<()> {
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let marker = format!("gen-{generation}");
        std::fs::write(
            &self.discovery,
            discovery_yaml_gen(&self.specs, policies, generation),
        )?;
        self.wait_loaded(&marker)
    }

    /// Rewrites the discovery file with these namespaces and pod labels (see
    /// [`discovery_yaml_labels`]) and waits until both daemons have loaded it.
    pub fn apply_labels(&self, namespaces: Value, pod_labels: Value) -> Result<()> {
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        std::fs::write(
            &self.discovery,
            discovery_yaml_labels(&self.specs, &namespaces, &pod_labels, generation),
        )?;
        self.wait_loaded(&format!("gen-{generation}"))
    }

    /// Rewrites the discovery file as `edit` changes its document (as JSON), with a new
    /// generation marker, and waits until both daemons have loaded it.
    pub fn edit_discovery(&self, edit: impl FnOnce(&mut Value)) -> Result<()> {
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let marker = format!("gen-{generation}");
        let mut doc: Value = serde_saphyr::from_str(&std::fs::read_to_string(&self.discovery)?)?;
        edit(&mut doc);
        doc["namespaces"]
            .as_array_mut()
            .context("the discovery file lists namespaces")?
            .push(json!({"name": marker, "labels": {}}));
        std::fs::write(&self.discovery, serde_saphyr::to_string(&doc)?)?;
        self.wait_loaded(&marker)
    }

    /// Waits until both daemons serve the discovery file holding namespace `marker`.
    fn wait_loaded(&self, marker: &str) -> Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        for node in &self.nodes {
            loop {
                let (_, body) = daemon::http(&node.ns, "GET", "127.0.0.1:15000", "/config_dump")?;
                let dump: Value = serde_json::from_str(&body)?;
                let loaded = dump["discovery"]["namespaces"]
                    .as_array()
                    .is_some_and(|ns| ns.iter().any(|n| n["name"] == marker));
                if loaded {
                    break;
                }
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "policies not loaded: {body}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The Kubernetes namespace of the bed's namespace `ns` (`demo`, `plain`, …): the same on
    /// the discovery file; prefixed with the bed's name on the real API server, which every
    /// test binary's beds share.
    pub fn api_namespace(&self, ns: &str) -> String {
        match self.kube {
            None => ns.to_string(),
            Some(_) => crate::kubebed::namespace_of(&self.prefix, ns),
        }
    }

    /// The bed's unique prefix (namespaces and links).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut d) = n.daemon.take() {
                d.stop(Duration::from_millis(200));
            }
        }
        crate::cgroup::remove(self.prefix());
    }
}

/// Starts tcpdump on `iface` in `ns` writing to `pcap`, and returns once it is capturing (it
/// said `listening on`, which it says once its capture is open and filtered): a packet sent
/// after this returns is in the capture. Stop it with [`stop_capture`].
pub fn start_capture(ns: &Netns, iface: &str, pcap: &Path) -> Result<std::process::Child> {
    use std::io::BufRead;
    let mut child = crate::daemon::die_with_test(&mut std::process::Command::new("ip"))
        .args([
            "netns",
            "exec",
            &ns.name,
            "tcpdump",
            "-i",
            iface,
            "-U",
            "--immediate-mode",
            "-w",
        ])
        .arg(pcap)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("tcpdump (apt-get install tcpdump)")?;
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut said = String::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            said.push_str(&line);
            said.push('\n');
            // Read on until tcpdump exits, so that it never blocks on a full pipe.
            if line.contains("listening on") {
                let _ = tx.send(Ok(()));
            }
        }
        let _ = tx.send(Err(said));
    });
    let failed = match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => return Ok(child),
        Ok(Err(said)) => format!("exited without capturing: {said}"),
        Err(_) => "not capturing after 10 s".to_owned(),
    };
    let _ = child.kill();
    let _ = child.wait();
    anyhow::bail!("tcpdump on {iface} in {}: {failed}", ns.name)
}

/// What a capture saw: the packet lines (TCP unless another filter was asked for) and
/// whether the marker appeared in any byte.
pub struct Captured {
    pub lines: Vec<String>,
    pub marker_seen: bool,
}

/// Stops the capture; the lines are its TCP packets.
pub fn stop_capture(child: std::process::Child, pcap: &Path) -> Result<Captured> {
    stop_capture_filtered(child, pcap, "tcp")
}

/// Stops the capture; the lines are its packets that match the tcpdump `filter`.
pub fn stop_capture_filtered(
    mut child: std::process::Child,
    pcap: &Path,
    filter: &str,
) -> Result<Captured> {
    std::thread::sleep(Duration::from_millis(1000));
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let _ = child.wait();
    read_capture(pcap, filter)
}

/// Reads a finished capture: the packets that match the tcpdump `filter`.
pub fn read_capture(pcap: &Path, filter: &str) -> Result<Captured> {
    let wire = std::fs::read(pcap)?;
    let marker_seen = wire.windows(MARKER.len()).any(|w| w == MARKER.as_bytes());
    let dump = std::process::Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(pcap)
        .arg(filter)
        .output()?;
    Ok(Captured {
        lines: String::from_utf8_lossy(&dump.stdout)
            .lines()
            .map(str::to_owned)
            .collect(),
        marker_seen,
    })
}

/// Writes `primary` as the node's only conflist under `root/net.d`, runs `ztunnel-cni install
/// --once` into it (binary into `root/bin`), checks that it chained exactly one entry of ours
/// after the primary's plugins, and returns the resulting conflist and the installed binary.
fn install_cni(
    root: &Path,
    primary: &Value,
    built: &Path,
    state_dir: &Path,
) -> Result<(Value, PathBuf)> {
    let (conf_dir, bin_dir) = (root.join("net.d"), root.join("bin"));
    std::fs::create_dir_all(&conf_dir)?;
    std::fs::create_dir_all(&bin_dir)?;
    let file = conf_dir.join("10-ztnet.conflist");
    std::fs::write(&file, serde_json::to_string_pretty(primary)?)?;
    let out = std::process::Command::new(built)
        .arg("install")
        .arg("--once")
        .arg("--cni-conf-dir")
        .arg(&conf_dir)
        .arg("--cni-bin-dir")
        .arg(&bin_dir)
        .arg("--socket")
        .arg(state_dir.join("cni.sock"))
        .arg("--enrolled-namespaces-file")
        .arg(state_dir.join("enrolled-namespaces.json"))
        .args(["--timeout", "5s"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "ztunnel-cni install failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conflist: Value = serde_json::from_str(&std::fs::read_to_string(&file)?)?;
    let types: Vec<&str> = conflist["plugins"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["type"].as_str())
        .collect();
    anyhow::ensure!(
        types == ["bridge", "ztunnel-cni"],
        "the installer left the chain as {types:?}"
    );
    Ok((conflist, bin_dir.join("ztunnel-cni")))
}
