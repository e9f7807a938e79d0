//! Per-connection tasks, and what their futures weigh.
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

#[cfg(test)]
mod tests {
    use super::guarded;

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
