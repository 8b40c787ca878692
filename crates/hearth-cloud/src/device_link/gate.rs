//! Admission for link setups (issue 8, "reconnect storms are smoothed ...
//! by the cloud"). After its handshake and hello, a link registers itself:
//! a few database statements and, in cluster mode, a directory claim. In a
//! storm those setups used to queue without bound on the database, until a
//! link waited longer than the device waits for its first ping and every
//! link was dropped again as soon as it was made (measured: three nodes
//! with 18,000 devices each never settled).
//!
//! The gate keeps that queue short. At most [`SETUP_CONCURRENCY`] setups run
//! at once; a link waits for its turn at most [`SETUP_QUEUE_WAIT`] and is
//! then closed before any database work, so the device's jittered backoff
//! spreads its retry; and while [`SETUP_QUEUE_MAX`] links wait, the device
//! port stops accepting, so new connections stay in the listen backlog
//! instead of spending a handshake on a link that would only wait. Only
//! devices that passed mutual TLS reach the queue, so a client without a
//! device certificate cannot fill it and stall the port.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};

use super::LinkError;

/// Link setups running at once per node: enough to keep every pooled
/// database connection's pipeline busy.
pub const SETUP_CONCURRENCY: usize = 64;
/// Links waiting for a setup slot at which the device port pauses accepting.
pub const SETUP_QUEUE_MAX: usize = 512;
/// Longest wait for a setup slot.
pub const SETUP_QUEUE_WAIT: Duration = Duration::from_secs(10);

/// Setup slots and the count of links waiting for one.
pub struct SetupGate {
    slots: Semaphore,
    waiting: AtomicUsize,
}

impl Default for SetupGate {
    fn default() -> Self {
        Self { slots: Semaphore::new(SETUP_CONCURRENCY), waiting: AtomicUsize::new(0) }
    }
}

impl SetupGate {
    /// True while so many links wait that accepting more would only make
    /// them wait longer.
    pub fn saturated(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) >= SETUP_QUEUE_MAX
    }

    /// Links waiting now.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Waits for a setup slot, at most [`SETUP_QUEUE_WAIT`]; the slot is
    /// held until the permit drops.
    pub async fn enter(&self) -> Result<SemaphorePermit<'_>, LinkError> {
        self.enter_within(SETUP_QUEUE_WAIT).await
    }

    async fn enter_within(&self, wait: Duration) -> Result<SemaphorePermit<'_>, LinkError> {
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.waiting);
        match tokio::time::timeout(wait, self.slots.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; treat it as busy all the same.
            Ok(Err(_)) | Err(_) => Err(LinkError::Timeout("a free link setup slot (the cloud is busy)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Waker};

    use super::*;

    /// Polls once; true if the future is still waiting.
    fn pending<F: Future + ?Sized>(f: Pin<&mut F>) -> bool {
        f.poll(&mut Context::from_waker(Waker::noop())).is_pending()
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_gate_makes_links_wait_then_refuses_them_and_counts_the_queue() {
        let gate = SetupGate::default();
        let held: Vec<_> = futures_util::future::join_all((0..SETUP_CONCURRENCY).map(|_| gate.enter())).await;
        assert!(held.iter().all(Result::is_ok));
        assert_eq!(gate.waiting(), 0);

        // A waiting link is counted while it waits, and refused at the deadline.
        let started = tokio::time::Instant::now();
        let wait = gate.enter();
        tokio::pin!(wait);
        assert!(pending(wait.as_mut()));
        assert_eq!(gate.waiting(), 1);
        assert!(matches!(wait.await, Err(LinkError::Timeout(_))));
        assert_eq!(started.elapsed(), SETUP_QUEUE_WAIT);
        assert_eq!(gate.waiting(), 0);

        // A slot given back goes to the next in line.
        let next = gate.enter();
        tokio::pin!(next);
        assert!(pending(next.as_mut()));
        drop(held);
        assert!(next.await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn the_port_pauses_only_once_the_queue_is_long() {
        let gate = SetupGate::default();
        let _held: Vec<_> = futures_util::future::join_all((0..SETUP_CONCURRENCY).map(|_| gate.enter())).await;
        let mut waiting: Vec<_> = (0..SETUP_QUEUE_MAX - 1).map(|_| Box::pin(gate.enter())).collect();
        for w in &mut waiting {
            assert!(pending(w.as_mut()));
        }
        assert!(!gate.saturated());
        let mut last = Box::pin(gate.enter());
        assert!(pending(last.as_mut()));
        assert!(gate.saturated());
        drop(last);
        assert!(!gate.saturated());
    }
}
