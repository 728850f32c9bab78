//! The `canopy` binary: run a server, publish, subscribe.

use anyhow::Context;
use canopy_broker::config::{FileConfig, FileRelay, HTTP_DEFAULT, LISTEN_DEFAULT};
use canopy_broker::{cli, runtime};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// jemalloc rather than the system's allocator: the hot path's buffers
/// come and go by the thousand a second, and glibc's per-thread arenas gave
/// memory back to the kernel and faulted it in again (docs/DESIGN.md, "Hot
/// path": 2.4 instead of 2.7 to 2.9 µs of CPU per message in a 3-server
/// core).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Canopy: pub/sub with one agreed order and loss-free resume.
///
/// Start a server with `canopy serve` (or a whole tree of core servers and
/// relays with `canopy up`), then in other terminals `canopy sub 'demo.>'`
/// and `canopy pub demo.hello "hi"`.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// Log as JSON lines instead of text (logs go to stderr; filter with RUST_LOG).
    #[arg(long, global = true)]
    log_json: bool,
    /// For servers that check who their clients are (`pub`, `sub`, `call`):
    /// a token.
    #[arg(long, global = true, env = "CANOPY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// ... or a user, with `--password`.
    #[arg(long, global = true, env = "CANOPY_USER")]
    user: Option<String>,
    /// The user's password.
    #[arg(long, global = true, env = "CANOPY_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Connect with TLS, trusting the certificate authority in this PEM
    /// file (a tree's `ca.pem`, as `canopy certs` makes).
    #[arg(long, global = true, env = "CANOPY_CA")]
    ca: Option<PathBuf>,
    /// A client certificate to show (PEM; with `--key`): servers that map
    /// certificates to users know who you are by it.
    #[arg(long, global = true, env = "CANOPY_CERT", requires = "key")]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, env = "CANOPY_KEY", requires = "cert")]
    key: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a Canopy server (embedded defaults unless --config is given).
    Serve {
        /// TOML config file (see configs/single.toml for every key).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Client listen address, overriding the config [default: 127.0.0.1:4400].
        #[arg(long)]
        listen: Option<String>,
        /// Node name, overriding the config.
        #[arg(long)]
        name: Option<String>,
        /// Dashboard, JSON API and /metrics address, or `off` [default: 127.0.0.1:8080].
        #[arg(long)]
        http: Option<String>,
    },
    /// Run a relay: a client of the tier above, a server for its own clients.
    Relay {
        /// Client addresses of the tier above (core servers or relays), comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        upstream: Vec<String>,
        /// Client listen address [default: 127.0.0.1:4400].
        #[arg(long)]
        listen: Option<String>,
        /// Client addresses of this relay's tier, itself included, comma-separated;
        /// its clients fail over among them.
        #[arg(long, value_delimiter = ',')]
        tier: Vec<String>,
        /// Relay name.
        #[arg(long)]
        name: Option<String>,
        /// Dashboard, JSON API and /metrics address, or `off` [default: off].
        #[arg(long)]
        http: Option<String>,
        /// TOML config file for limits and retention (see configs/single.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Start a whole local tree as processes on loopback: by default 3 core
    /// servers (clients on 4401-4403), a tier of 2 relays (4411-4412) and a
    /// second tier of 2 relays (4421-4422).
    Up {
        /// A tree file (see configs/tree.toml, which is the default).
        config: Option<PathBuf>,
    },
    /// Show a running node's status: role, view, clients, rates, events.
    Status {
        /// The node's HTTP address (its `http` setting).
        #[arg(default_value = HTTP_DEFAULT)]
        addr: String,
        /// Print the node's full JSON snapshot instead.
        #[arg(long)]
        json: bool,
    },
    /// Publish MESSAGE to TOPIC, or each line of stdin when MESSAGE is omitted.
    Pub {
        /// Server addresses, comma-separated; the client fails over between them.
        #[arg(long, env = "CANOPY_SERVER", default_value = LISTEN_DEFAULT)]
        server: String,
        /// Topic: tokens separated by dots, such as `factory.line3.temp`.
        topic: String,
        /// The message; without it, every line of stdin is one message.
        message: Option<String>,
    },
    /// Call METHOD of the core's replicated service with ARG (or once per
    /// line of stdin) and print each reply; `canopy up configs/kv.toml`
    /// starts a core running the `kv` service.
    Call {
        /// Server addresses, comma-separated; the client fails over between them.
        #[arg(long, env = "CANOPY_SERVER", default_value = LISTEN_DEFAULT)]
        server: String,
        /// Active methods: wait for every replica's reply (`all`: one
        /// line `server N: REPLY` each) or a majority's (`majority`).
        #[arg(long, value_enum, default_value = "own")]
        replies: cli::RepliesArg,
        /// The method (`put`, `get`, ... for `kv`).
        method: String,
        /// The argument; without it, every line of stdin is one call.
        arg: Option<String>,
    },
    /// Print an argon2id hash of PASSWORD (or of stdin's first line) for
    /// an accounts file's `password`.
    Passwd {
        /// The password; read from stdin when omitted.
        password: Option<String>,
    },
    /// Make a new random token: prints the token, then the `sha256:...`
    /// line for an accounts file's `tokens`.
    Token,
    /// Make a development certificate authority and certificates for a
    /// local tree in DIR (kept if already there): ca.pem, core.pem (core
    /// servers), relay.pem (relays), and USER.pem for each --client (a client
    /// certificate named after the user), each with its -key.pem. Not for
    /// production: the CA's key lies beside them.
    Certs {
        /// The directory.
        dir: PathBuf,
        /// A client certificate named after this user (repeat for more).
        #[arg(long = "client", value_name = "USER")]
        users: Vec<String>,
    },
    /// Print messages matching PATTERN, one per line: `seq topic payload`.
    Sub {
        /// Server addresses, comma-separated; the client fails over between them.
        #[arg(long, env = "CANOPY_SERVER", default_value = LISTEN_DEFAULT)]
        server: String,
        /// Pattern: `*` matches one token, a final `>` the rest (`md.NASDAQ.*`, `factory.>`).
        pattern: String,
        /// Print one JSON object per line (seq, topic, payload, publisher, pub_seq).
        #[arg(long)]
        json: bool,
        /// Exit after printing this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// Weak delivery: messages as soon as ordered, before they are
        /// stable; a failover that takes some back is reported.
        #[arg(long)]
        weak: bool,
    },
}

fn init_logs(json: bool, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    cli::set_credentials(match (cli.token, cli.user, cli.password) {
        (Some(t), _, _) => Some(canopy_client::protocol::Credentials::Token(t)),
        (None, Some(user), password) => Some(canopy_client::protocol::Credentials::Password {
            user,
            password: password.unwrap_or_default(),
        }),
        (None, None, _) => None,
    });
    let identity = cli
        .cert
        .zip(cli.key)
        .map(|(cert, key)| canopy_client::tls::Identity { cert, key });
    if let Err(e) = cli::set_tls(cli.ca.as_deref(), identity) {
        eprintln!("error: {e:#}");
        return std::process::ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Certs { dir, users } => {
            init_logs(cli.log_json, "warn");
            cli::certs(&dir, &users)
        }
        Command::Passwd { password } => {
            init_logs(cli.log_json, "warn");
            cli::passwd(password)
        }
        Command::Token => {
            let (token, line) = canopy_broker::auth::new_token();
            println!("{token}\n{line}");
            Ok(())
        }
        Command::Serve {
            config,
            listen,
            name,
            http,
        } => {
            init_logs(cli.log_json, "info");
            match load(config.as_deref()) {
                Ok(file) => serve(file, listen, name, http).await,
                Err(e) => Err(e),
            }
        }
        Command::Relay {
            upstream,
            listen,
            tier,
            name,
            http,
            config,
        } => {
            init_logs(cli.log_json, "info");
            match load(config.as_deref()) {
                Ok(mut file) => {
                    // The config file's token, if any, proves the relay
                    // to the tier above.
                    let token = file.relay.take().and_then(|r| r.token);
                    file.relay = Some(FileRelay {
                        upstream,
                        tier,
                        token,
                    });
                    let http = http.or_else(|| Some("off".to_owned()));
                    serve(file, listen, name.or_else(|| Some("relay".into())), http).await
                }
                Err(e) => Err(e),
            }
        }
        Command::Up { config } => {
            init_logs(cli.log_json, "warn");
            canopy_broker::launcher::up(config.as_deref()).await
        }
        Command::Status { addr, json } => {
            init_logs(cli.log_json, "warn");
            cli::status(&addr, json).await
        }
        Command::Pub {
            server,
            topic,
            message,
        } => {
            init_logs(cli.log_json, "warn");
            cli::publish(&server, &topic, message).await.map(|n| {
                eprintln!("canopy pub: {n} message(s) acknowledged");
            })
        }
        Command::Call {
            server,
            replies,
            method,
            arg,
        } => {
            init_logs(cli.log_json, "warn");
            match cli::call(&server, &method, arg, replies).await {
                Ok(0) => Ok(()),
                Ok(n) => Err(anyhow::anyhow!("{n} call(s) failed")),
                Err(e) => Err(e),
            }
        }
        Command::Sub {
            server,
            pattern,
            json,
            count,
            weak,
        } => {
            init_logs(cli.log_json, "warn");
            cli::subscribe(&server, &pattern, json, count, weak).await
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("canopy: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn load(config: Option<&std::path::Path>) -> anyhow::Result<FileConfig> {
    Ok(match config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    })
}

async fn serve(
    mut file: FileConfig,
    listen: Option<String>,
    name: Option<String>,
    http: Option<String>,
) -> anyhow::Result<()> {
    if listen.is_some() {
        file.listen = listen;
    }
    if name.is_some() {
        file.name = name;
    }
    if http.is_some() {
        file.http = http;
    }
    let config = file.validate(rand::random())?;
    let mut server = runtime::start(config).await?;
    // Tests and scripts read the bound address from this line.
    println!("canopy listening on {}", server.local_addr());
    if let Some(http) = server.http_addr() {
        println!("canopy dashboard on http://{http}/");
    }
    // Ctrl-C, or SIGTERM from a service manager: tell clients and stop.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
        // A server that stops on its own (its hard state cannot be
        // written) exits with the reason.
        r = server.stopped() => return r,
    }
    eprintln!("canopy: shutting down");
    server.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        // Clap checks its definition only when a command is used: every
        // subcommand's here (names that clash with a global option).
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
