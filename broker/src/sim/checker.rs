//! Checks of docs/DESIGN.md's guarantees over what simulated clients saw.
//!
//! Incremental checks run on every event: agreement on order and on what a
//! seq means (1), no creation and no duplication (2), publisher FIFO (3).
//! [`Checker::check_complete`] runs once faults have stopped: every
//! acknowledged publish reached every client whose patterns match it, or
//! that client was told of a gap covering it (5, 8).

use canopy_client::protocol::{PubSeq, PublisherId, Seq};
use canopy_client::topic::Pattern;
use std::collections::{BTreeMap, HashMap, HashSet};

/// A broken guarantee, with what shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation(pub String);

/// What one client saw.
#[derive(Default, Debug, Clone)]
pub struct Seen {
    /// Deliveries in order: seq, publisher, pub_seq.
    pub delivered: Vec<(Seq, PublisherId, PubSeq)>,
    /// Gap notices: from, to.
    pub gaps: Vec<(Seq, Seq)>,
    per_publisher: HashMap<PublisherId, PubSeq>,
    ids: HashSet<(PublisherId, PubSeq)>,
    /// A program started after the run began (a restart): what is at or
    /// before the head of its first Welcome is not expected of it (`None`
    /// until that Welcome: nothing is).
    joined: Option<Option<Seq>>,
    /// A program that restarted: its deliveries were checked as they came,
    /// but it is not expected to have everything (it stopped).
    retired: bool,
}

/// The checker's memory of the run.
#[derive(Default, Debug)]
pub struct Checker {
    published: HashMap<(PublisherId, PubSeq), (String, Vec<u8>)>,
    acked: HashSet<(PublisherId, PubSeq)>,
    /// What each seq carries, as first delivered anywhere.
    meaning: BTreeMap<Seq, (PublisherId, PubSeq)>,
    clients: Vec<Seen>,
}

impl Checker {
    /// A checker for `clients` clients.
    pub fn new(clients: usize) -> Self {
        Checker {
            clients: vec![Seen::default(); clients],
            ..Checker::default()
        }
    }

    /// What client `c` saw.
    pub fn seen(&self, c: usize) -> &Seen {
        &self.clients[c]
    }

    /// Client `c`'s program restarted: it is retired, and the new program
    /// is checked as a new client, from the head of its first Welcome
    /// ([`Checker::joined`]). Returns the new client's index.
    pub fn restarted(&mut self, c: usize) -> usize {
        self.clients[c].retired = true;
        self.clients.push(Seen {
            joined: Some(None),
            ..Seen::default()
        });
        self.clients.len() - 1
    }

    /// Client `c` was welcomed at `head`: if it started late, that is where
    /// what it must receive begins.
    pub fn joined(&mut self, c: usize, head: Seq) {
        if let Some(at @ None) = &mut self.clients[c].joined {
            *at = Some(head);
        }
    }

    /// Clients so far, restarted programs included.
    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    /// A client published (before it reached any server).
    pub fn published(
        &mut self,
        publisher: PublisherId,
        pub_seq: PubSeq,
        topic: &str,
        payload: &[u8],
    ) {
        self.published
            .insert((publisher, pub_seq), (topic.to_owned(), payload.to_vec()));
    }

    /// A client's publish was acknowledged.
    pub fn acked(&mut self, publisher: PublisherId, pub_seq: PubSeq) {
        self.acked.insert((publisher, pub_seq));
    }

    /// Client `c` was told of a gap.
    pub fn gap(&mut self, c: usize, from: Seq, to: Seq) {
        self.clients[c].gaps.push((from, to));
    }

    /// Client `c` delivered a message.
    ///
    /// # Errors
    /// The guarantee it breaks.
    pub fn delivered(
        &mut self,
        c: usize,
        seq: Seq,
        publisher: PublisherId,
        pub_seq: PubSeq,
        topic: &str,
        payload: &[u8],
    ) -> Result<(), Violation> {
        let fail = |what: String| Err(Violation(format!("client {c}, seq {seq}: {what}")));
        // 2: only published messages, unaltered.
        match self.published.get(&(publisher, pub_seq)) {
            None => {
                return fail(format!(
                    "delivered ({publisher}, {}) that nobody published",
                    pub_seq.0
                ))
            }
            Some((t, p)) if t != topic || p != payload => {
                return fail("delivered an altered message".into())
            }
            Some(_) => {}
        }
        // 1: one meaning per seq, everywhere.
        match self.meaning.get(&seq) {
            Some(&m) if m != (publisher, pub_seq) => {
                return fail(format!(
                    "seq means {m:?} elsewhere, ({publisher}, {}) here",
                    pub_seq.0
                ))
            }
            Some(_) => {}
            None => {
                self.meaning.insert(seq, (publisher, pub_seq));
            }
        }
        let seen = &mut self.clients[c];
        // 1: ascending seqs at each member (so common messages agree on order).
        if let Some(&(last, _, _)) = seen.delivered.last() {
            if seq <= last {
                return fail(format!("after seq {last}: out of order or duplicated"));
            }
        }
        // 2: at most once.
        if !seen.ids.insert((publisher, pub_seq)) {
            return fail(format!("({publisher}, {}) delivered twice", pub_seq.0));
        }
        // 3: publisher FIFO.
        if let Some(prev) = seen.per_publisher.insert(publisher, pub_seq) {
            if pub_seq <= prev {
                return fail(format!(
                    "publisher {publisher}: pub_seq {} after {}",
                    pub_seq.0, prev.0
                ));
            }
        }
        seen.delivered.push((seq, publisher, pub_seq));
        Ok(())
    }

    /// Once faults stopped and everything settled: every acknowledged
    /// publish matching a client's patterns reached that client, unless the
    /// client was told of a gap covering it.
    ///
    /// # Errors
    /// The first acknowledged message a client lost silently.
    pub fn check_complete(&self, patterns: &[Vec<Pattern>]) -> Result<(), Violation> {
        let seq_of: HashMap<(PublisherId, PubSeq), Seq> =
            self.meaning.iter().map(|(s, m)| (*m, *s)).collect();
        let mut acked: Vec<&(PublisherId, PubSeq)> = self.acked.iter().collect();
        acked.sort();
        for (c, seen) in self.clients.iter().enumerate() {
            if seen.retired {
                continue;
            }
            for id in &acked {
                let (topic, _) = &self.published[*id];
                if !patterns[c].iter().any(|p| p.matches(topic)) || seen.ids.contains(*id) {
                    continue;
                }
                let before_it = match seen.joined {
                    None => false,
                    Some(None) => true,
                    Some(Some(head)) => seq_of.get(*id).is_some_and(|s| *s <= head),
                };
                if before_it {
                    continue;
                }
                let covered = seq_of
                    .get(*id)
                    .is_some_and(|s| seen.gaps.iter().any(|(from, to)| from <= s && s <= to));
                if !covered {
                    return Err(Violation(format!(
                        "client {c} never got acknowledged ({}, {}) on {topic} (seq {:?}) and heard of no gap covering it (gaps {:?}, last delivered {:?})",
                        id.0,
                        id.1 .0,
                        seq_of.get(*id),
                        seen.gaps,
                        seen.delivered.last()
                    )));
                }
            }
        }
        Ok(())
    }
}
