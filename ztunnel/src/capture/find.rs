//! Finding a running pod's network namespace without the CNI plugin, by the pod's IP and its
//! UID.
//!
//! [`scan`] lists every process under `<host-proc>` (`--host-proc`, the host's `/proc`),
//! opens `<host-proc>/<pid>/ns/net`, dedupes namespaces by (device, inode), skips the
//! daemon's own (the node's) namespace, reads each remaining namespace's interface addresses
//! from inside it ([`Netns::run`] + `getifaddrs`), and the pod UIDs its processes' cgroups
//! name ([`pod_uid_of_cgroup`]: the kubelet puts every process of a pod in a cgroup named
//! after the pod's UID, which no process in the pod can change). [`choose`] (pure) then picks
//! the namespace that holds the pod's IPs, and refuses rather than guess:
//! - no namespace holds any of the pod's IPs → [`FindError::NotFound`] (not started yet, or
//!   gone);
//! - more than one distinct namespace of the pod holds them → [`FindError::Ambiguous`] (never
//!   pick a wrong netns: a leftover sandbox of the same pod);
//! - the node's own namespace holds one → [`FindError::HostNetwork`] (host-network pods never
//!   enroll);
//! - no namespace holding them is the pod's (its processes carry another pod's UID, or none)
//!   → [`FindError::UidMismatch`]. An address is a claim any process with `CAP_NET_ADMIN` in
//!   its own namespace can make; the UID is not. Without this check, a pod that adds another
//!   pod's IP to its namespace while that pod's sandbox is being re-created would be enrolled
//!   as it, carrying its identity; and a namespace of another pod holding the same IP beside
//!   the pod's own is ignored, so that the same trick cannot keep the pod out of the mesh.
//!
//! The path handed back names the lowest pid seen in the namespace (in Kubernetes the
//! sandbox's `pause` process, which lives as long as the pod). Loopback addresses never
//! identify a pod. Reading another process's `ns/net` needs `CAP_SYS_PTRACE` (ptrace read
//! access) and entering it needs `CAP_SYS_ADMIN`.

use std::collections::BTreeMap;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::net::netns::Netns;

/// One network namespace seen on the host, and its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// (device, inode) of the namespace.
    pub id: (u64, u64),
    /// `<host-proc>/<lowest pid>/ns/net`.
    pub path: PathBuf,
    /// Every pid whose namespace this is.
    pub pids: Vec<u32>,
    /// The non-loopback interface addresses inside it.
    pub ips: Vec<IpAddr>,
    /// The pod UIDs its processes' cgroups name, sorted, distinct (empty: none does).
    pub uids: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FindError {
    #[error("no network namespace on the node holds {0:?} (not running yet, or gone)")]
    NotFound(Vec<IpAddr>),
    #[error("{ips:?} found in {count} network namespaces ({paths}); refusing to guess")]
    Ambiguous {
        ips: Vec<IpAddr>,
        count: usize,
        paths: String,
    },
    #[error("{0} is an address of the node's own network namespace (host network)")]
    HostNetwork(IpAddr),
    #[error("the pod has no IP")]
    NoIp,
    #[error("no network namespace holding {ips:?} ({path}) is pod {expected}'s: their processes are pod UID {found:?}; refusing them")]
    UidMismatch {
        ips: Vec<IpAddr>,
        path: String,
        expected: String,
        found: Vec<String>,
    },
}

/// The pod UID a process's cgroup file (`/proc/<pid>/cgroup`) names, if any: the innermost
/// path segment of the kubelet's pod cgroup, under either cgroup driver — `pod<uid>`
/// (cgroupfs) or `kubepods[-<qos>]-pod<uid with _ for ->.slice` (systemd) — in any hierarchy
/// (cgroup v1 lines `n:controllers:/path`, v2 `0::/path`; paths relative to the reader's
/// cgroup namespace, `/../..` included, are read the same). `None` when no line names one or
/// lines disagree.
pub fn pod_uid_of_cgroup(text: &str) -> Option<String> {
    let uid_chars = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let mut found: Option<String> = None;
    for line in text.lines() {
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        let uid = path.split('/').rev().find_map(|seg| {
            if let Some(rest) = seg.strip_suffix(".slice") {
                // systemd: kubepods-pod<uid>.slice, kubepods-<qos>-pod<uid>.slice
                let (_, uid) = rest.rsplit_once("-pod")?;
                (rest.starts_with("kubepods") && uid_chars(uid)).then(|| uid.replace('_', "-"))
            } else {
                let uid = seg.strip_prefix("pod")?;
                uid_chars(uid).then(|| uid.to_owned())
            }
        });
        match (uid, &found) {
            (None, _) => {}
            (Some(u), None) => found = Some(u),
            (Some(u), Some(f)) if &u == f => {}
            (Some(_), Some(_)) => return None,
        }
    }
    found
}

/// Which namespace holds `pod_ips` and belongs to pod `pod_uid`, among `seen` (the node's own
/// addresses are `host_ips`).
pub fn choose<'a>(
    pod_ips: &[IpAddr],
    pod_uid: &str,
    host_ips: &[IpAddr],
    seen: &'a [Seen],
) -> Result<&'a Seen, FindError> {
    let ips: Vec<IpAddr> = pod_ips
        .iter()
        .copied()
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .collect();
    if ips.is_empty() {
        return Err(FindError::NoIp);
    }
    if let Some(ip) = ips.iter().find(|ip| host_ips.contains(ip)) {
        return Err(FindError::HostNetwork(*ip));
    }
    let mut hits: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.ips.iter().any(|ip| ips.contains(ip)))
        .collect();
    hits.sort_by_key(|s| s.id);
    hits.dedup_by_key(|s| s.id);
    let paths = |v: &[&Seen]| {
        v.iter()
            .map(|s| s.path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    // Of the namespaces holding the IPs, those whose processes are the pod's and only its.
    let pods: Vec<&Seen> = hits
        .iter()
        .copied()
        .filter(|s| !pod_uid.is_empty() && s.uids == [pod_uid])
        .collect();
    match (hits.as_slice(), pods.as_slice()) {
        ([], _) => Err(FindError::NotFound(ips)),
        (_, [one]) => Ok(one),
        (_, []) => {
            let mut found: Vec<String> = hits.iter().flat_map(|s| s.uids.clone()).collect();
            found.sort();
            found.dedup();
            Err(FindError::UidMismatch {
                ips,
                path: paths(&hits),
                expected: pod_uid.to_owned(),
                found,
            })
        }
        (_, many) => Err(FindError::Ambiguous {
            ips,
            count: many.len(),
            paths: paths(many),
        }),
    }
}

/// The non-loopback addresses of the calling thread's current network namespace.
pub fn local_addresses() -> io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for a in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
        let Some(addr) = a.address else { continue };
        let ip = if let Some(v4) = addr.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        if !ip.is_loopback() && !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

/// The distinct network namespaces of the processes under `host_proc`, other than `host`'s,
/// with their addresses. Processes that vanish or cannot be read are skipped (logged at
/// debug); an unreadable `host_proc` itself is an error.
pub fn scan(host_proc: &Path, host: &Netns) -> io::Result<Vec<Seen>> {
    let mut by_id: BTreeMap<(u64, u64), (u32, Vec<u32>)> = BTreeMap::new();
    for entry in std::fs::read_dir(host_proc)? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let path = entry.path().join("ns").join("net");
        match std::fs::metadata(&path) {
            Ok(m) => {
                let e = by_id.entry((m.dev(), m.ino())).or_insert((pid, Vec::new()));
                e.0 = e.0.min(pid);
                e.1.push(pid);
            }
            Err(e) => tracing::debug!(path = %path.display(), error = %e, "netns scan: skipped"),
        }
    }
    let mut out = Vec::new();
    for (id, (lowest, mut pids)) in by_id {
        if id == host.id() {
            continue;
        }
        let path = host_proc.join(lowest.to_string()).join("ns").join("net");
        // Open, then check it is still the same namespace (the pid may have been reused).
        let ns = match Netns::open(&path) {
            Ok(ns) if ns.id() == id => ns,
            Ok(_) => continue,
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "netns scan: cannot open");
                continue;
            }
        };
        match ns.run(local_addresses) {
            Ok(Ok(ips)) => {
                pids.sort_unstable();
                let mut uids: Vec<String> = pids
                    .iter()
                    .filter_map(|pid| pod_uid_of_pid(host_proc, *pid))
                    .collect();
                uids.sort();
                uids.dedup();
                out.push(Seen {
                    id,
                    path,
                    pids,
                    ips,
                    uids,
                });
            }
            Ok(Err(e)) | Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "netns scan: cannot list addresses")
            }
        }
    }
    Ok(out)
}

/// The pod UID process `pid`'s cgroup names (see [`pod_uid_of_cgroup`]).
pub fn pod_uid_of_pid(host_proc: &Path, pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(host_proc.join(pid.to_string()).join("cgroup")).ok()?;
    pod_uid_of_cgroup(&text)
}

/// The pod UID of the process whose namespace `path` (`<host-proc>/<pid>/ns/net`, as
/// [`scan`] names it) is.
pub fn pod_uid_of_netns_path(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path.parent()?.parent()?.join("cgroup")).ok()?;
    pod_uid_of_cgroup(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(ino: u64, ips: &[&str]) -> Seen {
        Seen {
            id: (4, ino),
            path: PathBuf::from(format!("/proc/{ino}/ns/net")),
            pids: vec![ino as u32],
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            uids: vec![format!("uid-{ino}")],
        }
    }

    #[test]
    fn choices() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let table = vec![
            seen(10, &["10.0.0.1", "fd00::1"]),
            seen(11, &["10.0.0.2"]),
            seen(12, &["10.0.0.3"]),
            seen(13, &["10.0.0.3"]), // another pod's namespace with the same IP
            Seen {
                uids: vec!["uid-12".into()],
                ..seen(18, &["10.0.0.8"])
            },
            Seen {
                uids: vec!["uid-12".into()],
                ..seen(19, &["10.0.0.8"])
            },
            // Another pod's namespace holding a victim's IP (uid-15's pod is not running).
            seen(14, &["10.0.0.5"]),
            Seen {
                uids: vec![],
                ..seen(16, &["10.0.0.6"])
            },
            Seen {
                uids: vec!["uid-17".into(), "uid-x".into()],
                ..seen(17, &["10.0.0.7"])
            },
        ];
        let host = [ip("192.168.1.5")];
        // (pod ips, pod uid, expected: Ok(inode) or the error's variant name)
        let cases: Vec<(Vec<IpAddr>, &str, Result<u64, &str>)> = vec![
            (vec![ip("10.0.0.1")], "uid-10", Ok(10)),
            (vec![ip("fd00::1")], "uid-10", Ok(10)),
            (vec![ip("10.0.0.1"), ip("fd00::1")], "uid-10", Ok(10)),
            (vec![ip("10.0.0.2")], "uid-11", Ok(11)),
            (vec![ip("10.0.0.9")], "uid-9", Err("NotFound")),
            // Another pod's namespace beside the pod's own: the pod's is found.
            (vec![ip("10.0.0.3")], "uid-12", Ok(12)),
            (vec![ip("10.0.0.3")], "uid-13", Ok(13)),
            (vec![ip("10.0.0.3")], "uid-99", Err("UidMismatch")),
            (vec![ip("10.0.0.1"), ip("10.0.0.2")], "uid-10", Ok(10)),
            // Two namespaces of the pod (an old sandbox and a new one): refused, not guessed.
            (vec![ip("10.0.0.8")], "uid-12", Err("Ambiguous")),
            (vec![ip("192.168.1.5")], "uid-1", Err("HostNetwork")),
            (vec![ip("127.0.0.1")], "uid-1", Err("NoIp")),
            (vec![], "uid-1", Err("NoIp")),
            // The address is the victim's, the processes another pod's: refused.
            (vec![ip("10.0.0.5")], "uid-15", Err("UidMismatch")),
            // Processes in no pod's cgroup, or in two pods': refused.
            (vec![ip("10.0.0.6")], "uid-16", Err("UidMismatch")),
            (vec![ip("10.0.0.7")], "uid-17", Err("UidMismatch")),
            // A pod whose UID is unknown cannot be confirmed: refused.
            (vec![ip("10.0.0.1")], "", Err("UidMismatch")),
        ];
        for (ips, uid, want) in cases {
            let got = match choose(&ips, uid, &host, &table) {
                Ok(s) => Ok(s.id.1),
                Err(FindError::NotFound(_)) => Err("NotFound"),
                Err(FindError::Ambiguous { .. }) => Err("Ambiguous"),
                Err(FindError::HostNetwork(_)) => Err("HostNetwork"),
                Err(FindError::NoIp) => Err("NoIp"),
                Err(FindError::UidMismatch { .. }) => Err("UidMismatch"),
            };
            assert_eq!(got, want, "{ips:?} {uid}");
        }
    }

    #[test]
    fn pod_uids_from_cgroup_files() {
        let uid = "0f5d2a8e-3b1c-4c7e-9a1f-2b3c4d5e6f70";
        let systemd = "0f5d2a8e_3b1c_4c7e_9a1f_2b3c4d5e6f70";
        // (the file, the UID it names)
        let table: &[(String, Option<&str>)] = &[
            // cgroup v2, systemd driver, each QoS class.
            (format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{systemd}.slice/cri-containerd-abc.scope\n"), Some(uid)),
            (format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{systemd}.slice/crio-abc.scope\n"), Some(uid)),
            (format!("0::/kubepods.slice/kubepods-pod{systemd}.slice/cri-containerd-abc.scope\n"), Some(uid)),
            // Seen from the daemon's own cgroup namespace.
            (format!("0::/../../kubepods-besteffort-pod{systemd}.slice/cri-containerd-abc.scope\n"), Some(uid)),
            // cgroupfs driver, v1 and v2; several hierarchies agreeing.
            (format!("0::/kubepods/besteffort/pod{uid}/abc\n"), Some(uid)),
            (format!("12:pids:/kubepods/pod{uid}/abc\n4:memory:/kubepods/pod{uid}/abc\n1:name=systemd:/\n"), Some(uid)),
            (format!("0::/../pod{uid}/abc\n"), Some(uid)),
            // A pause container's own cgroup (no container segment below the pod's).
            (format!("0::/kubepods/besteffort/pod{uid}\n"), Some(uid)),
            // Not a pod's.
            ("0::/system.slice/containerd.service\n".into(), None),
            ("0::/user.slice/user-0.slice/session-1.scope\n".into(), None),
            ("0::/\n".into(), None),
            ("".into(), None),
            ("0::/system.slice/podman-abc.scope\n".into(), None),
            ("garbage without colons\n".into(), None),
            // Two hierarchies naming two pods: no answer.
            (format!("12:pids:/kubepods/pod{uid}/a\n0::/kubepods/podother/a\n"), None),
        ];
        for (text, want) in table {
            assert_eq!(pod_uid_of_cgroup(text).as_deref(), *want, "{text:?}");
        }
    }

    #[test]
    fn a_scan_never_returns_the_daemons_own_namespace() {
        let seen = scan(Path::new("/proc"), Netns::host()).unwrap();
        assert!(seen.iter().all(|s| s.id != Netns::host().id()));
        assert!(!seen.iter().any(|s| s.pids.contains(&std::process::id())));
        assert!(scan(Path::new("/nonexistent-proc"), Netns::host()).is_err());
    }

    #[test]
    fn local_addresses_skip_loopback() {
        assert!(local_addresses()
            .unwrap()
            .iter()
            .all(|ip| !ip.is_loopback()));
    }
}
