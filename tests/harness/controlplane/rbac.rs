//! Checking `deploy/`'s RBAC against the audit log of the test API server: every grant used,
//! no request forbidden.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

use super::ControlPlane;
use crate::netns;

impl ControlPlane {
    /// Every request the API server has answered so far, as audit events (JSON): `user`
    /// (`username`, `extra` with the bound pod's name), `verb`, `objectRef`, `responseStatus`.
    pub fn audit_events(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.join("audit.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Checks `deploy/`'s RBAC for ServiceAccount `ns/sa` against what the API server saw it
    /// do (its audit events so far): every verb on every resource that a Role or ClusterRole
    /// bound to it grants must have been used successfully at least once (a grant nothing
    /// uses is an excess), and no request of it may have been forbidden (a permission it
    /// needs is missing). Returns the problems found, empty when none.
    pub fn rbac_problems(&self, ns: &str, sa: &str) -> Result<Vec<String>> {
        self.rbac_problems_in("base", ns, sa)
    }

    /// [`Self::rbac_problems`] for the RBAC of kustomization `deploy/<dir>`.
    pub fn rbac_problems_in(&self, dir: &str, ns: &str, sa: &str) -> Result<Vec<String>> {
        let user = format!("system:serviceaccount:{ns}:{sa}");
        let base = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy")
            .join(dir);
        let rendered = netns::sh("kubectl", &["kustomize", &base.display().to_string()])?;
        let objects: Vec<Value> = serde_saphyr::from_multiple(&rendered)?;
        let bound = |kind: &str| -> Vec<String> {
            objects
                .iter()
                .filter(|o| o["kind"] == format!("{kind}Binding").as_str())
                .filter(|o| {
                    o["subjects"].as_array().into_iter().flatten().any(|s| {
                        s["kind"] == "ServiceAccount" && s["name"] == sa && s["namespace"] == ns
                    })
                })
                .filter(|o| o["roleRef"]["kind"] == kind)
                .filter_map(|o| o["roleRef"]["name"].as_str().map(String::from))
                .collect()
        };
        let mut grants = Vec::new(); // (group, resource, verb)
        for kind in ["ClusterRole", "Role"] {
            for name in bound(kind) {
                let role = objects
                    .iter()
                    .find(|o| o["kind"] == kind && o["metadata"]["name"] == name.as_str())
                    .with_context(|| format!("{kind} {name} is bound but not in deploy/"))?;
                for rule in role["rules"].as_array().into_iter().flatten() {
                    for g in rule["apiGroups"].as_array().into_iter().flatten() {
                        for r in rule["resources"].as_array().into_iter().flatten() {
                            for v in rule["verbs"].as_array().into_iter().flatten() {
                                grants.push((
                                    g.as_str().unwrap_or("").to_string(),
                                    r.as_str().unwrap_or("").to_string(),
                                    v.as_str().unwrap_or("").to_string(),
                                ));
                            }
                        }
                    }
                }
            }
        }
        let events: Vec<Value> = self
            .audit_events()
            .into_iter()
            // A watch is logged when its answer starts (it completes only when it ends).
            .filter(|e| {
                e["user"]["username"] == user.as_str()
                    && (e["stage"] == "ResponseComplete" || e["stage"] == "ResponseStarted")
            })
            .collect();
        let resource_of = |e: &Value| {
            let r = e["objectRef"]["resource"]
                .as_str()
                .unwrap_or("")
                .to_string();
            match e["objectRef"]["subresource"].as_str() {
                Some(sub) => format!("{r}/{sub}"),
                None => r,
            }
        };
        let mut problems = Vec::new();
        for (group, resource, verb) in &grants {
            let used = events.iter().any(|e| {
                e["objectRef"]["apiGroup"].as_str().unwrap_or("") == group
                    && resource_of(e) == *resource
                    && e["verb"] == verb.as_str()
                    && e["responseStatus"]["code"]
                        .as_u64()
                        .is_some_and(|c| (200..300).contains(&c))
            });
            if !used {
                problems.push(format!(
                    "{user} is granted `{verb}` on {resource} ({group:?}) but never used it"
                ));
            }
        }
        for e in &events {
            if e["responseStatus"]["code"] == 403 {
                problems.push(format!(
                    "{user} was forbidden to {} {} ({:?}): {}",
                    e["verb"],
                    resource_of(e),
                    e["objectRef"]["apiGroup"].as_str().unwrap_or(""),
                    e["responseStatus"]["message"]
                ));
            }
        }
        Ok(problems)
    }
}
