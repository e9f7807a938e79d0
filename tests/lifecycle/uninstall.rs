//! The plugin's failure domain on the real CNI chain, with a real API server for the
//! installer's question: with the daemon down, a pod of `kube-system` starts and an enrolled
//! one fails closed (code 11); the installer, stopped while its DaemonSet is there, leaves the
//! plugin chained; stopped once the DaemonSet is being deleted, it unchains the plugin, the
//! node's conflist is as the primary CNI wrote it, and new pods start.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use ztunnel_e2e::controlplane::{self, wait_until};
use ztunnel_e2e::daemon;
use ztunnel_e2e::kubebed::has_table;
use ztunnel_e2e::testbed::TestBed;

use super::late;

/// The DaemonSet of the test, in `ns`, with a finalizer when `held` (so that a deletion
/// leaves it `deletionTimestamp`-marked, as a DaemonSet whose pods are being taken down is).
fn daemonset(ns: &str, held: bool) -> Value {
    let finalizers: Vec<&str> = if held { vec!["tests/held"] } else { vec![] };
    json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
           "metadata": {"name": "ztunnel", "namespace": ns, "finalizers": finalizers},
           "spec": {"selector": {"matchLabels": {"app": "ztunnel"}},
                    "template": {"metadata": {"labels": {"app": "ztunnel"}},
                                 "spec": {"containers": [{"name": "ztunnel", "image": "ztunnel"}]}}}})
}

/// `ztunnel-cni install --watch` over node 0's CNI directories, run on the control plane's
/// host (where the API server is reachable), asking `ztunnel removed` about `ds_ns/ztunnel`
/// when stopped; waits until it watches.
fn start_installer(bed: &TestBed, ds_ns: &str, log: &Path) -> Child {
    let cp = controlplane::shared();
    let node = &bed.nodes[0];
    let check = format!(
        "{} removed --daemonset {ds_ns}/ztunnel --kubeconfig {} --timeout 10s",
        daemon::binary("ztunnel").display(),
        cp.admin_kubeconfig.display()
    );
    let child = Command::new("ip")
        .args(["netns", "exec", &cp.ns.name])
        .arg(daemon::binary("ztunnel-cni"))
        .arg("install")
        .arg("--watch")
        .arg("--cni-conf-dir")
        .arg(node.cni_dir.join("net.d"))
        .arg("--cni-bin-dir")
        .arg(node.cni_dir.join("bin"))
        .arg("--socket")
        .arg(node.state_dir.join("cni.sock"))
        .arg("--enrolled-namespaces-file")
        .arg(node.state_dir.join("enrolled-namespaces.json"))
        .args(["--uninstall-if", &check])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("the installer");
    wait_until("the installer to watch", Duration::from_secs(10), || {
        std::fs::read_to_string(log).is_ok_and(|l| l.contains("watching"))
    })
    .unwrap();
    child
}

/// SIGTERM, as the kubelet stops the container; waits for the exit (which must be clean) and
/// returns the installer's log.
fn stop_installer(mut child: Child, log: &Path) -> String {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let mut status = None;
    wait_until("the installer to exit", Duration::from_secs(30), || {
        status = child.try_wait().unwrap();
        status.is_some()
    })
    .unwrap();
    let log = std::fs::read_to_string(log).unwrap();
    assert!(status.unwrap().success(), "{status:?}: {log}");
    log
}

fn chain(bed: &TestBed) -> (Value, Vec<String>) {
    let file = bed.nodes[0].cni_dir.join("net.d/10-ztnet.conflist");
    let list: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let types = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_owned())
        .collect();
    (list, types)
}

#[test]
fn with_the_daemon_down_system_pods_start_and_removing_the_daemonset_unchains_the_plugin() {
    let cp = controlplane::shared();
    let ds_ns = cp.namespace("ds");
    cp.create_namespace(&ds_ns, json!({})).unwrap();
    cp.apply(daemonset(&ds_ns, true)).unwrap();
    let known = vec![
        late("late-plain", "plain", "10.20.1.22"),
        late("late-system", "kube-system", "10.20.1.23"),
        late("after-plain", "plain", "10.20.1.24"),
    ];
    let mut bed = TestBed::builder().known(known.clone()).start();
    bed.kill_daemon(0);
    let snapshot = bed.nodes[0].state_dir.join("enrolled-namespaces.json");
    std::fs::remove_file(&snapshot).expect("the daemon's snapshot");

    // The daemon down: the cluster's own pods start, the others fail closed.
    let (outs, pod) = bed.try_add_pod(known[1].clone()).unwrap();
    assert!(
        outs.len() == 2 && outs.iter().all(|o| o.code == 0),
        "{outs:?}"
    );
    assert!(outs[1].stderr.contains("excluded"), "{}", outs[1].stderr);
    assert!(!has_table(&pod.ns), "never enrolled");
    let (outs, _) = bed.try_add_pod(known[0].clone()).unwrap();
    assert_eq!(outs[1].error_code(), Some(11), "{:?}", outs[1]);

    // Stopped while the DaemonSet is there (a restart, an upgrade): the plugin stays.
    let log = bed.dir().join("installer-1.log");
    let installer = start_installer(&bed, &ds_ns, &log);
    let said = stop_installer(installer, &log);
    assert!(
        said.contains("present") && said.contains("leaving the plugin chained"),
        "{said}"
    );
    assert_eq!(chain(&bed).1, ["bridge", "ztunnel-cni"]);
    assert!(bed.nodes[0].cni_dir.join("bin/ztunnel-cni").exists());

    // Stopped once the DaemonSet is being deleted: the plugin is unchained and its binary gone.
    cp.delete("apps/v1", "DaemonSet", Some(&ds_ns), "ztunnel")
        .unwrap();
    let marked = cp
        .get("apps/v1", "DaemonSet", Some(&ds_ns), "ztunnel")
        .expect("held by its finalizer");
    assert!(
        marked["metadata"]["deletionTimestamp"].is_string(),
        "{marked}"
    );
    let log = bed.dir().join("installer-2.log");
    let installer = start_installer(&bed, &ds_ns, &log);
    let said = stop_installer(installer, &log);
    assert!(
        said.contains("being deleted") && said.contains("uninstalling"),
        "{said}"
    );
    let (list, types) = chain(&bed);
    assert_eq!(
        types,
        ["bridge"],
        "the conflist as the primary CNI wrote it"
    );
    assert!(!bed.nodes[0].cni_dir.join("bin/ztunnel-cni").exists());

    // New pods of that namespace start, the runtime reading the node's conflist again.
    bed.nodes[0].conflist = list;
    let (outs, pod) = bed.try_add_pod(known[2].clone()).unwrap();
    assert!(outs.len() == 1 && outs[0].code == 0, "{outs:?}");
    assert!(!has_table(&pod.ns));

    // Let the DaemonSet go.
    cp.apply(daemonset(&ds_ns, false)).unwrap();
}
