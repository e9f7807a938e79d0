//! Which waypoint proxy Istio sends a Service's or a pod's traffic through, under the
//! Istio-compatible setting, decided as istiod decides it. The daemons have no waypoint: the
//! outbound plan refuses what Istio would send through one, since the policies bound to it
//! (`targetRefs`) would otherwise be bypassed.
//!
//! - A Service names a waypoint by its `istio.io/use-waypoint` label, else its namespace's;
//!   a pod likewise, by its own label, else its namespace's. `none` (or an empty value) on the
//!   object opts it out whatever its namespace says. The waypoint is in the labelled object's
//!   namespace unless its `istio.io/use-waypoint-namespace` label names another.
//! - A waypoint is a Gateway API `Gateway` that is ready (it has `status.addresses`). What it
//!   takes is its `istio.io/waypoint-for` label, else its GatewayClass's, else `service`:
//!   `service`, `workload` or `all` (anything else: nothing). A ready Gateway whose class is
//!   not known (yet) and that says nothing itself is taken to take every kind. Traffic to an
//!   object whose waypoint does not take that kind of traffic goes directly, as in Istio.
//! - A waypoint of another namespace than the object's counts only if its listeners let the
//!   object's namespace attach (`allowedRoutes.namespaces`: `Same` when not said, `All`, or
//!   a `Selector` of namespace labels); otherwise the object's traffic goes directly, as in
//!   Istio. Istio reads one listener (the HBONE one on 15008, or the one an inbound binding
//!   names); here a namespace any listener lets attach counts, the waypoint's own always, and
//!   so does a namespace not seen yet (fail closed).
//! - A Service that is a waypoint's own (`gateway.istio.io/managed` set by Istio to
//!   `istio.io-mesh-controller`, or `istio.io-eastwest-controller` for an east-west gateway)
//!   has none; nor has a pod whose `gateway.networking.k8s.io/gateway-name` label names a
//!   ready waypoint of its own namespace (a waypoint's replica).
//!
//! The addresses of Istio's ServiceEntries and WorkloadEntries, which name waypoints by the
//! same labels (egress waypoints), are Services' and workloads' alike
//! ([`super::istio_entries`]).
//!
//! Fail closed where Istio is not: a waypoint that is named but not known to be ready (its
//! Gateway not found or not ready yet, the Gateway API not served) is taken to take every
//! kind of traffic, so what names it is refused where Istio would reach it directly.

use std::collections::HashMap;

use super::Labels;

/// Istio's label that sends a Service's traffic (or a namespace's Services'), or a pod's,
/// through a waypoint proxy, read under the Istio-compatible setting; `none` opts out.
pub const ISTIO_USE_WAYPOINT: &str = "istio.io/use-waypoint";
/// The namespace of the waypoint an `istio.io/use-waypoint` label names, when not the
/// labelled object's.
pub const ISTIO_USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
/// On a Gateway or its GatewayClass: what traffic the waypoint takes.
pub const ISTIO_WAYPOINT_FOR: &str = "istio.io/waypoint-for";
/// On a Gateway's pods: the Gateway they are replicas of.
pub const GATEWAY_NAME: &str = "gateway.networking.k8s.io/gateway-name";
/// Set by Istio on the objects of a gateway it deploys.
pub const ISTIO_GATEWAY_MANAGED: &str = "gateway.istio.io/managed";

/// `gateway.istio.io/managed` values of a waypoint's and an east-west gateway's Service.
const MANAGED_GATEWAYS: [&str; 2] = ["istio.io-mesh-controller", "istio.io-eastwest-controller"];

/// The kind of traffic a waypoint may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traffic {
    /// Addressed to a Service.
    Service,
    /// Addressed to a pod directly.
    Workload,
}

/// What traffic a ready waypoint takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Serves {
    pub services: bool,
    pub workloads: bool,
}

impl Serves {
    /// Every kind of traffic.
    pub const ALL: Serves = Serves {
        services: true,
        workloads: true,
    };

    /// From an `istio.io/waypoint-for` value.
    pub fn parse(v: &str) -> Serves {
        Serves {
            services: matches!(v, "service" | "all"),
            workloads: matches!(v, "workload" | "all"),
        }
    }

    /// From the Gateway's and its GatewayClass's labels (`service` when neither says).
    pub fn of(gateway: Option<&str>, class: Option<&str>) -> Serves {
        Serves::parse(gateway.or(class).unwrap_or("service"))
    }

    fn takes(self, t: Traffic) -> bool {
        match t {
            Traffic::Service => self.services,
            Traffic::Workload => self.workloads,
        }
    }
}

/// What an object's own labels say of its waypoint.
#[derive(Clone, Copy, Debug, Default)]
pub struct UseWaypoint<'a> {
    /// `istio.io/use-waypoint`.
    pub name: Option<&'a str>,
    /// `istio.io/use-waypoint-namespace`.
    pub namespace: Option<&'a str>,
    /// A pod's `gateway.networking.k8s.io/gateway-name`: the Gateway it is a replica of.
    pub gateway: Option<&'a str>,
}

impl<'a> UseWaypoint<'a> {
    /// From a pod's labels.
    pub fn of(get: impl Fn(&str) -> Option<&'a str>) -> UseWaypoint<'a> {
        UseWaypoint {
            name: get(ISTIO_USE_WAYPOINT),
            namespace: get(ISTIO_USE_WAYPOINT_NAMESPACE),
            gateway: get(GATEWAY_NAME),
        }
    }
}

/// Which namespaces one of a Gateway's listeners lets attach (its
/// `allowedRoutes.namespaces`), as Istio reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attach {
    All,
    /// The Gateway's own namespace only (also what Istio makes of `None` and of no rule).
    Same,
    /// The namespaces whose labels match (`None`: a listener without a selector, which
    /// matches none).
    Selector(Option<Selector>),
}

impl Attach {
    /// From a listener's `allowedRoutes.namespaces` (JSON).
    pub fn parse(namespaces: &serde_json::Value) -> Attach {
        match namespaces["from"].as_str() {
            Some("All") => Attach::All,
            Some("Selector") => {
                let s = &namespaces["selector"];
                Attach::Selector((!s.is_null()).then(|| Selector::parse(s)))
            }
            _ => Attach::Same,
        }
    }
}

/// A Kubernetes label selector (`matchLabels`, `matchExpressions`). One that Kubernetes
/// would refuse (an unknown operator, `In` or `NotIn` without values, `Exists` or
/// `DoesNotExist` with some, a value that is not a string) matches every namespace: the
/// waypoint then counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    /// (key, operator, values) for each `matchLabels` pair (`In` one value) and expression;
    /// `None`: unreadable.
    requirements: Option<Vec<(String, String, Vec<String>)>>,
}

impl Selector {
    pub fn parse(v: &serde_json::Value) -> Selector {
        let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
        let mut reqs = Vec::new();
        for (k, v) in v["matchLabels"].as_object().into_iter().flatten() {
            let Some(v) = text(v) else {
                return Selector { requirements: None };
            };
            reqs.push((k.clone(), "In".to_owned(), vec![v]));
        }
        for e in v["matchExpressions"].as_array().into_iter().flatten() {
            let (Some(key), Some(op)) = (text(&e["key"]), text(&e["operator"])) else {
                return Selector { requirements: None };
            };
            let values: Option<Vec<String>> = (e["values"].as_array().into_iter().flatten())
                .map(text)
                .collect();
            let Some(values) = values else {
                return Selector { requirements: None };
            };
            let valid = match op.as_str() {
                "In" | "NotIn" => !values.is_empty(),
                "Exists" | "DoesNotExist" => values.is_empty(),
                _ => false,
            };
            if !valid {
                return Selector { requirements: None };
            }
            reqs.push((key, op, values));
        }
        Selector {
            requirements: Some(reqs),
        }
    }

    fn matches(&self, labels: &Labels) -> bool {
        let Some(reqs) = &self.requirements else {
            return true;
        };
        reqs.iter().all(|(key, op, values)| {
            let v = labels.get(key);
            let listed = v.is_some_and(|v| values.iter().any(|x| **x == **v));
            match op.as_str() {
                "In" => listed,
                "NotIn" => !listed,
                "Exists" => v.is_some(),
                _ => v.is_none(),
            }
        })
    }
}

/// A ready waypoint: what it takes, and which namespaces its listeners let attach (a
/// namespace any of them lets counts, and always its own: a superset of the one listener
/// Istio reads).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Waypoint {
    serves: Serves,
    attach: Box<[Attach]>,
}

/// The ready waypoints, by `namespace/name`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Waypoints(HashMap<Box<str>, Waypoint>);

impl Waypoints {
    /// A waypoint that lets every namespace attach.
    pub fn insert(&mut self, namespace: &str, name: &str, serves: Serves) {
        self.insert_attach(namespace, name, serves, vec![Attach::All]);
    }

    /// A waypoint whose listeners let `attach` attach.
    pub fn insert_attach(
        &mut self,
        namespace: &str,
        name: &str,
        serves: Serves,
        attach: Vec<Attach>,
    ) {
        let w = Waypoint {
            serves,
            attach: attach.into(),
        };
        self.0.insert(format!("{namespace}/{name}").into(), w);
    }

    /// The waypoint (`namespace/name`) that `traffic` to an object of namespace `object_ns`
    /// goes through: `own` is what the object's labels say, `ns` its namespace's labels. A
    /// ready waypoint's own replica has none.
    pub fn through(
        &self,
        traffic: Traffic,
        object_ns: &str,
        own: UseWaypoint<'_>,
        ns: Option<&Labels>,
    ) -> Option<String> {
        let replica = |g: &str| self.0.contains_key(&*format!("{object_ns}/{g}"));
        if own.gateway.is_some_and(replica) {
            return None;
        }
        let opted_out = |v: &str| v.is_empty() || v == "none";
        let (name, namespace) = match own.name {
            Some(v) if opted_out(v) => return None,
            Some(v) => (v, own.namespace),
            None => {
                let ns = ns?;
                let v = ns.get(ISTIO_USE_WAYPOINT).filter(|v| !opted_out(v))?;
                (&**v, ns.get(ISTIO_USE_WAYPOINT_NAMESPACE).map(|v| &**v))
            }
        };
        let waypoint_ns = namespace.unwrap_or(object_ns);
        let named = format!("{waypoint_ns}/{name}");
        let Some(w) = self.0.get(&*named) else {
            return Some(named);
        };
        let admits = waypoint_ns == object_ns
            || w.attach.iter().any(|a| match a {
                Attach::All => true,
                Attach::Same => false,
                // A namespace not seen yet may match (fail closed).
                Attach::Selector(Some(s)) => ns.is_none_or(|ns| s.matches(ns)),
                Attach::Selector(None) => false,
            });
        (w.serves.takes(traffic) && admits).then_some(named)
    }
}

/// Whether label `key` is one a pod's waypoint is decided by.
pub fn decides_waypoint(key: &str) -> bool {
    [
        ISTIO_USE_WAYPOINT,
        ISTIO_USE_WAYPOINT_NAMESPACE,
        GATEWAY_NAME,
    ]
    .contains(&key)
}

/// The `istio.io/use-waypoint` value a Service is kept with, from its labels (`get`): its
/// label, but `none` for a waypoint's or an east-west gateway's own Service, labelled or
/// not.
pub fn service_label<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Option<&'a str> {
    match get(ISTIO_GATEWAY_MANAGED) {
        Some(m) if MANAGED_GATEWAYS.contains(&m) => Some("none"),
        _ => get(ISTIO_USE_WAYPOINT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The waypoint a Service's or a pod's traffic goes through: named by the object, else its
    /// namespace; in another namespace by `istio.io/use-waypoint-namespace`; refused unless
    /// the waypoint is known not to take that traffic.
    #[test]
    fn the_waypoint_istio_would_use() {
        let mut known = Waypoints::default();
        known.insert("w", "svc-wp", Serves::of(None, None));
        known.insert("w", "wl-wp", Serves::of(Some("workload"), Some("all")));
        known.insert("w", "all-wp", Serves::of(None, Some("all")));
        known.insert("w", "no-wp", Serves::of(Some("none"), None));
        known.insert("infra", "shared", Serves::of(Some("workload"), None));
        let ns = |pairs: &[(&str, &str)]| Labels::of(pairs);
        let labelled = |v| ns(&[(ISTIO_USE_WAYPOINT, v)]);
        use Traffic::{Service as S, Workload as W};
        type Own<'a> = (Option<&'a str>, Option<&'a str>);
        let cases: &[(Traffic, Own<'_>, Labels, Option<&str>)] = &[
            // Named by the namespace.
            (S, (None, None), labelled("svc-wp"), Some("w/svc-wp")),
            (W, (None, None), labelled("svc-wp"), None),
            (S, (None, None), labelled("wl-wp"), None),
            (W, (None, None), labelled("wl-wp"), Some("w/wl-wp")),
            (S, (None, None), labelled("all-wp"), Some("w/all-wp")),
            (W, (None, None), labelled("all-wp"), Some("w/all-wp")),
            (S, (None, None), labelled("no-wp"), None),
            (W, (None, None), labelled("none"), None),
            (W, (None, None), labelled(""), None),
            (W, (None, None), ns(&[]), None),
            // Not known ready: fail closed.
            (S, (None, None), labelled("missing"), Some("w/missing")),
            (W, (None, None), labelled("missing"), Some("w/missing")),
            // Named by the object, which wins over its namespace.
            (W, (Some("wl-wp"), None), ns(&[]), Some("w/wl-wp")),
            (W, (Some("svc-wp"), None), labelled("wl-wp"), None),
            (W, (Some("none"), None), labelled("wl-wp"), None),
            (S, (Some(""), None), labelled("svc-wp"), None),
            (
                S,
                (Some("missing"), None),
                labelled("no-wp"),
                Some("w/missing"),
            ),
            // In another namespace.
            (
                W,
                (Some("shared"), Some("infra")),
                ns(&[]),
                Some("infra/shared"),
            ),
            (W, (Some("shared"), None), ns(&[]), Some("w/shared")),
            (S, (Some("shared"), Some("infra")), ns(&[]), None),
            (
                W,
                (None, None),
                ns(&[
                    (ISTIO_USE_WAYPOINT, "shared"),
                    (ISTIO_USE_WAYPOINT_NAMESPACE, "infra"),
                ]),
                Some("infra/shared"),
            ),
            // The object's namespace override does not move its namespace's waypoint.
            (W, (None, Some("infra")), labelled("wl-wp"), Some("w/wl-wp")),
        ];
        for (i, (traffic, (name, namespace), labels, want)) in cases.iter().enumerate() {
            let own = UseWaypoint {
                name: *name,
                namespace: *namespace,
                gateway: None,
            };
            let got = known.through(*traffic, "w", own, Some(labels));
            assert_eq!(
                got.as_deref(),
                *want,
                "case {i}: {traffic:?} {own:?} {labels:?}"
            );
        }
        let none = UseWaypoint::default();
        assert_eq!(known.through(W, "w", none, None), None);
        // A ready waypoint's own replica has none; a pod naming a Gateway that is not ready
        // (or not a waypoint) is no replica.
        let replica = |g| UseWaypoint {
            gateway: Some(g),
            ..none
        };
        let all = labelled("all-wp");
        assert_eq!(known.through(W, "w", replica("all-wp"), Some(&all)), None);
        assert_eq!(
            known
                .through(W, "w", replica("other"), Some(&all))
                .as_deref(),
            Some("w/all-wp")
        );
        assert_eq!(
            known
                .through(W, "x", replica("all-wp"), Some(&all))
                .as_deref(),
            Some("x/all-wp"),
            "a replica of a Gateway of another namespace"
        );
    }

    /// A waypoint in another namespace counts only for the namespaces its listeners let
    /// attach (`allowedRoutes.namespaces`: `Same` when not said, `All`, or a `Selector` of
    /// namespace labels); any listener's leave counts, and the waypoint's own namespace always
    /// does. Otherwise the object's traffic goes directly, as in Istio.
    #[test]
    fn a_waypoint_counts_for_the_namespaces_it_lets_attach() {
        use serde_json::json;
        let selector =
            |s: serde_json::Value| Attach::parse(&json!({"from": "Selector", "selector": s}));
        let team_a = Labels::of(&[("team", "a"), ("tier", "web")]);
        let team_b = Labels::of(&[("team", "b")]);
        let cases: Vec<(Vec<Attach>, Option<&Labels>, bool)> = vec![
            (vec![Attach::parse(&json!(null))], Some(&team_a), false),
            (
                vec![Attach::parse(&json!({"from": "Same"}))],
                Some(&team_a),
                false,
            ),
            (
                vec![Attach::parse(&json!({"from": "None"}))],
                Some(&team_a),
                false,
            ),
            (vec![Attach::parse(&json!({"from": "All"}))], None, true),
            (vec![Attach::Same, Attach::All], Some(&team_b), true),
            (vec![], Some(&team_a), false),
            (
                vec![selector(json!({"matchLabels": {"team": "a"}}))],
                Some(&team_a),
                true,
            ),
            (
                vec![selector(json!({"matchLabels": {"team": "a"}}))],
                Some(&team_b),
                false,
            ),
            // A namespace not seen yet may match.
            (
                vec![selector(json!({"matchLabels": {"team": "a"}}))],
                None,
                true,
            ),
            (vec![selector(json!({}))], Some(&team_b), true),
            (
                vec![Attach::parse(&json!({"from": "Selector"}))],
                Some(&team_a),
                false,
            ),
            (
                vec![selector(
                    json!({"matchExpressions": [{"key": "team", "operator": "In", "values": ["a", "c"]}]}),
                )],
                Some(&team_a),
                true,
            ),
            (
                vec![selector(
                    json!({"matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["a"]}]}),
                )],
                Some(&team_a),
                false,
            ),
            (
                vec![selector(
                    json!({"matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["a"]}]}),
                )],
                None,
                true,
            ),
            (
                vec![selector(
                    json!({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}),
                )],
                Some(&team_b),
                false,
            ),
            (
                vec![selector(
                    json!({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}),
                )],
                Some(&team_b),
                true,
            ),
            (
                vec![selector(
                    json!({"matchLabels": {"team": "a"}, "matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}),
                )],
                Some(&team_a),
                false,
            ),
            // A selector Kubernetes would refuse counts the waypoint (fail closed).
            (
                vec![selector(
                    json!({"matchExpressions": [{"key": "team", "operator": "Gt", "values": ["1"]}]}),
                )],
                Some(&team_b),
                true,
            ),
            (
                vec![selector(
                    json!({"matchExpressions": [{"key": "team", "operator": "In"}]}),
                )],
                Some(&team_b),
                true,
            ),
            (
                vec![selector(
                    json!({"matchExpressions": [{"key": "tier", "operator": "Exists", "values": ["x"]}]}),
                )],
                Some(&team_b),
                true,
            ),
            (
                vec![selector(json!({"matchLabels": {"team": 1}}))],
                Some(&team_b),
                true,
            ),
        ];
        for (i, (attach, ns_labels, counts)) in cases.into_iter().enumerate() {
            let mut known = Waypoints::default();
            known.insert_attach("infra", "shared", Serves::ALL, attach.clone());
            let own = UseWaypoint {
                name: Some("shared"),
                namespace: Some("infra"),
                gateway: None,
            };
            let want = counts.then(|| "infra/shared".to_owned());
            assert_eq!(
                known.through(Traffic::Service, "app", own, ns_labels),
                want,
                "case {i}: {attach:?} {ns_labels:?}"
            );
            // Its own namespace always attaches.
            let own = UseWaypoint {
                name: Some("shared"),
                ..UseWaypoint::default()
            };
            assert_eq!(
                known
                    .through(Traffic::Service, "infra", own, ns_labels)
                    .as_deref(),
                Some("infra/shared"),
                "case {i} from its own namespace"
            );
        }
    }

    /// A waypoint's own Service, and an east-west gateway's, has none.
    #[test]
    fn a_gateways_own_service_has_no_waypoint() {
        let labels = |m: Option<&'static str>| {
            move |k: &str| match k {
                ISTIO_GATEWAY_MANAGED => m,
                ISTIO_USE_WAYPOINT => Some("wp"),
                _ => None,
            }
        };
        assert_eq!(
            service_label(labels(Some("istio.io-mesh-controller"))),
            Some("none")
        );
        assert_eq!(
            service_label(labels(Some("istio.io-eastwest-controller"))),
            Some("none")
        );
        assert_eq!(service_label(labels(Some("other"))), Some("wp"));
        assert_eq!(service_label(labels(None)), Some("wp"));
    }
}
