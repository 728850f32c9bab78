//! A scripted server's side of a connection, for the SDK's tests against
//! loopback.

use canopy_client::protocol::{self, ClientFrame, PubSeq, Seq, ServerFrame, Welcome};
use futures::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// The longest any step of a test waits.
pub const TIME_MAX: Duration = Duration::from_secs(10);

/// A connection, framed as the protocol frames it.
pub type Conn = Framed<TcpStream, LengthDelimitedCodec>;

/// The next client to connect.
pub async fn accept(listener: &TcpListener) -> Conn {
    let (socket, _) = listener.accept().await.expect("accept");
    Framed::new(socket, LengthDelimitedCodec::new())
}

/// The client's next frame.
pub async fn read(conn: &mut Conn) -> ClientFrame {
    let content = conn.next().await.expect("a frame").expect("readable");
    protocol::decode_client(content.freeze()).expect("a valid client frame")
}

/// Sends `frame` to the client.
pub async fn send(conn: &mut Conn, frame: &ServerFrame) {
    // `encode_server` includes the length prefix the codec adds again.
    let bytes = protocol::encode_server(frame).slice(4..);
    conn.send(bytes).await.expect("send");
}

/// A Welcome of stream `stream` at `head` with running hash `hash`.
pub fn welcome(stream: u64, head: u64, hash: u64) -> ServerFrame {
    ServerFrame::Welcome(Welcome {
        version: protocol::PROTOCOL_VERSION,
        server: "scripted".into(),
        session: 1,
        stream,
        head: Seq(head),
        pub_acked: PubSeq(0),
        frame_len_max: 1 << 20,
        servers: Vec::new(),
        hash,
        permissions: None,
    })
}
