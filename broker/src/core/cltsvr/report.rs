//! What a node remembers for operators: a bounded journal of notable events
//! and bounded per-topic counters. Read by the runtime's snapshot for the
//! dashboard; nothing here feeds back into protocol decisions.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

/// Journal entries kept at most; older ones leave first.
pub const JOURNAL_LEN_MAX: usize = 256;
/// Topics counted one by one at most; the rest are summed as `(other)`.
pub const TOPICS_TRACKED_MAX: usize = 4096;

/// What kind of thing happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A connection was accepted.
    Connect,
    /// A connection ended.
    Disconnect,
    /// A session was cut off for not keeping up.
    SlowConsumer,
    /// A session was sent a gap notice.
    Gap,
    /// A session was closed for bad input.
    BadInput,
    /// A view was installed.
    View,
    /// A weak session was told its stream diverged.
    Diverged,
}

impl EventKind {
    /// The name the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Connect => "connect",
            EventKind::Disconnect => "disconnect",
            EventKind::SlowConsumer => "slow_consumer",
            EventKind::Gap => "gap",
            EventKind::BadInput => "bad_input",
            EventKind::View => "view",
            EventKind::Diverged => "diverged",
        }
    }
}

/// One journal entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// When, since the node started.
    pub at: Duration,
    /// What.
    pub kind: EventKind,
    /// For people.
    pub detail: String,
}

/// The most recent [`JOURNAL_LEN_MAX`] entries.
#[derive(Default)]
pub struct Journal {
    entries: VecDeque<Entry>,
}

impl Journal {
    /// Records an entry, forgetting the oldest beyond the bound.
    pub fn record(&mut self, at: Duration, kind: EventKind, detail: String) {
        if self.entries.len() == JOURNAL_LEN_MAX {
            self.entries.pop_front();
        }
        self.entries.push_back(Entry { at, kind, detail });
    }

    /// Entries, oldest first.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }
}

/// Messages and payload bytes published per topic.
#[derive(Default)]
pub struct TopicCounts {
    counts: crate::maps::FastMap<Arc<str>, (u64, u64)>,
    other: (u64, u64),
}

impl TopicCounts {
    /// Counts `messages` messages of `bytes` payload in all on `topic`.
    pub fn count(&mut self, topic: &Arc<str>, messages: u64, bytes: usize) {
        // One lookup for a topic counted before (every message but the first).
        if let Some(slot) = self.counts.get_mut(&**topic) {
            slot.0 += messages;
            slot.1 += bytes as u64;
            return;
        }
        let slot = match self.counts.len() < TOPICS_TRACKED_MAX {
            true => self.counts.entry(topic.clone()).or_default(),
            false => &mut self.other,
        };
        slot.0 += messages;
        slot.1 += bytes as u64;
    }

    /// `(topic, messages, bytes)` for every counted topic, then `(other)`
    /// if anything fell beyond the bound.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64, u64)> {
        let other = (self.other.0 > 0).then_some(("(other)", self.other.0, self.other.1));
        self.counts
            .iter()
            .map(|(t, (m, b))| (&**t, *m, *b))
            .chain(other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_journal_keeps_the_newest_entries() {
        let mut j = Journal::default();
        for i in 0..(JOURNAL_LEN_MAX + 10) {
            j.record(
                Duration::from_secs(i as u64),
                EventKind::Connect,
                format!("{i}"),
            );
        }
        let v: Vec<&Entry> = j.entries().collect();
        assert_eq!(v.len(), JOURNAL_LEN_MAX);
        assert_eq!(v[0].detail, "10");
    }

    #[test]
    fn topics_beyond_the_bound_are_summed_as_other() {
        let mut t = TopicCounts::default();
        for i in 0..(TOPICS_TRACKED_MAX + 2) {
            t.count(&Arc::from(format!("t{i}")), 1, 10);
        }
        t.count(&Arc::from("t0"), 1, 5);
        let all: Vec<(&str, u64, u64)> = t.iter().collect();
        assert_eq!(all.len(), TOPICS_TRACKED_MAX + 1);
        assert!(all.contains(&("(other)", 2, 20)));
        assert!(all.contains(&("t0", 2, 15)));
    }
}
