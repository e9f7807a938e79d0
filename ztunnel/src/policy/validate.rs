//! The value checks of Istio's admission webhook for an AuthorizationPolicy
//! (`ValidateAuthorizationPolicy` and `security.ValidateAttribute`, istio/istio
//! `pkg/config/validation/validation.go` and `pkg/config/security/security.go`): an object that
//! fails them is one Istio would not have accepted, and it fails closed ([`super::convert`]).

use super::matchers;
use super::objects::{Action, AuthorizationPolicySpec, Operation, Selector, Source};

pub(super) fn selector_error(sel: Option<&Selector>) -> Option<String> {
    for (k, v) in sel?.match_labels.iter().flatten() {
        if k.is_empty() {
            return Some("selector: empty label key".into());
        }
        if k.contains('*') || v.contains('*') {
            return Some(format!("selector: wildcard in {k}={v}"));
        }
    }
    None
}

fn no_empty(field: &str, v: &[String]) -> Result<(), String> {
    if v.iter().any(String::is_empty) {
        return Err(format!("empty value in {field}"));
    }
    Ok(())
}

fn ips(field: &str, v: &[String]) -> Result<(), String> {
    no_empty(field, v)?;
    match v.iter().find(|s| matchers::ip_block(s).is_none()) {
        Some(bad) => Err(format!("{field}: {bad:?} is not an IP address or CIDR")),
        None => Ok(()),
    }
}

fn ports(field: &str, v: &[String]) -> Result<(), String> {
    no_empty(field, v)?;
    match v.iter().find(|s| matchers::port(s).is_none()) {
        Some(bad) => Err(format!(
            "{field}: {bad:?} is not a port (a decimal number from 0 to 65535)"
        )),
        None => Ok(()),
    }
}

/// Istio's `CheckWildcardValues`: no empty value, and at most one `*`, at its start or end.
fn wildcards(field: &str, v: &[String]) -> Result<(), String> {
    no_empty(field, v)?;
    let bad = |s: &&String| match s.matches('*').count() {
        0 => false,
        1 => !s.starts_with('*') && !s.ends_with('*'),
        _ => true,
    };
    match v.iter().find(bad) {
        Some(bad) => Err(format!(
            "{field}: {bad:?} has a wildcard elsewhere than alone at its start or end"
        )),
        None => Ok(()),
    }
}

/// Istio's `CheckTrustDomainValues`: [`wildcards`], none with a `/`.
fn trust_domains(field: &str, v: &[String]) -> Result<(), String> {
    wildcards(field, v)?;
    match v.iter().find(|s| s.contains('/')) {
        Some(bad) => Err(format!(
            "{field}: {bad:?} is not a trust domain (it has a '/')"
        )),
        None => Ok(()),
    }
}

/// Istio's `CheckValidPathTemplate`: braces only in the templates `{*}` (a segment) and `{**}`
/// (the rest: the last template), and in a templated path every other segment a plain one.
fn path_templates(field: &str, v: &[String]) -> Result<(), String> {
    let literal = |seg: &str| {
        !seg.is_empty()
            && seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~%!$&'()+,;:@=".contains(&b))
    };
    for path in v {
        let templated = path.contains("{*}") || path.contains("{**}");
        let mut rest_taken = false;
        for seg in path.trim_matches('/').split('/') {
            let why = match seg {
                "{*}" if !rest_taken => continue,
                "{**}" if !rest_taken => {
                    rest_taken = true;
                    continue;
                }
                "{*}" | "{**}" => "{**} is not the last template",
                _ if seg.contains(['{', '}']) => "it has a brace outside {*} and {**}",
                _ if templated && !literal(seg) => "a segment beside a template is not plain",
                _ => continue,
            };
            return Err(format!("{field}: {path:?}: {why}"));
        }
    }
    Ok(())
}

/// Istio's `validateMapKey`: a key of the form `name[entry]`, both non-empty.
fn map_key(key: &str) -> Result<(), String> {
    match key.find('[') {
        Some(open) if open > 0 && key.ends_with(']') && open + 2 < key.len() => Ok(()),
        _ => Err(format!("when: {key:?} is not of the form name[entry]")),
    }
}

fn service_accounts(field: &str, v: &[String]) -> Result<(), String> {
    if v.len() > 16 {
        return Err(format!("{field}: more than 16 values"));
    }
    for s in v {
        let ok = !s.is_empty()
            && !s.contains('*')
            && s.len() <= 320
            && match s.split_once('/') {
                None => true,
                Some((ns, sa)) => !ns.is_empty() && !sa.is_empty() && !sa.contains('/'),
            };
        if !ok {
            return Err(format!(
                "{field}: {s:?} is not `serviceAccount` or `namespace/serviceAccount`"
            ));
        }
    }
    Ok(())
}

/// The value checks of Istio's admission webhook (`ValidateAuthorizationPolicy`,
/// `security.ValidateAttribute`): an object that fails them is not one Istio accepts.
pub(super) fn validate(spec: &AuthorizationPolicySpec) -> Result<(), String> {
    let set = usize::from(spec.selector.is_some())
        + usize::from(spec.target_ref.is_some())
        + usize::from(!spec.target_refs.is_empty());
    if set > 1 {
        return Err("only one of selector, targetRef or targetRefs can be set".into());
    }
    if let Some(e) = selector_error(spec.selector.as_ref()) {
        return Err(e);
    }
    if spec.provider.is_some() && spec.action != Action::Custom {
        return Err("provider is only for the CUSTOM action".into());
    }
    if spec.action == Action::Custom {
        custom(spec)?;
    }
    for (i, r) in spec.rules.iter().enumerate() {
        let at = |e: String| format!("rule {i}: {e}");
        for f in &r.from {
            let s = &f.source;
            if *s == Source::default() {
                return Err(at("from.source must not be empty".into()));
            }
            if (!s.principals.is_empty()
                || !s.not_principals.is_empty()
                || !s.namespaces.is_empty()
                || !s.not_namespaces.is_empty())
                && (!s.service_accounts.is_empty() || !s.not_service_accounts.is_empty())
            {
                return Err(at(
                    "serviceAccounts cannot be set with namespaces or principals".into(),
                ));
            }
            ips("ipBlocks", &s.ip_blocks).map_err(at)?;
            ips("notIpBlocks", &s.not_ip_blocks).map_err(at)?;
            ips("remoteIpBlocks", &s.remote_ip_blocks).map_err(at)?;
            ips("notRemoteIpBlocks", &s.not_remote_ip_blocks).map_err(at)?;
            service_accounts("serviceAccounts", &s.service_accounts).map_err(at)?;
            service_accounts("notServiceAccounts", &s.not_service_accounts).map_err(at)?;
            for (name, v) in [
                ("principals", &s.principals),
                ("notPrincipals", &s.not_principals),
                ("requestPrincipals", &s.request_principals),
                ("notRequestPrincipals", &s.not_request_principals),
                ("namespaces", &s.namespaces),
                ("notNamespaces", &s.not_namespaces),
            ] {
                no_empty(name, v).map_err(at)?;
            }
            trust_domains("trustDomains", &s.trust_domains).map_err(at)?;
            trust_domains("notTrustDomains", &s.not_trust_domains).map_err(at)?;
        }
        for t in &r.to {
            let o = &t.operation;
            if *o == Operation::default() {
                return Err(at("to.operation must not be empty".into()));
            }
            ports("ports", &o.ports).map_err(at)?;
            ports("notPorts", &o.not_ports).map_err(at)?;
            for (name, v) in o.http_fields() {
                no_empty(name, v).map_err(at)?;
            }
            path_templates("paths", &o.paths).map_err(at)?;
            path_templates("notPaths", &o.not_paths).map_err(at)?;
        }
        for w in &r.when {
            let key = w.key.as_str();
            if key.is_empty() {
                return Err(at("when: empty key".into()));
            }
            if w.values.is_empty() && w.not_values.is_empty() {
                return Err(at(format!("when {key}: neither values nor notValues")));
            }
            for v in [&w.values, &w.not_values] {
                let check = match key {
                    "source.ip" | "remote.ip" | "destination.ip" => ips(key, v),
                    "destination.port" => ports(key, v),
                    "source.serviceAccount" => service_accounts(key, v),
                    "source.trustDomain" => wildcards(key, v),
                    "source.namespace"
                    | "source.principal"
                    | "request.auth.principal"
                    | "request.auth.audiences"
                    | "request.auth.presenter"
                    | "connection.sni" => no_empty(key, v),
                    k if k.starts_with("request.headers")
                        || k.starts_with("request.auth.claims")
                        || k.starts_with("experimental.envoy.filters.") =>
                    {
                        no_empty(key, v).and_then(|()| map_key(key))
                    }
                    _ => Err(format!("when: unknown or unsupported attribute {key}")),
                };
                check.map_err(at)?;
            }
        }
    }
    Ok(())
}

/// What the webhook asks of a CUSTOM policy besides the rest: rules, a provider's name, and no
/// source attribute that the external authorizer's filter cannot match on.
fn custom(spec: &AuthorizationPolicySpec) -> Result<(), String> {
    if spec.rules.is_empty() {
        return Err("a CUSTOM policy without rules is never triggered".into());
    }
    if spec.provider.as_ref().is_none_or(|p| p.name.is_empty()) {
        return Err("a CUSTOM policy needs provider.name".into());
    }
    for (i, r) in spec.rules.iter().enumerate() {
        let unsupported =
            |what: &str| Err(format!("rule {i}: {what} is not supported with CUSTOM"));
        for f in &r.from {
            let s = &f.source;
            for (name, v) in [
                ("namespaces", &s.namespaces),
                ("notNamespaces", &s.not_namespaces),
                ("serviceAccounts", &s.service_accounts),
                ("notServiceAccounts", &s.not_service_accounts),
                ("trustDomains", &s.trust_domains),
                ("notTrustDomains", &s.not_trust_domains),
                ("principals", &s.principals),
                ("notPrincipals", &s.not_principals),
                ("requestPrincipals", &s.request_principals),
                ("notRequestPrincipals", &s.not_request_principals),
            ] {
                if !v.is_empty() {
                    return unsupported(name);
                }
            }
        }
        for w in &r.when {
            let key = w.key.as_str();
            if matches!(
                key,
                "source.namespace"
                    | "source.serviceAccount"
                    | "source.trustDomain"
                    | "source.principal"
            ) || key.starts_with("request.auth.")
            {
                return unsupported(key);
            }
        }
    }
    Ok(())
}
