//! The publisher table: per publisher, the last pub_seq held and delivered,
//! by which retries are told from new publishes. One type, one bound and
//! one eviction rule for the group's table (TOTAL's) and a node's own
//! (`cltsvr::node`).
//!
//! The table keeps at most its bound of publishers. At the bound it
//! forgets the eighth quiet longest whose messages are all delivered, in
//! one pass, so the cost per new publisher stays constant on average. An
//! entry made after the table forgot anyone is *revived*: an old retry of a
//! forgotten publisher may have made it, below what that publisher was
//! acknowledged, so it vouches only for the retries at or below it
//! (docs/DESIGN.md, "Bounds").

use canopy_client::protocol::{PubSeq, PublisherId, Seq};
#[cfg(test)]
use std::collections::HashMap;

/// What the table knows of one publisher.
#[derive(Clone, Copy, Debug)]
pub struct PubState {
    /// The last pub_seq held in the log or delivered.
    pub held: PubSeq,
    /// The last pub_seq delivered.
    pub delivered: PubSeq,
    /// The seq of its latest message (for eviction by age).
    pub seq: Seq,
    /// Made after the table forgot publishers (see the module docs).
    pub revived: bool,
}

/// Where a publisher's pub_seq stands against the table: the pub_seq rule
/// (a publisher's pub_seqs follow one another, each once) as every place
/// that orders judges it.
#[derive(Clone, Copy, Debug)]
pub enum Next {
    /// At or below what the table holds of the publisher: a retry. Its
    /// entry.
    Retry(PubState),
    /// The publisher's next pub_seq, or one past an entry that cannot
    /// vouch for what came before (a revived one).
    Follows,
    /// Past the next pub_seq of an entry that vouches for it, and not the
    /// start of an incarnation: a predecessor is missing. What the table
    /// holds.
    Skips(PubSeq),
    /// The table does not know the publisher.
    Unknown,
}

/// Publishers' deduplication state, bounded.
#[derive(Debug)]
pub struct PublisherTable {
    entries: crate::maps::FastMap<PublisherId, PubState>,
    /// Publishers kept at most (more while their messages are in flight).
    max: usize,
    /// Whether the table ever forgot a publisher (then an unknown
    /// publisher's publish may be a forgotten one's).
    evicted_any: bool,
    /// Tests: every publisher the table forgot, with the last pub_seq it
    /// had then (the simulator excuses an old retry of one of those ordered
    /// again, the documented price of the bound).
    #[cfg(test)]
    forgotten: HashMap<PublisherId, PubSeq>,
}

impl PublisherTable {
    /// An empty table of at most `max` publishers.
    pub fn new(max: usize) -> Self {
        PublisherTable {
            entries: crate::maps::FastMap::default(),
            max,
            evicted_any: false,
            #[cfg(test)]
            forgotten: HashMap::new(),
        }
    }

    /// What the table knows of `publisher`.
    pub fn get(&self, publisher: PublisherId) -> Option<&PubState> {
        self.entries.get(&publisher)
    }

    /// The same, to change it.
    pub fn get_mut(&mut self, publisher: PublisherId) -> Option<&mut PubState> {
        self.entries.get_mut(&publisher)
    }

    /// Where `pub_seq` of `publisher` stands (see [`Next`]).
    pub fn next(&self, publisher: PublisherId, pub_seq: PubSeq) -> Next {
        match self.entries.get(&publisher) {
            None => Next::Unknown,
            Some(p) if pub_seq <= p.held => Next::Retry(*p),
            Some(p)
                if pub_seq.0 > p.held.0.saturating_add(1)
                    && !p.revived
                    && !pub_seq.begins_incarnation() =>
            {
                Next::Skips(p.held)
            }
            Some(_) => Next::Follows,
        }
    }

    /// The last pub_seq of `publisher` held, when the table can vouch for
    /// it: `None` when it does not know the publisher, or its entry is
    /// revived (see the module docs).
    pub fn vouched(&self, publisher: PublisherId) -> Option<PubSeq> {
        self.entries
            .get(&publisher)
            .filter(|p| !p.revived)
            .map(|p| p.held)
    }

    /// `publisher`'s entry, made (at `seq`) if it has none, after making
    /// room at the bound.
    pub fn entry(&mut self, publisher: PublisherId, seq: Seq) -> &mut PubState {
        if self.entries.len() >= self.max && !self.entries.contains_key(&publisher) {
            self.evict();
        }
        let revived = self.evicted_any;
        self.entries.entry(publisher).or_insert(PubState {
            held: PubSeq(0),
            delivered: PubSeq(0),
            seq,
            revived,
        })
    }

    /// Whether the table ever forgot a publisher.
    pub fn evicted_any(&self) -> bool {
        self.evicted_any
    }

    /// Forgets every publisher; `evicted` says whether the state it starts
    /// again from had forgotten any.
    pub fn reset(&mut self, evicted: bool) {
        self.entries.clear();
        self.evicted_any = evicted;
    }

    /// Replaces the table with a snapshot's `rows` (publisher, last pub_seq
    /// delivered, its seq) as they are, bound or not: the table the
    /// sequencer drops retries by must be taken over whole.
    pub fn install(&mut self, rows: &[(PublisherId, PubSeq, Seq)], evicted: bool) {
        self.reset(evicted);
        self.entries = rows
            .iter()
            .map(|&(id, pub_seq, seq)| {
                let entry = PubState {
                    held: pub_seq,
                    delivered: pub_seq,
                    seq,
                    revived: evicted,
                };
                (id, entry)
            })
            .collect();
    }

    /// The delivered table as a snapshot carries it: (publisher, last
    /// pub_seq delivered, its seq), by publisher.
    pub fn rows(&self) -> Vec<(PublisherId, PubSeq, Seq)> {
        let mut rows: Vec<_> = self
            .entries
            .iter()
            .filter(|(_, p)| p.delivered > PubSeq(0))
            .map(|(&id, p)| (id, p.delivered, p.seq))
            .collect();
        rows.sort_unstable();
        rows
    }

    /// Publishers known.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no publisher is known.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Forgets the eighth of publishers quiet longest whose messages are all
    /// delivered. A forgotten publisher's old retries could be ordered
    /// again: the price of the bound.
    fn evict(&mut self) {
        let mut by_age: Vec<(Seq, PublisherId)> = self
            .entries
            .iter()
            .filter(|(_, p)| p.held == p.delivered)
            .map(|(id, p)| (p.seq, *id))
            .collect();
        if by_age.is_empty() {
            return;
        }
        let evict = (by_age.len() / 8).max(1);
        by_age.select_nth_unstable(evict - 1);
        for (_, id) in &by_age[..evict] {
            let _gone = self.entries.remove(id);
            #[cfg(test)]
            if let Some(p) = _gone {
                let e = self.forgotten.entry(*id).or_default();
                *e = (*e).max(p.held);
            }
        }
        self.evicted_any = true;
    }

    /// Test builds: the publishers the table forgot since the last call,
    /// with the last pub_seq each had then.
    #[cfg(test)]
    pub fn take_forgotten(&mut self) -> HashMap<PublisherId, PubSeq> {
        std::mem::take(&mut self.forgotten)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_bound_the_quietest_delivered_publishers_go_and_later_entries_are_revived() {
        let mut t = PublisherTable::new(8);
        for i in 1..=8u64 {
            let e = t.entry(PublisherId(i), Seq(i));
            e.held = PubSeq(3);
            // Publisher 1 still has a message in flight: it stays.
            e.delivered = PubSeq(if i == 1 { 2 } else { 3 });
        }
        assert!(!t.get(PublisherId(8)).is_some_and(|p| p.revived));
        assert!(matches!(t.next(PublisherId(8), PubSeq(3)), Next::Retry(_)));
        assert!(matches!(t.next(PublisherId(8), PubSeq(4)), Next::Follows));
        assert!(matches!(
            t.next(PublisherId(8), PubSeq(5)),
            Next::Skips(PubSeq(3))
        ));
        assert!(matches!(t.next(PublisherId(9), PubSeq(5)), Next::Unknown));
        let e = t.entry(PublisherId(9), Seq(9));
        assert!(e.revived);
        e.held = PubSeq(2);
        // A revived entry vouches for nothing past itself.
        assert!(matches!(t.next(PublisherId(9), PubSeq(7)), Next::Follows));
        assert_eq!(t.vouched(PublisherId(9)), None);
        assert_eq!(t.vouched(PublisherId(8)), Some(PubSeq(3)));
        assert!(t.get(PublisherId(1)).is_some(), "in flight: kept");
        assert!(
            t.get(PublisherId(2)).is_none(),
            "the quietest delivered one goes"
        );
        assert_eq!(t.len(), 8);
        assert_eq!(t.take_forgotten().get(&PublisherId(2)), Some(&PubSeq(3)));
        assert!(t.evicted_any());
        t.install(&[(PublisherId(4), PubSeq(7), Seq(40))], false);
        assert_eq!(t.rows(), vec![(PublisherId(4), PubSeq(7), Seq(40))]);
        assert!(!t.evicted_any());
    }
}
