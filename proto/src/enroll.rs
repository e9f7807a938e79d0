//! The enrollment protocol between the CNI plugin (`ztunnel-cni`) and the node daemon.
//!
//! Transport: a Unix stream socket (default [`DEFAULT_SOCKET`]) that the daemon creates mode
//! `0600` in a directory mode `0700`, so only root can open it. One request per connection:
//! the plugin writes one frame, the daemon answers with one frame and closes.
//!
//! Framing: a 4-byte big-endian length, then that many bytes of UTF-8 JSON; a frame longer
//! than [`MAX_FRAME`] is refused. Every message carries `version` ([`VERSION`]); a daemon
//! answers a version it does not speak with [`Reply::Error`] of kind
//! [`ErrorKind::Unsupported`], so an old plugin and a new daemon fail clearly, never silently.
//!
//! Semantics:
//! - [`Request::Add`]: the daemon decides whether the pod is enrolled (namespace label, pod
//!   opt-out); if it is, it installs the capture rules in the pod's netns and starts the pod's
//!   listeners, and only then answers [`Reply::Enrolled`]. A pod that should be enrolled but
//!   cannot be gets [`ErrorKind::TryAgain`]: the runtime retries and the pod never runs
//!   unprotected. A pod that is not enrolled gets [`Reply::NotEnrolled`] with the reason.
//! - [`Request::Del`]: releases the pod (listeners, rules, netns handle); idempotent.
//! - [`Request::Check`]: verifies an enrolled pod's rules and listeners are present.
//! - [`Request::Status`]: [`Reply::Ok`] when the daemon is ready to enroll pods. The plugin's
//!   CNI STATUS does not ask it (it succeeds whatever the daemon's state).
//! - [`Request::Gc`]: releases every enrolled pod whose attachment is not in the list.

use std::io::{Read, Write};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;
/// Where the daemon listens by default.
pub const DEFAULT_SOCKET: &str = "/var/run/ztunnel/cni.sock";
/// The largest frame either side accepts (a GC list of a few thousand attachments fits).
pub const MAX_FRAME: usize = 1 << 20;

/// The daemon's snapshot of which pods it may enroll, a file the CNI plugin reads to decide
/// an ADD while the daemon cannot be reached: the JSON array of `namespaces` when
/// `podLabelsEnroll` is false (which every plugin reads), else the JSON object
/// `{"namespaces": [..], "podLabelsEnroll": true}`. An unknown field makes the file unusable
/// (the plugin then fails every pod it does not exclude), and so does the object for a plugin
/// that reads arrays only, so a daemon's rules are never read as fewer than they are.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Snapshot {
    /// The namespaces whose labels enroll their pods.
    pub namespaces: Vec<String>,
    /// Whether a pod's own labels may enroll it whatever its namespace's (Istio's rules): then
    /// a pod of any namespace may be enrolled.
    pub pod_labels_enroll: bool,
}

/// A pod as Kubernetes names it (from `CNI_ARGS`: `K8S_POD_NAMESPACE`, `K8S_POD_NAME`,
/// `K8S_POD_UID`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: String,
}

/// One network attachment, as the runtime identifies it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodAdd {
    pub attachment: Attachment,
    /// The pod's network namespace path (`CNI_NETNS`).
    pub netns: String,
    pub pod: PodRef,
    /// The pod's addresses, from the previous plugin's result.
    pub ips: Vec<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodDel {
    pub attachment: Attachment,
    /// May be empty: DEL can come after the netns is gone.
    #[serde(default)]
    pub netns: String,
    #[serde(default)]
    pub pod: Option<PodRef>,
}

/// A request from the plugin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Request {
    Add(PodAdd),
    Del(PodDel),
    Check(PodAdd),
    Status,
    Gc { valid: Vec<Attachment> },
}

/// Why an operation failed; the plugin maps it to a CNI error code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ErrorKind {
    /// Transient: the runtime should retry (CNI code 11).
    TryAgain,
    /// The daemon is not ready (CNI code 50).
    NotAvailable,
    /// The request is wrong (CNI code 7).
    Invalid,
    /// The protocol version is not spoken (CNI code 100).
    Unsupported,
    /// CHECK found the pod's capture missing or altered (CNI code 101).
    CheckFailed,
}

/// The daemon's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "camelCase")]
pub enum Reply {
    /// The pod's rules and listeners are in place.
    Enrolled,
    /// The pod is not in the mesh; nothing was installed.
    NotEnrolled {
        reason: String,
    },
    /// DEL, CHECK, STATUS or GC succeeded.
    Ok,
    Error {
        kind: ErrorKind,
        message: String,
    },
}

/// A message on the wire: the version and the payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub version: u32,
    #[serde(flatten)]
    pub body: T,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes is larger than the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("protocol version {0} is not supported (this side speaks {VERSION})")]
    Version(u32),
}

/// Writes one framed message.
pub fn write_frame<T: Serialize>(w: &mut impl Write, body: &T) -> Result<(), FrameError> {
    let bytes = serde_json::to_vec(&Envelope {
        version: VERSION,
        body,
    })?;
    if bytes.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(bytes.len()));
    }
    let mut out = Vec::with_capacity(4 + bytes.len());
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(&bytes);
    w.write_all(&out)?;
    Ok(())
}

/// Reads the length prefix of a frame and checks it against [`MAX_FRAME`].
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes a frame's payload, checking the version before the body.
pub fn decode<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, FrameError> {
    #[derive(Deserialize)]
    struct Head {
        version: u32,
    }
    let head: Head = serde_json::from_slice(payload)?;
    if head.version != VERSION {
        return Err(FrameError::Version(head.version));
    }
    let env: Envelope<T> = serde_json::from_slice(payload)?;
    Ok(env.body)
}

/// Reads one framed message (blocking).
pub fn read_frame<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> Result<T, FrameError> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix)?;
    let mut payload = vec![0u8; frame_len(prefix)?];
    r.read_exact(&mut payload)?;
    decode(&payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add() -> Request {
        Request::Add(PodAdd {
            attachment: Attachment {
                container_id: "c1".into(),
                ifname: "eth0".into(),
            },
            netns: "/var/run/netns/p1".into(),
            pod: PodRef {
                namespace: "demo".into(),
                name: "web-0".into(),
                uid: "u1".into(),
            },
            ips: vec!["10.0.0.1".parse().unwrap()],
        })
    }

    #[test]
    fn round_trips_every_message() {
        let msgs = [
            add(),
            Request::Status,
            Request::Gc { valid: vec![] },
            Request::Del(PodDel {
                attachment: Attachment::default(),
                netns: String::new(),
                pod: None,
            }),
        ];
        for m in msgs {
            let mut buf = Vec::new();
            write_frame(&mut buf, &m).unwrap();
            let back: Request = read_frame(&mut buf.as_slice()).unwrap();
            assert_eq!(back, m);
        }
        let r = Reply::Error {
            kind: ErrorKind::TryAgain,
            message: "x".into(),
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &r).unwrap();
        assert_eq!(read_frame::<Reply>(&mut buf.as_slice()).unwrap(), r);
    }

    #[test]
    fn the_wire_form_is_stable() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &Request::Status).unwrap();
        assert_eq!(&buf[4..], br#"{"version":1,"kind":"status"}"#);
        assert_eq!(&buf[..4], &29u32.to_be_bytes());
    }

    #[test]
    fn refuses_bad_frames() {
        let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert!(matches!(
            read_frame::<Request>(&mut &huge[..]),
            Err(FrameError::TooLarge(_))
        ));
        let other = br#"{"version":2,"kind":"status"}"#;
        let mut buf = (other.len() as u32).to_be_bytes().to_vec();
        buf.extend_from_slice(other);
        assert!(matches!(
            read_frame::<Request>(&mut buf.as_slice()),
            Err(FrameError::Version(2))
        ));
        let garbage = b"\x00\x00\x00\x03{{{";
        assert!(matches!(
            read_frame::<Request>(&mut &garbage[..]),
            Err(FrameError::Json(_))
        ));
        let short = b"\x00\x00\x00\x10{}";
        assert!(matches!(
            read_frame::<Request>(&mut &short[..]),
            Err(FrameError::Io(_))
        ));
    }
}
