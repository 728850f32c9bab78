//! Writes the seed corpus (`cargo run --bin make_seeds`, from `fuzz/`):
//! well-formed inputs for each target, made with the crates' own encoders.

use bytes::Bytes;
use canopy_client::protocol::{
    encode_client, encode_server, AskHead, ClientFrame, CreditHead, ReleasedHead, DeliverBuilder, Hello, PingHead, PubSeq,
    Publish, PublisherId, Reports, Role, Seq, ServerFrame, SlowPolicy, SubscribeHead,
    PROTOCOL_VERSION,
};
use std::path::Path;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    std::fs::write(dir.join(name), bytes).expect("seed");
}

fn main() {
    let hello = ClientFrame::Hello(Hello {
        version: PROTOCOL_VERSION,
        name: "seed".into(),
        publisher: PublisherId(7),
        subscriptions: vec!["md.>".into(), "a.*.b".into()],
        resume: None,
        slow: SlowPolicy::Conflate,
        role: Role::Client,
        reports: Reports::Full,
        connection: 1,
        weak: false,
        auth: None,
        // Flow control: a window of two, so the session is paused.
        window: Some(2),
    });
    let frames = [
        ("hello", hello),
        (
            "subscribe",
            ClientFrame::Subscribe(SubscribeHead {
                pattern: "md.NASDAQ.*".into(),
            }),
        ),
        (
            "publish",
            ClientFrame::Publish(Publish::new("md.x", PubSeq(1), Bytes::from_static(b"p"))),
        ),
        (
            "publish2",
            ClientFrame::Publish(Publish::new("md.y", PubSeq(2), Bytes::from_static(b"q"))),
        ),
        (
            "publish3",
            ClientFrame::Publish(Publish::new("md.x", PubSeq(3), Bytes::from_static(b"r"))),
        ),
        ("credit", ClientFrame::Credit(CreditHead { msgs: 1 })),
        (
            "released",
            ClientFrame::Released(ReleasedHead {
                publisher: PublisherId(7),
            }),
        ),
        (
            "unsubscribe",
            ClientFrame::Unsubscribe(SubscribeHead {
                pattern: "md.>".into(),
            }),
        ),
        (
            "call",
            ClientFrame::Publish(Publish::new(
                "$canopy.call.get",
                PubSeq(4),
                Bytes::from_static(b"k"),
            )),
        ),
        (
            "ask",
            ClientFrame::Ask(AskHead {
                pub_seq: PubSeq(4),
                publisher: None,
            }),
        ),
        ("ping", ClientFrame::Ping(PingHead { nonce: 1 })),
    ];
    // A session: each frame as [session | length (u16 BE)] then content.
    let mut session = Vec::new();
    for (name, f) in &frames {
        let bytes = encode_client(f);
        write("client_frame", name, &bytes[4..]);
        session.push(0u8);
        session.extend_from_slice(&u16::try_from(bytes.len() - 4).unwrap_or(0).to_be_bytes());
        session.extend_from_slice(&bytes[4..]);
    }
    write("node_session", "session", &session);
    let mut b = DeliverBuilder::default();
    b.push(Seq(1), PublisherId(1), PubSeq(1), "md.x", b"one");
    b.push(Seq(2), PublisherId(1), PubSeq(2), "md.y", b"two");
    let deliver = b.finish_with(Some(42), None);
    write("server_frame", "deliver", &deliver[4..]);
    let ping = encode_server(&ServerFrame::Ping(PingHead { nonce: 3 }));
    write("server_frame", "ping", &ping[4..]);
    peer_seeds();
    write("text_inputs", "patterns", b"md.>\nmd.NASDAQ.*");
    write(
        "text_inputs",
        "accounts",
        b"[[user]]\nname = \"a\"\ntokens = [\"sha256:00\"]\nsubscribe = [\"md.>\"]\n",
    );
    write(
        "text_inputs",
        "config",
        b"name = \"n\"\n[limits]\nframe_len_max = 65536\n[core]\nid = 1\n[[core.servers]]\nid = 1\npeer = \"127.0.0.1:1\"\nclient = \"127.0.0.1:2\"\n",
    );
}

/// A binary `Order` and `Submit` (two topics, one repeated) and a CBOR
/// `Ack`, as core servers send them.
fn peer_seeds() {
    use canopy_broker::core::group::{wire, Msg, NodeId, PeerMsg, Submitted, ViewId};
    let view = ViewId {
        epoch: 2,
        coordinator: NodeId(1),
    };
    let msgs = vec![
        Msg(PublisherId(1), PubSeq(1), "md.x".into(), Bytes::from_static(b"one")),
        Msg(PublisherId(1), PubSeq(2), "md.x".into(), Bytes::from_static(b"two")),
        Msg(PublisherId(2), PubSeq(1), "md.y".into(), Bytes::new()),
    ];
    let order = PeerMsg::Order {
        view,
        first: Seq(5),
        msgs: msgs.clone(),
        stable: Seq(4),
    };
    let submit = PeerMsg::Submit {
        view,
        front: 1,
        first: 1,
        msgs: msgs.into_iter().map(|m| Submitted(PubSeq(0), m)).collect(),
    };
    let ack = PeerMsg::Ack { view, have: Seq(7) };
    for (name, m) in [("order", order), ("submit", submit), ("ack", ack)] {
        write("peer_msg", name, &wire::encode(&m)[4..]);
    }
}
