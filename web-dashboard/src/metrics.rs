//! `/metrics` in the Prometheus text exposition format (version 0.0.4).
//!
//! Rendered from the latest [`Snapshot`]: counters end in `_total`, sizes in
//! `_bytes`, times in `_seconds`, as Prometheus' naming conventions ask.

use crate::model::{Histogram, Snapshot};
use std::fmt::Write;

/// The content type of the exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: f64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let _ = writeln!(out, "{name} {value}");
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (bound, count) in h.bounds.iter().zip(&h.cumulative) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum {}", h.sum);
    let _ = writeln!(out, "{name}_count {}", h.count);
}

/// Renders every metric of `s`.
pub fn render(s: &Snapshot) -> String {
    let c = &s.counters;
    let mut out = String::with_capacity(4096);
    let counters: [(&str, &str, u64); 17] = [
        (
            "canopy_messages_published_total",
            "Messages ordered.",
            c.published,
        ),
        (
            "canopy_messages_duplicate_total",
            "Publisher retries recognised and not ordered again.",
            c.duplicates,
        ),
        (
            "canopy_messages_delivered_total",
            "Message deliveries queued for subscribers.",
            c.delivered,
        ),
        (
            "canopy_received_bytes_total",
            "Payload bytes received in publishes.",
            c.bytes_in,
        ),
        (
            "canopy_sent_bytes_total",
            "Frame bytes queued for clients.",
            c.bytes_out,
        ),
        (
            "canopy_slow_consumers_total",
            "Clients cut off for not keeping up.",
            c.slow_consumers,
        ),
        (
            "canopy_flow_pauses_total",
            "Times a client that granted no more room was paused (flow control; it is caught up from retention as it reads).",
            c.flow_pauses,
        ),
        ("canopy_gaps_total", "Gap notices sent to clients.", c.gaps),
        (
            "canopy_bad_input_total",
            "Connections closed for bad input.",
            c.bad_input,
        ),
        (
            "canopy_auth_failures_total",
            "Connections refused for missing or wrong credentials.",
            c.auth_failures,
        ),
        (
            "canopy_denied_total",
            "Subscriptions, publishes, calls, roles or reports refused for a user's permissions.",
            c.denied,
        ),
        (
            "canopy_peer_links_refused_total",
            "Connections to the core's peer port dropped before admission.",
            c.peer_refused,
        ),
        (
            "canopy_tls_handshakes_failed_total",
            "TLS handshakes that failed or timed out, on the client and peer ports.",
            c.tls_failed,
        ),
        (
            "canopy_view_changes_total",
            "Views installed after the first.",
            c.view_changes,
        ),
        (
            "canopy_adoptions_total",
            "Clients that resumed here from another server (adopted orphans).",
            c.adoptions,
        ),
        (
            "canopy_diverged_total",
            "Weak clients told that what they were sent was not the agreed stream.",
            c.diverged,
        ),
        (
            "canopy_connections_total",
            "Client connections accepted.",
            c.connects,
        ),
    ];
    for (name, help, value) in counters {
        metric(&mut out, name, "counter", help, value as f64);
    }
    let gauges: [(&str, &str, f64); 8] = [
        (
            "canopy_clients",
            "Clients connected.",
            s.status.clients as f64,
        ),
        (
            "canopy_head_seq",
            "The last sequence number ordered.",
            s.status.head_seq as f64,
        ),
        (
            "canopy_retained_messages",
            "Messages held for resume.",
            c.retained as f64,
        ),
        (
            "canopy_retained_bytes",
            "Bytes held for resume.",
            c.retained_bytes as f64,
        ),
        (
            "canopy_client_queue_depth_max_frames",
            "Deepest client outbound queue, in frames.",
            c.queue_depth_max as f64,
        ),
        (
            "canopy_client_queued_bytes_max",
            "Largest client outbound queue, in bytes.",
            c.queued_bytes_max as f64,
        ),
        (
            "canopy_queued_bytes",
            "Bytes the client outbound queues hold together, a frame shared by several counted once (bounded by queue_bytes_total_max).",
            c.queued_bytes as f64,
        ),
        (
            "canopy_uptime_seconds",
            "Seconds since the node started.",
            s.status.uptime_secs,
        ),
    ];
    for (name, help, value) in gauges {
        metric(&mut out, name, "gauge", help, value);
    }
    histogram(
        &mut out,
        "canopy_delivery_latency_seconds",
        "Time from a batch of publishes reaching the node task to its deliveries being queued.",
        &s.latency,
    );
    calls(&mut out, s);
    let _ = writeln!(out, "# HELP canopy_build_info Build and role of this node.");
    let _ = writeln!(out, "# TYPE canopy_build_info gauge");
    let _ = writeln!(
        out,
        "canopy_build_info{{version=\"{}\",role=\"{}\"}} 1",
        escape(&s.status.version),
        escape(&s.status.role)
    );
    out
}

/// Replicated RPC per method and mode.
fn calls(out: &mut String, s: &Snapshot) {
    if s.calls.is_empty() {
        return;
    }
    type Field = fn(&crate::model::CallInfo) -> u64;
    let counters: [(&str, &str, Field); 4] = [
        (
            "canopy_calls_applied_total",
            "Calls of the replicated service this replica applied.",
            |c| c.applied,
        ),
        (
            "canopy_calls_failed_total",
            "Of them, failed (unknown method or handler error).",
            |c| c.failed,
        ),
        (
            "canopy_calls_executed_total",
            "Calls (or parallel shares) executed here.",
            |c| c.executed,
        ),
        (
            "canopy_calls_reassigned_total",
            "Calls (or shares) reassigned by a view change before their outcome was ordered.",
            |c| c.reassigned,
        ),
    ];
    for (name, help, field) in counters {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        for c in &s.calls {
            let _ = writeln!(
                out,
                "{name}{{method=\"{}\",mode=\"{}\"}} {}",
                escape(&c.method),
                escape(&c.mode),
                field(c)
            );
        }
    }
    let name = "canopy_call_latency_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time from a call reaching this server to its reply leaving it."
    );
    let _ = writeln!(out, "# TYPE {name} histogram");
    for c in &s.calls {
        let (m, h) = (escape(&c.method), &c.latency);
        for (bound, count) in h.bounds.iter().zip(&h.cumulative) {
            let _ = writeln!(
                out,
                "{name}_bucket{{method=\"{m}\",le=\"{bound}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{method=\"{m}\",le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(out, "{name}_sum{{method=\"{m}\"}} {}", h.sum);
        let _ = writeln!(out, "{name}_count{{method=\"{m}\"}} {}", h.count);
    }
}

/// Escapes a label value.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
