//! Per-destination and global counters and gauges, readable from any thread while the loops
//! run, and their rendering as Prometheus text (exposition format 0.0.4).
//!
//! The loop writes relaxed atomics on paths it already takes (a few per transaction); readers
//! take snapshots. Nothing here blocks the loop: the registry lock is only taken when a
//! destination is first seen and when a snapshot is read.

use super::StatsSnapshot;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// One destination's live figures.
#[derive(Debug, Default)]
pub struct DestinationMetrics {
    pub name: Arc<str>,
    pub queued: AtomicU64,
    pub in_flight: AtomicU64,
    pub delivered: AtomicU64,
    /// Of `delivered`: over TLS, and in plaintext.
    pub delivered_tls: AtomicU64,
    pub delivered_plaintext: AtomicU64,
    pub deferred: AtomicU64,
    pub bounced: AtomicU64,
    pub expired: AtomicU64,
    /// "Slow down" replies (421, or a 4xx classified as throttling) that shrank the window.
    pub throttled: AtomicU64,
    /// Times a session broke with pipelined BDAT in flight and the destination fell back to
    /// waiting for RCPT replies.
    pub bdat_fallbacks: AtomicU64,
    pub connections_open: AtomicU64,
    /// The adaptive concurrency window now.
    pub concurrency_limit: AtomicU64,
    /// The message rate limit now, in thousandths of a message per second (0: none).
    pub rate_limit_milli: AtomicU64,
}

/// A snapshot of one destination.
#[derive(Debug, Clone, PartialEq)]
pub struct DestinationStats {
    pub name: String,
    pub queued: u64,
    pub in_flight: u64,
    pub delivered: u64,
    /// Of `delivered`: over TLS, and in plaintext.
    pub delivered_tls: u64,
    pub delivered_plaintext: u64,
    pub deferred: u64,
    pub bounced: u64,
    pub expired: u64,
    /// "Slow down" replies (421, or a 4xx classified as throttling) that shrank the window.
    pub throttled: u64,
    /// Times the destination fell back from pipelined BDAT.
    pub bdat_fallbacks: u64,
    pub connections_open: u64,
    pub concurrency_limit: u64,
    /// Messages per second, when limited.
    pub rate_limit: Option<f64>,
}

impl DestinationMetrics {
    pub fn new(name: Arc<str>) -> Self {
        DestinationMetrics {
            name,
            ..DestinationMetrics::default()
        }
    }

    pub fn snapshot(&self) -> DestinationStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let rate = get(&self.rate_limit_milli);
        DestinationStats {
            name: self.name.to_string(),
            queued: get(&self.queued),
            in_flight: get(&self.in_flight),
            delivered: get(&self.delivered),
            delivered_tls: get(&self.delivered_tls),
            delivered_plaintext: get(&self.delivered_plaintext),
            deferred: get(&self.deferred),
            bounced: get(&self.bounced),
            expired: get(&self.expired),
            throttled: get(&self.throttled),
            bdat_fallbacks: get(&self.bdat_fallbacks),
            connections_open: get(&self.connections_open),
            concurrency_limit: get(&self.concurrency_limit),
            rate_limit: (rate > 0).then(|| rate as f64 / 1000.0),
        }
    }
}

/// Every destination any loop has seen.
#[derive(Debug, Default)]
pub struct Registry {
    destinations: RwLock<Destinations>,
}

/// In the order first seen, and by name (a destination is registered once per loop, and a
/// direct-to-MX run may see 100,000 of them).
#[derive(Debug, Default)]
struct Destinations {
    list: Vec<Arc<DestinationMetrics>>,
    by_name: HashMap<Arc<str>, usize>,
}

impl Registry {
    /// The metrics of `name`, shared by every loop that sends there.
    pub fn destination(&self, name: &Arc<str>) -> Arc<DestinationMetrics> {
        let mut known = self.destinations.write().unwrap_or_else(|e| e.into_inner());
        if let Some(&index) = known.by_name.get(name) {
            return Arc::clone(&known.list[index]);
        }
        let m = Arc::new(DestinationMetrics::new(Arc::clone(name)));
        let index = known.list.len();
        known.list.push(Arc::clone(&m));
        known.by_name.insert(Arc::clone(name), index);
        m
    }

    pub fn snapshot(&self) -> Vec<DestinationStats> {
        let known = self.destinations.read().unwrap_or_else(|e| e.into_inner());
        known.list.iter().map(|m| m.snapshot()).collect()
    }
}

/// Renders the global and per-destination figures as Prometheus text.
pub fn prometheus(global: &StatsSnapshot, destinations: &[DestinationStats]) -> String {
    let mut out = String::with_capacity(4096);
    let counters = [
        (
            "submitted_messages",
            "Messages submitted.",
            global.submitted_messages,
        ),
        (
            "submitted_recipients",
            "Recipients submitted.",
            global.submitted_recipients,
        ),
        ("delivered", "Recipients delivered.", global.delivered),
        (
            "deferred",
            "Deferrals (a recipient may be deferred more than once).",
            global.deferred,
        ),
        ("bounced", "Recipients bounced.", global.bounced),
        ("expired", "Recipients expired.", global.expired),
        (
            "transactions",
            "SMTP transactions completed.",
            global.transactions,
        ),
        (
            "connections_opened",
            "Connections opened.",
            global.connections_opened,
        ),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(out, "# HELP mxpipe_{name}_total {help}");
        let _ = writeln!(out, "# TYPE mxpipe_{name}_total counter");
        let _ = writeln!(out, "mxpipe_{name}_total {value}");
    }
    let gauges = [
        (
            "in_flight",
            "Recipients without a final outcome.",
            global.in_flight,
        ),
        (
            "connections_open",
            "Connections open now.",
            global.connections_open,
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(out, "# HELP mxpipe_{name} {help}");
        let _ = writeln!(out, "# TYPE mxpipe_{name} gauge");
        let _ = writeln!(out, "mxpipe_{name} {value}");
    }
    type Field = fn(&DestinationStats) -> f64;
    let per_destination: [(&str, &str, &str, Field); 13] = [
        (
            "destination_queued",
            "gauge",
            "Recipients queued for the destination.",
            |d| d.queued as f64,
        ),
        (
            "destination_in_flight",
            "gauge",
            "Recipients in transactions now.",
            |d| d.in_flight as f64,
        ),
        (
            "destination_delivered_total",
            "counter",
            "Recipients delivered.",
            |d| d.delivered as f64,
        ),
        (
            "destination_delivered_tls_total",
            "counter",
            "Recipients delivered over TLS.",
            |d| d.delivered_tls as f64,
        ),
        (
            "destination_delivered_plaintext_total",
            "counter",
            "Recipients delivered in plaintext.",
            |d| d.delivered_plaintext as f64,
        ),
        ("destination_deferred_total", "counter", "Deferrals.", |d| {
            d.deferred as f64
        }),
        (
            "destination_bounced_total",
            "counter",
            "Recipients bounced.",
            |d| d.bounced as f64,
        ),
        (
            "destination_expired_total",
            "counter",
            "Recipients expired.",
            |d| d.expired as f64,
        ),
        (
            "destination_throttled_total",
            "counter",
            "Slow-down replies that shrank the connection window.",
            |d| d.throttled as f64,
        ),
        (
            "destination_bdat_fallbacks_total",
            "counter",
            "Sessions that broke with pipelined BDAT in flight (the destination then waits for RCPT replies).",
            |d| d.bdat_fallbacks as f64,
        ),
        (
            "destination_connections_open",
            "gauge",
            "Connections open now.",
            |d| d.connections_open as f64,
        ),
        (
            "destination_concurrency_limit",
            "gauge",
            "Adaptive connection window now.",
            |d| d.concurrency_limit as f64,
        ),
        (
            "destination_rate_limit",
            "gauge",
            "Message rate limit now (messages/s; 0: none).",
            |d| d.rate_limit.unwrap_or(0.0),
        ),
    ];
    for (name, kind, help, field) in per_destination {
        let _ = writeln!(out, "# HELP mxpipe_{name} {help}");
        let _ = writeln!(out, "# TYPE mxpipe_{name} {kind}");
        for d in destinations {
            let _ = writeln!(
                out,
                "mxpipe_{name}{{destination=\"{}\"}} {}",
                escape_label(&d.name),
                field(d)
            );
        }
    }
    out
}

/// Prometheus label values escape backslash, double quote and newline.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let reg = Registry::default();
        let name: Arc<str> = Arc::from("mx.example:25");
        let m = reg.destination(&name);
        m.delivered.store(7, Ordering::Relaxed);
        m.delivered_tls.store(5, Ordering::Relaxed);
        m.delivered_plaintext.store(2, Ordering::Relaxed);
        m.concurrency_limit.store(5, Ordering::Relaxed);
        m.rate_limit_milli.store(2500, Ordering::Relaxed);
        assert!(
            Arc::ptr_eq(&m, &reg.destination(&name)),
            "one entry per name"
        );
        let global = StatsSnapshot {
            delivered: 7,
            ..StatsSnapshot::default()
        };
        let text = prometheus(&global, &reg.snapshot());
        assert!(text.contains("# TYPE mxpipe_delivered_total counter\nmxpipe_delivered_total 7\n"));
        assert!(
            text.contains("mxpipe_destination_delivered_total{destination=\"mx.example:25\"} 7\n")
        );
        assert!(text
            .contains("mxpipe_destination_delivered_tls_total{destination=\"mx.example:25\"} 5\n"));
        assert!(text.contains(
            "mxpipe_destination_delivered_plaintext_total{destination=\"mx.example:25\"} 2\n"
        ));
        assert!(text
            .contains("mxpipe_destination_concurrency_limit{destination=\"mx.example:25\"} 5\n"));
        assert!(text.contains("mxpipe_destination_rate_limit{destination=\"mx.example:25\"} 2.5\n"));
        assert_eq!(escape_label("a\"b\\c"), "a\\\"b\\\\c");
    }
}
