//! Fan-out: each delivered batch encoded once into frames shared by every
//! matching session (docs/DESIGN.md, "Hot path").

use super::*;

impl Node {
    /// Fans the pending batch out to matching sessions, retains it, and
    /// queues the acknowledgements it earned.
    pub(super) fn fan_out(&mut self) {
        self.resolve_checks();
        if !self.pending.is_empty() {
            let batch = std::mem::take(&mut self.pending);
            let limits = FrameLimits::new(self.config.frame_len_max);
            let (frames, delivered) = self.fanout.run(
                &batch,
                &mut self.indexes.strong,
                limits,
                None,
                &mut self.outputs,
            );
            self.stats.deliver_frames += frames;
            self.stats.delivered += delivered;
            // Counted per run of one topic (interned: one pointer).
            for run in batch.chunk_by(|a, b| Arc::ptr_eq(&a.topic, &b.topic)) {
                let bytes = run.iter().map(|m| m.payload.len()).sum();
                self.topics.count(&run[0].topic, run.len() as u64, bytes);
            }
            for m in batch {
                self.retention.push(m);
            }
        }
        let stable_moved = self.head > self.marked;
        if !self.weak_pending.is_empty() {
            let batch = std::mem::take(&mut self.weak_pending);
            self.weak_fan_out(&batch);
        }
        if stable_moved && !self.stable_marks.is_empty() {
            // After what they were sent: everything up to the mark is.
            self.marked = self.head;
            let mark = protocol::encode(kind::WATERMARK, &WatermarkHead { seq: self.head }, &[]);
            for &session in &self.stable_marks {
                self.outputs
                    .push_back(stable_mark(session, mark.clone(), self.head));
            }
        }
        for session in self.acks_due.drain(..) {
            let Some(s) = self.sessions.get_mut(&session) else {
                continue;
            };
            let Some(ack) = s.ack_due.take().filter(|a| a.pub_seq > s.ack_sent) else {
                continue;
            };
            s.ack_sent = ack.pub_seq;
            self.outputs.push_back(Output::Transmit {
                session,
                frame: protocol::encode(kind::PUB_ACK, &ack, &[]),
                kind: TransmitKind::Control,
                seqs: (ack.seq, ack.seq),
            });
        }
    }
}

/// Strong and weak sessions subscribe apart: they are sent different
/// streams (stable, and held).
pub(super) struct Indexes {
    pub(super) strong: Index,
    pub(super) weak: Index,
}

impl Indexes {
    pub(super) fn of(&mut self, weak: bool) -> &mut Index {
        if weak {
            &mut self.weak
        } else {
            &mut self.strong
        }
    }
}

/// A stable mark for a weak relay: a watermark at `head`.
pub(super) fn stable_mark(session: SessionId, frame: Bytes, head: Seq) -> Output {
    Output::Transmit {
        session,
        frame,
        kind: TransmitKind::Watermark,
        seqs: (head, head),
    }
}

/// Queues one control `frame`, encoded once, for each of `sessions`
/// (docs/DESIGN.md, "Hot path": no copy per session).
pub(super) fn broadcast(
    outputs: &mut VecDeque<Output>,
    sessions: &BTreeSet<SessionId>,
    frame: &Bytes,
    seq: Seq,
) {
    for &session in sessions {
        outputs.push_back(Output::Transmit {
            session,
            frame: frame.clone(),
            kind: TransmitKind::Control,
            seqs: (seq, seq),
        });
    }
}

pub(super) fn deliver(session: SessionId, frame: Bytes, first: Seq, last: Seq) -> Output {
    Output::Transmit {
        session,
        frame,
        kind: TransmitKind::Deliver,
        seqs: (first, last),
    }
}

/// How much one delivery frame may carry, leaving room for its head.
#[derive(Clone, Copy)]
pub(super) struct FrameLimits {
    pub(super) body_max: usize,
    pub(super) msgs_max: usize,
}

impl FrameLimits {
    pub(super) fn new(frame_len_max: usize) -> Self {
        // A head entry is at most 5 CBOR integers (<= 45 bytes): half of the
        // frame for bodies and a message count whose head fits in the rest.
        FrameLimits {
            body_max: frame_len_max / 2,
            msgs_max: (frame_len_max / 2 / 48).max(1),
        }
    }

    /// Whether `m` must go into a new frame.
    pub(super) fn full(&self, b: &DeliverBuilder, m: &Ordered) -> bool {
        !b.is_empty()
            && (b.len() >= self.msgs_max
                || b.body_len() + m.topic.len() + m.payload.len() > self.body_max)
    }
}

/// Reusable scratch space for fanning a batch out.
///
/// A batch is grouped by the (cached, shared) set of sessions each message
/// matches. In the common case every session matches one group, and each
/// group's frame is encoded once and handed to all its sessions as the same
/// `Bytes`. A session in several groups gets its own merged frame, cached by
/// its group list so that sessions with the same list still share one.
/// The work per batch is one index lookup per run of one topic plus one
/// entry per (session, group) pair; nothing is done per session per message.
#[derive(Default)]
pub(super) struct Fanout {
    pub(super) groups: Vec<(Arc<[SessionId]>, Vec<u32>)>,
    pub(super) group_of_set: HashMap<usize, usize>,
    pub(super) pairs: Vec<(SessionId, u32)>,
    /// Frames per group list, with the number of messages they carry.
    pub(super) frames: HashMap<Vec<u32>, (Vec<EncodedFrame>, u64)>,
    pub(super) builder: DeliverBuilder,
    pub(super) merged: Vec<u32>,
}

impl Fanout {
    /// Queues delivery transmits for `batch`; returns the frames encoded and
    /// the message deliveries queued.
    pub(super) fn run(
        &mut self,
        batch: &[Ordered],
        index: &mut Index,
        limits: FrameLimits,
        stable: Option<Seq>,
        out: &mut VecDeque<Output>,
    ) -> (u64, u64) {
        self.groups.clear();
        self.group_of_set.clear();
        // Looked up once per run of one (interned) topic: the run's group,
        // or `None` when nobody matches it.
        let mut run: Option<(&Arc<str>, Option<usize>)> = None;
        for (i, m) in batch.iter().enumerate() {
            let group = match run {
                Some((topic, group)) if Arc::ptr_eq(topic, &m.topic) => group,
                _ => {
                    let set = index.lookup(&m.topic);
                    let group = (!set.is_empty()).then(|| {
                        let key = Arc::as_ptr(&set) as *const () as usize;
                        *self.group_of_set.entry(key).or_insert_with(|| {
                            self.groups.push((set, Vec::new()));
                            self.groups.len() - 1
                        })
                    });
                    run = Some((&m.topic, group));
                    group
                }
            };
            let Some(g) = group else {
                continue;
            };
            self.groups[g].1.push(
                u32::try_from(i).expect("invariant: batches hold far fewer than 2^32 messages"),
            );
        }
        let mut encoded = 0;
        let mut delivered = 0;
        if self.groups.len() == 1 {
            let (set, idx) = &self.groups[0];
            let frames = encode_frames(&mut self.builder, batch, idx, limits, stable);
            encoded += frames.len() as u64;
            delivered += (idx.len() * set.len()) as u64;
            for &session in set.iter() {
                for (frame, first, last) in &frames {
                    out.push_back(deliver(session, frame.clone(), *first, *last));
                }
            }
            return (encoded, delivered);
        }
        self.pairs.clear();
        for (g, (set, _)) in self.groups.iter().enumerate() {
            let g = g as u32;
            self.pairs.extend(set.iter().map(|&s| (s, g)));
        }
        self.pairs.sort_unstable();
        self.frames.clear();
        let mut at = 0;
        while at < self.pairs.len() {
            let session = self.pairs[at].0;
            let end = at
                + self.pairs[at..]
                    .iter()
                    .take_while(|(s, _)| *s == session)
                    .count();
            let key: Vec<u32> = self.pairs[at..end].iter().map(|(_, g)| *g).collect();
            if !self.frames.contains_key(&key) {
                self.merged.clear();
                for &g in &key {
                    self.merged.extend_from_slice(&self.groups[g as usize].1);
                }
                self.merged.sort_unstable();
                let frames = encode_frames(&mut self.builder, batch, &self.merged, limits, stable);
                encoded += frames.len() as u64;
                self.frames
                    .insert(key.clone(), (frames, self.merged.len() as u64));
            }
            let (frames, msgs) = &self.frames[&key];
            delivered += msgs;
            for (frame, first, last) in frames {
                out.push_back(deliver(session, frame.clone(), *first, *last));
            }
            at = end;
        }
        (encoded, delivered)
    }
}

/// Encodes the messages `idx` of `batch` into as few frames as the limits
/// allow, each with the running hash through its last message (and, for
/// weak sessions, the `stable` position).
pub(super) fn encode_frames(
    b: &mut DeliverBuilder,
    batch: &[Ordered],
    idx: &[u32],
    limits: FrameLimits,
    stable: Option<Seq>,
) -> Vec<(Bytes, Seq, Seq)> {
    let mut frames = Vec::with_capacity(1);
    let mut first = Seq(0);
    let mut last = (Seq(0), 0);
    for &i in idx {
        let m = &batch[i as usize];
        if limits.full(b, m) {
            frames.push((b.finish_with(Some(last.1), stable), first, last.0));
        }
        if b.is_empty() {
            first = m.seq;
        }
        last = (m.seq, m.hash);
        b.push(m.seq, m.publisher, m.pub_seq, &m.topic, &m.payload);
    }
    if !b.is_empty() {
        frames.push((b.finish_with(Some(last.1), stable), first, last.0));
    }
    frames
}
