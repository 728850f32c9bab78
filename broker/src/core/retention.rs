//! The retention buffer: the most recent ordered messages, kept so that a
//! client that reconnects can resume by sequence number (docs/DESIGN.md, "Identity
//! and resume").
//!
//! Bounded by a message count and a byte total; the oldest messages leave
//! first. Sequence numbers in the buffer are contiguous, so a lookup by
//! sequence number is an index computation.

use crate::core::stream::Ordered;
use canopy_client::protocol::Seq;
use std::collections::VecDeque;

/// Messages per chunk of storage.
///
/// The buffer grows a chunk at a time, never by reallocating what it holds:
/// one `VecDeque` of a million messages would copy tens of megabytes on the
/// node task at each doubling (a stall every subscriber sees), holding the
/// old copy and the new at once. A chunk emptied at the front is kept for
/// the next one needed at the back, so a full buffer allocates nothing.
/// Test builds use small chunks, so that the simulators' retention (a few
/// hundred messages) crosses chunk boundaries through crashes, restarts
/// and resumes.
const CHUNK: usize = if cfg!(test) { 16 } else { 4096 };

/// Recent ordered messages, contiguous in sequence number.
pub struct Retention {
    /// Oldest first; every chunk but the first and the last is full.
    chunks: VecDeque<VecDeque<Ordered>>,
    /// A chunk emptied at the front, kept for reuse.
    spare: Option<VecDeque<Ordered>>,
    len: usize,
    bytes: usize,
    count_max: usize,
    bytes_max: usize,
    /// The seq just before the first message held, and the running hash
    /// through it.
    base: (Seq, u64),
}

impl Retention {
    /// An empty buffer holding at most `count_max` messages and about
    /// `bytes_max` bytes (topic, payload and a fixed overhead per message).
    pub fn new(count_max: usize, bytes_max: usize) -> Self {
        Retention {
            chunks: VecDeque::new(),
            spare: None,
            len: 0,
            bytes: 0,
            count_max,
            bytes_max,
            base: (Seq(0), 0),
        }
    }

    /// An empty buffer whose stream continues after `seq`, where the
    /// running hash is `hash`.
    pub fn starting_after(count_max: usize, bytes_max: usize, seq: Seq, hash: u64) -> Self {
        Retention {
            base: (seq, hash),
            ..Retention::new(count_max, bytes_max)
        }
    }

    /// The running hash through `seq`, if `seq` is held or is the one just
    /// before the first held.
    pub fn hash_at(&self, seq: Seq) -> Option<u64> {
        let (base, hash) = self.base;
        if seq == base {
            return Some(hash);
        }
        let i = usize::try_from(seq.0.checked_sub(base.0 + 1)?).ok()?;
        self.get(i).map(|m| m.hash)
    }

    /// The seq before the first message held and the hash through it.
    pub fn base(&self) -> (Seq, u64) {
        self.base
    }

    /// Appends the next message, evicting the oldest ones over the bounds.
    ///
    /// # Panics
    /// If `msg.seq` does not follow the newest retained message: the caller
    /// orders messages, and a hole would make resume silently lossy.
    pub fn push(&mut self, msg: Ordered) {
        let last = self.last().map_or(self.base.0, |m| m.seq);
        assert_eq!(
            msg.seq,
            last.next(),
            "invariant: retained sequence numbers are contiguous"
        );
        self.bytes += msg.cost();
        match self.chunks.back_mut() {
            Some(chunk) if chunk.len() < CHUNK => chunk.push_back(msg),
            _ => {
                let mut chunk = self
                    .spare
                    .take()
                    .unwrap_or_else(|| VecDeque::with_capacity(CHUNK));
                chunk.push_back(msg);
                self.chunks.push_back(chunk);
            }
        }
        self.len += 1;
        while self.len > self.count_max || (self.bytes > self.bytes_max && self.len > 1) {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        let Some(front) = self.chunks.front_mut() else {
            return;
        };
        if let Some(old) = front.pop_front() {
            self.len -= 1;
            self.bytes -= old.cost();
            self.base = (old.seq, old.hash);
        }
        if front.is_empty() {
            self.spare = self.chunks.pop_front();
        }
    }

    /// The `i`th message held, oldest first.
    fn get(&self, i: usize) -> Option<&Ordered> {
        let (chunk, at) = self.locate(i)?;
        self.chunks.get(chunk)?.get(at)
    }

    /// The chunk and the place in it of the `i`th message held, if held.
    fn locate(&self, i: usize) -> Option<(usize, usize)> {
        if i >= self.len {
            return None;
        }
        let first = self.chunks.front()?.len();
        if i < first {
            return Some((0, i));
        }
        // Every chunk after the first is full but perhaps the last.
        let i = i - first;
        Some((1 + i / CHUNK, i % CHUNK))
    }

    fn last(&self) -> Option<&Ordered> {
        self.chunks.back().and_then(|c| c.back())
    }

    /// The oldest retained sequence number, if any.
    pub fn first(&self) -> Option<Seq> {
        self.chunks.front().and_then(|c| c.front()).map(|m| m.seq)
    }

    /// The retained messages with sequence numbers greater than `after`.
    pub fn after(&self, after: Seq) -> impl Iterator<Item = &Ordered> {
        let skip = match self.first() {
            Some(first) if after >= first => usize::try_from(after.0 - first.0 + 1).ok(),
            _ => Some(0),
        };
        // Found by index, not by walking what is skipped: catch-up asks
        // for the tail of a million messages a batch at a time.
        let (chunk, at) = skip
            .and_then(|i| self.locate(i))
            .unwrap_or((self.chunks.len(), 0));
        self.chunks
            .range(chunk..)
            .enumerate()
            .flat_map(move |(k, c)| c.range(if k == 0 { at } else { 0 }..))
    }

    /// The number of retained messages.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is retained.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The retained bytes as counted against the bound.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use canopy_client::protocol::{PubSeq, PublisherId};
    use std::sync::Arc;

    fn msg(seq: u64, len: usize) -> Ordered {
        Ordered {
            seq: Seq(seq),
            topic: Arc::from("t"),
            publisher: PublisherId(1),
            pub_seq: PubSeq(seq),
            payload: Bytes::from(vec![0; len]),
            hash: 0,
        }
    }

    #[test]
    fn oldest_messages_leave_first_at_either_bound() {
        let mut r = Retention::new(3, 1 << 20);
        for s in 1..=5 {
            r.push(msg(s, 1));
        }
        assert_eq!(r.first(), Some(Seq(3)));
        assert_eq!(
            r.after(Seq(0)).map(|m| m.seq.0).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(
            r.after(Seq(4)).map(|m| m.seq.0).collect::<Vec<_>>(),
            vec![5]
        );
        assert_eq!(r.after(Seq(9)).count(), 0);

        let mut r = Retention::new(100, 200);
        for s in 1..=5 {
            r.push(msg(s, 36)); // 101 bytes each with overhead
        }
        assert_eq!(r.len(), 1);
        assert!(r.bytes() <= 200);
    }

    #[test]
    fn hashes_are_found_from_the_seq_before_the_first_held_to_the_last() {
        let mut r = Retention::starting_after(2, 1 << 20, Seq(10), 77);
        assert_eq!(r.hash_at(Seq(10)), Some(77));
        for s in 11..=13 {
            r.push(Ordered {
                hash: s * 100,
                ..msg(s, 1)
            });
        }
        // 11 left; the hash through it is the new base.
        assert_eq!(r.base(), (Seq(11), 1100));
        let found: Vec<_> = (9..=14).map(|s| r.hash_at(Seq(s))).collect();
        assert_eq!(
            found,
            [None, None, Some(1100), Some(1200), Some(1300), None]
        );
    }

    #[test]
    fn lookups_cross_chunk_boundaries_and_emptied_chunks_are_reused() {
        let total = 3 * CHUNK as u64 + 7;
        let mut r = Retention::new(2 * CHUNK + 5, usize::MAX);
        for s in 1..=total {
            r.push(Ordered {
                hash: s * 10,
                ..msg(s, 1)
            });
        }
        let first = total - (2 * CHUNK as u64 + 5) + 1;
        assert_eq!(r.len(), 2 * CHUNK + 5);
        assert_eq!(r.first(), Some(Seq(first)));
        assert_eq!(r.base(), (Seq(first - 1), (first - 1) * 10));
        for s in [
            first,
            first + 1,
            2 * CHUNK as u64,
            2 * CHUNK as u64 + 1,
            total,
        ] {
            assert_eq!(r.hash_at(Seq(s)), Some(s * 10), "seq {s}");
            let from: Vec<u64> = r.after(Seq(s - 1)).map(|m| m.seq.0).collect();
            assert_eq!(from, (s..=total).collect::<Vec<_>>(), "after {}", s - 1);
        }
        assert_eq!(r.hash_at(Seq(total + 1)), None);
        assert_eq!(r.after(Seq(total)).count(), 0);
        assert_eq!(r.after(Seq(0)).count(), r.len());
        // At most one chunk more than the bound needs, and one spare.
        assert!(r.chunks.len() <= 2 + (2 * CHUNK + 5) / CHUNK);
        assert!(r.spare.is_some());
    }

    #[test]
    #[should_panic(expected = "contiguous")]
    fn a_hole_in_sequence_numbers_is_a_bug() {
        let mut r = Retention::new(3, 1 << 20);
        r.push(msg(1, 1));
        r.push(msg(3, 1));
    }
}
