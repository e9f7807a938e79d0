//! Tasks: what per-connection tasks' futures weigh, and which of the long-lived ones ended
//! first ([`first_ended`]).
//!
//! A task's future is allocated whole when it is spawned and lives as long as its connection,
//! so its size is paid by every connection the daemon holds. Two rules keep it small:
//! - a future is wrapped with [`guarded`], never in `async move { fut.await; drop(guard) }`:
//!   rustc keeps a future moved into an async block twice (the captured value and the one
//!   being awaited), which doubled each handler's task;
//! - a step whose state is large but short-lived (a dial and its handshakes) is awaited
//!   boxed, so that its state is on the heap only while it runs and not in the task for the
//!   connection's life.

use std::future::Future;

use futures::FutureExt;

/// `fut`, dropping `guard` once it has completed.
pub fn guarded<F: Future, G>(fut: F, guard: G) -> impl Future<Output = F::Output> {
    fut.map(move |out| {
        drop(guard);
        out
    })
}

/// The first of `tasks` to end, and how.
pub async fn first_ended(tasks: &mut [(&'static str, tokio::task::JoinHandle<()>)]) -> String {
    if tasks.is_empty() {
        return std::future::pending().await;
    }
    let ended = futures::future::select_all(tasks.iter_mut().map(|(_, t)| t));
    let (result, i, _) = ended.await;
    let name = tasks[i].0;
    match result {
        Err(e) if e.is_panic() => format!("the {name} task panicked"),
        Err(e) => format!("the {name} task was cancelled: {e}"),
        Ok(()) => format!("the {name} task ended"),
    }
}

#[cfg(test)]
mod tests {
    use super::{first_ended, guarded};

    /// The daemon's supervision names the first long-lived task that ends, and how; a panic
    /// is counted.
    #[tokio::test]
    async fn the_first_task_to_end_is_named() {
        crate::metrics::count_panics();
        let before = crate::metrics::panics();
        let mut tasks = vec![
            ("waits", tokio::spawn(std::future::pending::<()>())),
            ("fails", tokio::spawn(async { panic!("as the test asks") })),
        ];
        assert_eq!(first_ended(&mut tasks).await, "the fails task panicked");
        assert!(crate::metrics::panics() > before);
        let mut tasks = vec![
            ("waits", tokio::spawn(std::future::pending::<()>())),
            ("returns", tokio::spawn(async {})),
        ];
        assert_eq!(first_ended(&mut tasks).await, "the returns task ended");
        tasks[0].1.abort();
    }

    #[test]
    fn a_guarded_future_is_held_once() {
        let big = async {
            let buf = [0u8; 4096];
            std::future::ready(()).await;
            std::hint::black_box(buf);
        };
        let size = std::mem::size_of_val(&big);
        let guard = std::sync::Arc::new(());
        assert!(std::mem::size_of_val(&guarded(big, guard)) <= size + 16);
    }
}
