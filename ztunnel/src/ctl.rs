//! `ztunnel ctl`: the operator's view over a daemon's admin API (`/config_dump`,
//! `/connections`, `/explain` on localhost:15000): workloads, services, policies,
//! certificates, live connections, and `explain`, the decision the policy engine would make
//! for a connection, without sending it. Tables by default, JSON with `-o json`. And
//! `convert`, which needs no daemon: Istio's policy YAML turned into ours
//! ([`crate::policy::from_istio`]).

use std::fmt::Write;

use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{0}")]
    Cli(#[from] clap::Error),
    #[error("cannot reach the admin API at {addr}: {error}")]
    Connect { addr: String, error: String },
    #[error("the admin API answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("unexpected answer from the admin API: {0}")]
    Body(String),
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: String },
    #[error("{path}: {error}")]
    Convert { path: String, error: String },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    Table,
    Json,
}

/// `ztunnel ctl`: inspect a running daemon through its admin API.
#[derive(Parser, Debug)]
#[command(disable_version_flag = true)]
struct CtlArgs {
    /// The daemon's admin address
    #[arg(long, default_value = "127.0.0.1:15000", global = true)]
    admin: String,
    /// Output format
    #[arg(short, long, value_enum, default_value = "table", global = true)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Workloads the daemon knows
    Workloads,
    /// Services and their VIPs
    Services,
    /// Authorization policies and peer authentication
    Policies,
    /// Certificates held (identity, serial, expiry; never keys)
    Certs,
    /// Live proxied connections
    Connections,
    /// The decision the policy engine would make, without sending traffic
    Explain {
        /// Source: namespace/name or IP
        #[arg(long)]
        from: String,
        /// Destination: namespace/name:port, IP:port or a Service VIP:port
        #[arg(long)]
        to: String,
    },
    /// Istio's AuthorizationPolicy and PeerAuthentication YAML turned into ztunnel's, with
    /// what had to change written as comments (needs no daemon)
    Convert {
        /// The YAML file (several documents, or a List), `-` for standard input
        #[arg(short = 'f', long = "filename")]
        file: String,
        /// Istio's root namespace: its policies move to ztunnel's root namespace
        #[arg(long, default_value = "istio-system")]
        istio_root_namespace: String,
        /// ztunnel's root namespace
        #[arg(long, default_value = crate::policy::ROOT_NAMESPACE)]
        root_namespace: String,
    },
}

async fn get(addr: &str, path: &str) -> Result<Value, CtlError> {
    let conn_err = |e: &dyn std::fmt::Display| CtlError::Connect {
        addr: addr.to_owned(),
        error: e.to_string(),
    };
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| conn_err(&e))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| conn_err(&e))?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, addr)
        .body(Empty::<Bytes>::new())
        .map_err(|e| CtlError::Body(e.to_string()))?;
    let resp = send.send_request(req).await.map_err(|e| conn_err(&e))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| CtlError::Body(e.to_string()))?
        .to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    if status != 200 {
        return Err(CtlError::Status {
            status,
            body: text.trim().to_owned(),
        });
    }
    serde_json::from_str(&text).map_err(|e| CtlError::Body(e.to_string()))
}

/// A table with aligned columns.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[String]| {
        let cells: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    };
    line(
        &mut out,
        &header.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
    );
    for r in &rows {
        line(&mut out, r);
    }
    out
}

/// A policy's name as the daemon writes it: `namespace/name`, `istio:namespace/name` for
/// Istio's own objects.
fn policy_name(p: &Value) -> String {
    let group = if p["istio"] == true { "istio:" } else { "" };
    format!("{group}{}/{}", s(&p["namespace"]), s(&p["name"]))
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(s).collect::<Vec<_>>().join(","),
        Value::Object(o) => o
            .iter()
            .map(|(k, v)| format!("{k}={}", s(v)))
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

fn rows(list: &Value, cols: &[&dyn Fn(&Value) -> String]) -> Vec<Vec<String>> {
    list.as_array()
        .map(|a| {
            a.iter()
                .map(|v| cols.iter().map(|c| c(v)).collect())
                .collect()
        })
        .unwrap_or_default()
}

/// Renders the answer of `cmd` as a table.
fn render(cmd: &Cmd, v: &Value) -> String {
    match cmd {
        Cmd::Workloads => table(
            &[
                "NAMESPACE",
                "NAME",
                "IPS",
                "NODE",
                "SERVICE ACCOUNT",
                "PROTOCOL",
            ],
            rows(
                v,
                &[
                    &|w| s(&w["namespace"]),
                    &|w| s(&w["name"]),
                    &|w| s(&w["ips"]),
                    &|w| s(&w["node"]),
                    &|w| s(&w["serviceAccount"]),
                    &|w| s(&w["protocol"]),
                ],
            ),
        ),
        Cmd::Services => table(
            &["NAMESPACE", "NAME", "VIPS", "PORTS", "SELECTOR"],
            rows(
                v,
                &[
                    &|x| s(&x["namespace"]),
                    &|x| s(&x["name"]),
                    &|x| s(&x["vips"]),
                    &|x| {
                        x["ports"]
                            .as_array()
                            .map(|ps| {
                                ps.iter()
                                    .map(|p| format!("{}→{}", p["port"], p["targetPort"]))
                                    .collect::<Vec<_>>()
                                    .join(",")
                            })
                            .unwrap_or_default()
                    },
                    &|x| s(&x["selector"]),
                ],
            ),
        ),
        Cmd::Policies => table(
            &[
                "KIND",
                "NAMESPACE",
                "NAME",
                "ACTION/MODE",
                "SELECTOR",
                "RULES",
            ],
            rows(
                v,
                &[
                    &|p| s(&p["kind"]),
                    &|p| s(&p["metadata"]["namespace"]),
                    &|p| s(&p["metadata"]["name"]),
                    &|p| {
                        if p["kind"] == "PeerAuthentication" {
                            s(&p["spec"]["mtls"]["mode"])
                        } else {
                            s(&p["spec"]["action"])
                        }
                    },
                    &|p| s(&p["spec"]["selector"]["matchLabels"]),
                    &|p| {
                        p["spec"]["rules"]
                            .as_array()
                            .map_or("-".into(), |r| r.len().to_string())
                    },
                ],
            ),
        ),
        Cmd::Certs => table(
            &["IDENTITY", "SERIAL", "NOT BEFORE", "NOT AFTER"],
            rows(
                v,
                &[
                    &|c| s(&c["identity"]),
                    &|c| s(&c["serial"]),
                    &|c| s(&c["notBefore"]),
                    &|c| s(&c["notAfter"]),
                ],
            ),
        ),
        Cmd::Connections => table(
            &[
                "ID",
                "DIRECTION",
                "SOURCE",
                "DESTINATION",
                "SOURCE IDENTITY",
                "DESTINATION IDENTITY",
                "SENT",
                "RECEIVED",
                "AGE(ms)",
            ],
            rows(
                v,
                &[
                    &|c| s(&c["id"]),
                    &|c| s(&c["direction"]),
                    &|c| s(&c["src_addr"]),
                    &|c| s(&c["dst_addr"]),
                    &|c| s(&c["src_identity"]),
                    &|c| s(&c["dst_identity"]),
                    &|c| s(&c["bytes_sent"]),
                    &|c| s(&c["bytes_received"]),
                    &|c| s(&c["duration_ms"]),
                ],
            ),
        ),
        Cmd::Convert { .. } => unreachable!("convert returns before rendering"),
        Cmd::Explain { .. } => {
            let d = &v["decision"];
            let verdict = if d["allowed"] == true {
                "ALLOW"
            } else {
                "DENY"
            };
            let by = match &d["policy"] {
                p @ Value::Object(_) => format!("policy {} rule {}", policy_name(p), s(&d["rule"])),
                _ => "no policy".into(),
            };
            let mut out = String::new();
            let _ = writeln!(
                out,
                "{} ({}) → {}:{}{} ({})",
                s(&v["source"]["workload"]),
                s(&v["source"]["identity"]),
                s(&v["destination"]["workload"]),
                s(&v["port"]),
                v["service"]
                    .as_str()
                    .map(|x| format!(" via service {x}"))
                    .unwrap_or_default(),
                s(&v["destination"]["identity"]),
            );
            let _ = writeln!(
                out,
                "transport: {}; destination mTLS mode: {}",
                s(&v["transport"]),
                s(&v["mtls_mode"])
            );
            if let Some(why) = v["refused_at_source"].as_str() {
                let _ = writeln!(out, "refused by the source's daemon: {why}");
            }
            let _ = writeln!(out, "decision: {verdict} — {by} ({})", s(&d["reason"]));
            for c in v["considered"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "  {} {} ({}): {}",
                    s(&c["kind"]),
                    policy_name(&c["policy"]),
                    s(&c["action"]),
                    match c["matched_rule"].as_u64() {
                        Some(r) => format!("rule {r} matched"),
                        None => "no match".into(),
                    }
                );
                for note in c["dropped"].as_array().into_iter().flatten() {
                    let _ = writeln!(out, "    dropped: {}", s(note));
                }
            }
            for i in v["ignored"].as_array().into_iter().flatten() {
                let p = &i["policy"];
                let _ = writeln!(
                    out,
                    "  ignored {}/{}: {}",
                    s(&p["namespace"]),
                    s(&p["name"]),
                    s(&i["reason"])
                );
            }
            out
        }
    }
}

/// Runs `ztunnel ctl` with `args` (`args[0]` is the program name); returns what to print.
pub async fn run(args: Vec<String>) -> Result<String, CtlError> {
    let a = CtlArgs::try_parse_from(args)?;
    if let Cmd::Convert {
        file,
        istio_root_namespace,
        root_namespace,
    } = &a.cmd
    {
        let text = if file == "-" {
            std::io::read_to_string(std::io::stdin())
        } else {
            std::fs::read_to_string(file)
        }
        .map_err(|e| CtlError::Read {
            path: file.clone(),
            error: e.to_string(),
        })?;
        return crate::policy::from_istio::convert(&text, istio_root_namespace, root_namespace)
            .map_err(|e| CtlError::Convert {
                path: file.clone(),
                error: e.to_string(),
            });
    }
    let dump = || get(&a.admin, "/config_dump");
    let v = match &a.cmd {
        Cmd::Workloads => dump().await?["discovery"]["workloads"].take(),
        Cmd::Services => dump().await?["discovery"]["services"].take(),
        Cmd::Policies => {
            let mut d = dump().await?;
            let mut all = Vec::new();
            for (key, kind) in [
                ("authorizationPolicies", "AuthorizationPolicy"),
                ("peerAuthentications", "PeerAuthentication"),
            ] {
                for mut p in d["discovery"][key]
                    .take()
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                {
                    p["kind"] = kind.into();
                    all.push(p);
                }
            }
            Value::Array(all)
        }
        Cmd::Certs => dump().await?["certificates"].take(),
        Cmd::Connections => get(&a.admin, "/connections").await?["connections"].take(),
        Cmd::Explain { from, to } => {
            get(&a.admin, &format!("/explain?from={from}&to={to}")).await?
        }
        Cmd::Convert { .. } => unreachable!("convert returns above"),
    };
    Ok(match a.output {
        Output::Json => serde_json::to_string_pretty(&v).unwrap_or_default() + "\n",
        Output::Table => render(&a.cmd, &v),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_render_json_shapes() {
        let t = table(
            &["A", "LONGER"],
            vec![
                vec!["xxxx".into(), "y".into()],
                vec!["z".into(), "w".into()],
            ],
        );
        assert_eq!(t, "A     LONGER\nxxxx  y\nz     w\n");
        let v: Value = serde_json::json!([{"namespace": "demo", "name": "web", "ips": ["10.0.0.1", "10.0.0.2"],
            "node": "n1", "serviceAccount": "web", "protocol": "HBONE"}]);
        let out = render(&Cmd::Workloads, &v);
        assert!(
            out.contains("demo       web   10.0.0.1,10.0.0.2  n1    web              HBONE"),
            "{out}"
        );
    }

    #[test]
    fn explain_names_our_policies_and_istios() {
        let cmd = Cmd::Explain {
            from: "a/b".into(),
            to: "c/d:80".into(),
        };
        let v = |policy: Value| {
            serde_json::json!({
                "source": {"workload": "a/b", "identity": "spiffe://td/ns/a/sa/b"},
                "destination": {"workload": "c/d", "identity": "spiffe://td/ns/c/sa/d"},
                "port": 80, "transport": "HBONE", "mtls_mode": "PERMISSIVE",
                "decision": {"allowed": false, "reason": "denied_by_policy", "policy": policy, "rule": 0},
                "considered": [{"kind": "AuthorizationPolicy", "policy": policy, "action": "DENY", "matched_rule": 0}],
            })
        };
        let ours = render(
            &cmd,
            &v(serde_json::json!({"namespace": "c", "name": "deny"})),
        );
        assert!(
            ours.contains("decision: DENY — policy c/deny rule 0"),
            "{ours}"
        );
        assert!(
            ours.contains("AuthorizationPolicy c/deny (DENY): rule 0 matched"),
            "{ours}"
        );
        let istio = render(
            &cmd,
            &v(serde_json::json!({"namespace": "c", "name": "deny", "istio": true})),
        );
        assert!(istio.contains("policy istio:c/deny rule 0"), "{istio}");
        assert!(
            istio.contains("AuthorizationPolicy istio:c/deny"),
            "{istio}"
        );
        let none = render(&cmd, &v(Value::Null));
        assert!(none.contains("no policy"), "{none}");
        assert!(!none.contains("refused by the source"), "{none}");
        let mut refused = v(Value::Null);
        refused["refused_at_source"] = "service c/d sends its traffic through waypoint c/wp".into();
        let refused = render(&cmd, &refused);
        assert!(
            refused.contains("refused by the source's daemon: service c/d sends"),
            "{refused}"
        );
    }

    #[test]
    fn bad_arguments_are_errors() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        assert!(matches!(
            rt.block_on(run(args(&["ctl", "nonsense"]))),
            Err(CtlError::Cli(_))
        ));
        assert!(matches!(
            rt.block_on(run(args(&["ctl", "explain", "--from", "a/b"]))),
            Err(CtlError::Cli(_))
        ));
        // convert: a missing file and bad YAML are clear errors; a file converts.
        let e = rt
            .block_on(run(args(&["ctl", "convert", "-f", "/nonexistent.yaml"])))
            .unwrap_err();
        assert!(matches!(e, CtlError::Read { .. }), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, "a: [b").unwrap();
        let e = rt
            .block_on(run(args(&["ctl", "convert", "-f", bad.to_str().unwrap()])))
            .unwrap_err();
        assert!(matches!(e, CtlError::Convert { .. }), "{e}");
        let good = dir.path().join("good.yaml");
        std::fs::write(
            &good,
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: d, namespace: mesh}\nspec: {mtls: {mode: STRICT}}\n",
        )
        .unwrap();
        let out = rt
            .block_on(run(args(&[
                "ctl",
                "convert",
                "-f",
                good.to_str().unwrap(),
                "--istio-root-namespace",
                "mesh",
                "--root-namespace",
                "root",
            ])))
            .unwrap();
        assert!(out.contains("apiVersion: security.ztunnel.dev/v1"), "{out}");
        assert!(out.contains("namespace: root"), "{out}");
        // Nothing listens on this port: a clear connection error.
        let e = rt
            .block_on(run(args(&["ctl", "--admin", "127.0.0.1:1", "certs"])))
            .unwrap_err();
        assert!(matches!(e, CtlError::Connect { .. }), "{e}");
    }
}
