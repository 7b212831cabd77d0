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

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use memmap2::MmapMut;

use super::{lock, READ_CHUNK};

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
        lock(&self.spare).len()
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
        let spare = lock(&self.spare).pop();
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
        let mut spare = lock(&self.spare);
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
}
