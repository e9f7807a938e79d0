//! Gives back to the kernel, once the daemon is ready, the code pages that only start-up ran.
//!
//! Most of an idle daemon's resident memory is its own executable mapped from the page cache,
//! not its heap. At `exec` the kernel reads the file ahead in large chunks (up to the device's
//! read-ahead: 8 MiB on the test machines) and maps a cached folio whole on a fault, so by the
//! time the daemon is ready nearly all of its code and read-only data (about 12 MiB) is mapped,
//! although what it runs from then on (the event loop, TLS, HTTP/2, the proxies) is a fraction
//! of that. The kernel is reluctant to reclaim mapped executable pages, so without help they
//! stay resident, and charged to the daemon, for its whole life.
//!
//! Contract: [`release_startup_pages`], called once when the daemon is ready, applies to each
//! mapping of the executable that holds no anonymous (copied-on-write) pages:
//! 1. `MADV_RANDOM`: a later fault reads the one page it needs, not a read-ahead window;
//! 2. `MADV_PAGEOUT`: the kernel reclaims the pages that this process alone maps;
//!
//! then it drops the executable's pages that nothing maps any more from the page cache
//! (`POSIX_FADV_DONTNEED`). None of this changes memory contents: a page touched again is read
//! back from the file, one page the first time the daemon needs it. The relocated read-only
//! data (which holds anonymous pages) is left alone. Best effort: an error is returned for the
//! caller to log and nothing else changes.

use std::os::unix::fs::MetadataExt;

/// What [`release_startup_pages`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// Mappings of the executable advised.
    pub mappings: usize,
    /// The process's resident set before and after, in KiB.
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
}

/// Errors of [`release_startup_pages`].
#[derive(Debug, thiserror::Error)]
pub enum ResidencyError {
    #[error("reading {0}: {1}")]
    Proc(&'static str, std::io::Error),
    #[error("madvise: {0}")]
    Madvise(std::io::Error),
    #[error("posix_fadvise on the executable: {0}")]
    Fadvise(nix::Error),
}

/// One mapping of `/proc/self/smaps`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    /// `(major, minor)` of the mapped file's device, and its inode (0 for anonymous memory).
    dev: (u64, u64),
    inode: u64,
    anonymous_kib: u64,
}

/// Parses `/proc/<pid>/smaps` text: each mapping's range, file and anonymous pages.
fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if first == "Anonymous:" {
            if let (Some(m), Some(kib)) = (out.last_mut(), fields.next()) {
                m.anonymous_kib = kib.parse().unwrap_or(u64::MAX);
            }
            continue;
        }
        let Some((a, b)) = first.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
        else {
            continue;
        };
        let _perms = fields.next();
        let _offset = fields.next();
        let dev = fields.next().and_then(|d| {
            let (maj, min) = d.split_once(':')?;
            Some((
                u64::from_str_radix(maj, 16).ok()?,
                u64::from_str_radix(min, 16).ok()?,
            ))
        });
        let inode = fields.next().and_then(|i| i.parse().ok());
        if let (Some(dev), Some(inode)) = (dev, inode) {
            out.push(Mapping {
                start,
                end,
                dev,
                inode,
                anonymous_kib: 0,
            });
        }
    }
    out
}

/// The mappings of the file `(dev, inode)` that hold no anonymous pages: the ones whose
/// contents are the file's, which advice can never change.
fn file_only_mappings(maps: &[Mapping], dev: (u64, u64), inode: u64) -> Vec<(usize, usize)> {
    maps.iter()
        .filter(|m| m.inode == inode && m.dev == dev && m.anonymous_kib == 0)
        .map(|m| (m.start, m.end))
        .collect()
}

fn rss_kib() -> Result<u64, ResidencyError> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| ResidencyError::Proc("/proc/self/status", e))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

fn madvise(range: (usize, usize), advice: libc::c_int) -> Result<(), ResidencyError> {
    // SAFETY: the range is one of this process's own mappings as the kernel listed it
    // (page-aligned), and neither advice used here changes what the memory holds.
    let rc = unsafe { libc::madvise(range.0 as *mut libc::c_void, range.1 - range.0, advice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(ResidencyError::Madvise(std::io::Error::last_os_error()))
    }
}

/// [`release_startup_pages`], with the outcome logged (`info`, or `warn` on failure): what
/// `ztunnel run` and `ztunnel ca` call once they are ready.
pub fn release_startup_pages_logged() {
    match release_startup_pages() {
        Ok(r) => tracing::info!(
            mappings = r.mappings,
            rss_before_kib = r.rss_before_kib,
            rss_after_kib = r.rss_after_kib,
            "released the code pages only start-up used"
        ),
        Err(e) => tracing::warn!(error = %e, "could not release start-up code pages"),
    }
}

/// See the module documentation.
pub fn release_startup_pages() -> Result<Released, ResidencyError> {
    let rss_before_kib = rss_kib()?;
    let exe = std::fs::File::open("/proc/self/exe")
        .map_err(|e| ResidencyError::Proc("/proc/self/exe", e))?;
    let meta = exe
        .metadata()
        .map_err(|e| ResidencyError::Proc("/proc/self/exe", e))?;
    let dev = (
        nix::sys::stat::major(meta.dev()),
        nix::sys::stat::minor(meta.dev()),
    );
    let smaps = std::fs::read_to_string("/proc/self/smaps")
        .map_err(|e| ResidencyError::Proc("/proc/self/smaps", e))?;
    let ranges = file_only_mappings(&parse_smaps(&smaps), dev, meta.ino());
    for &range in &ranges {
        madvise(range, libc::MADV_RANDOM)?;
        madvise(range, libc::MADV_PAGEOUT)?;
    }
    nix::fcntl::posix_fadvise(
        &exe,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .map_err(ResidencyError::Fadvise)?;
    Ok(Released {
        mappings: ranges.len(),
        rss_before_kib,
        rss_after_kib: rss_kib()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c029e000 r--p 00000000 fd:01 1234 /usr/bin/ztunnel
Size:               2680 kB
Rss:                2680 kB
Anonymous:             0 kB
55d0c029e000-55d0c0bf9000 r-xp 0029d000 fd:01 1234 /usr/bin/ztunnel
Rss:                9000 kB
Anonymous:             0 kB
55d0c0bfa000-55d0c0c50000 r--p 00bf8000 fd:01 1234 /usr/bin/ztunnel
Rss:                 344 kB
Anonymous:           344 kB
55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0 [heap]
Anonymous:           132 kB
7f0000000000-7f0000028000 r--p 00000000 fd:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             0 kB
7f1000000000-7f1000001000 r-xp 00000000 fd:02 1234 /other/device/same/inode
Anonymous:             0 kB
";

    #[test]
    fn parses_ranges_files_and_anonymous_pages() {
        let maps = parse_smaps(SMAPS);
        assert_eq!(maps.len(), 6);
        assert_eq!(
            maps[2],
            Mapping {
                start: 0x55d0c0bfa000,
                end: 0x55d0c0c50000,
                dev: (0xfd, 1),
                inode: 1234,
                anonymous_kib: 344,
            }
        );
        assert_eq!(maps[3].inode, 0);
    }

    #[test]
    fn only_the_executables_file_only_mappings_are_advised() {
        let ranges = file_only_mappings(&parse_smaps(SMAPS), (0xfd, 1), 1234);
        // Not the relocated data (anonymous pages), not libc, not the same inode elsewhere.
        assert_eq!(
            ranges,
            [
                (0x55d0c0000000, 0x55d0c029e000),
                (0x55d0c029e000, 0x55d0c0bf9000)
            ]
        );
    }

    #[test]
    fn releasing_leaves_the_process_working() {
        let released = release_startup_pages().expect("release");
        // The test binary has at least its code and read-only data mapped from its file.
        assert!(released.mappings >= 2, "{released:?}");
        // Code, constants and relocated data are all still usable afterwards.
        let parsed = parse_smaps(SMAPS);
        assert_eq!(parsed.len(), 6);
        assert_eq!(format!("{}", 42), "42");
    }
}
