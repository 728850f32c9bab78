//! Hash maps for the tables every message consults (sessions, publishers,
//! topics, the subscription index): foldhash instead of SipHash, still
//! seeded at random per process so that peers cannot aim collisions.
//! Nothing iterates these maps in an order that reaches an output
//! (docs/DESIGN.md, "Hot path").

/// A [`std::collections::HashMap`] hashed with foldhash.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// A [`std::collections::HashSet`] hashed with foldhash.
pub type FastSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;
