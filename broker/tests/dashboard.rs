//! The dashboard of a real node, in headless Chromium, while messages flow.
//!
//! Needs Debian's `chromium`. Without it the browser test says so and passes
//! unless `CANOPY_REQUIRE_BROWSER=1` is set, as `.ci/run` does after
//! installing Chromium, so CI always runs it for real.

mod common;

use base64::Engine;
use common::{http_get, within, within_for, Server};
use futures::{SinkExt, StreamExt};
use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// The bound on each of Chromium's first steps: its start, and its first
/// page. A first start after a fresh install, on a loaded 2-core machine,
/// has taken longer than the tests' usual [`common::WAIT`] in CI; a
/// browser's start is not what this test measures.
const BROWSER_START: Duration = Duration::from_secs(120);

/// The lines of Chromium's stderr kept for a failure message.
const BROWSER_LINES_KEPT: usize = 40;

/// Reads Chromium's stderr until it closes (lines that are not UTF-8
/// included): sends the DevTools `host:port` once it is announced and
/// keeps the last [`BROWSER_LINES_KEPT`] lines.
async fn read_browser_stderr(
    mut stderr: BufReader<tokio::process::ChildStderr>,
    said: Arc<Mutex<VecDeque<String>>>,
    address: tokio::sync::oneshot::Sender<String>,
) {
    let mut address = Some(address);
    let mut raw = Vec::new();
    while let Ok(n @ 1..) = stderr.read_until(b'\n', &mut raw).await {
        let line = String::from_utf8_lossy(&raw[..n]).trim_end().to_owned();
        raw.clear();
        if let Some(rest) = line.strip_prefix("DevTools listening on ws://") {
            if let (Some(tx), Some(host_port)) = (address.take(), rest.split('/').next()) {
                let _ = tx.send(host_port.to_owned());
            }
        }
        if let Ok(mut said) = said.lock() {
            if said.len() == BROWSER_LINES_KEPT {
                said.pop_front();
            }
            said.push_back(line);
        }
    }
}

fn chromium() -> Option<&'static str> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
}

/// A page driven over the Chrome DevTools Protocol.
struct Page {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl Page {
    async fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = serde_json::json!({ "id": id, "method": method, "params": params });
        self.ws
            .send(WsMessage::text(msg.to_string()))
            .await
            .expect("send to browser");
        loop {
            let frame = within("a browser answer", self.ws.next())
                .await
                .expect("browser connection open")
                .expect("browser frame");
            let WsMessage::Text(text) = frame else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(&text).expect("CDP JSON");
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method} failed: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates a JavaScript expression and returns its JSON value.
    async fn eval(&mut self, expression: &str) -> serde_json::Value {
        let r = self
            .call(
                "Runtime.evaluate",
                serde_json::json!({ "expression": expression, "returnByValue": true }),
            )
            .await;
        r["result"]["value"].clone()
    }
}

const READ_PAGE: &str = r#"JSON.stringify({
  live: document.getElementById('conn').textContent,
  nodes: document.querySelectorAll('#tree .tree-node').length,
  treeClients: Array.from(document.querySelectorAll('#tree .tree-node')).map(n => +n.dataset.clients),
  clients: document.getElementById('clients-count').textContent,
  rateIn: document.getElementById('rate-in').textContent,
  head: +document.getElementById('head-seq').textContent,
  topics: document.getElementById('topics').textContent,
  badInput: document.getElementById('bad-input').textContent
})"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_the_tree_counts_and_live_rates_in_a_browser() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var_os("CANOPY_REQUIRE_BROWSER").is_none(),
            "CANOPY_REQUIRE_BROWSER is set but Chromium is not installed"
        );
        eprintln!("skipping: Chromium not installed (apt-get install chromium)");
        return;
    };
    let server = Server::with_http();
    let http = server.http.clone().expect("HTTP on");

    // Three subscribers and a publisher that keeps a steady stream going
    // until the test ends (bounded in count as well).
    let mut clients = Vec::new();
    let mut subs = Vec::new();
    for _ in 0..3 {
        let c = server.client().await;
        subs.push(c.subscribe("plant.>").await.expect("subscribe"));
        clients.push(c);
    }
    let publisher = server.client().await;
    let stop = Arc::new(AtomicBool::new(false));
    let flowing = {
        let stop = stop.clone();
        tokio::spawn(async move {
            for i in 0..200_000u64 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                publisher
                    .publish("plant.line3.temp", format!("{i}"))
                    .await
                    .expect("publish");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let draining: Vec<_> = subs
        .into_iter()
        .map(|mut s| tokio::spawn(async move { while s.next().await.is_some() {} }))
        .collect();

    let profile = std::env::temp_dir().join(format!("canopy-chromium-{}", std::process::id()));
    let mut chrome = tokio::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-port=0",
            "--window-size=1280,900",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("http://{http}/"))
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start chromium");
    // Chromium's stderr is read to its end by a task of its own, so that
    // the browser never blocks on a full pipe; the task hands over the
    // DevTools address and keeps the last lines for a failure message.
    let stderr = BufReader::new(chrome.stderr.take().expect("stderr"));
    let said = Arc::new(Mutex::new(VecDeque::new()));
    let (address_tx, address_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(read_browser_stderr(stderr, said.clone(), address_tx));
    let devtools = match tokio::time::timeout(BROWSER_START, address_rx).await {
        Ok(Ok(address)) => address,
        failed => {
            let said = said.lock().map(|s| s.clone()).unwrap_or_default();
            let said: Vec<String> = said.into();
            panic!(
                "no DevTools address from Chromium ({}); its last lines:\n{}",
                match failed {
                    Ok(_) => "it exited".to_owned(),
                    Err(_) => format!("timed out after {BROWSER_START:?}"),
                },
                said.join("\n")
            )
        }
    };
    let page_ws = within_for(BROWSER_START, "the page target", async {
        loop {
            let raw = http_get(&devtools, "/json/list").await;
            let list: serde_json::Value = serde_json::from_str(&raw).unwrap_or_default();
            let found = list.as_array().and_then(|targets| {
                targets
                    .iter()
                    .find(|t| {
                        t["type"] == "page" && t["url"].as_str().is_some_and(|u| u.contains(&http))
                    })
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_owned))
            });
            match found {
                Some(ws) => break ws,
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    let (ws, _) = tokio_tungstenite::connect_async(&page_ws)
        .await
        .expect("connect to the page");
    let mut page = Page { ws, next_id: 0 };

    // Wait until the page is live and shows the tree, the counts and a rate.
    let read = |v: serde_json::Value| -> serde_json::Value {
        serde_json::from_str(v.as_str().unwrap_or("{}")).unwrap_or_default()
    };
    let first = within("the dashboard to show the node live", async {
        loop {
            let v = read(page.eval(READ_PAGE).await);
            let rate: f64 = v["rateIn"]
                .as_str()
                .and_then(|r| r.parse().ok())
                .unwrap_or(0.0);
            if v["live"] == "live" && v["nodes"] == 1 && v["clients"] == "4" && rate > 0.0 {
                break v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(
        first["treeClients"],
        serde_json::json!([4]),
        "the tree node carries the client count"
    );
    assert!(first["topics"]
        .as_str()
        .is_some_and(|t| t.contains("plant.line3.temp")));

    // Live: the head advances without a reload while messages flow.
    let later = within("the dashboard to update without a reload", async {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let v = read(page.eval(READ_PAGE).await);
            if v["head"].as_u64() > first["head"].as_u64() {
                break v;
            }
        }
    })
    .await;
    assert_eq!(later["live"], "live");

    // A client that sends garbage shows up among the refused.
    let mut bad = tokio::net::TcpStream::connect(&server.addr)
        .await
        .expect("connects");
    bad.write_all(&[0, 0, 0, 3, 0xee, 1, 2])
        .await
        .expect("writes");
    within("the refusal on the page", async {
        loop {
            let v = read(page.eval(READ_PAGE).await);
            if v["badInput"] == "1" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;

    let shot = page
        .call(
            "Page.captureScreenshot",
            serde_json::json!({ "format": "png" }),
        )
        .await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().expect("screenshot data"))
        .expect("base64");
    let artifact = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&artifact, &png).expect("write screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    eprintln!("dashboard screenshot: {}", artifact.display());

    stop.store(true, Ordering::Relaxed);
    within("the publisher to stop", flowing)
        .await
        .expect("publisher task");
    for d in draining {
        d.abort();
    }
    let _ = chrome.kill().await;
    let _ = std::fs::remove_dir_all(&profile);
}

#[tokio::test]
async fn canopy_status_prints_the_node_facts() {
    let server = Server::with_http();
    let client = server.client().await;
    let _sub = client.subscribe("x.>").await.expect("subscribe");
    client.publish("x.y", "1").await.expect("publish");
    // The snapshot is rebuilt every second: wait until it shows the publish.
    let http = server.http.clone().expect("HTTP on");
    within("the snapshot to show the publish", async {
        loop {
            let body = http_get(&http, "/api/status").await;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            // Seq 1 is the client's attach (membership is ordered too).
            if v["head_seq"] == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_canopy"))
        .args(["status", &http])
        .output()
        .await
        .expect("run canopy status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("(core)"), "{text}");
    assert!(text.contains("head seq 2"), "{text}");
    assert!(text.contains("clients 1"), "{text}");
    assert!(text.contains("x.y"), "{text}");

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_canopy"))
        .args(["status", "127.0.0.1:1"])
        .output()
        .await
        .expect("run canopy status");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is a Canopy node serving HTTP"));
}

#[tokio::test]
async fn metrics_from_a_live_node_parse_and_count_what_happened() {
    let server = Server::with_http();
    let client = server.client().await;
    let mut sub = client.subscribe("m.>").await.expect("subscribe");
    for i in 0..10 {
        client
            .publish("m.x", format!("{i}"))
            .await
            .expect("publish");
    }
    common::take_messages(&mut sub, 10).await;
    let http = server.http.clone().expect("HTTP on");
    let body = within("metrics to count the publishes", async {
        loop {
            let body = http_get(&http, "/metrics").await;
            if body.contains("canopy_messages_published_total 10") {
                break body;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let scrape =
        prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("parses");
    let value = |name: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
                _ => f64::NAN,
            })
    };
    assert_eq!(value("canopy_messages_delivered_total"), Some(10.0));
    assert_eq!(value("canopy_clients"), Some(1.0));
    assert!(value("canopy_received_bytes_total").is_some_and(|b| b >= 10.0));
}
