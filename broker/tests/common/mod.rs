//! Helpers for integration tests: a real `canopy serve` process, a TCP proxy
//! that can cut connections, and a raw protocol client for misbehaving.
#![allow(dead_code)]

use bytes::Bytes;
use canopy_broker::launcher::loopback_port;
use canopy_client::protocol::{self, ClientFrame, Hello, PublisherId, ServerFrame, SlowPolicy};
use canopy_client::{Client, ClientOptions, Event, Subscription};
use futures::StreamExt;
use std::collections::HashMap;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

/// The bound on every wait in these tests.
pub const WAIT: Duration = Duration::from_secs(20);

/// Awaits `f` or panics naming `what` after [`WAIT`].
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// A `canopy serve` child process on a loopback port; killed on drop.
pub struct Server {
    child: Child,
    /// The client address.
    pub addr: String,
    /// The HTTP address (dashboard, API, metrics), when started with it.
    pub http: Option<String>,
    config: Option<PathBuf>,
    /// A data directory this server owns, removed on drop.
    data: Option<PathBuf>,
}

static CONFIGS: AtomicU64 = AtomicU64::new(0);

/// A loopback address on a port the system picks.
const LISTEN_ANY: &str = "127.0.0.1:0";

/// A free loopback address for a server to bind, outside the ephemeral
/// port range (see [`loopback_port`]).
pub fn free_port() -> String {
    loopback_port().expect("a free loopback port")
}

/// A fresh data directory path under the system's temp folder, unique per
/// test process and call (not created: a core server creates it).
pub fn data_dir() -> PathBuf {
    std::env::temp_dir().join(format!(
        "canopy-test-data-{}-{}",
        std::process::id(),
        CONFIGS.fetch_add(1, Ordering::Relaxed)
    ))
}

impl Server {
    /// Starts a server with embedded defaults.
    pub fn start() -> Server {
        Self::with_config("")
    }

    /// Starts a server with `toml` as its config file, HTTP off. A core
    /// server gets a fresh data directory of its own (unless `toml` names
    /// one), removed when it is dropped.
    pub fn with_config(toml: &str) -> Server {
        let data = data_dir();
        let mut server = Self::spawn(toml, LISTEN_ANY, "off", Some(&data));
        server.data = Some(data);
        server
    }

    /// Starts a server with `toml` as its config file, HTTP off, keeping
    /// its data in `data`, which outlives it: a server started again with
    /// the same directory recovers its hard state.
    pub fn with_config_in(toml: &str, data: &Path) -> Server {
        Self::spawn(toml, LISTEN_ANY, "off", Some(data))
    }

    /// As [`Server::with_config_in`], with clients on `listen` rather than
    /// on a port the system picks.
    pub fn listening_in(toml: &str, listen: &str, data: &Path) -> Server {
        Self::spawn(toml, listen, "off", Some(data))
    }

    /// As [`Server::listening_in`], with HTTP on a free port.
    pub fn listening_with_http_in(toml: &str, listen: &str, data: &Path) -> Server {
        Self::spawn(toml, listen, "127.0.0.1:0", Some(data))
    }

    /// As [`Server::with_config`], with HTTP on a free port.
    pub fn with_config_and_http(toml: &str) -> Server {
        let data = data_dir();
        let mut server = Self::spawn(toml, LISTEN_ANY, "127.0.0.1:0", Some(&data));
        server.data = Some(data);
        server
    }

    /// Starts a server with embedded defaults and HTTP on a free port.
    pub fn with_http() -> Server {
        Self::spawn("", LISTEN_ANY, "127.0.0.1:0", None)
    }

    fn spawn(toml: &str, listen: &str, http: &str, data: Option<&Path>) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_canopy"));
        cmd.args(["serve", "--listen", listen, "--http", http]);
        // A top-level key goes before the first table; servers outside a
        // core ignore it.
        let names_data = toml.lines().any(|l| l.trim_start().starts_with("data_dir"));
        let toml = match data {
            Some(dir) if !toml.is_empty() && !names_data => {
                let dir = toml::Value::String(dir.display().to_string());
                format!("data_dir = {dir}\n{toml}")
            }
            _ => toml.to_owned(),
        };
        let config = (!toml.is_empty()).then(|| {
            let path = std::env::temp_dir().join(format!(
                "canopy-test-{}-{}.toml",
                std::process::id(),
                CONFIGS.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, &toml).expect("write config");
            path
        });
        if let Some(p) = &config {
            cmd.arg("--config").arg(p);
        }
        // CANOPY_TEST_LOGS=DIR keeps each server's log there (with RUST_LOG).
        let stderr = match std::env::var_os("CANOPY_TEST_LOGS") {
            Some(dir) => {
                let path = std::path::Path::new(&dir).join(format!(
                    "server-{}-{}.log",
                    std::process::id(),
                    CONFIGS.fetch_add(1, Ordering::Relaxed)
                ));
                Stdio::from(std::fs::File::create(path).expect("create server log"))
            }
            None => Stdio::null(),
        };
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start canopy serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read listen line");
        let addr = line
            .trim()
            .strip_prefix("canopy listening on ")
            .unwrap_or_else(|| panic!("unexpected first line from canopy serve: {line:?}"))
            .to_owned();
        let http = (http != "off").then(|| {
            let mut line = String::new();
            stdout.read_line(&mut line).expect("read dashboard line");
            line.trim()
                .strip_prefix("canopy dashboard on http://")
                .and_then(|a| a.strip_suffix('/'))
                .unwrap_or_else(|| panic!("unexpected second line from canopy serve: {line:?}"))
                .to_owned()
        });
        Server {
            child,
            addr,
            http,
            config,
            data: None,
        }
    }

    /// The server's resident memory now, in KiB (Linux `VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the server's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// Options for an SDK client of this server.
    pub fn options(&self) -> ClientOptions {
        ClientOptions::new([self.addr.clone()])
    }

    /// An SDK client of this server.
    pub async fn client(&self) -> Client {
        within("client connect", Client::connect(self.options()))
            .await
            .expect("client connects")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(p) = &self.config {
            let _ = std::fs::remove_file(p);
        }
        if let Some(d) = &self.data {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// A TCP proxy in front of a server whose connections the test can cut.
pub struct Proxy {
    /// The address clients connect to.
    pub addr: String,
    generation: Arc<AtomicU64>,
    refusing: Arc<AtomicBool>,
    live: Arc<AtomicU64>,
    /// While set, bytes are read and dropped: connections stay open and
    /// carry nothing (lost packets, not a broken link).
    silent: Arc<AtomicBool>,
}

/// Copies `from` to `to` until either ends, dropping what passes while
/// `silent` is set.
async fn pipe(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    silent: &AtomicBool,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !silent.load(Ordering::SeqCst) && to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    /// Starts a proxy to `upstream`.
    pub async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr").to_string();
        let generation = Arc::new(AtomicU64::new(0));
        let refusing = Arc::new(AtomicBool::new(false));
        let live = Arc::new(AtomicU64::new(0));
        let silent = Arc::new(AtomicBool::new(false));
        let (g, r, l, q, up) = (
            generation.clone(),
            refusing.clone(),
            live.clone(),
            silent.clone(),
            upstream.to_owned(),
        );
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                if r.load(Ordering::SeqCst) {
                    drop(down);
                    continue;
                }
                let Ok(upstream) = TcpStream::connect(&up).await else {
                    continue;
                };
                let born = g.load(Ordering::SeqCst);
                let g = g.clone();
                let l = l.clone();
                let q = q.clone();
                l.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut dr, mut dw) = down.into_split();
                    let (mut ur, mut uw) = upstream.into_split();
                    let cut = async {
                        while g.load(Ordering::SeqCst) == born {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    };
                    tokio::select! {
                        _ = pipe(&mut dr, &mut uw, &q) => {}
                        _ = pipe(&mut ur, &mut dw, &q) => {}
                        _ = cut => {}
                    }
                    let _ = dw.shutdown().await;
                    let _ = uw.shutdown().await;
                    drop((dr, dw, ur, uw));
                    l.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Proxy {
            addr,
            generation,
            refusing,
            live,
            silent,
        }
    }

    /// An SDK client that reaches the server through this proxy.
    pub async fn client(&self) -> Client {
        within(
            "client connect",
            Client::connect(ClientOptions::new([self.addr.clone()])),
        )
        .await
        .expect("client connects through the proxy")
    }

    /// Breaks every connection open now and waits until they are closed,
    /// so that nothing sent after this call passes the proxy.
    pub async fn cut(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        within("proxy connections to close", async {
            while self.live.load(Ordering::SeqCst) > 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
    }

    /// Drops everything both ways while `on`, with connections left open.
    pub fn silence(&self, on: bool) {
        self.silent.store(on, Ordering::SeqCst);
    }

    /// Refuses (closes at once) new connections while `on`.
    pub fn refuse(&self, on: bool) {
        self.refusing.store(on, Ordering::SeqCst);
    }
}

/// A raw protocol connection, for sending what the SDK never would.
pub struct Raw {
    /// How the connection ended, once it did.
    pub ended: Option<String>,
    write: tokio::net::tcp::OwnedWriteHalf,
    frames: FramedRead<tokio::net::tcp::OwnedReadHalf, LengthDelimitedCodec>,
    /// Bytes of the frames read so far, length prefixes included.
    pub bytes_read: u64,
}

impl Raw {
    /// Connects to `addr`.
    pub async fn connect(addr: &str) -> Raw {
        Self::from_stream(
            within("raw connect", TcpStream::connect(addr))
                .await
                .expect("connects"),
        )
    }

    /// Connects with a small receive buffer, so that not reading backs up fast.
    pub async fn connect_small(addr: &str) -> Raw {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("recv buffer");
        let stream = within(
            "raw connect",
            socket.connect(addr.parse().expect("socket addr")),
        )
        .await
        .expect("connects");
        Self::from_stream(stream)
    }

    fn from_stream(stream: TcpStream) -> Raw {
        let (read, write) = stream.into_split();
        let codec = LengthDelimitedCodec::builder()
            .max_frame_length(64 << 20)
            .new_codec();
        Raw {
            ended: None,
            write,
            frames: FramedRead::new(read, codec),
            bytes_read: 0,
        }
    }

    /// Sends raw bytes.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.write.write_all(bytes).await.expect("write");
    }

    /// Sends a well-formed frame.
    pub async fn send(&mut self, frame: ClientFrame) {
        let bytes = protocol::encode_client(&frame);
        self.send_bytes(&bytes).await;
    }

    /// Sends a valid Hello and returns the Welcome.
    pub async fn hello(
        &mut self,
        publisher: u64,
        subscriptions: &[&str],
        slow: SlowPolicy,
    ) -> protocol::Welcome {
        self.send(ClientFrame::Hello(hello(publisher, subscriptions, slow)))
            .await;
        match self.next().await {
            Some(ServerFrame::Welcome(w)) => w,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    /// The next frame, or `None` once the server closed the connection.
    pub async fn next(&mut self) -> Option<ServerFrame> {
        match within("a frame from the server", self.frames.next()).await {
            Some(Ok(content)) => {
                self.bytes_read += 4 + content.len() as u64;
                Some(protocol::decode_server(content.freeze()).expect("server frames decode"))
            }
            Some(Err(e)) => {
                self.ended = Some(format!("read error: {e}"));
                None
            }
            None => {
                self.ended = Some("end of stream".into());
                None
            }
        }
    }

    /// Reads until an Error frame and then the close; returns the error.
    pub async fn expect_error_and_close(&mut self) -> protocol::ErrorFrame {
        loop {
            match self.next().await {
                Some(ServerFrame::Error(e)) => {
                    assert_eq!(
                        self.next().await,
                        None,
                        "connection closes after the error frame"
                    );
                    return e;
                }
                Some(_) => continue,
                None => panic!("connection closed without an error frame: {:?}", self.ended),
            }
        }
    }
}

/// A Hello frame.
pub fn hello(publisher: u64, subscriptions: &[&str], slow: SlowPolicy) -> Hello {
    Hello {
        weak: false,
        auth: None,
        window: None,
        version: protocol::PROTOCOL_VERSION,
        name: "raw".into(),
        publisher: PublisherId(publisher),
        subscriptions: subscriptions.iter().map(|s| (*s).to_owned()).collect(),
        resume: None,
        slow,
        role: protocol::Role::Client,
        reports: protocol::Reports::Servers,
        connection: 1,
    }
}

/// A publish frame.
pub fn publish(topic: &str, pub_seq: u64, payload: &'static [u8]) -> ClientFrame {
    ClientFrame::Publish(protocol::Publish::new(
        topic,
        protocol::PubSeq(pub_seq),
        Bytes::from_static(payload),
    ))
}

/// Collects the next `n` messages of `sub`, failing on gaps.
pub async fn take_messages(sub: &mut Subscription, n: usize) -> Vec<canopy_client::Message> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match within("messages", sub.next()).await {
            Some(Event::Message(m)) => out.push(m),
            other => panic!(
                "expected a message, got {other:?} after {} of {n}",
                out.len()
            ),
        }
    }
    out
}

/// A core of `canopy serve` processes on loopback, each with its own
/// config naming the others' server-to-server addresses, and its own fresh
/// data directory, which outlives the process (so a restart recovers the
/// hard state) and goes when the cluster is dropped.
pub struct Cluster {
    /// The servers, by index (`None` once killed).
    pub servers: Vec<Option<Server>>,
    /// Their client addresses, by index (a restart moves one, unless the
    /// ports are fixed).
    pub addrs: Vec<String>,
    /// Their server-to-server addresses, by index.
    pub peers: Vec<String>,
    /// Where each listens for clients (port 0 unless fixed).
    listens: Vec<String>,
    configs: Vec<String>,
    data: Vec<PathBuf>,
}

impl Cluster {
    /// Starts `n` servers with ids 1..=n; `extra` is appended to each
    /// server's `[core]` section.
    pub fn start(n: usize, extra: &str) -> Cluster {
        Self::launch(n, extra, vec![LISTEN_ANY.to_owned(); n], false)
    }

    /// As [`Cluster::start`], each server with HTTP on a free port.
    pub fn start_with_http(n: usize, extra: &str) -> Cluster {
        Self::launch(n, extra, vec![LISTEN_ANY.to_owned(); n], true)
    }

    /// As [`Cluster::start`], each server on a client port fixed for the
    /// cluster's life: a restarted server keeps its address, and the
    /// servers tell clients the core's addresses (they are all known), so
    /// SDK clients find a server that was restarted, even once all were.
    pub fn start_on_fixed_ports(n: usize, extra: &str) -> Cluster {
        Self::launch(n, extra, (0..n).map(|_| free_port()).collect(), false)
    }

    fn launch(n: usize, extra: &str, listens: Vec<String>, http: bool) -> Cluster {
        // Free ports for the server-to-server links, reserved by binding
        // and released just before the servers bind them.
        let peers: Vec<String> = (0..n).map(|_| free_port()).collect();
        let mut list = String::new();
        for (i, (p, c)) in peers.iter().zip(&listens).enumerate() {
            list.push_str(&format!(
                "[[core.servers]]\nid = {}\npeer = \"{p}\"\nclient = \"{c}\"\n",
                i + 1
            ));
        }
        let configs: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    "name = \"s{}\"\n[core]\nid = {}\nheartbeat_interval_ms = 50\nfailure_timeout_ms = 500\n{extra}\n{list}",
                    i + 1,
                    i + 1
                )
            })
            .collect();
        let data: Vec<PathBuf> = (0..n).map(|_| data_dir()).collect();
        let servers: Vec<Option<Server>> = (0..n)
            .map(|i| {
                Some(match http {
                    true => Server::listening_with_http_in(&configs[i], &listens[i], &data[i]),
                    false => Server::listening_in(&configs[i], &listens[i], &data[i]),
                })
            })
            .collect();
        let addrs = servers.iter().flatten().map(|s| s.addr.clone()).collect();
        Cluster {
            servers,
            addrs,
            peers,
            listens,
            configs,
            data,
        }
    }

    /// Starts server `i` again (after [`Cluster::kill`]) with its config and
    /// data directory: it recovers its hard state and runs as a new
    /// incarnation; its client address changes unless the cluster was
    /// started on fixed ports.
    pub fn restart(&mut self, i: usize) {
        assert!(self.servers[i].is_none(), "server {i} is still running");
        let s = Server::listening_in(&self.configs[i], &self.listens[i], &self.data[i]);
        self.addrs[i] = s.addr.clone();
        self.servers[i] = Some(s);
    }

    /// Server `i`'s data directory.
    pub fn data_dir(&self, i: usize) -> &Path {
        &self.data[i]
    }

    /// Removes killed server `i`'s data directory, as a lost disk would:
    /// restarted, it joins as a new server.
    pub fn wipe(&mut self, i: usize) {
        assert!(self.servers[i].is_none(), "server {i} is still running");
        match std::fs::remove_dir_all(&self.data[i]) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("remove {}: {e}", self.data[i].display()),
        }
    }

    /// The client addresses starting with server `first`, then the others.
    pub fn addrs_from(&self, first: usize) -> Vec<String> {
        let n = self.addrs.len();
        (0..n)
            .map(|k| self.addrs[(first + k) % n].clone())
            .collect()
    }

    /// Kills server `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        self.servers[i] = None;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The processes first: none may write while its directory goes.
        self.servers.clear();
        for d in &self.data {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Awaits `f` or panics naming `what` after `limit`.
pub async fn within_for<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// A whole tree started by `canopy up` (one process per server and relay)
/// on free loopback ports; every process is killed on drop.
pub struct Tree {
    launcher: Child,
    /// Client addresses of the core servers, by id - 1.
    pub core: Vec<String>,
    /// Client addresses of each relay tier's relays, top tier first.
    pub tiers: Vec<Vec<String>>,
    /// Process ids by name (`core-1`, `relay-2.1`, ...).
    pids: HashMap<String, u32>,
    file: std::path::PathBuf,
}

impl Tree {
    /// Starts `core` core servers and tiers of `tiers[i]` relays.
    pub fn start(core: usize, tiers: &[usize]) -> Tree {
        Self::start_with(core, tiers, "")
    }

    /// Starts a tree as [`Tree::start`] does, with `head` (TOML keys such
    /// as `service = "kv"`) at the top of its tree file.
    pub fn start_with(core: usize, tiers: &[usize], head: &str) -> Tree {
        let free = free_port;
        let mut text = format!("heartbeat_interval_ms = 50\nfailure_timeout_ms = 500\n{head}\n");
        for _ in 0..core {
            text.push_str(&format!(
                "[[core]]\nclient = \"{}\"\npeer = \"{}\"\n",
                free(),
                free()
            ));
        }
        for &n in tiers {
            text.push_str("[[tiers]]\nrelays = [\n");
            for _ in 0..n {
                text.push_str(&format!("  {{ listen = \"{}\" }},\n", free()));
            }
            text.push_str("]\n");
        }
        let file = std::env::temp_dir().join(format!(
            "canopy-tree-{}-{}.toml",
            std::process::id(),
            CONFIGS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&file, &text).expect("write tree file");
        let mut launcher = Command::new(env!("CARGO_BIN_EXE_canopy"))
            .arg("up")
            .arg(&file)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start canopy up");
        let stdout = launcher.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut pids = HashMap::new();
        let mut addrs = HashMap::new();
        for line in lines.by_ref() {
            let line = line.expect("launcher output");
            if line.starts_with("canopy up: tree ready") {
                break;
            }
            // "canopy up: NAME pid PID listening on ADDR"
            let words: Vec<&str> = line.split_whitespace().collect();
            if let ["canopy", "up:", name, "pid", pid, "listening", "on", addr] = words[..] {
                pids.insert(name.to_owned(), pid.parse().expect("pid"));
                addrs.insert(name.to_owned(), addr.to_owned());
            }
        }
        std::thread::spawn(move || for _ in lines {});
        let core = (1..=core)
            .map(|i| addrs[&format!("core-{i}")].clone())
            .collect();
        let tiers = tiers
            .iter()
            .enumerate()
            .map(|(t, &n)| {
                (1..=n)
                    .map(|i| addrs[&format!("relay-{}.{i}", t + 1)].clone())
                    .collect()
            })
            .collect();
        Tree {
            launcher,
            core,
            tiers,
            pids,
            file,
        }
    }

    /// Kills process `name` with SIGKILL.
    pub fn kill(&self, name: &str) {
        let pid = self.pids[name];
        let status = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -9 {name} ({pid})");
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        for pid in self.pids.values() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        // Killed, the launcher cannot remove its folder (configs and the
        // core servers' data directories, `canopy-up-PID-0`): done here.
        let folder = std::env::temp_dir().join(format!("canopy-up-{}-0", self.launcher.id()));
        let _ = self.launcher.kill();
        let _ = self.launcher.wait();
        let _ = std::fs::remove_file(&self.file);
        let _ = std::fs::remove_dir_all(folder);
    }
}

/// A minimal HTTP GET: reads the headers, then `Content-Length` bytes or,
/// without one, to the end (Chromium's DevTools server keeps connections open).
pub async fn http_get(addr: &str, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = s.read(&mut chunk).await.expect("read");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            });
            match length {
                Some(len) if body.len() >= len => return body[..len].to_owned(),
                None if n == 0 => return body.to_owned(),
                _ => {}
            }
        }
        if n == 0 {
            return String::new();
        }
    }
}

/// Waits until `GET path` on `http` has the line `line` (a node's metrics
/// are a snapshot it takes every so often).
pub async fn metric_line(http: &str, path: &str, line: &str) {
    within(line, async {
        loop {
            if http_get(http, path).await.lines().any(|l| l == line) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// A raw frame: length prefix, kind byte, then `content` as given.
pub fn frame(kind: u8, content: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(content.len() + 5);
    b.extend_from_slice(&(content.len() as u32 + 1).to_be_bytes());
    b.push(kind);
    b.extend_from_slice(content);
    b
}

/// A link hello as a server writes it (the peer protocol's first frame).
#[derive(serde::Serialize, serde::Deserialize, Debug)]
pub struct LinkHello {
    pub version: u32,
    pub node: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<Bytes>,
}

/// A well-formed protocol message: a heartbeat from "server 2".
pub fn heartbeat() -> Vec<u8> {
    use canopy_broker::core::group::{wire, Incarnation, Member, NodeId, PeerMsg};
    use canopy_broker::core::mbrship::wire::Heartbeat;
    let hb = PeerMsg::Heartbeat(Heartbeat {
        from: Member {
            node: NodeId(2),
            incarnation: Incarnation(u64::MAX / 2),
        },
        joining: true,
        view: None,
        epoch: 0,
        have: canopy_client::Seq(0),
        stable: canopy_client::Seq(0),
        hears: vec![NodeId(1), NodeId(2), NodeId(3)],
    });
    let body = wire::encode(&hb);
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// A CBOR record, length-prefixed (a peer link's handshake frame).
pub fn record<T: serde::Serialize>(record: &T) -> Vec<u8> {
    let mut body = Vec::new();
    ciborium::into_writer(record, &mut body).expect("encodes");
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

/// Waits until the other end closes `stream`; fails if it sends more than
/// `allowed` bytes first (a TLS alert, say).
pub async fn closed_by_the_server<S: AsyncReadExt + Unpin>(stream: &mut S, allowed: usize) {
    let mut seen = 0;
    let mut buf = [0u8; 4096];
    within("the server closes the connection", async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    seen += n;
                    assert!(seen <= allowed, "the server sent {seen} bytes to a rogue");
                }
            }
        }
    })
    .await;
}

impl Raw {
    /// Reads until every seq through `n` is accounted for by a delivery
    /// or a gap notice, each right after what came before (a conflating
    /// session's stream); returns the number of gap notices.
    pub async fn covered_through(&mut self, n: u64) -> usize {
        let (mut covered, mut gaps) = (0u64, 0);
        while covered < n {
            match self.next().await {
                Some(ServerFrame::Deliver(head, _)) => {
                    for e in head.msgs {
                        assert_eq!(
                            e.0 .0,
                            covered + 1,
                            "deliveries go on after what was covered"
                        );
                        covered = e.0 .0;
                    }
                }
                Some(ServerFrame::Gap(g)) => {
                    assert_eq!(g.from.0, covered + 1, "a gap starts after what was covered");
                    covered = g.to.0;
                    gaps += 1;
                }
                Some(ServerFrame::Watermark(_)) => {}
                other => panic!("unexpected {other:?} at {covered}"),
            }
        }
        gaps
    }
}
