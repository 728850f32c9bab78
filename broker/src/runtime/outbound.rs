//! A session's outbound queue, bounded in frames and in bytes, and the
//! node's total of queued bytes (docs/DESIGN.md, "Bounds").
//!
//! A frame offered to a session's queue is refused when the queue holds
//! `queue_frames_max` frames, when it would take the session past
//! `queue_bytes_max`, or when the node's queued bytes are past half of
//! `queue_bytes_total_max` and the session holds more than its share (half
//! the total bound divided by the sessions). A session with an empty queue
//! always takes one frame, so a message larger than a bound still goes
//! out. The node is told of every refusal and applies the session's slow
//! policy (cut, or conflate with a gap notice; a catch-up replay waits).
//!
//! Why half: bytes queued while the total is under half the bound are at
//! most half of it; past that only sessions under their share take more,
//! together at most the other half. So the node's queued bytes stay under
//! the bound (plus one frame per session), and the sessions that hold the
//! most are the ones refused, never a fast one with an empty queue.
//!
//! Each queued frame carries its account: the bytes are counted from the
//! moment a frame is queued until it is written or dropped, however that
//! happens (written, discarded with a closed session's queue).

use bytes::{Buf, Bytes};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

/// The node's byte bounds and its total of queued bytes.
#[derive(Debug)]
pub(super) struct Budget {
    total: AtomicUsize,
    total_max: usize,
    session_max: usize,
}

impl Budget {
    pub(super) fn new(session_max: usize, total_max: usize) -> Arc<Self> {
        Arc::new(Budget {
            total: AtomicUsize::new(0),
            total_max,
            session_max,
        })
    }

    /// Bytes queued for every session now.
    #[cfg(test)]
    pub(super) fn total(&self) -> usize {
        self.total.load(Relaxed)
    }
}

/// One session's queued bytes.
#[derive(Debug)]
struct Account {
    bytes: AtomicUsize,
    budget: Arc<Budget>,
}

/// A frame in a session's queue, counted until it is dropped.
#[derive(Debug)]
pub(super) struct Queued {
    frame: Bytes,
    len: usize,
    account: Arc<Account>,
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.account.bytes.fetch_sub(self.len, Relaxed);
        self.account.budget.total.fetch_sub(self.len, Relaxed);
    }
}

impl Buf for Queued {
    fn remaining(&self) -> usize {
        self.frame.remaining()
    }

    fn chunk(&self) -> &[u8] {
        self.frame.chunk()
    }

    fn advance(&mut self, n: usize) {
        self.frame.advance(n);
    }
}

/// Why a frame was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refused {
    /// The queue holds its most frames.
    Frames,
    /// The session would pass its byte bound.
    Bytes,
    /// The node's queued bytes are past half its bound and the session
    /// holds more than its share.
    Total,
}

/// The node's side of a session's queue.
#[derive(Debug)]
pub(super) struct Outbound {
    tx: flume::Sender<Queued>,
    account: Arc<Account>,
}

impl Outbound {
    /// A queue of at most `frames_max` frames, counted in `budget`; the
    /// writer's end.
    pub(super) fn new(budget: Arc<Budget>, frames_max: usize) -> (Self, flume::Receiver<Queued>) {
        let (tx, rx) = flume::bounded(frames_max);
        let account = Arc::new(Account {
            bytes: AtomicUsize::new(0),
            budget,
        });
        (Outbound { tx, account }, rx)
    }

    /// Queues `frame` unless a bound refuses it (module docs); `sessions`
    /// is how many sessions share the total.
    pub(super) fn offer(&self, frame: Bytes, sessions: usize) -> Result<(), Refused> {
        let len = frame.len();
        let budget = &self.account.budget;
        let mine = self.account.bytes.load(Relaxed);
        if mine > 0 {
            if mine + len > budget.session_max {
                return Err(Refused::Bytes);
            }
            let half = budget.total_max / 2;
            let share = half / sessions.max(1);
            if budget.total.load(Relaxed) + len > half && mine + len > share {
                return Err(Refused::Total);
            }
        }
        self.account.bytes.fetch_add(len, Relaxed);
        budget.total.fetch_add(len, Relaxed);
        let queued = Queued {
            frame,
            len,
            account: self.account.clone(),
        };
        match self.tx.try_send(queued) {
            // Dropped here, the frame gives its bytes back.
            Err(flume::TrySendError::Full(_)) => Err(Refused::Frames),
            // The writer is gone; the session's close is on its way.
            Ok(()) | Err(flume::TrySendError::Disconnected(_)) => Ok(()),
        }
    }

    /// Frames queued now.
    pub(super) fn frames(&self) -> usize {
        self.tx.len()
    }

    /// Bytes queued now.
    pub(super) fn bytes(&self) -> usize {
        self.account.bytes.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize) -> Bytes {
        Bytes::from(vec![0u8; len])
    }

    #[test]
    fn a_session_is_refused_past_its_bytes_and_frames_but_an_empty_queue_takes_one() {
        let budget = Budget::new(1000, 1 << 30);
        let (q, rx) = Outbound::new(budget.clone(), 3);
        assert_eq!(q.offer(frame(5000), 1), Ok(()), "an empty queue takes one");
        assert_eq!(q.offer(frame(1), 1), Err(Refused::Bytes));
        drop(rx.recv().expect("queued"));
        assert_eq!((q.bytes(), budget.total()), (0, 0), "written: given back");
        for _ in 0..3 {
            assert_eq!(q.offer(frame(10), 1), Ok(()));
        }
        assert_eq!(q.offer(frame(10), 1), Err(Refused::Frames));
        assert_eq!(q.bytes(), 30, "the refused frame is not counted");
        drop(rx);
        drop(q);
        assert_eq!(budget.total(), 0, "a dropped queue gives its bytes back");
    }

    #[test]
    fn past_half_the_total_those_over_their_share_are_refused_and_the_total_holds() {
        // 10 sessions, a total bound of 10,000: past 5,000 in all, a
        // session over 500 is refused; one with an empty queue never is.
        let budget = Budget::new(1 << 30, 10_000);
        let queues: Vec<_> = (0..10)
            .map(|_| Outbound::new(budget.clone(), 1 << 20))
            .collect();
        let mut refused = vec![0; 10];
        // Sessions 0..9 never read; session 9 reads everything.
        for _round in 0..1000 {
            for (i, (q, rx)) in queues.iter().enumerate() {
                if q.offer(frame(100), 10).is_err() {
                    refused[i] += 1;
                }
                if i == 9 {
                    rx.drain().for_each(drop);
                }
            }
            assert!(budget.total() <= 10_000 + 10 * 100, "{}", budget.total());
        }
        assert!(refused[..9].iter().all(|&r| r > 0), "{refused:?}");
        assert_eq!(refused[9], 0, "the reader was never refused");
        assert!(budget.total() <= 10_000);
    }
}
