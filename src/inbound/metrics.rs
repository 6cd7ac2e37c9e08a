//! Counters of inbound processing, and their Prometheus text: bounces by type and category,
//! complaints and the complaint rate per campaign and per recipient domain (the figure
//! mailbox providers' postmaster tools show: complaints over messages delivered),
//! unsubscribes by method, forged one-click requests, and quarantined messages by reason.
//!
//! Plain counters behind the processor's lock; nothing here does I/O.

use std::collections::BTreeMap;
use std::fmt::Write;

/// Every counter.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    pub messages: u64,
    /// (hard|soft|delayed, category) → count.
    pub bounces: BTreeMap<(String, String), u64>,
    pub complaints_by_campaign: BTreeMap<String, u64>,
    pub complaints_by_domain: BTreeMap<String, u64>,
    /// Messages delivered, from the campaigns' reports: the rates' denominators.
    pub delivered_by_campaign: BTreeMap<String, u64>,
    pub delivered_by_domain: BTreeMap<String, u64>,
    /// (campaign, method) → count.
    pub unsubscribes: BTreeMap<(String, String), u64>,
    pub forged_unsubscribes: u64,
    /// reason → count.
    pub quarantined: BTreeMap<String, u64>,
    pub suppressed: u64,
}

fn label(value: &str) -> String {
    value
        .chars()
        .map(|c| match c {
            '"' | '\\' => '_',
            c if c.is_control() => '_',
            c => c,
        })
        .collect()
}

fn rate(complaints: u64, delivered: u64) -> f64 {
    if delivered == 0 {
        0.0
    } else {
        complaints as f64 / delivered as f64
    }
}

impl Metrics {
    /// Complaints over messages delivered for `campaign`; 0 when nothing was delivered.
    pub fn complaint_rate_campaign(&self, campaign: &str) -> f64 {
        rate(
            self.complaints_by_campaign
                .get(campaign)
                .copied()
                .unwrap_or(0),
            self.delivered_by_campaign
                .get(campaign)
                .copied()
                .unwrap_or(0),
        )
    }

    /// Complaints over messages delivered for recipients at `domain`.
    pub fn complaint_rate_domain(&self, domain: &str) -> f64 {
        rate(
            self.complaints_by_domain.get(domain).copied().unwrap_or(0),
            self.delivered_by_domain.get(domain).copied().unwrap_or(0),
        )
    }

    /// The Prometheus text exposition.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# TYPE mxpipe_inbound_messages_total counter");
        let _ = writeln!(out, "mxpipe_inbound_messages_total {}", self.messages);
        let _ = writeln!(out, "# TYPE mxpipe_inbound_bounces_total counter");
        for ((kind, category), n) in &self.bounces {
            let _ = writeln!(
                out,
                "mxpipe_inbound_bounces_total{{type=\"{}\",category=\"{}\"}} {n}",
                label(kind),
                label(category)
            );
        }
        let _ = writeln!(out, "# TYPE mxpipe_inbound_complaints_total counter");
        for (campaign, n) in &self.complaints_by_campaign {
            let _ = writeln!(
                out,
                "mxpipe_inbound_complaints_total{{campaign=\"{}\"}} {n}",
                label(campaign)
            );
        }
        let _ = writeln!(out, "# TYPE mxpipe_inbound_complaint_rate gauge");
        for campaign in self.complaints_by_campaign.keys() {
            let _ = writeln!(
                out,
                "mxpipe_inbound_complaint_rate{{campaign=\"{}\"}} {}",
                label(campaign),
                self.complaint_rate_campaign(campaign)
            );
        }
        let _ = writeln!(out, "# TYPE mxpipe_inbound_domain_complaints_total counter");
        for (domain, n) in &self.complaints_by_domain {
            let _ = writeln!(
                out,
                "mxpipe_inbound_domain_complaints_total{{domain=\"{}\"}} {n}",
                label(domain)
            );
        }
        let _ = writeln!(out, "# TYPE mxpipe_inbound_domain_complaint_rate gauge");
        for domain in self.complaints_by_domain.keys() {
            let _ = writeln!(
                out,
                "mxpipe_inbound_domain_complaint_rate{{domain=\"{}\"}} {}",
                label(domain),
                self.complaint_rate_domain(domain)
            );
        }
        let _ = writeln!(out, "# TYPE mxpipe_inbound_unsubscribes_total counter");
        for ((campaign, method), n) in &self.unsubscribes {
            let _ = writeln!(
                out,
                "mxpipe_inbound_unsubscribes_total{{campaign=\"{}\",method=\"{}\"}} {n}",
                label(campaign),
                label(method)
            );
        }
        let _ = writeln!(
            out,
            "# TYPE mxpipe_inbound_forged_unsubscribes_total counter"
        );
        let _ = writeln!(
            out,
            "mxpipe_inbound_forged_unsubscribes_total {}",
            self.forged_unsubscribes
        );
        let _ = writeln!(out, "# TYPE mxpipe_inbound_quarantined_total counter");
        for (reason, n) in &self.quarantined {
            let _ = writeln!(
                out,
                "mxpipe_inbound_quarantined_total{{reason=\"{}\"}} {n}",
                label(reason)
            );
        }
        let _ = writeln!(out, "# TYPE mxpipe_inbound_suppressed_total counter");
        let _ = writeln!(out, "mxpipe_inbound_suppressed_total {}", self.suppressed);
        out
    }
}
