//! [`Timers`]: a state machine's named timers (docs/DESIGN.md, "Sans-IO
//! and the simulators").
//!
//! Each state machine lists its timers as an enum and keeps their
//! deadlines here, at most one per name; `poll_timeout` is the earliest of
//! them, and `handle_timeout` asks which are due, by name. Nothing merges
//! deadlines by hand, and a deadline cannot be forgotten by `poll_timeout`.

use std::fmt::Debug;
use std::time::Duration;

/// Deadlines by name. See the module docs.
#[derive(Clone, Debug)]
pub struct Timers<K> {
    /// Few names: a short list, in the order they were first set.
    deadlines: Vec<(K, Duration)>,
}

impl<K> Default for Timers<K> {
    fn default() -> Self {
        Timers {
            deadlines: Vec::new(),
        }
    }
}

impl<K: Copy + Eq + Debug> Timers<K> {
    /// No timer set.
    pub fn new() -> Self {
        Timers::default()
    }

    /// Sets `name` to `at`, replacing its deadline if it had one.
    pub fn set(&mut self, name: K, at: Duration) {
        match self.deadlines.iter_mut().find(|(k, _)| *k == name) {
            Some((_, d)) => *d = at,
            None => self.deadlines.push((name, at)),
        }
    }

    /// Sets `name` to `at` unless it is set already.
    pub fn set_unless_set(&mut self, name: K, at: Duration) {
        if self.get(name).is_none() {
            self.set(name, at);
        }
    }

    /// Sets `name` to `at`, or cancels it when `at` is `None`.
    pub fn set_or_cancel(&mut self, name: K, at: Option<Duration>) {
        match at {
            Some(at) => self.set(name, at),
            None => self.cancel(name),
        }
    }

    /// Cancels `name`.
    pub fn cancel(&mut self, name: K) {
        self.deadlines.retain(|(k, _)| *k != name);
    }

    /// The deadline of `name`, if set.
    pub fn get(&self, name: K) -> Option<Duration> {
        self.deadlines
            .iter()
            .find(|(k, _)| *k == name)
            .map(|&(_, d)| d)
    }

    /// Whether `name` is set and due at `now`.
    pub fn is_due(&self, name: K, now: Duration) -> bool {
        self.get(name).is_some_and(|d| d <= now)
    }

    /// Whether `name` is due at `now`; if so it is cancelled (it fired).
    pub fn fire(&mut self, name: K, now: Duration) -> bool {
        let due = self.is_due(name, now);
        if due {
            self.cancel(name);
        }
        due
    }

    /// The earliest deadline: when `handle_timeout` is next due.
    pub fn next(&self) -> Option<Duration> {
        self.deadlines.iter().map(|&(_, d)| d).min()
    }
}

/// The earlier of two state machines' next timeouts (a composition's
/// `poll_timeout`).
pub fn earliest(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum T {
        A,
        B,
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_earliest_named_deadline_is_next_and_fires_once() {
        let mut t = Timers::new();
        assert_eq!(t.next(), None);
        t.set(T::A, 5 * MS);
        t.set(T::B, 3 * MS);
        assert_eq!(t.next(), Some(3 * MS));
        t.set_unless_set(T::B, MS);
        assert_eq!(t.get(T::B), Some(3 * MS), "set already");
        assert!(!t.fire(T::A, 4 * MS));
        assert!(t.fire(T::B, 4 * MS));
        assert!(!t.fire(T::B, 4 * MS), "fired once");
        assert_eq!(t.next(), Some(5 * MS));
        t.set_or_cancel(T::A, None);
        assert_eq!(t.next(), None);
        assert_eq!(earliest(Some(MS), None), Some(MS));
        assert_eq!(earliest(Some(MS), Some(2 * MS)), Some(MS));
        assert_eq!(earliest(None, None), None);
    }
}
