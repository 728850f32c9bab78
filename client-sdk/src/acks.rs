//! Publish acknowledgements without a channel per publish.
//!
//! [`crate::Client::send`] takes a slot from one shared table and names it
//! in its command; the driver fills the slot when the publish is
//! acknowledged (or refused, or the client fails) and wakes whoever awaits
//! the [`crate::PendingAck`]. A slot is reused once both sides are done
//! with it, so the table grows to the most acknowledgements outstanding at
//! once (about the publish window) and publishing allocates nothing for
//! them after that.

use crate::protocol::PubSeq;
use crate::Error;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

/// The slots, shared by the client handles and the driver.
#[derive(Default)]
pub(crate) struct Acks(Mutex<Table>);

#[derive(Default)]
struct Table {
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Set once the driver stopped: no slot is taken after that.
    closed: Option<Error>,
    /// Wakers to wake once the lock is let go (a waker may run code that
    /// takes it again).
    wake: Vec<Waker>,
}

struct Slot {
    state: State,
    /// The `PendingAck` naming this slot still exists.
    held: bool,
}

enum State {
    Free,
    Waiting(Option<Waker>),
    Done(Result<PubSeq, Error>),
}

impl Acks {
    fn table(&self) -> MutexGuard<'_, Table> {
        // Nothing panics while holding the lock; a poisoned table is whole.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a new publish, or why there is none (the client stopped).
    pub(crate) fn take(&self) -> Result<usize, Error> {
        let mut t = self.table();
        if let Some(e) = &t.closed {
            return Err(e.clone());
        }
        let slot = Slot {
            state: State::Waiting(None),
            held: true,
        };
        Ok(match t.free.pop() {
            Some(i) => {
                t.slots[i] = slot;
                i
            }
            None => {
                t.slots.push(slot);
                t.slots.len() - 1
            }
        })
    }

    /// The publish of slot `i` is settled: acknowledged as `result`'s
    /// pub_seq or failed.
    pub(crate) fn settle(&self, i: usize, result: Result<PubSeq, Error>) {
        let mut t = self.table();
        t.settle(i, result);
        wake(t);
    }

    /// Every publish in `settled` is acknowledged (one lock for a batch).
    pub(crate) fn settle_all(&self, settled: impl IntoIterator<Item = (usize, PubSeq)>) {
        let mut t = self.table();
        for (i, pub_seq) in settled {
            t.settle(i, Ok(pub_seq));
        }
        wake(t);
    }

    /// The driver stopped with `e`: every waiting publish fails with it and
    /// no slot is taken any more.
    pub(crate) fn close(&self, e: &Error) {
        let mut t = self.table();
        if t.closed.is_none() {
            t.closed = Some(e.clone());
        }
        for i in 0..t.slots.len() {
            if matches!(t.slots[i].state, State::Waiting(_)) {
                t.settle(i, Err(e.clone()));
            }
        }
        wake(t);
    }

    /// Polls slot `i` for its outcome; a ready outcome frees the slot.
    pub(crate) fn poll(&self, i: usize, cx: &mut Context<'_>) -> Poll<Result<PubSeq, Error>> {
        let mut t = self.table();
        let Some(slot) = t.slots.get_mut(i) else {
            return Poll::Ready(Err(Error::Closed));
        };
        match &mut slot.state {
            State::Waiting(waker) => {
                let old = match waker {
                    Some(w) if w.will_wake(cx.waker()) => None,
                    _ => waker.replace(cx.waker().clone()),
                };
                drop(t);
                drop(old);
                Poll::Pending
            }
            State::Done(_) => {
                let State::Done(result) = std::mem::replace(&mut slot.state, State::Free) else {
                    unreachable!("matched as done above");
                };
                slot.held = false;
                t.free.push(i);
                Poll::Ready(result)
            }
            // Read already: a future polled after it completed.
            State::Free => Poll::Ready(Err(Error::Closed)),
        }
    }

    /// The `PendingAck` of slot `i` is gone (read or dropped).
    pub(crate) fn release(&self, i: usize) {
        let mut t = self.table();
        let Some(slot) = t.slots.get_mut(i) else {
            return;
        };
        if !slot.held {
            return;
        }
        slot.held = false;
        if matches!(slot.state, State::Done(_)) {
            slot.state = State::Free;
            t.free.push(i);
        }
    }

    /// Slots in use (tests).
    #[cfg(test)]
    fn in_use(&self) -> usize {
        let t = self.table();
        t.slots.len() - t.free.len()
    }
}

/// Lets go of the table, then wakes whoever its last change concerns.
fn wake(mut t: MutexGuard<'_, Table>) {
    let wakers = std::mem::take(&mut t.wake);
    drop(t);
    for w in wakers {
        w.wake();
    }
}

impl Table {
    fn settle(&mut self, i: usize, result: Result<PubSeq, Error>) {
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        let State::Waiting(waker) = std::mem::replace(&mut slot.state, State::Free) else {
            // Settled already (a failure raced an acknowledgement).
            return;
        };
        if slot.held {
            slot.state = State::Done(result);
            self.wake.extend(waker);
        } else {
            self.free.push(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    fn poll(acks: &Acks, i: usize) -> Poll<Result<PubSeq, Error>> {
        acks.poll(i, &mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn a_slot_is_reused_once_both_sides_are_done_with_it() {
        let acks = Acks::default();
        let a = acks.take().expect("open");
        let b = acks.take().expect("open");
        assert_ne!(a, b);
        assert!(poll(&acks, a).is_pending());
        acks.settle_all([(a, PubSeq(1)), (b, PubSeq(2))]);
        assert!(matches!(poll(&acks, a), Poll::Ready(Ok(PubSeq(1)))));
        acks.release(a);
        // b's PendingAck was dropped unread: its slot goes back too.
        acks.release(b);
        assert_eq!(acks.in_use(), 0);
        let c = acks.take().expect("open");
        assert!(c == a || c == b);
        // Dropped before it settled: freed when it settles.
        acks.release(c);
        assert_eq!(acks.in_use(), 1);
        acks.settle(c, Ok(PubSeq(3)));
        assert_eq!(acks.in_use(), 0);
        assert_eq!(acks.table().slots.len(), 2, "no slot was added for c");
    }

    #[test]
    fn wakers_are_woken_with_the_table_unlocked() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        struct Probe(Arc<Acks>, AtomicBool);
        impl std::task::Wake for Probe {
            fn wake(self: Arc<Self>) {
                self.1
                    .store((self.0).0.try_lock().is_ok(), Ordering::SeqCst);
            }
        }
        let acks = Arc::new(Acks::default());
        let probe = Arc::new(Probe(acks.clone(), AtomicBool::new(false)));
        let waker = Waker::from(probe.clone());
        let a = acks.take().expect("open");
        assert!(acks.poll(a, &mut Context::from_waker(&waker)).is_pending());
        acks.settle_all([(a, PubSeq(1))]);
        assert!(probe.1.load(Ordering::SeqCst), "woken under the lock");
    }

    #[test]
    fn closing_fails_the_waiting_and_refuses_new_publishes() {
        let acks = Acks::default();
        let a = acks.take().expect("open");
        let b = acks.take().expect("open");
        acks.settle(a, Ok(PubSeq(1)));
        acks.close(&Error::Closed);
        assert!(matches!(poll(&acks, a), Poll::Ready(Ok(PubSeq(1)))));
        assert!(matches!(poll(&acks, b), Poll::Ready(Err(Error::Closed))));
        assert!(acks.take().is_err());
        // A late acknowledgement of a failed slot changes nothing.
        acks.settle(b, Ok(PubSeq(2)));
        assert!(matches!(poll(&acks, b), Poll::Ready(Err(Error::Closed))));
    }
}
