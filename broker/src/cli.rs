//! The client-side commands of the `canopy` binary: `pub`, `sub`, `call`
//! and `status`.

use anyhow::Context;
use canopy_client::protocol::Credentials;
use canopy_client::{Client, ClientOptions, Event};
use futures::StreamExt;
use std::io::Write;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Splits `a,b,c` into addresses.
pub fn server_list(servers: &str) -> Vec<String> {
    servers
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// How long the CLI keeps trying when no server answers.
const RECONNECT_FOR: std::time::Duration = std::time::Duration::from_secs(10);

/// The credentials the CLI's clients present (`--token`, or `--user` and
/// `--password`).
static CREDENTIALS: std::sync::OnceLock<Option<Credentials>> = std::sync::OnceLock::new();

/// Sets the credentials the CLI's clients present, once.
pub fn set_credentials(credentials: Option<Credentials>) {
    let _ = CREDENTIALS.set(credentials);
}

/// TLS for the CLI's clients (`--ca`, and `--cert` with `--key`).
static TLS: std::sync::OnceLock<Option<canopy_client::tls::TlsConnector>> =
    std::sync::OnceLock::new();

/// Sets TLS for the CLI's clients from the files given, once.
///
/// # Errors
/// A file that cannot be used, or a certificate without a CA.
pub fn set_tls(
    ca: Option<&std::path::Path>,
    identity: Option<canopy_client::tls::Identity>,
) -> anyhow::Result<()> {
    let tls = match (ca, identity) {
        (None, None) => None,
        (None, Some(_)) => anyhow::bail!(
            "--cert needs --ca: the authority the server's certificate is checked against"
        ),
        (Some(ca), identity) => Some(canopy_client::tls::TlsConnector::from_files(
            ca,
            identity.as_ref(),
        )?),
    };
    let _ = TLS.set(tls);
    Ok(())
}

/// `canopy certs`: a development CA and certificates for a local tree.
///
/// # Errors
/// As [`crate::tls::make_dev_certs`].
pub fn certs(dir: &std::path::Path, users: &[String]) -> anyhow::Result<()> {
    let made = crate::tls::make_dev_certs(dir, users)?;
    for path in &made.written {
        println!("wrote {}", path.display());
    }
    if made.written.is_empty() {
        println!("{}: every file was already there", dir.display());
    }
    Ok(())
}

/// `canopy passwd`: prints an argon2id hash of `password`, or of stdin's
/// first line.
///
/// # Errors
/// When stdin cannot be read or the password is empty.
pub fn passwd(password: Option<String>) -> anyhow::Result<()> {
    let password = match password {
        Some(p) => p,
        None => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading stdin")?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    anyhow::ensure!(!password.is_empty(), "an empty password");
    let hash = crate::auth::hash_password(&password).map_err(anyhow::Error::msg)?;
    println!("{hash}");
    Ok(())
}

async fn connect(servers: &str, name: &str, weak: bool) -> anyhow::Result<Client> {
    let mut options = ClientOptions::new(server_list(servers));
    options.credentials = CREDENTIALS.get().cloned().flatten();
    options.tls = TLS.get().cloned().flatten();
    options.name = name.to_owned();
    options.weak = weak;
    options.reconnect_for = RECONNECT_FOR;
    Client::connect(options).await.map_err(|e| match e {
        canopy_client::Error::Unreachable { .. } => anyhow::Error::new(e).context(format!(
            "is a Canopy server running at {servers}? (start one with `canopy serve`)"
        )),
        e => e.into(),
    })
}

/// `canopy pub`: publishes `message`, or each line of stdin when it is
/// `None`, and returns once every message is acknowledged.
///
/// # Errors
/// When no server is reachable, the topic is invalid, or a publish fails.
pub async fn publish(servers: &str, topic: &str, message: Option<String>) -> anyhow::Result<u64> {
    canopy_client::topic::Topic::new(topic)
        .with_context(|| format!("cannot publish to `{topic}`"))?;
    let client = connect(servers, "canopy-pub", false).await?;
    let mut count = 0u64;
    match message {
        Some(m) => {
            client.publish(topic, m).await?;
            count = 1;
        }
        None => {
            let mut lines = BufReader::new(tokio::io::stdin()).lines();
            while let Some(line) = lines.next_line().await.context("reading stdin")? {
                // Many publishes in flight at once; flush waits for them all.
                client.send(topic, line).await?;
                count += 1;
            }
            client.flush().await?;
        }
    }
    Ok(count)
}

/// Which replies `canopy call` waits for.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum RepliesArg {
    /// The group's reply, from the server the client is attached to.
    Own,
    /// Every replica's (active methods).
    All,
    /// The one more than half the replicas gave (active methods).
    Majority,
}

/// `canopy call`: calls `method` of the core's replicated service with
/// `arg`, or once per line of stdin when it is `None`, printing each reply
/// on a line of its own. Returns how many calls failed (each is reported
/// on stderr).
///
/// # Errors
/// When no server is reachable, or the client fails.
pub async fn call(
    servers: &str,
    method: &str,
    arg: Option<String>,
    replies: RepliesArg,
) -> anyhow::Result<u64> {
    let client = connect(servers, "canopy-call", false).await?;
    let mut failed = 0;
    let mut out = std::io::stdout().lock();
    let args: Vec<String> = match arg {
        Some(a) => vec![a],
        None => {
            let mut v = Vec::new();
            let mut lines = BufReader::new(tokio::io::stdin()).lines();
            while let Some(line) = lines.next_line().await.context("reading stdin")? {
                v.push(line);
            }
            v
        }
    };
    for arg in args {
        let reply = match replies {
            RepliesArg::Own => client.call(method, arg).await,
            RepliesArg::Majority => client.call_majority(method, arg).await,
            RepliesArg::All => client.call_all(method, arg).await.map(|votes| {
                let lines: Vec<String> = votes
                    .iter()
                    .map(|v| match &v.reply {
                        Ok(r) => format!("server {}: {}", v.server, String::from_utf8_lossy(r)),
                        Err(e) => format!("server {}: failed: {e}", v.server),
                    })
                    .collect();
                bytes::Bytes::from(lines.join("\n"))
            }),
        };
        match reply {
            Ok(reply) => {
                out.write_all(&reply)?;
                out.write_all(b"\n")?;
            }
            Err(e @ canopy_client::Error::Call(_)) => {
                failed += 1;
                eprintln!("canopy call {method}: {e}");
            }
            Err(e) => return Err(e).with_context(|| format!("calling `{method}`")),
        }
    }
    out.flush()?;
    Ok(failed)
}

/// `canopy sub`: prints matching messages until `count` were printed (or
/// forever).
///
/// # Errors
/// When no server is reachable, the pattern is invalid, or the client fails.
pub async fn subscribe(
    servers: &str,
    pattern: &str,
    json: bool,
    count: Option<u64>,
    weak: bool,
) -> anyhow::Result<()> {
    canopy_client::topic::Pattern::new(pattern)
        .with_context(|| format!("cannot subscribe to `{pattern}`"))?;
    let client = connect(servers, "canopy-sub", weak).await?;
    let mut sub = client.subscribe(pattern).await?;
    eprintln!("canopy sub: subscribed to {pattern}");
    let mut printed = 0u64;
    let stdout = std::io::stdout();
    while count.is_none_or(|c| printed < c) {
        let Some(event) = sub.next().await else {
            anyhow::bail!("the connection to the server ended");
        };
        let mut out = stdout.lock();
        match event {
            Event::Message(m) => {
                let payload = String::from_utf8_lossy(&m.payload);
                if json {
                    let line = serde_json::json!({
                        "seq": m.seq.0,
                        "topic": m.topic(),
                        "payload": payload,
                        "publisher": m.publisher.to_string(),
                        "pub_seq": m.pub_seq.0,
                    });
                    writeln!(out, "{line}")?;
                } else {
                    writeln!(out, "{} {} {}", m.seq, m.topic(), payload)?;
                }
                printed += 1;
            }
            // Membership views come only with `full` reports.
            Event::View(_) => {}
            Event::Gap { from, to } => {
                eprintln!("canopy sub: messages {from}..={to} may have been missed (gap)");
                if json {
                    writeln!(
                        out,
                        "{}",
                        serde_json::json!({"event": "gap", "from": from.0, "to": to.0})
                    )?;
                }
            }
            Event::Diverged { from, seen } => {
                eprintln!("canopy sub: messages from {from} on were not the agreed stream (seen at {seen}); the agreed stream follows");
                if json {
                    writeln!(
                        out,
                        "{}",
                        serde_json::json!({"event": "diverged", "from": from.0, "seen": seen.0})
                    )?;
                }
            }
            Event::StreamReset => {
                eprintln!(
                    "canopy sub: the server restarted its stream; sequence numbers start again"
                );
                if json {
                    writeln!(out, "{}", serde_json::json!({"event": "stream_reset"}))?;
                }
            }
        }
        out.flush()?;
    }
    Ok(())
}

/// Fetches `path` from a node's HTTP address; returns the body of a 200.
async fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    let addr = addr.trim_start_matches("http://").trim_end_matches('/');
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        // HTTP/1.0 keeps the answer simple: no chunking, closed at the end.
        // `--token` opens a node that checks who reads it.
        let bearer = match CREDENTIALS.get().cloned().flatten() {
            Some(Credentials::Token(t)) => format!("Authorization: Bearer {t}\r\n"),
            _ => String::new(),
        };
        let request = format!(
            "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: application/json\r\n{bearer}\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.take(64 << 20).read_to_end(&mut answer).await?;
        anyhow::Ok(answer)
    };
    let answer = tokio::time::timeout(std::time::Duration::from_secs(10), fetch)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {addr} within 10 s"))?
        .with_context(|| format!("is a Canopy node serving HTTP at {addr}? (its `http` setting, default 127.0.0.1:8080)"))?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("{addr} did not answer with HTTP"))?;
    let status_line = head.lines().next().unwrap_or_default();
    anyhow::ensure!(
        status_line.split_whitespace().nth(1) == Some("200"),
        "{addr}{path} answered `{status_line}`"
    );
    Ok(body.to_owned())
}

/// `canopy status`: a node's facts in the terminal.
///
/// # Errors
/// When the node cannot be reached or answers something else than its API.
pub async fn status(addr: &str, json: bool) -> anyhow::Result<()> {
    let body = http_get(addr, "/api/snapshot").await?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let s: serde_json::Value =
        serde_json::from_str(&body).context("the node's snapshot is not JSON")?;
    let st = &s["status"];
    let c = &s["counters"];
    let r = &s["rates"];
    use std::fmt::Write as _;
    let mut out = String::new();
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    let _ = writeln!(
        out,
        "{} ({}) version {}, up {:.0} s, clients on {}",
        st["name"].as_str().unwrap_or("?"),
        st["role"].as_str().unwrap_or("?"),
        st["version"].as_str().unwrap_or("?"),
        num(&st["uptime_secs"]),
        st["listen"].as_str().unwrap_or("?")
    );
    let members: Vec<&str> = s["view"]["members"]
        .as_array()
        .map_or_else(Vec::new, |m| m.iter().filter_map(|v| v.as_str()).collect());
    let _ = writeln!(out, "view {}: {}", s["view"]["id"], members.join(", "));
    let _ = writeln!(
        out,
        "head seq {}   clients {}   published {}   delivered {}   retained {}",
        st["head_seq"], st["clients"], c["published"], c["delivered"], c["retained"]
    );
    let _ = writeln!(
        out,
        "rates: {:.0} msgs/s in, {:.0} deliveries/s out, {:.0} bytes/s out",
        num(&r["msgs_in"]),
        num(&r["msgs_out"]),
        num(&r["bytes_out"])
    );
    let _ = writeln!(
        out,
        "slow consumers cut {}   gap notices {}   bad input {}   deepest queue {} frames",
        c["slow_consumers"], c["gaps"], c["bad_input"], c["queue_depth_max"]
    );
    let _ = writeln!(out, "tree:");
    print_tree(&mut out, &s["tree"], 1);
    if let Some(topics) = s["topics"].as_array().filter(|t| !t.is_empty()) {
        let _ = writeln!(out, "busiest topics:");
        for t in topics.iter().take(10) {
            let _ = writeln!(
                out,
                "  {:<40} {:>10.0} msgs/s {:>12} total",
                t["topic"].as_str().unwrap_or("?"),
                num(&t["msgs_per_sec"]),
                t["msgs"]
            );
        }
    }
    if let Some(calls) = s["calls"].as_array().filter(|c| !c.is_empty()) {
        let _ = writeln!(
            out,
            "replicated calls:\n  {:<16} {:<15} {:>9} {:>7} {:>9} {:>10} {:>9} {:>10}",
            "method", "mode", "applied", "failed", "executed", "reassigned", "replied", "mean ms"
        );
        for c in calls {
            let l = &c["latency"];
            let replied = l["count"].as_u64().unwrap_or(0);
            let mean = match replied {
                0 => 0.0,
                n => num(&l["sum"]) / n as f64 * 1000.0,
            };
            let _ = writeln!(
                out,
                "  {:<16} {:<15} {:>9} {:>7} {:>9} {:>10} {:>9} {:>10.2}",
                c["method"].as_str().unwrap_or("?"),
                c["mode"].as_str().unwrap_or(""),
                c["applied"].as_u64().unwrap_or(0),
                c["failed"].as_u64().unwrap_or(0),
                c["executed"].as_u64().unwrap_or(0),
                c["reassigned"].as_u64().unwrap_or(0),
                replied,
                mean
            );
        }
    }
    if let Some(events) = s["events"].as_array().filter(|e| !e.is_empty()) {
        let _ = writeln!(out, "recent events:");
        for e in events.iter().rev().take(10) {
            let _ = writeln!(
                out,
                "  {:>8.1} s  {:<14} {}",
                num(&e["at_secs"]),
                e["kind"].as_str().unwrap_or("?"),
                e["detail"].as_str().unwrap_or("")
            );
        }
    }
    // Written at once; a reader that went away (`| head`) is not an error.
    use std::io::Write as _;
    let _ = std::io::stdout().write_all(out.as_bytes());
    Ok(())
}

fn print_tree(out: &mut String, node: &serde_json::Value, depth: usize) {
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "{}{} [{}] {} clients",
        "  ".repeat(depth),
        node["name"].as_str().unwrap_or("?"),
        node["role"].as_str().unwrap_or("?"),
        node["clients"]
    );
    for child in node["children"].as_array().into_iter().flatten() {
        print_tree(out, child, depth + 1);
    }
}
