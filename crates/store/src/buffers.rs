//! [`ReadBuffers`]: the buffers stored bytes are read into, reused instead of allocated per
//! chunk.
//!
//! A chunk read for a response lives until the connection has written it, on whichever
//! thread that happens, while the next chunk is read on a blocking thread. Allocated fresh
//! each time, 256 KiB buffers freed on one thread and taken on another leave the allocator's
//! per-thread arenas holding free memory: 64 clients of one blob peaked 10–20 MiB above the
//! bytes actually in flight. A buffer taken from here goes back when the last [`Bytes`]
//! sharing it is dropped, so the memory in use is the chunks in flight plus at most
//! [`ReadBuffers::keep`] spare ones, and a reused buffer costs no page faults. Buffers are
//! anonymous mappings of their own, not heap memory: one the pool does not keep goes back to
//! the system at once instead of staying in the allocator's free lists, so a burst of clients
//! does not raise the resident size for good.
//!
//! [`ResponseBudget`]: the one bound on bytes read for responses and not yet sent, across all
//! connections and both HTTP versions. A reader takes its share before it reads a chunk (or
//! takes one from a fill's window) and the share goes back with the last [`Bytes`] of that
//! chunk, whoever drops it: hyper once the bytes are written, or a reset stream. A reader
//! without a share waits (its response stalls); it never reads ahead of the budget. Waiters are
//! served by [`ConnectionShare`], the connection holding least first.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use memmap2::MmapMut;

use super::READ_CHUNK;

/// Spare buffers kept by default (8 MiB): enough for the chunks of a few dozen connections
/// to cycle without touching the allocator.
pub(crate) const KEEP: usize = 32;

/// A pool of [`READ_CHUNK`]-byte buffers.
#[derive(Debug)]
pub(crate) struct ReadBuffers {
    spare: Mutex<Vec<MmapMut>>,
    keep: usize,
}

impl ReadBuffers {
    /// A pool keeping at most `keep` spare buffers.
    pub(crate) fn new(keep: usize) -> Arc<Self> {
        Arc::new(Self {
            spare: Mutex::new(Vec::with_capacity(keep)),
            keep,
        })
    }

    /// Spare buffers kept at most.
    #[cfg(test)]
    pub(crate) fn keep(&self) -> usize {
        self.keep
    }

    /// Spare buffers held now.
    #[cfg(test)]
    pub(crate) fn spare(&self) -> usize {
        self.spare.lock().len()
    }

    /// Fills `len` bytes with `fill` and returns them as [`Bytes`] whose buffer comes back
    /// here when the last of them is dropped. `len` above [`READ_CHUNK`] gets a buffer of its
    /// own, not pooled.
    ///
    /// # Errors
    /// `fill`'s (the buffer goes back at once); no memory to map.
    pub(crate) fn read(
        self: &Arc<Self>,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> std::io::Result<()>,
    ) -> std::io::Result<Bytes> {
        if len > READ_CHUNK {
            let mut buffer = vec![0; len];
            fill(&mut buffer)?;
            return Ok(Bytes::from(buffer));
        }
        let spare = self.spare.lock().pop();
        let buffer = match spare {
            Some(buffer) => buffer,
            None => MmapMut::map_anon(READ_CHUNK)?,
        };
        let mut pooled = Pooled {
            buffer: Some(buffer),
            len,
            pool: Arc::clone(self),
        };
        if let Some(buffer) = pooled.buffer.as_mut() {
            fill(&mut buffer[..len])?;
        }
        Ok(Bytes::from_owner(pooled))
    }

    fn give_back(&self, buffer: MmapMut) {
        let mut spare = self.spare.lock();
        if spare.len() < self.keep {
            spare.push(buffer);
        }
    }
}

/// A pooled buffer holding `len` bytes, owned by the [`Bytes`] made of it.
struct Pooled {
    /// `None` only once given back.
    buffer: Option<MmapMut>,
    len: usize,
    pool: Arc<ReadBuffers>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        self.buffer
            .as_ref()
            .map_or(&[], |buffer| &buffer[..self.len])
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            self.pool.give_back(buffer);
        }
    }
}

/// Bytes shared out by default (`server.response_buffer`).
pub(crate) const DEFAULT_RESPONSE_BUFFER: usize = 32 << 20;

tokio::task_local! {
    /// The share of the connection a task serves (see [`ConnectionShare::scope`]).
    static CONNECTION: ConnectionShare;
}

/// What one connection holds of the [`ResponseBudget`], all its requests and streams together:
/// the budget goes first to the connections holding least, so clients that hold chunks they
/// never take (and queue more) cannot starve the others; they wait behind them.
#[derive(Debug, Clone, Default)]
pub struct ConnectionShare(Arc<AtomicUsize>);

impl ConnectionShare {
    /// A connection holding nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The share of the connection the current task serves, if it serves one.
    pub fn current() -> Option<Self> {
        CONNECTION.try_with(Clone::clone).ok()
    }

    /// Runs `future` (a connection, or a stream of one) with the reads it makes for responses
    /// counted to this share.
    pub fn scope<F: std::future::Future>(
        self,
        future: F,
    ) -> impl std::future::Future<Output = F::Output> {
        CONNECTION.scope(self, future)
    }

    fn held(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// The bytes responses may hold at once: chunks read for a response (stored, or followed in a
/// fill) count from before the read until their last [`Bytes`] is dropped.
///
/// Waiters are served connection by connection, the one holding least first (first come,
/// first served among equals; requests are at most a chunk, so a large one is not starved),
/// and a waiter costs no memory beyond its entry.
#[derive(Debug)]
pub(crate) struct ResponseBudget {
    total: usize,
    // A std mutex: a few field updates and a scan of the waiters, never held across an await.
    state: Mutex<BudgetState>,
}

#[derive(Debug)]
struct BudgetState {
    available: usize,
    next_ticket: u64,
    waiting: HashMap<u64, Waiter>,
}

#[derive(Debug)]
struct Waiter {
    share: ConnectionShare,
    want: usize,
    waker: Waker,
    granted: bool,
}

impl ResponseBudget {
    /// A budget of `total` bytes (at least one chunk).
    pub(crate) fn new(total: usize) -> Arc<Self> {
        let total = total.max(READ_CHUNK);
        Arc::new(Self {
            total,
            state: Mutex::new(BudgetState {
                available: total,
                next_ticket: 0,
                waiting: HashMap::new(),
            }),
        })
    }

    /// Bytes held now.
    pub(crate) fn held(&self) -> usize {
        self.total.saturating_sub(self.state.lock().available)
    }

    /// Waits for a share of `len` bytes (the whole budget if `len` is larger), counted to the
    /// current task's connection, to be attached to the bytes read with it.
    ///
    /// # Cancel safety
    /// Cancel-safe: a cancelled wait holds nothing.
    pub(crate) fn reserve(self: &Arc<Self>, len: usize) -> Reserving {
        Reserving {
            budget: Arc::clone(self),
            share: ConnectionShare::current().unwrap_or_default(),
            want: len.min(self.total),
            ticket: None,
        }
    }

    /// Gives `bytes` back on behalf of `share` and hands out what now fits.
    fn release(&self, share: &ConnectionShare, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let mut state = self.state.lock();
        state.available += bytes;
        share.0.fetch_sub(bytes, Ordering::Relaxed);
        state.grant();
    }
}

impl BudgetState {
    /// Grants waiters, the one whose connection holds least first, while the next one fits.
    fn grant(&mut self) {
        loop {
            let next = self
                .waiting
                .iter_mut()
                .filter(|(_, waiter)| !waiter.granted)
                .min_by_key(|(ticket, waiter)| (waiter.share.held(), **ticket))
                .map(|(_, waiter)| waiter);
            let Some(waiter) = next else { return };
            if waiter.want > self.available {
                return;
            }
            self.available -= waiter.want;
            waiter.share.0.fetch_add(waiter.want, Ordering::Relaxed);
            waiter.granted = true;
            waiter.waker.wake_by_ref();
        }
    }
}

/// A wait for a share of the [`ResponseBudget`] ([`ResponseBudget::reserve`]).
#[derive(Debug)]
pub(crate) struct Reserving {
    budget: Arc<ResponseBudget>,
    share: ConnectionShare,
    want: usize,
    /// Its place among the waiters, once it has one.
    ticket: Option<u64>,
}

impl std::future::Future for Reserving {
    type Output = Reserved;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Reserved> {
        let this = &mut *self;
        let mut state = this.budget.state.lock();
        if let Some(waiter) = this
            .ticket
            .and_then(|ticket| state.waiting.get_mut(&ticket))
        {
            if !waiter.granted {
                if !waiter.waker.will_wake(cx.waker()) {
                    waiter.waker = cx.waker().clone();
                }
                return Poll::Pending;
            }
        } else {
            // Enqueued first, even when it fits: the order is the budget's to decide.
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            state.waiting.insert(
                ticket,
                Waiter {
                    share: this.share.clone(),
                    want: this.want,
                    waker: cx.waker().clone(),
                    granted: false,
                },
            );
            this.ticket = Some(ticket);
            state.grant();
        }
        let granted = this
            .ticket
            .and_then(|ticket| state.waiting.get(&ticket))
            .is_some_and(|waiter| waiter.granted);
        if !granted {
            return Poll::Pending;
        }
        if let Some(ticket) = this.ticket.take() {
            state.waiting.remove(&ticket);
        }
        Poll::Ready(Reserved {
            budget: Arc::clone(&this.budget),
            share: this.share.clone(),
            bytes: this.want,
        })
    }
}

impl Drop for Reserving {
    fn drop(&mut self) {
        let Some(ticket) = self.ticket.take() else {
            return;
        };
        let mut state = self.budget.state.lock();
        if let Some(waiter) = state.waiting.remove(&ticket) {
            if waiter.granted {
                // Granted but never taken: give it back.
                state.available += waiter.want;
                waiter.share.0.fetch_sub(waiter.want, Ordering::Relaxed);
            }
            state.grant();
        }
    }
}

/// A share of the [`ResponseBudget`], given back when dropped.
#[derive(Debug)]
pub(crate) struct Reserved {
    budget: Arc<ResponseBudget>,
    share: ConnectionShare,
    bytes: usize,
}

impl Reserved {
    /// `bytes`, holding this share (less what they do not need, given back at once) until the
    /// last [`Bytes`] sharing them is dropped.
    pub(crate) fn attach(mut self, bytes: Bytes) -> Bytes {
        let excess = self.bytes.saturating_sub(bytes.len());
        self.budget.release(&self.share, excess);
        self.bytes -= excess;
        if bytes.is_empty() {
            return bytes;
        }
        Bytes::from_owner(Budgeted {
            bytes,
            _share: self,
        })
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.budget.release(&self.share, self.bytes);
    }
}

/// Bytes and the share of the budget they hold.
struct Budgeted {
    bytes: Bytes,
    _share: Reserved,
}

impl AsRef<[u8]> for Budgeted {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_comes_back_when_its_last_bytes_are_dropped_and_is_reused() {
        let pool = ReadBuffers::new(2);
        let bytes = pool
            .read(5, |buffer| {
                buffer.copy_from_slice(b"hello");
                Ok(())
            })
            .expect("read");
        let slice = bytes.slice(1..3);
        drop(bytes);
        assert_eq!(pool.spare(), 0, "a slice still shares the buffer");
        assert_eq!(&slice[..], b"el");
        drop(slice);
        assert_eq!(pool.spare(), 1);
        let again = pool
            .read(3, |buffer| {
                // A reused buffer still holds old bytes; `fill` overwrites what it returns.
                assert_eq!(buffer.len(), 3);
                buffer.copy_from_slice(b"abc");
                Ok(())
            })
            .expect("read");
        assert_eq!(pool.spare(), 0, "the spare buffer was taken");
        assert_eq!(&again[..], b"abc");
    }

    #[test]
    fn at_most_keep_spare_buffers_are_held_and_failed_reads_give_theirs_back() {
        let pool = ReadBuffers::new(2);
        let held: Vec<Bytes> = (0..4)
            .map(|_| pool.read(10, |_| Ok(())).expect("read"))
            .collect();
        drop(held);
        assert_eq!(pool.spare(), pool.keep());
        let failed = pool.read(10, |_| Err(std::io::Error::other("disk")));
        assert!(failed.is_err());
        assert_eq!(
            pool.spare(),
            pool.keep(),
            "the failed read's buffer came back"
        );
    }

    #[test]
    fn a_read_larger_than_a_chunk_is_not_pooled() {
        let pool = ReadBuffers::new(2);
        let big = pool
            .read(READ_CHUNK + 1, |buffer| {
                buffer.fill(7);
                Ok(())
            })
            .expect("read");
        assert_eq!(big.len(), READ_CHUNK + 1);
        drop(big);
        assert_eq!(pool.spare(), 0);
    }

    #[tokio::test]
    async fn a_share_is_held_until_the_last_bytes_are_dropped_and_readers_wait_for_it() {
        let budget = ResponseBudget::new(READ_CHUNK);
        let chunk = budget
            .reserve(READ_CHUNK)
            .await
            .attach(Bytes::from(vec![1u8; 1000]));
        // The unused part came back at once.
        assert_eq!(budget.held(), 1000);
        let slice = chunk.slice(10..20);
        drop(chunk);
        assert_eq!(budget.held(), 1000, "a slice still holds the share");
        let waiting = budget.reserve(READ_CHUNK);
        tokio::pin!(waiting);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), waiting.as_mut())
                .await
                .is_err(),
            "no share while the budget is held"
        );
        drop(slice);
        let reserved = waiting.await;
        assert_eq!(budget.held(), READ_CHUNK);
        drop(reserved.attach(Bytes::new()));
        assert_eq!(budget.held(), 0);
        // More than the budget asks for all of it, not for what can never come.
        let all = budget.reserve(10 * READ_CHUNK).await;
        assert_eq!(budget.held(), READ_CHUNK);
        // A wait given up holds nothing, granted or not.
        let mut given_up = Box::pin(budget.reserve(READ_CHUNK));
        assert!(futures_util::poll!(given_up.as_mut()).is_pending());
        drop(all);
        assert_eq!(budget.held(), READ_CHUNK, "granted to the waiter");
        drop(given_up);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn the_budget_goes_first_to_the_connection_holding_least() {
        let budget = ResponseBudget::new(2 * READ_CHUNK);
        let (greedy, modest) = (ConnectionShare::new(), ConnectionShare::new());
        let held = greedy
            .clone()
            .scope(async {
                let first = budget.reserve(READ_CHUNK).await;
                let second = budget.reserve(READ_CHUNK).await;
                (first, second)
            })
            .await;
        // The greedy connection queues more before the modest one asks.
        let greedy_wait = greedy
            .clone()
            .scope(async { budget.reserve(READ_CHUNK).await });
        tokio::pin!(greedy_wait);
        assert!(futures_util::poll!(greedy_wait.as_mut()).is_pending());
        let modest_wait = modest
            .clone()
            .scope(async { budget.reserve(READ_CHUNK).await });
        tokio::pin!(modest_wait);
        assert!(futures_util::poll!(modest_wait.as_mut()).is_pending());
        drop(held.0);
        let modest_share = modest_wait.await;
        assert!(futures_util::poll!(greedy_wait.as_mut()).is_pending());
        assert_eq!((greedy.held(), modest.held()), (READ_CHUNK, READ_CHUNK));
        drop(held.1);
        let _greedy_share = greedy_wait.await;
        drop(modest_share);
        assert_eq!((greedy.held(), modest.held()), (READ_CHUNK, 0));
    }
}
