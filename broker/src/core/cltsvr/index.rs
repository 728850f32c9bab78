//! The subscription index: which sessions want which topics.
//!
//! Owns the mapping from patterns to sessions and answers "who matches this
//! topic?" for the hot path. Matching walks a token trie; answers are cached
//! per topic as a shared, sorted, duplicate-free slice so that a steady stream
//! on a few topics costs one hash lookup per message, and every change of a
//! subscription clears the cache (subscription changes are rare next to
//! messages). The cache is bounded by `cache_len_max` entries.

use canopy_client::topic::{Pattern, Token};
use std::sync::Arc;

use crate::core::SessionId;

#[derive(Default)]
struct TrieNode {
    literal: crate::maps::FastMap<Box<str>, TrieNode>,
    one: Option<Box<TrieNode>>,
    /// Sessions whose pattern ends here.
    here: Vec<SessionId>,
    /// Sessions whose pattern ends with `>` after this node.
    rest: Vec<SessionId>,
}

impl TrieNode {
    fn is_empty(&self) -> bool {
        self.literal.is_empty()
            && self.one.is_none()
            && self.here.is_empty()
            && self.rest.is_empty()
    }

    fn collect(&self, tokens: &[&str], out: &mut Vec<SessionId>) {
        match tokens.split_first() {
            None => out.extend_from_slice(&self.here),
            Some((first, rest)) => {
                out.extend_from_slice(&self.rest);
                if let Some(child) = self.literal.get(*first) {
                    child.collect(rest, out);
                }
                if let Some(child) = &self.one {
                    child.collect(rest, out);
                }
            }
        }
    }

    /// Removes `session` under `tokens`; returns whether it was there.
    fn remove(&mut self, tokens: &[Token], session: SessionId) -> bool {
        let removed = match tokens.split_first() {
            None => remove_from(&mut self.here, session),
            Some((Token::Rest, _)) => remove_from(&mut self.rest, session),
            Some((Token::One, rest)) => match &mut self.one {
                Some(child) => {
                    let removed = child.remove(rest, session);
                    if child.is_empty() {
                        self.one = None;
                    }
                    removed
                }
                None => false,
            },
            Some((Token::Literal(lit), rest)) => match self.literal.get_mut(lit) {
                Some(child) => {
                    let removed = child.remove(rest, session);
                    if child.is_empty() {
                        self.literal.remove(lit);
                    }
                    removed
                }
                None => false,
            },
        };
        removed
    }
}

fn remove_from(v: &mut Vec<SessionId>, session: SessionId) -> bool {
    match v.iter().position(|s| *s == session) {
        Some(i) => {
            v.swap_remove(i);
            true
        }
        None => false,
    }
}

/// Maps patterns to sessions and topics to matching sessions.
pub struct Index {
    root: TrieNode,
    cache: crate::maps::FastMap<Arc<str>, Arc<[SessionId]>>,
    cache_len_max: usize,
}

impl Index {
    /// An empty index whose topic cache holds at most `cache_len_max` topics.
    pub fn new(cache_len_max: usize) -> Self {
        Index {
            root: TrieNode::default(),
            cache: crate::maps::FastMap::default(),
            cache_len_max,
        }
    }

    /// Adds `session` under `pattern`. The caller keeps each (session,
    /// pattern) pair at most once.
    pub fn insert(&mut self, pattern: &Pattern, session: SessionId) {
        let mut node = &mut self.root;
        for token in pattern.tokens() {
            node = match token {
                Token::Literal(lit) => node.literal.entry(lit.clone()).or_default(),
                Token::One => node.one.get_or_insert_with(Box::default),
                Token::Rest => {
                    node.rest.push(session);
                    self.cache.clear();
                    return;
                }
            };
        }
        node.here.push(session);
        self.cache.clear();
    }

    /// Removes `session` from under `pattern`; returns whether it was there.
    pub fn remove(&mut self, pattern: &Pattern, session: SessionId) -> bool {
        let removed = self.root.remove(pattern.tokens(), session);
        if removed {
            self.cache.clear();
        }
        removed
    }

    /// The sessions matching `topic`, sorted and without duplicates.
    pub fn lookup(&mut self, topic: &Arc<str>) -> Arc<[SessionId]> {
        if let Some(hit) = self.cache.get(topic) {
            return hit.clone();
        }
        let tokens: Vec<&str> = topic.split('.').collect();
        let mut out = Vec::new();
        match tokens.split_first() {
            // A system topic: leading wildcards do not match it.
            Some((first, rest)) if canopy_client::topic::is_system(first) => {
                if let Some(child) = self.root.literal.get(*first) {
                    child.collect(rest, &mut out);
                }
            }
            _ => self.root.collect(&tokens, &mut out),
        }
        out.sort_unstable();
        out.dedup();
        let found: Arc<[SessionId]> = out.into();
        if self.cache.len() >= self.cache_len_max {
            self.cache.clear();
        }
        self.cache.insert(topic.clone(), found.clone());
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::new(s).expect("valid pattern")
    }

    fn ids(index: &mut Index, topic: &str) -> Vec<u64> {
        index
            .lookup(&Arc::from(topic))
            .iter()
            .map(|s| s.0)
            .collect()
    }

    #[test]
    fn lookup_agrees_with_pattern_matching() {
        let patterns = [
            "a.b.c", "a.*.c", "a.>", ">", "*.b", "x.y", "a.b.*", "$sys.>", "$sys.*", "*.*",
        ];
        let topics = [
            "a.b.c", "a.x.c", "a.b", "x.y", "q", "a.b.c.d", "z.b", "$sys.b", "$sys.b.c",
        ];
        let mut index = Index::new(16);
        for (i, pat) in patterns.iter().enumerate() {
            index.insert(&p(pat), SessionId(i as u64));
        }
        for topic in topics {
            let expected: Vec<u64> = patterns
                .iter()
                .enumerate()
                .filter(|(_, pat)| p(pat).matches(topic))
                .map(|(i, _)| i as u64)
                .collect();
            assert_eq!(ids(&mut index, topic), expected, "topic {topic}");
        }
    }

    #[test]
    fn a_session_matching_twice_appears_once_and_removal_clears_the_cache() {
        let mut index = Index::new(16);
        index.insert(&p("a.>"), SessionId(1));
        index.insert(&p("a.b"), SessionId(1));
        assert_eq!(ids(&mut index, "a.b"), vec![1]);
        assert!(index.remove(&p("a.>"), SessionId(1)));
        assert!(!index.remove(&p("a.>"), SessionId(1)));
        assert_eq!(ids(&mut index, "a.b"), vec![1]);
        assert!(index.remove(&p("a.b"), SessionId(1)));
        assert_eq!(ids(&mut index, "a.b"), Vec::<u64>::new());
        assert!(index.root.is_empty());
    }
}
