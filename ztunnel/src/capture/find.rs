//! Finding a running pod's network namespace without the CNI plugin, by the pod's IP.
//!
//! [`scan`] lists every process under `<host-proc>` (`--host-proc`, the host's `/proc`),
//! opens `<host-proc>/<pid>/ns/net`, dedupes namespaces by (device, inode), skips the
//! daemon's own (the node's) namespace, and reads each remaining namespace's interface
//! addresses from inside it ([`Netns::run`] + `getifaddrs`). [`choose`] (pure) then picks the
//! namespace that holds the pod's IPs, and refuses rather than guess:
//! - no namespace holds any of the pod's IPs → [`FindError::NotFound`] (not started yet, or
//!   gone);
//! - more than one distinct namespace holds them → [`FindError::Ambiguous`] (never pick a
//!   wrong netns: a leftover namespace or another node's pod on a shared test machine);
//! - the node's own namespace holds one → [`FindError::HostNetwork`] (host-network pods never
//!   enroll).
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

use super::netns::Netns;

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
}

/// Which namespace holds `pod_ips`, among `seen` (the node's own addresses are `host_ips`).
pub fn choose<'a>(
    pod_ips: &[IpAddr],
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
    match hits.as_slice() {
        [] => Err(FindError::NotFound(ips)),
        [one] => Ok(one),
        many => Err(FindError::Ambiguous {
            ips,
            count: many.len(),
            paths: many
                .iter()
                .map(|s| s.path.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
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
                out.push(Seen {
                    id,
                    path,
                    pids,
                    ips,
                });
            }
            Ok(Err(e)) | Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "netns scan: cannot list addresses")
            }
        }
    }
    Ok(out)
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
        }
    }

    #[test]
    fn choices() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let table = vec![
            seen(10, &["10.0.0.1", "fd00::1"]),
            seen(11, &["10.0.0.2"]),
            seen(12, &["10.0.0.3"]),
            seen(13, &["10.0.0.3"]), // a second namespace with the same IP
        ];
        let host = [ip("192.168.1.5")];
        // (pod ips, expected: Ok(inode) or the error's variant name)
        let cases: Vec<(Vec<IpAddr>, Result<u64, &str>)> = vec![
            (vec![ip("10.0.0.1")], Ok(10)),
            (vec![ip("fd00::1")], Ok(10)),
            (vec![ip("10.0.0.1"), ip("fd00::1")], Ok(10)),
            (vec![ip("10.0.0.2")], Ok(11)),
            (vec![ip("10.0.0.9")], Err("NotFound")),
            (vec![ip("10.0.0.3")], Err("Ambiguous")),
            // Two IPs of one pod found in two namespaces: refused, not guessed.
            (vec![ip("10.0.0.1"), ip("10.0.0.2")], Err("Ambiguous")),
            (vec![ip("192.168.1.5")], Err("HostNetwork")),
            (vec![ip("127.0.0.1")], Err("NoIp")),
            (vec![], Err("NoIp")),
        ];
        for (ips, want) in cases {
            let got = match choose(&ips, &host, &table) {
                Ok(s) => Ok(s.id.1),
                Err(FindError::NotFound(_)) => Err("NotFound"),
                Err(FindError::Ambiguous { .. }) => Err("Ambiguous"),
                Err(FindError::HostNetwork(_)) => Err("HostNetwork"),
                Err(FindError::NoIp) => Err("NoIp"),
            };
            assert_eq!(got, want, "{ips:?}");
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
