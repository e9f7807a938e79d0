//! Table tests of `ztunnel run`'s and `ztunnel ca`'s configuration: defaults, flags over
//! variables over defaults, every refusal and its message, and what `--help` shows.

use std::collections::HashMap;

use super::*;

mod sources;

fn run(args: &[&str], env: &[(&str, &str)]) -> Result<RunConfig, ConfigError> {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut a = vec!["ztunnel run".to_string()];
    a.extend(args.iter().map(|s| s.to_string()));
    RunConfig::from_sources(a, &|k| env.get(k).cloned())
}

const BASE: &[&str] = &["--node-name", "n1", "--discovery-file", "/m.yaml"];

#[test]
fn defaults() {
    let c = run(BASE, &[]).unwrap();
    assert_eq!(c.trust_domain, "cluster.local");
    assert_eq!(c.cluster_domain, "cluster.local");
    assert!(
        c.to_string().contains(" cluster_domain=cluster.local "),
        "{c}"
    );
    assert_eq!(c.tls_key_exchange, KeyExchange::Hybrid);
    assert!(c.to_string().contains(" tls_key_exchange=hybrid "), "{c}");
    assert_eq!(c.crl_path, None);
    assert!(c.to_string().contains(" crl=none "), "{c}");
    assert_eq!(c.ca, CaSource::Dir("/var/lib/ztunnel/ca".into()));
    assert_eq!(c.cert_lifetime, Duration::from_secs(86400));
    assert_eq!(c.inbound_addr.port(), 15008);
    assert_eq!(c.outbound_addr.port(), 15001);
    assert_eq!(c.inbound_plaintext_addr.port(), 15006);
    assert_eq!(c.admin_addr, "127.0.0.1:15000".parse().unwrap());
    assert_eq!(
        (c.metrics_addr.port(), c.readiness_addr.port()),
        (15020, 15021)
    );
    assert_eq!(c.pool_max_streams, 100);
    assert_eq!(
        (c.tunnel.handshakes.total, c.tunnel.handshakes.per_peer),
        (2048, 256)
    );
    assert_eq!(c.tunnel.tls_first_bytes_timeout, Duration::from_secs(2));
    assert_eq!(c.tunnel, crate::proxy::TunnelLimits::default());
    // The defaults the README's table gives, as numbers.
    let p = &c.tunnel.peers;
    assert_eq!(
        (
            p.connections_per_address,
            p.connections_per_identity,
            p.streams_per_address,
            p.streams_per_identity
        ),
        (256, 1024, 16_384, 65_536)
    );
    assert_eq!(c.tunnel.buffered_bytes, 256 << 20);
    assert_eq!(c.tunnel.connections_per_source, 16_384);
    assert_eq!(c.tunnel.proxied_connections, 40_000);
    // Left to its default, the node's cap on the pods' outbound connections is at least one
    // pod's.
    let c = run(
        &["--node-name", "n1", "--discovery-file", "/m"],
        &[("ZTUNNEL_MAX_CONNECTIONS_PER_SOURCE", "50000")],
    )
    .unwrap();
    assert_eq!(c.tunnel.proxied_connections, 50_000);
    assert_eq!(c.drain_grace, Duration::from_secs(30));
    assert_eq!(c.connect_timeout, Duration::from_secs(10));
    assert!(c.to_string().contains(" tls_first_bytes_timeout=2s "));
    assert_eq!(c.pool_idle_timeout, Duration::from_secs(300));
    assert!(!c.quic_listen, "QUIC is off unless asked for");
    assert!(c.quic_destinations.is_empty());
    assert_eq!(c.log_format, LogFormat::Text);
    assert_eq!(c.log_filter, "info");
    assert_eq!(c.host_proc, PathBuf::from("/proc"));
    assert_eq!(c.worker_threads, 2, "not one thread per core");
    assert!(c.to_string().contains(" worker_threads=2 "));
    assert_eq!(
        c.enrolled_namespaces_file,
        PathBuf::from("/var/run/ztunnel/enrolled-namespaces.json")
    );
}

/// The enrolled-namespaces file follows the state directory unless it is set itself (the
/// flag over the environment).
#[test]
fn enrolled_namespaces_file() {
    let file = |args: &[&str], env: &[(&str, &str)]| {
        run(&[BASE, args].concat(), env)
            .unwrap()
            .enrolled_namespaces_file
    };
    assert_eq!(
        file(&["--state-dir", "/s"], &[]),
        PathBuf::from("/s/enrolled-namespaces.json")
    );
    let env = [("ZTUNNEL_ENROLLED_NAMESPACES_FILE", "/var/lib/z/ns.json")];
    assert_eq!(
        file(&["--state-dir", "/s"], &env),
        PathBuf::from("/var/lib/z/ns.json")
    );
    assert_eq!(
        file(&["--enrolled-namespaces-file", "/f.json"], &env),
        PathBuf::from("/f.json")
    );
}

#[test]
fn quic_settings() {
    let env = [
        ("ZTUNNEL_QUIC_LISTEN", "true"),
        (
            "ZTUNNEL_QUIC_DESTINATIONS",
            " 10.0.0.0/8, fd00::/64,192.0.2.7 ,",
        ),
    ];
    let c = run(BASE, &env).unwrap();
    assert!(c.quic_listen);
    let want: Vec<ipnet::IpNet> = ["10.0.0.0/8", "fd00::/64", "192.0.2.7/32"]
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(c.quic_destinations, want);
    assert!(c
        .to_string()
        .contains("quic_listen=true quic_destinations=[10.0.0.0/8,fd00::/64,192.0.2.7/32]"));
    let mut a = BASE.to_vec();
    a.extend(["--quic-listen", "false", "--quic-destinations", ""]);
    let c = run(&a, &env).unwrap();
    assert!(!c.quic_listen, "the flag wins over the environment");
    assert!(c.quic_destinations.is_empty());
}

#[test]
fn environment_and_flag_precedence() {
    let env = [
        ("NODE_NAME", "from-env"),
        ("ZTUNNEL_DISCOVERY_FILE", "/e.yaml"),
        ("ZTUNNEL_CERT_LIFETIME", "1h"),
        ("RUST_LOG", "debug"),
        ("ZTUNNEL_HOST_PROC", "/host/proc"),
        ("ZTUNNEL_WORKER_THREADS", "4"),
        ("ZTUNNEL_TLS_FIRST_BYTES_TIMEOUT", "1500ms"),
        ("ZTUNNEL_TLS_KEY_EXCHANGE", "pqc-only"),
        ("ZTUNNEL_CRL_PATH", "/etc/ztunnel/crl/ca-crl.pem"),
    ];
    let c = run(&[], &env).unwrap();
    assert_eq!(
        c.crl_path.as_deref(),
        Some(std::path::Path::new("/etc/ztunnel/crl/ca-crl.pem"))
    );
    assert!(
        c.to_string().contains(" crl=/etc/ztunnel/crl/ca-crl.pem "),
        "{c}"
    );
    assert_eq!(
        run(&["--crl-path", "/srv/crl.pem"], &env)
            .unwrap()
            .crl_path
            .as_deref(),
        Some(std::path::Path::new("/srv/crl.pem")),
        "the flag wins over the environment"
    );
    assert_eq!(c.worker_threads, 4);
    assert_eq!(c.tls_key_exchange, KeyExchange::PqcOnly);
    assert!(c.to_string().contains(" tls_key_exchange=pqc-only "), "{c}");
    assert_eq!(
        run(&["--tls-key-exchange", "hybrid"], &env)
            .unwrap()
            .tls_key_exchange,
        KeyExchange::Hybrid
    );
    assert_eq!(
        c.tunnel.tls_first_bytes_timeout,
        Duration::from_millis(1500)
    );
    assert_eq!(
        run(&["--tls-first-bytes-timeout", "10s"], &env)
            .unwrap()
            .tunnel
            .tls_first_bytes_timeout,
        Duration::from_secs(10)
    );
    assert_eq!(c.node_name, "from-env");
    assert_eq!(c.host_proc, PathBuf::from("/host/proc"));
    assert_eq!(
        run(&["--host-proc", "/hp"], &env).unwrap().host_proc,
        PathBuf::from("/hp")
    );
    assert_eq!(c.cert_lifetime, Duration::from_secs(3600));
    assert_eq!(c.log_filter, "debug");
    let c = run(
        &["--node-name", "from-flag", "--cert-lifetime", "10m"],
        &env,
    )
    .unwrap();
    assert_eq!(c.node_name, "from-flag");
    assert_eq!(c.cert_lifetime, Duration::from_secs(600));
}

/// (flags, environment, expected error text)
type InvalidCase<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[test]
fn invalid_values() {
    let cases: &[InvalidCase<'_>] = &[
        (&["--discovery-file", "/m"], &[], "node name is required"),
        (&["--node-name", "n"], &[], "discovery file is required"),
        (&["--cert-lifetime", "1s"], &[], "at least"),
        (&["--cert-lifetime", "soon"], &[], "invalid --cert-lifetime \"soon\""),
        (&["--admin-addr", "0.0.0.0:15000"], &[], "loopback"),
        (&["--inbound-addr", "nowhere"], &[], "invalid --inbound-addr"),
        (&["--pool-max-streams", "0"], &[], "1 to 10000"),
        (&[], &[("ZTUNNEL_WORKER_THREADS", "0")], "1 to 1024"),
        (&["--worker-threads", "all"], &[], "invalid --worker-threads"),
        (&["--max-pending-handshakes", "0"], &[], "1 to 1000000"),
        (
            &[],
            &[("ZTUNNEL_MAX_PENDING_HANDSHAKES_PER_PEER", "many")],
            "invalid ZTUNNEL_MAX_PENDING_HANDSHAKES_PER_PEER \"many\"",
        ),
        (
            &["--max-pending-handshakes", "10"],
            &[],
            "invalid --max-pending-handshakes-per-peer \"256\": must not exceed --max-pending-handshakes (10)",
        ),
        (
            &["--max-proxied-connections", "1000"],
            &[],
            "invalid --max-connections-per-source \"16384\": must not exceed --max-proxied-connections (1000)",
        ),
        (&[], &[("ZTUNNEL_MAX_PROXIED_CONNECTIONS", "0")], "1 to 1000000"),
        (
            &["--max-connections-per-source", "50000"],
            &[("ZTUNNEL_MAX_PROXIED_CONNECTIONS", "40000")],
            "invalid --max-connections-per-source \"50000\": must not exceed ZTUNNEL_MAX_PROXIED_CONNECTIONS (40000)",
        ),
        (
            &["--tls-first-bytes-timeout", "50ms"],
            &[],
            "at least 100ms",
        ),
        (
            &[],
            &[("ZTUNNEL_TLS_FIRST_BYTES_TIMEOUT", "11s")],
            "ZTUNNEL_TLS_FIRST_BYTES_TIMEOUT \"11s\": must be at most 10s",
        ),
        (
            &["--tls-first-bytes-timeout", "soon"],
            &[],
            "invalid --tls-first-bytes-timeout",
        ),
        (&["--trust-domain", "Bad Domain"], &[], "invalid --trust-domain"),
        (&["--cluster-domain", "Corp.Local"], &[], "invalid --cluster-domain"),
        (&[], &[("CLUSTER_DOMAIN", "corp..local")], "not a DNS domain"),
        (&["--cluster-domain", ""], &[], "invalid --cluster-domain"),
        (&["--quic-listen", "yes"], &[], "invalid --quic-listen"),
        (
            &[],
            &[("ZTUNNEL_TLS_KEY_EXCHANGE", "x25519")],
            "hybrid or pqc-only",
        ),
        (
            &[],
            &[("ZTUNNEL_QUIC_DESTINATIONS", "10.0.0.0/8,pods")],
            "\"pods\" is not a CIDR",
        ),
        (&["--log-format", "xml"], &[], "text or json"),
        (
            &["--ca-dir", "/ca", "--ca-address", "ca:15012"],
            &[],
            "exclusive",
        ),
        (
            &["--ca-address", "ca:15012"],
            &[],
            "CA root certificate is required",
        ),
        (
            &["--ca-address", "ca:15012", "--ca-root-cert", "/r.pem"],
            &[],
            "CA token file is required",
        ),
        (&["--no-such-flag"], &[], "no-such-flag"),
    ];
    for (args, env, want) in cases {
        let mut a: Vec<&str> = BASE.to_vec();
        a.extend_from_slice(args);
        if args.first() == Some(&"--discovery-file") || args.first() == Some(&"--node-name") {
            a = args.to_vec();
        }
        let e = run(&a, env).unwrap_err().to_string();
        assert!(e.contains(want), "{args:?}: want {want:?} in {e}");
    }
}

#[test]
fn discovery_source() {
    let n = ["--node-name", "n1"];
    // (args, env, want source or error)
    type Case<'a> = (
        &'a [&'a str],
        &'a [(&'a str, &'a str)],
        Result<DiscoverySource, &'a str>,
    );
    let cases: &[Case<'_>] = &[
        (
            &["--discovery-file", "/m"],
            &[],
            Ok(DiscoverySource::File("/m".into())),
        ),
        (
            &["--discovery-source", "file", "--discovery-file", "/m"],
            &[],
            Ok(DiscoverySource::File("/m".into())),
        ),
        (
            &["--discovery-source", "kubernetes"],
            &[],
            Ok(DiscoverySource::Kubernetes { kubeconfig: None }),
        ),
        (
            &[],
            &[
                ("ZTUNNEL_DISCOVERY_SOURCE", "kubernetes"),
                ("KUBECONFIG", "/k"),
            ],
            Ok(DiscoverySource::Kubernetes {
                kubeconfig: Some("/k".into()),
            }),
        ),
        (
            &["--discovery-source", "kubernetes", "--kubeconfig", "/f"],
            &[("KUBECONFIG", "/k")],
            Ok(DiscoverySource::Kubernetes {
                kubeconfig: Some("/f".into()),
            }),
        ),
        (
            &["--discovery-source", "file"],
            &[],
            Err("discovery file is required"),
        ),
        (
            &["--discovery-source", "etcd"],
            &[],
            Err("file or kubernetes"),
        ),
        (
            &["--discovery-source", "kubernetes", "--discovery-file", "/m"],
            &[],
            Err("not kubernetes"),
        ),
    ];
    for (args, env, want) in cases {
        let got = run(&[&n[..], args].concat(), env);
        match (got, want) {
            (Ok(c), Ok(w)) => {
                assert_eq!(&c.discovery, w, "{args:?}");
                assert!(c.to_string().contains("discovery=["), "{c}");
            }
            (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{args:?}: {e}"),
            (got, want) => panic!("{args:?}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn remote_ca_and_display_redacts_the_token() {
    let c = run(
        &[
            BASE,
            &[
                "--ca-address",
                "ca:15012",
                "--ca-root-cert",
                "/r.pem",
                "--ca-token-file",
                "/t",
            ],
        ]
        .concat(),
        &[],
    )
    .unwrap();
    assert!(
        matches!(&c.ca, CaSource::Remote { server_name, .. } if server_name == "ztunnel-ca.ztunnel-system.svc")
    );
    let shown = c.to_string();
    assert!(shown.contains("token from /t <redacted>"), "{shown}");
    assert!(shown.contains("node=n1"));
}

#[test]
fn ca_config() {
    let env: HashMap<String, String> = [("ZTUNNEL_CA_SERVER_NAMES", "a.svc, b.svc")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let args = ["ztunnel ca", "--ca-dir", "/ca", "--token-file", "/t"]
        .map(String::from)
        .to_vec();
    let c = CaConfig::from_sources(args, &|k| env.get(k).cloned()).unwrap();
    assert_eq!(c.server_names, ["a.svc", "b.svc"]);
    assert_eq!(c.listen.port(), 15012);
    assert_eq!(c.tls_key_exchange, KeyExchange::Hybrid);
    assert_eq!(c.limits, CaLimits::default());
    assert_eq!(
        (c.limits.burst.get(), c.limits.refill),
        (256, Duration::from_millis(50))
    );
    let c = ca(
        &[
            "--ca-dir",
            "/ca",
            "--token-file",
            "/t",
            "--peer-request-burst",
            "10",
        ],
        &[
            ("ZTUNNEL_CA_PEER_REQUEST_RATE", "4"),
            ("ZTUNNEL_TLS_KEY_EXCHANGE", "pqc-only"),
        ],
    )
    .unwrap();
    assert_eq!(c.tls_key_exchange, KeyExchange::PqcOnly);
    assert!(c.to_string().contains(" tls_key_exchange=pqc-only "), "{c}");
    assert_eq!(
        (c.limits.burst.get(), c.limits.refill),
        (10, Duration::from_millis(250))
    );
    assert!(c.to_string().contains("peer_request_burst=10"), "{c}");
    for (flag, value) in [
        ("--peer-request-burst", "0"),
        ("--peer-request-rate", "0"),
        ("--peer-request-rate", "fast"),
    ] {
        let e = ca(&["--ca-dir", "/ca", "--token-file", "/t", flag, value], &[]).unwrap_err();
        assert!(
            e.to_string().contains(&format!("invalid {flag} {value:?}")),
            "{flag} {value}: {e}"
        );
    }
    let e = CaConfig::from_sources(
        vec!["ztunnel ca".into(), "--ca-dir".into(), "/ca".into()],
        &|_| None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("token file"), "{e}");
}

#[test]
fn ca_config_caps_and_timeouts() {
    use crate::gate::Limits;
    let base = ["--ca-dir", "/ca", "--token-file", "/t"];
    let d = CaLimits::default();
    let shown = ca(&base, &[]).unwrap().to_string();
    for part in [
        "max_connections=4096 max_connections_per_peer=32",
        "max_requests_in_flight=1024 max_requests_in_flight_per_peer=64",
        "handshake_timeout=10s idle_timeout=1m",
    ] {
        assert!(shown.contains(part), "{part}: {shown}");
    }
    let lim = |total, per_peer| Limits { total, per_peer };
    // (flags, environment, connections, requests in flight, handshake and idle timeouts)
    type Want = (Limits, Limits, Duration, Duration);
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], Want);
    let cases: &[Case<'_>] = &[
        (
            &[],
            &[],
            (
                d.connections,
                d.requests_in_flight,
                d.handshake_timeout,
                d.idle_timeout,
            ),
        ),
        (
            &[
                "--max-connections",
                "100",
                "--max-connections-per-peer",
                "100",
                "--max-requests-in-flight",
                "10",
                "--max-requests-in-flight-per-peer",
                "1",
                "--handshake-timeout",
                "100ms",
                "--idle-timeout",
                "1d",
            ],
            &[],
            (
                lim(100, 100),
                lim(10, 1),
                Duration::from_millis(100),
                Duration::from_secs(86_400),
            ),
        ),
        (
            &["--max-connections", "64"],
            &[
                ("ZTUNNEL_CA_MAX_CONNECTIONS", "1"),
                ("ZTUNNEL_CA_MAX_CONNECTIONS_PER_PEER", "8"),
                ("ZTUNNEL_CA_MAX_REQUESTS_IN_FLIGHT", "1000000"),
                ("ZTUNNEL_CA_MAX_REQUESTS_IN_FLIGHT_PER_PEER", "1000000"),
                ("ZTUNNEL_CA_HANDSHAKE_TIMEOUT", "1m"),
                ("ZTUNNEL_CA_IDLE_TIMEOUT", "1s"),
            ],
            (
                lim(64, 8),
                lim(1_000_000, 1_000_000),
                Duration::from_secs(60),
                Duration::from_secs(1),
            ),
        ),
    ];
    for (flags, env, (connections, in_flight, handshake, idle)) in cases {
        let c = ca(&[&base[..], flags].concat(), env).unwrap();
        let got = c.limits;
        assert_eq!(
            (
                got.connections,
                got.requests_in_flight,
                got.handshake_timeout,
                got.idle_timeout
            ),
            (*connections, *in_flight, *handshake, *idle),
            "{flags:?} {env:?}"
        );
        // The rest keeps its defaults.
        assert_eq!(
            (got.burst, got.refill, got.streams_per_connection),
            (d.burst, d.refill, d.streams_per_connection),
        );
        assert_eq!(got.request_timeout, d.request_timeout);
    }
    // (flags, expected error text)
    let bad: &[(&[&str], &str)] = &[
        (
            &["--max-connections", "0"],
            "invalid --max-connections \"0\": must be 1 to 1000000",
        ),
        (&["--max-connections", "1000001"], "must be 1 to 1000000"),
        (
            &["--max-connections-per-peer", "0"],
            "invalid --max-connections-per-peer",
        ),
        (&["--max-connections", "many"], "invalid --max-connections"),
        (
            &[
                "--max-connections",
                "16",
                "--max-connections-per-peer",
                "17",
            ],
            "must not exceed --max-connections (16)",
        ),
        (
            &["--max-connections-per-peer", "4097"],
            "must not exceed --max-connections (4096)",
        ),
        (
            &["--max-requests-in-flight", "0"],
            "invalid --max-requests-in-flight",
        ),
        (
            &["--max-requests-in-flight-per-peer", "1025"],
            "must not exceed --max-requests-in-flight (1024)",
        ),
        (&["--handshake-timeout", "99ms"], "at least 100ms"),
        (&["--handshake-timeout", "61s"], "at most 1m"),
        (
            &["--handshake-timeout", "soon"],
            "invalid --handshake-timeout",
        ),
        (&["--idle-timeout", "999ms"], "at least 1s"),
        (&["--idle-timeout", "2d"], "at most 1day"),
    ];
    for (flags, want) in bad {
        let e = ca(&[&base[..], flags].concat(), &[]).unwrap_err();
        assert!(e.to_string().contains(want), "{flags:?}: {e}");
    }
}

fn ca(args: &[&str], env: &[(&str, &str)]) -> Result<CaConfig, ConfigError> {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut a = vec!["ztunnel ca".to_string()];
    a.extend(args.iter().map(|s| s.to_string()));
    CaConfig::from_sources(a, &|k| env.get(k).cloned())
}

#[test]
fn ca_config_kubernetes() {
    let c = ca(
        &[
            "--authorizer",
            "kubernetes",
            "--ca-secret",
            "ztunnel-system/ca",
        ],
        &[],
    )
    .unwrap();
    let ns = |s: &str| s.parse::<NamespacedName>().unwrap();
    assert_eq!(
        c.material,
        CaMaterialSource::Secret(ns("ztunnel-system/ca"))
    );
    assert_eq!(
        c.authorizer,
        CaAuthorizer::Kubernetes {
            audience: "ztunnel-ca".into(),
            daemon_service_account: ns("ztunnel-system/ztunnel"),
        }
    );
    let shown = c.to_string();
    assert!(shown.contains("ca_secret=ztunnel-system/ca"), "{shown}");
    let c = ca(
        &["--token-audience", "flag-aud"],
        &[
            ("ZTUNNEL_CA_AUTHORIZER", "kubernetes"),
            ("ZTUNNEL_CA_SECRET", "sys/ca"),
            ("ZTUNNEL_CA_TOKEN_AUDIENCE", "env-aud"),
            ("ZTUNNEL_CA_DAEMON_SERVICE_ACCOUNT", "kube-system/zt"),
        ],
    )
    .unwrap();
    assert_eq!(
        c.authorizer,
        CaAuthorizer::Kubernetes {
            audience: "flag-aud".into(),
            daemon_service_account: ns("kube-system/zt"),
        }
    );
    // (flags, expected error text)
    let cases: &[(&[&str], &str)] = &[
        (
            &["--authorizer", "kubernetes"],
            "CA directory or secret is required",
        ),
        (
            &[
                "--ca-dir",
                "/ca",
                "--ca-secret",
                "a/b",
                "--authorizer",
                "kubernetes",
            ],
            "exclusive",
        ),
        (
            &["--ca-secret", "nons", "--authorizer", "kubernetes"],
            "invalid --ca-secret",
        ),
        (
            &["--ca-secret", "a/B", "--authorizer", "kubernetes"],
            "invalid --ca-secret",
        ),
        (
            &["--ca-secret", "a/b", "--authorizer", "oidc"],
            "static or kubernetes",
        ),
        (&["--ca-secret", "a/b"], "token file is required"),
        (
            &[
                "--ca-secret",
                "a/b",
                "--authorizer",
                "kubernetes",
                "--token-file",
                "/t",
            ],
            "only for --authorizer static",
        ),
        (
            &[
                "--ca-secret",
                "a/b",
                "--authorizer",
                "kubernetes",
                "--daemon-service-account",
                "zt",
            ],
            "invalid --daemon-service-account",
        ),
        (
            &[
                "--ca-secret",
                "a/b",
                "--authorizer",
                "kubernetes",
                "--token-audience",
                "",
            ],
            "invalid --token-audience",
        ),
    ];
    for (args, want) in cases {
        let e = ca(args, &[]).unwrap_err().to_string();
        assert!(e.contains(want), "{args:?}: want {want:?} in {e}");
    }
}

#[test]
fn excluded_namespaces() {
    let c = run(BASE, &[]).unwrap();
    assert_eq!(c.exclude_namespaces, ["kube-system", "ztunnel-system"]);
    assert!(c
        .to_string()
        .contains(" exclude_namespaces=[kube-system,ztunnel-system] "));
    let c = run(BASE, &[("ZTUNNEL_EXCLUDE_NAMESPACES", "a, b")]).unwrap();
    assert_eq!(c.exclude_namespaces, ["a", "b"]);
    let c = run(BASE, &[("ZTUNNEL_EXCLUDE_NAMESPACES", "")]).unwrap();
    assert!(c.exclude_namespaces.is_empty(), "empty: none");
    let e = run(BASE, &[("ZTUNNEL_EXCLUDE_NAMESPACES", "ok,Not_OK")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"Not_OK\""), "{e}");
}

#[test]
fn cluster_domain_flag_and_env() {
    let c = run(BASE, &[("CLUSTER_DOMAIN", "corp.internal")]).unwrap();
    assert_eq!(c.cluster_domain, "corp.internal");
    let mut a = BASE.to_vec();
    a.extend(["--cluster-domain", "k8s.example.com"]);
    let c = run(&a, &[("CLUSTER_DOMAIN", "corp.internal")]).unwrap();
    assert_eq!(c.cluster_domain, "k8s.example.com", "the flag wins");
}

#[test]
fn root_namespace_flag_env_default() {
    assert_eq!(run(BASE, &[]).unwrap().root_namespace, "ztunnel-system");
    let c = run(BASE, &[("ZTUNNEL_ROOT_NAMESPACE", "istio-system")]).unwrap();
    assert_eq!(c.root_namespace, "istio-system");
    let mut args = BASE.to_vec();
    args.extend(["--root-namespace", "mesh-root"]);
    let c = run(&args, &[("ZTUNNEL_ROOT_NAMESPACE", "istio-system")]).unwrap();
    assert_eq!(c.root_namespace, "mesh-root", "the flag wins");
    assert!(run(BASE, &[("ZTUNNEL_ROOT_NAMESPACE", "Bad_Name")]).is_err());
}

#[test]
fn istio_compat_needs_kubernetes_and_adds_istios_root() {
    let kube = &["--node-name", "n1", "--discovery-source", "kubernetes"];
    let c = run(kube, &[]).unwrap();
    assert_eq!(c.istio_root_namespace, None, "off by default");
    assert_eq!(c.root_namespaces(), ["ztunnel-system"]);
    let c = run(kube, &[("ZTUNNEL_ISTIO_COMPAT", "true")]).unwrap();
    assert_eq!(c.istio_root_namespace.as_deref(), Some("istio-system"));
    assert_eq!(c.root_namespaces(), ["ztunnel-system", "istio-system"]);
    assert!(
        c.to_string()
            .contains("istio_compat=on (root namespace istio-system)"),
        "{c}"
    );
    let mut args = kube.to_vec();
    args.extend([
        "--istio-compat",
        "true",
        "--istio-root-namespace",
        "mesh-root",
    ]);
    let c = run(&args, &[]).unwrap();
    assert_eq!(c.root_namespaces(), ["ztunnel-system", "mesh-root"]);

    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let table: &[Case<'_>] = &[
        (
            BASE,
            &[("ZTUNNEL_ISTIO_COMPAT", "true")],
            "needs --discovery-source kubernetes",
        ),
        (
            kube,
            &[("ZTUNNEL_ISTIO_COMPAT", "yes")],
            "invalid ZTUNNEL_ISTIO_COMPAT",
        ),
        (
            kube,
            &[("ZTUNNEL_ISTIO_ROOT_NAMESPACE", "x")],
            "is for --istio-compat true",
        ),
        (
            kube,
            &[
                ("ZTUNNEL_ISTIO_COMPAT", "true"),
                ("ZTUNNEL_ISTIO_ROOT_NAMESPACE", "Bad_Name"),
            ],
            "invalid ZTUNNEL_ISTIO_ROOT_NAMESPACE",
        ),
    ];
    for (args, env, want) in table {
        let e = run(args, env).unwrap_err().to_string();
        assert!(e.contains(want), "{args:?} {env:?}: {e}");
    }
}

#[test]
fn unknown_variables_are_the_misspelt_settings_only() {
    let names = [
        "ZTUNNEL_QUIC_LISTEN",         // a setting of `run`
        "ZTUNNEL_QUIC_LISTN",          // misspelt
        "ZTUNNEL_CA_LISTEN",           // a setting of `ca`, not of `run`
        "PATH",                        // not ours
        "TRUST_DOMAIN",                // a setting without the prefix
        "ZTUNNEL_SERVICE_HOST",        // Kubernetes' links to a Service named `ztunnel`
        "ZTUNNEL_SERVICE_PORT_ADMIN",  //
        "ZTUNNEL_PORT",                //
        "ZTUNNEL_PORT_15020_TCP_ADDR", //
        "ZTUNNEL_CA_PORT_15012_TCP",   // and to one named `ztunnel-ca`
        "ZTUNNEL_PORTS",               // not a link
    ]
    .map(String::from);
    assert_eq!(
        RunConfig::unknown_variables(names.clone()),
        ["ZTUNNEL_CA_LISTEN", "ZTUNNEL_PORTS", "ZTUNNEL_QUIC_LISTN"]
    );
    assert_eq!(
        CaConfig::unknown_variables(names),
        ["ZTUNNEL_PORTS", "ZTUNNEL_QUIC_LISTEN", "ZTUNNEL_QUIC_LISTN"]
    );
}
