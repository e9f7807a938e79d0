//! What the tests of the Istio-compatible setting install and start on the test API server:
//! Istio's CRDs and the Gateway API's, as their projects publish them, a daemon identity of
//! an older `deploy/istio-compat`, and the daemon's Kubernetes discovery under the setting.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{ControlPlane, ISSUER, SYSTEM_NAMESPACE};
use crate::netns;

impl ControlPlane {
    /// Istio's own `security.istio.io` CRDs (AuthorizationPolicy, PeerAuthentication,
    /// RequestAuthentication), as Istio publishes them (`tools/istio/crds.sh` fetches them
    /// from the `istio.io/api` Go module), applied once per test binary and established.
    pub fn install_istio_crds(&self) -> &Self {
        static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
        self.install_crds(&DONE, "istio", "security.istio.io", 3)
    }

    /// The Gateway API's Gateway and GatewayClass CRDs (which declare Istio's waypoints), at
    /// the version Istio pins (`tools/istio/crds.sh gateway-api` fetches them from the
    /// `sigs.k8s.io/gateway-api` Go module), applied once per test binary and established.
    pub fn install_gateway_api_crds(&self) -> &Self {
        static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
        self.install_crds(&DONE, "gateway-api", "gateway.networking.k8s.io", 2)
    }

    /// The `count` CRDs of `group` that `tools/istio/crds.sh <set>` fetches, applied once
    /// (`done`) and established; a failure fails every test that asks for them.
    fn install_crds(
        &self,
        done: &OnceLock<std::result::Result<(), String>>,
        set: &str,
        group: &str,
        count: usize,
    ) -> &Self {
        let done = done.get_or_init(|| {
            let apply = || -> Result<()> {
                let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/istio/crds.sh");
                let path = netns::sh("bash", &[&script.display().to_string(), set])?;
                let all = std::fs::read_to_string(path.trim())
                    .with_context(|| format!("read {}", path.trim()))?;
                let mut names = Vec::new();
                for crd in serde_saphyr::from_multiple::<Value>(&all)? {
                    if crd["spec"]["group"] == group {
                        names.push(format!(
                            "crd/{}",
                            crd["metadata"]["name"].as_str().unwrap_or("")
                        ));
                        self.apply(crd)?;
                    }
                }
                if names.len() != count {
                    bail!("expected {count} {group} CRDs, found {names:?}");
                }
                let mut args = vec!["wait", "--for=condition=Established", "--timeout=60s"];
                args.extend(names.iter().map(String::as_str));
                self.kubectl(&args)?;
                // The API server's discovery lists a CRD's resource a moment after it is
                // established: wait for that too, as the daemon reads it.
                let path = format!("/apis/{group}/v1");
                let plurals: Vec<&str> = names
                    .iter()
                    .filter_map(|n| n.strip_prefix("crd/")?.split('.').next())
                    .collect();
                let listed = || {
                    let found = self.kubectl(&["get", "--raw", &path]).unwrap_or_default();
                    plurals
                        .iter()
                        .all(|p| found.contains(&format!("\"name\":\"{p}\"")))
                };
                wait_until(&format!("{path} in the API discovery"), listed)
            };
            apply().map_err(|e| format!("{e:#}"))
        });
        if let Err(e) = done {
            panic!("installing the {group} CRDs on the real API server failed: {e}");
        }
        self
    }

    /// The daemon's Kubernetes discovery for `node` under the Istio-compatible setting, started
    /// with `kubeconfig` from the control plane's network namespace and its watchers stopped
    /// once started: the first state, or why it did not start (within 20 s, else a panic).
    pub fn istio_discovery(
        &self,
        kubeconfig: &Path,
        node: &str,
    ) -> std::result::Result<ztunnel::discovery::Discovery, String> {
        let (kc, node) = (kubeconfig.to_owned(), node.to_owned());
        self.ns.block_on(async move {
            let client = ztunnel::discovery::kube::client(Some(&kc))
                .await
                .expect("a client");
            let rules = ztunnel::discovery::enrollment::Rules {
                istio: true,
                ..Default::default()
            };
            let watch = ztunnel::discovery::watch_kubernetes(
                client,
                "cluster.local".into(),
                node,
                rules,
                Duration::from_millis(20),
            );
            match tokio::time::timeout(Duration::from_secs(20), watch).await {
                Ok(Ok((disc, task))) => {
                    task.abort();
                    Ok(disc)
                }
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => panic!("the start neither failed nor completed within 20 s"),
            }
        })
    }

    /// A kubeconfig (in `dir`) for a daemon of `node` deployed as `deploy/istio-compat` was
    /// before it read the Gateway API: ServiceAccount `ztunnel-istio-policies` of the system
    /// namespace (created once), bound to the daemon's ClusterRole `ztunnel` and to one that
    /// lists and watches Istio's two policy kinds, and nothing of the Gateway API.
    pub fn istio_policies_only_kubeconfig(&self, dir: &Path, node: &str) -> Result<PathBuf> {
        const SA: &str = "ztunnel-istio-policies";
        let subjects =
            json!([{"kind": "ServiceAccount", "name": SA, "namespace": SYSTEM_NAMESPACE}]);
        let binding = |name: &str, role: &str| {
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": subjects})
        };
        self.apply(json!([
            {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": SA, "namespace": SYSTEM_NAMESPACE}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
             "metadata": {"name": SA},
             "rules": [{"apiGroups": ["security.istio.io"],
                        "resources": ["authorizationpolicies", "peerauthentications"],
                        "verbs": ["list", "watch"]}]},
            binding(SA, SA),
            binding(&format!("{SA}-daemon"), "ztunnel"),
        ]))?;
        // The authorizer sees new bindings a moment after they are written.
        let user = format!("--as=system:serviceaccount:{SYSTEM_NAMESPACE}:{SA}");
        let granted = |what: &str| {
            self.kubectl(&["auth", "can-i", "list", what, &user])
                .is_ok_and(|out| out.trim() == "yes")
        };
        wait_until("the ServiceAccount's grants", || {
            granted("authorizationpolicies.security.istio.io") && granted("pods")
        })?;
        let token = self.system_pod_token(SA, &format!("{SA}-{node}"), node, &[ISSUER])?;
        self.token_kubeconfig(dir, "istio-policies.kubeconfig", &token)
    }
}

/// Polls `done` every 100 ms for up to 20 s.
fn wait_until(what: &str, done: impl Fn() -> bool) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        if std::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
