//! `canopy up`: starts a whole local tree (a core and tiers of relays) as
//! processes on loopback, for demos and tests.
//!
//! The tree file names every process's addresses; the launcher writes one
//! server config per process (into a fresh folder under the system's temp
//! folder, which also holds each core server's data directory), starts
//! `canopy serve` for each with this same binary, and waits until each one
//! listens. A process that dies is reported and left dead, so that
//! operators can watch the tree adopt its clients; Ctrl-C or SIGTERM stops
//! them all, and the folder goes with them: every `canopy up` starts a new
//! core.

use anyhow::{bail, Context};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering as AtomicOrdering};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The tree `canopy up` starts without a file (`configs/tree.toml`).
pub const TREE_DEFAULT: &str = include_str!("../../configs/tree.toml");

/// How long a process has to start listening.
const START_TIME_MAX: Duration = Duration::from_secs(20);
/// How long a process has to stop after SIGTERM before it is killed.
const STOP_TIME_MAX: Duration = Duration::from_secs(5);

/// Ports handed out by [`loopback_port`] in this process so far.
static PORTS_GIVEN: AtomicU32 = AtomicU32::new(0);

/// A free loopback address for a process to listen on later, outside the
/// system's ephemeral port range.
///
/// A port the system picks for `127.0.0.1:0` comes from the ephemeral range,
/// where any outgoing connection may take it as its source port between
/// the moment it is released here and the moment a server binds it (a test
/// that started a tree while other tests connected clients saw `Address
/// already in use`). Below that range only listeners take ports, so each
/// candidate is checked by binding it, and candidates never repeat within a
/// process (parallel tests) and start at a place set by the process id
/// (parallel processes).
///
/// # Errors
/// When no port below the ephemeral range is free.
pub fn loopback_port() -> std::io::Result<String> {
    const LOWEST: u32 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral.saturating_sub(LOWEST).max(1);
    let start = std::process::id().wrapping_mul(7_919);
    for _ in 0..span {
        let n = PORTS_GIVEN.fetch_add(1, AtomicOrdering::Relaxed);
        let port = LOWEST + start.wrapping_add(n) % span;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return Ok(l.local_addr()?.to_string());
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrNotAvailable,
        format!("no free loopback port between {LOWEST} and {ephemeral}"),
    ))
}

/// A tree file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreeConfig {
    /// Heartbeat period of the core, milliseconds.
    pub heartbeat_interval_ms: Option<u64>,
    /// Silence after which a core server is excluded, milliseconds.
    pub failure_timeout_ms: Option<u64>,
    /// The replicated service the core runs (`kv`), if any.
    pub service: Option<String>,
    /// The core's shared secret, which its servers prove to each other
    /// before a link carries anything; absent: none.
    pub secret: Option<String>,
    /// The accounts file every server and relay reads (relative paths
    /// start at the working directory); absent: anyone may connect.
    pub accounts: Option<std::path::PathBuf>,
    /// With `accounts`: the tree's own token, whose user has `relay =
    /// true`. Relays prove themselves to the tier above with it, and
    /// `canopy up` checks with it that each server serves.
    pub token: Option<String>,
    /// TLS on every link, with development certificates; absent: plain
    /// TCP.
    pub tls: Option<TreeTls>,
    /// The core servers; their ids are their positions, from 1.
    pub core: Vec<TreeCore>,
    /// Tiers of relays, top down: the first under the core, each next one
    /// under the one before.
    #[serde(default)]
    pub tiers: Vec<TreeTier>,
}

/// `[tls]` of a tree file: every link of the tree is TLS, with the
/// development CA and certificates in `dir` (made by `canopy up` when
/// missing, as `canopy certs` makes them).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreeTls {
    /// Where the certificates are (relative paths start at the working
    /// directory).
    pub dir: PathBuf,
    /// Users to make client certificates for.
    #[serde(default)]
    pub users: Vec<String>,
}

impl TreeTls {
    /// The `[tls]` section of a server config with `DIR/NAME.pem`.
    fn section(&self, name: &str) -> String {
        let path = |f: String| toml::Value::String(self.dir.join(f).display().to_string());
        format!(
            "\n[tls]\ncert = {}\nkey = {}\nca = {}\n",
            path(format!("{name}.pem")),
            path(format!("{name}-key.pem")),
            path("ca.pem".into()),
        )
    }

    /// A client's TLS for this tree (trusts its CA).
    ///
    /// # Errors
    /// When the CA's file cannot be read.
    pub fn connector(&self) -> anyhow::Result<canopy_client::tls::TlsConnector> {
        Ok(canopy_client::tls::TlsConnector::from_files(
            &self.dir.join("ca.pem"),
            None,
        )?)
    }
}

/// One `[[core]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreeCore {
    /// Client address.
    pub client: String,
    /// Server-to-server address.
    pub peer: String,
    /// Dashboard address, or absent for none.
    pub http: Option<String>,
}

/// One `[[tiers]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreeTier {
    /// Its relays.
    pub relays: Vec<TreeRelay>,
}

/// One relay of a tier.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreeRelay {
    /// Client address.
    pub listen: String,
    /// Dashboard address, or absent for none.
    pub http: Option<String>,
}

/// One process of the tree: its name and its server config.
struct Member {
    name: String,
    config: String,
}

impl TreeConfig {
    /// A tree on free loopback ports: `core` core servers and tiers of
    /// `tiers[i]` relays, no dashboards, fast failure detection (50 ms
    /// heartbeats, 500 ms timeout). For tests and benchmarks.
    ///
    /// # Errors
    /// When no free port can be found.
    pub fn loopback(core: usize, tiers: &[usize]) -> std::io::Result<TreeConfig> {
        let free = loopback_port;
        let mut c = Vec::with_capacity(core);
        for _ in 0..core {
            c.push(TreeCore {
                client: free()?,
                peer: free()?,
                http: None,
            });
        }
        let mut t = Vec::with_capacity(tiers.len());
        for &n in tiers {
            let mut relays = Vec::with_capacity(n);
            for _ in 0..n {
                relays.push(TreeRelay {
                    listen: free()?,
                    http: None,
                });
            }
            t.push(TreeTier { relays });
        }
        Ok(TreeConfig {
            heartbeat_interval_ms: Some(50),
            failure_timeout_ms: Some(500),
            service: None,
            secret: None,
            accounts: None,
            token: None,
            tls: None,
            core: c,
            tiers: t,
        })
    }

    /// Parses a tree file's text.
    ///
    /// # Errors
    /// When the text is not a valid tree, or the tree has no core.
    pub fn parse(text: &str) -> anyhow::Result<TreeConfig> {
        let tree: TreeConfig = toml::from_str(text).context("not a valid tree file")?;
        if tree.core.is_empty() {
            bail!("a tree needs at least one [[core]] server");
        }
        if let Some(i) = tree.tiers.iter().position(|t| t.relays.is_empty()) {
            bail!("tier {} has no relays", i + 1);
        }
        if tree.accounts.is_some() && tree.token.is_none() {
            bail!("a tree with `accounts` needs `token`: a token of a user with `relay = true`, for its relays and for checking that its servers serve");
        }
        Ok(tree)
    }

    /// Every process's server config, core first, then tier by tier; each
    /// core server keeps its data in its own folder under `dir`.
    fn members(&self, dir: &Path) -> Vec<Member> {
        let mut out = Vec::new();
        let mut servers = String::new();
        for (i, c) in self.core.iter().enumerate() {
            servers.push_str(&format!(
                "[[core.servers]]\nid = {}\npeer = {:?}\nclient = {:?}\n\n",
                i + 1,
                c.peer,
                c.client
            ));
        }
        let mut timing = String::new();
        if let Some(ms) = self.heartbeat_interval_ms {
            timing.push_str(&format!("heartbeat_interval_ms = {ms}\n"));
        }
        if let Some(ms) = self.failure_timeout_ms {
            timing.push_str(&format!("failure_timeout_ms = {ms}\n"));
        }
        if let Some(service) = &self.service {
            timing.push_str(&format!("service = {service:?}\n"));
        }
        if let Some(secret) = &self.secret {
            timing.push_str(&format!("secret = {secret:?}\n"));
        }
        let auth = match &self.accounts {
            Some(path) => {
                let path = toml::Value::String(path.display().to_string());
                format!("\n[auth]\naccounts = {path}\n")
            }
            None => String::new(),
        };
        let token = match &self.token {
            Some(t) => format!("token = {:?}\n", t),
            None => String::new(),
        };
        let tls = |name: &str| {
            self.tls
                .as_ref()
                .map(|t| t.section(name))
                .unwrap_or_default()
        };
        for (i, c) in self.core.iter().enumerate() {
            let name = format!("core-{}", i + 1);
            let data = toml::Value::String(dir.join(format!("{name}-data")).display().to_string());
            let config = format!(
                "name = {name:?}\nlisten = {:?}\nhttp = {:?}\ndata_dir = {data}\n\n[core]\nid = {}\n{timing}\n{servers}{auth}{}",
                c.client,
                c.http.as_deref().unwrap_or("off"),
                i + 1,
                tls("core"),
            );
            out.push(Member { name, config });
        }
        let mut above: Vec<String> = self.core.iter().map(|c| c.client.clone()).collect();
        for (t, tier) in self.tiers.iter().enumerate() {
            let listens: Vec<String> = tier.relays.iter().map(|r| r.listen.clone()).collect();
            for (i, r) in tier.relays.iter().enumerate() {
                let name = format!("relay-{}.{}", t + 1, i + 1);
                let config = format!(
                    "name = {name:?}\nlisten = {:?}\nhttp = {:?}\n\n[relay]\nupstream = {above:?}\ntier = {listens:?}\n{token}{auth}{}",
                    r.listen,
                    r.http.as_deref().unwrap_or("off"),
                    tls("relay"),
                );
                out.push(Member { name, config });
            }
            above = listens;
        }
        out
    }
}

/// A started process of the tree.
struct Running {
    name: String,
    addr: String,
    child: Child,
}

/// A running tree; its processes are killed when it is dropped.
pub struct Launched {
    running: Vec<Running>,
    dir: PathBuf,
}

impl Launched {
    /// Starts every process of `tree` with the `canopy` binary `exe`, one
    /// after the other, each once the one before listens.
    ///
    /// # Errors
    /// When a process cannot be started or does not start listening.
    pub async fn start(exe: &Path, tree: &TreeConfig) -> anyhow::Result<Launched> {
        static STARTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("canopy-up-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let mut launched = Launched {
            running: Vec::new(),
            dir,
        };
        let tls = match &tree.tls {
            Some(t) => {
                let made = crate::tls::make_dev_certs(&t.dir, &t.users)?;
                if !made.written.is_empty() {
                    println!(
                        "canopy up: made development certificates in {} (the CA: ca.pem)",
                        t.dir.display()
                    );
                }
                Some(t.connector()?)
            }
            None => None,
        };
        for m in tree.members(&launched.dir) {
            let r = start(exe, &launched.dir, &m).await?;
            launched.running.push(r);
        }
        // Ready means serving: a core server once in a view, a relay once
        // it has the stream from the tier above.
        for r in &launched.running {
            let token = tree.token.as_deref();
            tokio::time::timeout(START_TIME_MAX, serving(&r.addr, token, tls.as_ref()))
                .await
                .with_context(|| format!("{} did not start serving", r.name))?;
        }
        Ok(launched)
    }

    /// Each process's name, pid and client address, in start order.
    pub fn processes(&self) -> impl Iterator<Item = (&str, Option<u32>, &str)> {
        self.running
            .iter()
            .map(|r| (r.name.as_str(), r.child.id(), r.addr.as_str()))
    }

    /// Stops every process: SIGTERM first (clients are told), then a kill.
    pub async fn stop(mut self) {
        stop(&mut self.running).await;
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        for r in &mut self.running {
            let _ = r.child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts the tree from `path` (or the default tree), prints where every
/// process listens, and runs until Ctrl-C or SIGTERM.
///
/// # Errors
/// When the file cannot be read or is not a tree, or a process does not
/// start listening.
pub async fn up(path: Option<&Path>) -> anyhow::Result<()> {
    let text = match path {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("cannot read tree file {}", p.display()))?,
        None => TREE_DEFAULT.to_owned(),
    };
    let tree = TreeConfig::parse(&text)?;
    let exe = std::env::current_exe().context("cannot find the canopy binary")?;
    let mut launched = Launched::start(&exe, &tree).await?;
    println!(
        "canopy up: tree ready ({} processes); Ctrl-C stops it",
        launched.running.len()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut watch = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            r = tokio::signal::ctrl_c() => { r.context("waiting for Ctrl-C")?; break; }
            _ = term.recv() => break,
            _ = watch.tick() => {
                // Reported once: the dead leave the list.
                launched.running.retain_mut(|r| match r.child.try_wait() {
                    Ok(Some(status)) => {
                        println!("canopy up: {} exited ({status}); its clients move to the rest of its tier", r.name);
                        false
                    }
                    _ => true,
                });
            }
        }
    }
    launched.stop().await;
    Ok(())
}

/// Starts one process and waits for its "listening" line.
async fn start(exe: &Path, dir: &Path, m: &Member) -> anyhow::Result<Running> {
    let file = dir.join(format!("{}.toml", m.name));
    std::fs::write(&file, &m.config).with_context(|| format!("cannot write {}", file.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("serve").arg("--config").arg(&file);
    cmd.stdout(std::process::Stdio::piped());
    cmd.kill_on_drop(true);
    if std::env::var_os("RUST_LOG").is_none() {
        // Seven processes at info drown the terminal; warnings still show.
        cmd.env("RUST_LOG", "warn");
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", m.name))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let listening = tokio::time::timeout(START_TIME_MAX, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(addr) = line.strip_prefix("canopy listening on ") {
                return Some(addr.to_owned());
            }
        }
        None
    })
    .await;
    let Ok(Some(addr)) = listening else {
        let _ = child.kill().await;
        bail!("{} did not start listening (see its log above)", m.name);
    };
    // Tests and scripts read pids and addresses from this line.
    println!(
        "canopy up: {} pid {} listening on {addr}",
        m.name,
        child.id().unwrap_or(0)
    );
    // Keep reading, so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Running {
        name: m.name.clone(),
        addr,
        child,
    })
}

/// Returns once the server at `addr` completes a handshake (rather than
/// refusing with `not_primary`); tries again every 20 ms.
async fn serving(addr: &str, token: Option<&str>, tls: Option<&canopy_client::tls::TlsConnector>) {
    use canopy_client::protocol::{self, ClientFrame, Hello, PublisherId, ServerFrame};
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;
    use tokio_util::codec::{FramedRead, LengthDelimitedCodec};
    loop {
        let welcomed = async {
            let mut stream = canopy_client::tls::connect(addr, tls).await.ok()?;
            let hello = Hello {
                version: protocol::PROTOCOL_VERSION,
                name: "canopy-up-probe".into(),
                publisher: PublisherId(0),
                subscriptions: Vec::new(),
                resume: None,
                slow: protocol::SlowPolicy::Disconnect,
                role: protocol::Role::Client,
                reports: protocol::Reports::None,
                connection: 1,
                weak: false,
                auth: token.map(|t| protocol::Credentials::Token(t.to_owned())),
                window: None,
            };
            let frame = protocol::encode_client(&ClientFrame::Hello(hello));
            stream.write_all(&frame).await.ok()?;
            stream.flush().await.ok()?;
            let mut frames = FramedRead::new(stream, LengthDelimitedCodec::new());
            let content = frames.next().await?.ok()?;
            matches!(
                protocol::decode_server(content.freeze()),
                Ok(ServerFrame::Welcome(_))
            )
            .then_some(())
        };
        if welcomed.await.is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stops every process: SIGTERM first (clients are told), then a kill.
async fn stop(running: &mut Vec<Running>) {
    for r in running.iter() {
        if let Some(pid) = r.child.id() {
            // The standard library only sends SIGKILL; SIGTERM, which lets
            // a server tell its clients, goes through the `kill` command
            // (`unsafe` is forbidden here, so no direct system call).
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
    }
    for r in running.iter_mut() {
        if tokio::time::timeout(STOP_TIME_MAX, r.child.wait())
            .await
            .is_err()
        {
            let _ = r.child.kill().await;
        }
    }
    running.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_tree_is_three_core_servers_and_two_tiers_of_two() {
        let tree = TreeConfig::parse(TREE_DEFAULT).expect("the default tree parses");
        let members = tree.members(Path::new("/tmp/canopy-up-test"));
        let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "core-1",
                "core-2",
                "core-3",
                "relay-1.1",
                "relay-1.2",
                "relay-2.1",
                "relay-2.2"
            ]
        );
        // Every generated config is a valid server config.
        for m in &members {
            let file: crate::config::FileConfig =
                toml::from_str(&m.config).unwrap_or_else(|e| panic!("{}: {e}", m.name));
            let c = file
                .validate(1)
                .unwrap_or_else(|e| panic!("{}: {e}", m.name));
            assert_eq!(c.core.is_some(), m.name.starts_with("core"));
            if let Some(core) = c.core {
                // Each core server its own data directory, in the run's folder.
                let data = format!("/tmp/canopy-up-test/{}-data", m.name);
                assert_eq!(core.data_dir, Path::new(&data));
            }
        }
        // The second tier hangs under the first.
        let leaf: crate::config::FileConfig = toml::from_str(&members[5].config).expect("parses");
        let upstream = leaf.relay.map(|r| r.upstream).unwrap_or_default();
        assert_eq!(upstream, ["127.0.0.1:4411", "127.0.0.1:4412"]);
    }
}
