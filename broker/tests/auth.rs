//! Authentication and permissions over real processes (docs/DESIGN.md,
//! "Security"): credentials checked where a client attaches, refusals
//! specific and counted, permissions held at every tier, and nothing a
//! user may not read reaches it, also after an adoption through a relay.

mod common;

use canopy_broker::auth::{hash_password, new_token};
use canopy_client::protocol::{
    self, ClientFrame, Credentials, ErrorCode, PingHead, Publish, Reports, Role, ServerFrame,
    SlowPolicy, SubscribeHead,
};
use canopy_client::{Client, ClientOptions, Error, Event};
use common::{hello, within, within_for, Raw, Server, Tree};
use futures::StreamExt;
use std::path::PathBuf;
use std::time::Duration;

/// An accounts file, its tokens and passwords.
struct Accounts {
    path: PathBuf,
    reader: String,
    relay: String,
    monitor: String,
}

const FEED_PASSWORD: &str = "feed-secret";

impl Accounts {
    /// `feed` (password) publishes `md.>`; `reader` (token) reads
    /// `md.NASDAQ.>` and calls nothing; `relay` (token) is the tree's own.
    fn write() -> Accounts {
        let (reader, reader_hash) = new_token();
        let (relay, relay_hash) = new_token();
        let (monitor, monitor_hash) = new_token();
        let password = hash_password(FEED_PASSWORD).expect("hashes");
        let text = format!(
            r#"
[[user]]
name = "feed"
password = "{password}"
publish = ["md.>"]

[[user]]
name = "slow"
password = "{password}"
publish = ["md.>"]
publish_rate = 20

[[user]]
name = "reader"
tokens = ["{reader_hash}"]
subscribe = ["md.NASDAQ.>"]

[[user]]
name = "relay"
tokens = ["{relay_hash}"]
relay = true

[[user]]
name = "monitor"
tokens = ["{monitor_hash}"]
http = true
"#
        );
        let path = common::data_dir().with_extension("accounts.toml");
        std::fs::write(&path, text).expect("write accounts");
        Accounts {
            path,
            reader,
            relay,
            monitor,
        }
    }

    fn config(&self) -> String {
        format!("[auth]\naccounts = {:?}\n", self.path.display().to_string())
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn feed() -> Credentials {
    Credentials::Password {
        user: "feed".into(),
        password: FEED_PASSWORD.into(),
    }
}

async fn connect(servers: &[String], credentials: Option<Credentials>) -> Result<Client, Error> {
    let mut o = ClientOptions::new(servers.to_vec());
    o.credentials = credentials;
    o.reconnect_for = Duration::from_secs(20);
    within("connect", Client::connect(o)).await
}

fn refused_for(r: Result<Client, Error>) -> ErrorCode {
    match r {
        Err(Error::Rejected { code, .. }) => code,
        Err(e) => panic!("refused otherwise: {e}"),
        Ok(_) => panic!("connected"),
    }
}

#[tokio::test]
async fn credentials_are_checked_where_the_client_attaches() {
    let accounts = Accounts::write();
    let server = Server::with_config_and_http(&accounts.config());
    let at = [server.addr.clone()];
    assert_eq!(refused_for(connect(&at, None).await), ErrorCode::AuthFailed);
    let wrong = Credentials::Password {
        user: "feed".into(),
        password: "guess".into(),
    };
    assert_eq!(
        refused_for(connect(&at, Some(wrong)).await),
        ErrorCode::AuthFailed
    );
    let nobody = Credentials::Token(new_token().0);
    assert_eq!(
        refused_for(connect(&at, Some(nobody)).await),
        ErrorCode::AuthFailed
    );
    let client = connect(&at, Some(feed())).await.expect("the password");
    client.publish("md.NASDAQ.X", "x").await.expect("publishes");
    connect(&at, Some(Credentials::Token(accounts.reader.clone())))
        .await
        .expect("the token");
    // A raw client that sends no credentials is told why.
    let mut raw = Raw::connect(&server.addr).await;
    raw.send(ClientFrame::Hello(hello(7, &[], SlowPolicy::Disconnect)))
        .await;
    let e = raw.expect_error_and_close().await;
    assert_eq!(e.code, ErrorCode::AuthFailed, "{}", e.message);
    // Counted: the three refused clients above and the raw one.
    // (The metrics are a snapshot the server takes every so often.) HTTP
    // wants a token of a user with `http`, too.
    let http = server.http.clone().expect("HTTP on");
    for path in [
        "/metrics".to_owned(),
        format!("/metrics?token={}", accounts.reader),
    ] {
        let refused = common::http_get(&http, &path).await;
        assert!(refused.contains("wants a token"), "{path}: {refused}");
    }
    let path = format!("/metrics?token={}", accounts.monitor);
    common::metric_line(&http, &path, "canopy_auth_failures_total 4").await;
}

#[tokio::test]
async fn permissions_refuse_what_they_do_not_grant_and_the_connection_goes_on() {
    let accounts = Accounts::write();
    let server = Server::with_config(&accounts.config());
    let at = [server.addr.clone()];
    let feed = connect(&at, Some(feed())).await.expect("feed");
    let reader = connect(&at, Some(Credentials::Token(accounts.reader.clone())))
        .await
        .expect("reader");

    // Refused by the SDK before anything is sent; the clients go on.
    assert!(matches!(
        reader.subscribe("md.>").await,
        Err(Error::Denied(_))
    ));
    assert!(matches!(
        feed.publish("news.x", "n").await,
        Err(Error::Denied(_))
    ));
    // Refusals give their room in the publish window back: with a window
    // of two, the publish after five refusals goes through.
    let mut o = ClientOptions::new(at.to_vec());
    o.credentials = Some(Credentials::Password {
        user: "feed".into(),
        password: FEED_PASSWORD.into(),
    });
    o.window = 2;
    let narrow = within("connect", Client::connect(o)).await.expect("feed");
    for _ in 0..5 {
        let refused = within("a refusal", narrow.publish("news.x", "n")).await;
        assert!(matches!(refused, Err(Error::Denied(_))), "{refused:?}");
    }
    within(
        "a publish after refusals",
        narrow.publish("md.NASDAQ.X", "x"),
    )
    .await
    .expect("publishes");
    assert!(matches!(
        reader.call("get", "k").await,
        Err(Error::Denied(_))
    ));
    let mut sub = reader.subscribe("md.NASDAQ.>").await.expect("allowed");
    for (topic, body) in [("md.NYSE.IBM", "no"), ("md.NASDAQ.AAPL", "yes")] {
        feed.publish(topic, body).await.expect("publishes");
    }
    match within("the allowed message", sub.next()).await {
        Some(Event::Message(m)) => assert_eq!(m.topic(), "md.NASDAQ.AAPL"),
        other => panic!("expected the NASDAQ message, got {other:?}"),
    }

    // A client that goes around the SDK: a subscription outside its
    // permissions is refused alone; a publish or a role it may not have
    // ends the connection.
    let reader_hello = |role, reports| {
        let mut h = hello(9, &["md.>"], SlowPolicy::Disconnect);
        h.auth = Some(Credentials::Token(accounts.reader.clone()));
        h.role = role;
        h.reports = reports;
        ClientFrame::Hello(h)
    };
    let mut raw = Raw::connect(&server.addr).await;
    raw.send(reader_hello(Role::Client, Reports::None)).await;
    match raw.next().await {
        Some(ServerFrame::Welcome(w)) => {
            let p = w.permissions.expect("told its permissions");
            assert_eq!(p.user, "reader");
        }
        other => panic!("expected Welcome, got {other:?}"),
    }
    let denied = |f: Option<ServerFrame>, pattern: &str| match f {
        Some(ServerFrame::Error(e)) => {
            assert_eq!(e.code, ErrorCode::PermissionDenied);
            assert_eq!(e.pattern.as_deref(), Some(pattern));
        }
        other => panic!("expected the refusal of {pattern}, got {other:?}"),
    };
    denied(raw.next().await, "md.>");
    raw.send(ClientFrame::Subscribe(SubscribeHead {
        pattern: "md.*.IBM".into(),
    }))
    .await;
    denied(raw.next().await, "md.*.IBM");
    raw.send(ClientFrame::Ping(PingHead { nonce: 5 })).await;
    assert!(matches!(
        raw.next().await,
        Some(ServerFrame::Pong(PingHead { nonce: 5 }))
    ));
    feed.publish("md.NYSE.IBM", "leak?")
        .await
        .expect("publishes");
    raw.send(ClientFrame::Publish(Publish::new(
        "md.NASDAQ.X",
        protocol::PubSeq(1),
        bytes::Bytes::from_static(b"x"),
    )))
    .await;
    // Nothing of `md.>` came before the refusal that ends it.
    let e = loop {
        match raw.next().await {
            Some(ServerFrame::Error(e)) => break e,
            Some(ServerFrame::Deliver(head, _)) => {
                panic!("delivered to a refused pattern: {head:?}")
            }
            Some(_) => {}
            None => panic!("closed without an error: {:?}", raw.ended),
        }
    };
    assert_eq!(e.code, ErrorCode::PermissionDenied, "{}", e.message);
    assert_eq!(raw.next().await, None, "closed after the refusal");
    for (role, reports) in [(Role::Relay, Reports::None), (Role::Client, Reports::Full)] {
        let mut raw = Raw::connect(&server.addr).await;
        raw.send(reader_hello(role, reports)).await;
        let e = raw.expect_error_and_close().await;
        assert_eq!(e.code, ErrorCode::PermissionDenied, "{}", e.message);
    }
}

/// A user past its publish rate is slowed (read no faster than its rate),
/// not refused: every publish is acknowledged, none sooner than the rate
/// allows. (A lower bound on time only: it cannot fail by being slow.)
#[tokio::test]
async fn a_users_publish_rate_slows_it_down() {
    let accounts = Accounts::write();
    let server = Server::with_config(&accounts.config());
    let slow = Credentials::Password {
        user: "slow".into(),
        password: FEED_PASSWORD.into(),
    };
    let client = connect(std::slice::from_ref(&server.addr), Some(slow))
        .await
        .expect("slow");
    let start = std::time::Instant::now();
    let mut acks = Vec::new();
    for i in 0..50 {
        acks.push(client.send("md.x", format!("{i}")).await.expect("queued"));
    }
    for ack in acks {
        within("acknowledged", ack).await.expect("acknowledged");
    }
    // 20 at once, then 20 a second: 30 more take 1.5 s.
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1_400),
        "50 publishes at 20/s in {took:?}"
    );
}

/// Through relays: the relays prove themselves to the core with the
/// tree's token, and enforce the reader's permissions where it attaches;
/// when its relay is killed and another adopts it, it resumes with every
/// allowed message and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_hold_permissions_across_an_adoption() {
    let accounts = Accounts::write();
    let head = format!(
        "accounts = {:?}\ntoken = {:?}\n",
        accounts.path.display().to_string(),
        accounts.relay
    );
    let tree = Tree::start_with(1, &[2], &head);
    let relays = tree.tiers[0].clone();
    let reader = connect(&relays, Some(Credentials::Token(accounts.reader.clone())))
        .await
        .expect("reader at a relay");
    assert!(matches!(
        reader.subscribe("md.>").await,
        Err(Error::Denied(_))
    ));
    let mut sub = reader.subscribe("md.NASDAQ.>").await.expect("allowed");
    assert_eq!(
        refused_for(connect(&relays, None).await),
        ErrorCode::AuthFailed,
        "the relay checks too"
    );
    let feed = connect(&tree.core, Some(feed()))
        .await
        .expect("feed at the core");
    let mut want = Vec::new();
    for i in 0..40 {
        if i == 20 {
            tree.kill("relay-1.1");
        }
        let topic = if i % 2 == 0 {
            "md.NASDAQ.A"
        } else {
            "md.NYSE.B"
        };
        let body = format!("{i}");
        feed.publish(topic, body.clone()).await.expect("publishes");
        if i % 2 == 0 {
            want.push(body);
        }
    }
    let mut got = Vec::new();
    within_for(Duration::from_secs(60), "the allowed messages", async {
        while got.len() < want.len() {
            match sub.next().await {
                Some(Event::Message(m)) => {
                    assert_eq!(m.topic(), "md.NASDAQ.A", "nothing else reaches the reader");
                    got.push(String::from_utf8_lossy(&m.payload).into_owned());
                }
                Some(Event::Gap { .. }) => panic!("a gap"),
                Some(_) => {}
                None => panic!("the subscription ended"),
            }
        }
    })
    .await;
    assert_eq!(got, want, "every allowed message, once, in order");
}
