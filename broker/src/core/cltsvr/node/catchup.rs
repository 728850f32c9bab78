//! Catch-up: a resuming session is sent what it missed from retention,
//! one frame at a time, paced by its own queue (module docs, "Invariants").

use super::*;

impl Node {
    /// The next catch-up frame for a resuming session, if any is due.
    ///
    /// A resuming session is fed from retention one frame at a time, only
    /// when nothing else is queued, while its live deliveries are held back
    /// (they are in retention too). A frame that does not fit the session's
    /// queue moves its cursor back and stalls it until the next retry tick,
    /// so a client far behind is paced by its own queue instead of being
    /// cut off as slow on every reconnect. When the cursor reaches the head,
    /// the session goes live.
    pub(super) fn next_catch_up(&mut self) -> Option<Output> {
        let limits = FrameLimits::new(self.config.frame_len_max);
        let weak_head = self.weak_head();
        let mut i = 0;
        while i < self.catching_up.len() {
            let session = self.catching_up[i];
            let Some(s) = self.sessions.get_mut(&session) else {
                self.catching_up.swap_remove(i);
                continue;
            };
            let Some(after) = s.catch_up.filter(|_| !s.closing) else {
                self.catching_up.swap_remove(i);
                continue;
            };
            if s.replay_stalled || s.claim.is_some() {
                // (A catch-up past a claim waits for its check.)
                i += 1;
                continue;
            }
            // A weak session is caught up through what is held, too.
            let (limit, held) = match s.weak {
                true => (weak_head, self.unstable.len()),
                false => (self.head, 0),
            };
            if after >= limit {
                s.catch_up = None;
                self.catching_up.swap_remove(i);
                let answers = std::mem::take(&mut s.answers_held);
                // Marks and watermarks are not sent during a catch-up: one
                // now for a relay; and for a session flow control paused,
                // whose catch-up may end past messages it does not match
                // (its client would stand there until the head moves).
                let windowed = s.credit.is_some();
                let mark =
                    protocol::encode(kind::WATERMARK, &WatermarkHead { seq: self.head }, &[]);
                if self.stable_marks.contains(&session) {
                    self.outputs
                        .push_back(stable_mark(session, mark, self.head));
                } else if windowed {
                    self.outputs.push_back(Output::Transmit {
                        session,
                        frame: mark,
                        kind: TransmitKind::Watermark,
                        seqs: (self.head, self.head),
                    });
                }
                self.start_reports(session);
                // Subscription answers held back at a pause, at the head.
                for (answer_kind, pattern) in answers {
                    let answer = self.subscription_answer(session, &pattern);
                    self.control(session, answer_kind, &answer);
                }
                continue;
            }
            let first_held = self.retention.first().unwrap_or(self.head.next());
            if after.next() < first_held {
                // Retention no longer holds where the client stopped: say so.
                let gap = GapHead {
                    from: after.next(),
                    to: Seq(first_held.0 - 1),
                };
                s.catch_up = Some(gap.to);
                self.stats.gaps += 1;
                let detail = format!(
                    "session {session} resumes past retention: gap {}..={}",
                    gap.from, gap.to
                );
                self.journal.record(self.now, EventKind::Gap, detail);
                return Some(Output::Transmit {
                    session,
                    frame: protocol::encode(kind::GAP, &gap, &[]),
                    kind: TransmitKind::Replay,
                    seqs: (gap.from, gap.to),
                });
            }
            let mut first = None;
            let mut last = (after, 0);
            let mut through = limit;
            let mut room = s.credit.unwrap_or(u64::MAX);
            let stream = self
                .retention
                .after(after)
                .chain(self.unstable.iter().take(held));
            for m in stream.filter(|m| m.seq > after) {
                if !s.patterns.iter().any(|p| p.matches(&m.topic)) {
                    continue;
                }
                // Out of credit (flow control), the scan still runs to the
                // next message to send: what it passes needs no credit, and
                // a session with nothing more to be sent goes live (and
                // hears of the head by watermarks).
                if limits.full(&self.fanout.builder, m) || room == 0 {
                    through = Seq(m.seq.0 - 1);
                    break;
                }
                room -= 1;
                first.get_or_insert(m.seq);
                last = (m.seq, m.hash);
                self.fanout
                    .builder
                    .push(m.seq, m.publisher, m.pub_seq, &m.topic, &m.payload);
            }
            s.catch_up = Some(through);
            if first.is_none() && through < limit {
                // Out of credit (flow control) before the next message it
                // matches: it waits for the client to grant more.
                i += 1;
                continue;
            }
            if let Some(first) = first {
                if s.weak {
                    s.weak_sent = last.0;
                }
                let stable = s.weak.then_some(self.head);
                return Some(Output::Transmit {
                    session,
                    frame: self.fanout.builder.finish_with(Some(last.1), stable),
                    kind: TransmitKind::Replay,
                    seqs: (first, through),
                });
            }
            // Nothing matched up to the head: the session is live.
        }
        None
    }

    /// How far `session` has been sent everything it matches: the head,
    /// or a catch-up's cursor (a client advances its position to this).
    pub(super) fn sent_head(&self, session: SessionId) -> Seq {
        match self.sessions.get(&session) {
            Some(Session {
                catch_up: Some(at), ..
            }) => *at,
            Some(s) if s.weak => self.weak_head(),
            _ => self.head,
        }
    }
}
