//! Broker adapters: start or reach a broker, connect publishers and
//! subscribers through each broker's own Rust client.

use anyhow::Context;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Which broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Canopy, one node.
    Canopy,
    /// Canopy, a core of three servers.
    Core,
    /// Canopy, a core of one server: the group's machinery (ordering,
    /// stability, the flush) with no one to replicate to.
    CoreOfOne,
    /// Canopy, one node, every connection TLS.
    Tls,
    /// nats-server.
    Nats,
    /// The bare fan-out server (the ceiling).
    Bare,
}

impl Kind {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Canopy => "canopy",
            Kind::Core => "core3",
            Kind::CoreOfOne => "core1",
            Kind::Tls => "canopy-tls",
            Kind::Nats => "nats",
            Kind::Bare => "bare",
        }
    }
}

/// A broker for one run; stops when dropped.
pub enum Broker {
    /// A server reached at an address the bench did not start.
    External(String),
    /// Canopy on its own runtime threads in this process.
    Canopy(InProcess),
    /// A core of Canopy servers, each on its own runtime threads.
    Core(Vec<InProcess>),
    /// A `nats-server` child process.
    Nats { addr: String, child: Child },
    /// The bare fan-out server.
    Bare(crate::bare::BareServer),
}

impl Broker {
    /// Starts (or names) the broker of `kind`.
    pub fn start(kind: Kind, args: &crate::FanoutArgs, dashboard: bool) -> anyhow::Result<Broker> {
        match (kind, &args.addr, &args.nats_addr) {
            (Kind::Canopy, Some(a), _) | (Kind::Nats, _, Some(a)) => {
                Ok(Broker::External(a.clone()))
            }
            (Kind::Canopy, None, _) => Ok(Broker::Canopy(start_canopy(if dashboard {
                "127.0.0.1:0".into()
            } else {
                "off".into()
            })?)),
            (Kind::Core, _, _) => Ok(Broker::Core(start_core(3)?)),
            (Kind::CoreOfOne, _, _) => Ok(Broker::Core(start_core(1)?)),
            (Kind::Tls, _, _) => Ok(Broker::Canopy(start_in_process(
                canopy_broker::config::FileConfig {
                    listen: Some("127.0.0.1:0".into()),
                    http: Some("off".into()),
                    tls: Some(dev_tls()?.0.clone()),
                    ..Default::default()
                },
            )?)),
            (Kind::Nats, _, None) => start_nats(),
            (Kind::Bare, _, _) => Ok(Broker::Bare(crate::bare::BareServer::start()?)),
        }
    }

    /// The HTTP address of an in-process Canopy started with its dashboard.
    pub fn http(&self) -> Option<&str> {
        match self {
            Broker::Canopy(c) => c.http.as_deref(),
            _ => None,
        }
    }

    /// The addresses client number `i` is given: its home server first,
    /// so that clients spread over a core's servers.
    pub fn addrs(&self, i: usize) -> Vec<String> {
        match self {
            Broker::External(a) | Broker::Nats { addr: a, .. } => vec![a.clone()],
            Broker::Bare(b) => vec![b.addr.clone()],
            Broker::Canopy(c) => vec![c.addr.clone()],
            Broker::Core(servers) => {
                let n = servers.len();
                (0..n).map(|k| servers[(i + k) % n].addr.clone()).collect()
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        match self {
            Broker::External(_) | Broker::Canopy(_) | Broker::Core(_) | Broker::Bare(_) => {}
            Broker::Nats { child, .. } => {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A Canopy server on its own two runtime threads in this process, as it
/// would be as a process. Dropping it shuts it down gracefully;
/// [`InProcess::crash`] stops it as `kill -9` would (its sockets close,
/// nothing is said to anyone).
pub struct InProcess {
    /// The client address.
    pub addr: String,
    /// The HTTP address, when on.
    pub http: Option<String>,
    /// The views it installs (core servers).
    pub views: tokio::sync::watch::Receiver<Option<canopy_broker::runtime::InstalledView>>,
    stop: Option<std::sync::mpsc::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// A core server's data directory, removed once it stopped.
    data_dir: Option<std::path::PathBuf>,
}

impl InProcess {
    /// Stops the server at once: no goodbye to clients or peers.
    pub fn crash(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(d) = &self.data_dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Starts a server with `file` as its configuration.
pub fn start_in_process(file: canopy_broker::config::FileConfig) -> anyhow::Result<InProcess> {
    let data_dir = file.core.as_ref().and(file.data_dir.clone());
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop, stop_rx) = std::sync::mpsc::channel::<bool>();
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
        let crash = rt.block_on(async move {
            let server = match file.validate(rand_stream()) {
                Ok(c) => canopy_broker::runtime::start(c).await,
                Err(e) => Err(e.into()),
            };
            match server {
                Ok(server) => {
                    let http = server.http_addr().map(|a| a.to_string());
                    let _ =
                        addr_tx.send(Ok((server.local_addr().to_string(), http, server.views())));
                    let crash =
                        tokio::task::spawn_blocking(move || stop_rx.recv().unwrap_or(false))
                            .await
                            .unwrap_or(false);
                    if !crash {
                        server.shutdown().await;
                    }
                    crash
                }
                Err(e) => {
                    let _ = addr_tx.send(Err(e));
                    false
                }
            }
        });
        if crash {
            // Every task and socket of the server goes at once.
            rt.shutdown_background();
        }
    });
    let (addr, http, views) = addr_rx.recv().context("canopy server thread died")??;
    Ok(InProcess {
        addr,
        http,
        views,
        stop: Some(stop),
        thread: Some(thread),
        data_dir,
    })
}

fn start_canopy(http: String) -> anyhow::Result<InProcess> {
    start_in_process(canopy_broker::config::FileConfig {
        listen: Some("127.0.0.1:0".into()),
        http: Some(http),
        ..Default::default()
    })
}

/// Starts a core of `n` servers on loopback and waits until all of them
/// have installed one view of all `n`.
pub fn start_core(n: usize) -> anyhow::Result<Vec<InProcess>> {
    start_core_with(n, None, None)
}

/// A core of `n` in-process servers running the built-in `service`, each
/// with `executors` threads for its calls (by default one per CPU).
pub fn start_core_with(
    n: usize,
    service: Option<String>,
    executors: Option<usize>,
) -> anyhow::Result<Vec<InProcess>> {
    use canopy_broker::config::{FileConfig, FileCore, FileCoreServer};
    let mut peers = Vec::new();
    for _ in 0..n {
        peers.push(canopy_broker::launcher::loopback_port()?);
    }
    // A fresh data directory per server and run: each bench core is new.
    let run = format!("canopy-bench-{}-{}", std::process::id(), rand_stream());
    let mut servers = Vec::new();
    for i in 0..n {
        let core = FileCore {
            id: i as u32 + 1,
            heartbeat_interval_ms: Some(50),
            failure_timeout_ms: Some(500),
            servers: peers
                .iter()
                .enumerate()
                .map(|(k, p)| FileCoreServer {
                    id: k as u32 + 1,
                    peer: p.clone(),
                    client: "127.0.0.1:0".into(),
                })
                .collect(),
            service: service.clone(),
            executors,
            secret: None,
        };
        servers.push(start_in_process(FileConfig {
            name: Some(format!("s{}", i + 1)),
            listen: Some("127.0.0.1:0".into()),
            http: Some("off".into()),
            data_dir: Some(std::env::temp_dir().join(format!("{run}-s{}", i + 1))),
            core: Some(core),
            ..Default::default()
        })?);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !servers.iter().all(|s| {
        s.views
            .borrow()
            .as_ref()
            .is_some_and(|v| v.members.len() == n)
    }) {
        anyhow::ensure!(Instant::now() < deadline, "the core did not form a view");
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(servers)
}

fn rand_stream() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

/// A `nats-server` child process on a free loopback port.
pub fn start_nats() -> anyhow::Result<Broker> {
    let port = canopy_broker::launcher::loopback_port()?
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .context("a loopback port")?;
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
    /// The bare fan-out server's client.
    Bare(crate::bare::BarePublisher),
}

/// Development certificates for the TLS runs (made once per bench
/// process, in a temporary folder): the server's `[tls]` and the clients'
/// connector.
fn dev_tls() -> anyhow::Result<&'static (
    canopy_broker::tls::FileTls,
    canopy_client::tls::TlsConnector,
)> {
    static TLS: std::sync::OnceLock<(
        canopy_broker::tls::FileTls,
        canopy_client::tls::TlsConnector,
    )> = std::sync::OnceLock::new();
    if let Some(t) = TLS.get() {
        return Ok(t);
    }
    let dir = std::env::temp_dir().join(format!("canopy-bench-certs-{}", std::process::id()));
    canopy_broker::tls::make_dev_certs(&dir, &[])?;
    let file = canopy_broker::tls::FileTls {
        cert: dir.join("core.pem"),
        key: dir.join("core-key.pem"),
        ca: Some(dir.join("ca.pem")),
        client_certs: None,
        core_name: None,
    };
    let connector = canopy_client::tls::TlsConnector::from_files(&dir.join("ca.pem"), None)?;
    Ok(TLS.get_or_init(|| (file, connector)))
}

/// Canopy's client options for `kind` (TLS for [`Kind::Tls`]).
fn canopy_options(
    kind: Kind,
    addrs: &[String],
    name: &str,
) -> anyhow::Result<canopy_client::ClientOptions> {
    let mut o = canopy_client::ClientOptions::new(addrs.to_vec());
    o.name = name.into();
    if kind == Kind::Tls {
        o.tls = Some(dev_tls()?.1.clone());
    }
    Ok(o)
}

/// The topic every bench message goes to.
pub const TOPIC: &str = "bench.fanout";

impl Publisher {
    /// Connects a publisher to the first of `addrs` (Canopy fails over to
    /// the others).
    pub async fn connect(kind: Kind, addrs: &[String]) -> anyhow::Result<Publisher> {
        Ok(match kind {
            Kind::Canopy | Kind::Core | Kind::CoreOfOne | Kind::Tls => {
                let o = canopy_options(kind, addrs, "bench-pub")?;
                Publisher::Canopy(canopy_client::Client::connect(o).await?)
            }
            Kind::Nats => Publisher::Nats(async_nats::connect(addrs[0].as_str()).await?),
            Kind::Bare => Publisher::Bare(crate::bare::BarePublisher::connect(&addrs[0]).await?),
        })
    }

    /// Sends one message without waiting for more than flow control.
    pub async fn send(&self, payload: Vec<u8>) -> anyhow::Result<()> {
        match self {
            Publisher::Canopy(c) => drop(c.send(TOPIC, payload).await?),
            Publisher::Nats(c) => c.publish(TOPIC, Bytes::from(payload)).await?,
            Publisher::Bare(c) => c.send(&payload).await?,
        }
        Ok(())
    }

    /// Waits until everything sent is accepted: acknowledged (Canopy) or
    /// flushed to and answered by the server (NATS).
    pub async fn flush(&self) -> anyhow::Result<()> {
        match self {
            Publisher::Canopy(c) => c.flush().await?,
            Publisher::Nats(c) => c.flush().await?,
            Publisher::Bare(c) => c.flush().await?,
        }
        Ok(())
    }
}

/// Subscribes one new connection and returns its payload stream and a
/// guard that keeps the connection alive.
pub async fn subscribe(
    kind: Kind,
    addrs: &[String],
) -> anyhow::Result<(BoxStream<'static, Bytes>, Box<dyn Send>)> {
    Ok(match kind {
        Kind::Canopy | Kind::Core | Kind::CoreOfOne | Kind::Tls => {
            let o = canopy_options(kind, addrs, "bench-sub")?;
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
                .connect(addrs[0].as_str())
                .await?;
            let sub = client.subscribe(TOPIC).await?;
            // A round trip makes sure the server has the subscription.
            client.flush().await?;
            (sub.map(|m| m.payload).boxed(), Box::new(client))
        }
        Kind::Bare => (crate::bare::subscribe(&addrs[0]).await?, Box::new(())),
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
