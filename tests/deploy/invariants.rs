//! What every rendering of `deploy/` must satisfy, whichever way it is rendered (`kubectl
//! kustomize` in `deploy.rs`, `helm template` in `helm.rs`): each check reads the parsed
//! objects and holds them against the code they deploy (the daemon's and the CA's own
//! configuration parsers, the real `ztunnel-cni install`).
//!
//! Where platforms differ (the node's CNI directories), the rendering is checked against the
//! [`Node`] it is meant for.

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;
use ztunnel::config::{CaAuthorizer, CaConfig, CaMaterialSource, CaSource};

use crate::manifests::*;

/// The node directories a rendering is meant for, as host paths.
#[derive(Clone, Copy, Debug)]
pub struct Node {
    pub cni_conf_dir: &'static str,
    pub cni_bin_dir: &'static str,
    pub netns_dir: &'static str,
}

/// The usual directories of containerd and CRI-O, which `deploy/base` mounts.
pub const GENERIC: Node = Node {
    cni_conf_dir: "/etc/cni/net.d",
    cni_bin_dir: "/opt/cni/bin",
    netns_dir: "/var/run/netns",
};

/// One namespace, every namespaced object in it, one image for every container, and the
/// CRDs exactly the generated ones.
pub fn objects_are_in_place(o: &Objects) {
    assert_eq!(o.namespaces.len(), 1);
    assert_eq!(o.namespaces[0].metadata.name.as_deref(), Some(SYSTEM_NS));
    // Namespaced objects all live in ztunnel-system.
    let namespaced: Vec<&ObjectMeta> = o
        .service_accounts
        .iter()
        .map(|x| &x.metadata)
        .chain(o.roles.iter().map(|x| &x.metadata))
        .chain(o.role_bindings.iter().map(|x| &x.metadata))
        .chain(o.daemon_sets.iter().map(|x| &x.metadata))
        .chain(o.deployments.iter().map(|x| &x.metadata))
        .chain(o.services.iter().map(|x| &x.metadata))
        .chain(o.network_policies.iter().map(|x| &x.metadata))
        .chain(o.disruption_budgets.iter().map(|x| &x.metadata))
        .collect();
    for m in namespaced {
        assert_eq!(m.namespace.as_deref(), Some(SYSTEM_NS), "{:?}", m.name);
    }
    // Every container runs the one image, tag set by the kustomization.
    let specs = o
        .daemon_sets
        .iter()
        .map(pod_spec_ds)
        .chain(o.deployments.iter().map(pod_spec_deploy));
    for spec in specs {
        for c in spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
        {
            assert_eq!(c.image.as_deref(), Some(IMAGE), "{}", c.name);
        }
    }
    // The CRDs are exactly the generated ones (kustomize adds only its label).
    let mut rendered = o.crds.clone();
    for crd in &mut rendered {
        let labels = crd.metadata.labels.as_mut().expect("kustomize labels");
        labels.remove("app.kubernetes.io/part-of");
        if labels.is_empty() {
            crd.metadata.labels = None;
        }
    }
    assert_eq!(
        rendered,
        ztunnel::discovery::crd::crds(),
        "the CRDs in deploy/base differ from the code: {}",
        ztunnel::discovery::crd::REGENERATE
    );
}

/// The Istio-compatible rendering `o` is `base` with the setting turned on and read access to
/// Istio's two policy kinds and the Gateway API's two kinds that declare Istio's waypoints,
/// and nothing else changed.
pub fn istio_compat_is_the_base_with_the_setting_and_its_read_access(base: &Objects, o: &Objects) {
    let cfg = daemon_config(container(
        pod_spec_ds(named(&o.daemon_sets, "ztunnel")),
        "ztunnel",
    ));
    assert_eq!(cfg.istio_root_namespace.as_deref(), Some("istio-system"));
    assert_eq!(cfg.root_namespaces(), ["ztunnel-system", "istio-system"]);
    let base_cfg = daemon_config(container(
        pod_spec_ds(named(&base.daemon_sets, "ztunnel")),
        "ztunnel",
    ));
    assert_eq!(base_cfg.istio_root_namespace, None, "off in the base");
    assert_eq!(
        RunConfigWithoutIstio(&cfg),
        RunConfigWithoutIstio(&base_cfg),
        "only the setting differs"
    );
    // One more ClusterRole, bound to the daemon: list and watch of Istio's two policy kinds,
    // its ServiceEntries and WorkloadEntries, and the Gateway API's two kinds that declare
    // Istio's waypoints; nothing else.
    assert_eq!(o.cluster_roles.len(), base.cluster_roles.len() + 1);
    let role = named(&o.cluster_roles, "ztunnel-istio-compat");
    let rules = role.rules.as_ref().expect("rules");
    let granted: Vec<(String, Vec<String>, Vec<String>)> = rules
        .iter()
        .map(|r| {
            let mut res = r.resources.clone().unwrap_or_default();
            res.sort();
            (
                r.api_groups.clone().unwrap_or_default().join(","),
                res,
                r.verbs.clone(),
            )
        })
        .collect();
    let want = |g: &str, r: [&str; 2]| {
        (
            g.to_owned(),
            r.map(String::from).to_vec(),
            vec!["list".to_owned(), "watch".to_owned()],
        )
    };
    assert_eq!(
        granted,
        [
            want(
                "security.istio.io",
                ["authorizationpolicies", "peerauthentications"]
            ),
            want("networking.istio.io", ["serviceentries", "workloadentries"]),
            want("gateway.networking.k8s.io", ["gatewayclasses", "gateways"]),
        ]
    );
    let binding = named(&o.cluster_role_bindings, "ztunnel-istio-compat");
    assert_eq!(binding.role_ref.name, "ztunnel-istio-compat");
    let subjects = binding.subjects.as_ref().expect("subjects");
    assert_eq!(
        (subjects[0].name.as_str(), subjects[0].namespace.as_deref()),
        ("ztunnel", Some(SYSTEM_NS))
    );
}

/// A daemon configuration compared without the Istio-compatible setting.
#[derive(Debug)]
struct RunConfigWithoutIstio<'a>(&'a ztunnel::config::RunConfig);

impl PartialEq for RunConfigWithoutIstio<'_> {
    fn eq(&self, other: &Self) -> bool {
        let strip = |c: &ztunnel::config::RunConfig| ztunnel::config::RunConfig {
            istio_root_namespace: None,
            ..c.clone()
        };
        strip(self.0) == strip(other.0)
    }
}

/// The DaemonSet's daemon container, fed to the daemon's own parser, and everything around it
/// (probe, metrics, mounts, CA token and root, capabilities, grace period, rollout, RBAC)
/// agree with that configuration.
/// Not privileged, a read-only root filesystem and the runtime's default seccomp profile.
fn hardened(c: &k8s_openapi::api::core::v1::Container) {
    let sc = c.security_context.as_ref().expect("a security context");
    assert_ne!(sc.privileged, Some(true), "{}", c.name);
    assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
    let seccomp = sc.seccomp_profile.as_ref().map(|p| p.type_.as_str());
    assert_eq!(seccomp, Some("RuntimeDefault"), "{}", c.name);
}

pub fn daemonset_agrees_with_the_daemon_configuration(o: &Objects, dirs: &Node) {
    let ds = named(&o.daemon_sets, "ztunnel");
    let spec = pod_spec_ds(ds);
    let daemon = container(spec, "ztunnel");
    let cfg = daemon_config(daemon);

    // What the daemon is told to be.
    assert_eq!(cfg.node_name, "node-1", "NODE_NAME from spec.nodeName");
    assert_eq!(cfg.capture, ztunnel::config::CaptureMode::InPod);
    assert_eq!(cfg.log_format, ztunnel::config::LogFormat::Json);
    let discovery = format!("{:?}", cfg.discovery);
    assert!(discovery.starts_with("Kubernetes"), "{discovery}");

    // Readiness: the probe asks the daemon's readiness server, reachable on the node.
    let probe = daemon.readiness_probe.as_ref().expect("readiness probe");
    let get = probe.http_get.as_ref().expect("HTTP readiness probe");
    assert_eq!(get.path.as_deref(), Some("/healthz/ready"));
    assert_eq!(get.port, IntOrString::Int(cfg.readiness_addr.port().into()));
    assert!(
        !cfg.readiness_addr.ip().is_loopback(),
        "kubelet probes the node's address"
    );

    // hostNetwork: no declared ports (they would be host ports and block the surge pod);
    // metrics are advertised by annotation, on the daemon's metrics port.
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    for c in &spec.containers {
        assert!(
            c.ports.as_ref().is_none_or(|p| p.is_empty()),
            "{} declares ports",
            c.name
        );
    }
    let annotations = ds
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap();
    let annotations = annotations.annotations.as_ref().expect("annotations");
    assert_eq!(
        annotations.get("prometheus.io/port").map(String::as_str),
        Some(cfg.metrics_addr.port().to_string().as_str())
    );
    assert!(!cfg.metrics_addr.ip().is_loopback());
    assert!(cfg.admin_addr.ip().is_loopback());

    // Resources: no CPU limit (throttling slows every pod on the node); a memory limit that
    // leaves room, beyond the buffered-bytes budget the daemon is configured with, for as many
    // outbound connections as the node's pods may hold (about 15 KiB each, measured by
    // `ztunnel-load`).
    let resources = daemon.resources.as_ref().expect("resources");
    let limits = resources.limits.clone().unwrap_or_default();
    assert!(
        !limits.contains_key("cpu"),
        "a CPU limit throttles the data path"
    );
    let memory = limits.get("memory").expect("a memory limit").0.clone();
    let mib: usize = memory
        .strip_suffix("Gi")
        .map(|g| g.parse::<usize>().unwrap() * 1024)
        .or_else(|| memory.strip_suffix("Mi").map(|m| m.parse().unwrap()))
        .unwrap_or_else(|| panic!("memory limit in Mi or Gi: {memory}"));
    let budget_mib = cfg.tunnel.buffered_bytes >> 20;
    let connections = cfg.tunnel.proxied_connections;
    assert!(
        mib >= budget_mib + connections * 15 / 1024 + 64,
        "memory limit {mib} MiB: the budget ({budget_mib} MiB), {connections} connections and the idle daemon must fit"
    );

    // Mounts: the state directory at the host's own path (the plugin on the host uses it),
    // the host's /proc read-only, the runtime's netns directory with propagation.
    let (m, v, rest) = mount_for(spec, daemon, &cfg.state_dir);
    assert_eq!(rest, Path::new(""));
    assert_eq!(Path::new(host_path(v)), cfg.state_dir);
    assert_ne!(m.read_only, Some(true));
    // The enrolled-namespaces file: at the host's own path too (the plugin reads it there
    // while the daemon is down), and off the tmpfs of /run, so that after a reboot the
    // plugin still knows which namespaces are enrolled before the daemon is back.
    let file = &cfg.enrolled_namespaces_file;
    let (m, v, rest) = mount_for(spec, daemon, file);
    assert_eq!(Path::new(host_path(v)).join(&rest), *file);
    assert_ne!(m.read_only, Some(true));
    assert!(
        !file.starts_with("/run") && !file.starts_with("/var/run") && !file.starts_with("/tmp"),
        "the enrolled-namespaces file is on tmpfs: {}",
        file.display()
    );
    let (m, v, rest) = mount_for(spec, daemon, &cfg.host_proc);
    assert_eq!((host_path(v), rest.as_path()), ("/proc", Path::new("")));
    assert_eq!(m.read_only, Some(true));
    let (m, v, _) = mount_for(spec, daemon, Path::new(dirs.netns_dir));
    assert_eq!(host_path(v), dirs.netns_dir);
    assert_eq!(m.mount_propagation.as_deref(), Some("HostToContainer"));

    // The remote CA: projected token (audience ztunnel-ca) and the published root.
    let CaSource::Remote {
        address,
        root_cert,
        server_name,
        token_file,
    } = &cfg.ca
    else {
        panic!("the DaemonSet must use the remote CA: {:?}", cfg.ca)
    };
    assert_eq!(address, "ztunnel-ca.ztunnel-system.svc:15012");
    assert_eq!(server_name, "ztunnel-ca.ztunnel-system.svc");
    assert_eq!(token_file, Path::new("/var/run/secrets/ztunnel/token"));
    let (_, v, rest) = mount_for(spec, daemon, token_file);
    let sources = &v
        .projected
        .as_ref()
        .expect("projected token volume")
        .sources;
    let token = sources
        .iter()
        .flatten()
        .find_map(|s| s.service_account_token.as_ref())
        .expect("serviceAccountToken source");
    assert_eq!(token.audience.as_deref(), Some("ztunnel-ca"));
    assert_eq!(Path::new(&token.path), rest);
    let (_, v, rest) = mount_for(spec, daemon, root_cert);
    let cm = v.config_map.as_ref().expect("CA root ConfigMap volume");
    assert_eq!(cm.name, "ztunnel-ca-root");
    assert!(cm.items.is_none() && cm.optional != Some(true));
    assert_eq!(rest, Path::new("root-cert.pem"), "the ConfigMap's key");

    // Least privilege: exactly these capabilities, everything else dropped.
    let (add, drop) = caps(daemon);
    assert_eq!(add, strings(&["NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"]));
    assert_eq!(drop, strings(&["ALL"]));
    hardened(daemon);

    // Lifecycle: room to drain, every node, node-critical, surge rollout one node at a time.
    let grace = spec.termination_grace_period_seconds.expect("grace period");
    assert!(
        grace as u64 > cfg.drain_grace.as_secs(),
        "terminationGracePeriodSeconds {grace} must exceed the drain grace {:?}",
        cfg.drain_grace
    );
    assert!(spec.tolerations.iter().flatten().any(|t| {
        t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()
    }));
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let strategy = ds.spec.as_ref().unwrap().update_strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let ru = strategy.rolling_update.as_ref().unwrap();
    assert_eq!(ru.max_surge, Some(IntOrString::Int(1)));
    assert_eq!(ru.max_unavailable, Some(IntOrString::Int(0)));

    // Identity and RBAC, as the contract lists them.
    assert_eq!(spec.service_account_name.as_deref(), Some("ztunnel"));
    let role = named(&o.cluster_roles, "ztunnel");
    assert_eq!(
        grants(role.rules.as_deref().unwrap_or_default()),
        grant_set(&[
            ("", "namespaces", &["list", "watch"], "*"),
            ("", "services", &["list", "watch"], "*"),
            ("", "nodes", &["list", "watch"], "*"),
            ("", "pods", &["list", "watch", "patch"], "*"),
            (
                "discovery.k8s.io",
                "endpointslices",
                &["list", "watch"],
                "*"
            ),
            (
                "security.ztunnel.dev",
                "authorizationpolicies",
                &["list", "watch"],
                "*"
            ),
            (
                "security.ztunnel.dev",
                "peerauthentications",
                &["list", "watch"],
                "*"
            ),
            (
                "security.ztunnel.dev",
                "authorizationpolicies/status",
                &["patch"],
                "*"
            ),
            (
                "security.ztunnel.dev",
                "peerauthentications/status",
                &["patch"],
                "*"
            ),
        ])
    );
    let binding = named(&o.cluster_role_bindings, "ztunnel");
    assert_eq!(binding.role_ref.name, "ztunnel");
    let subject = &binding.subjects.as_ref().unwrap()[0];
    assert_eq!(
        (
            subject.kind.as_str(),
            subject.name.as_str(),
            subject.namespace.as_deref()
        ),
        ("ServiceAccount", "ztunnel", Some(SYSTEM_NS))
    );
}

/// A temporary node's CNI directories, the installer's work in them.
pub struct TemporaryNode {
    _dir: tempfile::TempDir,
    pub conf: PathBuf,
    pub bin: PathBuf,
}

impl TemporaryNode {
    /// `args` with the CNI directories moved to this node's, and without `--watch`.
    pub fn moved(&self, args: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--watch" => {}
                // Only with --watch, which a run once has not.
                "--uninstall-if" => {
                    it.next();
                }
                "--cni-conf-dir" | "--cni-bin-dir" => {
                    it.next();
                    out.push(a.clone());
                    out.push(
                        if a == "--cni-conf-dir" {
                            &self.conf
                        } else {
                            &self.bin
                        }
                        .display()
                        .to_string(),
                    );
                }
                _ => out.push(a.clone()),
            }
        }
        out
    }
}

/// The installer container's flags chain the plugin with the daemon's socket and namespaces
/// file, into the node's CNI directories: run for real on a temporary node, which is
/// returned with the plugin installed.
pub fn installer_chains_the_plugin_to_the_daemons_socket(
    o: &Objects,
    dirs: &Node,
) -> TemporaryNode {
    let spec = pod_spec_ds(named(&o.daemon_sets, "ztunnel"));
    let cfg = daemon_config(container(spec, "ztunnel"));
    let installer = container(spec, "install-cni");
    assert_eq!(
        installer.command.as_deref(),
        Some(&["ztunnel-cni".to_string()][..])
    );
    let args = installer.args.clone().unwrap();
    assert_eq!(args[0], "install");
    assert!(
        args.contains(&"--watch".to_string()),
        "keeps the plugin chained"
    );
    // Stopped, it unchains the plugin only if this very DaemonSet is being removed, asked with
    // the pod's ServiceAccount token (its Role is checked on the real API server, cluster.rs).
    let ds = named(&o.daemon_sets, "ztunnel");
    assert_eq!(
        flag(&args, "--uninstall-if"),
        format!(
            "ztunnel removed --daemonset {}/{}",
            ds.metadata.namespace.as_deref().unwrap(),
            ds.metadata.name.as_deref().unwrap()
        )
    );
    assert_ne!(spec.automount_service_account_token, Some(false));
    let sock_name = socket_file_name();
    assert_eq!(
        Path::new(flag(&args, "--socket")),
        cfg.state_dir.join(&sock_name)
    );
    assert_eq!(
        flag(&args, "--socket"),
        ztunnel_proto::enroll::DEFAULT_SOCKET
    );
    assert_eq!(
        Path::new(flag(&args, "--enrolled-namespaces-file")),
        cfg.enrolled_namespaces_file
    );
    // The installer's directories are the node's CNI directories.
    for (f, host) in [
        ("--cni-conf-dir", dirs.cni_conf_dir),
        ("--cni-bin-dir", dirs.cni_bin_dir),
    ] {
        let (m, v, rest) = mount_for(spec, installer, Path::new(flag(&args, f)));
        assert_eq!((host_path(v), rest.as_path()), (host, Path::new("")), "{f}");
        assert_ne!(m.read_only, Some(true), "{f}");
    }
    let (add, drop) = caps(installer);
    assert!(add.is_empty(), "the installer needs no capability: {add:?}");
    assert_eq!(drop, strings(&["ALL"]));
    hardened(installer);
    let sc = installer.security_context.as_ref().unwrap();
    assert_eq!(sc.allow_privilege_escalation, Some(false));

    // The real installer, with these flags (directories moved to a temporary node, once).
    let node = tempfile::tempdir().unwrap();
    let conf = node.path().join("net.d");
    let bin = node.path().join("bin");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(
        conf.join("10-flannel.conflist"),
        r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel","delegate":{"isDefaultGateway":true}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#,
    )
    .unwrap();
    let node = TemporaryNode {
        _dir: node,
        conf: conf.clone(),
        bin: bin.clone(),
    };
    let moved = |args: &[String]| node.moved(args);
    let cni = ztunnel_e2e::daemon::binary("ztunnel-cni");
    // The installer's readiness probe: the real binary with the probe's own arguments,
    // not ready before the install, ready after it.
    let probe = installer
        .readiness_probe
        .as_ref()
        .and_then(|p| p.exec.as_ref())
        .and_then(|e| e.command.clone())
        .expect("the installer's readiness probe runs a command");
    assert_eq!(probe[..2], ["ztunnel-cni", "installed"]);
    let probe_ready = || {
        Command::new(&cni)
            .args(moved(&probe[1..]))
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(!probe_ready(), "ready before the plugin is installed");
    let out = Command::new(&cni).args(moved(&args)).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(bin.join("ztunnel-cni").exists());
    assert!(probe_ready(), "not ready once installed");
    let list: Value =
        serde_json::from_str(&std::fs::read_to_string(conf.join("10-flannel.conflist")).unwrap())
            .unwrap();
    let ours = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["type"] == "ztunnel-cni")
        .expect("plugin chained");
    assert_eq!(
        ours["socket"],
        cfg.state_dir.join(&sock_name).display().to_string()
    );
    assert_eq!(
        ours["enrolledNamespacesFile"],
        cfg.enrolled_namespaces_file.display().to_string()
    );
    // The plugin lets through without asking exactly the namespaces the daemons never enroll.
    assert_eq!(
        ours["excludeNamespaces"],
        serde_json::json!(cfg.exclude_namespaces)
    );
    node
}

/// The CA Deployment parses with the CA's own parser and agrees with the DaemonSet, its
/// Service, its availability, its NetworkPolicy and RBAC as the contract lists it.
pub fn ca_deployment_agrees_with_the_ca_configuration_and_the_daemonset(o: &Objects) {
    let ds_spec = pod_spec_ds(named(&o.daemon_sets, "ztunnel"));
    let daemon = container(ds_spec, "ztunnel");
    let dcfg = daemon_config(daemon);
    let CaSource::Remote {
        address,
        server_name,
        token_file,
        ..
    } = &dcfg.ca
    else {
        panic!("remote CA expected")
    };

    let dep = named(&o.deployments, "ztunnel-ca");
    let spec = pod_spec_deploy(dep);
    let ca = container(spec, "ca");
    let env = env_of(ca);
    let cfg = CaConfig::from_sources(argv(ca, "ca"), &|k| env.get(k).cloned())
        .unwrap_or_else(|e| panic!("the CA refuses the Deployment's settings: {e}"));

    // Material from the Secret the Role names.
    let CaMaterialSource::Secret(secret) = &cfg.material else {
        panic!(
            "the CA must read its material from a Secret: {:?}",
            cfg.material
        )
    };
    assert_eq!(secret.to_string(), "ztunnel-system/cacerts");
    // Authorizes the DaemonSet's ServiceAccount by the audience of its projected token.
    let CaAuthorizer::Kubernetes {
        audience,
        daemon_service_account,
    } = &cfg.authorizer
    else {
        panic!(
            "the CA must use the kubernetes authorizer: {:?}",
            cfg.authorizer
        )
    };
    let (_, v, _) = mount_for(ds_spec, daemon, token_file);
    let token_audience = v
        .projected
        .as_ref()
        .unwrap()
        .sources
        .iter()
        .flatten()
        .find_map(|s| s.service_account_token.as_ref())
        .and_then(|t| t.audience.clone());
    assert_eq!(Some(audience.clone()), token_audience);
    assert_eq!(
        daemon_service_account.to_string(),
        format!(
            "{SYSTEM_NS}/{}",
            ds_spec.service_account_name.as_deref().unwrap()
        )
    );
    // Its serving name is the one the daemon checks, and the Service routes the address.
    assert!(
        cfg.server_names.contains(server_name),
        "{:?}",
        cfg.server_names
    );
    let (host, port) = address.rsplit_once(':').unwrap();
    let svc = named(&o.services, "ztunnel-ca");
    assert_eq!(host, format!("ztunnel-ca.{SYSTEM_NS}.svc"));
    let svc_spec = svc.spec.as_ref().unwrap();
    let sp = &svc_spec.ports.as_ref().unwrap()[0];
    assert_eq!(sp.port.to_string(), port);
    let listen = i32::from(cfg.listen.port());
    assert_eq!(sp.target_port, Some(IntOrString::Int(listen)));
    assert_eq!(ca.ports.as_ref().unwrap()[0].container_port, listen);
    let tcp = ca
        .readiness_probe
        .as_ref()
        .unwrap()
        .tcp_socket
        .as_ref()
        .expect("tcp probe");
    assert_eq!(tcp.port, IntOrString::Int(listen));
    let pod_labels = dep
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    for (k, v) in svc_spec.selector.as_ref().unwrap() {
        assert_eq!(pod_labels.get(k), Some(v), "Service selector {k}");
    }
    let selects_the_ca = |what: &str, sel: &LabelSelector| {
        assert!(sel.match_expressions.is_none(), "{what}: labels only");
        let labels = sel.match_labels.as_ref().expect("match labels");
        assert!(!labels.is_empty(), "{what} selects every pod");
        for (k, v) in labels {
            assert_eq!(pod_labels.get(k), Some(v), "{what} selector {k}");
        }
    };

    // Available: two replicas or more, spread over nodes where possible, one kept through
    // disruptions.
    let dep_spec = dep.spec.as_ref().unwrap();
    assert!(
        dep_spec.replicas.unwrap_or(1) >= 2,
        "the CA runs one replica"
    );
    let spread = &spec
        .affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .expect("pod anti-affinity")
        .preferred_during_scheduling_ignored_during_execution
        .as_ref()
        .expect("preferred, so that a one-node cluster still runs it")[0]
        .pod_affinity_term;
    assert_eq!(spread.topology_key, "kubernetes.io/hostname");
    selects_the_ca("anti-affinity", spread.label_selector.as_ref().unwrap());
    let pdb = named(&o.disruption_budgets, "ztunnel-ca")
        .spec
        .as_ref()
        .unwrap();
    assert_eq!(pdb.min_available, Some(IntOrString::Int(1)));
    assert!(pdb.max_unavailable.is_none());
    selects_the_ca("PodDisruptionBudget", pdb.selector.as_ref().unwrap());

    // Reachable on the CA's port only, and by the daemons: they run with hostNetwork, so
    // their connections come from node addresses, which pod and namespace selectors do not
    // match (deploy/README.md); a rule admitting the port must not rely on those alone.
    let np = named(&o.network_policies, "ztunnel-ca")
        .spec
        .as_ref()
        .unwrap();
    selects_the_ca("NetworkPolicy", np.pod_selector.as_ref().unwrap());
    assert_eq!(
        np.policy_types.as_deref(),
        Some(&["Ingress".to_string()][..]),
        "egress open"
    );
    let rules = np.ingress.as_ref().expect("ingress rules");
    assert!(!rules.is_empty(), "the CA admits nothing");
    for r in rules {
        let ports = r.ports.as_ref().expect("a rule names its ports");
        let ports: Vec<_> = ports
            .iter()
            .map(|p| {
                (
                    p.protocol.as_deref().unwrap_or("TCP"),
                    p.port.clone(),
                    p.end_port,
                )
            })
            .collect();
        assert_eq!(ports, [("TCP", Some(IntOrString::Int(listen)), None)]);
    }
    assert_eq!(ds_spec.host_network, Some(true));
    assert!(
        rules.iter().any(|r| r
            .from
            .as_ref()
            .is_none_or(|from| from.iter().any(|p| p.ip_block.is_some()))),
        "no rule can admit the host-network daemons"
    );

    // Unprivileged.
    let pod_sc = spec.security_context.as_ref().unwrap();
    let sc = ca.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_non_root.or(pod_sc.run_as_non_root), Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let (add, drop) = caps(ca);
    assert!(add.is_empty());
    assert_eq!(drop, strings(&["ALL"]));

    // RBAC as the contract lists it; the Secret by name.
    assert_eq!(spec.service_account_name.as_deref(), Some("ztunnel-ca"));
    assert_eq!(
        grants(
            named(&o.cluster_roles, "ztunnel-ca")
                .rules
                .as_deref()
                .unwrap()
        ),
        grant_set(&[
            ("authentication.k8s.io", "tokenreviews", &["create"], "*"),
            ("", "pods", &["list", "watch"], "*"),
        ])
    );
    assert_eq!(
        grants(named(&o.roles, "ztunnel-ca").rules.as_deref().unwrap()),
        grant_set(&[
            ("", "secrets", &["get", "list", "watch"], &secret.name),
            ("", "secrets", &["create"], "*"),
            (
                "",
                "configmaps",
                &["get", "list", "watch", "update"],
                "ztunnel-ca-root",
            ),
            (
                "",
                "configmaps",
                &["get", "list", "watch", "update"],
                "ztunnel-ca-crl",
            ),
            ("", "configmaps", &["create"], "*"),
        ])
    );
    for (kind, role_ref, subjects) in [
        (
            "ClusterRoleBinding",
            &named(&o.cluster_role_bindings, "ztunnel-ca").role_ref,
            &named(&o.cluster_role_bindings, "ztunnel-ca").subjects,
        ),
        (
            "RoleBinding",
            &named(&o.role_bindings, "ztunnel-ca").role_ref,
            &named(&o.role_bindings, "ztunnel-ca").subjects,
        ),
    ] {
        assert_eq!(role_ref.name, "ztunnel-ca", "{kind}");
        let s = &subjects.as_ref().unwrap()[0];
        assert_eq!(
            (s.name.as_str(), s.namespace.as_deref()),
            ("ztunnel-ca", Some(SYSTEM_NS))
        );
    }
    assert!(o
        .service_accounts
        .iter()
        .any(|s| s.metadata.name.as_deref() == Some("ztunnel-ca")));
}
