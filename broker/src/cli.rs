//! The client-side commands of the `canopy` binary: `pub` and `sub`.

use anyhow::Context;
use canopy_client::{Client, ClientOptions, Event};
use futures::StreamExt;
use std::io::Write;
use tokio::io::{AsyncBufReadExt, BufReader};

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

async fn connect(servers: &str, name: &str) -> anyhow::Result<Client> {
    let mut options = ClientOptions::new(server_list(servers));
    options.name = name.to_owned();
    options.reconnect_for = RECONNECT_FOR;
    Client::connect(options).await.with_context(|| {
        format!("is a Canopy server running at {servers}? (start one with `canopy serve`)")
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
    let client = connect(servers, "canopy-pub").await?;
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
) -> anyhow::Result<()> {
    canopy_client::topic::Pattern::new(pattern)
        .with_context(|| format!("cannot subscribe to `{pattern}`"))?;
    let client = connect(servers, "canopy-sub").await?;
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
