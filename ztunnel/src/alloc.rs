//! Tuning of the C allocator (glibc malloc) for the data path.
//!
//! Bulk flows hand h2 read buffers of up to 256 KiB that stay alive until the peer has taken
//! them, so a new buffer is allocated while the previous one is still held. With glibc's
//! defaults those buffers are `mmap`ed, or carved from heap memory that `free` has just given
//! back to the kernel, and every one is page-faulted in again: a profile of 8 bulk streams showed
//! 14 % of the CPU in page faults (≈ 316 000 faults in 4 s; 7 000 with this tuning).
//!
//! A daemon must also give back what a burst used once it is over. glibc gives each thread that
//! meets a locked arena an arena of its own (up to eight per core), and `malloc_trim` returns
//! the free pages inside every arena but the free space at the top only of the main one: a
//! thread's arena keeps up to [`TRIM_THRESHOLD`] of free top for good. Measured on the
//! real-process bench (`benches/daemons.rs`), each daemon kept 8 to 12 MiB more anonymous
//! memory 14 s after a bulk and connection load than before it; with one arena, under 1 MiB.
//!
//! Each thread also keeps a cache of freed small chunks (glibc's tcache: up to seven of each
//! of 64 sizes up to 1 KiB), which neither `free` nor `malloc_trim` returns to the heap. After a
//! load those cached chunks lie scattered over the heap the load grew, each keeping its page
//! resident: with 2 000 connections held and the load over, about 600 of them (350 KB) kept
//! 1.8 MB of otherwise free heap resident in each daemon. Without the cache, what stays after
//! such a load went from 1.5–2.2 MiB to 0.4–0.5 MiB, with the same CPU per GiB and per
//! connection (`benches/README.md`): small allocations then take the one arena's lock, which
//! the daemon's two worker threads rarely contend for. glibc reads the cache's size only when
//! a program starts (`GLIBC_TUNABLES`), so [`restart_with_tunables`] starts the daemon again
//! with [`TUNABLE`] before it does anything else.
//!
//! Contract: [`tune`] raises the `mmap` threshold to [`MMAP_THRESHOLD`] and the trim threshold
//! to [`TRIM_THRESHOLD`], so buffers of a bulk flow are reused from the heap, and limits the
//! process to one arena ([`ARENAS`]); [`trim`] returns the heap's free memory to the kernel,
//! and [`trim_periodically`] does so every [`TRIM_INTERVAL`], so that an idle daemon does not
//! keep what a past burst used. Both are no-ops on other C libraries.

use std::time::Duration;

/// Allocations at least this large are `mmap`ed (glibc's default is 128 KiB, adjusted upward
/// as such chunks are freed).
pub const MMAP_THRESHOLD: usize = 1024 * 1024;
/// Free memory at the top of a heap beyond this is returned to the kernel at `free`.
pub const TRIM_THRESHOLD: usize = 8 * 1024 * 1024;
/// Arenas glibc may create: one, the main arena, which [`trim`] can shrink entirely.
pub const ARENAS: usize = 1;
/// How often [`trim_periodically`] returns free heap memory to the kernel.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(10);

/// The glibc tunable the daemons run with: no per-thread cache of freed chunks.
pub const TUNABLE: &str = "glibc.malloc.tcache_count=0";

/// The value of `GLIBC_TUNABLES` with [`TUNABLE`] added to `current`, or `None` when `current`
/// already sets the cache's size (an operator's choice stands).
pub fn tunables_with_ours(current: Option<&str>) -> Option<String> {
    match current {
        None | Some("") => Some(TUNABLE.to_owned()),
        Some(c)
            if c.split(':')
                .any(|t| t.starts_with("glibc.malloc.tcache_count=")) =>
        {
            None
        }
        Some(c) => Some(format!("{c}:{TUNABLE}")),
    }
}

/// Starts this program again, with the same arguments and [`TUNABLE`] added to
/// `GLIBC_TUNABLES`, unless the environment already sets the cache's size. Call first thing in
/// `main`, before any thread is started. Returns only when nothing was to be done (`None`) or
/// the program could not be started again (the error; it runs on with glibc's cache). Not in a
/// secure-execution process (set-user-ID, file capabilities), whose tunables glibc ignores, so
/// it would start again for ever; nor with other C libraries.
pub fn restart_with_tunables() -> Option<std::io::Error> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: getauxval only reads the process's auxiliary vector.
        if unsafe { libc::getauxval(libc::AT_SECURE) } != 0 {
            return None;
        }
        let current = std::env::var("GLIBC_TUNABLES").ok();
        let value = tunables_with_ours(current.as_deref())?;
        let mut args = std::env::args_os();
        let arg0 = args.next().unwrap_or_default();
        // `exec` returns only when it failed.
        Some(
            std::process::Command::new("/proc/self/exe")
                .arg0(arg0)
                .args(args)
                .env("GLIBC_TUNABLES", value)
                .exec(),
        )
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

/// Applies the thresholds; call once at start, before the runtime spawns its threads.
/// Returns whether the C library accepted them.
pub fn tune() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets allocator parameters; every value is within its limits.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int) == 1
                && libc::mallopt(libc::M_ARENA_MAX, ARENAS as libc::c_int) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// Returns free heap memory to the kernel (all arenas).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Calls [`trim`] every [`TRIM_INTERVAL`], forever.
pub async fn trim_periodically() {
    let mut tick = tokio::time::interval(TRIM_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        trim();
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::{tunables_with_ours, TUNABLE};

    #[test]
    fn our_tunable_is_added_unless_the_cache_size_is_set() {
        let cases = [
            (None, Some(TUNABLE.to_owned())),
            (Some(""), Some(TUNABLE.to_owned())),
            (
                Some("glibc.malloc.arena_max=2"),
                Some(format!("glibc.malloc.arena_max=2:{TUNABLE}")),
            ),
            (Some("glibc.malloc.tcache_count=3"), None),
            (
                Some("glibc.malloc.mxfast=0:glibc.malloc.tcache_count=7"),
                None,
            ),
            (
                Some("glibc.malloc.tcache_count_x=1"),
                Some(format!("glibc.malloc.tcache_count_x=1:{TUNABLE}")),
            ),
        ];
        for (current, want) in cases {
            assert_eq!(tunables_with_ours(current), want, "{current:?}");
        }
    }

    #[test]
    fn glibc_accepts_the_thresholds() {
        assert!(super::tune());
        super::trim();
    }
}
