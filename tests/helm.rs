//! The Helm chart `deploy/charts/ztunnel`, rendered and installed by the real `helm`
//! (`helm.sh/helm/v4`, built from its Go module by `tools/helm/build.sh`):
//! - `helm lint --strict` passes with the default values and with each platform profile; the
//!   values' schema refuses an unknown platform or key, in lint and in rendering;
//! - `helm template` with the default values, each platform profile and the Istio-compatible
//!   setting: every object parses strictly into its `k8s-openapi` type, and the checks
//!   `deploy.rs` makes of kustomize's rendering (`deploy/invariants.rs`: the DaemonSet against
//!   the daemon's own configuration, the real installer chaining the plugin to the daemon's
//!   socket in the profile's CNI directories, the CA against its configuration) hold for each;
//!   what each profile adds (GKE's ResourceQuota, OpenShift's SELinux options and SCC access)
//!   reaches the objects, and so does every value;
//! - the default rendering equals `kubectl kustomize deploy/base` object by object, and the
//!   Istio-compatible one `deploy/istio-compat`, once the labels in [`HELM_LABELS`] are left
//!   out;
//! - `helm install` into the real test API server (`harness::controlplane`) creates every
//!   object of the rendering (the CRDs established), `helm upgrade` to the GKE profile adds its quota, and
//!   `helm uninstall` deletes them.
//!
//! `helm` comes from `tools/helm/build.sh` (or `$ZTUNNEL_HELM_DIR`) and `kubectl` is needed
//! for kustomize: without them the tests fail, never skip.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::Container;
use serde_json::Value;
use ztunnel::identity::tls::KeyExchange;
use ztunnel_e2e::controlplane;

use super::invariants::{self, Node, GENERIC};
use super::manifests::*;

/// The labels Helm's conventions put on every object's metadata and kustomize does not: which
/// tool, which release and which chart version manage it. They are the only thing left out
/// when the chart's rendering is checked or compared with kustomize's (each object must carry
/// all three, with [`helm_labels`]' values for the release `ztunnel`).
const HELM_LABELS: [&str; 3] = [
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
    "helm.sh/chart",
];

/// [`HELM_LABELS`] with their values: `Helm`, the release, `<chart>-<version>` of Chart.yaml.
fn helm_labels() -> [(&'static str, String); 3] {
    let text = std::fs::read_to_string(chart().join("Chart.yaml")).expect("Chart.yaml");
    let meta: Value = serde_saphyr::from_str(&text).expect("Chart.yaml parses");
    let chart = format!(
        "{}-{}",
        meta["name"].as_str().unwrap(),
        meta["version"].as_str().unwrap()
    );
    [
        (HELM_LABELS[0], "Helm".into()),
        (HELM_LABELS[1], "ztunnel".into()),
        (HELM_LABELS[2], chart),
    ]
}

/// A platform profile: its `--set`, and the node directories it is meant for.
struct Profile {
    platform: &'static str,
    dirs: Node,
}

const GKE: Profile = Profile {
    platform: "gke",
    dirs: Node {
        cni_bin_dir: "/home/kubernetes/bin",
        ..GENERIC
    },
};
const K3S: Profile = Profile {
    platform: "k3s",
    dirs: Node {
        cni_conf_dir: "/var/lib/rancher/k3s/agent/etc/cni/net.d",
        cni_bin_dir: "/var/lib/rancher/k3s/data/cni",
        ..GENERIC
    },
};
const OPENSHIFT: Profile = Profile {
    platform: "openshift",
    dirs: Node {
        cni_conf_dir: "/etc/kubernetes/cni/net.d",
        cni_bin_dir: "/var/lib/cni/bin",
        ..GENERIC
    },
};
const PROFILES: [&Profile; 3] = [&GKE, &K3S, &OPENSHIFT];

/// The directory holding `helm`: `$ZTUNNEL_HELM_DIR`, or what `tools/helm/build.sh` prints
/// (it builds helm on a machine that lacks it). Fails the test loudly when neither works.
fn helm_binary() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        let dir = match std::env::var_os("ZTUNNEL_HELM_DIR") {
            Some(d) => PathBuf::from(d),
            None => {
                let script = repo().join("tools/helm/build.sh");
                let out = Command::new("bash")
                    .arg(&script)
                    .stderr(Stdio::inherit())
                    .output()
                    .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
                assert!(
                    out.status.success(),
                    "{} failed: the chart's tests need helm, built from its Go module (install Go 1.26 or newer; scripts/prereqs.sh builds it)",
                    script.display()
                );
                PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
            }
        };
        let helm = dir.join("helm");
        assert!(
            helm.exists(),
            "{} is missing (run scripts/prereqs.sh)",
            helm.display()
        );
        helm
    })
}

fn chart() -> PathBuf {
    repo().join("deploy/charts/ztunnel")
}

/// `helm` with its caches and configuration in a directory of its own (nothing of the
/// machine's is read or written), run inside `netns` when given.
fn helm(netns: Option<&str>, args: &[&str]) -> std::process::Output {
    static HOME: OnceLock<tempfile::TempDir> = OnceLock::new();
    let home = HOME.get_or_init(|| tempfile::tempdir().unwrap()).path();
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(helm_binary());
            c
        }
        None => Command::new(helm_binary()),
    };
    cmd.args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env_remove("KUBECONFIG")
        .output()
        .expect("run helm")
}

/// `helm` that must succeed; its stdout.
fn helm_ok(netns: Option<&str>, args: &[&str]) -> String {
    let out = helm(netns, args);
    assert!(
        out.status.success(),
        "helm {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// `helm template ztunnel <chart> --set <each of sets>`, every object with Helm's labels
/// checked and then left out (see [`HELM_LABELS`]).
fn template(sets: &[&str]) -> Vec<Value> {
    let chart = chart().display().to_string();
    let mut args = vec!["template", "ztunnel", chart.as_str()];
    for s in sets {
        args.extend(["--set", s]);
    }
    let text = helm_ok(None, &args);
    serde_saphyr::from_multiple::<Value>(&text)
        .expect("rendered YAML parses")
        .into_iter()
        .filter(|v| !v.is_null())
        .map(|mut v| {
            without_helm_labels(&mut v);
            v
        })
        .collect()
}

/// Takes [`HELM_LABELS`] out of the object's labels, after checking it carries each of them.
fn without_helm_labels(v: &mut Value) {
    let what = describe(v);
    let labels = v["metadata"]["labels"]
        .as_object_mut()
        .unwrap_or_else(|| panic!("{what} has no labels"));
    for (k, want) in helm_labels() {
        assert_eq!(
            labels.remove(k).as_ref().and_then(Value::as_str),
            Some(want.as_str()),
            "{what}: label {k}"
        );
    }
    if labels.is_empty() {
        v["metadata"].as_object_mut().unwrap().remove("labels");
    }
}

fn describe(v: &Value) -> String {
    format!(
        "{} {}/{}",
        v["kind"].as_str().unwrap_or("?"),
        v["metadata"]["namespace"].as_str().unwrap_or(""),
        v["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// Objects keyed by kind, namespace and name; a key seen twice fails.
fn keyed(values: Vec<Value>) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for v in values {
        let key = describe(&v);
        assert!(out.insert(key.clone(), v).is_none(), "{key} rendered twice");
    }
    out
}

/// How two renderings differ, object by object: the keys on one side only, and the objects
/// whose JSON differs (both versions, for the failure message).
fn differences(left: &[Value], right: &[Value]) -> Vec<String> {
    let (left, right) = (keyed(left.to_vec()), keyed(right.to_vec()));
    let mut out = Vec::new();
    for (k, l) in &left {
        match right.get(k) {
            None => out.push(format!("{k}: only in kustomize's")),
            Some(r) if r != l => out.push(format!(
                "{k} differs:\n kustomize: {}\n helm:      {}",
                serde_json::to_string(l).unwrap(),
                serde_json::to_string(r).unwrap()
            )),
            Some(_) => {}
        }
    }
    for k in right.keys().filter(|k| !left.contains_key(*k)) {
        out.push(format!("{k}: only in helm's"));
    }
    out
}

fn daemon_containers(o: &Objects) -> [&Container; 2] {
    let spec = pod_spec_ds(named(&o.daemon_sets, "ztunnel"));
    [container(spec, "ztunnel"), container(spec, "install-cni")]
}

/// Every check of `deploy/invariants.rs`, on one rendering meant for `dirs`.
fn keeps_the_invariants(o: &Objects, dirs: &Node) {
    invariants::objects_are_in_place(o);
    invariants::daemonset_agrees_with_the_daemon_configuration(o, dirs);
    invariants::installer_chains_the_plugin_to_the_daemons_socket(o, dirs);
    invariants::ca_deployment_agrees_with_the_ca_configuration_and_the_daemonset(o);
}

#[test]
fn helm_lint_passes_for_the_defaults_and_every_profile() {
    let chart = chart().display().to_string();
    helm_ok(None, &["lint", "--strict", &chart]);
    for p in PROFILES {
        let set = format!("platform={}", p.platform);
        helm_ok(None, &["lint", "--strict", &chart, "--set", &set]);
    }
    // The values' schema refuses a platform the chart does not know, and a misspelt key,
    // in lint and in every rendering.
    for set in [
        "platform=eks",
        "plaform=gke",
        "tls.keyExchange=x25519",
        "tls.crlConfigMap=Not_A_Name",
    ] {
        let out = helm(None, &["lint", "--strict", &chart, "--set", set]);
        assert!(!out.status.success(), "{set} passed lint");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("schema"), "{set}: {text}");
        let out = helm(None, &["template", "ztunnel", &chart, "--set", set]);
        assert!(!out.status.success(), "{set} rendered");
    }
}

#[test]
fn default_rendering_keeps_the_invariants() {
    let o = Objects::parse(&template(&[]));
    keeps_the_invariants(&o, &GENERIC);
    assert!(o.resource_quotas.is_empty());
    for c in daemon_containers(&o) {
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.se_linux_options, None, "{}", c.name);
    }
}

#[test]
fn gke_profile_keeps_the_invariants_and_admits_critical_pods_by_quota() {
    let o = Objects::parse(&template(&["platform=gke"]));
    keeps_the_invariants(&o, &GKE.dirs);
    // The quota covers the priority classes of the DaemonSet's and the CA's pods, in their
    // namespace.
    assert_eq!(o.resource_quotas.len(), 1);
    let quota = &o.resource_quotas[0];
    assert_eq!(quota.metadata.namespace.as_deref(), Some(SYSTEM_NS));
    let spec = quota.spec.as_ref().unwrap();
    let hard = spec.hard.as_ref().expect("hard limits");
    assert_eq!(hard.get("pods").map(|q| q.0.as_str()), Some("5000"));
    let exprs = &spec.scope_selector.as_ref().unwrap().match_expressions;
    let expr = &exprs.as_ref().unwrap()[0];
    assert_eq!(
        (expr.scope_name.as_str(), expr.operator.as_str()),
        ("PriorityClass", "In")
    );
    let classes = expr.values.clone().unwrap_or_default();
    let used = [
        pod_spec_ds(named(&o.daemon_sets, "ztunnel")),
        pod_spec_deploy(named(&o.deployments, "ztunnel-ca")),
    ]
    .map(|s| s.priority_class_name.clone().expect("a priority class"));
    for class in used {
        assert!(classes.contains(&class), "{class} not in {classes:?}");
    }
}

#[test]
fn k3s_profile_keeps_the_invariants_in_its_cni_directories() {
    // The installer invariant checks the installer's hostPath volumes are k3s's directories.
    let o = Objects::parse(&template(&["platform=k3s"]));
    keeps_the_invariants(&o, &K3S.dirs);
    assert!(o.resource_quotas.is_empty());
}

#[test]
fn openshift_profile_keeps_the_invariants_with_selinux_and_scc_access() {
    let o = Objects::parse(&template(&["platform=openshift"]));
    keeps_the_invariants(&o, &OPENSHIFT.dirs);
    for c in daemon_containers(&o) {
        let sc = c.security_context.as_ref().unwrap();
        let selinux = sc.se_linux_options.as_ref().expect("seLinuxOptions");
        assert_eq!(selinux.type_.as_deref(), Some("spc_t"), "{}", c.name);
    }
    // Each ServiceAccount may use the SCC its pods need, and no other.
    let mut granted = BTreeMap::new();
    for b in &o.cluster_role_bindings {
        let role = named(&o.cluster_roles, &b.role_ref.name);
        let scc: Vec<_> = grants(role.rules.as_deref().unwrap_or_default())
            .into_iter()
            .filter(|(_, res, _, _)| res == "securitycontextconstraints")
            .collect();
        if scc.is_empty() {
            continue;
        }
        for s in b.subjects.iter().flatten() {
            assert_eq!(s.namespace.as_deref(), Some(SYSTEM_NS));
            granted.insert(s.name.clone(), scc.clone());
        }
    }
    let want = |name: &str| {
        vec![(
            "security.openshift.io".to_string(),
            "securitycontextconstraints".to_string(),
            "use".to_string(),
            name.to_string(),
        )]
    };
    let daemon_sa = pod_spec_ds(named(&o.daemon_sets, "ztunnel"))
        .service_account_name
        .clone()
        .unwrap();
    let ca_sa = pod_spec_deploy(named(&o.deployments, "ztunnel-ca"))
        .service_account_name
        .clone()
        .unwrap();
    assert_eq!(
        granted,
        BTreeMap::from([(daemon_sa, want("privileged")), (ca_sa, want("nonroot-v2"))])
    );
}

#[test]
fn istio_compat_rendering_keeps_the_invariants() {
    let base = Objects::parse(&template(&[]));
    let o = Objects::parse(&template(&["istioCompat.enabled=true"]));
    keeps_the_invariants(&o, &GENERIC);
    invariants::istio_compat_is_the_base_with_the_setting_and_its_read_access(&base, &o);
}

#[test]
fn every_value_reaches_the_objects() {
    let sets = [
        "image.hub=registry.example.com/mesh",
        "image.tag=1.2.3",
        "image.pullPolicy=Always",
        "platform=k3s",
        "cni.confDir=/srv/cni/conf",
        "cni.binDir=/srv/cni/bin",
        "cni.netnsDir=/run/netns",
        "daemon.resources.limits.memory=2Gi",
        "daemon.priorityClassName=mesh-critical",
        "daemon.tolerations[0].key=dedicated",
        "daemon.tolerations[0].operator=Exists",
        "daemon.nodeSelector.pool=mesh",
        "daemon.seLinuxOptions.type=ztunnel_t",
        "installCni.resources.requests.cpu=20m",
        "ca.replicas=3",
        "ca.resources.requests.memory=96Mi",
        "ca.priorityClassName=",
        "ca.tolerations[0].operator=Exists",
        "ca.nodeSelector.pool=control",
        "istioCompat.enabled=true",
        "istioCompat.rootNamespace=mesh-root",
        "tls.keyExchange=pqc-only",
        "tls.crlConfigMap=mesh-crl",
        "resourceQuota.enabled=true",
        "resourceQuota.pods=300",
        "securityContextConstraints.enabled=true",
    ];
    let o = Objects::parse(&template(&sets));
    let ds = pod_spec_ds(named(&o.daemon_sets, "ztunnel"));
    let dep = named(&o.deployments, "ztunnel-ca");
    let ca_spec = pod_spec_deploy(dep);
    let [daemon, installer] = daemon_containers(&o);

    // The explicit directories win over the platform's: the installer chains the plugin in
    // them, and the daemon sees pod netns at their host path.
    let dirs = Node {
        cni_conf_dir: "/srv/cni/conf",
        cni_bin_dir: "/srv/cni/bin",
        netns_dir: "/run/netns",
    };
    invariants::installer_chains_the_plugin_to_the_daemons_socket(&o, &dirs);
    let (m, v, rest) = mount_for(ds, daemon, Path::new(dirs.netns_dir));
    assert_eq!(
        (host_path(v), rest.as_path()),
        (dirs.netns_dir, Path::new(""))
    );
    assert_eq!(m.mount_path, dirs.netns_dir);
    for c in [daemon, installer, container(ca_spec, "ca")] {
        assert_eq!(
            c.image.as_deref(),
            Some("registry.example.com/mesh/ztunnel:1.2.3"),
            "{}",
            c.name
        );
        assert_eq!(c.image_pull_policy.as_deref(), Some("Always"), "{}", c.name);
    }
    let quantity = |c: &Container, kind: &str, what: &str| {
        let r = c.resources.as_ref().unwrap();
        let m = if kind == "limits" {
            &r.limits
        } else {
            &r.requests
        };
        m.as_ref().and_then(|m| m.get(what)).map(|q| q.0.clone())
    };
    assert_eq!(quantity(daemon, "limits", "memory").as_deref(), Some("2Gi"));
    assert_eq!(quantity(daemon, "requests", "cpu").as_deref(), Some("100m"));
    assert_eq!(
        quantity(installer, "requests", "cpu").as_deref(),
        Some("20m")
    );
    let ca = container(ca_spec, "ca");
    assert_eq!(quantity(ca, "requests", "memory").as_deref(), Some("96Mi"));
    assert_eq!(ds.priority_class_name.as_deref(), Some("mesh-critical"));
    let tolerations = ds.tolerations.as_ref().unwrap();
    assert_eq!(tolerations.len(), 1);
    assert_eq!(
        (
            tolerations[0].key.as_deref(),
            tolerations[0].operator.as_deref()
        ),
        (Some("dedicated"), Some("Exists"))
    );
    // A map value merges with the default one.
    assert_eq!(
        ds.node_selector,
        Some(BTreeMap::from([
            ("kubernetes.io/os".into(), "linux".into()),
            ("pool".into(), "mesh".into())
        ]))
    );
    for c in [daemon, installer] {
        let selinux = c
            .security_context
            .as_ref()
            .unwrap()
            .se_linux_options
            .clone();
        assert_eq!(selinux.unwrap().type_.as_deref(), Some("ztunnel_t"));
    }
    assert_eq!(dep.spec.as_ref().unwrap().replicas, Some(3));
    assert_eq!(ca_spec.priority_class_name, None);
    assert_eq!(
        ca_spec.tolerations.as_ref().unwrap()[0].operator.as_deref(),
        Some("Exists")
    );
    assert_eq!(
        ca_spec.node_selector,
        Some(BTreeMap::from([("pool".into(), "control".into())]))
    );
    let cfg = daemon_config(daemon);
    assert_eq!(cfg.istio_root_namespace.as_deref(), Some("mesh-root"));
    assert_eq!(cfg.tls_key_exchange, KeyExchange::PqcOnly);
    // The revocation lists: the ConfigMap's key, mounted where the daemon reads them.
    let crl = cfg.crl_path.expect("the daemon reads revocation lists");
    let (_, v, rest) = mount_for(ds, daemon, &crl);
    let cm = v.config_map.as_ref().expect("a ConfigMap volume");
    assert_eq!((cm.name.as_str(), cm.optional), ("mesh-crl", Some(true)));
    assert_eq!(rest, Path::new("ca-crl.pem"));
    assert_eq!(
        env_of(container(ca_spec, "ca"))
            .get("ZTUNNEL_TLS_KEY_EXCHANGE")
            .map(String::as_str),
        Some("pqc-only")
    );
    let hard = o.resource_quotas[0].spec.as_ref().unwrap().hard.clone();
    assert_eq!(hard.unwrap()["pods"].0, "300");
    named(&o.cluster_roles, "ztunnel-scc");
    named(&o.cluster_roles, "ztunnel-ca-scc");

    // Without revocation lists: no path, no volume.
    let o = Objects::parse(&template(&["tls.crlConfigMap="]));
    let [daemon, _] = daemon_containers(&o);
    assert_eq!(daemon_config(daemon).crl_path, None);
    let ds = pod_spec_ds(named(&o.daemon_sets, "ztunnel"));
    assert!(ds.volumes.iter().flatten().all(|v| v.name != "crl"));

    // Without the namespace: everything else stays.
    let without = template(&["createNamespace=false"]);
    let with = template(&[]);
    assert_eq!(without.len() + 1, with.len());
    assert!(without.iter().all(|v| v["kind"] != "Namespace"));
}

#[test]
fn default_rendering_equals_kustomize_base_object_by_object() {
    let kustomize = render("base");
    let d = differences(&kustomize, &template(&[]));
    assert!(
        d.is_empty(),
        "the chart's default rendering differs from deploy/base:\n{}",
        d.join("\n")
    );
    // The comparison sees a changed value: one more CA replica is one object that differs.
    let d = differences(&kustomize, &template(&["ca.replicas=3"]));
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(d[0].starts_with("Deployment ztunnel-system/ztunnel-ca differs"));
}

#[test]
fn istio_compat_rendering_equals_the_kustomize_overlay_object_by_object() {
    let d = differences(
        &render("istio-compat"),
        &template(&["istioCompat.enabled=true"]),
    );
    assert!(
        d.is_empty(),
        "the chart with istioCompat.enabled differs from deploy/istio-compat:\n{}",
        d.join("\n")
    );
}

#[test]
fn helm_install_creates_every_object_on_the_api_server() {
    let cp = controlplane::shared();
    let kubeconfig = format!("--kubeconfig={}", cp.admin_kubeconfig.display());
    let chart = chart().display().to_string();
    let ns = Some(cp.ns.name.as_str());
    // The release's own record lives in `default`; the objects name their namespaces.
    let release = ["--namespace", "default", kubeconfig.as_str()];
    let run = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(release);
        helm_ok(ns, &a)
    };
    let on_server = |v: &Value| {
        cp.get(
            v["apiVersion"].as_str().unwrap(),
            v["kind"].as_str().unwrap(),
            v["metadata"]["namespace"].as_str(),
            v["metadata"]["name"].as_str().unwrap(),
        )
    };

    run(&["install", "ztunnel", &chart]);
    let rendered = template(&[]);
    // The chart's CRDs are accepted and serve their kinds.
    cp.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/authorizationpolicies.security.ztunnel.dev",
        "crd/peerauthentications.security.ztunnel.dev",
    ])
    .unwrap_or_else(|e| panic!("{e:#}"));
    for v in &rendered {
        let got = on_server(v).unwrap_or_else(|| panic!("{} is not on the server", describe(v)));
        let labels = &got["metadata"]["labels"];
        for (k, want) in helm_labels() {
            assert_eq!(labels[k], want, "{}: {k}", describe(v));
        }
    }
    let status: Value = serde_json::from_str(&run(&["status", "ztunnel", "-o", "json"])).unwrap();
    assert_eq!(status["info"]["status"], "deployed", "{status}");

    // An upgrade to the GKE profile adds its quota and moves the CNI bin directory.
    run(&["upgrade", "ztunnel", &chart, "--set", "platform=gke"]);
    let gke = template(&["platform=gke"]);
    let quota = gke
        .iter()
        .find(|v| v["kind"] == "ResourceQuota")
        .expect("the GKE rendering has a quota");
    assert!(on_server(quota).is_some(), "the quota is not on the server");
    let ds = on_server(gke.iter().find(|v| v["kind"] == "DaemonSet").unwrap()).unwrap();
    let volumes = ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    let bin = volumes.iter().find(|v| v["name"] == "cni-bin").unwrap();
    assert_eq!(bin["hostPath"]["path"], GKE.dirs.cni_bin_dir);

    // Uninstalled: every object deleted. No namespace controller runs here, so the namespace
    // itself stays terminating: it is asked to go, not gone.
    // A CRD's finalizer lists its objects before the CRD goes. The API server builds a
    // kind's watch cache on its first list and answers `429` until it is built, and it
    // rebuilds the caches of a group whenever one of its CRDs goes; the finalizer then backs
    // off exponentially, past a minute at times. Nothing here watches the kinds, as the
    // daemons would: the test lists them itself, before the uninstall and while it waits.
    let list_kind = |crd: &Value| {
        let name = crd["metadata"]["name"].as_str().unwrap_or_default();
        cp.kubectl(&["get", name, "--all-namespaces", "-o", "name"])
            .is_ok()
    };
    for crd in gke
        .iter()
        .filter(|v| v["kind"] == "CustomResourceDefinition")
    {
        controlplane::wait_until("its kind listed", Duration::from_secs(30), || {
            list_kind(crd)
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
    }
    run(&["uninstall", "ztunnel"]);
    for v in &gke {
        let what = describe(v);
        if v["kind"] == "Namespace" {
            let got = on_server(v).unwrap_or_default();
            assert!(
                got.is_null() || !got["metadata"]["deletionTimestamp"].is_null(),
                "{what} is not being deleted"
            );
            continue;
        }
        controlplane::wait_until(&format!("{what} deleted"), Duration::from_secs(60), || {
            if v["kind"] == "CustomResourceDefinition" {
                list_kind(v);
            }
            on_server(v).is_none()
        })
        .unwrap_or_else(|e| {
            let left = on_server(v).unwrap_or_default();
            panic!("{e:#}; on the server: {}", left["metadata"])
        });
    }
}
