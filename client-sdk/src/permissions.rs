//! Who a client is and what it may do (docs/DESIGN.md, "Security").
//!
//! A client proves who it is with [`Credentials`] in its `Hello`; a server
//! that checks answers with the user's [`Permissions`] in `Welcome`, and
//! enforces them where the client is attached: publishes and calls by
//! topic and method pattern, subscriptions that must lie within an allowed
//! pattern, full membership reports, and attaching as a relay. The SDK
//! refuses locally what the server would refuse, so a refused publish or
//! call never takes a publisher sequence number.

use crate::protocol::Replies;
use crate::topic::{is_system, Pattern, Token};
use serde::{Deserialize, Serialize};
use std::fmt;

/// How a client proves who it is.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Credentials {
    /// A token the accounts file holds the hash of.
    Token(String),
    /// A user's name and password.
    Password {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Token(_) => f.write_str("Token(..)"),
            Credentials::Password { user, .. } => write!(f, "Password({user}, ..)"),
        }
    }
}

/// What a user may do. Patterns are validated when the permissions are
/// read (from an accounts file, or a `Welcome`), so checks never fail to
/// parse.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permissions {
    /// The user's name.
    pub user: String,
    /// Topic patterns the user may publish to.
    #[serde(default, with = "patterns")]
    pub publish: Vec<Pattern>,
    /// Patterns the user may subscribe within: a subscription must select
    /// nothing outside one of them.
    #[serde(default, with = "patterns")]
    pub subscribe: Vec<Pattern>,
    /// Method patterns the user may call (`get`, `book.*`, `>`).
    #[serde(default, with = "patterns")]
    pub call: Vec<Pattern>,
    /// Whether the user may be told the tree's membership (`Reports::Full`).
    #[serde(default)]
    pub members: bool,
    /// Whether the user may attach as a relay, which publishes and calls
    /// for its own clients and enforces their permissions itself.
    #[serde(default)]
    pub relay: bool,
    /// Whether the user's tokens open the servers' dashboard, JSON API
    /// and `/metrics`.
    #[serde(default)]
    pub http: bool,
}

impl Permissions {
    /// Whether the user may publish on `topic` (a call topic: call its
    /// method).
    pub fn may_publish(&self, topic: &str) -> bool {
        match Replies::parse(topic) {
            Some((method, _)) => self.may_call(method),
            None => self.publish.iter().any(|p| p.matches(topic)),
        }
    }

    /// Whether the user may call `method`.
    pub fn may_call(&self, method: &str) -> bool {
        self.call.iter().any(|p| p.matches(method))
    }

    /// Whether the user may subscribe with `pattern`: some allowed
    /// pattern selects every topic it does.
    pub fn may_subscribe(&self, pattern: &Pattern) -> bool {
        self.subscribe.iter().any(|p| covers(p, pattern))
    }
}

/// Whether `outer` selects every topic `inner` selects.
pub fn covers(outer: &Pattern, inner: &Pattern) -> bool {
    let (a, b) = (outer.tokens(), inner.tokens());
    // A pattern that starts with a wildcard selects no system topic.
    let system = matches!(b.first(), Some(Token::Literal(l)) if is_system(l));
    if system && !matches!(a.first(), Some(Token::Literal(_))) {
        return false;
    }
    for (i, t) in a.iter().enumerate() {
        match (t, b.get(i)) {
            // One or more tokens: whatever `inner` has from here on.
            (Token::Rest, Some(_)) => return true,
            (Token::One, Some(Token::Literal(_) | Token::One)) => {}
            (Token::Literal(x), Some(Token::Literal(y))) if x == y => {}
            _ => return false,
        }
    }
    a.len() == b.len()
}

/// Patterns as their texts on the wire and in files.
mod patterns {
    use crate::topic::Pattern;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[Pattern], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(Pattern::as_str))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Pattern>, D::Error> {
        let texts = Vec::<String>::deserialize(d)?;
        texts
            .iter()
            .map(|t| Pattern::new(t).map_err(D::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::new(s).expect("a pattern")
    }

    #[test]
    fn a_pattern_covers_what_it_selects_and_nothing_more() {
        let yes = [
            ("md.>", "md.>"),
            ("md.>", "md.NASDAQ.*"),
            ("md.>", "md.a.b.c"),
            ("md.*.x", "md.a.x"),
            ("md.*.x", "md.*.x"),
            (">", "a.*.>"),
            ("$canopy.>", "$canopy.members"),
        ];
        for (outer, inner) in yes {
            assert!(covers(&p(outer), &p(inner)), "{outer} covers {inner}");
            // Every topic the inner one selects, the outer one does.
            let topic = inner.replace(['*', '>'], "t");
            assert!(p(outer).matches(&topic), "{outer} matches {topic}");
        }
        let no = [
            ("md.NASDAQ.*", "md.>"),
            ("md.*", "md.*.x"),
            ("md.*.x", "md.>"),
            ("md.a", "md.*"),
            ("md.>", "md"),
            (">", "$canopy.members"),
            ("*.members", "$canopy.members"),
            ("a.*", "a.>"),
        ];
        for (outer, inner) in no {
            assert!(
                !covers(&p(outer), &p(inner)),
                "{outer} does not cover {inner}"
            );
        }
    }

    #[test]
    fn calls_are_allowed_by_method_and_publishes_by_topic() {
        let perm = Permissions {
            user: "u".into(),
            publish: vec![p("md.>")],
            subscribe: vec![p("md.NASDAQ.>")],
            call: vec![p("get"), p("book.*")],
            ..Permissions::default()
        };
        assert!(perm.may_publish("md.x"));
        assert!(!perm.may_publish("news.x"));
        assert!(perm.may_publish(&Replies::Own.topic("get")));
        assert!(perm.may_publish(&Replies::All.topic("book.add")));
        assert!(!perm.may_publish(&Replies::Own.topic("put")));
        assert!(!perm.may_publish("$canopy.call.put"));
        assert!(perm.may_subscribe(&p("md.NASDAQ.*")));
        assert!(!perm.may_subscribe(&p("md.>")));
        let mut wire = Vec::new();
        ciborium::into_writer(&perm, &mut wire).expect("encodes");
        assert_eq!(ciborium::from_reader(&wire[..]).ok(), Some(perm));
        #[derive(Serialize)]
        struct Wire {
            user: String,
            subscribe: Vec<String>,
        }
        let bad = Wire {
            user: "u".into(),
            subscribe: vec!["md.>.x".into()],
        };
        let mut wire = Vec::new();
        ciborium::into_writer(&bad, &mut wire).expect("encodes");
        assert!(ciborium::from_reader::<Permissions, _>(&wire[..]).is_err());
        let secret = format!("{:?}", Credentials::Token("s3cret".into()));
        assert!(!secret.contains("s3cret"));
    }
}
