//! [`Position`]: where a subscriber stands in the one stream, and the rules
//! that move it (docs/DESIGN.md, "Client side").
//!
//! # Rules
//! - The position is the stream id and the last seq handed to the
//!   application. A delivery frame is handed over only past it (a resumed
//!   stream may overlap), and moves it only once handed over
//!   ([`Commit`]): a client that cannot hand a batch over drops the
//!   connection and resumes from where it was.
//! - The resume check is the running hash at the last delivery frame
//!   handed over, or at a subscription answer, never moving back.
//! - A Welcome of another stream resets the position to its head (the
//!   SDK's `StreamReset`); the Welcome's head and hash are the first
//!   position and check.
//! - Watermarks and gap notices move the position; membership and server
//!   reports do not (a conflating client may still be told of a gap
//!   before their position).
//! - Weak delivery: `agreed` is how far what was handed over is the
//!   agreed stream (the Welcome's head, stable positions in delivery
//!   frames and watermarks). A `Diverged` notice takes the position back
//!   to before its `from`, drops the check, and makes that the agreed point.

use crate::protocol::{DeliverHead, Message, Resume, Seq, StreamCheck, Welcome};

/// What a Welcome did to the position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Joined {
    /// The first Welcome: the position starts at its head.
    First,
    /// The stream continues from the position.
    Resumed,
    /// The server has another stream: sequence numbers start again at its head.
    Reset,
}

/// Moves the position past a delivery frame once its messages are handed
/// over ([`Position::take`]).
#[derive(Debug)]
#[must_use = "the position moves only when the delivery is taken"]
pub struct Commit {
    last: Seq,
    check: Option<StreamCheck>,
    stable: Option<Seq>,
}

/// Where a subscriber stands. See the module docs.
#[derive(Clone, Debug, Default)]
pub struct Position {
    weak: bool,
    /// Stream and the last seq handed over (or moved past).
    at: Option<(u64, Seq)>,
    check: Option<StreamCheck>,
    agreed: Option<Seq>,
}

impl Position {
    /// A position before any Welcome.
    pub fn new(weak: bool) -> Self {
        Position {
            weak,
            ..Position::default()
        }
    }

    /// The stream and the last seq handed over.
    pub fn at(&self) -> Option<(u64, Seq)> {
        self.at
    }

    /// Weak delivery: through this seq, what was handed over is agreed.
    pub fn agreed(&self) -> Option<Seq> {
        self.agreed
    }

    /// What a Hello asks for.
    pub fn resume(&self) -> Option<Resume> {
        self.at.map(|(stream, after)| Resume {
            stream,
            after,
            check: self.check,
            agreed: self.agreed,
        })
    }

    /// A Welcome arrived.
    pub fn welcome(&mut self, w: &Welcome) -> Joined {
        let joined = match self.at {
            None => Joined::First,
            Some((stream, _)) if stream == w.stream => return Joined::Resumed,
            Some(_) => Joined::Reset,
        };
        self.at = Some((w.stream, w.head));
        // The Welcome's position is stable (a weak client is then sent
        // what is held after it); its hash is the first resume check.
        self.check = Some(StreamCheck {
            seq: w.head,
            hash: w.hash,
        });
        self.agreed = self.weak.then_some(w.head);
        joined
    }

    /// The messages of a delivery frame not handed over yet (dropped from
    /// the front of `msgs`), and what taking them does.
    pub fn fresh(&self, head: &DeliverHead, msgs: &mut Vec<Message>) -> Option<Commit> {
        let last = msgs.last()?.seq;
        let after = self.at.map_or(Seq(0), |(_, s)| s);
        let skip = msgs.iter().take_while(|m| m.seq <= after).count();
        msgs.drain(..skip);
        let check = head
            .hash
            .map(|hash| StreamCheck { seq: last, hash })
            .filter(|c| self.check.is_none_or(|old| c.seq >= old.seq));
        Some(Commit {
            last,
            check,
            stable: head.stable,
        })
    }

    /// The delivery was handed over.
    pub fn take(&mut self, commit: Commit) {
        self.advance(commit.last);
        if commit.check.is_some() {
            self.check = commit.check;
        }
        if commit.stable.is_some() {
            self.agreed = self.agreed.max(commit.stable);
        }
    }

    /// A watermark: a stable position, past which nothing matched.
    pub fn watermark(&mut self, seq: Seq) {
        if self.weak {
            self.agreed = self.agreed.max(Some(seq));
        }
        self.advance(seq);
    }

    /// A subscription answer: everything before `head` was sent first.
    pub fn answered(&mut self, head: Seq, hash: Option<u64>) {
        self.advance(head);
        if let Some(hash) = hash.filter(|_| self.check.is_none_or(|c| c.seq <= head)) {
            self.check = Some(StreamCheck { seq: head, hash });
        }
    }

    /// Moves past `seq` (a gap notice's end, a watermark).
    pub fn advance(&mut self, seq: Seq) {
        if let Some((_, at)) = &mut self.at {
            *at = (*at).max(seq);
        }
    }

    /// Weak delivery: what was handed over from `from` on was not the
    /// agreed stream.
    pub fn diverged(&mut self, from: Seq) {
        let back = Seq(from.0.saturating_sub(1));
        if let Some((_, at)) = &mut self.at {
            *at = (*at).min(back);
        }
        self.check = None;
        self.agreed = Some(back);
    }
}
