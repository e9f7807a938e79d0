//! A time limit on every namespace test: a test still running after it (a stuck task, a wait
//! without a bound) is reported by name and its test binary exits with a failure, rather than
//! hanging the suite. [`arm`] is called by [`crate::netns::Netns::new`], so every test that
//! builds a host is covered; the limit runs from the first host a test thread builds until
//! that thread ends (the end of the test, passed or failed). Daemons started by the test die
//! with the binary (`PR_SET_PDEATHSIG`).

use std::cell::RefCell;
use std::sync::mpsc;
use std::time::Duration;

/// Environment variable that overrides [`DEFAULT_LIMIT`], in seconds.
pub const LIMIT_ENV: &str = "ZTUNNEL_TEST_LIMIT_SECS";

/// The default limit of one test.
pub const DEFAULT_LIMIT: Duration = Duration::from_secs(600);

/// Disarms the watchdog when dropped (with the test thread's locals).
struct Armed {
    _done: mpsc::Sender<()>,
}

thread_local! {
    static ARMED: RefCell<Option<Armed>> = const { RefCell::new(None) };
}

/// The limit in force: [`LIMIT_ENV`] when set (it must be a whole number of seconds), else
/// [`DEFAULT_LIMIT`].
pub fn limit() -> Duration {
    match std::env::var(LIMIT_ENV) {
        Ok(v) => Duration::from_secs(
            v.parse()
                .unwrap_or_else(|e| panic!("{LIMIT_ENV}={v:?}: not a number of seconds: {e}")),
        ),
        Err(_) => DEFAULT_LIMIT,
    }
}

/// Starts the current test thread's watchdog, once per thread. The test harness runs each test
/// on a thread named after it; a program's `main` thread (the load bed's command) is not armed.
pub fn arm() {
    let test = match std::thread::current().name() {
        Some("main") => return,
        name => name.unwrap_or("an unnamed test").to_owned(),
    };
    ARMED.with(|armed| {
        let mut armed = armed.borrow_mut();
        if armed.is_some() {
            return;
        }
        let limit = limit();
        let (done, wait) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(limit) {
                eprintln!(
                    "\n{test}: still running after {limit:?} ({LIMIT_ENV}); stopping the test \
                     binary so that it fails instead of hanging"
                );
                std::process::exit(124);
            }
        });
        *armed = Some(Armed { _done: done });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arms_once_per_thread_and_ends_with_it() {
        arm();
        arm();
        assert!(ARMED.with(|a| a.borrow().is_some()));
        let other = std::thread::spawn(|| ARMED.with(|a| a.borrow().is_some()));
        assert!(
            !other.join().unwrap(),
            "another thread is not armed by this one"
        );
    }
}
