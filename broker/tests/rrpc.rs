//! Replicated RPC over real processes (docs/DESIGN.md, "Replicated RPC").
//!
//! For each mode of the `kv` service, callers at the core and at relays
//! call it while a replica is `kill -9`ed (`core-3`), and separately while
//! their own server is (`core-1`: the view's primary and coordinator, the
//! direct callers' server and the relays' first upstream). Every call must
//! complete; every reply must be the one a sequential execution in the
//! group's order gives, and every surviving replica must end with the
//! state digest of that execution. Active calls (with the server's reply,
//! every replica's, or a majority's) all `put` one key and are answered
//! the value they replaced, so their replies spell out the order the group
//! executed them in: it must be one order of all of them. The other modes'
//! calls use keys of their own per caller (their effects commute, the
//! order is not visible in replies): a local `Kv` applies each caller's
//! calls in order.

mod common;

use bytes::Bytes;
use canopy_broker::core::rrpc::{Call, CallId, Service};
use canopy_broker::services::kv::Kv;
use canopy_client::protocol::{CallErrorCode, PubSeq, PublisherId};
use canopy_client::{Client, ClientOptions};
use common::{within_for, Tree};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const TIME_MAX: Duration = Duration::from_secs(120);
/// Calls per caller.
const CALLS: usize = 24;
/// Calls completed (all callers) before the victim is killed.
const KILL_AFTER: usize = 30;

/// One call and what it answered.
struct Done {
    method: &'static str,
    arg: String,
    reply: Bytes,
}

/// The `i`th call of caller `name` in `mode`.
fn call_for(mode: &str, name: &str, i: usize) -> (&'static str, String) {
    match mode {
        "active" | "active, every reply" | "active, a majority's reply" => {
            ("put", format!("{SHARED} {name}.{i}"))
        }
        "primary-backup" => ("stamp", format!("{name}.t{i}")),
        "load-balanced" => ("hash", format!("{name}.h{i} 20000 text-{name}-{i}")),
        "parallel" => ("primes", format!("{}", 2_000 + 37 * i + name.len())),
        other => panic!("no mode {other}"),
    }
}

/// The key every active call puts to.
const SHARED: &str = "shared";

/// Active calls all `put` one key, and each answers the value it replaced:
/// the replies must link every call into one sequence from the empty
/// value (one order of execution, the group's: no put replaced a value
/// another put also replaced, none is missing, none ran twice). Returns
/// the last value, which the replicas must hold.
fn one_order(mode: &str, puts: &[Done]) -> String {
    let mut next: HashMap<String, String> = HashMap::new();
    for d in puts {
        let (_, value) = d.arg.split_once(' ').expect("KEY VALUE");
        let before = String::from_utf8(d.reply.to_vec()).expect("text");
        if let Some(other) = next.insert(before.clone(), value.to_owned()) {
            panic!("{mode}: `{value}` and `{other}` both replaced `{before}`: no one order");
        }
    }
    let (mut at, mut n) = (String::new(), 0);
    while let Some(v) = next.get(&at).filter(|_| n <= puts.len()) {
        at = v.clone();
        n += 1;
    }
    assert_eq!(
        n,
        puts.len(),
        "{mode}: one order links {n} of {} puts",
        puts.len()
    );
    at
}

fn primes_below(n: u64) -> u64 {
    (2..n)
        .filter(|&k| (2..).take_while(|d| d * d <= k).all(|d| k % d != 0))
        .count() as u64
}

/// Applies `done` to the model as the group would have: the effect is what
/// the executor computed (the reply, for `stamp` and `primes`; the
/// argument's own work otherwise). Returns the model's reply.
fn model_apply(model: &Kv, d: &Done) -> Bytes {
    let call = Call {
        id: CallId {
            publisher: PublisherId(1),
            pub_seq: PubSeq(1),
        },
        method: d.method,
        payload: d.arg.as_bytes(),
        share: None,
    };
    let effect = match d.method {
        "stamp" | "primes" => d.reply.clone(),
        "put" | "hash" => model.execute(&call).expect("the model executes"),
        other => panic!("no method {other}"),
    };
    model.apply(&call, &effect).expect("the model applies")
}

async fn caller(
    name: String,
    servers: Vec<String>,
    mode: &'static str,
    completed: Arc<AtomicUsize>,
) -> Vec<Done> {
    let mut options = ClientOptions::new(servers);
    options.name = name.clone();
    options.reconnect_for = Duration::from_secs(60);
    options.call_timeout = Duration::from_secs(60);
    let client = Client::connect(options).await.expect("caller connects");
    let mut done = Vec::with_capacity(CALLS);
    for i in 0..CALLS {
        let (method, arg) = call_for(mode, &name, i);
        let failed =
            |e: &dyn std::fmt::Display| -> ! { panic!("{name}: call {i} ({method} {arg}): {e}") };
        let reply = match mode {
            "active, every reply" => {
                let votes = client
                    .call_all(method, arg.clone())
                    .await
                    .unwrap_or_else(|e| failed(&e));
                // Every replica that stayed in the view, each once, all
                // with the same reply (two at least: one may be killed).
                let servers: std::collections::BTreeSet<u32> =
                    votes.iter().map(|v| v.server).collect();
                assert!(
                    votes.len() >= 2 && servers.len() == votes.len(),
                    "{name}: call {i}: votes {votes:?}"
                );
                assert!(
                    votes.iter().all(|v| v.reply == votes[0].reply),
                    "{name}: call {i}: replicas replied otherwise: {votes:?}"
                );
                votes[0].reply.clone().unwrap_or_else(|e| failed(&e))
            }
            "active, a majority's reply" => client
                .call_majority(method, arg.clone())
                .await
                .unwrap_or_else(|e| failed(&e)),
            _ => client
                .call(method, arg.clone())
                .await
                .unwrap_or_else(|e| failed(&e)),
        };
        done.push(Done { method, arg, reply });
        completed.fetch_add(1, Ordering::SeqCst);
        // Calls spread over the kill.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    done
}

async fn digest_at(server: &str) -> String {
    let mut options = ClientOptions::new([server.to_owned()]);
    options.reconnect_for = Duration::from_secs(5);
    let client = Client::connect(options)
        .await
        .expect("connects for the digest");
    let reply = client.call("digest", "").await.expect("digest");
    String::from_utf8(reply.to_vec()).expect("text")
}

async fn run(mode: &'static str, victim: &str) {
    let tree = Tree::start_with(3, &[2], "service = \"kv\"");
    let (c, r) = (&tree.core, &tree.tiers[0]);
    let places = [
        ("core1a", vec![c[0].clone(), c[1].clone(), c[2].clone()]),
        ("core1b", vec![c[0].clone(), c[1].clone(), c[2].clone()]),
        ("core2", vec![c[1].clone(), c[2].clone(), c[0].clone()]),
        ("relay1", vec![r[0].clone(), r[1].clone()]),
        ("relay2", vec![r[1].clone(), r[0].clone()]),
    ];
    if mode == "active, every reply" {
        // Only active methods run at every replica.
        let client = Client::connect(ClientOptions::new([c[0].clone()]))
            .await
            .expect("connects");
        match client.call_all("hash", "k 10 t").await {
            Err(canopy_client::Error::Call(f)) => assert_eq!(f.code, CallErrorCode::NotActive),
            other => panic!("every reply of a load-balanced call: {other:?}"),
        }
    }
    let completed = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (name, servers) in places {
        let task = caller(name.to_owned(), servers, mode, completed.clone());
        tasks.push((name, tokio::spawn(task)));
    }
    within_for(TIME_MAX, "calls before the kill", async {
        while completed.load(Ordering::SeqCst) < KILL_AFTER {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    tree.kill(victim);
    let model = Kv::default();
    let mut puts = Vec::new();
    for (name, task) in tasks {
        let done = within_for(TIME_MAX, "the callers", task)
            .await
            .expect("caller task");
        assert_eq!(done.len(), CALLS, "{name}: every call completed");
        if mode.starts_with("active") {
            puts.extend(done);
            continue;
        }
        for (i, d) in done.iter().enumerate() {
            let want = model_apply(&model, d);
            assert_eq!(
                d.reply, want,
                "{mode}: {name}'s call {i} ({} {}) answered otherwise than a sequential execution",
                d.method, d.arg
            );
            if d.method == "primes" {
                let n: u64 = d.arg.parse().expect("a number");
                assert_eq!(d.reply, Bytes::from(primes_below(n).to_string()));
            }
        }
    }
    if mode.starts_with("active") {
        let last = one_order(mode, &puts);
        model_apply(
            &model,
            &Done {
                method: "put",
                arg: format!("{SHARED} {last}"),
                reply: Bytes::new(),
            },
        );
    }
    let want = format!("{:016x}", model.digest());
    for (i, addr) in c.iter().enumerate() {
        if format!("core-{}", i + 1) == victim {
            continue;
        }
        let got = within_for(TIME_MAX, "a digest", digest_at(addr)).await;
        assert_eq!(got, want, "{mode}: core-{}'s state", i + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_calls_survive_a_replica_kill() {
    run("active", "core-3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_calls_survive_their_servers_kill() {
    run("active", "core-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replicas_reply_survives_a_replica_kill() {
    run("active, every reply", "core-3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_majoritys_reply_survives_their_servers_kill() {
    run("active, a majority's reply", "core-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_backup_calls_survive_a_replica_kill() {
    run("primary-backup", "core-3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_backup_calls_survive_their_servers_and_the_primarys_kill() {
    run("primary-backup", "core-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balanced_calls_survive_a_replica_kill() {
    run("load-balanced", "core-3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balanced_calls_survive_their_servers_kill() {
    run("load-balanced", "core-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_calls_survive_a_replica_kill() {
    run("parallel", "core-3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_calls_survive_their_servers_kill() {
    run("parallel", "core-1").await;
}
