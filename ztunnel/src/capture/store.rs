//! The enrolled pods' records on the node (`<state dir>/pods/<container id>.json`), and the
//! enrolled-namespaces file that the CNI plugin reads when the daemon is down.
//!
//! Records are written atomically (a temporary file renamed into place) before ADD is
//! answered, and removed on DEL, so a restarted daemon finds exactly the pods it must serve.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use ztunnel_proto::enroll::{Attachment, PodRef};

/// What a restarted daemon needs to serve a pod again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRecord {
    pub attachment: Attachment,
    pub netns: PathBuf,
    pub pod: PodRef,
    pub ips: Vec<IpAddr>,
}

/// The state directory.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

/// Writes `bytes` to `path` through a temp file, synced, then renamed; the temp file is
/// removed if that fails.
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        io::Write::write_all(&mut f, bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Container ids come from the runtime; keep only what is safe in a file name.
fn file_name(a: &Attachment) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("{}.{}.json", clean(&a.container_id), clean(&a.ifname))
}

impl Store {
    /// Opens (creating, mode 0700) the state directory.
    pub fn open(dir: &Path) -> io::Result<Store> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.join("pods"))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(Store {
            dir: dir.to_owned(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The node's secret for QUIC stateless resets (`quic-reset-key`, 32 random bytes, mode
    /// 0600), made on first use; the daemons that follow one another on the node share it
    /// ([`crate::hbone::quic::use_reset_secret`]).
    pub fn quic_reset_secret(&self) -> io::Result<Vec<u8>> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.dir.join("quic-reset-key");
        match std::fs::read(&path) {
            Ok(secret) if secret.len() == 32 => return Ok(secret),
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is not 32 bytes", path.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut secret = vec![0u8; 32];
        aws_lc_rs::rand::fill(&mut secret).map_err(|_| io::Error::other("no randomness"))?;
        let tmp = self
            .dir
            .join(format!("quic-reset-key.{}.tmp", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&secret)?;
        f.sync_all()?;
        // A link, unlike a rename, fails when the name exists: of two daemons starting at
        // once, the first to link wins, and both read what it left.
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        std::fs::read(&path)
    }

    pub fn socket_path(&self) -> PathBuf {
        self.dir.join("cni.sock")
    }

    pub fn save(&self, r: &PodRecord) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(r).map_err(io::Error::other)?;
        write_atomic(
            &self.dir.join("pods").join(file_name(&r.attachment)),
            &bytes,
        )
    }

    pub fn remove(&self, a: &Attachment) -> io::Result<()> {
        match std::fs::remove_file(self.dir.join("pods").join(file_name(a))) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every record; unreadable ones are logged and skipped.
    pub fn load_all(&self) -> io::Result<Vec<PodRecord>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(self.dir.join("pods"))? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "unreadable pod record; skipped")
                }
            }
        }
        Ok(out)
    }
}

/// The enrolled-namespaces file's name in the state directory, where it is unless configured
/// elsewhere (`--enrolled-namespaces-file`).
pub const NAMESPACES_FILE: &str = "enrolled-namespaces.json";

/// Writes the enrollment snapshot for the CNI plugin to `file`, creating its directory if
/// needed. When that fails, the file is removed: an older snapshot could let a pod of a
/// namespace enrolled since through unenrolled, while the plugin fails closed without one.
pub fn save_snapshot(file: &Path, snapshot: &ztunnel_proto::enroll::Snapshot) -> io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Without pod-label enrollment, the bare array of namespaces, which every plugin reads.
    let bytes = match snapshot.pod_labels_enroll {
        true => serde_json::to_vec(snapshot),
        false => serde_json::to_vec(&snapshot.namespaces),
    };
    let written = bytes
        .map_err(io::Error::other)
        .and_then(|bytes| write_atomic(file, &bytes));
    if written.is_err() {
        let _ = std::fs::remove_file(file);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot that cannot be written leaves no snapshot (the plugin then fails closed),
    /// not the older one; once writable, it is written again.
    #[test]
    fn a_failed_snapshot_write_leaves_no_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ns.json");
        let snapshot = |ns: &str| ztunnel_proto::enroll::Snapshot {
            namespaces: vec![ns.into()],
            pod_labels_enroll: ns == "istio",
        };
        save_snapshot(&file, &snapshot("a")).unwrap();
        // The temp file's name taken by a directory: the write fails.
        std::fs::create_dir(file.with_extension("tmp")).unwrap();
        assert!(save_snapshot(&file, &snapshot("b")).is_err());
        assert!(!file.exists(), "the older snapshot is gone");
        std::fs::remove_dir(file.with_extension("tmp")).unwrap();
        save_snapshot(&file, &snapshot("b")).unwrap();
        assert!(!file.with_extension("tmp").exists());
        // The bare array of namespaces, which every plugin reads; the object only when a
        // pod's labels enroll it (an older plugin then fails closed).
        assert_eq!(std::fs::read_to_string(&file).unwrap(), r#"["b"]"#);
        save_snapshot(&file, &snapshot("istio")).unwrap();
        let read: ztunnel_proto::enroll::Snapshot =
            serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(read, snapshot("istio"));
    }

    #[test]
    fn records_round_trip_and_hostile_ids_stay_in_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state")).unwrap();
        let r = PodRecord {
            attachment: Attachment {
                container_id: "../../etc/passwd".into(),
                ifname: "eth0".into(),
            },
            netns: "/var/run/netns/p".into(),
            pod: PodRef {
                namespace: "demo".into(),
                name: "web".into(),
                uid: "u".into(),
            },
            ips: vec!["10.0.0.1".parse().unwrap()],
        };
        store.save(&r).unwrap();
        assert_eq!(store.load_all().unwrap(), vec![r.clone()]);
        let names: Vec<_> = std::fs::read_dir(store.dir().join("pods"))
            .unwrap()
            .collect();
        assert_eq!(names.len(), 1);
        store.remove(&r.attachment).unwrap();
        store.remove(&r.attachment).unwrap();
        assert!(store.load_all().unwrap().is_empty());
    }

    #[test]
    fn the_quic_reset_secret_is_made_once_private_and_then_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state")).unwrap();
        let first = store.quic_reset_secret().unwrap();
        assert_eq!(first.len(), 32);
        let path = store.dir().join("quic-reset-key");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A later daemon on the node (another Store on the same directory) gets the same.
        let again = Store::open(store.dir())
            .unwrap()
            .quic_reset_secret()
            .unwrap();
        assert_eq!(again, first);
        let leftovers: Vec<_> = std::fs::read_dir(store.dir())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        // A damaged file is an error, not a silently different key.
        std::fs::write(&path, b"short").unwrap();
        assert!(store.quic_reset_secret().is_err());
    }
}
