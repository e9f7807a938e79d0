//! `ztunnel ctl convert`: Istio's policy YAML (as written, or as `kubectl get -o yaml` prints
//! it) turned into ours, pure (text in, text out).
//!
//! Each `security.istio.io` (`v1` or `v1beta1`) `AuthorizationPolicy` and `PeerAuthentication`
//! becomes a `security.ztunnel.dev/v1` object with the same spec (our schema is Istio's). What
//! had to change is written as YAML comments above the object (so they stay with it when the
//! output is saved and applied):
//! - the `apiVersion`;
//! - the namespace, when it is Istio's root namespace: moved to ours, so that it stays
//!   mesh-wide (an object in a namespace that has our root's name, and is not Istio's root,
//!   is an error: it would apply to the whole mesh, where Istio applies it to that namespace
//!   alone);
//! - what the API server set (`status`, `uid`, `resourceVersion`, `generation`,
//!   `creationTimestamp`, `managedFields`, `ownerReferences`, kubectl's last-applied
//!   annotation), removed; a PeerAuthentication's creation time is kept as an annotation
//!   ([`CREATED_ANNOTATION`]) and PeerAuthentications are written oldest first, so that,
//!   applied, the oldest still wins as in Istio;
//! - what the daemons will not enforce as written, from the same conversion the engine runs
//!   ([`super::status_of`]): it is the same in Istio's ambient mode, so the converted object
//!   means what the original meant there.
//!
//! Any other object (another kind, another group) is left out, and a comment says so, as is
//! a PeerAuthentication that Istio never applies (a younger one of the same namespace and
//! selector: Istio applies the oldest only). `List` objects are read item by item.

use serde_json::{Map as Mapping, Value};

use super::objects::{PolicyObject, API_VERSION, CREATED_ANNOTATION};

#[derive(Debug, thiserror::Error)]
pub enum FromIstioError {
    #[error("not YAML: {0}")]
    Yaml(#[from] serde_saphyr::Error),
    #[error("cannot write YAML: {0}")]
    Write(#[from] serde_saphyr::SerializeError),
    #[error("{what} is in namespace {root}, ztunnel's root namespace, where it would apply to the whole mesh; in Istio it applies to that namespace alone. Convert with another --root-namespace, or leave it out of the input")]
    InOurRoot { what: String, root: String },
}

const ISTIO_VERSIONS: &[&str] = &["security.istio.io/v1", "security.istio.io/v1beta1"];
const SERVER_SET: &[&str] = &[
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "ownerReferences",
    "selfLink",
];
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Converts every document of `yaml`; `istio_root` objects move to `root`.
pub fn convert(yaml: &str, istio_root: &str, root: &str) -> Result<String, FromIstioError> {
    let mut objects = Vec::new();
    let docs: Vec<Value> = serde_saphyr::from_multiple_with_options(yaml, crate::yaml::options())?;
    for v in docs {
        flatten(v, &mut objects);
    }
    let shadowed = shadowed(&objects);
    // PeerAuthentications oldest first, in the places they take among the other objects:
    // applied in this order, their new creation times keep Istio's ranking, and their
    // annotations rank those created within the same second.
    let slots: Vec<usize> = (0..objects.len())
        .filter(|i| is_peer_authentication(&objects[*i]))
        .collect();
    let mut by_age = slots.clone();
    by_age.sort_by_key(|i| age(&objects[*i]));
    let mut order: Vec<usize> = (0..objects.len()).collect();
    for (slot, i) in slots.into_iter().zip(by_age) {
        order[slot] = i;
    }
    let mut objects: Vec<Option<Value>> = objects.into_iter().map(Some).collect();
    let mut out = String::new();
    for i in order {
        let o = objects[i].take().expect("each object once");
        out.push_str("---\n");
        match shadowed.get(&i) {
            Some(note) => out.push_str(&comment(std::slice::from_ref(note))),
            None => out.push_str(&one(o, istio_root, root)?),
        }
    }
    Ok(out)
}

/// Whether `o` is one of Istio's PeerAuthentications.
fn is_peer_authentication(o: &Value) -> bool {
    ISTIO_VERSIONS.contains(&str_of(o, &["apiVersion"]))
        && str_of(o, &["kind"]) == "PeerAuthentication"
}

/// An Istio object's rank by age: its creation time (none as the oldest), then its name.
fn age(o: &Value) -> (&str, &str) {
    let created = str_of(o, &["metadata", "creationTimestamp"]);
    (created, str_of(o, &["metadata", "name"]))
}

/// Istio's PeerAuthentications that Istio never applies, by index, each with why: of several
/// with the same scope (namespace and selector), istiod applies the oldest only
/// (`convertedSelectorPeerAuthentications`; an object without a creation time counts as the
/// oldest). They are left out: converted, they would compete with that one again by the
/// creation times `kubectl apply` sets anew, all within the same second or so, and the order
/// of their names would choose.
fn shadowed(objects: &[Value]) -> std::collections::HashMap<usize, String> {
    use std::collections::HashMap;
    let mut scopes: HashMap<(&str, String), Vec<usize>> = HashMap::new();
    for (i, o) in objects.iter().enumerate() {
        if is_peer_authentication(o) {
            let ns = str_of(o, &["metadata", "namespace"]);
            let selector = o.get("spec").and_then(|s| s.get("selector"));
            let selector = selector.map(Value::to_string).unwrap_or_default();
            scopes.entry((ns, selector)).or_default().push(i);
        }
    }
    let mut out = HashMap::new();
    for ((ns, _), mut same) in scopes {
        same.sort_by_key(|i| age(&objects[*i]));
        let Some((oldest, rest)) = same.split_first() else {
            continue;
        };
        let (created, name) = age(&objects[*oldest]);
        let created = match created {
            "" => "no creation time".to_owned(),
            t => format!("created {t}"),
        };
        for i in rest {
            let left_out = str_of(&objects[*i], &["metadata", "name"]);
            out.insert(*i, format!(
                "left out PeerAuthentication {ns}/{left_out}: Istio applies only the oldest PeerAuthentication of the same namespace and selector, {ns}/{name} ({created}), so this one has no effect there"
            ));
        }
    }
    out
}

/// Writes each `serviceAccounts` and `notServiceAccounts` entry of `spec.rules[].from[].source`
/// named without a namespace as `<ns>/<name>`: Istio reads a bare name as one of the policy's
/// own namespace, which the move to our root namespace would change. Returns what it wrote.
fn qualify_service_accounts(object: &mut Mapping<String, Value>, ns: &str) -> Vec<String> {
    let mut written = Vec::new();
    let rules = object
        .get_mut("spec")
        .and_then(|s| s.get_mut("rules"))
        .and_then(Value::as_array_mut);
    for rule in rules.into_iter().flatten() {
        let from = rule.get_mut("from").and_then(Value::as_array_mut);
        for f in from.into_iter().flatten() {
            let Some(source) = f.get_mut("source").and_then(Value::as_object_mut) else {
                continue;
            };
            for key in ["serviceAccounts", "notServiceAccounts"] {
                let names = source.get_mut(key).and_then(Value::as_array_mut);
                for v in names.into_iter().flatten() {
                    if let Some(name) = v.as_str().filter(|n| !n.contains('/')) {
                        let q = format!("{ns}/{name}");
                        written.push(q.clone());
                        *v = Value::String(q);
                    }
                }
            }
        }
    }
    written
}

/// The objects of one document: itself, or a `List`'s items; nothing for an empty document.
fn flatten(v: Value, out: &mut Vec<Value>) {
    if v.is_null() {
        return;
    }
    let is_list = v
        .get("kind")
        .and_then(Value::as_str)
        .is_some_and(|k| k.ends_with("List"))
        && v.get("items").is_some_and(Value::is_array);
    match v {
        Value::Object(mut m) if is_list => {
            if let Some(Value::Array(items)) = m.shift_remove("items") {
                for i in items {
                    flatten(i, out);
                }
            }
        }
        v => out.push(v),
    }
}

fn str_of<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    let mut cur = v;
    for p in path {
        match cur.get(*p) {
            Some(x) => cur = x,
            None => return "",
        }
    }
    cur.as_str().unwrap_or("")
}

/// The notes as YAML comments, one line each. A note quotes names from the input, so every
/// character YAML could read as a line break (or any other control character) is escaped
/// (`\u{a}`): nothing in a note can end its comment and become part of the output's YAML.
fn comment(notes: &[String]) -> String {
    notes
        .iter()
        .map(|n| {
            let line: String = n
                .chars()
                .map(|c| {
                    if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
                        c.escape_unicode().to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect();
            format!("# ztunnel ctl convert: {line}\n")
        })
        .collect()
}

/// One object, converted (with its notes as comments) or left out (a comment only).
fn one(mut o: Value, istio_root: &str, root: &str) -> Result<String, FromIstioError> {
    let api = str_of(&o, &["apiVersion"]).to_owned();
    let kind = str_of(&o, &["kind"]).to_owned();
    let ns = str_of(&o, &["metadata", "namespace"]).to_owned();
    let name = str_of(&o, &["metadata", "name"]).to_owned();
    let what = format!(
        "{kind} {}{name}",
        if ns.is_empty() {
            String::new()
        } else {
            format!("{ns}/")
        }
    );
    if !ISTIO_VERSIONS.contains(&api.as_str())
        || !matches!(kind.as_str(), "AuthorizationPolicy" | "PeerAuthentication")
    {
        return Ok(comment(&[format!(
            "left out {what} ({api}): only security.istio.io AuthorizationPolicy and PeerAuthentication are converted"
        )]));
    }
    if ns == root && ns != istio_root {
        return Err(FromIstioError::InOurRoot {
            what,
            root: root.to_owned(),
        });
    }
    let Value::Object(m) = &mut o else {
        return Ok(comment(&[format!(
            "left out {what} ({api}): not a mapping"
        )]));
    };
    let mut notes = vec![format!("apiVersion {api} → {API_VERSION}")];
    m.insert("apiVersion".into(), API_VERSION.into());
    if m.shift_remove("status").is_some() {
        notes.push("status removed (the daemons write their own condition)".into());
    }
    let meta = m
        .entry("metadata")
        .or_insert_with(|| Value::Object(Mapping::new()));
    if let Value::Object(meta) = meta {
        let created = meta.get("creationTimestamp").and_then(Value::as_str);
        if let Some(t) = created
            .filter(|_| kind == "PeerAuthentication")
            .map(str::to_owned)
        {
            let annotations = meta
                .entry("annotations")
                .or_insert_with(|| Value::Object(Mapping::new()));
            if let Value::Object(a) = annotations {
                a.insert(CREATED_ANNOTATION.into(), t.clone().into());
                notes.push(format!(
                    "creationTimestamp {t} kept as {CREATED_ANNOTATION}: the oldest PeerAuthentication wins, as in Istio"
                ));
            }
        }
        let mut removed: Vec<&str> = SERVER_SET
            .iter()
            .copied()
            .filter(|k| meta.shift_remove(*k).is_some())
            .collect();
        if let Some(Value::Object(a)) = meta.get_mut("annotations") {
            if a.shift_remove(LAST_APPLIED).is_some() {
                removed.push(LAST_APPLIED);
            }
            if a.is_empty() {
                meta.shift_remove("annotations");
            }
        }
        if !removed.is_empty() {
            notes.push(format!(
                "set by the API server, removed: {}",
                removed.join(", ")
            ));
        }
        if ns == istio_root {
            meta.insert("namespace".into(), root.into());
            notes.push(format!(
                "namespace {istio_root} (Istio's root namespace) → {root} (ztunnel's root namespace), so that it stays mesh-wide"
            ));
        } else if ns.is_empty() {
            notes.push(format!(
                "no namespace: it will be created in kubectl's current namespace (if that is {root}, it applies to the whole mesh)"
            ));
        }
    }
    if ns == istio_root {
        let qualified = qualify_service_accounts(m, istio_root);
        if !qualified.is_empty() {
            notes.push(format!(
                "service accounts named without a namespace, which mean {istio_root}'s: written as {}",
                qualified.join(", ")
            ));
        }
    }
    match PolicyObject::from_value(o.clone()) {
        Ok(p) => {
            let st = super::status_of(&p);
            if !st.message.is_empty() {
                notes.push(format!(
                    "enforced as Istio's ambient mode enforces it ({}): {}",
                    st.reason, st.message
                ));
            }
        }
        Err(e) => notes.push(format!("the daemon cannot read it: {e}")),
    }
    Ok(comment(&notes) + &crate::yaml::to_string(&o)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs(out: &str) -> Vec<Value> {
        serde_saphyr::from_multiple_with_options::<Value>(out, crate::yaml::options())
            .unwrap()
            .into_iter()
            .filter(|v| !v.is_null())
            .collect()
    }

    #[test]
    fn converts_istios_policies_and_says_what_changed() {
        let input = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-get
  namespace: web
  uid: 1234
  resourceVersion: "77"
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: "{}"
    team: a
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - to: [{operation: {methods: [GET], ports: ["8080"]}}]
status:
  validationMessages: []
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: web}
spec: {}
---
apiVersion: v1
kind: List
items:
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: deny-all, namespace: web}
  spec: {action: DENY, rules: [{}]}
"#;
        let out = convert(input, "istio-system", "ztunnel-system").unwrap();
        let d = docs(&out);
        assert_eq!(d.len(), 3, "{out}");
        for o in &d {
            assert_eq!(str_of(o, &["apiVersion"]), API_VERSION);
            PolicyObject::from_value(o.clone()).expect("ours parses it");
        }
        let allow = &d[0];
        assert!(allow.get("status").is_none());
        assert!(allow["metadata"].get("uid").is_none());
        assert!(allow["metadata"].get("resourceVersion").is_none());
        assert_eq!(
            allow["metadata"]["annotations"],
            serde_json::json!({"team": "a"})
        );
        assert_eq!(
            allow["spec"]["rules"][0]["to"][0]["operation"]["methods"][0], "GET",
            "the spec is kept as written"
        );
        assert_eq!(str_of(&d[1], &["metadata", "namespace"]), "ztunnel-system");
        assert_eq!(
            str_of(&d[2], &["metadata", "name"]),
            "deny-all",
            "List items are read"
        );
        for want in [
            "# ztunnel ctl convert: apiVersion security.istio.io/v1 → security.ztunnel.dev/v1",
            "# ztunnel ctl convert: apiVersion security.istio.io/v1beta1 → security.ztunnel.dev/v1",
            "# ztunnel ctl convert: status removed",
            "set by the API server, removed: uid, resourceVersion, kubectl.kubernetes.io/last-applied-configuration",
            "namespace istio-system (Istio's root namespace) → ztunnel-system",
            "left out RequestAuthentication web/jwt (security.istio.io/v1)",
            // The HTTP-only rule: what Istio's ambient conversion does to it.
            "enforced as Istio's ambient mode enforces it (UnsupportedValue)",
        ] {
            assert!(out.contains(want), "missing {want:?} in:\n{out}");
        }
    }

    /// Of PeerAuthentications with the same scope, Istio applies the oldest only: the others
    /// are left out, whatever the order of their names or in the input; those kept are
    /// written oldest first.
    #[test]
    fn peer_authentications_istio_never_applies_are_left_out() {
        let pa = |ns: &str, name: &str, created: &str, spec: &str| {
            format!("---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}{created}}}\nspec: {spec}\n")
        };
        let at = |t: &str| format!(", creationTimestamp: '{t}'");
        let input = [
            pa(
                "web",
                "aa-permissive",
                &at("2025-06-01T00:00:00Z"),
                "{mtls: {mode: PERMISSIVE}}",
            ),
            pa(
                "web",
                "zz-strict",
                &at("2023-01-01T00:00:00Z"),
                "{mtls: {mode: STRICT}}",
            ),
            pa(
                "web",
                "db",
                &at("2025-06-01T00:00:00Z"),
                "{selector: {matchLabels: {app: db}}, mtls: {mode: PERMISSIVE}}",
            ),
            pa(
                "web",
                "db-old",
                "",
                "{selector: {matchLabels: {app: db}}, mtls: {mode: STRICT}}",
            ),
            pa(
                "web",
                "api",
                &at("2025-06-01T00:00:00Z"),
                "{selector: {matchLabels: {app: api}}, mtls: {mode: PERMISSIVE}}",
            ),
            pa(
                "other",
                "only",
                &at("2025-06-01T00:00:00Z"),
                "{mtls: {mode: PERMISSIVE}}",
            ),
        ]
        .concat();
        let out = convert(&input, "istio-system", "ztunnel-system").unwrap();
        let names: Vec<String> = docs(&out)
            .iter()
            .map(|d| str_of(d, &["metadata", "name"]).to_owned())
            .collect();
        assert_eq!(names, ["db-old", "zz-strict", "api", "only"], "{out}");
        for want in [
            "left out PeerAuthentication web/aa-permissive: Istio applies only the oldest PeerAuthentication of the same namespace and selector, web/zz-strict (created 2023-01-01T00:00:00Z)",
            "left out PeerAuthentication web/db: Istio applies only the oldest PeerAuthentication of the same namespace and selector, web/db-old (no creation time)",
        ] {
            assert!(out.contains(want), "missing {want:?} in:\n{out}");
        }
    }

    #[test]
    fn other_objects_are_left_out_and_bad_yaml_is_an_error() {
        let out = convert(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n---\n",
            "istio-system",
            "ztunnel-system",
        )
        .unwrap();
        assert!(docs(&out).is_empty(), "{out}");
        assert!(out.contains("left out ConfigMap x (v1)"), "{out}");
        assert!(convert("a: [b", "istio-system", "ztunnel-system").is_err());
        assert_eq!(convert("", "istio-system", "ztunnel-system").unwrap(), "");
    }

    #[test]
    fn names_cannot_break_out_of_a_comment() {
        let input = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: \"x\\r\\nkind: Secret\\u2028a: b\"}\n";
        let out = convert(input, "istio-system", "ztunnel-system").unwrap();
        assert!(docs(&out).is_empty(), "{out}");
        assert_eq!(
            out.lines().count(),
            2,
            "the separator and one comment: {out}"
        );
        assert!(
            out.contains(r"x\u{d}\u{a}kind: Secret\u{2028}a: b"),
            "{out}"
        );
    }

    /// An Istio object in a namespace that has the name of our root namespace (and is not
    /// Istio's root) applies there to that namespace alone; in ours it would apply to the
    /// whole mesh, so the conversion fails, naming it. Converted with another root, it stays
    /// where it was.
    #[test]
    fn an_object_in_a_namespace_named_as_our_root_is_refused() {
        let input = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-monitoring, namespace: ztunnel-system}
spec: {rules: [{from: [{source: {namespaces: [monitoring]}}]}]}
";
        let e = convert(input, "istio-system", "ztunnel-system").unwrap_err();
        assert!(
            matches!(&e, FromIstioError::InOurRoot { what, root }
                if what == "AuthorizationPolicy ztunnel-system/allow-monitoring" && root == "ztunnel-system"),
            "{e}"
        );
        let out = convert(input, "istio-system", "mesh-root").unwrap();
        assert_eq!(docs(&out)[0]["metadata"]["namespace"], "ztunnel-system");
        // Istio's root is moved, even where both roots have one name.
        let out = convert(
            &input.replace("ztunnel-system", "istio-system"),
            "istio-system",
            "istio-system",
        )
        .unwrap();
        assert_eq!(docs(&out)[0]["metadata"]["namespace"], "istio-system");
    }

    /// A bare service account of a policy in Istio's root namespace names one of that
    /// namespace: moved to ours, it is written with its namespace, so that it still denies
    /// the same client.
    #[test]
    fn bare_service_accounts_keep_their_namespace_when_moved_to_our_root() {
        let input = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-legacy, namespace: istio-system}
spec:
  action: DENY
  rules: [{from: [{source: {serviceAccounts: [legacy-client, other/x]}}, {source: {notServiceAccounts: [gw]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: here, namespace: web}
spec: {rules: [{from: [{source: {serviceAccounts: [client]}}]}]}
";
        let out = convert(input, "istio-system", "ztunnel-system").unwrap();
        let d = docs(&out);
        let source = |i: usize, j: usize| d[i]["spec"]["rules"][0]["from"][j]["source"].clone();
        assert_eq!(
            source(0, 0)["serviceAccounts"],
            serde_json::json!(["istio-system/legacy-client", "other/x"])
        );
        assert_eq!(
            source(0, 1)["notServiceAccounts"],
            serde_json::json!(["istio-system/gw"])
        );
        assert_eq!(
            source(1, 0)["serviceAccounts"],
            serde_json::json!(["client"])
        );
        assert!(
            out.contains("written as istio-system/legacy-client, istio-system/gw"),
            "{out}"
        );
        let authz: Vec<_> = d
            .iter()
            .map(|v| match PolicyObject::from_value(v.clone()).unwrap() {
                PolicyObject::Authorization(a) => a,
                PolicyObject::PeerAuthentication(_) => unreachable!(),
            })
            .collect();
        let idx = crate::policy::PolicyIndex::build(&authz, &[], &["ztunnel-system"]);
        let no_labels = crate::labels::Labels::default();
        let denied = |principal: &str| {
            let c = crate::policy::Conn {
                src_principal: Some(principal),
                src_namespace: principal.split('/').nth(2),
                src_ip: "10.0.0.1".parse().unwrap(),
                dst_ip: "10.0.0.2".parse().unwrap(),
                dst_namespace: "db",
                dst_labels: &no_labels,
                dst_port: 80,
            };
            !idx.evaluate(&c).allowed
        };
        assert!(denied("cluster.local/ns/istio-system/sa/legacy-client"));
        // Excluded from the second clause, as `gw` of Istio's root namespace.
        assert!(!denied("cluster.local/ns/istio-system/sa/gw"));
    }

    /// Of two workload-level PeerAuthentications whose selectors overlap, Istio applies the
    /// older to the pods both select. Converted (and applied anew, in the same second), they
    /// keep that order by the annotation, not by their names.
    #[test]
    fn overlapping_peer_authentications_keep_their_order_by_age() {
        let input = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: z-web, namespace: web, creationTimestamp: '2023-01-01T00:00:00Z'}
spec: {selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: a-web-v2, namespace: web, creationTimestamp: '2025-01-01T00:00:00Z'}
spec: {selector: {matchLabels: {app: web, version: v2}}, mtls: {mode: PERMISSIVE}}
";
        let out = convert(input, "istio-system", "ztunnel-system").unwrap();
        let pas: Vec<_> = docs(&out)
            .into_iter()
            .map(|mut v| {
                // As `kubectl apply` creates them: at the same time.
                v["metadata"]["creationTimestamp"] = "2026-12-06T00:00:00Z".into();
                match PolicyObject::from_value(v).unwrap() {
                    PolicyObject::PeerAuthentication(p) => p,
                    PolicyObject::Authorization(_) => unreachable!(),
                }
            })
            .collect();
        assert_eq!(pas.len(), 2, "{out}");
        let idx = crate::policy::PolicyIndex::build(&[], &pas, &["ztunnel-system"]);
        let v2: crate::labels::Labels = [("app", "web"), ("version", "v2")]
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        assert_eq!(
            idx.mtls_mode("web", &v2, 80),
            super::super::objects::MtlsMode::Strict,
            "the older, STRICT, applies: {out}"
        );
    }

    /// A YAML tag is not part of the data (Kubernetes' YAML reader drops it too): a tagged
    /// object is read, and written back, as the mapping it tags.
    #[test]
    fn a_tagged_object_is_read_as_its_mapping() {
        let out = convert(
            "!x {apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: p, namespace: a}}",
            "istio-system",
            "ztunnel-system",
        )
        .unwrap();
        let d = docs(&out);
        assert_eq!(d.len(), 1, "{out}");
        assert_eq!(str_of(&d[0], &["apiVersion"]), API_VERSION);
        assert!(!out.contains("!x"), "{out}");
    }
}
