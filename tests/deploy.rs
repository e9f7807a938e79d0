//! The manifests in `deploy/`, rendered with `kubectl kustomize` exactly as users apply them,
//! checked against the code they deploy:
//! - every object parses into its `k8s-openapi` type (the policy samples into the CRD types of
//!   `ztunnel::discovery::crd`) with no field ignored: k8s-openapi silently skips unknown
//!   fields, so the parse goes through `serde_ignored`, which reports each one by path; an
//!   unexpected kind is an error too;
//! - the CRDs in the rendered base are exactly the generated ones, and `ztunnel crds` prints them;
//! - the DaemonSet's daemon container, fed to the daemon's own parser
//!   (`RunConfig::from_sources`, its env with downward-API values replaced by samples),
//!   parses, and its readiness probe, metrics port, hostPath mounts, CA token and root,
//!   capabilities, grace period and rollout agree with that configuration;
//! - the installer container's flags, run through the real `ztunnel-cni install` against a
//!   temporary CNI directory, chain the plugin with the daemon's socket and namespaces file;
//!   the uninstall DaemonSet's flags take it out again;
//! - the CA Deployment parses with `CaConfig::from_sources` and agrees with the DaemonSet
//!   (audience, ServiceAccount, address, port), its Service, and RBAC as the contract lists it
//!   (the Secret created, never updated); it runs at least two replicas spread over nodes, a
//!   PodDisruptionBudget keeps one of them, and its NetworkPolicy admits the CA's port, from
//!   peers that can match the (host-network) daemons, and no other;
//! - the samples parse (the policies also with the daemon's policy parser) and refer to each
//!   other consistently;
//! - the Istio-compatible overlay is the base with the setting turned on and read access to
//!   Istio's two policy kinds, and nothing else changed;
//! - `deploy/README.md` explains exactly the capabilities and host paths the DaemonSet holds.
//!
//! The checks of a rendering that `helm.rs` makes of the Helm chart too are in
//! `deploy/invariants.rs`.
//!
//! `kubectl` (kustomize v5 built in) is required: without it the tests fail, never skip.
use std::path::Path;
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use ztunnel::discovery::policy::{MtlsMode, PolicyObject};

#[path = "deploy/manifests.rs"]
mod manifests;
use manifests::*;
#[path = "deploy/invariants.rs"]
mod invariants;
use invariants::GENERIC;

// The README's claims (no bed either), in this binary.
mod claims;
// The Helm chart's rendering, checked with the same invariants.
mod helm;

#[test]
fn strict_parsing_reports_unknown_fields_by_path() {
    let mut ds = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "x"},
        "spec": {"selector": {}, "template": {"spec": {"containers": [
            {"name": "c", "image": "i", "imagePullPolicyy": "Always"}
        ]}}}
    });
    let e = strict::<DaemonSet>(&ds).unwrap_err();
    assert!(
        e.contains("spec.template.spec.containers.0.imagePullPolicyy"),
        "{e}"
    );
    ds["spec"]["template"]["spec"]["containers"][0]
        .as_object_mut()
        .unwrap()
        .remove("imagePullPolicyy");
    strict::<DaemonSet>(&ds).unwrap();
    let mut o = Objects::default();
    let e = o
        .add(&serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}))
        .unwrap_err();
    assert!(e.contains("unexpected kind"), "{e}");
}

#[test]
fn base_renders_and_every_object_parses_strictly() {
    let o = Objects::parse(&render("base"));
    invariants::objects_are_in_place(&o);
    // And `ztunnel crds`, the real binary, prints that same file.
    let out = std::process::Command::new(ztunnel_e2e::daemon::binary("ztunnel"))
        .arg("crds")
        .output()
        .expect("run ztunnel crds");
    assert!(out.status.success(), "ztunnel crds: {out:?}");
    let file = std::fs::read(manifests::repo().join(ztunnel::discovery::crd::CRDS_FILE))
        .expect("the CRD file");
    assert!(
        out.stdout == file,
        "ztunnel crds does not print {}",
        ztunnel::discovery::crd::CRDS_FILE
    );
}

#[test]
fn istio_compat_overlay_is_the_base_with_the_setting_and_its_read_access() {
    invariants::istio_compat_is_the_base_with_the_setting_and_its_read_access(
        &Objects::parse(&render("base")),
        &Objects::parse(&render("istio-compat")),
    );
}

#[test]
fn daemonset_agrees_with_the_daemon_configuration() {
    invariants::daemonset_agrees_with_the_daemon_configuration(
        &Objects::parse(&render("base")),
        &GENERIC,
    );
}

#[test]
fn installer_container_chains_the_plugin_to_the_daemons_socket() {
    let o = Objects::parse(&render("base"));
    let node = invariants::installer_chains_the_plugin_to_the_daemons_socket(&o, &GENERIC);
    let spec = pod_spec_ds(named(&o.daemon_sets, "ztunnel"));
    let installer = container(spec, "install-cni");
    let args = installer.args.clone().unwrap();
    let cni = ztunnel_e2e::daemon::binary("ztunnel-cni");
    let (conf, bin) = (&node.conf, &node.bin);

    // The uninstall DaemonSet's flags take it out of the same directories.
    let u = Objects::parse(&render("uninstall"));
    assert_eq!(u.count, 1);
    let uspec = pod_spec_ds(named(&u.daemon_sets, "ztunnel-cni-uninstall"));
    assert_eq!(
        uspec.host_network,
        Some(true),
        "its pods must not need the CNI chain"
    );
    let un = container(uspec, "uninstall-cni");
    let uargs = un.args.clone().unwrap();
    assert_eq!(uargs[0], "uninstall");
    for f in ["--cni-conf-dir", "--cni-bin-dir"] {
        let (_, v, _) = mount_for(uspec, un, Path::new(flag(&uargs, f)));
        let (_, iv, _) = mount_for(spec, installer, Path::new(flag(&args, f)));
        assert_eq!(host_path(v), host_path(iv), "{f}");
    }
    let out = Command::new(&cni)
        .args(node.moved(&uargs))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!bin.join("ztunnel-cni").exists());
    let text = std::fs::read_to_string(conf.join("10-flannel.conflist")).unwrap();
    assert!(!text.contains("ztunnel-cni"), "{text}");
}

#[test]
fn ca_deployment_agrees_with_the_ca_configuration_and_the_daemonset() {
    invariants::ca_deployment_agrees_with_the_ca_configuration_and_the_daemonset(&Objects::parse(
        &render("base"),
    ));
}

#[test]
fn samples_parse_and_agree_with_each_other() {
    let values = render("samples");
    let o = Objects::parse(&values);
    // The policies also pass the daemon's own policy parser.
    for v in values
        .iter()
        .filter(|v| v["apiVersion"] == "security.ztunnel.dev/v1")
    {
        PolicyObject::from_value(v.clone())
            .unwrap_or_else(|e| panic!("the daemon refuses a sample policy: {e}"));
    }
    let ns = &o.namespaces[0];
    let ns_name = ns.metadata.name.clone().unwrap();
    assert_eq!(
        ns.metadata
            .labels
            .as_ref()
            .unwrap()
            .get(ztunnel::discovery::DATAPLANE_MODE_LABEL)
            .map(String::as_str),
        Some("ambient")
    );
    let server = named(&o.deployments, "server");
    let server_spec = pod_spec_deploy(server);
    let server_labels = server
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
    let server_port = container(server_spec, "server").ports.as_ref().unwrap()[0].container_port;
    let client_sa = pod_spec_deploy(named(&o.deployments, "client"))
        .service_account_name
        .clone()
        .unwrap();
    for sa in [
        &client_sa,
        server_spec.service_account_name.as_ref().unwrap(),
    ] {
        named(&o.service_accounts, sa);
    }
    let svc = named(&o.services, "server").spec.as_ref().unwrap();
    for (k, v) in svc.selector.as_ref().unwrap() {
        assert_eq!(server_labels.get(k), Some(v));
    }
    assert_eq!(
        svc.ports.as_ref().unwrap()[0].target_port,
        Some(IntOrString::Int(server_port))
    );

    let ap = &o.authorization_policies[0].to_policy();
    assert_eq!(ap.metadata.namespace, ns_name);
    let selector = ap.spec.selector.as_ref().unwrap();
    for (k, v) in selector.match_labels.iter().flatten() {
        assert_eq!(server_labels.get(k), Some(v), "policy selector {k}");
    }
    let rule = &ap.spec.rules[0];
    assert_eq!(
        rule.from[0].source.principals,
        [format!("cluster.local/ns/{ns_name}/sa/{client_sa}")]
    );
    assert_eq!(rule.to[0].operation.ports, [server_port.to_string()]);
    let pa = &o.peer_authentications[0].to_policy();
    assert_eq!(
        (pa.metadata.namespace.as_str(), pa.spec.mtls.mode),
        (ns_name.as_str(), MtlsMode::Strict)
    );
    // What the README promises: the client reaches the server's port; nobody else does,
    // nor the client another port; plaintext is refused.
    let index = ztunnel::policy::PolicyIndex::build(
        std::slice::from_ref(ap),
        std::slice::from_ref(pa),
        &[ztunnel::policy::ROOT_NAMESPACE],
    );
    let labels: ztunnel::discovery::Labels = server_labels
        .iter()
        .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
        .collect();
    let client = format!("cluster.local/ns/{ns_name}/sa/{client_sa}");
    let other = format!("cluster.local/ns/{ns_name}/sa/default");
    let port = u16::try_from(server_port).unwrap();
    for (principal, dst_port, allowed) in [
        (client.as_str(), port, true),
        (other.as_str(), port, false),
        (client.as_str(), port + 1, false),
    ] {
        let conn = ztunnel::policy::Conn {
            src_principal: Some(principal),
            src_namespace: Some(&ns_name),
            src_ip: "10.1.0.5".parse().unwrap(),
            dst_ip: "10.1.0.6".parse().unwrap(),
            dst_namespace: &ns_name,
            dst_labels: &labels,
            dst_port,
        };
        let d = index.evaluate(&conn);
        assert_eq!(d.allowed, allowed, "{principal} -> :{dst_port}: {d:?}");
    }
    assert_eq!(index.mtls_mode(&ns_name, &labels, port), MtlsMode::Strict);
    // Every namespaced sample is in the sample namespace.
    for d in &o.deployments {
        assert_eq!(d.metadata.namespace.as_deref(), Some(ns_name.as_str()));
    }
}

#[test]
fn dockerfile_installs_both_binaries_and_the_entrypoint_the_manifests_assume() {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    for want in [
        "/usr/local/bin/ztunnel-cni",
        "/usr/local/bin/ztunnel",
        "ENTRYPOINT [\"/usr/local/bin/ztunnel\"]",
        "nftables",
        "iproute2",
    ] {
        assert!(text.contains(want), "Dockerfile lacks {want}");
    }
}

/// `deploy/README.md` says why the DaemonSet holds each privilege ("Privileges, and why"): the
/// table names exactly the capabilities each container adds and the host paths each mounts,
/// no more and no fewer, and the one it says is not added is not.
#[test]
fn every_privilege_of_the_daemonset_is_explained_in_deploy_readme() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/README.md"))
            .unwrap();
    let section = readme
        .split("## Privileges, and why")
        .nth(1)
        .expect("the section")
        .split("\n## ")
        .next()
        .unwrap();
    // (name, container) of each row: `| `NAME` … | container | why |`.
    let rows: Vec<(String, String)> = section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells[1].split('`').nth(1).unwrap().to_string();
            (name, cells[2].to_string())
        })
        .collect();
    let listed = |container: &str, host_path: bool| -> std::collections::BTreeSet<String> {
        rows.iter()
            .filter(|(n, c)| (c == container || c == "both") && n.starts_with('/') == host_path)
            .filter(|(n, _)| n != "hostNetwork")
            .map(|(n, _)| n.clone())
            .collect()
    };
    let o = Objects::parse(&render("base"));
    let spec = pod_spec_ds(named(&o.daemon_sets, "ztunnel"));
    assert_eq!(spec.host_network, Some(true));
    assert!(rows.iter().any(|(n, c)| n == "hostNetwork" && c == "both"));
    for (name, row) in [("ztunnel", "daemon"), ("install-cni", "installer")] {
        let c = container(spec, name);
        let (add, _) = caps(c);
        assert_eq!(add, listed(row, false), "{name}'s capabilities");
        let mounted: std::collections::BTreeSet<String> = c
            .volume_mounts
            .iter()
            .flatten()
            .filter_map(|m| {
                let v = spec.volumes.iter().flatten().find(|v| v.name == m.name)?;
                Some(v.host_path.as_ref()?.path.clone())
            })
            .collect();
        assert_eq!(mounted, listed(row, true), "{name}'s host paths");
    }
    let not_added: Vec<&String> = rows
        .iter()
        .filter(|(_, c)| c == "—")
        .map(|(n, _)| n)
        .collect();
    assert_eq!(not_added, ["NET_RAW"]);
    assert!(!caps(container(spec, "ztunnel")).0.contains("NET_RAW"));
}
