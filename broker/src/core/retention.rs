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

/// Recent ordered messages, contiguous in sequence number.
pub struct Retention {
    msgs: VecDeque<Ordered>,
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
            msgs: VecDeque::new(),
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
        self.msgs.get(i).map(|m| m.hash)
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
        let last = self.msgs.back().map_or(self.base.0, |m| m.seq);
        assert_eq!(
            msg.seq,
            last.next(),
            "invariant: retained sequence numbers are contiguous"
        );
        self.bytes += msg.cost();
        self.msgs.push_back(msg);
        while self.msgs.len() > self.count_max
            || (self.bytes > self.bytes_max && self.msgs.len() > 1)
        {
            if let Some(old) = self.msgs.pop_front() {
                self.bytes -= old.cost();
                self.base = (old.seq, old.hash);
            }
        }
    }

    /// The oldest retained sequence number, if any.
    pub fn first(&self) -> Option<Seq> {
        self.msgs.front().map(|m| m.seq)
    }

    /// The retained messages with sequence numbers greater than `after`.
    pub fn after(&self, after: Seq) -> impl Iterator<Item = &Ordered> {
        let skip = match self.msgs.front() {
            Some(first) if after >= first.seq => (after.0 - first.seq.0 + 1) as usize,
            _ => 0,
        };
        self.msgs.iter().skip(skip)
    }

    /// The number of retained messages.
    pub fn len(&self) -> usize {
        self.msgs.len()
    }

    /// Whether nothing is retained.
    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
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
    #[should_panic(expected = "contiguous")]
    fn a_hole_in_sequence_numbers_is_a_bug() {
        let mut r = Retention::new(3, 1 << 20);
        r.push(msg(1, 1));
        r.push(msg(3, 1));
    }
}
