//! Runs the built `ztunnel-cni` binary in its installer modes (`install`, `install --watch`,
//! `uninstall`) against temporary CNI conf and bin directories.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ztunnel-cni");

const CALICO: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {"type": "calico", "log_level": "info", "datastore_type": "kubernetes",
     "ipam": {"type": "calico-ipam"}, "policy": {"type": "k8s"},
     "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}},
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}},
    {"type": "bandwidth", "capabilities": {"bandwidth": true}}
  ]
}"#;

const FLANNEL: &str = r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[
  {"type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}},
  {"type":"portmap","capabilities":{"portMappings":true}}]}"#;

const CILIUM: &str =
    r#"{"cniVersion":"0.3.1","name":"cilium","type":"cilium-cni","enable-debug":false}"#;

struct Node {
    _tmp: tempfile::TempDir,
    conf: PathBuf,
    bin: PathBuf,
}

impl Node {
    fn new(files: &[(&str, &str)]) -> Node {
        let tmp = tempfile::tempdir().unwrap();
        let conf = tmp.path().join("net.d");
        let bin = tmp.path().join("bin");
        fs::create_dir(&conf).unwrap();
        fs::create_dir(&bin).unwrap();
        for (name, text) in files {
            fs::write(conf.join(name), text).unwrap();
        }
        Node {
            _tmp: tmp,
            conf,
            bin,
        }
    }

    fn command(&self, mode: &str) -> Command {
        let mut c = Command::new(BIN);
        c.arg(mode)
            .arg("--cni-conf-dir")
            .arg(&self.conf)
            .arg("--cni-bin-dir")
            .arg(&self.bin)
            .args(["--socket", "/run/z/cni.sock", "--timeout", "2s"])
            .stdin(Stdio::null());
        c
    }

    fn run(&self, mode: &str) -> Output {
        let out = self.command(mode).output().unwrap();
        assert!(
            out.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn read(&self, name: &str) -> String {
        fs::read_to_string(self.conf.join(name)).unwrap()
    }

    fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = fs::read_dir(&self.conf)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        n.sort();
        n
    }

    /// `install --watch` running until the returned guard is dropped.
    fn watch(&self) -> Killed {
        self.watch_with(&[])
    }

    fn watch_with(&self, extra: &[&str]) -> Killed {
        let child = self
            .command("install")
            .arg("--watch")
            .args(extra)
            .stderr(fs::File::create(self.log_path()).unwrap())
            .spawn()
            .unwrap();
        Killed(child)
    }

    fn log_path(&self) -> PathBuf {
        self.conf.parent().unwrap().join("watch.log")
    }

    /// What the watcher has logged so far.
    fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn installed(&self) -> PathBuf {
        self.bin.join("ztunnel-cni")
    }
}

fn types(text: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(text).unwrap();
    v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_string())
        .collect()
}

fn ours(text: &str) -> Value {
    let v: Value = serde_json::from_str(text).unwrap();
    v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["type"] == "ztunnel-cni")
        .cloned()
        .unwrap()
}

fn assert_executable_copy(path: &Path) {
    let meta = fs::metadata(path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o755);
    assert_eq!(fs::read(path).unwrap(), fs::read(BIN).unwrap());
}

#[test]
fn install_chains_into_conflists_and_is_idempotent() {
    for (name, text, expected) in [
        (
            "10-calico.conflist",
            CALICO,
            &["calico", "portmap", "bandwidth", "ztunnel-cni"][..],
        ),
        (
            "10-flannel.conflist",
            FLANNEL,
            &["flannel", "portmap", "ztunnel-cni"][..],
        ),
    ] {
        let node = Node::new(&[(name, text), ("README.txt", "not a config")]);
        node.run("install");
        assert_executable_copy(&node.installed());
        let once = node.read(name);
        assert!(once.ends_with("}\n"));
        assert_eq!(types(&once), expected, "{name}");
        assert_eq!(
            ours(&once),
            serde_json::json!({"type": "ztunnel-cni", "socket": "/run/z/cni.sock",
                "timeout": "2s",
                "enrolledNamespacesFile": "/var/run/ztunnel/enrolled-namespaces.json",
                "excludeNamespaces": ["kube-system", "ztunnel-system"]})
        );
        node.run("install");
        assert_eq!(
            node.read(name),
            once,
            "{name}: second install changed the file"
        );
        assert_eq!(node.names(), [name, "README.txt"]);
        assert_eq!(node.read("README.txt"), "not a config");
    }
}

#[test]
fn install_converts_a_single_plugin_conf() {
    let node = Node::new(&[("05-cilium.conf", CILIUM)]);
    node.run("install");
    assert_eq!(node.names(), ["05-cilium.conflist"]);
    let text = node.read("05-cilium.conflist");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["cniVersion"], "0.3.1");
    assert_eq!(v["name"], "cilium");
    assert_eq!(
        v["plugins"][0],
        serde_json::json!({"type": "cilium-cni", "enable-debug": false})
    );
    assert_eq!(types(&text), ["cilium-cni", "ztunnel-cni"]);
    node.run("install");
    assert_eq!(node.read("05-cilium.conflist"), text);
}

#[test]
fn install_picks_the_lexically_first_config() {
    let node = Node::new(&[
        ("20-flannel.conflist", FLANNEL),
        ("10-calico.conflist", CALICO),
        ("00-notes.txt", "{"),
    ]);
    node.run("install");
    assert!(types(&node.read("10-calico.conflist")).contains(&"ztunnel-cni".to_string()));
    assert_eq!(node.read("20-flannel.conflist"), FLANNEL);
    assert_eq!(node.read("00-notes.txt"), "{");
}

#[test]
fn install_refuses_malformed_json_and_missing_config() {
    let node = Node::new(&[("10-bad.conflist", "{\"plugins\": [")]);
    let out = node.command("install").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("10-bad.conflist"), "{err}");
    assert_eq!(node.read("10-bad.conflist"), "{\"plugins\": [");

    let empty = Node::new(&[]);
    let out = empty.command("install").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no CNI network configuration"));
}

#[test]
fn uninstall_removes_entry_and_binary_idempotently() {
    let node = Node::new(&[("10-calico.conflist", CALICO)]);
    let original: Value = serde_json::from_str(CALICO).unwrap();
    node.run("install");
    assert!(node.installed().exists());
    node.run("uninstall");
    let after = node.read("10-calico.conflist");
    assert_eq!(serde_json::from_str::<Value>(&after).unwrap(), original);
    assert_eq!(types(&after), ["calico", "portmap", "bandwidth"]);
    assert!(!node.installed().exists());
    node.run("uninstall");
    assert_eq!(node.read("10-calico.conflist"), after);
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Killed(Child);

impl Killed {
    /// SIGTERM, as the kubelet stops the container; waits for the exit.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let mut status = None;
        wait_for("the watcher to exit", || {
            status = self.0.try_wait().unwrap();
            status.is_some()
        });
        status.unwrap()
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn has_ours(path: &Path) -> bool {
    fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| {
            v["plugins"]
                .as_array()
                .map(|p| p.iter().any(|p| p["type"] == "ztunnel-cni"))
        })
        .unwrap_or(false)
}

#[test]
fn watch_reinserts_after_the_primary_rewrites_its_file_and_stops_on_sigterm() {
    let node = Node::new(&[("10-flannel.conflist", FLANNEL)]);
    let path = node.conf.join("10-flannel.conflist");
    let mut child = node.watch();
    wait_for("the first install", || has_ours(&path));
    assert_executable_copy(&node.installed());
    let installed = fs::read_to_string(&path).unwrap();

    for _ in 0..2 {
        // The primary CNI writes its own configuration back.
        fs::write(&path, FLANNEL).unwrap();
        wait_for("the re-insert", || has_ours(&path));
        wait_for("the complete file", || {
            fs::read_to_string(&path).unwrap() == installed
        });
    }

    let status = child.terminate();
    assert!(status.success(), "{status:?}");
}

/// Stopped with `--uninstall-if`, the watcher uninstalls only when the command says so (exits
/// 0); a command that says no, or cannot run, leaves the plugin chained.
#[test]
fn a_stopped_watcher_uninstalls_only_when_its_command_says_so() {
    for (command, uninstalls) in [
        ("true", true),
        ("false", false),
        ("/nonexistent/ztunnel removed", false),
    ] {
        let node = Node::new(&[("10-flannel.conflist", FLANNEL)]);
        let path = node.conf.join("10-flannel.conflist");
        let mut child = node.watch_with(&["--uninstall-if", command]);
        wait_for("the first install", || has_ours(&path));
        let status = child.terminate();
        assert!(status.success(), "{command}: {status:?}");
        assert_eq!(has_ours(&path), !uninstalls, "{command}: chained?");
        assert_eq!(node.installed().exists(), !uninstalls, "{command}: binary?");
        if uninstalls {
            let restored: Value =
                serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
            let original: Value = serde_json::from_str(FLANNEL).unwrap();
            assert_eq!(restored, original, "restored as it was");
        }
    }
}

/// `installed` (the installer's readiness probe) is ready only while the binary is in place
/// and the primary configuration chains the plugin.
#[test]
fn installed_says_whether_the_node_is_set_up() {
    let node = Node::new(&[("10-flannel.conflist", FLANNEL)]);
    let probe = || node.command("installed").output().unwrap();
    let out = probe();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing"));
    node.run("install");
    assert!(probe().status.success());
    fs::write(node.conf.join("10-flannel.conflist"), FLANNEL).unwrap();
    let out = probe();
    assert!(!out.status.success(), "the primary lost the entry");
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not chain"));
    node.run("install");
    fs::remove_file(node.installed()).unwrap();
    assert!(!probe().status.success(), "the binary is gone");
}

/// What CRI-O loads is what gets chained: a file it cannot load is skipped, a `.json` or
/// hidden file counts. A configuration the runtime would run at a version the plugin does not
/// support (an old flannel `.conf` without `cniVersion`) is not chained, and the probe says
/// why; nor is one chained by hand at such a version ready.
#[test]
fn install_chains_what_the_runtime_loads_and_only_at_a_supported_version() {
    let broken = Node::new(&[
        ("00-broken.conflist", "{\"plugins\": ["),
        ("10-flannel.conflist", FLANNEL),
    ]);
    broken.run("install");
    assert!(types(&broken.read("10-flannel.conflist")).contains(&"ztunnel-cni".to_string()));
    assert_eq!(broken.read("00-broken.conflist"), "{\"plugins\": [");
    assert!(broken
        .command("installed")
        .output()
        .unwrap()
        .status
        .success());
    for first in ["05-cilium.json", ".05-cilium.conf"] {
        let node = Node::new(&[(first, CILIUM), ("10-flannel.conflist", FLANNEL)]);
        node.run("install");
        assert_eq!(node.read("10-flannel.conflist"), FLANNEL, "{first}");
        let converted = first.rsplit_once('.').unwrap().0.to_owned() + ".conflist";
        assert!(types(&node.read(&converted)).contains(&"ztunnel-cni".to_string()));
    }
    let old = r#"{"name":"cbr0","type":"flannel","delegate":{"isDefaultGateway":true}}"#;
    let node = Node::new(&[("10-flannel.conf", old)]);
    let out = node.command("install").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cniVersion \"\""));
    assert_eq!(node.read("10-flannel.conf"), old);
    let by_hand = FLANNEL.replace("0.3.1", "0.2.0").replace(
        r#"{"type":"portmap""#,
        r#"{"type":"ztunnel-cni"},{"type":"portmap""#,
    );
    let node = Node::new(&[("10-flannel.conflist", &by_hand)]);
    fs::copy(BIN, node.installed()).unwrap();
    let out = node.command("installed").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not support"));
}

/// A plugin binary removed from the CNI bin directory (a CNI upgrade that empties it) is
/// copied there again by the watcher.
/// An entry an older installer wrote with other settings (an upgrade moved the snapshot file
/// and the socket) is updated in place by the watcher, the other plugins kept.
#[test]
fn watch_updates_an_entry_with_other_settings() {
    let old = r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[
  {"type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}},
  {"type":"portmap","capabilities":{"portMappings":true}},
  {"type":"ztunnel-cni","socket":"/var/run/old/cni.sock","timeout":"2s",
   "enrolledNamespacesFile":"/var/run/old/ns.json","excludeNamespaces":[]}]}"#;
    let node = Node::new(&[("10-flannel.conflist", old)]);
    let path = node.conf.join("10-flannel.conflist");
    let _child = node.watch();
    let socket = |text: &str| {
        let v: Value = serde_json::from_str(text).unwrap();
        v["plugins"][2]["socket"].as_str().unwrap_or("").to_owned()
    };
    wait_for("the entry updated", || {
        socket(&fs::read_to_string(&path).unwrap()) == "/run/z/cni.sock"
    });
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(types(&text), ["flannel", "portmap", "ztunnel-cni"]);
    let probe = node.command("installed").output().unwrap();
    assert!(
        probe.status.success(),
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );
}

/// A write that fails (here its temp file's name is taken) is tried again at the next pass,
/// not only when the file changes again.
#[test]
fn watch_tries_a_failed_write_again() {
    let node = Node::new(&[("10-flannel.conflist", FLANNEL)]);
    let path = node.conf.join("10-flannel.conflist");
    let child = node.watch();
    wait_for("the first install", || has_ours(&path));
    let blocker = node
        .conf
        .join(format!(".10-flannel.conflist.{}.tmp", child.0.id()));
    fs::create_dir(&blocker).unwrap();
    fs::write(&path, FLANNEL).unwrap();
    wait_for("the failed write logged", || {
        node.log().contains("retrying")
    });
    assert!(!has_ours(&path));
    fs::remove_dir(&blocker).unwrap();
    wait_for("the write tried again", || has_ours(&path));
}

#[test]
fn watch_copies_a_missing_plugin_binary_again() {
    let node = Node::new(&[("10-flannel.conflist", FLANNEL)]);
    let _child = node.watch();
    wait_for("the first install", || node.installed().exists());
    fs::remove_file(node.installed()).unwrap();
    wait_for("the binary copied again", || node.installed().exists());
    assert_executable_copy(&node.installed());
}

#[test]
fn watch_waits_for_a_primary_and_converts_a_conf() {
    let node = Node::new(&[]);
    let _child = node.watch();
    wait_for("the watcher to find no primary configuration", || {
        node.log().contains("retrying")
    });
    fs::write(node.conf.join("05-cilium.conf"), CILIUM).unwrap();
    let list = node.conf.join("05-cilium.conflist");
    wait_for("the conversion", || has_ours(&list));
    wait_for("the .conf removal", || {
        node.names() == ["05-cilium.conflist"]
    });
}

#[test]
fn no_arguments_is_still_the_plugin() {
    let out = Command::new(BIN)
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["supportedVersions"].is_array(), "{v}");
}
