//! Outputs: the order in which the node hands its outputs to the shell
//! (catch-up paced against live frames), and what a full session queue
//! does (cut the session, or a gap notice for a conflating one).

use super::*;

/// What a transmit carries, which decides what a full queue means for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransmitKind {
    /// Ordered messages `seqs.0..=seqs.1`.
    Deliver,
    /// A gap notice for `seqs.0..=seqs.1`.
    Gap,
    /// A watermark; harmless to drop, the next one supersedes it.
    Watermark,
    /// A catch-up frame (messages or a gap notice) for a resuming session,
    /// covering `seqs.0..=seqs.1`; a full queue only delays it.
    Replay,
    /// Anything else (handshake, acks, subscription answers, pongs).
    Control,
}

/// An action for the shell.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Queue `frame` (length prefix included) on the session's outbound queue
    /// without waiting. If the queue is full, call
    /// [`Node::handle_queue_full`] with this transmit's kind and seqs.
    Transmit {
        /// The receiving session.
        session: SessionId,
        /// The encoded frame.
        frame: Bytes,
        /// What the frame carries.
        kind: TransmitKind,
        /// For deliveries and gaps: the first and last seq covered.
        seqs: (Seq, Seq),
    },
    /// Close the session: send `frame` last if given, after what is already
    /// queued when `drain` is set, or instead of it otherwise.
    Close {
        /// The session.
        session: SessionId,
        /// A final error frame.
        frame: Option<Bytes>,
        /// Whether queued frames go out before the final frame.
        drain: bool,
    },
}

impl Node {
    /// The next action for the shell, or `None` when there is nothing to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        let out = self.next_output()?;
        if let Output::Transmit {
            session,
            frame,
            kind,
            seqs,
        } = &out
        {
            self.stats.bytes_out += frame.len() as u64;
            if matches!(kind, TransmitKind::Deliver | TransmitKind::Replay) {
                if let Some(s) = self.sessions.get_mut(session) {
                    if let Some(credit) = &mut s.credit {
                        // (A frame past the credit takes what is left.)
                        s.charged = protocol::deliver_count(frame).min(*credit);
                        *credit -= s.charged;
                    }
                }
            }
            match kind {
                // Deliveries record `sent_through` in `next_output`, where
                // the session is at hand already.
                TransmitKind::Deliver => {}
                TransmitKind::Gap => {
                    self.stats.gaps += 1;
                    let detail = format!("session {session} told of a gap {}..={}", seqs.0, seqs.1);
                    self.journal.record(self.now, EventKind::Gap, detail);
                }
                TransmitKind::Replay => {
                    if let Some(s) = self.sessions.get_mut(session) {
                        s.sent_through = seqs.1;
                    }
                }
                TransmitKind::Watermark | TransmitKind::Control => {}
            }
        }
        Some(out)
    }

    /// Whether this turn's catch-up share is used up; if so, catch-up
    /// goes on at the next turn, or after `CATCH_UP_TURN` if none comes.
    fn catch_up_spent(&mut self) -> bool {
        if self.catch_up_turn.0 != self.now {
            self.catch_up_turn = (self.now, 0);
        }
        if self.catch_up_turn.1 < CATCH_UP_TURN_BYTES || self.catching_up.is_empty() {
            return false;
        }
        self.timers
            .set_unless_set(NodeTimer::CatchUpTurn, self.now + CATCH_UP_TURN);
        true
    }

    pub(super) fn next_output(&mut self) -> Option<Output> {
        loop {
            if self.outputs.is_empty() {
                self.fan_out();
            }
            if self.outputs.is_empty() {
                // Catch-up frames only when nothing else waits, one at a
                // time, so a full queue is known before the next is built,
                // and a turn's share at most.
                if self.catch_up_spent() {
                    return None;
                }
                let out = self.next_catch_up();
                if let Some(Output::Transmit { frame, .. }) = &out {
                    self.catch_up_turn.1 += frame.len();
                }
                if out.is_some() || self.outputs.is_empty() {
                    return out;
                }
                // A session went live: what that queued (its first report,
                // a stable mark) goes out now, not with the next input.
                continue;
            }
            let out = self.outputs.pop_front()?;
            match out {
                Output::Transmit {
                    session,
                    kind: TransmitKind::Deliver,
                    seqs,
                    ..
                } => {
                    let Some(s) = self.sessions.get_mut(&session) else {
                        continue;
                    };
                    if s.closing {
                        if s.drain {
                            return Some(out);
                        }
                        continue;
                    }
                    if s.catch_up.is_some() && !self.bugs.overtake_catch_up {
                        // Held back: the catch-up sends it from retention.
                        continue;
                    }
                    if s.claim.is_some() {
                        // At or below the unchecked claim (nothing past it
                        // is sent before the check), so the client has these
                        // seqs; and a frame's stable mark must not vouch for
                        // what is not checked yet.
                        continue;
                    }
                    if s.credit == Some(0) {
                        // Flow control: the client has no room. Its place is
                        // kept (a gap it was to be told of is sent instead,
                        // if retention still holds it), and a catch-up sends
                        // from retention as it grants more.
                        let from = s.gap.take().map_or(seqs.0, |(from, _)| from.min(seqs.0));
                        let after = Seq(from.0.saturating_sub(1));
                        s.catch_up = Some(after);
                        if s.weak {
                            s.weak_sent = s.weak_sent.min(after);
                        }
                        if !self.catching_up.contains(&session) {
                            self.catching_up.push(session);
                        }
                        self.hold_answers(session);
                        self.stats.flow_pauses += 1;
                        continue;
                    }
                    s.sent_through = seqs.1;
                    if let Some((from, _)) = s.gap.take() {
                        // A conflating session missed something: this batch
                        // joins the gap, and the notice goes in its place so
                        // that the client hears of the gap before any later seq.
                        let gap = GapHead { from, to: seqs.1 };
                        return Some(Output::Transmit {
                            session,
                            frame: protocol::encode(kind::GAP, &gap, &[]),
                            kind: TransmitKind::Gap,
                            seqs: (from, seqs.1),
                        });
                    }
                    return Some(out);
                }
                Output::Transmit { session, kind, .. } => {
                    // A watermark must not overtake a gap the session has
                    // not been told of yet: it would claim the gap was sent.
                    let pass = self.sessions.get(&session).is_some_and(|s| {
                        // Nor may it claim what a catch-up has yet to send,
                        // or vouch for a stream not checked yet.
                        let gap_first = kind == TransmitKind::Watermark
                            && (s.gap.is_some() || s.catch_up.is_some() || s.claim.is_some());
                        if s.closing {
                            s.drain
                        } else {
                            !gap_first
                        }
                    });
                    if pass {
                        return Some(out);
                    }
                }
                Output::Close { session, .. } => {
                    if let Some(s) = self.sessions.remove(&session) {
                        self.session_gone(session, s);
                    }
                    return Some(out);
                }
            }
        }
    }

    /// Flow control just paused `session`: what is queued for it behind the
    /// delivery it was not sent must not claim positions past what it was
    /// sent. Its membership reports go (it leaves `reporting_full`, and a
    /// complete report follows its catch-up, as after a resume); its
    /// subscription answers are given again when its catch-up ends.
    fn hold_answers(&mut self, session: SessionId) {
        self.reporting_full.remove(&session);
        let mut held = Vec::new();
        self.outputs.retain(|o| {
            let Output::Transmit {
                session: to,
                kind: TransmitKind::Control,
                frame,
                ..
            } = o
            else {
                return true;
            };
            if *to != session {
                return true;
            }
            match frame.get(4).copied() {
                Some(kind::MEMBERS) => false,
                Some(k @ (kind::SUBSCRIBED | kind::UNSUBSCRIBED)) => {
                    if let Ok(
                        protocol::ServerFrame::Subscribed(h)
                        | protocol::ServerFrame::Unsubscribed(h),
                    ) = protocol::decode_server(frame.slice(4..))
                    {
                        held.push((k, h.pattern));
                    }
                    false
                }
                _ => true,
            }
        });
        if let Some(s) = self.sessions.get_mut(&session) {
            s.answers_held.extend(held);
        }
    }

    /// A transmit of kind `kind` covering `seqs` did not fit `session`'s
    /// outbound queue. Call at once, before the next `poll_output`.
    pub fn handle_queue_full(
        &mut self,
        now: Duration,
        session: SessionId,
        kind: TransmitKind,
        seqs: (Seq, Seq),
    ) {
        self.now = now;
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        if s.closing {
            return;
        }
        if let (Some(credit), TransmitKind::Deliver | TransmitKind::Replay) = (&mut s.credit, kind)
        {
            // Not sent after all: what it took back.
            *credit = credit.saturating_add(std::mem::take(&mut s.charged));
        }
        if kind == TransmitKind::Replay {
            s.catch_up = Some(Seq(seqs.0 .0.saturating_sub(1)));
            s.replay_stalled = true;
            self.timers
                .set_unless_set(NodeTimer::ReplayRetry, now + REPLAY_RETRY);
            return;
        }
        let conflate = s
            .hello
            .as_ref()
            .is_some_and(|h| h.slow == SlowPolicy::Conflate);
        match kind {
            // Sent again at the next period: the stream may stay quiet, and
            // the client's position would stay behind it until it moved.
            TransmitKind::Watermark => self.watermark_sent = Seq(0),
            TransmitKind::Deliver | TransmitKind::Gap if conflate => {
                s.gap = Some(match s.gap {
                    Some((from, to)) => (from.min(seqs.0), to.max(seqs.1)),
                    None => seqs,
                });
            }
            _ => {
                self.stats.slow_consumers += 1;
                let detail = format!("session {session} cut off: outbound queue full");
                self.journal
                    .record(self.now, EventKind::SlowConsumer, detail);
                let frame = protocol::encode_error(
                    ErrorCode::SlowConsumer,
                    "outbound queue full: the client did not keep up",
                );
                if let Some(s) = self.sessions.get_mut(&session) {
                    s.closing = true;
                    for p in std::mem::take(&mut s.patterns) {
                        self.indexes.of(s.weak).remove(&p, session);
                    }
                }
                // Ahead of everything queued: what is queued for this session
                // can no longer be delivered in order anyway.
                self.outputs.push_front(Output::Close {
                    session,
                    frame: Some(frame),
                    drain: false,
                });
            }
        }
    }
}
