//! Network namespace handles, and running a closure inside one.
//!
//! A socket belongs to the network namespace of the thread that created it, for life. So the
//! daemon creates each pod's listeners and outgoing sockets by switching the calling thread
//! into the pod's namespace (`setns`), creating the socket, and switching back before anything
//! else runs on that thread; child processes (`nft`, `ip`) are spawned the same way. The switch
//! is a pair of syscalls, cheap enough for every new connection, and it keeps the socket's
//! async I/O on the daemon's ordinary runtime threads. If switching back ever failed the thread
//! would be in the wrong namespace, so the process aborts instead of running on.

use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::sched::{setns, CloneFlags};

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
    /// (device, inode): equal for two handles of the same namespace.
    id: (u64, u64),
}

impl Netns {
    /// Opens the namespace at `path` (`/var/run/netns/<name>`, `/proc/<pid>/ns/net`).
    pub fn open(path: &Path) -> io::Result<Netns> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        let ns = Netns {
            file,
            path: path.to_owned(),
            id: (meta.dev(), meta.ino()),
        };
        // Fails unless it really is a network namespace.
        ns.run(|| ())?;
        Ok(ns)
    }

    /// The daemon's own namespace (the one its main thread started in).
    pub fn host() -> &'static Netns {
        static HOST: OnceLock<Netns> = OnceLock::new();
        HOST.get_or_init(|| {
            let path = Path::new("/proc/self/ns/net");
            let file = File::open(path).expect("cannot open the daemon's own network namespace");
            let meta = file
                .metadata()
                .expect("stat of the daemon's network namespace");
            Netns {
                file,
                path: path.to_owned(),
                id: (meta.dev(), meta.ino()),
            }
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace's inode number, which names it in logs.
    pub fn inode(&self) -> u64 {
        self.id.1
    }

    /// (device, inode): equal for two handles of the same namespace.
    pub fn id(&self) -> (u64, u64) {
        self.id
    }

    /// Runs `f` with the calling thread inside this namespace, then switches back.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let host = Netns::host();
        if self.id == host.id {
            return Ok(f());
        }
        setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        struct Back(&'static Netns);
        impl Drop for Back {
            fn drop(&mut self) {
                if let Err(e) = setns(&self.0.file, CloneFlags::CLONE_NEWNET) {
                    eprintln!("ztunnel: cannot return to the host network namespace: {e}");
                    std::process::abort();
                }
            }
        }
        let _back = Back(host);
        Ok(f())
    }
}

impl PartialEq for Netns {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for Netns {}

impl Hash for Netns {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_namespace_runs_in_place() {
        let me = Netns::open(Path::new("/proc/self/ns/net")).unwrap();
        assert_eq!(&me, Netns::host());
        assert_eq!(me.run(|| 7).unwrap(), 7);
    }

    #[test]
    fn refuses_what_is_not_a_network_namespace() {
        assert!(Netns::open(Path::new("/proc/self/ns/uts")).is_err());
        assert!(Netns::open(Path::new("/nonexistent/netns")).is_err());
    }
}
