//! The field selectors of the stand-in API server's lists and watches (the daemon selects its
//! pods by `spec.nodeName`; it uses no label selector).

use serde_json::Value;

/// What a watch (or list) selects.
#[derive(Clone, Default)]
pub(super) struct Selector {
    pub(super) namespace: Option<String>,
    pub(super) fields: Vec<(String, bool, String)>, // (path, equal?, value)
}

impl Selector {
    pub(super) fn parse(namespace: Option<String>, fields: &str) -> Result<Self, String> {
        let mut sel = Selector {
            namespace,
            ..Default::default()
        };
        for term in fields.split(',').filter(|t| !t.is_empty()) {
            let (path, eq, value) = if let Some((p, v)) = term.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = term.split_once("==") {
                (p, true, v)
            } else if let Some((p, v)) = term.split_once('=') {
                (p, true, v)
            } else {
                return Err(format!("invalid field selector {term:?}"));
            };
            sel.fields
                .push((path.trim().into(), eq, value.trim().into()));
        }
        Ok(sel)
    }

    pub(super) fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace {
            if obj["metadata"]["namespace"].as_str() != Some(ns) {
                return false;
            }
        }
        self.fields.iter().all(|(path, eq, want)| {
            let mut v = obj;
            for part in path.split('.') {
                v = &v[part];
            }
            let got = match v {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            (got == *want) == *eq
        })
    }
}
