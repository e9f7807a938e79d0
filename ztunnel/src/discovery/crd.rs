//! The policy CRDs (`security.ztunnel.dev/v1` `AuthorizationPolicy` and `PeerAuthentication`)
//! as Kubernetes types. The resources are derived (kube-derive) from the spec types in
//! [`super::policy`], so the fields are defined once and parsed by one set of serde rules; this
//! module generates the `CustomResourceDefinition`s with their OpenAPI schemas (schemars, made
//! structural by kube) and converts a resource into the engine's policy object.
//!
//! The checked-in [`CRDS_FILE`] is [`crds_yaml`]'s output, and a test here fails when it is
//! stale (regenerate with [`REGENERATE`]). `ztunnel crds` prints that file, embedded as
//! [`CRDS_YAML`], rather than generating it: the generator (schemars, the CRD types'
//! decoders, a YAML emitter) would otherwise be linked into the daemon, whose idle RSS is
//! mostly its own code.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::CustomResourceExt;

use super::policy;
pub use super::policy::{AuthorizationPolicyResource, PeerAuthenticationResource};

/// The generated CRD file, relative to the repository root.
pub const CRDS_FILE: &str = "deploy/base/crds/crds.yaml";
/// The command that regenerates [`CRDS_FILE`], from the repository root.
pub const REGENERATE: &str = "cargo run -p ztunnel --example crds > deploy/base/crds/crds.yaml";
/// [`CRDS_FILE`] as built in; equal to [`crds_yaml`] while the staleness test passes.
pub const CRDS_YAML: &str = include_str!("../../../deploy/base/crds/crds.yaml");

#[derive(Debug, thiserror::Error)]
#[error("cannot render the CRDs as YAML: {0}")]
pub struct CrdError(#[from] serde_saphyr::SerializeError);

/// The CustomResourceDefinitions of both policy kinds.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        AuthorizationPolicyResource::crd(),
        PeerAuthenticationResource::crd(),
    ]
}

/// [`crds`] as one multi-document YAML file, with a header saying where it comes from.
pub fn crds_yaml() -> Result<String, CrdError> {
    let mut out = format!(
        "# Generated from ztunnel/src/policy/objects.rs: do not edit.\n\
         # Regenerate from the repository root with: {REGENERATE}\n"
    );
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&crate::yaml::to_string(&crd)?);
    }
    Ok(out)
}

fn meta(m: &kube::core::ObjectMeta) -> policy::ObjectMeta {
    policy::ObjectMeta {
        name: m.name.clone().unwrap_or_default(),
        namespace: m.namespace.clone().unwrap_or_default(),
        creation_timestamp: m
            .creation_timestamp
            .as_ref()
            .and_then(|t| serde_json::to_value(t).ok())
            .and_then(|v| v.as_str().map(str::to_owned)),
        annotations: m
            .annotations
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        istio: false,
    }
}

impl AuthorizationPolicyResource {
    /// The engine's form of this resource.
    pub fn to_policy(&self) -> policy::AuthorizationPolicy {
        policy::AuthorizationPolicy {
            metadata: meta(&self.metadata),
            spec: self.spec.clone(),
            invalid: None,
        }
    }
}

impl PeerAuthenticationResource {
    /// The engine's form of this resource.
    pub fn to_policy(&self) -> policy::PeerAuthentication {
        policy::PeerAuthentication {
            metadata: meta(&self.metadata),
            spec: self.spec.clone(),
            invalid: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::discovery::policy::{Action, MtlsMode, PolicyObject};

    fn repo_file(rel: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(rel)
    }

    #[test]
    fn checked_in_crds_are_current() {
        let want = crds_yaml().unwrap();
        let path = repo_file(CRDS_FILE);
        let have = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; generate it with: {REGENERATE}", path.display()));
        if have != want {
            let line = have
                .lines()
                .zip(want.lines())
                .position(|(a, b)| a != b)
                .unwrap_or_else(|| have.lines().count().min(want.lines().count()))
                + 1;
            panic!(
                "{CRDS_FILE} is stale (first difference at line {line}); regenerate it from the \
                 repository root with: {REGENERATE}"
            );
        }
        assert_eq!(CRDS_YAML, have, "the embedded copy is the file");
    }

    /// Where `schema` breaks Kubernetes' structural-schema rules (stricter than the API server:
    /// no logical junctors at all, which these types never need).
    fn structural_violations(schema: &Value, path: &str, out: &mut Vec<String>) {
        let Some(obj) = schema.as_object() else {
            out.push(format!("{path}: not an object"));
            return;
        };
        for banned in [
            "$ref",
            "$defs",
            "definitions",
            "anyOf",
            "oneOf",
            "allOf",
            "not",
        ] {
            if obj.contains_key(banned) {
                out.push(format!("{path}: has {banned}"));
            }
        }
        let free = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
            || obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
        if !free && !obj.get("type").is_some_and(|t| t.is_string()) {
            out.push(format!("{path}: no type"));
        }
        if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
            out.push(format!("{path}: both properties and additionalProperties"));
        }
        if let Some(props) = obj.get("properties").and_then(Value::as_object) {
            for (k, v) in props {
                structural_violations(v, &format!("{path}.{k}"), out);
            }
        }
        for key in ["items", "additionalProperties"] {
            if let Some(v) = obj.get(key).filter(|v| v.is_object()) {
                structural_violations(v, &format!("{path}.{key}"), out);
            }
        }
    }

    fn schema_of(crd: &CustomResourceDefinition) -> Value {
        assert_eq!(crd.spec.versions.len(), 1);
        let v = &crd.spec.versions[0];
        assert_eq!((v.name.as_str(), v.served, v.storage), ("v1", true, true));
        serde_json::to_value(&v.schema.as_ref().unwrap().open_api_v3_schema).unwrap()
    }

    fn at<'a>(schema: &'a Value, path: &[&str]) -> &'a Value {
        path.iter().fold(schema, |s, p| &s[p])
    }

    fn enum_values(schema: &Value) -> Vec<String> {
        assert_eq!(schema["type"], "string", "{schema}");
        let mut v: Vec<String> = schema["enum"]
            .as_array()
            .unwrap_or_else(|| panic!("not an enum: {schema}"))
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        v.sort();
        v
    }

    fn serialized<T: serde::Serialize>(values: &[T]) -> Vec<String> {
        let mut v: Vec<String> = values
            .iter()
            .map(|v| {
                serde_json::to_value(v)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn names_scope_and_structural_schemas() {
        let cases = [
            ("AuthorizationPolicy", "authorizationpolicies", "Action"),
            ("PeerAuthentication", "peerauthentications", "Mode"),
        ];
        let all = crds();
        assert_eq!(all.len(), cases.len());
        for (crd, (kind, plural, column)) in all.iter().zip(cases) {
            assert_eq!(crd.spec.group, "security.ztunnel.dev");
            assert_eq!(crd.spec.scope, "Namespaced");
            assert_eq!(crd.spec.names.kind, kind);
            assert_eq!(crd.spec.names.plural, plural);
            assert_eq!(
                crd.metadata.name.as_deref(),
                Some(format!("{plural}.security.ztunnel.dev").as_str())
            );
            let columns = crd.spec.versions[0]
                .additional_printer_columns
                .clone()
                .unwrap_or_default();
            assert!(columns.iter().any(|c| c.name == column), "{kind}");
            let schema = schema_of(crd);
            let mut bad = Vec::new();
            structural_violations(&schema, kind, &mut bad);
            assert!(bad.is_empty(), "{kind} is not structural: {bad:?}");
            let spec = at(&schema, &["properties", "spec"]);
            assert_eq!(spec["type"], "object", "{kind}");
        }
    }

    #[test]
    fn enums_are_schema_enums_with_the_parsers_spellings() {
        let [ap, pa] = [&crds()[0], &crds()[1]].map(schema_of);
        let action = at(&ap, &["properties", "spec", "properties", "action"]);
        assert_eq!(
            enum_values(action),
            serialized(&[Action::Allow, Action::Deny, Action::Audit, Action::Custom])
        );
        assert_eq!(action["default"], "ALLOW");
        let mode = at(
            &pa,
            &[
                "properties",
                "spec",
                "properties",
                "mtls",
                "properties",
                "mode",
            ],
        );
        assert_eq!(
            enum_values(mode),
            serialized(&[
                MtlsMode::Unset,
                MtlsMode::Disable,
                MtlsMode::Permissive,
                MtlsMode::Strict
            ])
        );
        // The source's fields are exactly the parser's (deny_unknown_fields).
        let source = at(
            &ap,
            &[
                "properties",
                "spec",
                "properties",
                "rules",
                "items",
                "properties",
                "from",
                "items",
                "properties",
                "source",
                "properties",
            ],
        );
        let mut fields: Vec<&str> = source.as_object().unwrap().keys().map(|k| &**k).collect();
        fields.sort_unstable();
        assert_eq!(
            fields,
            [
                "ipBlocks",
                "namespaces",
                "notIpBlocks",
                "notNamespaces",
                "notPrincipals",
                "notRemoteIpBlocks",
                "notRequestPrincipals",
                "notServiceAccounts",
                "notTrustDomains",
                "principals",
                "remoteIpBlocks",
                "requestPrincipals",
                "serviceAccounts",
                "trustDomains"
            ]
        );
    }

    /// Istio's CRDs: short names `ap`/`pa`, a status subresource, and checks the API server
    /// can make (istio/istio `manifests/charts/base/files/crd-all.gen.yaml`,
    /// `pkg/config/validation/validation.go`).
    #[test]
    fn short_names_status_and_server_side_checks() {
        let all = crds();
        for (crd, short) in all.iter().zip(["ap", "pa"]) {
            assert_eq!(
                crd.spec.names.short_names.clone().unwrap_or_default(),
                [short.to_string()]
            );
            let v = &crd.spec.versions[0];
            assert!(v.subresources.as_ref().unwrap().status.is_some());
            let schema = schema_of(crd);
            let conditions = at(
                &schema,
                &["properties", "status", "properties", "conditions"],
            );
            assert_eq!(conditions["type"], "array", "{short}");
            let rules = serde_json::to_string(&schema["x-kubernetes-validations"]).unwrap();
            assert!(rules.contains("rule"), "{short}: {rules}");
        }
        let ap = schema_of(&all[0]);
        let op = at(
            &ap,
            &[
                "properties",
                "spec",
                "properties",
                "rules",
                "items",
                "properties",
                "to",
                "items",
                "properties",
                "operation",
                "properties",
            ],
        );
        for f in ["ports", "notPorts"] {
            assert_eq!(op[f]["items"]["pattern"], policy::PORT_PATTERN, "{f}");
        }
        let src = at(
            &ap,
            &[
                "properties",
                "spec",
                "properties",
                "rules",
                "items",
                "properties",
                "from",
                "items",
                "properties",
                "source",
                "properties",
            ],
        );
        for f in [
            "ipBlocks",
            "notIpBlocks",
            "remoteIpBlocks",
            "notRemoteIpBlocks",
        ] {
            assert_eq!(src[f]["items"]["pattern"], policy::IP_BLOCK_PATTERN, "{f}");
        }
        let rules = serde_json::to_string(&ap["x-kubernetes-validations"]).unwrap();
        assert!(rules.contains("targetRef"), "{rules}");
    }

    #[test]
    fn resources_and_the_file_parser_agree() {
        let cases = [
            "apiVersion: security.ztunnel.dev/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: demo}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/a/sa/x], notIpBlocks: [10.0.0.0/8]}}]
    to: [{operation: {ports: ['80']}}]
",
            "apiVersion: security.ztunnel.dev/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: demo}
spec: {}
",
            "apiVersion: security.ztunnel.dev/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: demo}
spec: {mtls: {mode: STRICT}}
",
        ];
        for y in cases {
            let value: serde_json::Value =
                serde_saphyr::from_str_with_options(y, crate::yaml::options()).unwrap();
            let parsed = PolicyObject::from_value(value.clone()).unwrap();
            let via_resource = match &parsed {
                PolicyObject::Authorization(_) => PolicyObject::Authorization(
                    serde_json::from_value::<AuthorizationPolicyResource>(value)
                        .unwrap()
                        .to_policy(),
                ),
                PolicyObject::PeerAuthentication(_) => PolicyObject::PeerAuthentication(
                    serde_json::from_value::<PeerAuthenticationResource>(value)
                        .unwrap()
                        .to_policy(),
                ),
            };
            assert_eq!(parsed, via_resource, "{y}");
        }
        // The resource types refuse unknown spec fields, as the file parser does.
        let bad = "apiVersion: security.ztunnel.dev/v1
kind: PeerAuthentication
metadata: {name: x, namespace: demo}
spec: {mtls: {mode: STRICT}, portLevelMtlz: {}}
";
        assert!(
            serde_saphyr::from_str_with_options::<PeerAuthenticationResource>(
                bad,
                crate::yaml::options()
            )
            .is_err()
        );
    }
}
