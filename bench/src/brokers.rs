//! Broker adapters: start or reach a broker, connect publishers and
//! subscribers through each broker's own Rust client.

use anyhow::Context;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Which broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Canopy.
    Canopy,
    /// nats-server.
    Nats,
}

impl Kind {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Canopy => "canopy",
            Kind::Nats => "nats",
        }
    }
}

/// A broker for one run; stops when dropped.
pub enum Broker {
    /// A server reached at an address the bench did not start.
    External(String),
    /// Canopy on its own runtime threads in this process.
    Canopy {
        addr: String,
        http: Option<String>,
        stop: Option<std::sync::mpsc::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
    },
    /// A `nats-server` child process.
    Nats { addr: String, child: Child },
}

impl Broker {
    /// Starts (or names) the broker of `kind`.
    pub fn start(kind: Kind, args: &crate::FanoutArgs, dashboard: bool) -> anyhow::Result<Broker> {
        match (kind, &args.addr, &args.nats_addr) {
            (Kind::Canopy, Some(a), _) | (Kind::Nats, _, Some(a)) => {
                Ok(Broker::External(a.clone()))
            }
            (Kind::Canopy, None, _) => start_canopy(if dashboard {
                "127.0.0.1:0".into()
            } else {
                "off".into()
            }),
            (Kind::Nats, _, None) => start_nats(),
        }
    }

    /// The HTTP address of an in-process Canopy started with its dashboard.
    pub fn http(&self) -> Option<&str> {
        match self {
            Broker::Canopy { http, .. } => http.as_deref(),
            _ => None,
        }
    }

    /// The client address.
    pub fn addr(&self) -> &str {
        match self {
            Broker::External(a) | Broker::Canopy { addr: a, .. } | Broker::Nats { addr: a, .. } => {
                a
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        match self {
            Broker::External(_) => {}
            Broker::Canopy { stop, thread, .. } => {
                drop(stop.take());
                if let Some(t) = thread.take() {
                    let _ = t.join();
                }
            }
            Broker::Nats { child, .. } => {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Canopy gets its own two runtime threads, as it would as a process.
fn start_canopy(http: String) -> anyhow::Result<Broker> {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop, stop_rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("canopy-broker")
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = addr_tx.send(Err(anyhow::anyhow!(e)));
                return;
            }
        };
        rt.block_on(async move {
            let config = canopy_broker::config::FileConfig {
                listen: Some("127.0.0.1:0".into()),
                http: Some(http),
                ..Default::default()
            }
            .validate(rand_stream());
            let server = match config {
                Ok(c) => canopy_broker::runtime::start(c).await,
                Err(e) => Err(e.into()),
            };
            match server {
                Ok(server) => {
                    let http = server.http_addr().map(|a| a.to_string());
                    let _ = addr_tx.send(Ok((server.local_addr().to_string(), http)));
                    let _ = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
                    server.shutdown().await;
                }
                Err(e) => {
                    let _ = addr_tx.send(Err(e));
                }
            }
        });
    });
    let (addr, http) = addr_rx.recv().context("canopy server thread died")??;
    Ok(Broker::Canopy {
        addr,
        http,
        stop: Some(stop),
        thread: Some(thread),
    })
}

fn rand_stream() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

fn start_nats() -> anyhow::Result<Broker> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context(
            "cannot start nats-server (install Debian's nats-server package, or pass --nats-addr)",
        )?;
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&addr).is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "nats-server did not start listening on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Broker::Nats { addr, child })
}

/// A publishing connection.
pub enum Publisher {
    /// Canopy's SDK.
    Canopy(canopy_client::Client),
    /// async-nats.
    Nats(async_nats::Client),
}

/// The topic every bench message goes to.
pub const TOPIC: &str = "bench.fanout";

impl Publisher {
    /// Connects a publisher.
    pub async fn connect(kind: Kind, addr: &str) -> anyhow::Result<Publisher> {
        Ok(match kind {
            Kind::Canopy => {
                let mut o = canopy_client::ClientOptions::new([addr]);
                o.name = "bench-pub".into();
                Publisher::Canopy(canopy_client::Client::connect(o).await?)
            }
            Kind::Nats => Publisher::Nats(async_nats::connect(addr).await?),
        })
    }

    /// Sends one message without waiting for more than flow control.
    pub async fn send(&self, payload: Vec<u8>) -> anyhow::Result<()> {
        match self {
            Publisher::Canopy(c) => drop(c.send(TOPIC, payload).await?),
            Publisher::Nats(c) => c.publish(TOPIC, Bytes::from(payload)).await?,
        }
        Ok(())
    }

    /// Waits until everything sent is accepted: acknowledged (Canopy) or
    /// flushed to and answered by the server (NATS).
    pub async fn flush(&self) -> anyhow::Result<()> {
        match self {
            Publisher::Canopy(c) => c.flush().await?,
            Publisher::Nats(c) => c.flush().await?,
        }
        Ok(())
    }
}

/// Subscribes one new connection and returns its payload stream and a
/// guard that keeps the connection alive.
pub async fn subscribe(
    kind: Kind,
    addr: &str,
) -> anyhow::Result<(BoxStream<'static, Bytes>, Box<dyn Send>)> {
    Ok(match kind {
        Kind::Canopy => {
            let mut o = canopy_client::ClientOptions::new([addr]);
            o.name = "bench-sub".into();
            let client = canopy_client::Client::connect(o).await?;
            let sub = client.subscribe(TOPIC).await?;
            let stream = sub
                .filter_map(|e| async move {
                    match e {
                        canopy_client::Event::Message(m) => Some(m.payload),
                        _ => None,
                    }
                })
                .boxed();
            (stream, Box::new(client))
        }
        Kind::Nats => {
            let client = async_nats::ConnectOptions::new()
                .subscription_capacity(1 << 16)
                .connect(addr)
                .await?;
            let sub = client.subscribe(TOPIC).await?;
            // A round trip makes sure the server has the subscription.
            client.flush().await?;
            (sub.map(|m| m.payload).boxed(), Box::new(client))
        }
    })
}

/// Keeps a dashboard open against `http` until aborted: one live stream
/// (`/api/stream`, read as it comes) and one scrape of `/metrics` and
/// `/api/snapshot` per second, as a browser and a Prometheus server would.
pub async fn watch_dashboard(http: String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn get(http: &str, path: &str) -> std::io::Result<tokio::net::TcpStream> {
        let mut s = tokio::net::TcpStream::connect(http).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {http}\r\n\r\n").as_bytes())
            .await?;
        Ok(s)
    }
    let live = {
        let http = http.clone();
        tokio::spawn(async move {
            let Ok(mut s) = get(&http, "/api/stream").await else {
                return;
            };
            let mut buf = vec![0u8; 64 << 10];
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
        })
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        for path in ["/metrics", "/api/snapshot"] {
            if let Ok(mut s) = get(&http, path).await {
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
            }
        }
        if live.is_finished() {
            break;
        }
    }
}
