//! Policy objects in their Kubernetes shape (`security.ztunnel.dev/v1`), with the L4 fields
//! of Istio's schema so existing policies port by changing `apiVersion`. Parsing only: the
//! engine that evaluates them is separate. Unknown spec fields are errors, so a policy never
//! silently means less than it says.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of the policy resources.
pub const GROUP: &str = "security.ztunnel.dev";
/// The API group and version of the policy resources.
pub const API_VERSION: &str = "security.ztunnel.dev/v1";

/// A port as Istio's validation accepts it: decimal digits whose value is 0-65535 (leading
/// zeros allowed, no sign, no range).
pub const PORT_PATTERN: &str =
    r"^0*([0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$";
/// An IPv4 or IPv6 address (an IPv6 one may carry a zone, which is dropped, as Istio reads it),
/// or a CIDR block of either (the API server's rough check; the daemon parses each value and
/// fails the policy closed if it cannot).
pub const IP_BLOCK_PATTERN: &str = r"^(((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(/(3[0-2]|[12]?[0-9]))?|[0-9a-fA-F:.]*:[0-9a-fA-F:.]*(%[^/]+|/(12[0-8]|1[01][0-9]|[1-9]?[0-9]))?)$";

/// The Kubernetes metadata the engine reads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    pub namespace: String,
    /// RFC 3339 (`2024-05-01T10:00:00Z`): among several namespace-level (or mesh-level)
    /// PeerAuthentications the oldest wins, as in Istio. Absent sorts as oldest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    /// Read for `istio.io/dry-run`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Istio's own object (`security.istio.io`, read from the API server under the
    /// Istio-compatible setting); never read from a document.
    #[serde(skip_deserializing, skip_serializing_if = "std::ops::Not::not")]
    pub istio: bool,
}

/// The creation time of the Istio object a converted one was made from (`ztunnel ctl
/// convert`): it ranks objects created at the same time (one `kubectl apply` of the
/// converted file, within the second of the API server's timestamps), never before an
/// object created earlier, so that writing it cannot put a new object ahead of the ones
/// already there.
pub const CREATED_ANNOTATION: &str = "ztunnel.dev/istio-creation-timestamp";

impl ObjectMeta {
    /// The object's rank by age, oldest first: its creation time (`None`, a document without
    /// one, as oldest), then [`CREATED_ANNOTATION`] (absent after present), then its name.
    pub fn age(&self) -> impl Ord + '_ {
        let annotated = self.annotations.get(CREATED_ANNOTATION);
        (
            self.creation_timestamp.as_deref(),
            annotated.is_none(),
            annotated,
            &self.name,
        )
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    /// Workloads whose labels include all of these. In an AuthorizationPolicy, as in Istio's
    /// ambient mode, a selector without `matchLabels` selects no workload and an empty
    /// `matchLabels` every workload in scope; in a PeerAuthentication either is
    /// namespace-level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_labels: Option<BTreeMap<String, String>>,
}

impl Selector {
    /// A selector on these labels.
    pub fn labels<I: IntoIterator<Item = (String, String)>>(it: I) -> Selector {
        Selector {
            match_labels: Some(it.into_iter().collect()),
        }
    }
}

/// A reference to the object (a waypoint's Gateway, a Service, …) a policy binds to; such
/// policies are for waypoint proxies, never for the node daemon.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    /// Not enforced by the node daemon (as in Istio's ztunnel): the policy is ignored.
    Audit,
    /// Not enforced by the node daemon (as in Istio's ztunnel): the policy is ignored.
    Custom,
}

/// The external authorizer of a CUSTOM policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    #[serde(default)]
    pub name: String,
}

/// A list of strings in a policy; `ports` and `ipBlocks` lists are checked by the API server.
type Strings = Vec<String>;

/// The peer a rule matches. `serviceAccounts` and `notServiceAccounts` cannot be set beside
/// `principals`, `namespaces` or their `not` forms, even empty, as in Istio's CRD.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!(has(self.serviceAccounts) || has(self.notServiceAccounts)) || !(has(self.principals) || has(self.notPrincipals) || has(self.namespaces) || has(self.notNamespaces))",
    "message": "serviceAccounts and notServiceAccounts cannot be set with principals or namespaces",
}]))]
pub struct Source {
    /// Peer identities `<trust-domain>/ns/<namespace>/sa/<service-account>`; `*` alone, as
    /// prefix or as suffix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Strings,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Strings,
    /// JWT principals: HTTP, not enforced by the node daemon.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Strings,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Strings,
    /// Namespaces of the peer identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Strings,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Strings,
    /// Source addresses or CIDRs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = IP_BLOCK_PATTERN)))]
    pub ip_blocks: Strings,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = IP_BLOCK_PATTERN)))]
    pub not_ip_blocks: Strings,
    /// Client addresses from HTTP headers: not enforced by the node daemon.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = IP_BLOCK_PATTERN)))]
    pub remote_ip_blocks: Strings,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = IP_BLOCK_PATTERN)))]
    pub not_remote_ip_blocks: Strings,
    /// `serviceAccount` (in the policy's namespace) or `namespace/serviceAccount`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(max = 320)))]
    pub service_accounts: Strings,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(max = 320)))]
    pub not_service_accounts: Strings,
    /// Peer trust domains: Istio's ambient conversion ignores them, and so do we.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust_domains: Strings,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_trust_domains: Strings,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// Destination (target) ports, as strings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = PORT_PATTERN)))]
    pub ports: Strings,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = PORT_PATTERN)))]
    pub not_ports: Strings,
    /// HTTP: not enforced by the node daemon.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Strings,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Strings,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Strings,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Strings,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Strings,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Strings,
}

impl Operation {
    /// Its HTTP fields, by name: the node daemon enforces none of them.
    pub fn http_fields(&self) -> [(&'static str, &Strings); 6] {
        [
            ("hosts", &self.hosts),
            ("notHosts", &self.not_hosts),
            ("methods", &self.methods),
            ("notMethods", &self.not_methods),
            ("paths", &self.paths),
            ("notPaths", &self.not_paths),
        ]
    }
}

/// `when`: a condition on one attribute. The node daemon evaluates the L4 keys
/// (`source.ip`, `source.namespace`, `source.principal`, `destination.ip`,
/// `destination.port`); the others are HTTP attributes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Strings,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Strings,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct From {
    #[serde(default)]
    pub source: Source,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct To {
    #[serde(default)]
    pub operation: Operation,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<From>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<To>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

/// One condition of a policy's `status`: the node daemons keep `ZtunnelAccepted` current
/// (`discovery::kube::status`); it never changes what a policy means.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatusCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

/// A policy's `status` subresource.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<StatusCondition>,
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
    shortname = "ap",
    status = "ResourceStatus",
    doc = "L4 identity-based access control for workloads (Istio's AuthorizationPolicy schema), enforced by the destination's node daemon as Istio's ztunnel enforces it.",
    validation = kube::core::Rule::new("!has(self.spec) || ((has(self.spec.selector) ? 1 : 0) + (has(self.spec.targetRef) ? 1 : 0) + (has(self.spec.targetRefs) ? 1 : 0) <= 1)").message("only one of targetRefs or selector can be set"),
    validation = kube::core::Rule::new("!has(self.spec) || !has(self.spec.provider) || (has(self.spec.action) && self.spec.action == 'CUSTOM')").message("`provider` must not be with non CUSTOM action"),
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// The workloads it applies to; absent: the whole namespace (in the root namespace: the mesh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    /// Binds the policy to a waypoint: not for the node daemon, which then ignores the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<TargetRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub target_refs: Vec<TargetRef>,
    /// DENY wins over ALLOW; once any ALLOW applies to a workload, what no ALLOW matches is
    /// denied. AUDIT and CUSTOM are ignored by the node daemon.
    #[serde(default)]
    pub action: Action,
    /// The external authorizer of a CUSTOM policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<Provider>,
    /// A connection matches if any rule matches (every `from`, `to` and `when` of that rule).
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// An authorization policy as the engine reads it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorizationPolicy {
    pub metadata: ObjectMeta,
    pub spec: AuthorizationPolicySpec,
    /// Why the spec could not be read in full, when it could not: the policy then fails
    /// closed (an ALLOW matches nothing; any other action denies every connection to the
    /// workloads `spec.selector` covers). `spec` then holds only what could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Inherit: the namespace's mode, then the root namespace's (PERMISSIVE if none).
    #[default]
    Unset,
    /// Plaintext accepted (for the node daemon, as PERMISSIVE).
    Disable,
    Permissive,
    Strict,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Mtls {
    /// STRICT refuses plaintext inbound; PERMISSIVE and DISABLE accept it; UNSET inherits.
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
    shortname = "pa",
    status = "ResourceStatus",
    doc = "Whether workloads accept plaintext inbound traffic (PERMISSIVE, DISABLE) or only mutual TLS (STRICT), as Istio's PeerAuthentication.",
    validation = kube::core::Rule::new("!has(self.spec) || !has(self.spec.portLevelMtls) || (has(self.spec.selector) && has(self.spec.selector.matchLabels) && size(self.spec.selector.matchLabels) > 0)").message("mesh/namespace peer authentication cannot have port level mTLS"),
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mtls.mode"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    /// The workloads it applies to; absent or without labels: the whole namespace (in the
    /// root namespace: the mesh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub mtls: Mtls,
    /// Per target port (`"8080"`), for a policy with a selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_level_mtls: Option<BTreeMap<PortKey, Mtls>>,
}

/// A `portLevelMtls` key: the port as written (a string in JSON, a number or a string in
/// YAML); the engine parses it (1-65535) and fails the policy closed if it cannot.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct PortKey(pub String);

impl<'de> Deserialize<'de> for PortKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum K {
            N(u64),
            S(String),
        }
        Ok(PortKey(match K::deserialize(d)? {
            K::N(n) => n.to_string(),
            K::S(s) => s,
        }))
    }
}

impl JsonSchema for PortKey {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PortKey".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string"})
    }
}

/// A peer authentication as the engine reads it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAuthentication {
    pub metadata: ObjectMeta,
    pub spec: PeerAuthenticationSpec,
    /// Why the spec could not be read in full, when it could not: the policy then fails
    /// closed (STRICT on every port of the workloads `spec.selector` covers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid: Option<String>,
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
    spec: serde_json::Value,
}

/// Reads `v[key]` as `T`, if it is there and readable.
fn field<T: serde::de::DeserializeOwned>(v: &serde_json::Value, key: &str) -> Option<T> {
    v.get(key)
        .and_then(|f| serde_json::from_value(f.clone()).ok())
}

impl PolicyObject {
    /// Parses one object. `Err` only when the object cannot be identified (its `apiVersion`,
    /// `kind` or `metadata` is unusable). A spec that cannot be read in full still makes a
    /// policy, marked `invalid`, which fails closed: never dropped, never widened.
    pub fn from_value(v: serde_json::Value) -> Result<Self, String> {
        let raw: Raw = serde_json::from_value(v)
            .map_err(|e| format!("not a policy object (apiVersion, kind, metadata): {e}"))?;
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
        if raw.metadata.name.is_empty() || raw.metadata.namespace.is_empty() {
            return Err(format!("{what}: metadata needs a name and a namespace"));
        }
        let spec = if raw.spec.is_null() {
            serde_json::Value::Object(Default::default())
        } else {
            raw.spec
        };
        match raw.kind.as_str() {
            "AuthorizationPolicy" => {
                let (spec, invalid) = match serde_json::from_value(spec.clone()) {
                    Ok(s) => (s, None),
                    Err(e) => (
                        AuthorizationPolicySpec {
                            // Absent: ALLOW; unreadable: fails closed as a DENY.
                            action: match (spec.is_object(), spec.get("action")) {
                                (true, None) => Action::Allow,
                                _ => field(&spec, "action").unwrap_or(Action::Deny),
                            },
                            selector: field(&spec, "selector"),
                            // What makes it a waypoint's, never enforced here, when it has
                            // no selector beside it.
                            target_ref: field(&spec, "targetRef")
                                .filter(|_| spec.get("selector").is_none()),
                            target_refs: field(&spec, "targetRefs")
                                .filter(|_| spec.get("selector").is_none())
                                .unwrap_or_default(),
                            ..Default::default()
                        },
                        Some(format!("spec: {e}")),
                    ),
                };
                Ok(PolicyObject::Authorization(AuthorizationPolicy {
                    metadata: raw.metadata,
                    spec,
                    invalid,
                }))
            }
            "PeerAuthentication" => {
                let (spec, invalid) = match serde_json::from_value(spec.clone()) {
                    Ok(s) => (s, None),
                    Err(e) => (
                        PeerAuthenticationSpec {
                            selector: field(&spec, "selector"),
                            ..Default::default()
                        },
                        Some(format!("spec: {e}")),
                    ),
                };
                Ok(PolicyObject::PeerAuthentication(PeerAuthentication {
                    metadata: raw.metadata,
                    spec,
                    invalid,
                }))
            }
            other => Err(format!("{what}: unknown kind {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(y: &str) -> Result<PolicyObject, String> {
        PolicyObject::from_value(
            serde_saphyr::from_str_with_options(y, crate::yaml::options()).unwrap(),
        )
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
    fn refuses_only_what_cannot_be_identified() {
        for (y, want) in [
            ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: d}\n", "apiVersion"),
            ("apiVersion: security.ztunnel.dev/v1\nkind: Sidecar\nmetadata: {name: p, namespace: d}\n", "unknown kind"),
            ("apiVersion: security.ztunnel.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n", "namespace"),
            ("apiVersion: security.ztunnel.dev/v1\nkind: AuthorizationPolicy\nmetadata: 7\n", "metadata"),
        ] {
            let e = parse(y).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    /// Istio's v1 schema in full: HTTP fields, `when`, targetRefs, provider, portLevelMtls,
    /// DISABLE all parse (the engine decides what they mean for L4).
    #[test]
    fn every_istio_field_parses() {
        let p = parse(
            "apiVersion: security.ztunnel.dev/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: d, creationTimestamp: '2024-01-01T00:00:00Z', annotations: {istio.io/dry-run: 'false'}}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: wp}]
  action: CUSTOM
  provider: {name: ext}
  rules:
  - from: [{source: {requestPrincipals: ['*'], notRequestPrincipals: [x], remoteIpBlocks: [1.2.3.4], notRemoteIpBlocks: [1.2.3.5], serviceAccounts: [a], notServiceAccounts: [b/c], trustDomains: [td], notTrustDomains: [t2]}}]
    to: [{operation: {hosts: [a], notHosts: [b], methods: [GET], notMethods: [PUT], paths: [/], notPaths: [/x]}}]
    when: [{key: 'request.headers[x]', values: [y], notValues: [z]}]
",
        )
        .unwrap();
        let PolicyObject::Authorization(a) = p else {
            panic!()
        };
        assert_eq!(a.invalid, None);
        assert_eq!(a.spec.action, Action::Custom);
        assert_eq!(a.spec.rules[0].when[0].not_values, ["z"]);
        assert_eq!(
            a.metadata.creation_timestamp.as_deref(),
            Some("2024-01-01T00:00:00Z")
        );
        let p = parse(
            "apiVersion: security.ztunnel.dev/v1
kind: PeerAuthentication
metadata: {name: p, namespace: d}
spec: {selector: {matchLabels: {app: x}}, mtls: {mode: DISABLE}, portLevelMtls: {8080: {mode: STRICT}, '9090': {mode: PERMISSIVE}}}
",
        )
        .unwrap();
        let PolicyObject::PeerAuthentication(pa) = p else {
            panic!()
        };
        assert_eq!(pa.invalid, None);
        assert_eq!(pa.spec.mtls.mode, MtlsMode::Disable);
        let ports: Vec<&str> = pa
            .spec
            .port_level_mtls
            .as_ref()
            .unwrap()
            .keys()
            .map(|k| k.0.as_str())
            .collect();
        assert_eq!(ports, ["8080", "9090"]);
    }

    /// An unreadable spec keeps the policy, marked invalid, with what could be read.
    #[test]
    fn unreadable_specs_are_kept_as_invalid() {
        for (spec, action, selected) in [
            ("{action: DENY, selector: {matchLabels: {app: a}}, rules: [{from: [{source: {principalz: [x]}}]}]}", Action::Deny, true),
            ("{rules: [{to: [{operation: {ports: 80}}]}]}", Action::Allow, false),
            ("{action: MAYBE}", Action::Deny, false),
            ("[1, 2]", Action::Deny, false),
        ] {
            let y = format!("apiVersion: security.ztunnel.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: d}}\nspec: {spec}\n");
            let PolicyObject::Authorization(a) = parse(&y).unwrap() else {
                panic!()
            };
            assert!(a.invalid.is_some(), "{spec}");
            assert_eq!(a.spec.action, action, "{spec}");
            assert_eq!(a.spec.selector.is_some(), selected, "{spec}");
        }
    }
}
