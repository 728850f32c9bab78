//! A session's outbound queue, bounded in frames and in bytes, and the
//! node's total of queued bytes (docs/DESIGN.md, "Bounds").
//!
//! A session's bytes are what its queue holds; the node's total is the
//! memory all queues hold, so a frame shared by many sessions (a fan-out
//! batch is one `Bytes` for every subscriber) counts once in it, from the
//! first queue that takes it until the last lets it go.
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
//! together at most the other half (a shared frame adds to the total at
//! most what it adds to the session). So the node's queued bytes stay under
//! the bound (plus one frame per session), and the sessions that hold the
//! most are the ones refused, never a fast one with an empty queue.
//!
//! Each queued frame carries its account and its frame's charge to the
//! total: the bytes are counted from the moment a frame is queued until it
//! is written or dropped, however that happens (written, discarded with a
//! closed session's queue).

use crate::maps::FastMap;
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

    /// Bytes the queues hold now, a frame shared by several counted once.
    pub(super) fn total(&self) -> usize {
        self.total.load(Relaxed)
    }
}

/// A frame's bytes in the node's total, however many queues hold it: taken
/// off when the last of them lets the frame go.
#[derive(Debug)]
struct Charge {
    len: usize,
    budget: Arc<Budget>,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.total.fetch_sub(self.len, Relaxed);
    }
}

/// The frames offered in one drain of the node's outputs, by address and
/// length, so that one offered to many sessions is charged to the total
/// once: the node hands a fan-out batch's frames to each subscriber in
/// turn, all of one session's before the next one's. It holds each frame,
/// so no other frame can take its address meanwhile; a frame every queue
/// refused stays charged until the drain ends.
#[derive(Default)]
pub(super) struct Offered {
    frames: FastMap<(usize, usize), (Bytes, Arc<Charge>)>,
}

impl Offered {
    fn key(frame: &Bytes) -> (usize, usize) {
        (frame.as_ptr() as usize, frame.len())
    }

    fn find(&self, frame: &Bytes) -> Option<Arc<Charge>> {
        self.frames
            .get(&Self::key(frame))
            .map(|(_, charge)| charge.clone())
    }

    fn charge(&mut self, frame: &Bytes, budget: &Arc<Budget>) -> Arc<Charge> {
        budget.total.fetch_add(frame.len(), Relaxed);
        let charge = Arc::new(Charge {
            len: frame.len(),
            budget: budget.clone(),
        });
        self.frames
            .insert(Self::key(frame), (frame.clone(), charge.clone()));
        charge
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
    /// Dropped with the frame: the last holder takes it off the total.
    _charge: Arc<Charge>,
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.account.bytes.fetch_sub(self.len, Relaxed);
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
    /// is how many sessions share the total, `offered` the frames offered
    /// before it in this drain of the node's outputs.
    pub(super) fn offer(
        &self,
        frame: Bytes,
        sessions: usize,
        offered: &mut Offered,
    ) -> Result<(), Refused> {
        let len = frame.len();
        let budget = &self.account.budget;
        let mine = self.account.bytes.load(Relaxed);
        let charged = offered.find(&frame);
        if mine > 0 {
            if mine + len > budget.session_max {
                return Err(Refused::Bytes);
            }
            let half = budget.total_max / 2;
            let share = half / sessions.max(1);
            let adds = if charged.is_some() { 0 } else { len };
            if budget.total.load(Relaxed) + adds > half && mine + len > share {
                return Err(Refused::Total);
            }
        }
        let charge = charged.unwrap_or_else(|| offered.charge(&frame, budget));
        self.account.bytes.fetch_add(len, Relaxed);
        let queued = Queued {
            frame,
            len,
            account: self.account.clone(),
            _charge: charge,
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
        assert_eq!(
            q.offer(frame(5000), 1, &mut Offered::default()),
            Ok(()),
            "an empty queue takes one"
        );
        assert_eq!(
            q.offer(frame(1), 1, &mut Offered::default()),
            Err(Refused::Bytes)
        );
        drop(rx.recv().expect("queued"));
        assert_eq!((q.bytes(), budget.total()), (0, 0), "written: given back");
        for _ in 0..3 {
            assert_eq!(q.offer(frame(10), 1, &mut Offered::default()), Ok(()));
        }
        assert_eq!(
            q.offer(frame(10), 1, &mut Offered::default()),
            Err(Refused::Frames)
        );
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
                if q.offer(frame(100), 10, &mut Offered::default()).is_err() {
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

    #[test]
    fn a_frame_shared_by_many_sessions_counts_once_in_the_total_until_the_last_lets_it_go() {
        // 100 sessions, a total bound of 10,000: one 1,000-byte frame to
        // each is 100,000 bytes of queues but 1,000 of memory.
        let budget = Budget::new(1 << 20, 10_000);
        let queues: Vec<_> = (0..100)
            .map(|_| Outbound::new(budget.clone(), 1 << 20))
            .collect();
        let mut offered = Offered::default();
        let shared = frame(1000);
        for _round in 0..3 {
            for (q, _) in &queues {
                assert_eq!(q.offer(shared.clone(), 100, &mut offered), Ok(()));
            }
        }
        drop(offered);
        assert_eq!(budget.total(), 1000);
        assert!(queues.iter().all(|(q, _)| q.bytes() == 3000));
        // Written by all but one: still held, still counted.
        for (_, rx) in &queues[1..] {
            rx.drain().for_each(drop);
        }
        assert_eq!(budget.total(), 1000);
        queues[0].1.drain().for_each(drop);
        assert_eq!(budget.total(), 0);

        // Frames the node's outputs do not share are counted apart, and
        // past half the bound a session over its share is refused.
        let mut offered = Offered::default();
        let (a, b) = (&queues[0].0, &queues[1].0);
        let mut took = 0;
        while a.offer(frame(1000), 100, &mut offered).is_ok() {
            took += 1;
            assert!(took <= 10, "the total bound never refused");
        }
        assert_eq!(budget.total(), 1000 * took);
        assert_eq!(
            b.offer(frame(1000), 100, &mut offered),
            Ok(()),
            "an empty queue takes one"
        );
    }

    #[test]
    fn a_batch_of_many_frames_is_charged_once_in_fan_out_order() {
        // The node hands each session all of a batch's frames in turn:
        // 20 frames of 100 bytes to 50 sessions are 2,000 bytes of memory.
        let budget = Budget::new(1 << 20, 1 << 20);
        let queues: Vec<_> = (0..50)
            .map(|_| Outbound::new(budget.clone(), 1 << 20))
            .collect();
        let frames: Vec<Bytes> = (0..20).map(|_| frame(100)).collect();
        let mut offered = Offered::default();
        for (q, _) in &queues {
            for f in &frames {
                assert_eq!(q.offer(f.clone(), 50, &mut offered), Ok(()));
            }
        }
        drop(offered);
        assert_eq!(budget.total(), 2000);
        // At half the bound (two sessions, a share of 750 each), a frame
        // already charged adds nothing: a session past its share still
        // takes it, and a new frame is refused.
        let budget = Budget::new(1 << 20, 3000);
        let (a, _ra) = Outbound::new(budget.clone(), 1 << 20);
        let (b, _rb) = Outbound::new(budget.clone(), 1 << 20);
        let mut offered = Offered::default();
        let (first, second) = (frame(800), frame(700));
        assert_eq!(a.offer(first.clone(), 2, &mut offered), Ok(()));
        assert_eq!(a.offer(second.clone(), 2, &mut offered), Ok(()));
        assert_eq!(budget.total(), 1500, "half of 3,000");
        assert_eq!(b.offer(first, 2, &mut offered), Ok(()));
        assert_eq!(b.offer(second, 2, &mut offered), Ok(()), "charged already");
        assert_eq!(budget.total(), 1500);
        assert_eq!(b.offer(frame(10), 2, &mut offered), Err(Refused::Total));
    }
}
