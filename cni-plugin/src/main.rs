//! `ztunnel-cni`, the chained CNI plugin that enrolls pods into the mesh.
//!
//! This stage answers `VERSION` as the CNI specification (1.0.0, 1.1.0) says; the other
//! commands answer the specification's error object with a non-zero exit until enrollment
//! lands. Results go to stdout, logs to stderr only.

use std::io::{Read, Write};
use std::process::ExitCode;

use serde::{Deserialize, Serialize};

/// The CNI versions this plugin speaks.
const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct VersionResult<'a> {
    cni_version: &'a str,
    supported_versions: &'a [&'a str],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CniError<'a> {
    cni_version: &'a str,
    code: u32,
    msg: &'a str,
    details: String,
}

fn emit(v: &impl Serialize) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, v);
    let _ = out.write_all(b"\n");
}

fn fail(version: &str, code: u32, msg: &str, details: String) -> ExitCode {
    eprintln!("ztunnel-cni: {msg}: {details}");
    emit(&CniError {
        cni_version: version,
        code,
        msg,
        details,
    });
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let mut stdin = String::new();
    if command != "VERSION" || !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        let _ = std::io::stdin().read_to_string(&mut stdin);
    }
    let conf: NetConf = if stdin.trim().is_empty() {
        NetConf::default()
    } else {
        match serde_json::from_str(&stdin) {
            Ok(c) => c,
            Err(e) => {
                return fail(
                    "1.1.0",
                    6,
                    "failed to decode network configuration",
                    e.to_string(),
                )
            }
        }
    };
    let version = conf.cni_version.as_deref().unwrap_or("1.1.0");
    match command.as_str() {
        "VERSION" => {
            emit(&VersionResult {
                cni_version: "1.1.0",
                supported_versions: SUPPORTED_VERSIONS,
            });
            ExitCode::SUCCESS
        }
        "" => fail(version, 4, "CNI_COMMAND is not set", String::new()),
        other => fail(
            version,
            4,
            "unsupported CNI_COMMAND",
            format!("{other} is not supported by this build"),
        ),
    }
}
