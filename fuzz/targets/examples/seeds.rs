//! Writes the generated part of the seed corpus: inputs that only the product's own encoders
//! make well (enrollment frames, QUIC stream headers, CSRs and certificates, CNI invocations
//! as a runtime makes them). Run from the repository root:
//! `cargo run -p ztunnel-fuzz-targets --example seeds -- fuzz/corpus`. The hand-written seeds
//! (CONNECT requests, SPIFFE IDs, YAML) are files in the corpus directly.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use ztunnel::identity::{generate_csr, parse_pem_certs, Identity};
use ztunnel_proto::enroll::{self, Attachment, ErrorKind, PodAdd, PodDel, PodRef, Reply, Request};
use ztunnel_proto::quic::RequestHeader;

fn write(dir: &Path, target: &str, name: &str, data: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).expect("corpus directory");
    std::fs::write(d.join(name), data).expect("seed");
}

fn frame<T: serde::Serialize>(m: &T) -> Vec<u8> {
    let mut out = Vec::new();
    enroll::write_frame(&mut out, m).expect("frame");
    out
}

fn cni(env: &[(&str, &str)], stdin: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in env {
        out.extend_from_slice(format!("{k}={v}\n").as_bytes());
    }
    out.push(0);
    out.extend_from_slice(stdin.as_bytes());
    out
}

fn main() {
    let dir: PathBuf = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("fuzz/corpus"));

    // Enrollment frames, as the plugin and the daemon write them.
    let pod = PodRef {
        namespace: "demo".into(),
        name: "web-0".into(),
        uid: "6f1c0a".into(),
    };
    let att = Attachment {
        container_id: "c1".into(),
        ifname: "eth0".into(),
    };
    let add = PodAdd {
        attachment: att.clone(),
        netns: "/var/run/netns/cni-1234".into(),
        pod: pod.clone(),
        ips: vec!["10.1.0.5".parse().unwrap(), "fd20:1::5".parse().unwrap()],
    };
    let requests = [
        ("add", Request::Add(add.clone())),
        ("check", Request::Check(add)),
        (
            "del",
            Request::Del(PodDel {
                attachment: att.clone(),
                netns: String::new(),
                pod: Some(pod),
            }),
        ),
        ("status", Request::Status),
        ("gc", Request::Gc { valid: vec![att] }),
    ];
    for (name, r) in &requests {
        write(&dir, "enroll_frame", &format!("request-{name}"), &frame(r));
    }
    let replies = [
        ("enrolled", Reply::Enrolled),
        (
            "not-enrolled",
            Reply::NotEnrolled {
                reason: "namespace demo is not enrolled".into(),
            },
        ),
        ("ok", Reply::Ok),
        (
            "error",
            Reply::Error {
                kind: ErrorKind::TryAgain,
                message: "rules not installed".into(),
            },
        ),
    ];
    for (name, r) in &replies {
        write(&dir, "enroll_frame", &format!("reply-{name}"), &frame(r));
    }

    // QUIC stream headers, as the client writes them.
    let headers = [
        (
            "v4",
            RequestHeader {
                authority: "10.0.0.1:8080".into(),
                ..Default::default()
            },
        ),
        (
            "v6-full",
            RequestHeader {
                authority: "[fd00::2]:8080".into(),
                forwarded: Some("for=\"10.0.0.9:3456\"".into()),
                baggage: Some("k8s.namespace.name=demo,k8s.pod.name=web-0".into()),
                traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            },
        ),
        (
            "reserved-port",
            RequestHeader {
                authority: "10.0.0.1:15008".into(),
                ..Default::default()
            },
        ),
    ];
    for (name, h) in &headers {
        write(&dir, "quic_header", name, &h.encode().expect("header"));
    }

    // CSRs and certificates, as the node and the CA make them.
    let id: Identity = "spiffe://cluster.local/ns/default/sa/default"
        .parse()
        .unwrap();
    let csr = generate_csr(&id).expect("csr");
    write(&dir, "ca_sign", "csr.pem", csr.csr_pem.as_bytes());
    let der = pem::parse(&csr.csr_pem).expect("pem").into_contents();
    write(&dir, "ca_sign", "csr.der", &der);
    let body = ztunnel_proto::ca::SignRequest {
        csr_pem: csr.csr_pem.clone(),
        identity: id.to_string(),
        lifetime_secs: 86400,
    };
    write(
        &dir,
        "ca_sign",
        "request.json",
        &serde_json::to_vec(&body).unwrap(),
    );
    let other: Identity = "spiffe://cluster.local/ns/demo/sa/web".parse().unwrap();
    let mismatch = ztunnel_proto::ca::SignRequest {
        identity: other.to_string(),
        ..body
    };
    write(
        &dir,
        "ca_sign",
        "request-other-identity.json",
        &serde_json::to_vec(&mismatch).unwrap(),
    );
    let m = ztunnel::ca::CaMaterial::generate("cluster.local").expect("material");
    let ca = ztunnel::ca::LocalCa::from_material(&m, "cluster.local").expect("ca");
    let signed = ca
        .sign(
            &ztunnel_proto::ca::SignRequest {
                csr_pem: generate_csr(&other).unwrap().csr_pem,
                identity: other.to_string(),
                lifetime_secs: 3600,
            },
            SystemTime::now(),
        )
        .expect("signed");
    let leaf = parse_pem_certs(&signed.cert_chain_pem[..1]).expect("leaf");
    write(&dir, "peer_cert", "leaf.der", &leaf[0]);
    let root = parse_pem_certs(&signed.roots_pem).expect("root");
    write(&dir, "peer_cert", "root-no-uri-san.der", &root[0]);

    // CNI invocations, as a runtime makes them (tests/harness/cni.rs).
    let prev = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/cni-1234"}],"ips":[{"address":"10.1.0.5/24","gateway":"10.1.0.1","interface":0},{"address":"fd20:1::5/64","interface":0}],"dns":{}}"#;
    let conf = |extra: &str| {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"ztunnel-cni","socket":"/var/run/ztunnel/cni.sock","timeout":"2s","prevResult":{prev}{extra}}}"#
        )
    };
    let env = |cmd: &'static str| {
        vec![
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/cni-1234"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=c1;K8S_POD_UID=6f1c0a",
            ),
        ]
    };
    write(&dir, "cni_plugin", "add", &cni(&env("ADD"), &conf("")));
    let mut e = env("ADD");
    e.push(("REPLY", "notEnrolled"));
    write(&dir, "cni_plugin", "add-not-enrolled", &cni(&e, &conf("")));
    let mut e = env("ADD");
    e.push(("REPLY", "error"));
    write(&dir, "cni_plugin", "add-try-again", &cni(&e, &conf("")));
    write(&dir, "cni_plugin", "check", &cni(&env("CHECK"), &conf("")));
    write(&dir, "cni_plugin", "del", &cni(&env("DEL"), &conf("")));
    write(
        &dir,
        "cni_plugin",
        "version",
        &cni(&env("VERSION"), r#"{"cniVersion":"1.1.0"}"#),
    );
    let mut e = env("STATUS");
    e.push(("REPLY", "ok"));
    write(
        &dir,
        "cni_plugin",
        "status",
        &cni(
            &e,
            r#"{"cniVersion":"1.1.0","name":"k8s-pod-network","type":"ztunnel-cni"}"#,
        ),
    );
    write(
        &dir,
        "cni_plugin",
        "gc",
        &cni(
            &[
                ("CNI_COMMAND", "GC"),
                ("CNI_PATH", "/opt/cni/bin"),
                ("REPLY", "ok"),
            ],
            r#"{"cniVersion":"1.1.0","name":"k8s-pod-network","type":"ztunnel-cni","cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}]}"#,
        ),
    );
    write(
        &dir,
        "cni_plugin",
        "add-0.3.1-no-env",
        r#"{"cniVersion":"0.3.1","name":"k8s","type":"ztunnel-cni","enrolledNamespacesFile":"/var/run/ztunnel/enrolled-namespaces.json","prevResult":{"cniVersion":"0.3.1","ips":[{"version":"4","address":"10.1.0.5/24"}]}}"#.as_bytes(),
    );
}
