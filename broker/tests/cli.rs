//! The `canopy` command line against a real server process.

mod common;

use common::{within, Server};
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

fn canopy() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_canopy"));
    c.kill_on_drop(true);
    c
}

/// Starts `canopy sub` and waits until it reports its subscription.
async fn sub(args: &[&str]) -> (Child, BufReader<tokio::process::ChildStdout>) {
    let mut child = canopy()
        .arg("sub")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start canopy sub");
    let mut err = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let line = within("canopy sub to subscribe", err.next_line())
        .await
        .expect("read stderr")
        .expect("a line");
    assert!(line.starts_with("canopy sub: subscribed to"), "{line}");
    let out = BufReader::new(child.stdout.take().expect("stdout"));
    (child, out)
}

async fn read_lines(out: &mut BufReader<tokio::process::ChildStdout>, n: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for _ in 0..n {
        let mut l = String::new();
        within("a line from canopy sub", out.read_line(&mut l))
            .await
            .expect("read");
        lines.push(l.trim_end().to_owned());
    }
    lines
}

#[tokio::test]
async fn pub_and_sub_print_messages_as_text_and_json() {
    let server = Server::start();
    let (mut text_child, mut text) =
        sub(&["--server", &server.addr, "demo.>", "--count", "3"]).await;
    // (Weak delivery: on one server the same stream, as soon as ordered.)
    let (mut json_child, mut json) =
        sub(&["--server", &server.addr, "demo.*.c", "--json", "--weak"]).await;
    let status = canopy()
        .args(["pub", "--server", &server.addr, "demo.a", "hello world"])
        .status()
        .await
        .expect("run canopy pub");
    assert!(status.success());
    let mut publisher = canopy()
        .args(["pub", "--server", &server.addr, "demo.b.c"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("start canopy pub");
    let mut stdin = publisher.stdin.take().expect("stdin");
    stdin
        .write_all(b"line one\nline two\n")
        .await
        .expect("write stdin");
    drop(stdin);
    assert!(within("canopy pub", publisher.wait())
        .await
        .expect("wait")
        .success());

    let lines = read_lines(&mut text, 3).await;
    // Seqs ascend, but not from 1: clients attaching are ordered too.
    let seqs: Vec<u64> = lines.iter().map(|l| seq_of(l)).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{lines:?}");
    assert_eq!(
        without_seqs(&lines),
        [
            "demo.a hello world",
            "demo.b.c line one",
            "demo.b.c line two"
        ]
    );
    assert!(within("sub --count to exit", text_child.wait())
        .await
        .expect("wait")
        .success());

    let lines = read_lines(&mut json, 2).await;
    let first: serde_json::Value = serde_json::from_str(&lines[0]).expect("JSON line");
    assert_eq!(first["seq"], seqs[1]);
    assert_eq!(first["topic"], "demo.b.c");
    assert_eq!(first["payload"], "line one");
    let second: serde_json::Value = serde_json::from_str(&lines[1]).expect("JSON line");
    assert_eq!(second["payload"], "line two");
    json_child.kill().await.expect("kill");
}

/// The seq at the start of a `canopy sub` line.
fn seq_of(line: &str) -> u64 {
    let first = line.split(' ').next().unwrap_or_default();
    first.parse().expect("a line starts with its seq")
}

/// The lines without their leading seqs.
fn without_seqs(lines: &[String]) -> Vec<&str> {
    lines
        .iter()
        .map(|l| l.split_once(' ').map_or("", |(_, rest)| rest))
        .collect()
}

#[tokio::test]
async fn cli_fails_over_past_a_dead_address() {
    let server = Server::start();
    // A port nothing listens on: bind, note, release.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let servers = format!("{dead},{}", server.addr);
    let (mut child, mut out) = sub(&["--server", &servers, "x", "--count", "1"]).await;
    let status = canopy()
        .args(["pub", "--server", &servers, "x", "via the second address"])
        .status()
        .await
        .expect("run canopy pub");
    assert!(status.success());
    assert_eq!(
        without_seqs(&read_lines(&mut out, 1).await),
        ["x via the second address"]
    );
    assert!(within("sub to exit", child.wait())
        .await
        .expect("wait")
        .success());
}

#[tokio::test]
async fn cli_errors_say_what_to_do() {
    let out = canopy()
        .args(["pub", "--server", "127.0.0.1:1", "bad..topic", "x"])
        .output()
        .await
        .expect("run canopy pub");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad..topic") && err.contains("empty token"),
        "{err}"
    );

    let out = canopy()
        .args(["serve", "--config", "/nonexistent/canopy.toml"])
        .output()
        .await
        .expect("run canopy serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/canopy.toml"), "{err}");
}

/// A core server whose hard state file is damaged does not start as a new
/// server (it would forget its promises): `canopy serve` exits naming the
/// file.
#[tokio::test]
async fn a_core_server_with_a_damaged_hard_state_does_not_start() {
    let data = common::data_dir();
    std::fs::create_dir_all(&data).expect("mkdir");
    let file = data.join("hard-state.cbor");
    std::fs::write(&file, b"\xa3 not a hard state").expect("write");
    let peer = common::free_port();
    let config = data.join("s1.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {}\n[core]\nid = 1\n[[core.servers]]\nid = 1\npeer = \"{peer}\"\nclient = \"127.0.0.1:0\"\n",
            toml::Value::String(data.display().to_string())
        ),
    )
    .expect("write config");
    let out = within(
        "canopy serve to refuse",
        canopy()
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--http",
                "off",
                "--config",
            ])
            .arg(&config)
            .output(),
    )
    .await
    .expect("run canopy serve");
    let _ = std::fs::remove_dir_all(&data);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&file.display().to_string()) && err.contains("hard state"),
        "{err}"
    );
}

/// `canopy sub` and `canopy pub` given a 3-server core's addresses fail over
/// when the server they use is killed: the subscriber's sequence goes on
/// with every line once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_and_sub_fail_over_between_core_servers() {
    let mut cluster = common::Cluster::start(3, "");
    let all = cluster.addrs_from(0).join(",");
    let (mut sub_child, mut out) = sub(&["--server", &all, "demo.>", "--count", "200"]).await;
    let mut publisher = canopy()
        .args(["pub", "--server", &all, "demo.n"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start canopy pub");
    let mut stdin = publisher.stdin.take().expect("stdin");
    for i in 0..100 {
        stdin
            .write_all(format!("{i}\n").as_bytes())
            .await
            .expect("write");
    }
    stdin.flush().await.expect("flush");
    let first = read_lines(&mut out, 100).await;
    // Both use the first address: kill that server.
    cluster.kill(0);
    for i in 100..200 {
        stdin
            .write_all(format!("{i}\n").as_bytes())
            .await
            .expect("write");
    }
    drop(stdin);
    let rest = read_lines(&mut out, 100).await;
    let payloads: Vec<String> = first
        .iter()
        .chain(&rest)
        .map(|l| l.split(' ').nth(2).unwrap_or_default().to_owned())
        .collect();
    let expected: Vec<String> = (0..200).map(|i| i.to_string()).collect();
    assert_eq!(payloads, expected, "every line once, in order");
    let status = within("canopy pub to finish", publisher.wait())
        .await
        .expect("wait");
    assert!(status.success(), "canopy pub acknowledged everything");
    let status = within("canopy sub to exit after --count", sub_child.wait())
        .await
        .expect("wait");
    assert!(status.success());
}
