//! Server configuration: TOML file, CLI overrides, embedded defaults.
//!
//! Parsed once and validated into [`ServerConfig`], which the runtime and
//! the core accept; errors name the offending key and value.

use crate::core::group::{GroupConfig, Incarnation, NodeId};
use crate::core::NodeConfig;
use canopy_client::protocol::{FRAME_LEN_MAX_DEFAULT, FRAME_LEN_MAX_LIMIT};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The default client listen address.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:4400";

/// The default HTTP address (dashboard, API, metrics).
pub const HTTP_DEFAULT: &str = "127.0.0.1:8080";

/// The folder, relative to the working directory, under which a core server
/// without a `data_dir` keeps its data: `canopy-data/s<ID>`.
pub const DATA_DIR_DEFAULT: &str = "canopy-data";

/// Bytes queued for one client before it counts as slow, by default.
pub const QUEUE_BYTES_MAX_DEFAULT: usize = 8 << 20;
/// Bytes queued for all clients together at most, by default.
pub const QUEUE_BYTES_TOTAL_MAX_DEFAULT: usize = 256 << 20;

/// The configuration file as written (every key optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The node's name.
    pub name: Option<String>,
    /// The client listen address.
    pub listen: Option<String>,
    /// The HTTP address of the dashboard, API and metrics, or `off`.
    pub http: Option<String>,
    /// A core server's data directory (its hard state); relative paths
    /// start at the working directory. Standalone servers and relays keep
    /// nothing on disk and ignore it.
    pub data_dir: Option<PathBuf>,
    /// Limits.
    #[serde(default)]
    pub limits: FileLimits,
    /// Retention buffer.
    #[serde(default)]
    pub retention: FileRetention,
    /// Membership in a core group; absent for a standalone server.
    pub core: Option<FileCore>,
    /// A relay's place in the tree; absent for a core or standalone server.
    pub relay: Option<FileRelay>,
    /// Who may connect; absent: anyone.
    pub auth: Option<FileAuth>,
    /// TLS on every link of this server; absent: plain TCP.
    pub tls: Option<crate::tls::FileTls>,
}

/// `[auth]`: clients must prove who they are.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAuth {
    /// The accounts file (every server and relay of a tree reads the
    /// same); relative paths start at the working directory.
    pub accounts: PathBuf,
    /// Whether HTTP readers on loopback need no token (off by default:
    /// every reader shows a token of a user with `http = true`).
    #[serde(default)]
    pub http_loopback_open: bool,
}

/// `[relay]`: a relay's tier above and its own tier.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRelay {
    /// Client addresses of the tier above (core servers or relays).
    pub upstream: Vec<String>,
    /// Client addresses of this relay's tier, itself included; its clients
    /// fail over among them. Empty: the relay tells clients only itself.
    #[serde(default)]
    pub tier: Vec<String>,
    /// The relay's token for the tier above, when that checks (its user
    /// needs `relay = true`).
    pub token: Option<String>,
}

/// A validated `[relay]` section.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Client addresses of the tier above.
    pub upstream: Vec<String>,
    /// How the relay proves who it is to the tier above.
    pub credentials: Option<canopy_client::permissions::Credentials>,
}

/// `[core]`: this server's place in a core group.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCore {
    /// This server's id among `servers`.
    pub id: u32,
    /// Heartbeat period, milliseconds.
    pub heartbeat_interval_ms: Option<u64>,
    /// Silence after which a server is excluded, milliseconds.
    pub failure_timeout_ms: Option<u64>,
    /// Every server of the core, this one included.
    #[serde(default)]
    pub servers: Vec<FileCoreServer>,
    /// The replicated service the core runs, by name (`kv`: the key-value
    /// store that ships with Canopy); every server of a core must name the
    /// same. None by default: calls then fail with `no_service`.
    pub service: Option<String>,
    /// Threads that execute the service's calls (its load-balanced,
    /// primary-backup and parallel work); by default one per CPU.
    pub executors: Option<usize>,
    /// The core's shared secret: servers prove they know it to each other
    /// (challenge and response, never sent) before a link carries
    /// anything. Every server of a core names the same. None: any process
    /// that reaches the peer port is taken for a server.
    pub secret: Option<String>,
}

/// One `[[core.servers]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCoreServer {
    /// Its id (its rank: the lowest live id coordinates).
    pub id: u32,
    /// Its server-to-server address.
    pub peer: String,
    /// Its client address.
    pub client: String,
}

/// A validated `[core]` section.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// This server.
    pub me: NodeId,
    /// The address this server listens on for other core servers.
    pub peer_listen: String,
    /// The other servers' ids and server-to-server addresses.
    pub peers: Vec<(NodeId, String)>,
    /// Every server's client address, by id.
    pub clients: Vec<(NodeId, String)>,
    /// Heartbeat period.
    pub heartbeat_interval: Duration,
    /// Silence after which a server is excluded.
    pub failure_timeout: Duration,
    /// Where this server keeps its hard state (`data_dir`, by default
    /// `canopy-data/s<ID>`).
    pub data_dir: PathBuf,
    /// The built-in replicated service the core runs, if any.
    pub service: Option<String>,
    /// Threads that execute the service's calls.
    pub executors: usize,
    /// The core's shared secret, if links prove it.
    pub secret: Option<std::sync::Arc<str>>,
}

impl CoreConfig {
    /// The group settings for this run (`incarnation` unique per start).
    pub fn group(&self, incarnation: Incarnation, stream_seed: u64) -> GroupConfig {
        let mut servers: Vec<NodeId> = self.peers.iter().map(|(n, _)| *n).collect();
        servers.push(self.me);
        servers.sort();
        let mut g = GroupConfig::new(self.me, incarnation, servers);
        let m = &mut g.membership;
        m.heartbeat_interval = self.heartbeat_interval;
        m.failure_timeout = self.failure_timeout;
        // A broken link is confirmed by a few heartbeats of silence.
        m.link_confirm = (self.heartbeat_interval * 3).min(self.failure_timeout);
        m.flush_timeout = self.failure_timeout;
        m.stream_seed = stream_seed;
        g
    }
}

/// `[limits]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLimits {
    /// Largest frame, bytes.
    pub frame_len_max: Option<usize>,
    /// Outbound queue per client, frames.
    pub queue_frames_max: Option<usize>,
    /// Outbound queue per client, bytes.
    pub queue_bytes_max: Option<usize>,
    /// Outbound queues of all clients together, bytes (a frame queued for
    /// many counted once).
    pub queue_bytes_total_max: Option<usize>,
    /// Subscriptions per connection.
    pub subscriptions_per_session_max: Option<usize>,
    /// Publishers remembered for deduplication.
    pub publishers_max: Option<usize>,
    /// Watermark period, milliseconds.
    pub watermark_interval_ms: Option<u64>,
    /// Time a new connection has to send its Hello, milliseconds.
    pub handshake_timeout_ms: Option<u64>,
    /// Time a silent connection is kept, milliseconds.
    pub idle_timeout_ms: Option<u64>,
    /// Client connections held at most.
    pub connections_max: Option<usize>,
    /// Client connections held at most per client address (IP); none by
    /// default.
    pub connections_per_address_max: Option<usize>,
    /// Clients of the whole tree the membership state remembers; 0 turns
    /// ordered membership (attach/detach events, `full` reports) off.
    pub members_max: Option<usize>,
}

/// `[retention]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRetention {
    /// Messages retained at most.
    pub count_max: Option<usize>,
    /// Bytes retained at most.
    pub bytes_max: Option<usize>,
}

/// A validated server configuration.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The client listen address.
    pub listen: String,
    /// The HTTP address, or `None` when HTTP is off.
    pub http: Option<String>,
    /// Frames queued per client before it counts as slow.
    pub queue_frames_max: usize,
    /// Bytes queued per client before it counts as slow.
    pub queue_bytes_max: usize,
    /// Bytes the client queues hold together at most, a frame queued for
    /// many counted once (`runtime::outbound`).
    pub queue_bytes_total_max: usize,
    /// The core's settings.
    pub node: NodeConfig,
    /// The core group, when this server is in one.
    pub core: Option<CoreConfig>,
    /// The tier above, when this server is a relay.
    pub relay: Option<RelayConfig>,
    /// Who may connect, when clients must prove who they are.
    pub accounts: Option<std::sync::Arc<crate::auth::Accounts>>,
    /// TLS on every link, if configured.
    pub tls: Option<crate::tls::ServerTls>,
    /// With `accounts`: HTTP readers on loopback need no token.
    pub http_loopback_open: bool,
    /// Client connections held at most per client address.
    pub connections_per_address_max: Option<usize>,
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config file {path} is not valid: {source}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        source: toml::de::Error,
    },
    /// The accounts file is wrong.
    #[error(transparent)]
    Accounts(#[from] crate::auth::AccountsError),
    /// The TLS files cannot be used.
    #[error("[tls]: {0}")]
    Tls(#[from] canopy_client::tls::TlsError),
    /// A value is out of range.
    #[error("`{key}` = {value} is out of range: {why}")]
    Range {
        /// The key.
        key: &'static str,
        /// The value given.
        value: String,
        /// The allowed range.
        why: &'static str,
    },
}

impl FileConfig {
    /// Reads and parses a TOML file.
    ///
    /// # Errors
    /// [`ConfigError::Read`] or [`ConfigError::Parse`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    /// Fills defaults and validates.
    ///
    /// # Errors
    /// [`ConfigError::Range`] naming the first bad value.
    pub fn validate(self, stream: u64) -> Result<ServerConfig, ConfigError> {
        let d = NodeConfig::default();
        let frame_len_max = self.limits.frame_len_max.unwrap_or(FRAME_LEN_MAX_DEFAULT);
        range(
            "limits.frame_len_max",
            frame_len_max,
            4096,
            FRAME_LEN_MAX_LIMIT,
            "4096 to 64 MiB",
        )?;
        let queue_frames_max = self.limits.queue_frames_max.unwrap_or(1024);
        range(
            "limits.queue_frames_max",
            queue_frames_max,
            1,
            1 << 20,
            "1 to 1048576",
        )?;
        let queue_bytes_max = self
            .limits
            .queue_bytes_max
            .unwrap_or(QUEUE_BYTES_MAX_DEFAULT);
        range(
            "limits.queue_bytes_max",
            queue_bytes_max,
            4096,
            1 << 30,
            "4 KiB to 1 GiB",
        )?;
        let queue_bytes_total_max = self
            .limits
            .queue_bytes_total_max
            .unwrap_or(QUEUE_BYTES_TOTAL_MAX_DEFAULT);
        range(
            "limits.queue_bytes_total_max",
            queue_bytes_total_max,
            64 << 10,
            64 << 30,
            "64 KiB to 64 GiB",
        )?;
        let subs = self
            .limits
            .subscriptions_per_session_max
            .unwrap_or(d.subscriptions_per_session_max);
        range(
            "limits.subscriptions_per_session_max",
            subs,
            1,
            1 << 20,
            "1 to 1048576",
        )?;
        let members = self.limits.members_max.unwrap_or(d.members_max);
        range("limits.members_max", members, 0, 1 << 24, "0 to 16777216")?;
        let publishers = self.limits.publishers_max.unwrap_or(d.publishers_max);
        range(
            "limits.publishers_max",
            publishers,
            1,
            1 << 24,
            "1 to 16777216",
        )?;
        let wm = millis(
            "limits.watermark_interval_ms",
            self.limits.watermark_interval_ms,
            d.watermark_interval,
            10,
            3_600_000,
            "10 ms to 1 hour",
        )?;
        let handshake = millis(
            "limits.handshake_timeout_ms",
            self.limits.handshake_timeout_ms,
            d.handshake_timeout,
            10,
            3_600_000,
            "10 ms to 1 hour",
        )?;
        let idle = millis(
            "limits.idle_timeout_ms",
            self.limits.idle_timeout_ms,
            d.idle_timeout,
            100,
            86_400_000,
            "100 ms to 1 day",
        )?;
        let connections = self.limits.connections_max.unwrap_or(d.sessions_max);
        range(
            "limits.connections_max",
            connections,
            1,
            1 << 24,
            "1 to 16777216",
        )?;
        let count = self.retention.count_max.unwrap_or(d.retention_count_max);
        range("retention.count_max", count, 1, 1 << 32, "1 to 2^32")?;
        let bytes = self.retention.bytes_max.unwrap_or(d.retention_bytes_max);
        range(
            "retention.bytes_max",
            bytes,
            4096,
            1 << 40,
            "4 KiB to 1 TiB",
        )?;
        let http = match self.http.as_deref() {
            None => Some(HTTP_DEFAULT.to_owned()),
            Some("off") => None,
            Some("") => {
                return Err(ConfigError::Range {
                    key: "http",
                    value: "\"\"".into(),
                    why: "an address such as 127.0.0.1:8080, or \"off\"",
                })
            }
            Some(addr) => Some(addr.to_owned()),
        };
        let data_dir = self.data_dir;
        let core = self.core.map(|c| c.validate(data_dir)).transpose()?;
        let listen = self.listen.unwrap_or_else(|| LISTEN_DEFAULT.to_owned());
        let (relay, servers) = match self.relay {
            Some(_) if core.is_some() => {
                return Err(ConfigError::Range {
                    key: "relay",
                    value: "with [core]".into(),
                    why: "a server is a core server or a relay, not both",
                })
            }
            Some(r) if !canopy_client::protocol::usable_servers(&r.upstream) => {
                return Err(ConfigError::Range {
                    key: "relay.upstream",
                    value: format!("{:?}", r.upstream),
                    why: "at least one address of the tier above, none empty",
                })
            }
            Some(r) => {
                let relay = RelayConfig {
                    upstream: r.upstream,
                    credentials: r.token.map(canopy_client::permissions::Credentials::Token),
                };
                (Some(relay), advertised(r.tier))
            }
            None => {
                let servers = core
                    .as_ref()
                    .map(|c| c.clients.iter().map(|(_, a)| a.clone()).collect())
                    .unwrap_or_default();
                (None, advertised(servers))
            }
        };
        let tls = self
            .tls
            .as_ref()
            .map(crate::tls::FileTls::build)
            .transpose()?;
        if tls.as_ref().is_some_and(|t| t.links.is_none()) && (core.is_some() || relay.is_some()) {
            return Err(ConfigError::Range {
                key: "tls.ca",
                value: "none".into(),
                why: "a core server or a relay checks its peers or the tier above against the tree's CA",
            });
        }
        let accounts = match &self.auth {
            Some(a) => Some(std::sync::Arc::new(crate::auth::Accounts::load(
                &a.accounts,
            )?)),
            None => None,
        };
        Ok(ServerConfig {
            core,
            relay,
            accounts: accounts.clone(),
            tls,
            http_loopback_open: self.auth.as_ref().is_some_and(|a| a.http_loopback_open),
            connections_per_address_max: self.limits.connections_per_address_max,
            listen,
            http,
            queue_frames_max,
            queue_bytes_max,
            queue_bytes_total_max,
            node: NodeConfig {
                name: self.name.unwrap_or_else(|| "canopy".to_owned()),
                stream,
                frame_len_max,
                retention_count_max: count,
                retention_bytes_max: bytes,
                subscriptions_per_session_max: subs,
                publishers_max: publishers,
                calls_max: d.calls_max,
                batch_len_max: d.batch_len_max,
                watermark_interval: wm,
                handshake_timeout: handshake,
                idle_timeout: idle,
                sessions_max: connections,
                servers,
                members_max: members,
                // Set by the runtime per start.
                id: canopy_client::protocol::PublisherId(0),
                auth: accounts.is_some(),
            },
        })
    }
}

/// The tier's addresses as clients are told them: none when any is not
/// known before start (port 0), as a partial list would mislead failover.
/// The runtime also keeps the core's addresses out of `servers` reports
/// when this is empty.
fn advertised(tier: Vec<String>) -> Vec<String> {
    match tier.iter().any(|a| a.ends_with(":0")) {
        true => Vec::new(),
        false => tier,
    }
}

impl FileCore {
    fn validate(self, data_dir: Option<PathBuf>) -> Result<CoreConfig, ConfigError> {
        let n = self.servers.len();
        if !(1..=15).contains(&n) {
            return Err(ConfigError::Range {
                key: "core.servers",
                value: format!("{n} servers"),
                why: "1 to 15 servers (3 to 7 make sense)",
            });
        }
        let mut ids: Vec<u32> = self.servers.iter().map(|s| s.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != n {
            return Err(ConfigError::Range {
                key: "core.servers.id",
                value: format!(
                    "{:?}",
                    self.servers.iter().map(|s| s.id).collect::<Vec<_>>()
                ),
                why: "every server needs a distinct id",
            });
        }
        let Some(me) = self.servers.iter().find(|s| s.id == self.id) else {
            return Err(ConfigError::Range {
                key: "core.id",
                value: self.id.to_string(),
                why: "the id of one of the [[core.servers]] entries",
            });
        };
        let heartbeat_interval = millis(
            "core.heartbeat_interval_ms",
            self.heartbeat_interval_ms,
            Duration::from_millis(100),
            1,
            60_000,
            "1 ms to 1 minute",
        )?;
        let failure_timeout = millis(
            "core.failure_timeout_ms",
            self.failure_timeout_ms,
            Duration::from_millis(1000),
            1,
            600_000,
            "1 ms to 10 minutes",
        )?;
        if failure_timeout < heartbeat_interval * 3 {
            return Err(ConfigError::Range {
                key: "core.failure_timeout_ms",
                value: failure_timeout.as_millis().to_string(),
                why: "at least three heartbeat intervals",
            });
        }
        // One directory per server: the id keeps the servers of one core
        // apart when they share a working directory.
        let data_dir =
            data_dir.unwrap_or_else(|| Path::new(DATA_DIR_DEFAULT).join(format!("s{}", self.id)));
        if data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Range {
                key: "data_dir",
                value: "\"\"".into(),
                why: "a directory path (or no key, for canopy-data/s<ID>)",
            });
        }
        if let Some(name) = self.service.as_deref() {
            if !crate::services::NAMES.contains(&name) {
                return Err(ConfigError::Range {
                    key: "core.service",
                    value: format!("{name:?}"),
                    why: "the name of a built-in service (\"kv\")",
                });
            }
        }
        let executors = self.executors.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
        range("core.executors", executors, 1, 1024, "1 to 1024")?;
        if self.secret.as_ref().is_some_and(|s| s.len() < 16) {
            return Err(ConfigError::Range {
                key: "core.secret",
                value: "(hidden)".into(),
                why: "at least 16 characters (`canopy token` makes one)",
            });
        }
        Ok(CoreConfig {
            secret: self.secret.map(std::sync::Arc::from),
            service: self.service,
            executors,
            me: NodeId(self.id),
            peer_listen: me.peer.clone(),
            peers: self
                .servers
                .iter()
                .filter(|s| s.id != self.id)
                .map(|s| (NodeId(s.id), s.peer.clone()))
                .collect(),
            clients: self
                .servers
                .iter()
                .map(|s| (NodeId(s.id), s.client.clone()))
                .collect(),
            heartbeat_interval,
            failure_timeout,
            data_dir,
        })
    }
}

/// A duration set in milliseconds: `value`, or `default`, within `min..=max` ms.
fn millis(
    key: &'static str,
    value: Option<u64>,
    default: Duration,
    min: u64,
    max: u64,
    why: &'static str,
) -> Result<Duration, ConfigError> {
    let ms = value.unwrap_or(default.as_millis() as u64);
    if (min..=max).contains(&ms) {
        Ok(Duration::from_millis(ms))
    } else {
        Err(ConfigError::Range {
            key,
            value: ms.to_string(),
            why,
        })
    }
}

fn range(
    key: &'static str,
    value: usize,
    min: usize,
    max: usize,
    why: &'static str,
) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::Range {
            key,
            value: value.to_string(),
            why,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/single.toml");
        let cfg = FileConfig::load(&path)
            .expect("parses")
            .validate(1)
            .expect("valid");
        assert_eq!(cfg.listen, LISTEN_DEFAULT);
    }

    #[test]
    fn the_cluster_configs_are_valid_and_agree() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/cluster-3");
        let mut seen = Vec::new();
        for (i, file) in ["s1.toml", "s2.toml", "s3.toml"].iter().enumerate() {
            let cfg = FileConfig::load(&dir.join(file))
                .expect("parses")
                .validate(1)
                .expect("valid");
            assert_eq!(cfg.listen, format!("127.0.0.1:440{}", i + 1));
            let core = cfg.core.expect("a core section");
            assert_eq!(core.me, NodeId(i as u32 + 1));
            assert_eq!(core.peers.len(), 2);
            assert_eq!(
                core.data_dir,
                Path::new(&format!("canopy-data/s{}", i + 1)),
                "a data directory per server"
            );
            seen.push(core.clients);
        }
        assert!(seen.windows(2).all(|w| w[0] == w[1]), "one server list");
    }

    #[test]
    fn a_core_server_keeps_its_data_in_data_dir_or_canopy_data_by_id() {
        let core = "[core]\nid = 2\n[[core.servers]]\nid = 2\npeer = \"127.0.0.1:1\"\nclient = \"127.0.0.1:2\"";
        let data_dir = |text: &str| {
            let cfg: FileConfig = toml::from_str(text).expect("parses");
            cfg.validate(1).map(|c| c.core.map(|c| c.data_dir))
        };
        assert_eq!(
            data_dir(core).expect("valid"),
            Some(PathBuf::from("canopy-data/s2"))
        );
        assert_eq!(
            data_dir(&format!("data_dir = \"/var/lib/canopy\"\n{core}")).expect("valid"),
            Some(PathBuf::from("/var/lib/canopy"))
        );
        let err = data_dir(&format!("data_dir = \"\"\n{core}")).expect_err("empty");
        assert!(err.to_string().contains("data_dir"), "{err}");
        // Servers outside a core have no data directory and ignore the key.
        assert_eq!(
            data_dir("data_dir = \"x\"\n[relay]\nupstream = [\"127.0.0.1:1\"]").expect("valid"),
            None
        );
        assert_eq!(data_dir("data_dir = \"x\"").expect("valid"), None);
    }

    #[test]
    fn a_core_without_this_server_is_refused() {
        let text = "[core]\nid = 4\n[[core.servers]]\nid = 1\npeer = \"127.0.0.1:1\"\nclient = \"127.0.0.1:2\"";
        let cfg: FileConfig = toml::from_str(text).expect("parses");
        let err = cfg.validate(1).expect_err("id not listed");
        assert!(err.to_string().contains("core.id"), "{err}");
    }

    #[test]
    fn a_relay_needs_the_tier_above_and_no_core() {
        for (text, key) in [
            ("[relay]\nupstream = []", "relay.upstream"),
            ("[relay]\nupstream = [\"\"]", "relay.upstream"),
            (
                "[relay]\nupstream = [\"127.0.0.1:1\"]\n[core]\nid = 1\n[[core.servers]]\nid = 1\npeer = \"127.0.0.1:1\"\nclient = \"127.0.0.1:2\"",
                "relay",
            ),
        ] {
            let cfg: FileConfig = toml::from_str(text).expect("parses");
            let err = cfg.validate(1).expect_err("refused");
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
        let cfg: FileConfig =
            toml::from_str("[relay]\nupstream = [\"127.0.0.1:1\"]").expect("parses");
        assert!(cfg.validate(1).is_ok());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let err =
            toml::from_str::<FileConfig>("listen = \"x\"\nbogus = 1").expect_err("unknown key");
        assert!(err.to_string().contains("bogus"), "{err}");
        let cfg: FileConfig = toml::from_str("[limits]\nqueue_frames_max = 0").expect("parses");
        let err = cfg.validate(1).expect_err("out of range");
        assert!(err.to_string().contains("limits.queue_frames_max"), "{err}");
    }
}
