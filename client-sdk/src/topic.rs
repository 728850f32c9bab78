//! Topics and subscription patterns.
//!
//! A **topic** names what a message is about: tokens separated by `.`, such as
//! `md.NASDAQ.AAPL` or `factory.line3.temp`. A **pattern** selects topics: a
//! token `*` matches exactly one token and a final token `>` matches one or
//! more remaining tokens (`md.NASDAQ.*`, `factory.line3.>`).
//!
//! A topic whose first token starts with `$` is a **system topic** (the
//! broker's own, such as `$canopy.members`): a pattern that starts with a
//! wildcard does not match it, so `>` means "every application topic".
//! Only relays subscribe to system topics, by name (`$canopy.>`).
//!
//! Both are validated once, at the edge (the SDK before sending, the broker on
//! receipt), into the [`Topic`] and [`Pattern`] types, so code that holds one
//! never re-checks it.

use std::fmt;
use std::sync::Arc;

/// The longest topic or pattern accepted, in bytes.
pub const TOPIC_LEN_MAX: usize = 256;

/// Why a topic or pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The string was empty.
    #[error("topic or pattern is empty")]
    Empty,
    /// The string was longer than [`TOPIC_LEN_MAX`].
    #[error("{len} bytes is longer than the {TOPIC_LEN_MAX}-byte limit")]
    TooLong {
        /// The length that was refused.
        len: usize,
    },
    /// Two dots in a row, or a leading or trailing dot.
    #[error("`{0}` has an empty token (two dots in a row, or a dot at either end)")]
    EmptyToken(String),
    /// A character that topics may not contain (white space, control characters).
    #[error("`{0}` contains white space or a control character")]
    BadCharacter(String),
    /// A wildcard in a topic, or a wildcard used inside a token, or `>` not last.
    #[error("`{0}` misuses a wildcard: `*` and `>` stand alone as tokens, `>` only last, and never in a topic")]
    BadWildcard(String),
}

fn check_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > TOPIC_LEN_MAX {
        return Err(TopicError::TooLong { len: s.len() });
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(TopicError::BadCharacter(s.to_owned()));
    }
    if s.split('.').any(str::is_empty) {
        return Err(TopicError::EmptyToken(s.to_owned()));
    }
    Ok(())
}

/// Whether `topic` is a system topic (its first token starts with `$`).
pub fn is_system(topic: &str) -> bool {
    topic.starts_with('$')
}

/// A validated topic: no wildcards, no empty tokens.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(Arc<str>);

impl Topic {
    /// Validates `s` as a topic.
    ///
    /// # Errors
    /// [`TopicError`] naming what is wrong with `s`.
    pub fn new(s: &str) -> Result<Self, TopicError> {
        Self::validate(s)?;
        Ok(Topic(Arc::from(s)))
    }

    /// Checks that `s` is a valid topic without building one.
    ///
    /// # Errors
    /// [`TopicError`] naming what is wrong with `s`.
    pub fn validate(s: &str) -> Result<(), TopicError> {
        check_common(s)?;
        if s.contains(['*', '>']) {
            return Err(TopicError::BadWildcard(s.to_owned()));
        }
        Ok(())
    }

    /// The topic as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The shared text, without copying it.
    pub fn into_shared(self) -> Arc<str> {
        self.0
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Topic({})", &*self.0)
    }
}

/// One token of a [`Pattern`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Token {
    /// Matches this exact token.
    Literal(Box<str>),
    /// `*`: matches any one token.
    One,
    /// `>`: matches one or more remaining tokens; always last.
    Rest,
}

/// A validated subscription pattern.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    text: Arc<str>,
    tokens: Arc<[Token]>,
    /// No wildcard: matching is a string comparison.
    literal: bool,
}

impl Pattern {
    /// Validates and parses `s` as a pattern.
    ///
    /// # Errors
    /// [`TopicError`] naming what is wrong with `s`.
    pub fn new(s: &str) -> Result<Self, TopicError> {
        check_common(s)?;
        let parts: Vec<&str> = s.split('.').collect();
        let mut tokens = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let token = match *part {
                "*" => Token::One,
                ">" if i + 1 == parts.len() => Token::Rest,
                p if p.contains('*') || p.contains('>') => {
                    return Err(TopicError::BadWildcard(s.to_owned()))
                }
                p => Token::Literal(p.into()),
            };
            tokens.push(token);
        }
        let literal = tokens.iter().all(|t| matches!(t, Token::Literal(_)));
        Ok(Pattern {
            text: Arc::from(s),
            tokens: tokens.into(),
            literal,
        })
    }

    /// The pattern as text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The parsed tokens.
    pub fn tokens(&self) -> &[Token] {
        &self.tokens
    }

    /// Whether `topic` is selected by this pattern.
    pub fn matches(&self, topic: &str) -> bool {
        if self.literal {
            return *self.text == *topic;
        }
        if is_system(topic) && !matches!(self.tokens.first(), Some(Token::Literal(_))) {
            return false;
        }
        let mut parts = topic.split('.');
        for token in self.tokens.iter() {
            match token {
                Token::Rest => return parts.next().is_some(),
                Token::One => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Token::Literal(lit) => {
                    if parts.next() != Some(&**lit) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({})", &*self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, t: &str) -> bool {
        Pattern::new(p).expect("valid pattern").matches(t)
    }

    #[test]
    fn literal_patterns_match_only_the_same_topic() {
        assert!(m("a.b.c", "a.b.c"));
        assert!(!m("a.b.c", "a.b"));
        assert!(!m("a.b", "a.b.c"));
        assert!(!m("a.b.c", "a.b.d"));
    }

    #[test]
    fn star_matches_exactly_one_token() {
        assert!(m("md.NASDAQ.*", "md.NASDAQ.AAPL"));
        assert!(!m("md.NASDAQ.*", "md.NASDAQ"));
        assert!(!m("md.NASDAQ.*", "md.NASDAQ.AAPL.bid"));
        assert!(m("*.b.*", "a.b.c"));
    }

    #[test]
    fn rest_matches_one_or_more_trailing_tokens() {
        assert!(m("factory.line3.>", "factory.line3.temp"));
        assert!(m("factory.line3.>", "factory.line3.temp.max"));
        assert!(!m("factory.line3.>", "factory.line3"));
        assert!(m(">", "anything.at.all"));
    }

    #[test]
    fn leading_wildcards_do_not_match_system_topics() {
        assert!(!m(">", "$canopy.members"));
        assert!(!m("*.members", "$canopy.members"));
        assert!(m("$canopy.>", "$canopy.members"));
        assert!(m("$canopy.members", "$canopy.members"));
        assert!(
            m("a.>", "a.$b"),
            "only the first token makes a system topic"
        );
    }

    #[test]
    fn bad_topics_and_patterns_are_refused_with_a_reason() {
        assert_eq!(Topic::new(""), Err(TopicError::Empty));
        assert!(matches!(Topic::new("a..b"), Err(TopicError::EmptyToken(_))));
        assert!(matches!(Topic::new(".a"), Err(TopicError::EmptyToken(_))));
        assert!(matches!(
            Topic::new("a b"),
            Err(TopicError::BadCharacter(_))
        ));
        assert!(matches!(Topic::new("a.*"), Err(TopicError::BadWildcard(_))));
        assert!(matches!(Topic::new("a.>"), Err(TopicError::BadWildcard(_))));
        assert!(matches!(
            Pattern::new("a.>.b"),
            Err(TopicError::BadWildcard(_))
        ));
        assert!(matches!(
            Pattern::new("a.b*"),
            Err(TopicError::BadWildcard(_))
        ));
        let long = "a".repeat(TOPIC_LEN_MAX + 1);
        assert!(matches!(Topic::new(&long), Err(TopicError::TooLong { .. })));
    }
}
