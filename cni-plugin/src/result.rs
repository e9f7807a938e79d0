//! ADD's result: the previous plugin's (`prevResult`), in the configuration's `cniVersion`,
//! as the specification asks of every plugin's output. It is handed on byte for byte when it
//! is in that version already (what conformant plugins before us produce); otherwise it is
//! re-versioned: `cniVersion` set, and each `ips[]` entry's `version` (`"4"`, `"6"`), which
//! results before 1.0.0 carry and later ones do not, added or dropped. Every other field is
//! kept as it was, in document order.

use serde_json::{Map, Value};

use crate::error::CniError;

/// `prev` (a JSON object) as a result of version `version`.
pub fn in_version(prev: &str, version: &str) -> Result<String, CniError> {
    let mut v: Map<String, Value> = serde_json::from_str(prev)
        .map_err(|e| CniError::InvalidConfig(format!("prevResult: {e}")))?;
    if v.get("cniVersion").and_then(Value::as_str) == Some(version) {
        return Ok(prev.to_owned());
    }
    let before_1 = version.starts_with("0.");
    for ip in v
        .get_mut("ips")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object_mut)
    {
        if !before_1 {
            ip.shift_remove("version");
        } else if !ip.contains_key("version") {
            let v6 = ip
                .get("address")
                .and_then(Value::as_str)
                .is_some_and(|a| a.contains(':'));
            ip.insert("version".into(), (if v6 { "6" } else { "4" }).into());
        }
    }
    match v.get_mut("cniVersion") {
        Some(slot) => *slot = version.into(),
        None => {
            let mut out = Map::new();
            out.insert("cniVersion".into(), version.into());
            out.extend(v);
            v = out;
        }
    }
    serde_json::to_string(&v).map_err(|e| CniError::InvalidConfig(format!("prevResult: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_given_the_configurations_version() {
        let v1 = r#"{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.5/24","interface":0},{"address":"fd00::5/64"}],"dns":{}}"#;
        let v03 = r#"{"cniVersion":"0.3.1","ips":[{"version":"4","address":"10.1.0.5/24","interface":0},{"version":"6","address":"fd00::5/64"}],"dns":{}}"#;
        let cases = [
            // Already in the version: byte for byte, whitespace included.
            (
                r#"{ "cniVersion":"1.0.0", "z":1 }"#,
                "1.0.0",
                r#"{ "cniVersion":"1.0.0", "z":1 }"#,
            ),
            (v03, "1.0.0", v1),
            (
                v1,
                "0.3.1",
                r#"{"cniVersion":"0.3.1","ips":[{"address":"10.1.0.5/24","interface":0,"version":"4"},{"address":"fd00::5/64","version":"6"}],"dns":{}}"#,
            ),
            (v1, "1.1.0", &v1.replace("1.0.0", "1.1.0")),
            (v03, "0.4.0", &v03.replace("0.3.1", "0.4.0")),
            (
                r#"{"ips":[{"address":"10.1.0.5/24"}]}"#,
                "0.4.0",
                r#"{"cniVersion":"0.4.0","ips":[{"address":"10.1.0.5/24","version":"4"}]}"#,
            ),
        ];
        for (prev, version, want) in cases {
            assert_eq!(
                in_version(prev, version).unwrap(),
                want,
                "{prev} as {version}"
            );
        }
        assert!(in_version("[1]", "1.0.0").is_err());
    }
}
