//! Where each setting comes from, for both commands: a flag over its environment variable over
//! its default; an invalid variable named in the refusal; a missing setting named by its flags
//! and variables; and what `--help` shows of each.

use std::time::Duration;

use super::super::{settings, ConfigError, LogFormat, RunArgs, RunConfig};
use super::{ca, run, BASE};

/// Each kind of typed flag, for `run` and for `ca` (the shared flags in both): the variable is
/// read when the flag is absent, the flag wins over it, and the default applies when neither
/// is given.
#[test]
fn flag_over_environment_over_default() {
    // (flag, variable, flag's value, variable's value, default), as the configuration shows them
    type Case<'a> = (&'a str, &'a str, &'a str, &'a str, &'a str);
    let shown = |c: &RunConfig, flag: &str| -> String {
        match flag {
            "--pool-max-streams" => c.pool_max_streams.to_string(),
            "--admin-addr" => c.admin_addr.to_string(),
            "--connect-timeout" => humantime::format_duration(c.connect_timeout).to_string(),
            "--capture-mode" => format!("{:?}", c.capture),
            "--quic-listen" => c.quic_listen.to_string(),
            "--trust-domain" => c.trust_domain.clone(),
            "--log-format" => format!("{:?}", c.log_format),
            "--max-buffered-mib" => (c.tunnel.buffered_bytes >> 20).to_string(),
            "--max-connections-per-source" => c.tunnel.connections_per_source.to_string(),
            "--max-proxied-connections" => c.tunnel.proxied_connections.to_string(),
            "--state-dir" => c.state_dir.display().to_string(),
            other => panic!("{other}"),
        }
    };
    let cases: &[Case<'_>] = &[
        (
            "--pool-max-streams",
            "ZTUNNEL_POOL_MAX_STREAMS",
            "7",
            "9",
            "100",
        ),
        (
            "--admin-addr",
            "ZTUNNEL_ADMIN_ADDR",
            "127.0.0.1:1",
            "[::1]:2",
            "127.0.0.1:15000",
        ),
        (
            "--connect-timeout",
            "ZTUNNEL_CONNECT_TIMEOUT",
            "500ms",
            "1m",
            "10s",
        ),
        (
            "--capture-mode",
            "ZTUNNEL_CAPTURE_MODE",
            "inpod",
            "node",
            "InPod",
        ),
        (
            "--quic-listen",
            "ZTUNNEL_QUIC_LISTEN",
            "false",
            "true",
            "false",
        ),
        (
            "--trust-domain",
            "TRUST_DOMAIN",
            "a.test",
            "b.test",
            "cluster.local",
        ),
        ("--log-format", "ZTUNNEL_LOG_FORMAT", "text", "json", "Text"),
        (
            "--max-buffered-mib",
            "ZTUNNEL_MAX_BUFFERED_MIB",
            "1",
            "2",
            "256",
        ),
        (
            "--max-connections-per-source",
            "ZTUNNEL_MAX_CONNECTIONS_PER_SOURCE",
            "3",
            "4",
            "16384",
        ),
        (
            "--max-proxied-connections",
            "ZTUNNEL_MAX_PROXIED_CONNECTIONS",
            "20000",
            "30000",
            "40000",
        ),
        (
            "--state-dir",
            "ZTUNNEL_STATE_DIR",
            "/f",
            "/e",
            "/var/run/ztunnel",
        ),
    ];
    let show = |v: &str| match v {
        "node" => "Node".to_string(),
        "inpod" => "InPod".into(),
        "json" => "Json".into(),
        "text" => "Text".into(),
        v => v.into(),
    };
    for (flag, key, flag_value, env_value, default) in cases {
        let env = [(*key, *env_value)];
        let from_env = run(BASE, &env).unwrap();
        assert_eq!(shown(&from_env, flag), show(env_value), "{key}");
        let from_flag = run(&[BASE, &[flag, flag_value]].concat(), &env).unwrap();
        assert_eq!(
            shown(&from_flag, flag),
            show(flag_value),
            "{flag} over {key}"
        );
        assert_eq!(shown(&run(BASE, &[]).unwrap(), flag), *default, "{flag}");
    }
    let base = ["--ca-dir", "/ca", "--token-file", "/t"];
    let env = [
        ("ZTUNNEL_CA_LISTEN", "127.0.0.1:1"),
        ("TRUST_DOMAIN", "e.test"),
        ("ZTUNNEL_LOG_FORMAT", "json"),
        ("ZTUNNEL_CA_MAX_LIFETIME", "2h"),
    ];
    let c = ca(&base, &env).unwrap();
    assert_eq!(c.listen, "127.0.0.1:1".parse().unwrap());
    assert_eq!(
        (c.trust_domain.as_str(), c.log_format, c.max_lifetime),
        ("e.test", LogFormat::Json, Duration::from_secs(7200))
    );
    let flags = [
        "--listen",
        "[::1]:2",
        "--trust-domain",
        "f.test",
        "--log-format",
        "text",
    ];
    let c = ca(&[&base[..], &flags].concat(), &env).unwrap();
    assert_eq!(c.listen, "[::1]:2".parse().unwrap());
    assert_eq!(
        (c.trust_domain.as_str(), c.log_format),
        ("f.test", LogFormat::Text)
    );
    let c = ca(&base, &[]).unwrap();
    assert_eq!(c.listen, "0.0.0.0:15012".parse().unwrap());
    assert_eq!(
        (c.trust_domain.as_str(), c.log_format, c.max_lifetime),
        (
            "cluster.local",
            LogFormat::Text,
            Duration::from_secs(86_400)
        )
    );
    assert_eq!(
        c.server_names,
        ["ztunnel-ca.ztunnel-system.svc", "localhost"]
    );
    let c = ca(
        &[
            &base[..],
            &["--server-name", "x.svc", "--server-name", "y.svc"],
        ]
        .concat(),
        &[],
    )
    .unwrap();
    assert_eq!(c.server_names, ["x.svc", "y.svc"], "repeatable");
}

/// An invalid value from the environment is refused naming the variable and the reason; it is
/// not even read when the flag is given.
#[test]
fn invalid_environment_values_name_the_variable() {
    type Case<'a> = (&'a str, &'a str, &'a str);
    let cases: &[Case<'_>] = &[
        ("ZTUNNEL_POOL_MAX_STREAMS", "0", "must be 1 to 10000"),
        (
            "ZTUNNEL_ADMIN_ADDR",
            "0.0.0.0:1",
            "the admin API is served on loopback only",
        ),
        (
            "ZTUNNEL_METRICS_ADDR",
            "metrics",
            "invalid socket address syntax",
        ),
        ("ZTUNNEL_CONNECT_TIMEOUT", "10ms", "must be at least 100ms"),
        (
            "ZTUNNEL_DRAIN_GRACE",
            "300000000000y",
            "must be at most 10years",
        ),
        ("ZTUNNEL_LOG_FORMAT", "xml", "must be text or json"),
        ("ZTUNNEL_CAPTURE_MODE", "host", "must be inpod or node"),
        ("ZTUNNEL_QUIC_LISTEN", "1", "must be true or false"),
        ("TRUST_DOMAIN", "Bad Domain", ""),
        ("ZTUNNEL_ROOT_NAMESPACE", "Bad_Name", "not a namespace name"),
        ("CLUSTER_ID", "a b", "must be non-empty printable ASCII"),
    ];
    for (key, value, reason) in cases {
        let e = run(BASE, &[(key, value)]).unwrap_err().to_string();
        let want = format!("invalid {key} {value:?}: {reason}");
        assert!(e.contains(&want), "want {want:?} in {e}");
        let flag = format!(
            "--{}",
            key.trim_start_matches("ZTUNNEL_")
                .to_lowercase()
                .replace('_', "-")
        );
        let good = match *key {
            "ZTUNNEL_POOL_MAX_STREAMS" => "1",
            "ZTUNNEL_ADMIN_ADDR" | "ZTUNNEL_METRICS_ADDR" => "127.0.0.1:1",
            "ZTUNNEL_CONNECT_TIMEOUT" | "ZTUNNEL_DRAIN_GRACE" => "1s",
            "ZTUNNEL_LOG_FORMAT" => "json",
            "ZTUNNEL_CAPTURE_MODE" => "node",
            "ZTUNNEL_QUIC_LISTEN" => "true",
            "TRUST_DOMAIN" => "a.test",
            "ZTUNNEL_ROOT_NAMESPACE" => "mesh",
            _ => "c1",
        };
        let r = run(&[BASE, &[&flag, good]].concat(), &[(key, value)]);
        assert!(r.is_ok(), "{flag} {good} over {key}={value}: {r:?}");
    }
    let e = ca(&["--ca-dir", "/ca"], &[("ZTUNNEL_CA_AUTHORIZER", "oidc")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("invalid ZTUNNEL_CA_AUTHORIZER \"oidc\": must be static or kubernetes"),
        "{e}"
    );
    // A check across two settings names each as it was given.
    let e = run(BASE, &[("ZTUNNEL_MAX_PENDING_HANDSHAKES", "4")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("invalid --max-pending-handshakes-per-peer \"256\": must not exceed ZTUNNEL_MAX_PENDING_HANDSHAKES (4)"),
        "{e}"
    );
}

/// A missing setting names its flags and its variables.
#[test]
fn missing_settings_name_flag_and_variable() {
    let e = run(&["--discovery-file", "/m"], &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("node name is required (flag --node-name or environment NODE_NAME)"),
        "{e}"
    );
    let e = ca(&["--token-file", "/t"], &[]).unwrap_err().to_string();
    assert!(
        e.contains("CA directory or secret is required (flag --ca-dir or --ca-secret or environment ZTUNNEL_CA_DIR or ZTUNNEL_CA_SECRET)"),
        "{e}"
    );
}

/// `--help` shows each flag's variable (not its value) and default, from clap; every flag has
/// a variable.
#[test]
fn help_shows_variables_and_defaults() {
    let run_help = settings::command::<RunArgs>()
        .render_long_help()
        .to_string();
    for part in [
        "[env: NODE_NAME]",
        "[env: ZTUNNEL_POOL_MAX_STREAMS]",
        "[default: 100]",
        "[env: ZTUNNEL_CERT_LIFETIME]",
        "[default: 24h]",
        "[env: TRUST_DOMAIN]",
        "[default: cluster.local]",
        "[env: ZTUNNEL_MAX_PENDING_HANDSHAKES]",
        "[default: 2048]",
        "[possible values: file, kubernetes]",
        "- inpod: Inside each enrolled pod's netns",
    ] {
        assert!(run_help.contains(part), "{part} in {run_help}");
    }
    let ca_help = settings::command::<super::super::ca::CaArgs>()
        .render_long_help()
        .to_string();
    for part in [
        "[env: ZTUNNEL_CA_LISTEN]",
        "[default: 0.0.0.0:15012]",
        "[env: ZTUNNEL_LOG_FORMAT]",
        "[env: ZTUNNEL_CA_PEER_REQUEST_RATE]",
        "[default: 20]",
    ] {
        assert!(ca_help.contains(part), "{part} in {ca_help}");
    }
    for cmd in [
        settings::command::<RunArgs>(),
        settings::command::<super::super::ca::CaArgs>(),
    ] {
        for arg in cmd.get_arguments() {
            assert!(arg.get_env().is_some(), "{} has no variable", arg.get_id());
        }
    }
    // As `ztunnel run --help` prints it.
    match run(&["--help"], &[("ZTUNNEL_POOL_MAX_STREAMS", "0")]) {
        Err(ConfigError::Cli(e)) => {
            assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp);
            assert!(
                e.to_string().contains("[env: ZTUNNEL_POOL_MAX_STREAMS]"),
                "{e}"
            );
        }
        other => panic!("{other:?}"),
    }
}

/// A variable of a setting that the chosen mode leaves unused is read as given, even empty:
/// a path is any text.
#[test]
fn empty_path_variables_are_taken_as_given() {
    let c = run(BASE, &[("KUBECONFIG", "")]).unwrap();
    assert!(matches!(c.discovery, super::DiscoverySource::File(_)));
    let kube = ["--node-name", "n1", "--discovery-source", "kubernetes"];
    let c = run(&kube, &[("KUBECONFIG", "")]).unwrap();
    assert_eq!(
        c.discovery,
        super::DiscoverySource::Kubernetes {
            kubeconfig: Some("".into())
        }
    );
}
