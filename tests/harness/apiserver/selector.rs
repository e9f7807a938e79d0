//! Field and label selectors of the stand-in API server's lists and watches.

use serde_json::Value;

/// What a watch (or list) selects.
#[derive(Clone, Default)]
pub(super) struct Selector {
    pub(super) namespace: Option<String>,
    pub(super) fields: Vec<(String, bool, String)>, // (path, equal?, value)
    pub(super) labels: Vec<LabelReq>,
}

#[derive(Clone)]
pub(super) enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    NotExists(String),
}

impl Selector {
    pub(super) fn parse(
        namespace: Option<String>,
        fields: &str,
        labels: &str,
    ) -> Result<Self, String> {
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
        for term in labels.split(',').filter(|t| !t.is_empty()) {
            let term = term.trim();
            let req = if term.contains(" in ") || term.contains(" notin ") || term.contains('(') {
                return Err(format!("unsupported label selector {term:?}"));
            } else if let Some((k, v)) = term.split_once("!=") {
                LabelReq::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = term.split_once("==") {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = term.split_once('=') {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some(k) = term.strip_prefix('!') {
                LabelReq::NotExists(k.trim().into())
            } else {
                LabelReq::Exists(term.into())
            };
            sel.labels.push(req);
        }
        Ok(sel)
    }

    pub(super) fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace {
            if obj["metadata"]["namespace"].as_str() != Some(ns) {
                return false;
            }
        }
        for (path, eq, want) in &self.fields {
            let mut v = obj;
            for part in path.split('.') {
                v = &v[part];
            }
            let got = match v {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            if (got == *want) != *eq {
                return false;
            }
        }
        let labels = &obj["metadata"]["labels"];
        self.labels.iter().all(|req| match req {
            LabelReq::Eq(k, v) => labels[k].as_str() == Some(v),
            LabelReq::Ne(k, v) => labels[k].as_str() != Some(v),
            LabelReq::Exists(k) => labels.get(k).is_some(),
            LabelReq::NotExists(k) => labels.get(k).is_none(),
        })
    }
}
