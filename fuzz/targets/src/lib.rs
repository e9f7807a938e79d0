//! The bodies of the fuzz targets: every parser that reads bytes from an untrusted peer, run
//! on arbitrary input with its invariants asserted.
//!
//! Each function takes the raw input, runs the product's own parser on it (the same function
//! the daemon, the CA or the plugin calls) and panics only when an invariant breaks: a parse
//! that renders back to something else, a check that accepts what it must refuse, two paths
//! that should agree and do not. Refusing the input is never a failure.
//!
//! Two callers: the cargo-fuzz project in `fuzz/` (nightly, libFuzzer; one target per
//! function, named as in [`TARGETS`]) and `tests/replay.rs`, which runs every file of the
//! seed corpus (`fuzz/corpus/<target>/`) and of the crash reproducers
//! (`fuzz/regressions/<target>/`) through the same function on stable, under `cargo test`.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, Parts};
use http::{Method, Request, Uri};
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};
use ztunnel::hbone::server::{validate, ConnectTarget};
use ztunnel::identity::Identity;
use ztunnel::refusal::Reason;
use ztunnel_cni::conf::{self, Command, Vars, SUPPORTED_VERSIONS};
use ztunnel_cni::daemon::{CallError, Daemon, Endpoint};
use ztunnel_cni::netns::PodNetns;
use ztunnel_proto::enroll::{self, ErrorKind, FrameError, Reply, Request as EnrollRequest};
use ztunnel_proto::hbone::RESERVED_PORTS;
use ztunnel_proto::quic::{self as wire, RequestHeader};

/// A target's function: the whole input, in one call.
pub type Target = fn(&[u8]);

/// Every target: its name (the directory of its corpus and the file of its cargo-fuzz
/// target) and its function.
pub const TARGETS: &[(&str, Target)] = &[
    ("hbone_connect", hbone_connect),
    ("quic_header", quic_header),
    ("enroll_frame", enroll_frame),
    ("cni_plugin", cni_plugin),
    ("discovery_yaml", discovery_yaml),
    ("istio_convert", istio_convert),
    ("ca_sign", ca_sign),
    ("spiffe_id", spiffe_id),
    ("peer_cert", peer_cert),
];

/// The trust domain of every target that needs one.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// An HTTP/2 `CONNECT` as the HBONE server receives it, validated by
/// [`ztunnel::hbone::server::validate`].
///
/// Input, split on `\n`: the method, then the `:authority` (a URI with a scheme or a path
/// when it is not an authority alone), then `name: value` header lines. The request is
/// validated on a connection whose local address is the authority's own IP (when it is one)
/// and on one at `10.0.0.1`. An accepted request must name a local, non-reserved target
/// whose rendering parses back to it, and must be accepted alike after the trip through the
/// QUIC stream header (what the QUIC server validates).
pub fn hbone_connect(data: &[u8]) {
    let mut lines = data.split(|b| *b == b'\n');
    let Some(Ok(method)) = lines.next().map(Method::from_bytes) else {
        return;
    };
    let Some(uri) = lines.next().and_then(uri_of) else {
        return;
    };
    let mut req = Request::builder().method(method).uri(uri);
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii_start());
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            req = req.header(n, v);
        }
    }
    let Ok(req) = req.body(()) else { return };
    for local in local_ips(req.uri().authority().map(Authority::as_str)) {
        let verdict = validate(&req, local);
        check_connect(&req, local, &verdict);
        if let Ok(t) = &verdict {
            // What the QUIC server validates: a stream header with this request's fields.
            let h = quic_header_of(&req);
            let again = ztunnel::hbone::quic::request_of(&h)
                .expect("an accepted authority makes a request again");
            assert_eq!(
                validate(&again, local).as_ref(),
                Ok(t),
                "the QUIC header of {req:?} ({h:?}) validates differently"
            );
            if let Ok(bytes) = h.encode() {
                assert_eq!(decode_header(&bytes), Some(h), "stream header round trip");
            }
        }
    }
}

/// The QUIC stream header a peer sends for the request that `req` is on HTTP/2.
fn quic_header_of(req: &Request<()>) -> RequestHeader {
    let get = |name: &str| {
        let v = req.headers().get(name)?.to_str().ok()?;
        Some(v.to_owned())
    };
    RequestHeader {
        authority: req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default(),
        forwarded: get(ztunnel_proto::hbone::FORWARDED),
        baggage: get(ztunnel_proto::hbone::BAGGAGE),
        traceparent: get(ztunnel_proto::hbone::TRACEPARENT),
    }
}

fn uri_of(line: &[u8]) -> Option<Uri> {
    // h2 gives a classic CONNECT an authority and nothing else.
    if let Ok(a) = Authority::try_from(line) {
        let mut parts = Parts::default();
        parts.authority = Some(a);
        return Uri::from_parts(parts).ok();
    }
    Uri::try_from(line).ok()
}

fn local_ips(authority: Option<&str>) -> Vec<IpAddr> {
    let mut ips = vec![IpAddr::from([10, 0, 0, 1])];
    if let Some(addr) = authority.and_then(|a| a.parse::<SocketAddr>().ok()) {
        ips.push(addr.ip());
    }
    ips
}

/// What an accepted CONNECT must be.
fn check_connect(req: &Request<()>, local: IpAddr, verdict: &Result<ConnectTarget, Reason>) {
    let Ok(t) = verdict else { return };
    assert_eq!(req.method(), Method::CONNECT, "accepted {req:?}");
    let target = match &t.authority {
        ztunnel::hbone::server::Authority::Addr(a) => *a,
        ztunnel::hbone::server::Authority::Service { host, .. } => {
            assert!(
                host.parse::<IpAddr>().is_err() && !host.is_empty(),
                "a service hostname that is no name: {req:?}"
            );
            assert_eq!(host, &host.to_ascii_lowercase(), "{req:?}");
            return;
        }
    };
    assert_eq!(
        target.ip().to_canonical(),
        local.to_canonical(),
        "accepted a foreign authority: {req:?}"
    );
    assert!(
        !RESERVED_PORTS.contains(&target.port()),
        "accepted a reserved port: {req:?}"
    );
    let rendered = ztunnel::hbone::authority(target);
    assert_eq!(
        rendered.parse::<SocketAddr>().ok(),
        Some(target),
        "{rendered}"
    );
}

/// Decodes a whole stream header as the QUIC server reads it (prefix, then exactly the
/// fields it announces); `None` when refused or incomplete.
fn decode_header(b: &[u8]) -> Option<RequestHeader> {
    let prefix: [u8; wire::PREFIX_LEN] = b.get(..wire::PREFIX_LEN)?.try_into().ok()?;
    let len = RequestHeader::fields_len(prefix).ok()?;
    let fields = b.get(wire::PREFIX_LEN..wire::PREFIX_LEN + len)?;
    RequestHeader::decode_fields(fields).ok()
}

/// The first bytes of a QUIC stream: the request header, read as
/// [`ztunnel::hbone::quic::read_header`] reads it, then validated as a `CONNECT`. A decoded
/// header re-encodes to as many bytes and decodes to itself; an accepted one names a local,
/// non-reserved target. The first three bytes are also read as a response header.
pub fn quic_header(data: &[u8]) {
    if let Some(resp) = data.get(..wire::RESPONSE_LEN) {
        let resp: [u8; wire::RESPONSE_LEN] = resp.try_into().expect("three bytes");
        if let Ok(status) = wire::decode_response(resp) {
            assert_eq!(wire::encode_response(status), resp);
        }
    }
    let Some(prefix) = data.get(..wire::PREFIX_LEN) else {
        return;
    };
    let prefix: [u8; wire::PREFIX_LEN] = prefix.try_into().expect("three bytes");
    let Ok(len) = RequestHeader::fields_len(prefix) else {
        return;
    };
    assert!(len <= wire::MAX_FIELDS_LEN);
    let Some(fields) = data.get(wire::PREFIX_LEN..wire::PREFIX_LEN + len) else {
        return;
    };
    let Ok(h) = RequestHeader::decode_fields(fields) else {
        return;
    };
    let bytes = h.encode().expect("a decoded header encodes");
    assert_eq!(bytes.len(), wire::PREFIX_LEN + len, "{h:?}");
    assert_eq!(decode_header(&bytes).as_ref(), Some(&h));
    let Some(req) = ztunnel::hbone::quic::request_of(&h) else {
        return;
    };
    for local in local_ips(Some(&h.authority)) {
        check_connect(&req, local, &validate(&req, local));
    }
}

/// One frame on the enrollment socket, as the daemon reads a request
/// ([`enroll::frame_len`], [`enroll::decode`]) and the plugin reads a reply. A decoded message
/// re-encodes ([`enroll::write_frame`]) to a frame that decodes to the same message.
pub fn enroll_frame(data: &[u8]) {
    round_trip_frame::<EnrollRequest>(data);
    round_trip_frame::<Reply>(data);
}

fn round_trip_frame<T>(data: &[u8])
where
    T: serde::Serialize + for<'de> serde::Deserialize<'de> + PartialEq + std::fmt::Debug,
{
    let mut r = data;
    let Ok(msg) = enroll::read_frame::<T>(&mut r) else {
        return;
    };
    let mut out = Vec::new();
    match enroll::write_frame(&mut out, &msg) {
        Ok(()) => {}
        // A message can render longer than it was written (an address in another form).
        Err(FrameError::TooLarge(_)) => return,
        Err(e) => panic!("{msg:?} does not encode: {e}"),
    }
    let back: T = enroll::read_frame(&mut out.as_slice()).expect("an encoded frame decodes");
    assert_eq!(back, msg);
}

/// One invocation of the plugin ([`ztunnel_cni::plugin::run`]) against a daemon that answers
/// at once.
///
/// Input: `KEY=VALUE` lines (the environment; `REPLY=` picks the daemon's answer: `enrolled`
/// (the default), `notEnrolled`, `ok`, `error`, `failed`, `version`), a NUL byte, then stdin.
/// Input without a NUL is stdin for an ADD with a complete environment. What the plugin prints
/// must be JSON: an ADD passes `prevResult` through, byte for byte when it is in the
/// configuration's `cniVersion`, else in that version with its other keys; an error object carries its
/// code and a version the plugin speaks; every request it sends survives the wire.
pub fn cni_plugin(data: &[u8]) {
    let (mut vars, stdin, reply) = match data.iter().position(|b| *b == 0) {
        Some(nul) => {
            let (env, stdin) = (&data[..nul], &data[nul + 1..]);
            let mut vars = Vars::new();
            let mut reply = "enrolled".to_string();
            for line in String::from_utf8_lossy(env).lines() {
                if let Some((k, v)) = line.split_once('=') {
                    if k == "REPLY" {
                        reply = v.to_string();
                    } else {
                        vars.insert(k.to_string(), v.to_string());
                    }
                }
            }
            (vars, stdin, reply)
        }
        None => (Vars::new(), data, "enrolled".to_string()),
    };
    if !data.contains(&0) {
        for (k, v) in [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/p1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
            (
                "CNI_ARGS",
                "K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web-0;K8S_POD_UID=u1",
            ),
        ] {
            vars.insert(k.into(), v.into());
        }
    }
    let daemon = FakeDaemon::new(&reply);
    let outcome = ztunnel_cni::plugin::run(&vars, stdin, &daemon, &NoNetns);
    assert!(
        SUPPORTED_VERSIONS.contains(&outcome.cni_version.as_str()),
        "{}",
        outcome.cni_version
    );
    let command = conf::parse_command(&vars).ok();
    match &outcome.result {
        Ok(Some(json)) => {
            serde_json::from_str::<serde_json::Value>(json)
                .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {json}"));
            if command == Some(Command::Add) {
                let text = std::str::from_utf8(stdin).expect("an ADD that succeeds read UTF-8");
                let conf = conf::parse_conf(Command::Add, text).expect("its configuration");
                let prev = conf.prev_result.expect("an ADD has a prevResult");
                let before: serde_json::Value = serde_json::from_str(prev.raw.get()).unwrap();
                let after: serde_json::Value = serde_json::from_str(json).unwrap();
                if before["cniVersion"] == serde_json::json!(conf.cni_version) {
                    assert_eq!(json, prev.raw.get(), "prevResult not passed through");
                }
                assert_eq!(after["cniVersion"], serde_json::json!(conf.cni_version));
                for key in before.as_object().into_iter().flat_map(|o| o.keys()) {
                    assert!(after.get(key).is_some(), "{key} lost: {json}");
                }
            }
        }
        Ok(None) => {}
        Err(e) => {
            let obj = e.to_json(&outcome.cni_version);
            let v: serde_json::Value = serde_json::from_str(&obj)
                .unwrap_or_else(|err| panic!("error object is not JSON ({err}): {obj}"));
            assert_eq!(v["code"], serde_json::json!(e.code()), "{obj}");
            assert_eq!(v["cniVersion"], serde_json::json!(outcome.cni_version));
        }
    }
    for req in daemon.seen.borrow().iter() {
        let mut out = Vec::new();
        match enroll::write_frame(&mut out, req) {
            Ok(()) => {}
            Err(FrameError::TooLarge(_)) => continue,
            Err(e) => panic!("{req:?} does not encode: {e}"),
        }
        let back: EnrollRequest = enroll::read_frame(&mut out.as_slice()).expect("decodes");
        assert_eq!(&back, req);
    }
}

/// Answers every request with the same reply and records the requests.
struct FakeDaemon {
    reply: Result<Reply, CallError>,
    seen: RefCell<Vec<EnrollRequest>>,
}

impl FakeDaemon {
    fn new(name: &str) -> FakeDaemon {
        let reply = match name {
            "notEnrolled" => Ok(Reply::NotEnrolled {
                reason: "namespace not enrolled".into(),
            }),
            "ok" => Ok(Reply::Ok),
            "error" => Ok(Reply::Error {
                kind: ErrorKind::TryAgain,
                message: "busy".into(),
            }),
            "failed" => Err(CallError::Failed("reading the reply: reset".into())),
            "version" => Err(CallError::Version(2)),
            // Never `Unreachable`: its fallback reads a file the input names.
            _ => Ok(Reply::Enrolled),
        };
        FakeDaemon {
            reply,
            seen: RefCell::new(Vec::new()),
        }
    }
}

impl Daemon for FakeDaemon {
    fn call(&self, _: &Endpoint, request: &EnrollRequest) -> Result<Reply, CallError> {
        self.seen.borrow_mut().push(request.clone());
        self.reply.clone()
    }
}

/// A pod netns that is never entered.
struct NoNetns;

impl PodNetns for NoNetns {
    fn enable_listener_migration(&self, _: &std::path::Path) -> std::io::Result<()> {
        Err(std::io::Error::other("not while fuzzing"))
    }
}

/// The local mesh file ([`ztunnel::discovery::parse`]), read for the whole mesh and for one
/// node's daemon.
pub fn discovery_yaml(data: &[u8]) {
    let Ok(yaml) = std::str::from_utf8(data) else {
        return;
    };
    let _ = ztunnel::discovery::parse(yaml, TRUST_DOMAIN);
    let _ = ztunnel::discovery::parse_for_node(yaml, TRUST_DOMAIN, Some("node-a"));
}

/// `ztunnel ctl convert` ([`ztunnel::policy::from_istio::convert`]): what it writes is YAML
/// whose every object is ours (`security.ztunnel.dev/v1`).
pub fn istio_convert(data: &[u8]) {
    let Ok(yaml) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(out) = ztunnel::policy::from_istio::convert(yaml, "istio-system", "ztunnel-system")
    else {
        return;
    };
    let docs = serde_saphyr::from_multiple::<serde_json::Value>(&out)
        .unwrap_or_else(|e| panic!("the output is not YAML ({e}):\n{out}"));
    for v in docs {
        if v.is_null() {
            continue;
        }
        assert_eq!(
            v.get("apiVersion").and_then(serde_json::Value::as_str),
            Some(ztunnel::discovery::policy::API_VERSION),
            "{out}"
        );
    }
}

fn ca() -> &'static ztunnel::ca::LocalCa {
    static CA: OnceLock<ztunnel::ca::LocalCa> = OnceLock::new();
    CA.get_or_init(|| {
        let m = ztunnel::ca::CaMaterial::generate(TRUST_DOMAIN).expect("CA material");
        ztunnel::ca::LocalCa::from_material(&m, TRUST_DOMAIN).expect("CA")
    })
}

/// A sign request as `ztunnel ca` reads it: the JSON body ([`ztunnel_proto::ca::SignRequest`]),
/// then [`ztunnel::ca::LocalCa::sign`] (CSR parsing, signature, SANs, trust domain).
///
/// Input: a JSON body when it starts with `{`; a PEM CSR for
/// `spiffe://cluster.local/ns/default/sa/default` when it starts with `-----`; otherwise the
/// DER of such a CSR (wrapped in PEM here). A signed leaf must carry exactly the requested
/// identity, in the CA's trust domain.
pub fn ca_sign(data: &[u8]) {
    let req = match data.first() {
        Some(b'{') => match serde_json::from_slice::<ztunnel_proto::ca::SignRequest>(data) {
            Ok(r) => r,
            Err(_) => return,
        },
        Some(b'-') => ztunnel_proto::ca::SignRequest {
            csr_pem: String::from_utf8_lossy(data).into_owned(),
            identity: format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/default"),
            lifetime_secs: 3600,
        },
        _ => ztunnel_proto::ca::SignRequest {
            csr_pem: pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", data.to_vec())),
            identity: format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/default"),
            lifetime_secs: 3600,
        },
    };
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let Ok(resp) = ca().sign(&req, now) else {
        return;
    };
    let wanted: Identity = req.identity.parse().expect("a signed identity parses");
    assert_eq!(wanted.trust_domain(), TRUST_DOMAIN);
    let chain = ztunnel::identity::parse_pem_certs(&resp.cert_chain_pem).expect("chain PEM");
    let got = ztunnel::identity::peer_identity(&chain, TRUST_DOMAIN).expect("the leaf's identity");
    assert_eq!(got, wanted);
    assert!(!resp.roots_pem.is_empty());
}

/// A SPIFFE ID ([`Identity`]'s `FromStr`): an accepted ID renders back to the same string and
/// is the one [`Identity::new`] builds from its parts.
pub fn spiffe_id(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(id) = s.parse::<Identity>() else {
        return;
    };
    assert_eq!(id.to_string(), s);
    assert_eq!(
        Identity::new(id.trust_domain(), id.namespace(), id.service_account()).as_ref(),
        Ok(&id)
    );
    let json = serde_json::to_string(&id).expect("serializes");
    assert_eq!(serde_json::from_str::<Identity>(&json).ok(), Some(id));
}

/// A peer's leaf certificate, DER, as a TLS handshake hands it over: its identity in the
/// trust domain ([`ztunnel::identity::peer_identity`]), which must be a SPIFFE ID of that
/// trust domain that parses back to itself, and one of the certificate's identities.
pub fn peer_cert(data: &[u8]) {
    let cert = CertificateDer::from(data);
    let td = TRUST_DOMAIN;
    let Ok(id) = ztunnel::identity::peer_identity(std::slice::from_ref(&cert), td) else {
        return;
    };
    assert_eq!(id.to_string().parse::<Identity>().as_ref(), Ok(&id));
    assert_eq!(id.trust_domain(), td);
    let (_, x) = X509Certificate::from_der(data).expect("a certificate with an identity parses");
    let all = ztunnel::identity::leaf_identities(&x).expect("it has identities");
    assert_eq!(all.iter().find(|i| i.trust_domain() == td), Some(&id));
}
