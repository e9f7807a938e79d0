//! What `/proc` says about a process: its resident memory (fields of `status`, and `smaps`
//! summed per mapping) and the CPU time it has used (`stat`). For the measuring tools
//! (`ztunnel-memory`, `ztunnel-load`, the real-process benchmark), which read the daemons'
//! figures from outside.

use std::time::Duration;

use anyhow::{Context, Result};

/// `VmRSS` of `pid`, KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmRSS")
}

/// One `kB` field of `/proc/<pid>/status` (`VmRSS`, `RssAnon`, `RssFile`, `VmHWM`, …).
pub fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{field} of process {pid}"))
}

/// `/proc/<pid>/smaps` summed per mapped file (anonymous mappings under their bracketed
/// names or `[anon]`): `(name, Rss KiB)`, largest first.
pub fn rss_by_mapping(pid: u32) -> Result<Vec<(String, u64)>> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut sums: std::collections::BTreeMap<String, u64> = Default::default();
    let mut current = String::new();
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            let name = fields.nth(4).unwrap_or("[anon]");
            current = name.rsplit('/').next().unwrap_or(name).to_owned();
        } else if first == "Rss:" {
            let kib: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            *sums.entry(current.clone()).or_default() += kib;
        }
    }
    let mut v: Vec<_> = sums.into_iter().filter(|(_, k)| *k > 0).collect();
    v.sort_by_key(|(_, kib)| std::cmp::Reverse(*kib));
    Ok(v)
}

/// The CPU time `pid` has used, user and system, all its threads (those that ended too):
/// `utime` + `stime` of `/proc/<pid>/stat`, in clock ticks of 1/100 s (Linux's `USER_HZ`,
/// which is 100 on every architecture it reports to user space).
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_cpu_time(&stat).with_context(|| format!("utime and stime of process {pid}"))
}

/// `utime` + `stime` from the text of a `stat` file. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted after its last `)`.
fn parse_cpu_time(stat: &str) -> Option<Duration> {
    let mut rest = stat.rsplit_once(')')?.1.split_whitespace();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: u64 = rest.nth(11)?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_counts_fields_after_the_name() {
        // A name with a space and a parenthesis; utime 250 and stime 75 ticks.
        let stat = "4242 (ztun (x) y) S 1 4242 4242 0 -1 4194560 1500 0 0 0 250 75 0 0 20 0 3 0";
        assert_eq!(parse_cpu_time(stat), Some(Duration::from_millis(3250)));
        assert_eq!(parse_cpu_time("4242 (ztunnel) S 1"), None);
    }

    #[test]
    fn this_process_has_used_some_cpu_and_memory() {
        let me = std::process::id();
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(30) {
            std::hint::black_box(0u64);
        }
        assert!(cpu_time(me).unwrap() > Duration::ZERO);
        assert!(rss_kib(me).unwrap() > 0);
        assert!(status_kib(me, "NoSuchField").is_err());
    }
}
