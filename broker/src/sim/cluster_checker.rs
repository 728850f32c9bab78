//! Checkers for the core group: what every server's event stream must obey.
//!
//! One method per kind of event; each returns the first guarantee broken.
//! - Agreement (guarantee 1): one content per seq in a stream, each
//!   server's deliveries contiguous, a catch-up never moves a server back.
//! - No creation, no duplication (2): only published content, and one seq
//!   per `(publisher, pub_seq)`. A payload names the program that published
//!   it (a publisher id outlives a program restarted under it), and an
//!   acknowledgement must be for that program's publish.
//! - Publisher FIFO (3): a publisher's pub_seqs ascend with seq.
//! - Virtual synchrony and view agreement (4): a view id names one
//!   membership and one stream position everywhere; each server installs
//!   ascending view ids.
//! - Primary component (7): every installed view holds a majority of the
//!   configured servers.
//! - Weak delivery (6), the group's part: what a server holds before it is
//!   stable (what weak clients are sent) runs contiguously, and is either
//!   delivered unchanged once stable or taken back first (`Unheld`, or a
//!   reset), so that the server can tell its weak clients. (A crashed
//!   server's clients find out from the running hash when they resume:
//!   the node's and the SDK's tests, and `broker/tests/weak.rs` over real
//!   processes, check that part.)
//! - Durability (5) and liveness (8) are checked by the world after its
//!   faults stop: every acknowledged publish is delivered at every server.

use super::checker::Violation;
use crate::core::group::{View, ViewId};
use crate::core::stream::Ordered;
use canopy_client::protocol::{PubSeq, PublisherId, Seq};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

/// The prefix of system topics (`$canopy.>` without the wildcard).
const SYSTEM_PREFIX: &str = "$canopy.";

/// Where one server (one incarnation) stands.
#[derive(Clone, Debug, Default)]
struct ServerTrack {
    stream: u64,
    delivered: Seq,
    last_view: Option<ViewId>,
    /// Held after `delivered`, not yet stable.
    held: VecDeque<(Seq, PublisherId, PubSeq)>,
}

/// Where a content is in a stream: its seq, and the program whose publish
/// it is (none for a server's own).
type Placed = (Seq, Option<u64>);

/// The checker of one simulated core.
#[derive(Debug, Default)]
pub struct ClusterChecker {
    /// Configured servers.
    servers: usize,
    tracks: HashMap<(usize, u64), ServerTrack>,
    /// Per stream: seq → content.
    order: HashMap<u64, BTreeMap<Seq, (PublisherId, PubSeq)>>,
    /// Per stream: the seqs of system messages (the servers' own
    /// membership events, not a simulated publisher's).
    system: HashSet<(u64, Seq)>,
    /// Per stream: content → its seq, and the program whose publish it is
    /// (none for a server's own).
    seq_of: HashMap<u64, HashMap<(PublisherId, PubSeq), Placed>>,
    /// Per stream and publisher: seq → pub_seq.
    fifo: HashMap<(u64, PublisherId), BTreeMap<Seq, PubSeq>>,
    /// Per stream and view id: its members and the seq it follows. (Only a
    /// core whose every data directory was lost reuses view ids, and then
    /// in a new stream.)
    views: HashMap<(u64, ViewId), (Vec<u32>, Seq)>,
    /// What each program published: publisher, pub_seq, program.
    published: HashSet<(PublisherId, PubSeq, u64)>,
    /// Publishers some server's table forgot, with the last pub_seq they
    /// had then: an old retry of theirs (at or below it) may be ordered
    /// again, and a restarted program's predecessor's publish after the
    /// program's own (the documented price of the table's bound), so such
    /// a duplicate or late publish is not a violation.
    pub forgotten: HashMap<PublisherId, PubSeq>,
}

impl ClusterChecker {
    /// A checker for a core of `servers` configured servers.
    pub fn new(servers: usize) -> Self {
        ClusterChecker {
            servers,
            ..Self::default()
        }
    }

    /// Program `program` published `pub_seq` under `publisher`.
    pub fn published(&mut self, publisher: PublisherId, pub_seq: PubSeq, program: u64) {
        self.published.insert((publisher, pub_seq, program));
    }

    /// The delivered content at `seq` in `stream`, if any server delivered it.
    pub fn content(&self, stream: u64, seq: Seq) -> Option<(PublisherId, PubSeq)> {
        self.order.get(&stream).and_then(|o| o.get(&seq)).copied()
    }

    /// What `stream` holds after `after` through `through`: seq, content,
    /// and whether it is a system message.
    pub fn contents(
        &self,
        stream: u64,
        after: Seq,
        through: Seq,
    ) -> Vec<(Seq, (PublisherId, PubSeq), bool)> {
        let Some(order) = self.order.get(&stream) else {
            return Vec::new();
        };
        order
            .range(after.next()..=through)
            .map(|(&seq, &c)| (seq, c, self.system.contains(&(stream, seq))))
            .collect()
    }

    /// Server `server` (incarnation `inc`) delivered `batch`.
    ///
    /// # Errors
    /// The guarantee the batch breaks.
    pub fn deliver(&mut self, server: usize, inc: u64, batch: &[Ordered]) -> Result<(), Violation> {
        let track = self.tracks.entry((server, inc)).or_default();
        for m in batch {
            match track.held.front() {
                Some(&(seq, p, ps)) if seq == m.seq => {
                    if (p, ps) != (m.publisher, m.pub_seq) {
                        return Err(Violation(format!(
                            "weak: server {server} held {:?} at seq {seq} and delivered {:?} there without taking it back",
                            (p, ps),
                            (m.publisher, m.pub_seq)
                        )));
                    }
                    track.held.pop_front();
                }
                Some(&(seq, ..)) => {
                    return Err(Violation(format!(
                        "weak: server {server} delivered seq {} while holding from seq {seq}",
                        m.seq
                    )))
                }
                None => {}
            }
        }
        let (mut at, stream) = (track.delivered, track.stream);
        for m in batch {
            if m.seq != at.next() {
                return Err(Violation(format!(
                    "agreement: server {server} delivered seq {} after {}",
                    m.seq, at
                )));
            }
            at = m.seq;
            let content = (m.publisher, m.pub_seq);
            let order = self.order.entry(stream).or_default();
            match order.get(&m.seq) {
                Some(c) if *c != content => {
                    return Err(Violation(format!(
                        "agreement: seq {} is {c:?} elsewhere but {content:?} at server {server}",
                        m.seq
                    )))
                }
                // Checked in full where it was delivered first.
                Some(_) => continue,
                None => {
                    order.insert(m.seq, content);
                }
            }
            // A server's own membership event: its payload is the node's,
            // and its publisher is the server.
            let system = m.topic.starts_with(SYSTEM_PREFIX);
            if system {
                self.system.insert((stream, m.seq));
            }
            let program = program_in(&m.payload, content);
            let by_someone =
                program.is_some_and(|k| self.published.contains(&(m.publisher, m.pub_seq, k)));
            if !system && !by_someone {
                return Err(Violation(format!(
                    "no creation: seq {} carries {:?} as {content:?}, which no program published",
                    m.seq,
                    String::from_utf8_lossy(&m.payload)
                )));
            }
            let seqs = self.seq_of.entry(stream).or_default();
            let excused = self
                .forgotten
                .get(&m.publisher)
                .is_some_and(|&p| m.pub_seq <= p);
            match seqs.get(&content) {
                Some(_) if excused => continue,
                Some((s, _)) if *s != m.seq => {
                    return Err(Violation(format!(
                        "no duplication: {content:?} ordered at seq {s} and again at seq {}",
                        m.seq
                    )))
                }
                Some(_) => {}
                None => {
                    seqs.insert(content, (m.seq, program));
                }
            }
            let fifo = self.fifo.get(&(stream, m.publisher));
            let before = fifo.and_then(|f| f.range(..m.seq).next_back().map(|(s, p)| (*s, *p)));
            let after = fifo.and_then(|f| f.range(m.seq.next()..).next().map(|(s, p)| (*s, *p)));
            // A program's publish still on its way when it was restarted is
            // dropped as a retry once its successor's are ordered, unless a
            // table forgot the publisher meanwhile: then it is ordered, late
            // (the same price of the bound as an old retry ordered again).
            let late = excused
                && before.is_some_and(|(_, p)| {
                    let later = self.program_of(stream, (m.publisher, p));
                    program.zip(later).is_some_and(|(k, l)| k < l)
                });
            if late {
                continue;
            }
            self.fifo
                .entry((stream, m.publisher))
                .or_default()
                .insert(m.seq, m.pub_seq);
            if before.is_some_and(|(_, p)| p >= m.pub_seq)
                || after.is_some_and(|(_, p)| p <= m.pub_seq)
            {
                return Err(Violation(format!(
                    "publisher FIFO: publisher {} pub_seq {} at seq {} is out of its order (before: {before:?}, after: {after:?}; forgotten by a table at {:?})",
                    m.publisher.0,
                    m.pub_seq.0,
                    m.seq,
                    self.forgotten.get(&m.publisher)
                )));
            }
        }
        if let Some(t) = self.tracks.get_mut(&(server, inc)) {
            t.delivered = at;
        }
        Ok(())
    }

    /// Server `server` installed `view` after seq `at`.
    ///
    /// # Errors
    /// The guarantee the install breaks.
    pub fn view(&mut self, server: usize, inc: u64, view: &View, at: Seq) -> Result<(), Violation> {
        let members: Vec<u32> = view.members.iter().map(|m| m.node.0).collect();
        if members.len() < self.servers / 2 + 1 {
            return Err(Violation(format!(
                "primary component: view {} installed with {} of {} servers",
                view.id,
                members.len(),
                self.servers
            )));
        }
        let track = self.tracks.entry((server, inc)).or_default();
        if track.last_view.is_some_and(|v| v >= view.id) {
            return Err(Violation(format!(
                "view agreement: server {server} installed view {} after {:?}",
                view.id, track.last_view
            )));
        }
        track.last_view = Some(view.id);
        if track.stream == 0 {
            track.stream = view.stream;
        }
        if track.stream != view.stream {
            return Err(Violation(format!(
                "view agreement: server {server} installed view {} of stream {:x} while its stream is {:x}",
                view.id, view.stream, track.stream
            )));
        }
        if track.delivered != at {
            return Err(Violation(format!(
                "virtual synchrony: server {server} installed view {} at seq {} having delivered through {}",
                view.id, at, track.delivered
            )));
        }
        match self.views.get(&(view.stream, view.id)) {
            Some((m, a)) if *m != members || *a != at => Err(Violation(format!(
                "view agreement: view {} is {m:?} after seq {a} elsewhere, {members:?} after seq {at} at server {server}",
                view.id
            ))),
            Some(_) => Ok(()),
            None => {
                self.views.insert((view.stream, view.id), (members, at));
                Ok(())
            }
        }
    }

    /// Server `server` replaced its state with a snapshot through `head`.
    ///
    /// # Errors
    /// When the snapshot moves it back within one stream.
    pub fn reset(
        &mut self,
        server: usize,
        inc: u64,
        stream: u64,
        head: Seq,
    ) -> Result<(), Violation> {
        let track = self.tracks.entry((server, inc)).or_default();
        if track.stream == stream && head < track.delivered {
            return Err(Violation(format!(
                "agreement: server {server} caught up to seq {head} after delivering through {}",
                track.delivered
            )));
        }
        track.stream = stream;
        track.delivered = head;
        track.held.clear();
        Ok(())
    }

    /// Server `server` (incarnation `inc`) holds `msgs`, not yet stable.
    ///
    /// # Errors
    /// When they do not continue what it holds.
    pub fn held(&mut self, server: usize, inc: u64, msgs: &[Ordered]) -> Result<(), Violation> {
        let track = self.tracks.entry((server, inc)).or_default();
        for m in msgs {
            let last = track.held.back().map_or(track.delivered, |h| h.0);
            if m.seq != last.next() {
                return Err(Violation(format!(
                    "weak: server {server} held seq {} after {last}",
                    m.seq
                )));
            }
            track.held.push_back((m.seq, m.publisher, m.pub_seq));
        }
        Ok(())
    }

    /// Server `server` (incarnation `inc`) took back what it held after
    /// `after`.
    ///
    /// # Errors
    /// When that would take back a delivered (stable) message.
    pub fn unheld(&mut self, server: usize, inc: u64, after: Seq) -> Result<(), Violation> {
        let track = self.tracks.entry((server, inc)).or_default();
        if after < track.delivered {
            return Err(Violation(format!(
                "weak: server {server} took back seqs after {after}, below its delivered {}",
                track.delivered
            )));
        }
        track.held.retain(|h| h.0 <= after);
        Ok(())
    }

    /// Where server `server` (incarnation `inc`) stands: stream and seq.
    pub fn position(&self, server: usize, inc: u64) -> (u64, Seq) {
        self.tracks
            .get(&(server, inc))
            .map_or((0, Seq(0)), |t| (t.stream, t.delivered))
    }

    /// Every stream and seq `(publisher, pub_seq)` was delivered at.
    pub fn find(&self, publisher: PublisherId, pub_seq: PubSeq) -> Vec<(u64, Seq)> {
        let mut found: Vec<(u64, Seq)> = self
            .seq_of
            .iter()
            .filter_map(|(stream, m)| m.get(&(publisher, pub_seq)).map(|(s, _)| (*stream, *s)))
            .collect();
        found.sort_unstable();
        found
    }

    /// The program whose publish `content` is in `stream`, if delivered
    /// anywhere.
    pub fn program_of(&self, stream: u64, content: (PublisherId, PubSeq)) -> Option<u64> {
        self.seq_of.get(&stream)?.get(&content)?.1
    }
}

/// A simulated publish's payload, `publisher:pub_seq:program`
/// ([`payload`]): the program, if it names `content`.
fn program_in(payload: &[u8], content: (PublisherId, PubSeq)) -> Option<u64> {
    let text = std::str::from_utf8(payload).ok()?;
    let rest = text.strip_prefix(&format!("{}:{}:", content.0 .0, content.1 .0))?;
    rest.parse().ok()
}

/// The payload program `program` publishes as `pub_seq` of `publisher`.
pub fn payload(publisher: PublisherId, pub_seq: PubSeq, program: u64) -> String {
    format!("{}:{}:{program}", publisher.0, pub_seq.0)
}
