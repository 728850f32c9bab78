//! API tests against the router with a fixed snapshot.

use super::*;
use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use tower::ServiceExt;

fn sample() -> Snapshot {
    let mut latency = Histogram::new(&[0.001, 0.01, 0.1]);
    latency.observe(0.0005);
    latency.observe(0.005);
    Snapshot {
        status: Status {
            role: "core".into(),
            name: "n1".into(),
            stream: "abc".into(),
            version: "0.1.0".into(),
            uptime_secs: 12.5,
            listen: "127.0.0.1:4400".into(),
            head_seq: 42,
            clients: 3,
        },
        view: View {
            id: 1,
            members: vec!["n1".into()],
            installed_secs: 0.0,
        },
        views: vec![],
        clients: (1..=3)
            .map(|i| ClientInfo {
                session: i,
                name: format!("c{i}"),
                lag: 10 - i,
                queue_depth: i as usize,
                ..ClientInfo::default()
            })
            .collect(),
        topics: vec![TopicInfo {
            topic: "md.x".into(),
            msgs: 42,
            bytes: 420,
            msgs_per_sec: 4.0,
            bytes_per_sec: 40.0,
        }],
        tree: TreeNode {
            name: "n1".into(),
            role: "core".into(),
            clients: 3,
            children: vec![],
        },
        events: vec![EventInfo {
            at_secs: 1.0,
            kind: "connect".into(),
            detail: "session 1".into(),
        }],
        counters: Counters {
            published: 42,
            ..Counters::default()
        },
        rates: Rates::default(),
        calls: vec![CallInfo {
            method: "put".into(),
            mode: "active".into(),
            applied: 7,
            failed: 1,
            executed: 7,
            reassigned: 0,
            latency: latency.clone(),
        }],
        latency,
    }
}

async fn get(path: &str) -> (StatusCode, String, Option<String>) {
    let (_tx, rx) = watch::channel(Arc::new(sample()));
    let response = router(rx)
        .oneshot(Request::get(path).body(Body::empty()).expect("request"))
        .await
        .expect("router answers");
    read(response).await
}

/// A response's status, body text and content type.
async fn read(response: Response) -> (StatusCode, String, Option<String>) {
    let status = response.status();
    let ctype = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), ctype)
}

async fn get_json(path: &str) -> serde_json::Value {
    let (status, body, _) = get(path).await;
    assert_eq!(status, StatusCode::OK, "{path}: {body}");
    serde_json::from_str(&body).expect("JSON body")
}

#[tokio::test]
async fn every_endpoint_answers_with_its_facts() {
    let s = get_json("/api/status").await;
    assert_eq!(
        (
            s["role"].as_str(),
            s["name"].as_str(),
            s["head_seq"].as_u64()
        ),
        (Some("core"), Some("n1"), Some(42))
    );
    assert_eq!(s["view"]["members"][0], "n1");
    assert_eq!(s["counters"]["published"], 42);
    assert_eq!(get_json("/api/view").await["current"]["id"], 1);
    let c = get_json("/api/clients").await;
    assert_eq!(c["total"], 3);
    assert_eq!(c["clients"][0]["session"], 1);
    assert_eq!(get_json("/api/topics").await["topics"][0]["topic"], "md.x");
    assert_eq!(get_json("/api/tree").await["clients"], 3);
    assert_eq!(
        get_json("/api/events").await["events"][0]["kind"],
        "connect"
    );
    assert_eq!(get_json("/api/snapshot").await["status"]["name"], "n1");
    let (status, page, ctype) = get("/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(ctype.is_some_and(|c| c.starts_with("text/html")));
    assert!(page.contains("id=\"tree\"") && page.contains("EventSource"));
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "no external assets"
    );
}

#[tokio::test]
async fn list_endpoints_page_and_sort() {
    let c = get_json("/api/clients?sort=queue&limit=2").await;
    let sessions: Vec<u64> = c["clients"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|c| c["session"].as_u64())
        .collect();
    assert_eq!(sessions, [3, 2]);
    let c = get_json("/api/clients?sort=lag&offset=2").await;
    assert_eq!(c["clients"][0]["session"], 3);
    assert_eq!(c["clients"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn bad_query_parameters_get_a_400_with_a_json_error() {
    for path in [
        "/api/clients?limit=0",
        "/api/clients?limit=abc",
        "/api/clients?limit=100000",
        "/api/clients?offset=-1",
        "/api/clients?sort=name",
        "/api/clients?bogus=1",
        "/api/topics?sort=lag",
        "/api/events?limit=",
    ] {
        let (status, body, _) = get(path).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON error body");
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{path}: {body}"
        );
    }
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text() {
    let (status, body, ctype) = get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ctype.as_deref(), Some(metrics::CONTENT_TYPE));
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid exposition format");
    let find = |name: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .map(|s| s.value.clone())
    };
    assert!(
        matches!(find("canopy_messages_published_total"), Some(prometheus_parse::Value::Counter(v)) if v == 42.0)
    );
    assert!(
        matches!(find("canopy_head_seq"), Some(prometheus_parse::Value::Gauge(v)) if v == 42.0)
    );
    match find("canopy_delivery_latency_seconds") {
        Some(prometheus_parse::Value::Histogram(buckets)) => {
            let counts: Vec<f64> = buckets.iter().map(|b| b.count).collect();
            assert_eq!(counts, [1.0, 2.0, 2.0, 2.0]);
        }
        other => panic!("latency histogram missing: {other:?}"),
    }
    assert!(scrape.docs.contains_key("canopy_sent_bytes_total"));
    let applied = scrape
        .samples
        .iter()
        .find(|s| s.metric == "canopy_calls_applied_total")
        .expect("calls per method");
    assert_eq!(applied.labels.get("method"), Some("put"));
    assert_eq!(applied.labels.get("mode"), Some("active"));
    assert!(matches!(applied.value, prometheus_parse::Value::Counter(v) if v == 7.0));
    assert!(scrape.samples.iter().any(
        |s| s.metric == "canopy_call_latency_seconds" && s.labels.get("method") == Some("put")
    ));
}

#[tokio::test]
async fn the_stream_sends_a_snapshot_event_at_once() {
    let (tx, rx) = watch::channel(Arc::new(sample()));
    let response = router(rx)
        .oneshot(
            Request::get("/api/stream")
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("router answers");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let frame = body.frame().await.expect("a frame").expect("no error");
    let text = String::from_utf8_lossy(frame.data_ref().expect("data")).into_owned();
    assert!(text.starts_with("event: snapshot\ndata: {"), "{text}");
    drop(tx);
}

#[test]
fn histogram_quantiles_are_bucket_upper_bounds() {
    let mut h = Histogram::new(&[1.0, 2.0, 4.0]);
    assert_eq!(h.quantile_bound(0.5), None);
    for v in [0.5, 1.5, 1.5, 3.0] {
        h.observe(v);
    }
    assert_eq!(h.quantile_bound(0.5), Some(2.0));
    assert_eq!(h.quantile_bound(0.99), Some(4.0));
    h.observe(9.0);
    assert_eq!(h.quantile_bound(1.0), None, "beyond the last bound");
}

/// `path` through the router behind a guard that takes token `t`, from
/// `peer`, with `bearer` as the `Authorization` token if given.
async fn guarded(path: &str, bearer: Option<&str>, peer: &str) -> (StatusCode, String) {
    let (_tx, rx) = watch::channel(Arc::new(sample()));
    let access: Access = Arc::new(|token, _peer| token == Some("t"));
    let mut req = Request::get(path);
    if let Some(b) = bearer {
        req = req.header(header::AUTHORIZATION, format!("Bearer {b}"));
    }
    let mut req = req.body(Body::empty()).expect("request");
    let peer: std::net::SocketAddr = peer.parse().expect("address");
    req.extensions_mut().insert(ConnectInfo(peer));
    let response = guard(router(rx), access)
        .oneshot(req)
        .await
        .expect("router answers");
    let (status, body, _) = read(response).await;
    (status, body)
}

#[tokio::test]
async fn a_guarded_node_wants_its_token_in_a_header_or_the_query() {
    let peer = "10.0.0.1:5000";
    for (path, bearer) in [
        ("/metrics", None),
        ("/metrics?token=x", None),
        ("/metrics", Some("x")),
    ] {
        let (status, body) = guarded(path, bearer, peer).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {body}");
        assert!(body.contains("token"), "{body}");
    }
    let (status, _) = guarded("/metrics", Some("t"), peer).await;
    assert_eq!(status, StatusCode::OK);
    // The token leaves the query before the route checks its parameters.
    let (status, body) = guarded("/api/events?limit=2&token=t", None, peer).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = guarded("/api/events?token=t&bogus=1", None, peer).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}
