//! Log throttling for refusals that a peer or a local application can provoke at will.
//!
//! A peer that has not authenticated (a TLS handshake that fails or never comes, bytes sent to
//! an address that is no workload's, a garbled HTTP/2 frame), or a local application retrying
//! in a loop against a destination it cannot reach, must not be able to fill the node's disk
//! with warnings at the rate it can open connections. Every refusal is still counted in
//! `ztunnel_refusals_total` (and each proxied connection still leaves its access-log line);
//! only the warning is throttled:
//! [`warn_throttled!`](crate::warn_throttled) lets through at most [`BURST`] lines per
//! [`WINDOW`] from one call site, and the next line let through carries, in its `suppressed`
//! field, how many were dropped since the previous one.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Lines let through per window and call site.
pub const BURST: u32 = 10;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(1);

/// A fixed-window limit of [`BURST`] events per [`WINDOW`].
#[derive(Debug)]
pub struct Throttle {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    window_start: Option<Instant>,
    admitted: u32,
    suppressed: u64,
}

impl Throttle {
    pub const fn new() -> Self {
        Throttle {
            state: Mutex::new(State {
                window_start: None,
                admitted: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether an event at `now` may be logged: `Some(n)`, with `n` the events refused since
    /// the last one admitted, or `None` (the event is counted as suppressed).
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock();
        let in_window = s
            .window_start
            .is_some_and(|start| now.saturating_duration_since(start) < WINDOW);
        if !in_window {
            s.window_start = Some(now);
            s.admitted = 0;
        }
        if s.admitted < BURST {
            s.admitted += 1;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed += 1;
            None
        }
    }
}

/// What a warning shows of a value a peer chose (a request's URI or method): its first
/// [`SHOWN`] bytes, cut at a character boundary, so that one line stays one line's size.
pub fn shown(value: &str) -> &str {
    if value.len() <= SHOWN {
        return value;
    }
    let end = (0..=SHOWN).rev().find(|&i| value.is_char_boundary(i));
    &value[..end.unwrap_or(0)]
}

/// How many bytes of a peer's value [`shown`] keeps.
pub const SHOWN: usize = 256;

impl Default for Throttle {
    fn default() -> Self {
        Self::new()
    }
}

/// `tracing::warn!` with a [`Throttle`] of its own call site; the line gets a `suppressed`
/// field (see the module documentation).
#[macro_export]
macro_rules! warn_throttled {
    ($($arg:tt)+) => {{
        static THROTTLE: $crate::throttle::Throttle = $crate::throttle::Throttle::new();
        if let Some(suppressed) = THROTTLE.admit(::std::time::Instant::now()) {
            ::tracing::warn!(suppressed, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_a_burst_per_window_and_reports_what_it_dropped() {
        let t = Throttle::new();
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // (time, expected answer)
        let mut steps: Vec<(Instant, Option<u64>)> = Vec::new();
        for i in 0..BURST {
            steps.push((ms(u64::from(i)), Some(0)));
        }
        steps.extend([
            (ms(500), None),
            (ms(999), None),
            // A new window: the first line reports the two dropped.
            (ms(1000), Some(2)),
            (ms(1001), Some(0)),
            // Much later, nothing was dropped in between.
            (ms(60_000), Some(0)),
        ]);
        for (i, (now, want)) in steps.into_iter().enumerate() {
            assert_eq!(t.admit(now), want, "step {i}");
        }
    }

    #[test]
    fn a_peers_value_is_shown_up_to_its_limit_at_a_character_boundary() {
        assert_eq!(shown("/short"), "/short");
        let long = "a".repeat(SHOWN + 10);
        assert_eq!(shown(&long).len(), SHOWN);
        // A two-byte character across the limit is left out whole.
        let across = format!("{}é", "a".repeat(SHOWN - 1));
        assert_eq!(shown(&across), &across[..SHOWN - 1]);
    }

    #[test]
    fn time_going_backwards_stays_in_the_window() {
        let t = Throttle::new();
        let t0 = Instant::now() + Duration::from_secs(10);
        for _ in 0..BURST {
            assert!(t.admit(t0).is_some());
        }
        assert_eq!(t.admit(t0 - Duration::from_secs(5)), None);
    }
}
