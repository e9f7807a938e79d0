//! What the plugin does itself inside a pod's network namespace once the daemon has enrolled
//! the pod: it runs on the host with the container runtime's privileges, where the daemon's
//! container (not privileged: `/proc/sys` read-only) may not be able to.
//!
//! Only `net.ipv4.tcp_migrate_req` (TCP in both families), so that a connection still queued
//! on the old daemon's listener when it closes during a rolling restart moves to the new
//! daemon's listener (`SO_REUSEPORT`) instead of being reset.

use std::io;
use std::os::fd::AsFd;
use std::path::Path;

/// A pod's network namespace, as the plugin can change it.
pub trait PodNetns {
    /// Sets `net.ipv4.tcp_migrate_req` to 1 in the namespace at `path`.
    fn enable_listener_migration(&self, path: &Path) -> io::Result<()>;
}

/// The real namespace: entered on a thread of its own (`setns`), which writes the setting.
pub struct HostNetns;

impl PodNetns for HostNetns {
    fn enable_listener_migration(&self, path: &Path) -> io::Result<()> {
        let file = std::fs::File::open(path)?;
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)?;
                std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1")
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the netns thread panicked")))
        })
    }
}
