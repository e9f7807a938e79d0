//! Rendering `deploy/` and reading what it renders: `kubectl kustomize`, strict parsing into
//! the `k8s-openapi` types (unknown fields reported by `serde_ignored`), and accessors for the
//! parts of pods, containers and RBAC rules that `deploy.rs` checks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, ResourceQuota, Service, ServiceAccount, Volume,
    VolumeMount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde_json::Value;
use ztunnel::config::RunConfig;
use ztunnel::discovery::crd::{AuthorizationPolicyResource, PeerAuthenticationResource};

pub const IMAGE: &str = "ghcr.io/ztunnel-dev/ztunnel:0.1.0";
pub const SYSTEM_NS: &str = "ztunnel-system";

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Renders `deploy/<dir>` as `kubectl kustomize` does; fails loudly without kubectl.
pub fn render(dir: &str) -> Vec<Value> {
    let path = repo().join("deploy").join(dir);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run kubectl ({e}): deploy/ is tested with kubectl (kustomize v5)")
        });
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8 output");
    serde_saphyr::from_multiple::<Value>(&text)
        .expect("rendered YAML parses")
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

/// `v` as `T`, refusing any field that `T` would ignore (reported by path).
pub fn strict<T: DeserializeOwned>(v: &Value) -> Result<T, String> {
    strict_except::<T>(v, &[])
}

/// [`strict`], except for the top-level fields in `allowed`: kube-derived resources take
/// `apiVersion` and `kind` from their type, not from the document (checked by the caller).
pub fn strict_except<T: DeserializeOwned>(v: &Value, allowed: &[&str]) -> Result<T, String> {
    let mut ignored = Vec::new();
    let t = serde_ignored::deserialize(v.clone(), |path| {
        // `?` marks an Option in serde_ignored's paths; leave it out.
        let path = path.to_string();
        let path: Vec<&str> = path.split('.').filter(|p| *p != "?").collect();
        let path = path.join(".");
        if !allowed.contains(&path.as_str()) {
            ignored.push(path);
        }
    })
    .map_err(|e| e.to_string())?;
    if ignored.is_empty() {
        Ok(t)
    } else {
        Err(format!("unknown fields: {}", ignored.join(", ")))
    }
}

/// Every object of a rendering, by kind.
#[derive(Default, Debug)]
pub struct Objects {
    pub namespaces: Vec<Namespace>,
    pub service_accounts: Vec<ServiceAccount>,
    pub cluster_roles: Vec<ClusterRole>,
    pub cluster_role_bindings: Vec<ClusterRoleBinding>,
    pub roles: Vec<Role>,
    pub role_bindings: Vec<RoleBinding>,
    pub daemon_sets: Vec<DaemonSet>,
    pub deployments: Vec<Deployment>,
    pub services: Vec<Service>,
    pub network_policies: Vec<NetworkPolicy>,
    pub disruption_budgets: Vec<PodDisruptionBudget>,
    pub config_maps: Vec<ConfigMap>,
    pub resource_quotas: Vec<ResourceQuota>,
    pub crds: Vec<CustomResourceDefinition>,
    pub admission_policies: Vec<ValidatingAdmissionPolicy>,
    pub admission_policy_bindings: Vec<ValidatingAdmissionPolicyBinding>,
    pub authorization_policies: Vec<AuthorizationPolicyResource>,
    pub peer_authentications: Vec<PeerAuthenticationResource>,
    pub count: usize,
}

impl Objects {
    pub fn add(&mut self, v: &Value) -> Result<(), String> {
        let api = v["apiVersion"].as_str().unwrap_or_default();
        let kind = v["kind"].as_str().unwrap_or_default();
        match (api, kind) {
            ("v1", "Namespace") => self.namespaces.push(strict(v)?),
            ("v1", "ServiceAccount") => self.service_accounts.push(strict(v)?),
            ("v1", "Service") => self.services.push(strict(v)?),
            ("v1", "ConfigMap") => self.config_maps.push(strict(v)?),
            ("v1", "ResourceQuota") => self.resource_quotas.push(strict(v)?),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => self.cluster_roles.push(strict(v)?),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                self.cluster_role_bindings.push(strict(v)?)
            }
            ("rbac.authorization.k8s.io/v1", "Role") => self.roles.push(strict(v)?),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => self.role_bindings.push(strict(v)?),
            ("apps/v1", "DaemonSet") => self.daemon_sets.push(strict(v)?),
            ("apps/v1", "Deployment") => self.deployments.push(strict(v)?),
            ("networking.k8s.io/v1", "NetworkPolicy") => self.network_policies.push(strict(v)?),
            ("policy/v1", "PodDisruptionBudget") => self.disruption_budgets.push(strict(v)?),
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => self.crds.push(strict(v)?),
            ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy") => {
                self.admission_policies.push(strict(v)?)
            }
            ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding") => {
                self.admission_policy_bindings.push(strict(v)?)
            }
            ("security.ztunnel.dev/v1", "AuthorizationPolicy") => self
                .authorization_policies
                .push(strict_except(v, &["apiVersion", "kind"])?),
            ("security.ztunnel.dev/v1", "PeerAuthentication") => self
                .peer_authentications
                .push(strict_except(v, &["apiVersion", "kind"])?),
            other => return Err(format!("unexpected kind {other:?}")),
        }
        self.count += 1;
        Ok(())
    }

    /// Parses every object, reporting all failures at once.
    pub fn parse(values: &[Value]) -> Objects {
        let mut objects = Objects::default();
        let errors: Vec<String> = values
            .iter()
            .filter_map(|v| {
                objects.add(v).err().map(|e| {
                    format!(
                        "{} {}/{}: {e}",
                        v["kind"],
                        v["metadata"]["namespace"].as_str().unwrap_or(""),
                        v["metadata"]["name"].as_str().unwrap_or("")
                    )
                })
            })
            .collect();
        assert!(
            errors.is_empty(),
            "objects that do not parse strictly:\n{}",
            errors.join("\n")
        );
        assert_eq!(objects.count, values.len());
        objects
    }
}

pub fn named<'a, T: k8s_openapi::Metadata<Ty = ObjectMeta>>(items: &'a [T], name: &str) -> &'a T {
    items
        .iter()
        .find(|i| i.metadata().name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no {} named {name}", std::any::type_name::<T>()))
}

pub fn pod_spec_ds(ds: &DaemonSet) -> &PodSpec {
    ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

pub fn pod_spec_deploy(d: &Deployment) -> &PodSpec {
    d.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

pub fn container<'a>(spec: &'a PodSpec, name: &str) -> &'a Container {
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The container's environment as its process sees it; downward-API fields get samples.
pub fn env_of(c: &Container) -> BTreeMap<String, String> {
    assert!(c.env_from.is_none(), "{}: envFrom hides settings", c.name);
    c.env
        .iter()
        .flatten()
        .map(|e| {
            let value = match (&e.value, &e.value_from) {
                (Some(v), None) => v.clone(),
                (None, Some(from)) => {
                    let field = from
                        .field_ref
                        .as_ref()
                        .unwrap_or_else(|| panic!("{}: only downward-API fields", e.name));
                    match field.field_path.as_str() {
                        "spec.nodeName" => "node-1".into(),
                        "metadata.name" => "ztunnel-x7k2p".into(),
                        "metadata.namespace" => SYSTEM_NS.into(),
                        "status.podIP" | "status.hostIP" => "10.0.0.7".into(),
                        other => panic!("{}: unexpected field {other}", e.name),
                    }
                }
                other => panic!("{}: unexpected env source {other:?}", e.name),
            };
            (e.name.clone(), value)
        })
        .collect()
}

/// The program's argv: `ztunnel <cmd>` as `args[0]`, as `main.rs` hands it to the parsers.
pub fn argv(c: &Container, cmd: &str) -> Vec<String> {
    assert!(
        c.command.is_none(),
        "{}: the image's entrypoint is ztunnel",
        c.name
    );
    let args = c.args.clone().unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some(cmd), "{}", c.name);
    let mut argv = vec![format!("ztunnel {cmd}")];
    argv.extend(args.into_iter().skip(1));
    argv
}

/// The value following `flag` in `args`.
pub fn flag<'a>(args: &'a [String], flag: &str) -> &'a str {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{flag} missing from {args:?}"));
    args.get(i + 1)
        .unwrap_or_else(|| panic!("{flag} has no value"))
}

/// The mount whose path is the longest prefix of `path`, with its volume and the rest of
/// the path inside it.
pub fn mount_for<'a>(
    spec: &'a PodSpec,
    c: &'a Container,
    path: &Path,
) -> (&'a VolumeMount, &'a Volume, PathBuf) {
    let m = c
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| path.starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())
        .unwrap_or_else(|| panic!("{}: nothing mounted at {}", c.name, path.display()));
    let v = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == m.name)
        .unwrap_or_else(|| panic!("no volume {}", m.name));
    let rest = path.strip_prefix(&m.mount_path).unwrap().to_path_buf();
    (m, v, rest)
}

pub fn host_path(v: &Volume) -> &str {
    &v.host_path
        .as_ref()
        .unwrap_or_else(|| panic!("volume {} is not a hostPath", v.name))
        .path
}

pub fn caps(c: &Container) -> (BTreeSet<String>, BTreeSet<String>) {
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_ne!(
        sc.privileged,
        Some(true),
        "{} must not be privileged",
        c.name
    );
    let caps = sc.capabilities.as_ref().expect("capabilities");
    let set = |v: &Option<Vec<String>>| v.iter().flatten().cloned().collect::<BTreeSet<_>>();
    (set(&caps.add), set(&caps.drop))
}

pub fn strings(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// RBAC rules flattened to (apiGroup, resource, verb, resourceName or "*").
pub fn grants(rules: &[PolicyRule]) -> BTreeSet<(String, String, String, String)> {
    let mut out = BTreeSet::new();
    for r in rules {
        let names = r.resource_names.clone().unwrap_or_else(|| vec!["*".into()]);
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for verb in &r.verbs {
                    for n in &names {
                        out.insert((g.clone(), res.clone(), verb.clone(), n.clone()));
                    }
                }
            }
        }
    }
    out
}

pub fn grant_set(
    list: &[(&str, &str, &[&str], &str)],
) -> BTreeSet<(String, String, String, String)> {
    let mut out = BTreeSet::new();
    for (g, res, verbs, name) in list {
        for v in *verbs {
            out.insert((
                g.to_string(),
                res.to_string(),
                v.to_string(),
                name.to_string(),
            ));
        }
    }
    out
}

/// The socket's file name in the daemon's state directory, learnt from the daemon's own store
/// rather than repeated here.
pub fn socket_file_name() -> String {
    let dir = tempfile::tempdir().unwrap();
    let store = ztunnel::capture::store::Store::open(dir.path()).unwrap();
    store
        .socket_path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// The daemon's configuration from the DaemonSet's container, parsed by the daemon itself.
pub fn daemon_config(c: &Container) -> RunConfig {
    let env = env_of(c);
    RunConfig::from_sources(argv(c, "run"), &|k| env.get(k).cloned())
        .unwrap_or_else(|e| panic!("the daemon refuses the DaemonSet's settings: {e}"))
}
