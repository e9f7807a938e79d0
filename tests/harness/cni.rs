//! A container runtime's side of CNI, as the specification describes it: a network
//! configuration list run plugin by plugin (ADD in order, DEL in reverse, CHECK in order),
//! each plugin found by its `type` in `CNI_PATH`, given its own entry with the list's `name`
//! and `cniVersion` plus the previous plugin's result as `prevResult`, and the `CNI_*`
//! environment variables; the result of ADD is kept for DEL and CHECK.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

/// Where Debian's `containernetworking-plugins` installs the reference plugins.
pub const DEBIAN_CNI_DIR: &str = "/usr/lib/cni";

/// What a plugin printed and how it exited.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    /// The stdout as JSON (`Null` when empty).
    pub fn json(&self) -> Value {
        if self.stdout.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&self.stdout).unwrap_or(Value::Null)
        }
    }

    /// The CNI error code of a failed call.
    pub fn error_code(&self) -> Option<u64> {
        (self.code != 0)
            .then(|| self.json()["code"].as_u64())
            .flatten()
    }
}

/// The runtime: the plugin search path and the namespace plugins are run in (the node's).
pub struct Runtime {
    pub cni_path: String,
    /// `ip netns exec <node>`: plugins run in the node's namespace, as under a real runtime.
    pub node_ns: String,
}

/// One pod's attachment, as the runtime tracks it.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    /// `CNI_ARGS` (`K=V;K=V`).
    pub args: String,
    /// The runtime's dynamic parameters (`{"ips": [...]}`): each is given, as `runtimeConfig`,
    /// to the plugins that declare it among their `capabilities`.
    pub runtime_config: Value,
}

impl Runtime {
    /// The search path: Debian's plugins, then the directory holding `ztunnel-cni`.
    pub fn new(node_ns: &str, ztunnel_cni: &Path) -> Result<Runtime> {
        if !Path::new(DEBIAN_CNI_DIR).join("bridge").exists() {
            bail!("{DEBIAN_CNI_DIR}/bridge is missing: apt-get install containernetworking-plugins (see scripts/prereqs.sh)");
        }
        let ours = ztunnel_cni.parent().context("plugin directory")?;
        Ok(Runtime {
            cni_path: format!("{DEBIAN_CNI_DIR}:{}", ours.display()),
            node_ns: node_ns.to_owned(),
        })
    }

    fn find(&self, kind: &str) -> Result<PathBuf> {
        self.cni_path
            .split(':')
            .map(|d| Path::new(d).join(kind))
            .find(|p| p.exists())
            .ok_or_else(|| anyhow!("plugin {kind} not found in {}", self.cni_path))
    }

    /// Runs one plugin with `command` and `stdin`.
    pub fn exec(&self, kind: &str, command: &str, a: &Attachment, stdin: &str) -> Result<Outcome> {
        let bin = self.find(kind)?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node_ns])
            .arg(&bin)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &a.container_id)
            .env("CNI_NETNS", &a.netns)
            .env("CNI_IFNAME", &a.ifname)
            .env("CNI_ARGS", &a.args)
            .env("CNI_PATH", &self.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("run {}", bin.display()))?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(stdin.as_bytes())?;
        let out = child.wait_with_output()?;
        Ok(Outcome {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// The configuration one plugin of `list` receives.
    pub fn plugin_conf(list: &Value, plugin: &Value, prev: Option<&Value>) -> Value {
        let mut conf = plugin.clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        if let Some(p) = prev {
            conf["prevResult"] = p.clone();
        }
        conf
    }

    /// `conf` with the `runtimeConfig` entries of `a` that the plugin declares in its
    /// `capabilities`, as the specification's runtime does.
    fn with_runtime_config(mut conf: Value, a: &Attachment) -> Value {
        let mut rc = serde_json::Map::new();
        if let Some(given) = a.runtime_config.as_object() {
            for (k, v) in given {
                if conf["capabilities"][k] == true {
                    rc.insert(k.clone(), v.clone());
                }
            }
        }
        if !rc.is_empty() {
            conf["runtimeConfig"] = Value::Object(rc);
        }
        conf
    }

    /// ADD through the list; returns every plugin's outcome, stopping at the first failure.
    pub fn add(&self, list: &Value, a: &Attachment) -> Result<Vec<Outcome>> {
        let mut prev: Option<Value> = None;
        let mut outs = Vec::new();
        for plugin in list["plugins"].as_array().context("plugins")? {
            let conf = Self::with_runtime_config(Self::plugin_conf(list, plugin, prev.as_ref()), a);
            let out = self.exec(
                plugin["type"].as_str().context("type")?,
                "ADD",
                a,
                &conf.to_string(),
            )?;
            let failed = out.code != 0;
            prev = Some(out.json());
            outs.push(out);
            if failed {
                break;
            }
        }
        Ok(outs)
    }

    /// DEL through the list in reverse, with the cached ADD result as `prevResult`.
    pub fn del(
        &self,
        list: &Value,
        a: &Attachment,
        cached: Option<&Value>,
    ) -> Result<Vec<Outcome>> {
        let mut outs = Vec::new();
        for plugin in list["plugins"].as_array().context("plugins")?.iter().rev() {
            let conf = Self::with_runtime_config(Self::plugin_conf(list, plugin, cached), a);
            outs.push(self.exec(
                plugin["type"].as_str().context("type")?,
                "DEL",
                a,
                &conf.to_string(),
            )?);
        }
        Ok(outs)
    }

    /// CHECK through the list in order, with the cached ADD result.
    pub fn check(&self, list: &Value, a: &Attachment, cached: &Value) -> Result<Vec<Outcome>> {
        let mut outs = Vec::new();
        for plugin in list["plugins"].as_array().context("plugins")? {
            let conf = Self::with_runtime_config(Self::plugin_conf(list, plugin, Some(cached)), a);
            let out = self.exec(
                plugin["type"].as_str().context("type")?,
                "CHECK",
                a,
                &conf.to_string(),
            )?;
            let failed = out.code != 0;
            outs.push(out);
            if failed {
                break;
            }
        }
        Ok(outs)
    }
}

/// The `loopback` network every runtime sets up beside the pod's own.
pub fn loopback_list() -> Value {
    json!({"cniVersion": "1.0.0", "name": "lo", "plugins": [{"type": "loopback"}]})
}
