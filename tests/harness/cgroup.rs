//! Pod cgroups as the kubelet lays them out (the cgroupfs driver's
//! `kubepods/besteffort/pod<uid>`), under a directory of the test's own in the machine's
//! cgroup v2 hierarchy: a process that stands for a pod's sandbox is put there before the
//! node's daemon can see it, since the daemon confirms that a network namespace found by a
//! pod's IP is the pod's by the UID its processes' cgroups name.
//!
//! Directories are removed when the last process in them is gone ([`remove`], at the end of a
//! bed); those of a test binary killed by a signal are swept by the next one (an `rmdir` of a
//! cgroup that still holds a process fails, so a live test's are never touched).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// The cgroup v2 hierarchy: `/sys/fs/cgroup/unified` on a hybrid host, `/sys/fs/cgroup`
/// on a unified one.
fn hierarchy() -> Result<PathBuf> {
    for p in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        let p = PathBuf::from(p);
        if p.join("cgroup.procs").exists() {
            return Ok(p);
        }
    }
    bail!("no cgroup v2 hierarchy at /sys/fs/cgroup(/unified): the tests put pod sandboxes in pod cgroups as the kubelet does")
}

/// Moves process `pid` into the cgroup of pod `uid`, under the test's directory `prefix`.
pub fn put_in_pod(prefix: &str, uid: &str, pid: u32) -> Result<()> {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(sweep);
    let dir = hierarchy()?
        .join(prefix)
        .join("kubepods/besteffort")
        .join(format!("pod{uid}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    std::fs::write(dir.join("cgroup.procs"), pid.to_string())
        .with_context(|| format!("move {pid} into {}", dir.display()))?;
    Ok(())
}

/// Removes the test's directory `prefix`, where no process is left (best effort).
pub fn remove(prefix: &str) {
    if let Ok(h) = hierarchy() {
        remove_tree(&h.join(prefix));
    }
}

fn remove_tree(dir: &std::path::Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Removes other test binaries' directories (`zt<pid>x<n>`) that no process holds any more.
fn sweep() {
    let mine = format!("zt{}x", std::process::id() % 100_000);
    let Ok(h) = hierarchy() else { return };
    for e in std::fs::read_dir(&h).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("zt") && name.contains('x') && !name.starts_with(&mine) {
            remove_tree(&e.path());
        }
    }
}
