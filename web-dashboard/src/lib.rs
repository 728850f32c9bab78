//! `canopy-dashboard`: the HTTP side of a Canopy node.
//!
//! An axum [`Router`] that every `canopy` process mounts on its HTTP port:
//! a JSON API, `/metrics` in the Prometheus text format, and a live
//! dashboard page (HTML, CSS and JavaScript embedded in the binary, no
//! network needed) that follows the node through server-sent events.
//!
//! The router only reads [`Snapshot`]s that the node's runtime publishes
//! through a `watch` channel, so a dashboard, however many are open, never
//! touches the node's state or its hot path.
//!
//! | path | what |
//! |---|---|
//! | `/` | the dashboard page |
//! | `/api/status` | role, name, version, uptime, head, view, counters, rates |
//! | `/api/view` | current view and view history |
//! | `/api/clients?limit=&offset=&sort=session\|lag\|queue` | connected clients |
//! | `/api/topics?limit=` | topics with message and byte rates |
//! | `/api/tree` | this node and the relays below it, with client counts |
//! | `/api/events?limit=` | recent events |
//! | `/api/snapshot` | all of the above at once |
//! | `/api/stream` | server-sent events: a live summary every period |
//! | `/metrics` | Prometheus metrics |
//!
//! Bad query parameters get a 400 with `{"error": "..."}`. A node that
//! checks who reads it ([`guard`]) wants a token on every path, as
//! `Authorization: Bearer TOKEN` or `?token=TOKEN` (the page passes its
//! own on), and answers 401 without one it accepts.
#![warn(missing_docs)]

pub mod metrics;
pub mod model;

pub use model::*;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::watch;

/// The latest snapshot, as the node publishes it.
pub type Snapshots = watch::Receiver<Arc<Snapshot>>;

const PAGE: &str = include_str!("../assets/index.html");

/// Items a list endpoint returns at most per request.
pub const LIMIT_MAX: usize = 1000;
const LIMIT_DEFAULT: usize = 100;
/// Items of each list in a live summary.
const LIVE_ITEMS: usize = 20;

/// The dashboard's routes over `snapshots`.
pub fn router(snapshots: Snapshots) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/status", get(status))
        .route("/api/view", get(view))
        .route("/api/clients", get(clients))
        .route("/api/topics", get(topics))
        .route("/api/tree", get(tree))
        .route("/api/events", get(events))
        .route("/api/snapshot", get(snapshot))
        .route("/api/stream", get(stream))
        .route("/metrics", get(metrics_text))
        .with_state(snapshots)
}

/// Who may read: given the token offered (if any) and the reader's
/// address, whether it may.
pub type Access = Arc<dyn Fn(Option<&str>, std::net::SocketAddr) -> bool + Send + Sync>;

/// `router` behind `access`: a request without a token it accepts gets a
/// 401. The `token` query parameter is taken out before the route sees
/// the query. Serve it with connection info
/// (`into_make_service_with_connect_info::<SocketAddr>`).
pub fn guard(router: Router, access: Access) -> Router {
    router.layer(axum::middleware::from_fn(
        move |ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
              mut req: axum::extract::Request,
              next: axum::middleware::Next| {
            let access = access.clone();
            async move {
                let bearer = req
                    .headers()
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::to_owned);
                let (query_token, rest) = split_token(req.uri().query());
                let token = bearer.or(query_token);
                if !access(token.as_deref(), peer) {
                    let msg =
                        "this node wants a token: `Authorization: Bearer TOKEN` or `?token=TOKEN`";
                    return ApiError(StatusCode::UNAUTHORIZED, msg.into()).into_response();
                }
                let path = req.uri().path().to_owned();
                let uri = match rest {
                    Some(q) => format!("{path}?{q}"),
                    None => path,
                };
                if let Ok(uri) = uri.parse() {
                    *req.uri_mut() = uri;
                }
                next.run(req).await
            }
        },
    ))
}

/// A query's `token` parameter, and the query without it.
fn split_token(query: Option<&str>) -> (Option<String>, Option<String>) {
    let Some(query) = query else {
        return (None, None);
    };
    let mut token = None;
    let mut rest = form_urlencoded::Serializer::new(String::new());
    let mut kept = 0;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if k == "token" {
            token = Some(v.into_owned());
        } else {
            rest.append_pair(&k, &v);
            kept += 1;
        }
    }
    (token, (kept > 0).then(|| rest.finish()))
}

/// A 4xx answer with a JSON body.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

fn bad(msg: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg)
}

/// Validated query parameters of the list endpoints.
struct ListQuery {
    limit: usize,
    offset: usize,
    sort: Option<String>,
}

fn list_query(
    q: &HashMap<String, String>,
    allowed: &[&str],
    sorts: &[&str],
) -> Result<ListQuery, ApiError> {
    if let Some(k) = q.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(bad(format!(
            "unknown query parameter `{k}`; allowed: {}",
            allowed.join(", ")
        )));
    }
    let number = |key: &str, default: usize, min: usize, max: usize| -> Result<usize, ApiError> {
        match q.get(key) {
            None => Ok(default),
            Some(v) => match v.parse::<usize>() {
                Ok(n) if (min..=max).contains(&n) => Ok(n),
                _ => Err(bad(format!(
                    "`{key}` must be a whole number from {min} to {max}, not `{v}`"
                ))),
            },
        }
    };
    let sort = match q.get("sort") {
        None => None,
        Some(s) if sorts.contains(&s.as_str()) => Some(s.clone()),
        Some(s) => {
            return Err(bad(format!(
                "`sort` must be one of {}, not `{s}`",
                sorts.join(", ")
            )))
        }
    };
    Ok(ListQuery {
        limit: number("limit", LIMIT_DEFAULT, 1, LIMIT_MAX)?,
        offset: number("offset", 0, 0, usize::MAX)?,
        sort,
    })
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

#[derive(Serialize)]
struct StatusBody<'a> {
    #[serde(flatten)]
    status: &'a Status,
    view: &'a View,
    counters: &'a Counters,
    rates: &'a Rates,
}

async fn status(State(s): State<Snapshots>) -> Response {
    let s = s.borrow().clone();
    Json(StatusBody {
        status: &s.status,
        view: &s.view,
        counters: &s.counters,
        rates: &s.rates,
    })
    .into_response()
}

async fn view(State(s): State<Snapshots>) -> Response {
    let s = s.borrow().clone();
    Json(serde_json::json!({ "current": s.view, "history": s.views })).into_response()
}

async fn clients(
    State(s): State<Snapshots>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let q = list_query(
        &q,
        &["limit", "offset", "sort"],
        &["session", "lag", "queue"],
    )?;
    let s = s.borrow().clone();
    let mut list: Vec<&ClientInfo> = s.clients.iter().collect();
    match q.sort.as_deref() {
        Some("lag") => list.sort_by_key(|c| std::cmp::Reverse(c.lag)),
        Some("queue") => list.sort_by_key(|c| std::cmp::Reverse(c.queue_depth)),
        _ => list.sort_by_key(|c| c.session),
    }
    let page: Vec<&ClientInfo> = list.into_iter().skip(q.offset).take(q.limit).collect();
    Ok(Json(serde_json::json!({ "total": s.clients.len(), "clients": page })).into_response())
}

async fn topics(
    State(s): State<Snapshots>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let q = list_query(&q, &["limit", "offset"], &[])?;
    let s = s.borrow().clone();
    let page: Vec<&TopicInfo> = s.topics.iter().skip(q.offset).take(q.limit).collect();
    Ok(Json(serde_json::json!({ "total": s.topics.len(), "topics": page })).into_response())
}

async fn tree(State(s): State<Snapshots>) -> Response {
    Json(s.borrow().tree.clone()).into_response()
}

async fn events(
    State(s): State<Snapshots>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let q = list_query(&q, &["limit"], &[])?;
    let s = s.borrow().clone();
    let from = s.events.len().saturating_sub(q.limit);
    Ok(Json(serde_json::json!({ "events": &s.events[from..] })).into_response())
}

async fn snapshot(State(s): State<Snapshots>) -> Response {
    let s = s.borrow().clone();
    Json(&*s).into_response()
}

async fn metrics_text(State(s): State<Snapshots>) -> Response {
    let s = s.borrow().clone();
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::render(&s),
    )
        .into_response()
}

/// What the live page receives every period: bounded whatever the number of
/// clients or topics.
#[derive(Serialize)]
struct Live<'a> {
    status: &'a Status,
    view: &'a View,
    counters: &'a Counters,
    rates: &'a Rates,
    latency_p50: Option<f64>,
    latency_p99: Option<f64>,
    tree: &'a TreeNode,
    topics: &'a [TopicInfo],
    /// Replicated RPC per method, with latency quantiles.
    calls: Vec<LiveCall<'a>>,
    /// Clients furthest behind (lag or queue), worst first.
    laggards: Vec<&'a ClientInfo>,
    events: &'a [EventInfo],
}

/// One method's calls on the live page.
#[derive(Serialize)]
struct LiveCall<'a> {
    #[serde(flatten)]
    info: &'a CallInfo,
    replied: u64,
    p50: Option<f64>,
    p99: Option<f64>,
}

fn live_json(s: &Snapshot) -> String {
    let mut laggards: Vec<&ClientInfo> = s
        .clients
        .iter()
        .filter(|c| c.lag > 0 || c.queue_depth > 0)
        .collect();
    laggards.sort_by_key(|c| std::cmp::Reverse((c.queue_depth, c.lag)));
    laggards.truncate(LIVE_ITEMS);
    let live = Live {
        status: &s.status,
        view: &s.view,
        counters: &s.counters,
        rates: &s.rates,
        latency_p50: s.latency.quantile_bound(0.5),
        latency_p99: s.latency.quantile_bound(0.99),
        tree: &s.tree,
        topics: &s.topics[..s.topics.len().min(LIVE_ITEMS)],
        calls: s
            .calls
            .iter()
            .take(LIVE_ITEMS)
            .map(|c| LiveCall {
                info: c,
                replied: c.latency.count,
                p50: c.latency.quantile_bound(0.5),
                p99: c.latency.quantile_bound(0.99),
            })
            .collect(),
        laggards,
        events: &s.events[s.events.len().saturating_sub(LIVE_ITEMS)..],
    };
    serde_json::to_string(&live).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

async fn stream(
    State(s): State<Snapshots>,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let first = live_json(&s.borrow());
    let updates = futures::stream::unfold(s, |mut s| async move {
        // Ends the stream when the node stops publishing snapshots.
        s.changed().await.ok()?;
        let json = live_json(&s.borrow_and_update());
        Some((Ok(Event::default().event("snapshot").data(json)), s))
    });
    let first =
        futures::stream::once(async move { Ok(Event::default().event("snapshot").data(first)) });
    Sse::new(futures::StreamExt::chain(first, updates)).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests;
