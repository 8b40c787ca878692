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
//! device certificate cannot fill it and stall the port; and one device
//! may have at most [`SETUP_WAITING_PER_DEVICE`] links waiting, so a
//! certificate taken from one device cannot fill it either (its newest
//! link would replace the others anyway).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use hearth_proto::ids::DeviceId;
use tokio::sync::{Semaphore, SemaphorePermit};

use super::LinkError;

/// Link setups running at once per node: a few per pooled database
/// connection, so each has the next statement ready.
pub const SETUP_CONCURRENCY: usize = 64;
/// Links waiting for a setup slot at which the device port pauses accepting.
pub const SETUP_QUEUE_MAX: usize = 512;
/// Longest wait for a setup slot.
pub const SETUP_QUEUE_WAIT: Duration = Duration::from_secs(10);
/// Links of one device that may wait for a setup slot at once; more are
/// turned away at once.
pub const SETUP_WAITING_PER_DEVICE: u8 = 2;

/// Setup slots and the count of links waiting for one.
pub struct SetupGate {
    slots: Semaphore,
    waiting: AtomicUsize,
    /// Links waiting per device; a device with none has no entry.
    by_device: Mutex<HashMap<DeviceId, u8>>,
}

impl Default for SetupGate {
    fn default() -> Self {
        Self { slots: Semaphore::new(SETUP_CONCURRENCY), waiting: AtomicUsize::new(0), by_device: Mutex::new(HashMap::new()) }
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

    /// Waits for a setup slot for a link of `device`, at most
    /// [`SETUP_QUEUE_WAIT`]; the slot is held until the permit drops.
    /// Refused at once if [`SETUP_WAITING_PER_DEVICE`] links of the device
    /// wait already.
    pub async fn enter(&self, device: &DeviceId) -> Result<SemaphorePermit<'_>, LinkError> {
        self.enter_within(device, SETUP_QUEUE_WAIT).await
    }

    fn lock_devices(&self) -> MutexGuard<'_, HashMap<DeviceId, u8>> {
        // Single increments and decrements: a panic elsewhere leaves it consistent.
        self.by_device.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn enter_within(&self, device: &DeviceId, wait: Duration) -> Result<SemaphorePermit<'_>, LinkError> {
        /// One waiting link, counted in total and for its device until dropped.
        struct Waiting<'a> {
            gate: &'a SetupGate,
            device: &'a DeviceId,
        }
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.gate.waiting.fetch_sub(1, Ordering::Relaxed);
                let mut devices = self.gate.lock_devices();
                if let Some(n) = devices.get_mut(self.device) {
                    *n -= 1;
                    if *n == 0 {
                        devices.remove(self.device);
                    }
                }
            }
        }
        {
            let mut devices = self.lock_devices();
            let n = devices.entry(device.clone()).or_insert(0);
            if *n >= SETUP_WAITING_PER_DEVICE {
                return Err(LinkError::Timeout("a free link setup slot (this device has other links waiting)"));
            }
            *n += 1;
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting { gate: self, device };
        match tokio::time::timeout(wait, self.slots.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; treat it as busy all the same.
            Ok(Err(_)) | Err(_) => Err(LinkError::Timeout("a free link setup slot (the cloud is busy)")),
        }
    }

    /// Devices with links waiting now.
    #[cfg(test)]
    fn devices_waiting(&self) -> usize {
        self.lock_devices().len()
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Waker};

    use super::*;

    fn devices(n: usize) -> Vec<DeviceId> {
        (0..n).map(|_| DeviceId::random()).collect()
    }

    /// Polls once; true if the future is still waiting.
    fn pending<F: Future + ?Sized>(f: Pin<&mut F>) -> bool {
        f.poll(&mut Context::from_waker(Waker::noop())).is_pending()
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_gate_makes_links_wait_then_refuses_them_and_counts_the_queue() {
        let gate = SetupGate::default();
        let holders = devices(SETUP_CONCURRENCY);
        let held: Vec<_> = futures_util::future::join_all(holders.iter().map(|d| gate.enter(d))).await;
        assert!(held.iter().all(Result::is_ok));
        assert_eq!(gate.waiting(), 0);

        // A waiting link is counted while it waits, and refused at the deadline.
        let started = tokio::time::Instant::now();
        let device = DeviceId::random();
        let wait = gate.enter(&device);
        tokio::pin!(wait);
        assert!(pending(wait.as_mut()));
        assert_eq!(gate.waiting(), 1);
        assert!(matches!(wait.await, Err(LinkError::Timeout(_))));
        assert_eq!(started.elapsed(), SETUP_QUEUE_WAIT);
        assert_eq!(gate.waiting(), 0);

        // A slot given back goes to the next in line.
        let next = gate.enter(&device);
        tokio::pin!(next);
        assert!(pending(next.as_mut()));
        drop(held);
        assert!(next.await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn the_port_pauses_only_once_the_queue_is_long() {
        let gate = SetupGate::default();
        let holders = devices(SETUP_CONCURRENCY);
        let _held: Vec<_> = futures_util::future::join_all(holders.iter().map(|d| gate.enter(d))).await;
        let queued = devices(SETUP_QUEUE_MAX);
        let mut waiting: Vec<_> = queued[1..].iter().map(|d| Box::pin(gate.enter(d))).collect();
        for w in &mut waiting {
            assert!(pending(w.as_mut()));
        }
        assert!(!gate.saturated());
        let mut last = Box::pin(gate.enter(&queued[0]));
        assert!(pending(last.as_mut()));
        assert!(gate.saturated());
        drop(last);
        assert!(!gate.saturated());
    }

    #[tokio::test(start_paused = true)]
    async fn one_device_cannot_fill_the_queue() {
        let gate = SetupGate::default();
        let holders = devices(SETUP_CONCURRENCY);
        let _held: Vec<_> = futures_util::future::join_all(holders.iter().map(|d| gate.enter(d))).await;
        let stolen = DeviceId::random();
        let mut first = Box::pin(gate.enter(&stolen));
        let mut second = Box::pin(gate.enter(&stolen));
        assert!(pending(first.as_mut()) && pending(second.as_mut()));
        // The third link of the same device is refused at once, uncounted.
        assert!(matches!(gate.enter(&stolen).await, Err(LinkError::Timeout(_))));
        assert_eq!((gate.waiting(), gate.devices_waiting()), (2, 1));
        // Other devices still queue.
        let someone = DeviceId::random();
        let mut other = Box::pin(gate.enter(&someone));
        assert!(pending(other.as_mut()));
        assert_eq!((gate.waiting(), gate.devices_waiting()), (3, 2));
        // A waiter that gives up frees its device's place, and a device
        // with none waiting leaves no entry behind.
        drop(first);
        let mut again = Box::pin(gate.enter(&stolen));
        assert!(pending(again.as_mut()));
        drop((second, again, other));
        assert_eq!((gate.waiting(), gate.devices_waiting()), (0, 0));
    }
}
