//! TLS over real processes (docs/DESIGN.md, "Security"): certificates made
//! by `canopy certs`; a client with the tree's CA is served, one with
//! another CA's (either way round), none, or plain TCP is refused and
//! counted; a client certificate logs in as its user; core links are
//! mutual TLS, and a process without a core certificate of the tree's CA
//! is dropped on the peer port; a whole tree over TLS keeps a checking
//! subscriber's stream (nothing lost, doubled or outside its permissions)
//! through a relay's death.

mod common;

use canopy_client::tls::{Identity, TlsConnector};
use canopy_client::{Client, ClientOptions, Error, Event};
use common::{closed_by_the_server, within, Cluster, LinkHello, Server, Tree};
use futures::StreamExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// A folder removed when the test is done with it, passed or not.
#[derive(Debug)]
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh folder of development certificates made by `canopy certs`,
/// with client certificates for `users`.
fn certs(users: &[&str]) -> Scratch {
    let dir = common::data_dir();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_canopy"));
    cmd.arg("certs").arg(&dir);
    for u in users {
        cmd.args(["--client", u]);
    }
    let out = cmd.output().expect("runs canopy certs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Scratch(dir)
}

/// A client certificate of `dir`'s CA that names itself a core server in
/// every way a name can be written (common name and DNS name), as an
/// operator's mistake (or a user who may ask the CA for names) makes one:
/// `dir/impostor.pem`.
fn impostor(dir: &Path) {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("reads");
    let ca_key = KeyPair::from_pem(&read("ca-key.pem")).expect("the CA's key");
    let ca = CertificateParams::from_ca_cert_pem(&read("ca.pem"))
        .expect("the CA")
        .self_signed(&ca_key)
        .expect("the issuer");
    let key = KeyPair::generate().expect("a key");
    let mut params = CertificateParams::new(vec!["canopy-core".to_owned()]).expect("params");
    params
        .distinguished_name
        .push(DnType::CommonName, "canopy-core");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &ca, &ca_key).expect("signs");
    std::fs::write(dir.join("impostor.pem"), cert.pem()).expect("writes");
    std::fs::write(dir.join("impostor-key.pem"), key.serialize_pem()).expect("writes");
}

fn connector(ca: &Path, identity: Option<(&Path, &str)>) -> TlsConnector {
    let identity = identity.map(|(dir, name)| Identity {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
    });
    TlsConnector::from_files(&ca.join("ca.pem"), identity.as_ref()).expect("TLS settings")
}

/// A server's `[tls]` section with the `name` certificate of `dir`.
fn tls_section(dir: &Path, name: &str, extra: &str) -> String {
    format!(
        "[tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n{extra}\n",
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
        dir.join("ca.pem"),
    )
}

/// An accounts file in `dir`.
fn accounts(dir: &Path, feed_password_hash: Option<&str>) -> PathBuf {
    let path = dir.join("accounts.toml");
    let feed = match feed_password_hash {
        Some(h) => format!("[[user]]\nname = \"feed\"\npassword = {h:?}\npublish = [\"md.>\"]\n\n"),
        None => String::new(),
    };
    let text = format!(
        "{feed}[[user]]\nname = \"reader\"\ncertificates = [\"reader\"]\nsubscribe = [\"md.NASDAQ.>\"]\npublish = [\"md.NASDAQ.>\"]\n\n[[user]]\nname = \"tree\"\ntokens = [\"sha256:a36d5638b5c35fabda41bf57838987899e0c1e2c3a85d7d332a960c3b05df273\"]\nrelay = true\n\n[[user]]\nname = \"ops\"\ntokens = [\"sha256:4db91eab0281403a94ae3ed61e1e1baf7528d2dc264eb786f64c43d7697d3177\"]\nhttp = true\n"
    );
    std::fs::write(&path, text).expect("writes accounts");
    path
}

fn options(addr: &str, tls: Option<TlsConnector>) -> ClientOptions {
    let mut o = ClientOptions::new([addr]);
    o.tls = tls;
    o.reconnect_for = Duration::from_millis(600);
    o.connect_timeout = Duration::from_secs(2);
    o
}

/// The value of counter `name` in a server's `/metrics` (read with the
/// `ops` token).
async fn counter(http: &str, name: &str) -> u64 {
    let body = common::http_get(http, "/metrics?token=demo-ops-token").await;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {body}"))
}

/// Waits until counter `name` passes `before` (snapshots are periodic).
async fn counter_above(http: &str, name: &str, before: u64) -> u64 {
    within("the counter moves", async {
        loop {
            let now = counter(http, name).await;
            if now > before {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_the_trees_ca_and_certificate_is_served_and_every_other_is_refused() {
    let dir = certs(&["reader"]);
    let foreign = certs(&["reader"]);
    let accounts = accounts(&dir, None);
    let config = format!(
        "[auth]\naccounts = {:?}\n\n{}",
        accounts,
        tls_section(&dir, "core", "client_certs = \"required\"")
    );
    let server = Server::with_config_and_http(&config);
    let http = server.http.clone().expect("HTTP on");

    // The tree's CA and a certificate it signed for `reader`: served as
    // `reader` (no token), with reader's permissions.
    let reader = within(
        "connect",
        Client::connect(options(
            &server.addr,
            Some(connector(&dir, Some((&dir, "reader")))),
        )),
    )
    .await
    .expect("a good certificate is served");
    let mut sub = reader.subscribe("md.NASDAQ.>").await.expect("allowed");
    assert!(matches!(
        reader.subscribe("md.>").await,
        Err(Error::Denied(_))
    ));
    reader
        .publish("md.NASDAQ.AAPL", "189.5")
        .await
        .expect("publishes");
    match within("the message", sub.next()).await {
        Some(Event::Message(m)) => assert_eq!(&m.payload[..], b"189.5"),
        other => panic!("expected the message, got {other:?}"),
    }

    let mut failed = counter(&http, "canopy_tls_handshakes_failed_total").await;
    // Each refused: the server's certificate under another CA; a client
    // certificate of another CA; none (they are required here); plain TCP.
    let refused = [
        (
            "another CA's server",
            Some(connector(&foreign, Some((&foreign, "reader")))),
        ),
        (
            "another CA's client certificate",
            Some(connector(&dir, Some((&foreign, "reader")))),
        ),
        ("no client certificate", Some(connector(&dir, None))),
        ("plain TCP", None),
    ];
    for (what, tls) in refused {
        let plain = tls.is_none();
        match within(what, Client::connect(options(&server.addr, tls))).await {
            Ok(_) => panic!("{what}: served"),
            Err(Error::Unreachable { last, .. }) => {
                if plain {
                    assert!(last.contains("a TLS server?"), "{what}: {last}");
                }
            }
            Err(e) => panic!("{what}: {e}"),
        }
        // Each one's failed handshakes are counted.
        failed = counter_above(&http, "canopy_tls_handshakes_failed_total", failed).await;
    }
    // The good client never noticed.
    reader
        .publish("md.NASDAQ.MSFT", "400")
        .await
        .expect("publishes");
    match within("the message", sub.next()).await {
        Some(Event::Message(m)) => assert_eq!(&m.payload[..], b"400"),
        other => panic!("expected the message, got {other:?}"),
    }
    // A certificate of the CA whose name no user has: TLS admits it, the
    // accounts do not.
    let relay = connector(&dir, Some((&dir, "relay")));
    match within(
        "unmapped",
        Client::connect(options(&server.addr, Some(relay))),
    )
    .await
    {
        Err(Error::Rejected { code, .. }) => {
            assert_eq!(code, canopy_client::protocol::ErrorCode::AuthFailed)
        }
        other => panic!("an unmapped certificate: {:?}", other.map(|_| ())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_links_are_mutual_tls_and_a_process_without_a_core_certificate_is_dropped() {
    let dir = certs(&["reader"]);
    impostor(&dir);
    let foreign = certs(&[]);
    let accounts = accounts(&dir, None);
    // After `[core]`'s keys, before its servers' list.
    let extra = format!(
        "\n[auth]\naccounts = {:?}\nhttp_loopback_open = true\n\n{}",
        accounts,
        tls_section(&dir, "core", "")
    );
    let cluster = Cluster::start_with_http(3, &extra);
    let good = || {
        let mut o = options(
            &cluster.addrs[0],
            Some(connector(&dir, Some((&dir, "reader")))),
        );
        o.servers = cluster.addrs.clone();
        o.reconnect_for = Duration::from_secs(10);
        o
    };
    // The core formed over TLS: it orders and delivers.
    let client = within("connect", Client::connect(good()))
        .await
        .expect("connects");
    let mut sub = client.subscribe("md.NASDAQ.>").await.expect("subscribes");
    client.publish("md.NASDAQ.A", "1").await.expect("publishes");
    within("delivery", sub.next()).await.expect("a message");

    let peer = &cluster.peers[0];
    // A well-formed link hello and protocol message (a server that read
    // them would keep the link: no secret is set here).
    let mut speech = common::record(&LinkHello {
        version: canopy_broker::runtime::LINK_VERSION,
        node: 2,
        nonce: None,
    });
    speech.extend(common::heartbeat());
    // Plain TCP on the peer port.
    let mut rogue = tokio::net::TcpStream::connect(peer)
        .await
        .expect("connects");
    let _ = rogue.write_all(&speech).await;
    closed_by_the_server(&mut rogue, 64).await;
    // TLS with certificates of the tree's CA that are not a core
    // server's (a user's, and one for client use that names itself
    // `canopy-core`): admitted by TLS, dropped before their hello.
    for user in ["reader", "impostor"] {
        let user = connector(&dir, Some((&dir, user)));
        let tcp = tokio::net::TcpStream::connect(peer)
            .await
            .expect("connects");
        let mut rogue = user.connect(peer, tcp).await.expect("TLS itself succeeds");
        let _ = rogue.write_all(&speech).await;
        let _ = rogue.flush().await;
        closed_by_the_server(&mut rogue, 64).await;
    }
    // TLS with a core certificate of another CA: the handshake fails.
    let other = connector(&dir, Some((&foreign, "core")));
    let tcp = tokio::net::TcpStream::connect(peer)
        .await
        .expect("connects");
    if let Ok(mut s) = other.connect(peer, tcp).await {
        // TLS 1.3: the client may finish before the server refuses.
        closed_by_the_server(&mut s, 64).await;
    }

    client.publish("md.NASDAQ.A", "2").await.expect("publishes");
    match within("delivery", sub.next()).await {
        Some(Event::Message(m)) => assert_eq!(&m.payload[..], b"2"),
        other => panic!("expected the message, got {other:?}"),
    }
    // Four refused at server 1, none elsewhere; two of them in TLS.
    for (i, links, tls) in [(0, 4, 2), (1, 0, 0), (2, 0, 0)] {
        let http = cluster.servers[i]
            .as_ref()
            .and_then(|s| s.http.clone())
            .expect("HTTP on");
        let line = format!("canopy_peer_links_refused_total {links}");
        common::metric_line(&http, "/metrics", &line).await;
        let line = format!("canopy_tls_handshakes_failed_total {tls}");
        common::metric_line(&http, "/metrics", &line).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_a_checking_subscriber_keeps_its_stream_through_a_relays_death() {
    let dir = certs(&["reader"]);
    let accounts = accounts(&dir, None);
    let head = format!(
        "accounts = {:?}\ntoken = \"demo-tree-token\"\n[tls]\ndir = {:?}\nusers = [\"reader\"]\n",
        accounts, &*dir
    );
    let tree = Tree::start_with(3, &[2], &head);
    let tier = tree.tiers[0].clone();
    let reader_tls = connector(&dir, Some((&dir, "reader")));
    let mut o = options(&tier[0], Some(reader_tls.clone()));
    o.servers = tier.clone();
    o.reconnect_for = Duration::from_secs(10);
    let reader = within("connect", Client::connect(o))
        .await
        .expect("connects");
    let mut sub = reader.subscribe("md.NASDAQ.>").await.expect("subscribes");
    assert!(matches!(
        reader.subscribe("md.>").await,
        Err(Error::Denied(_))
    ));
    // A publisher at the core (the `reader` user may publish NASDAQ) and
    // a raw one that tries NYSE through the other relay: closed.
    let mut o = options(&tree.core[0], Some(reader_tls.clone()));
    o.servers = tree.core.clone();
    o.reconnect_for = Duration::from_secs(10);
    let publisher = within("connect", Client::connect(o))
        .await
        .expect("connects");
    const N: usize = 400;
    let publishing = tokio::spawn(async move {
        for i in 0..N {
            publisher
                .publish(&format!("md.NASDAQ.S{}", i % 7), i.to_string())
                .await
                .expect("publishes");
            if i == N / 2 {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        publisher.flush().await.expect("flushes");
        assert!(matches!(
            publisher.publish("md.NYSE.X", "no").await,
            Err(Error::Denied(_))
        ));
    });
    let mut got = Vec::new();
    let mut killed = false;
    within("every message", async {
        while got.len() < N {
            match sub.next().await {
                Some(Event::Message(m)) => {
                    assert!(m.topic().starts_with("md.NASDAQ."), "leaked {}", m.topic());
                    got.push(String::from_utf8_lossy(&m.payload).into_owned());
                }
                Some(Event::View(_)) => {}
                other => panic!("unexpected {other:?}"),
            }
            if got.len() == N / 4 && !killed {
                tree.kill("relay-1.1");
                killed = true;
            }
        }
    })
    .await;
    publishing.await.expect("the publisher finished");
    let want: Vec<String> = (0..N).map(|i| i.to_string()).collect();
    assert_eq!(
        got, want,
        "every message once, in order, across the adoption"
    );
}
