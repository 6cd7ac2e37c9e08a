//! Closing the newsletter loop: what comes back after a campaign was sent. Bounces (RFC 3464
//! DSNs and the non-standard texts), ARF feedback reports (RFC 5965) and unsubscribes (mail to
//! the List-Unsubscribe `mailto:` address, RFC 8058 one-click POSTs) arrive here, are tied to a
//! campaign and recipient (the VERP return path, else the original message's headers), and
//! become asynchronous outcomes appended to the campaign's outcomes file and, where they call
//! for it, entries in the one suppression file every campaign reads before sending.
//!
//! Rules: hard bounces (a permanent failure the bounce table calls `bad_mailbox` or
//! `no_such_domain`), complaints and unsubscribes suppress at once; any other failure is a
//! soft bounce, and `soft_bounce_limit` of them within `soft_bounce_days` suppress. A message
//! that cannot be read or tied to a recipient is counted and kept in the quarantine directory
//! for a person; it never suppresses anyone.
//!
//! [`Inbound`] is sans-network: the SMTP listener ([`listener`]) and the HTTP endpoint
//! ([`unsubscribe::router`]) hand it what arrived. It writes only its own files.

pub mod listener;
pub mod metrics;
pub mod report;
pub mod suppress;
mod text;
pub mod unsubscribe;
pub mod verp;

use crate::engine::classify::{Category, Classifier};
use crate::message::mime::CivilTime;
use metrics::Metrics;
use report::{Action, RecipientStatus, Report, ReportKind};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};
use suppress::{FileSuppression, SuppressionStore};
use unsubscribe::OneClick;
use verp::VerpTemplate;

/// The inbound configuration file (TOML). Relative paths are taken from the file's folder.
///
/// ```toml
/// suppression = "suppressed.txt"      # the file the campaigns' `suppression` key names
/// quarantine = "quarantine"           # a folder for messages that could not be read
/// soft_bounces = "soft-bounces.jsonl" # history of soft bounces
/// soft_bounce_limit = 3               # this many soft bounces ...
/// soft_bounce_days = 7                # ... within this many days suppress
/// campaign_header = "X-Campaign"      # names the campaign when VERP cannot
///
/// [[campaign]]
/// name = "digest"
/// return_path = "bounces-digest+{local}={domain}@news.example.org"
/// unsubscribe_mailto = "unsubscribe@news.example.org"
/// secret_env = "DIGEST_UNSUBSCRIBE_SECRET"  # the campaign's list_unsubscribe.secret_env
/// outcomes = "digest-async.jsonl"
/// report = "digest-report.csv"        # optional: delivered counts for complaint rates
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    pub suppression: PathBuf,
    pub quarantine: PathBuf,
    pub soft_bounces: PathBuf,
    #[serde(default = "default_soft_limit")]
    pub soft_bounce_limit: u32,
    #[serde(default = "default_soft_days")]
    pub soft_bounce_days: u32,
    #[serde(default = "default_campaign_header")]
    pub campaign_header: String,
    #[serde(rename = "campaign", default)]
    pub campaigns: Vec<CampaignConfig>,
}

/// One campaign, as inbound processing knows it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignConfig {
    /// The campaign's name: the value of its `campaign_header`, the one-click URL's last segment.
    pub name: String,
    /// The campaign file's `return_path`.
    pub return_path: String,
    /// The campaign file's `list_unsubscribe.mailto`.
    pub unsubscribe_mailto: Option<String>,
    /// The environment variable with the one-click secret (the campaign file's
    /// `list_unsubscribe.secret_env`).
    pub secret_env: Option<String>,
    /// Where asynchronous outcomes are appended (JSON Lines).
    pub outcomes: PathBuf,
    /// The campaign's report (CSV or JSON Lines), read for messages delivered per domain.
    pub report: Option<PathBuf>,
}

fn default_soft_limit() -> u32 {
    3
}
fn default_soft_days() -> u32 {
    7
}
fn default_campaign_header() -> String {
    "X-Campaign".into()
}

/// A configuration that cannot be used; names the key.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl InboundConfig {
    /// Reads the file at `path`; relative paths in it are resolved against its folder.
    pub fn load(path: &Path) -> Result<InboundConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read: {e}", path.display())))?;
        let mut config: InboundConfig =
            toml::from_str(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut config.suppression);
        resolve(&mut config.quarantine);
        resolve(&mut config.soft_bounces);
        for c in &mut config.campaigns {
            resolve(&mut c.outcomes);
            if let Some(r) = &mut c.report {
                resolve(r);
            }
        }
        Ok(config)
    }
}

/// One asynchronous outcome, as appended to a campaign's outcomes file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AsyncOutcome {
    /// When it was processed, RFC 3339 UTC.
    pub time: String,
    pub campaign: String,
    pub recipient: String,
    /// `bounce`, `delay`, `complaint` or `unsubscribe`.
    pub event: String,
    /// For a bounce `hard` or `soft`; for a complaint its feedback type; for an unsubscribe
    /// `mailto` or `one-click`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The bounce category (`bad_mailbox`, ...), empty otherwise.
    pub category: String,
    pub code: u16,
    pub enhanced: String,
    pub reason: String,
    /// Whether this outcome put the recipient on the suppression list.
    pub suppressed: bool,
}

struct CampaignState {
    name: String,
    verp: VerpTemplate,
    mailto: Option<String>,
    secret: Option<Vec<u8>>,
    outcomes: File,
}

/// The processor: configuration, suppression store, soft-bounce history, counters.
pub struct Inbound {
    campaigns: Vec<CampaignState>,
    domains: HashSet<String>,
    classifier: Classifier,
    store: Box<dyn SuppressionStore>,
    soft: HashMap<String, Vec<u64>>,
    soft_file: File,
    soft_limit: u32,
    soft_window_secs: u64,
    quarantine: PathBuf,
    quarantine_seq: u64,
    campaign_header: String,
    metrics: Metrics,
}

fn unix(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn rfc3339(secs: u64) -> String {
    let c = CivilTime::from_unix(secs);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        c.year, c.month, c.day, c.hour, c.minute, c.second
    )
}

fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map_or("", |(_, d)| d)
}

#[derive(Deserialize)]
struct SoftLine {
    address: String,
    time: u64,
}

#[derive(Deserialize)]
struct ReportLine {
    recipient: String,
    status: String,
}

impl Inbound {
    /// Opens the files `config` names (creating the outcomes, soft-bounce and quarantine
    /// paths when missing) with the file suppression store.
    pub fn open(config: &InboundConfig) -> Result<Inbound, ConfigError> {
        let store = FileSuppression::open(&config.suppression).map_err(|e| {
            ConfigError(format!("suppression {}: {e}", config.suppression.display()))
        })?;
        Inbound::with_store(config, Box::new(store))
    }

    /// As [`Inbound::open`], with another suppression store.
    pub fn with_store(
        config: &InboundConfig,
        store: Box<dyn SuppressionStore>,
    ) -> Result<Inbound, ConfigError> {
        if config.soft_bounce_limit == 0 {
            return Err(ConfigError("soft_bounce_limit: must be at least 1".into()));
        }
        std::fs::create_dir_all(&config.quarantine)
            .map_err(|e| ConfigError(format!("quarantine {}: {e}", config.quarantine.display())))?;
        let append = |path: &Path, key: &str| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| ConfigError(format!("{key} {}: {e}", path.display())))
        };
        let mut metrics = Metrics::default();
        let mut campaigns = Vec::new();
        let mut domains = HashSet::new();
        let mut names = HashSet::new();
        for (i, c) in config.campaigns.iter().enumerate() {
            let key = format!("campaign[{i}]");
            if c.name.is_empty() || c.name.contains(['/', '?', '#', '%']) || !names.insert(&c.name)
            {
                return Err(ConfigError(format!(
                    "{key}.name: {:?} is empty, repeated or has / ? # %",
                    c.name
                )));
            }
            let verp = VerpTemplate::parse(&c.return_path)
                .map_err(|e| ConfigError(format!("{key}.return_path: {e}")))?;
            domains.insert(domain_of(&c.return_path).to_ascii_lowercase());
            let mailto = c
                .unsubscribe_mailto
                .as_ref()
                .map(|m| m.to_ascii_lowercase());
            if let Some(m) = &mailto {
                if !m.contains('@') {
                    return Err(ConfigError(format!(
                        "{key}.unsubscribe_mailto: {m:?} is not an address"
                    )));
                }
                domains.insert(domain_of(m).to_string());
            }
            let secret = match &c.secret_env {
                Some(var) => match std::env::var(var) {
                    Ok(s) if !s.is_empty() => Some(s.into_bytes()),
                    _ => {
                        return Err(ConfigError(format!(
                            "{key}.secret_env: the environment variable {var} is not set"
                        )))
                    }
                },
                None => None,
            };
            if let Some(report) = &c.report {
                count_delivered(report, &c.name, &mut metrics)
                    .map_err(|e| ConfigError(format!("{key}.report {}: {e}", report.display())))?;
            }
            campaigns.push(CampaignState {
                name: c.name.clone(),
                verp,
                mailto,
                secret,
                outcomes: append(&c.outcomes, &format!("{key}.outcomes"))?,
            });
        }
        let soft_file = append(&config.soft_bounces, "soft_bounces")?;
        let mut soft: HashMap<String, Vec<u64>> = HashMap::new();
        let reader = BufReader::new(File::open(&config.soft_bounces).map_err(|e| {
            ConfigError(format!(
                "soft_bounces {}: {e}",
                config.soft_bounces.display()
            ))
        })?);
        for line in reader.lines().map_while(Result::ok) {
            if let Ok(l) = serde_json::from_str::<SoftLine>(&line) {
                soft.entry(l.address).or_default().push(l.time);
            }
        }
        Ok(Inbound {
            campaigns,
            domains,
            classifier: Classifier::default(),
            store,
            soft,
            soft_file,
            soft_limit: config.soft_bounce_limit,
            soft_window_secs: u64::from(config.soft_bounce_days) * 86_400,
            quarantine: config.quarantine.clone(),
            quarantine_seq: 0,
            campaign_header: config.campaign_header.clone(),
            metrics,
        })
    }

    /// Whether mail for `recipient` is taken: its domain is a bounce or unsubscribe domain, or
    /// it is a VERP address of a campaign (whose template may put `{domain}` in the domain).
    pub fn accepts(&self, recipient: &str) -> bool {
        self.domains
            .contains(&domain_of(recipient).to_ascii_lowercase())
            || self.decode(recipient).is_some()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether the suppression store holds `address`.
    pub fn is_suppressed(&self, address: &str) -> bool {
        self.store.contains(address)
    }

    /// Processes one message that arrived for `recipients` (the envelope's RCPT TO). Returns
    /// the outcomes recorded; an `Err` is a failure to write (the sender should retry).
    pub fn receive(
        &mut self,
        recipients: &[String],
        message: &[u8],
        now: SystemTime,
    ) -> io::Result<Vec<AsyncOutcome>> {
        self.metrics.messages += 1;
        let mut out = Vec::new();
        let mut is_unsubscribe = false;
        let unsubscribe_lists: Vec<usize> = (0..self.campaigns.len())
            .filter(|&i| {
                self.campaigns[i]
                    .mailto
                    .as_ref()
                    .is_some_and(|m| recipients.iter().any(|r| r.eq_ignore_ascii_case(m)))
            })
            .collect();
        for i in unsubscribe_lists {
            {
                is_unsubscribe = true;
                match sender_of(message) {
                    Some(who) => out.push(self.unsubscribe(i, &who, "mailto", now)?),
                    None => {
                        self.quarantine(message, "unsubscribe_without_sender", "no From address")?
                    }
                }
            }
        }
        let verp = recipients.iter().find_map(|r| self.decode(r));
        if is_unsubscribe && verp.is_none() {
            return Ok(out);
        }
        let report = match report::parse(message, &self.classifier) {
            Ok(r) => r,
            Err(e) => {
                let reason = e.as_str();
                self.quarantine(message, reason, &e.to_string())?;
                return Ok(out);
            }
        };
        match report.kind {
            ReportKind::Feedback => self.complaint(&report, verp, message, now, &mut out)?,
            ReportKind::DeliveryStatus | ReportKind::Text => {
                self.bounce(&report, verp, message, now, &mut out)?
            }
        }
        Ok(out)
    }

    fn decode(&self, address: &str) -> Option<(usize, String)> {
        self.campaigns.iter().enumerate().find_map(|(i, c)| {
            c.verp
                .decode(address)
                .map(|a| (i, a.as_str().to_ascii_lowercase()))
        })
    }

    fn campaign_by_header(&self, report: &Report) -> Option<usize> {
        let value = report.original.get(&self.campaign_header)?.trim();
        self.campaigns.iter().position(|c| c.name == value)
    }

    fn complaint(
        &mut self,
        report: &Report,
        verp: Option<(usize, String)>,
        message: &[u8],
        now: SystemTime,
        out: &mut Vec<AsyncOutcome>,
    ) -> io::Result<()> {
        let feedback = report.feedback.clone().unwrap_or_default();
        let who = verp
            .or_else(|| {
                feedback
                    .original_mail_from
                    .as_deref()
                    .and_then(|a| self.decode(a))
            })
            .or_else(|| {
                report
                    .original
                    .return_path
                    .as_deref()
                    .and_then(|a| self.decode(a))
            })
            .or_else(|| {
                let campaign = self.campaign_by_header(report)?;
                let rcpt = match (
                    feedback.original_rcpt_to.as_slice(),
                    report.original.to.as_slice(),
                ) {
                    ([one], _) | ([], [one]) => one.clone(),
                    _ => return None,
                };
                Some((campaign, rcpt))
            });
        let Some((campaign, recipient)) = who else {
            return self.quarantine(
                message,
                "unattributed",
                "complaint names no campaign recipient",
            );
        };
        // RFC 5965 7.3: not-spam is the opposite of a complaint.
        let suppress = feedback.feedback_type != "not-spam";
        let name = self.campaigns[campaign].name.clone();
        if suppress {
            *self
                .metrics
                .complaints_by_campaign
                .entry(name.clone())
                .or_default() += 1;
            *self
                .metrics
                .complaints_by_domain
                .entry(domain_of(&recipient).to_string())
                .or_default() += 1;
        }
        let suppressed = suppress
            && self.suppress(
                &recipient,
                &format!("complaint {} {name}", feedback.feedback_type),
                now,
            )?;
        let outcome = AsyncOutcome {
            time: rfc3339(unix(now)),
            campaign: name,
            recipient,
            event: "complaint".into(),
            kind: feedback.feedback_type.clone(),
            category: String::new(),
            code: 0,
            enhanced: String::new(),
            reason: feedback
                .user_agent
                .map(|ua| format!("feedback report from {ua}"))
                .unwrap_or_else(|| "feedback report".into()),
            suppressed,
        };
        self.record(campaign, &outcome)?;
        out.push(outcome);
        Ok(())
    }

    fn bounce(
        &mut self,
        report: &Report,
        verp: Option<(usize, String)>,
        message: &[u8],
        now: SystemTime,
        out: &mut Vec<AsyncOutcome>,
    ) -> io::Result<()> {
        let names = |s: &RecipientStatus| {
            [
                s.final_recipient.as_deref(),
                s.original_recipient.as_deref(),
            ]
            .into_iter()
            .flatten()
            .map(str::to_string)
            .collect::<Vec<_>>()
        };
        let mut pairs: Vec<(usize, String, &RecipientStatus)> = Vec::new();
        if let Some((campaign, recipient)) = verp {
            // The VERP address names the recipient; the report's entry for it, or its only one
            // (a forwarded address may differ from the one we sent to).
            let status = report
                .recipients
                .iter()
                .find(|s| names(s).contains(&recipient))
                .or(match report.recipients.as_slice() {
                    [one] => Some(one),
                    _ => None,
                });
            match status {
                Some(s) => pairs.push((campaign, recipient, s)),
                None => {
                    return self.quarantine(
                        message,
                        "unattributed",
                        "several recipients, none the VERP address names",
                    )
                }
            }
        } else if let Some((campaign, recipient)) = report
            .original
            .return_path
            .as_deref()
            .and_then(|a| self.decode(a))
        {
            if let Some(s) = report
                .recipients
                .iter()
                .find(|s| names(s).contains(&recipient))
            {
                pairs.push((campaign, recipient, s));
            }
        } else if let Some(campaign) = self.campaign_by_header(report) {
            // Without a VERP address the report's own text names the recipient: act only when
            // the returned original was addressed to it too, so that one damaged or forged
            // place never suppresses an address.
            let addressed = |r: &str| {
                report
                    .original
                    .to
                    .iter()
                    .any(|to| to.eq_ignore_ascii_case(r))
            };
            for s in &report.recipients {
                if let Some(r) = s.original_recipient.as_ref().or(s.final_recipient.as_ref()) {
                    if addressed(r) {
                        pairs.push((campaign, r.clone(), s));
                    }
                }
            }
        }
        if pairs.is_empty() {
            return self.quarantine(
                message,
                "unattributed",
                "bounce names no campaign recipient",
            );
        }
        for (campaign, recipient, status) in pairs {
            let outcome = self.one_bounce(campaign, recipient, status, now)?;
            out.extend(outcome);
        }
        Ok(())
    }

    fn one_bounce(
        &mut self,
        campaign: usize,
        recipient: String,
        status: &RecipientStatus,
        now: SystemTime,
    ) -> io::Result<Option<AsyncOutcome>> {
        let Some(kind) = bounce_type(status) else {
            return Ok(None);
        };
        let event = if kind == "delay" { "delay" } else { "bounce" };
        *self
            .metrics
            .bounces
            .entry((kind.to_string(), status.category.as_str().to_string()))
            .or_default() += 1;
        let name = self.campaigns[campaign].name.clone();
        let reply = &status.reply;
        let enhanced = reply.enhanced.map(|e| e.to_string()).unwrap_or_default();
        let note = format!("{kind} bounce {name} {} {enhanced}", status.category);
        let suppressed = match kind {
            "hard" => self.suppress(&recipient, &note, now)?,
            "soft" => {
                let t = unix(now);
                writeln!(
                    self.soft_file,
                    "{}",
                    serde_json::json!({"address": recipient, "time": t})
                )?;
                let window = self.soft_window_secs;
                let times = self.soft.entry(recipient.clone()).or_default();
                times.push(t);
                times.retain(|&x| x + window > t);
                let recent = times.len();
                recent >= self.soft_limit as usize
                    && self.suppress(
                        &recipient,
                        &format!("{note} ({recent} soft bounces within the window)"),
                        now,
                    )?
            }
            _ => false,
        };
        let outcome = AsyncOutcome {
            time: rfc3339(unix(now)),
            campaign: name,
            recipient,
            event: event.into(),
            kind: kind.into(),
            category: status.category.as_str().into(),
            code: reply.code,
            enhanced,
            reason: reply.text.clone(),
            suppressed,
        };
        self.record(campaign, &outcome)?;
        Ok(Some(outcome))
    }

    fn unsubscribe(
        &mut self,
        campaign: usize,
        address: &str,
        method: &str,
        now: SystemTime,
    ) -> io::Result<AsyncOutcome> {
        let name = self.campaigns[campaign].name.clone();
        *self
            .metrics
            .unsubscribes
            .entry((name.clone(), method.to_string()))
            .or_default() += 1;
        let suppressed = self.suppress(address, &format!("unsubscribe {method} {name}"), now)?;
        let outcome = AsyncOutcome {
            time: rfc3339(unix(now)),
            campaign: name,
            recipient: address.to_lowercase(),
            event: "unsubscribe".into(),
            kind: method.into(),
            category: String::new(),
            code: 0,
            enhanced: String::new(),
            reason: format!("unsubscribed by {method}"),
            suppressed,
        };
        self.record(campaign, &outcome)?;
        Ok(outcome)
    }

    /// An RFC 8058 one-click request for `campaign` with the URL's `u` and `t` and the POST
    /// body.
    pub fn one_click(
        &mut self,
        campaign: &str,
        address: Option<&str>,
        token: Option<&str>,
        body: &[u8],
        now: SystemTime,
    ) -> OneClick {
        let Some(index) = self.campaigns.iter().position(|c| c.name == campaign) else {
            return OneClick::UnknownCampaign;
        };
        let Some(secret) = self.campaigns[index].secret.clone() else {
            return OneClick::UnknownCampaign;
        };
        let (Some(address), Some(token)) = (address, token) else {
            return OneClick::BadRequest;
        };
        if !unsubscribe::is_one_click_body(body) {
            return OneClick::BadRequest;
        }
        if !unsubscribe::verify(&secret, address, token) {
            self.metrics.forged_unsubscribes += 1;
            return OneClick::Forged;
        }
        match self.unsubscribe(index, address, "one-click", now) {
            Ok(_) => OneClick::Unsubscribed,
            // Not recorded: the client may try again (RFC 8058 leaves retries to it).
            Err(_) => OneClick::Unavailable,
        }
    }

    fn suppress(&mut self, address: &str, note: &str, now: SystemTime) -> io::Result<bool> {
        let added = self
            .store
            .suppress(address, &format!("{note} {}", rfc3339(unix(now))))?;
        if added {
            self.metrics.suppressed += 1;
        }
        Ok(added)
    }

    fn record(&mut self, campaign: usize, outcome: &AsyncOutcome) -> io::Result<()> {
        let mut line = serde_json::to_vec(outcome).map_err(io::Error::other)?;
        line.push(b'\n');
        let file = &mut self.campaigns[campaign].outcomes;
        file.write_all(&line)?;
        file.sync_data()
    }

    /// Keeps `message` in the quarantine folder (`N.eml` with `N.txt` saying why).
    fn quarantine(&mut self, message: &[u8], reason: &str, detail: &str) -> io::Result<()> {
        *self
            .metrics
            .quarantined
            .entry(reason.to_string())
            .or_default() += 1;
        self.quarantine_seq += 1;
        let stem = format!(
            "{}-{}-{}",
            unix(SystemTime::now()),
            std::process::id(),
            self.quarantine_seq
        );
        std::fs::write(self.quarantine.join(format!("{stem}.eml")), message)?;
        std::fs::write(
            self.quarantine.join(format!("{stem}.txt")),
            format!("{reason}: {detail}\n"),
        )
    }
}

/// `hard`, `soft` or `delay` for a recipient's status; `None` for a success (delivered,
/// relayed, expanded). Hard is a permanent failure the bounce table calls `bad_mailbox` or
/// `no_such_domain`: the address itself is bad. Any other failure (full mailbox, a policy
/// block of the sender, a temporary failure the reporting MTA gave up on) says nothing
/// certain about the address, so it is soft.
pub fn bounce_type(status: &RecipientStatus) -> Option<&'static str> {
    match status.action {
        Action::Delivered | Action::Relayed | Action::Expanded => None,
        Action::Delayed => Some("delay"),
        Action::Failed
            if status.is_permanent()
                && matches!(
                    status.category,
                    Category::BadMailbox | Category::NoSuchDomain
                ) =>
        {
            Some("hard")
        }
        Action::Failed => Some("soft"),
    }
}

/// The From address of an unsubscribe mail (RFC 2369 3.2: the subscriber writes from the
/// address to remove).
fn sender_of(message: &[u8]) -> Option<String> {
    let parsed = mail_parser::MessageParser::default().parse_headers(message)?;
    let address = parsed.from()?.first()?.address()?;
    crate::message::Address::parse(address, crate::error::Field::Sender)
        .ok()
        .map(|a| a.as_str().to_lowercase())
}

/// Adds a campaign report's delivered recipients to the per-campaign and per-domain counts.
fn count_delivered(path: &Path, campaign: &str, metrics: &mut Metrics) -> io::Result<()> {
    let mut count = |line: ReportLine| {
        if line.status == "delivered" {
            *metrics
                .delivered_by_campaign
                .entry(campaign.to_string())
                .or_default() += 1;
            *metrics
                .delivered_by_domain
                .entry(domain_of(&line.recipient).to_ascii_lowercase())
                .or_default() += 1;
        }
    };
    if path.extension().is_some_and(|e| e == "csv") {
        let mut reader = csv::Reader::from_path(path).map_err(io::Error::other)?;
        for row in reader.deserialize::<ReportLine>() {
            count(row.map_err(io::Error::other)?);
        }
    } else {
        for line in BufReader::new(File::open(path)?).lines() {
            let line = line?;
            if !line.trim().is_empty() {
                count(serde_json::from_str(&line).map_err(io::Error::other)?);
            }
        }
    }
    Ok(())
}

impl fmt::Debug for Inbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inbound")
            .field("campaigns", &self.campaigns.len())
            .field("metrics", &self.metrics)
            .finish()
    }
}
