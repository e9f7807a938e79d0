//! The plugin's failures, each carrying its CNI error code (spec 1.0/1.1 §"Error"), and their
//! rendering as the specification's error object on stdout.

use serde::Serialize;

/// A failed command. The `Display` form is the error object's `msg`; the payload is its
/// `details`. Codes below 100 are the specification's; 100 and up are this plugin's.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CniError {
    /// Code 1: the configuration's `cniVersion` is not one this plugin speaks, or it does not
    /// allow the command (CHECK before 0.4.0, STATUS and GC before 1.1.0).
    #[error("incompatible CNI version")]
    IncompatibleVersion(String),
    /// Code 4: an environment variable is missing or malformed.
    #[error("invalid environment variables")]
    InvalidEnv(String),
    /// Code 6: stdin is not a JSON object.
    #[error("failed to decode the network configuration")]
    Decode(String),
    /// Code 7: a field of the network configuration is missing or invalid.
    #[error("invalid network configuration")]
    InvalidConfig(String),
    /// Code 11: transient; the runtime should retry later.
    #[error("try again later")]
    TryAgain(String),
    /// Code 11: the daemon could not be reached and the pod may need enrolling (fail closed).
    #[error("ztunnel daemon is unreachable")]
    Unreachable(String),
    /// Code 50: the plugin (its daemon) is not available.
    #[error("plugin not available")]
    NotAvailable(String),
    /// Code 100: the daemon does not speak this plugin's enrollment protocol version.
    #[error("enrollment protocol version not supported by the ztunnel daemon")]
    ProtocolUnsupported(String),
    /// Code 101: CHECK found the pod's capture missing or altered.
    #[error("ztunnel check failed")]
    CheckFailed(String),
}

impl CniError {
    /// The CNI error code.
    pub fn code(&self) -> u32 {
        match self {
            CniError::IncompatibleVersion(_) => 1,
            CniError::InvalidEnv(_) => 4,
            CniError::Decode(_) => 6,
            CniError::InvalidConfig(_) => 7,
            CniError::TryAgain(_) | CniError::Unreachable(_) => 11,
            CniError::NotAvailable(_) => 50,
            CniError::ProtocolUnsupported(_) => 100,
            CniError::CheckFailed(_) => 101,
        }
    }

    /// The error object's `details`.
    pub fn details(&self) -> &str {
        match self {
            CniError::IncompatibleVersion(d)
            | CniError::InvalidEnv(d)
            | CniError::Decode(d)
            | CniError::InvalidConfig(d)
            | CniError::TryAgain(d)
            | CniError::Unreachable(d)
            | CniError::NotAvailable(d)
            | CniError::ProtocolUnsupported(d)
            | CniError::CheckFailed(d) => d,
        }
    }

    /// The specification's error object, tagged with `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Object<'a> {
            cni_version: &'a str,
            code: u32,
            msg: String,
            details: &'a str,
        }
        serde_json::to_string(&Object {
            cni_version,
            code: self.code(),
            msg: self.to_string(),
            details: self.details(),
        })
        .unwrap_or_else(|_| format!(r#"{{"code":{}}}"#, self.code()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_object() {
        let cases = [
            (CniError::IncompatibleVersion("v".into()), 1),
            (CniError::InvalidEnv("v".into()), 4),
            (CniError::Decode("v".into()), 6),
            (CniError::InvalidConfig("v".into()), 7),
            (CniError::TryAgain("v".into()), 11),
            (CniError::Unreachable("v".into()), 11),
            (CniError::NotAvailable("v".into()), 50),
            (CniError::ProtocolUnsupported("v".into()), 100),
            (CniError::CheckFailed("v".into()), 101),
        ];
        for (err, code) in cases {
            assert_eq!(err.code(), code);
            let v: serde_json::Value = serde_json::from_str(&err.to_json("1.0.0")).unwrap();
            assert_eq!(v["cniVersion"], "1.0.0");
            assert_eq!(v["code"], code);
            assert_eq!(v["msg"], err.to_string());
            assert_eq!(v["details"], "v");
        }
    }
}
