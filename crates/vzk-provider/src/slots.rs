//! VM slots: at most N VMs exist at once. A pod holds a [`Slot`] from the moment its VM
//! is about to be created until the VM is removed; pods beyond N wait (Pending, with a
//! visible reason) in arrival order.
//!
//! # Contract
//! * [`Slots::try_acquire`] never waits; [`Slots::acquire`] waits in FIFO order.
//! * Dropping a [`Slot`] frees it (also on panic or task abort).
//! * [`Slots::in_use`] + [`Slots::available`] == [`Slots::capacity`].

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The VM slot pool.
#[derive(Debug, Clone)]
pub struct Slots {
    sem: Arc<Semaphore>,
    capacity: u32,
}

/// One held slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl Slots {
    /// A pool of `capacity` slots.
    pub fn new(capacity: u32) -> Self {
        Self {
            sem: Arc::new(Semaphore::new(capacity as usize)),
            capacity,
        }
    }

    /// The number of slots.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Free slots now.
    pub fn available(&self) -> u32 {
        u32::try_from(self.sem.available_permits()).unwrap_or(u32::MAX)
    }

    /// Slots held now.
    pub fn in_use(&self) -> u32 {
        self.capacity.saturating_sub(self.available())
    }

    /// A slot if one is free now.
    pub fn try_acquire(&self) -> Option<Slot> {
        self.sem
            .clone()
            .try_acquire_owned()
            .ok()
            .map(|p| Slot { _permit: p })
    }

    /// Waits for a slot (FIFO). `None` only if the pool was closed.
    pub async fn acquire(&self) -> Option<Slot> {
        self.sem
            .clone()
            .acquire_owned()
            .await
            .ok()
            .map(|p| Slot { _permit: p })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn extra_takers_wait_until_a_slot_is_freed() {
        let slots = Slots::new(2);
        let a = slots.try_acquire();
        let b = slots.try_acquire();
        assert!(a.is_some() && b.is_some());
        assert_eq!((slots.in_use(), slots.available()), (2, 0));
        assert!(slots.try_acquire().is_none());

        let s2 = slots.clone();
        let waiter = tokio::spawn(async move { s2.acquire().await.is_some() });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished(), "third pod must wait");
        drop(a);
        assert_eq!(waiter.await.ok(), Some(true));
        // The waiter's slot was dropped with its task: one held (b), one free.
        assert_eq!(slots.in_use(), 1);
        drop(b);
        assert_eq!(slots.available(), 2);
    }
}
