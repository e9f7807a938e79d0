//! What the tests of the Istio-compatible setting install and start on the test API server:
//! Istio's CRDs and the Gateway API's, as their projects publish them, daemon identities
//! granted all but one group of `deploy/istio-compat`'s, and the daemon's Kubernetes
//! discovery under the setting.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{ControlPlane, ISSUER, SYSTEM_NAMESPACE};
use crate::netns;

impl ControlPlane {
    /// Istio's own `security.istio.io` CRDs (AuthorizationPolicy, PeerAuthentication,
    /// RequestAuthentication) and `networking.istio.io` ones (ServiceEntry, WorkloadEntry, and
    /// seven more), as Istio publishes them (`tools/istio/crds.sh` fetches them
    /// from the `istio.io/api` Go module), applied once per test binary and established.
    pub fn install_istio_crds(&self) -> &Self {
        static SECURITY: OnceLock<std::result::Result<(), String>> = OnceLock::new();
        static NETWORKING: OnceLock<std::result::Result<(), String>> = OnceLock::new();
        self.install_crds(&SECURITY, "istio", "security.istio.io", 3)
            .install_crds(&NETWORKING, "istio", "networking.istio.io", 9)
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
                let (mut names, mut plurals) = (Vec::new(), Vec::new());
                for crd in serde_saphyr::from_multiple::<Value>(&all)? {
                    if crd["spec"]["group"] == group {
                        names.push(format!(
                            "crd/{}",
                            crd["metadata"]["name"].as_str().unwrap_or("")
                        ));
                        let versions = crd["spec"]["versions"].as_array().cloned();
                        if (versions.unwrap_or_default().iter())
                            .any(|v| v["name"] == "v1" && v["served"] == true)
                        {
                            plurals.push(crd["spec"]["names"]["plural"].to_string());
                        }
                        self.apply(crd)?;
                    }
                }
                if names.len() != count {
                    bail!("expected {count} {group} CRDs, found {names:?}");
                }
                let mut args = vec!["wait", "--for=condition=Established", "--timeout=60s"];
                args.extend(names.iter().map(String::as_str));
                self.kubectl(&args)?;
                // The API server's discovery lists a CRD's `v1` resource a moment after it
                // is established: wait for that too, as the daemon reads it.
                let path = format!("/apis/{group}/v1");
                let listed = || {
                    let found = self.kubectl(&["get", "--raw", &path]).unwrap_or_default();
                    (plurals.iter()).all(|p| found.contains(&format!("\"name\":{p}")))
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

    /// A kubeconfig (in `dir`) for a daemon of `node` granted what `deploy/istio-compat`
    /// grants, but for API group `left_out`: ServiceAccount `ztunnel-without-<its first
    /// label>` of the system namespace (created once), bound to the daemon's ClusterRole
    /// `ztunnel` and to one that lists and watches the other groups' kinds of [`ISTIO_GRANTS`].
    pub fn istio_kubeconfig_without(
        &self,
        dir: &Path,
        node: &str,
        left_out: &str,
    ) -> Result<PathBuf> {
        let sa = format!("ztunnel-without-{}", left_out.split('.').next().unwrap());
        let subjects =
            json!([{"kind": "ServiceAccount", "name": sa, "namespace": SYSTEM_NAMESPACE}]);
        let binding = |name: &str, role: &str| {
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": subjects})
        };
        let granted: Vec<_> = ISTIO_GRANTS
            .iter()
            .filter(|(group, _)| *group != left_out)
            .collect();
        let rules: Vec<_> = (granted.iter())
            .map(|(group, resources)| {
                json!({"apiGroups": [group], "resources": resources, "verbs": ["list", "watch"]})
            })
            .collect();
        self.apply(json!([
            {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": sa, "namespace": SYSTEM_NAMESPACE}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
             "metadata": {"name": sa}, "rules": rules},
            binding(&sa, &sa),
            binding(&format!("{sa}-daemon"), "ztunnel"),
        ]))?;
        // The authorizer sees new bindings a moment after they are written.
        let user = format!("--as=system:serviceaccount:{SYSTEM_NAMESPACE}:{sa}");
        let may = |what: &str| {
            self.kubectl(&["auth", "can-i", "list", what, &user])
                .is_ok_and(|out| out.trim() == "yes")
        };
        let (group, resources) = granted[0];
        wait_until("the ServiceAccount's grants", || {
            may(&format!("{}.{group}", resources[0])) && may("pods")
        })?;
        let token = self.system_pod_token(&sa, &format!("{sa}-{node}"), node, &[ISSUER])?;
        self.token_kubeconfig(dir, &format!("{sa}.kubeconfig"), &token)
    }
}

/// What `deploy/istio-compat` grants the daemon to list and watch, by API group.
pub const ISTIO_GRANTS: [(&str, [&str; 2]); 3] = [
    (
        "security.istio.io",
        ["authorizationpolicies", "peerauthentications"],
    ),
    ("networking.istio.io", ["serviceentries", "workloadentries"]),
    ("gateway.networking.k8s.io", ["gateways", "gatewayclasses"]),
];

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
