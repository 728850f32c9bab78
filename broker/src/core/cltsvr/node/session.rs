//! Sessions: the handshake (Hello, resume and its checks, Welcome),
//! subscriptions, and membership reports for a new session.

use super::*;

impl Node {
    pub(super) fn on_hello(&mut self, session: SessionId, hello: Hello) {
        if !self.primary {
            let msg = "this server is not serving: it is not in the primary component of the core, or has no stream from the tier above yet".to_owned();
            return self.close_with_error(session, ErrorCode::NotPrimary, msg);
        }
        if hello.version != protocol::PROTOCOL_VERSION {
            let msg = format!(
                "client speaks protocol version {}, this server speaks {}",
                hello.version,
                protocol::PROTOCOL_VERSION
            );
            return self.close_with_error(session, ErrorCode::UnsupportedVersion, msg);
        }
        let permissions = self
            .sessions
            .get(&session)
            .and_then(|s| s.permissions.clone());
        if let Some(why) = self.refusal(permissions.as_deref(), &hello) {
            return self.close_with_error(session, why.0, why.1);
        }
        if hello.weak && hello.reports == Reports::Full && hello.role != Role::Relay {
            let msg = "weak delivery cannot be combined with full membership reports (their positions are stable ones)".to_owned();
            return self.close_with_error(session, ErrorCode::WeakNotAllowed, msg);
        }
        if let Some(r) = hello
            .resume
            .filter(|r| r.check.is_some_and(|c| c.seq > r.after))
        {
            // A client checks what it delivered, which is never past where
            // it stands.
            let msg = format!(
                "resume check at seq {} is past the resume position {}",
                r.check.map_or(0, |c| c.seq.0),
                r.after
            );
            return self.close_with_error(session, ErrorCode::Malformed, msg);
        }
        if hello.subscriptions.len() > self.config.subscriptions_per_session_max {
            let msg = format!(
                "{} subscriptions, at most {} per connection",
                hello.subscriptions.len(),
                self.config.subscriptions_per_session_max
            );
            return self.close_with_error(session, ErrorCode::TooManySubscriptions, msg);
        }
        let mut patterns = Vec::with_capacity(hello.subscriptions.len());
        let mut denied = Vec::new();
        let limits = self.limits_of(session);
        for text in &hello.subscriptions {
            match Pattern::new(text) {
                Ok(p) if limits.as_ref().is_some_and(|l| !l.may_subscribe(&p)) => denied.push(p),
                Ok(p) if !patterns.contains(&p) => patterns.push(p),
                Ok(_) => {}
                Err(e) => {
                    return self.close_with_error(session, ErrorCode::InvalidPattern, e.to_string())
                }
            }
        }
        // Order what is pending first, so the replay below and the live
        // stream after it meet exactly at `head`.
        self.fan_out();
        for p in &patterns {
            self.indexes.of(hello.weak).insert(p, session);
        }
        // Everyone starts at the stable head (the agreed stream); a weak
        // client is then caught up through what is held.
        let head = self.head;
        let pub_acked = self
            .publishers
            .get(hello.publisher)
            .map_or(PubSeq(0), |p| p.delivered);
        let welcome = Welcome {
            version: protocol::PROTOCOL_VERSION,
            server: self.config.name.clone(),
            session: session.0,
            stream: self.config.stream,
            head,
            pub_acked,
            frame_len_max: u32::try_from(self.config.frame_len_max).unwrap_or(u32::MAX),
            servers: self.config.servers.clone(),
            hash: self.hash,
            permissions: permissions.as_deref().cloned(),
        };
        self.control(session, kind::WELCOME, &welcome);
        for p in denied {
            self.deny_subscription(session, &p);
        }
        let resume = hello.resume.filter(|r| r.stream == self.config.stream);
        let resume_after = resume.map(|r| r.after);
        let listed_here = self
            .members
            .client(hello.publisher)
            .is_some_and(|e| e.server == self.config.id);
        if resume.is_some() && !listed_here {
            self.stats.adopted += 1;
        }
        let weak_head = self.weak_head();
        // The client's stream must be this server's up to where it stands.
        let (mut claim, mut diverged) = (None, None);
        if let Some((check, r)) = resume.and_then(|r| Some((r.check?, r))) {
            // How far this server's stream counts for the client's check:
            // a strong client's stream is stable, and so is a weak one's
            // through its `agreed`; there only this server's stable part
            // can tell it apart (an unstable part that differs is this
            // server's to take back, not the client's: a server cut off
            // from the primary component, still serving).
            let stable_only = !hello.weak || r.agreed.is_some_and(|a| a >= check.seq);
            let horizon = if stable_only { self.head } else { weak_head };
            let agreed = r
                .agreed
                .unwrap_or(r.after)
                .min(Seq(check.seq.0.saturating_sub(1)));
            let known = match check.seq <= horizon {
                true => self.hash_at(check.seq),
                false => None,
            };
            match known {
                Some(hash) if hash == check.hash => {}
                Some(_) => diverged = Some((agreed, check.seq)),
                // Not reached yet: checked when it is.
                None if check.seq > horizon => {
                    claim = Some(Claim {
                        check,
                        agreed,
                        stable_only,
                    })
                }
                // Older than retention, with an unchecked part (weak): it
                // cannot be ruled out; the replay reports what is missing.
                None if r.agreed.is_some_and(|a| a < check.seq) => {
                    diverged = Some((agreed, check.seq))
                }
                // Older than retention and stable all through: under one
                // stream id a stable seq means one thing for good (the core
                // never restarts a stream under its id; see the group's
                // "Restart safety"), so there is nothing left to check.
                None => {}
            }
        }
        if claim.is_some() {
            self.checks.push(session);
        }
        if hello.weak {
            self.weak_live += 1;
            if hello.role == Role::Relay {
                self.stable_marks.insert(session);
            }
        }
        self.publisher_sessions.insert(hello.publisher, session);
        // What the table vouches for (docs/DESIGN.md, "Bounds") counts as
        // handed to the group already.
        let vouched = self.publishers.vouched(hello.publisher).unwrap_or_default();
        if let Some(s) = self.sessions.get_mut(&session) {
            s.submitted = vouched;
            // The Welcome acknowledges this much.
            s.ack_sent = pub_acked;
            s.patterns = patterns;
            s.sent_through = head;
            s.weak = hello.weak;
            s.credit = hello.window;
            // Where the client stands, as far as this server holds.
            s.weak_sent = resume_after.map_or(head, |a| a.min(weak_head).max(head));
            s.claim = claim;
            s.hello = Some(SessionHello {
                entry: MemberEntry {
                    id: hello.publisher,
                    name: member_name(&hello.name),
                    server: self.config.id,
                    relay: hello.role == Role::Relay,
                    session: session.0,
                    connection: hello.connection,
                },
                name: hello.name,
                publisher: hello.publisher,
                slow: hello.slow,
                role: hello.role,
                reports: hello.reports,
            });
        }
        if let Some((agreed, seen)) = diverged {
            self.diverge(session, agreed, seen);
        } else if let Some(after) = resume_after
            .or(hello.weak.then_some(head))
            .filter(|a| *a < if hello.weak { weak_head } else { head })
        {
            if let Some(s) = self.sessions.get_mut(&session) {
                s.catch_up = Some(after);
                self.catching_up.push(session);
            }
        } else {
            self.start_reports(session);
        }
        if let Some(entry) = self
            .sessions
            .get(&session)
            .and_then(|s| s.hello.as_ref())
            .map(|h| h.entry.clone())
        {
            self.publish_member_event(MemberEvent::Attach(entry));
        }
    }

    /// Why a `Hello` with `permissions` (when the node checks) is refused:
    /// no credentials checked, or a role or reports the user may not have.
    fn refusal(
        &self,
        permissions: Option<&Permissions>,
        hello: &Hello,
    ) -> Option<(ErrorCode, String)> {
        if !self.config.auth {
            return None;
        }
        let Some(p) = permissions else {
            let msg = "this server requires credentials (a token, or a user and password)";
            return Some((ErrorCode::AuthFailed, msg.into()));
        };
        let denied = |what: &str| {
            let msg = format!("user `{}` may not {what}", p.user);
            Some((ErrorCode::PermissionDenied, msg))
        };
        if hello.role == Role::Relay && !p.relay {
            return denied("attach as a relay");
        }
        if hello.reports == Reports::Full && !p.relay && !p.members {
            return denied("be told the tree's membership (`full` reports)");
        }
        None
    }

    /// Tells `session` its subscription `pattern` is not in effect: its
    /// user may not read everything it selects. The connection stays.
    fn deny_subscription(&mut self, session: SessionId, pattern: &Pattern) {
        self.stats.denied += 1;
        let user = self
            .sessions
            .get(&session)
            .and_then(|s| s.permissions.as_ref())
            .map(|p| p.user.clone())
            .unwrap_or_default();
        let frame = ErrorFrame {
            code: ErrorCode::PermissionDenied,
            message: format!("user `{user}` may not subscribe to all of `{pattern}`"),
            publisher: None,
            pattern: Some(pattern.as_str().to_owned()),
        };
        self.control(session, kind::ERROR, &frame);
    }

    /// Starts `full` or `servers` reports for a session that is live now.
    pub(super) fn start_reports(&mut self, session: SessionId) {
        let Some(reports) = self
            .sessions
            .get(&session)
            .and_then(|s| s.hello.as_ref())
            .map(|h| h.reports)
        else {
            return;
        };
        if reports != Reports::None {
            // `full` includes the server list.
            self.reporting_servers.insert(session);
        }
        match reports {
            Reports::Full => {
                let report = self.members.report(self.head);
                self.control(session, kind::MEMBERS, &report);
                self.reporting_full.insert(session);
            }
            Reports::Servers => {}
            Reports::None => {}
        }
    }

    pub(super) fn on_subscribe(&mut self, session: SessionId, text: &str) {
        let pattern = match Pattern::new(text) {
            Ok(p) => p,
            Err(e) => {
                return self.close_with_error(session, ErrorCode::InvalidPattern, e.to_string())
            }
        };
        if self
            .limits_of(session)
            .is_some_and(|l| !l.may_subscribe(&pattern))
        {
            return self.deny_subscription(session, &pattern);
        }
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        if !s.patterns.contains(&pattern) {
            if s.patterns.len() >= self.config.subscriptions_per_session_max {
                let msg = format!(
                    "at most {} subscriptions per connection",
                    self.config.subscriptions_per_session_max
                );
                return self.close_with_error(session, ErrorCode::TooManySubscriptions, msg);
            }
            // Fan out what is pending under the old subscriptions, so that the
            // new one starts exactly after `head` as the answer says.
            self.fan_out();
            if let Some(s) = self.sessions.get_mut(&session) {
                self.indexes.of(s.weak).insert(&pattern, session);
                s.patterns.push(pattern);
            }
        }
        let answer = self.subscription_answer(session, text);
        self.control(session, kind::SUBSCRIBED, &answer);
    }

    pub(super) fn on_unsubscribe(&mut self, session: SessionId, text: &str) {
        let pattern = match Pattern::new(text) {
            Ok(p) => p,
            Err(e) => {
                return self.close_with_error(session, ErrorCode::InvalidPattern, e.to_string())
            }
        };
        self.fan_out();
        if let Some(s) = self.sessions.get_mut(&session) {
            if let Some(i) = s.patterns.iter().position(|p| *p == pattern) {
                s.patterns.swap_remove(i);
                self.indexes.of(s.weak).remove(&pattern, session);
            }
        }
        let answer = self.subscription_answer(session, text);
        self.control(session, kind::UNSUBSCRIBED, &answer);
    }

    /// The answer to a subscription change: the client's position moves to
    /// what it has been sent everything of, with the hash there.
    pub(super) fn subscription_answer(
        &mut self,
        session: SessionId,
        pattern: &str,
    ) -> SubscribedHead {
        let head = self.sent_head(session);
        if let Some(s) = self.sessions.get_mut(&session).filter(|s| s.weak) {
            s.weak_sent = s.weak_sent.max(head);
        }
        SubscribedHead {
            pattern: pattern.to_owned(),
            head,
            hash: self.hash_at(head),
        }
    }
}
