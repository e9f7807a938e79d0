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

fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
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

    /// Writes the enrolled namespaces (a JSON array of names) for the CNI plugin.
    pub fn save_namespaces(&self, names: &[std::sync::Arc<str>]) -> io::Result<()> {
        let bytes = serde_json::to_vec(names).map_err(io::Error::other)?;
        write_atomic(&self.dir.join("enrolled-namespaces.json"), &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
