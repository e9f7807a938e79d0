//! Policy objects in their Kubernetes shape (`security.ztunnel.dev/v1`), with the L4 fields
//! of Istio's schema so existing policies port by changing `apiVersion`. Parsing only: the
//! engine that evaluates them is separate. Unknown spec fields are errors, so a policy never
//! silently means less than it says.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group and version of the policy resources.
pub const API_VERSION: &str = "security.ztunnel.dev/v1";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    pub name: String,
    pub namespace: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    /// Workloads whose labels include all of these.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// Peer identities `<trust-domain>/ns/<namespace>/sa/<service-account>`; `*` as prefix or suffix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    /// Namespaces of the peer identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// Source addresses or CIDRs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// Destination (target) ports, as strings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct From {
    pub source: Source,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct To {
    pub operation: Operation,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<From>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<To>,
}

#[derive(
    Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema, CustomResource,
)]
#[kube(
    group = "security.ztunnel.dev",
    version = "v1",
    kind = "AuthorizationPolicy",
    root = "AuthorizationPolicyResource",
    namespaced,
    derive = "PartialEq",
    category = "ztunnel",
    doc = "L4 identity-based access control for workloads (ALLOW or DENY), enforced by the destination's node daemon.",
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// The workloads it applies to; absent: the whole namespace (in `ztunnel-system`: the mesh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    /// DENY wins over ALLOW; once any ALLOW applies to a workload, what no ALLOW matches is denied.
    #[serde(default)]
    pub action: Action,
    /// A connection matches if any rule matches (every `from` and `to` of that rule).
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorizationPolicy {
    pub metadata: ObjectMeta,
    pub spec: AuthorizationPolicySpec,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    #[default]
    Unset,
    Strict,
    Permissive,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Mtls {
    /// STRICT refuses plaintext inbound; PERMISSIVE accepts it; UNSET inherits the namespace's,
    /// then the root namespace's (PERMISSIVE if none).
    #[serde(default)]
    pub mode: MtlsMode,
}

#[derive(
    Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema, CustomResource,
)]
#[kube(
    group = "security.ztunnel.dev",
    version = "v1",
    kind = "PeerAuthentication",
    root = "PeerAuthenticationResource",
    namespaced,
    derive = "PartialEq",
    category = "ztunnel",
    doc = "Whether workloads accept plaintext inbound traffic (PERMISSIVE) or only mutual TLS (STRICT).",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mtls.mode"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    /// The workloads it applies to; absent: the whole namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub mtls: Mtls,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAuthentication {
    pub metadata: ObjectMeta,
    pub spec: PeerAuthenticationSpec,
}

/// Any policy object, as it appears in a list of Kubernetes objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyObject {
    Authorization(AuthorizationPolicy),
    PeerAuthentication(PeerAuthentication),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    #[serde(default)]
    spec: serde_yaml::Value,
}

/// Fields of Istio's schema that need HTTP (or JWT) and so cannot be enforced at L4.
const HTTP_ONLY: &[&str] = &[
    "methods",
    "notMethods",
    "paths",
    "notPaths",
    "hosts",
    "notHosts",
    "requestPrincipals",
    "notRequestPrincipals",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
    "when",
];

/// The first HTTP-only field anywhere in `spec` (rules, sources, operations, conditions).
fn http_only_field(spec: &serde_yaml::Value) -> Option<&'static str> {
    match spec {
        serde_yaml::Value::Mapping(m) => m.iter().find_map(|(k, v)| {
            k.as_str()
                .and_then(|k| HTTP_ONLY.iter().find(|f| **f == k).copied())
                .or_else(|| http_only_field(v))
        }),
        serde_yaml::Value::Sequence(s) => s.iter().find_map(http_only_field),
        _ => None,
    }
}

impl PolicyObject {
    /// Parses one object, checking `apiVersion` and `kind`.
    pub fn from_value(v: serde_yaml::Value) -> Result<Self, String> {
        let raw: Raw = serde_yaml::from_value(v).map_err(|e| e.to_string())?;
        let what = format!(
            "{} {}/{}",
            raw.kind, raw.metadata.namespace, raw.metadata.name
        );
        if raw.api_version != API_VERSION {
            return Err(format!(
                "{what}: apiVersion {} is not {API_VERSION}",
                raw.api_version
            ));
        }
        if let Some(field) = http_only_field(&raw.spec) {
            return Err(format!(
                "{what}: `{field}` is an HTTP attribute that L4 policy cannot see; the policy is refused rather than enforced without it"
            ));
        }
        let spec = if raw.spec.is_null() {
            serde_yaml::Value::Mapping(Default::default())
        } else {
            raw.spec
        };
        match raw.kind.as_str() {
            "AuthorizationPolicy" => Ok(PolicyObject::Authorization(AuthorizationPolicy {
                spec: serde_yaml::from_value(spec).map_err(|e| format!("{what}: {e}"))?,
                metadata: raw.metadata,
            })),
            "PeerAuthentication" => Ok(PolicyObject::PeerAuthentication(PeerAuthentication {
                spec: serde_yaml::from_value(spec).map_err(|e| format!("{what}: {e}"))?,
                metadata: raw.metadata,
            })),
            other => Err(format!("{what}: unknown kind {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(y: &str) -> Result<PolicyObject, String> {
        PolicyObject::from_value(serde_yaml::from_str(y).unwrap())
    }

    #[test]
    fn parses_istio_shaped_policies() {
        let p = parse(
            "apiVersion: security.ztunnel.dev/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: demo, labels: {x: y}}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/a/sa/*], notNamespaces: [b], ipBlocks: [10.0.0.0/8]}}]
    to: [{operation: {ports: ['80'], notPorts: ['81']}}]
",
        )
        .unwrap();
        let PolicyObject::Authorization(a) = p else {
            panic!()
        };
        assert_eq!(a.spec.action, Action::Deny);
        assert_eq!(
            a.spec.rules[0].from[0].source.principals,
            ["cluster.local/ns/a/sa/*"]
        );
        assert_eq!(a.spec.rules[0].to[0].operation.not_ports, ["81"]);
        let p = parse(
            "apiVersion: security.ztunnel.dev/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: demo}
spec: {mtls: {mode: STRICT}}
",
        )
        .unwrap();
        let PolicyObject::PeerAuthentication(pa) = p else {
            panic!()
        };
        assert_eq!(pa.spec.mtls.mode, MtlsMode::Strict);
    }

    #[test]
    fn rejects_wrong_version_kind_and_unknown_fields() {
        for (y, want) in [
            ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: d}\n", "apiVersion"),
            ("apiVersion: security.ztunnel.dev/v1\nkind: Sidecar\nmetadata: {name: p, namespace: d}\n", "unknown kind"),
            (
                "apiVersion: security.ztunnel.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: d}\nspec: {rules: [{to: [{operation: {methods: [GET]}}]}]}\n",
                "`methods` is an HTTP attribute",
            ),
            (
                "apiVersion: security.ztunnel.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: d}\nspec: {rules: [{when: [{key: request.auth.principal, values: [y]}]}]}\n",
                "`when` is an HTTP attribute",
            ),
            (
                "apiVersion: security.ztunnel.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: d}\nspec: {rules: [{from: [{source: {principalz: [x]}}]}]}\n",
                "unknown field",
            ),
        ] {
            let e = parse(y).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }
}
