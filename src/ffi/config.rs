//! `mxp_config`: every setting of the Rust builder, settable from C by key and text value or from
//! a TOML document.
//!
//! A value is parsed and range-checked when it is set, so that a bad one is refused with an error
//! naming both key and value, and the configuration keeps its previous value. What can only be
//! checked when the dispatcher starts (whether the relay's host resolves) is checked by
//! `mxp_dispatcher_new`. This module starts nothing.

use super::handle::{from_ptr, to_ptr, HandleTable};
use super::panic::boundary;
use super::result::{excerpt, mxp_result, FfiError};
use super::{c_str, out_ptr};
use crate::engine::classify::{Category, Rule};
use crate::engine::shaping::LimitOverride;
use crate::engine::{Config, Dispatcher, DispatcherBuilder, TlsPolicy};
use crate::smtp::session::StartTls;
use crate::smtp::Credentials;
use std::ffi::{c_char, CStr};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

/// The most octets of a `host:port` destination (a relay or a route's target): the longest
/// host name (253) with a port, so that it always fits `mxp_event.destination`.
pub(crate) const MAX_DESTINATION_LEN: usize = 263;

/// An opaque configuration handle, from `mxp_config_new` or `mxp_config_from_toml`; free it with
/// `mxp_config_free`. A configuration may be used from several threads (setters are serialised).
pub struct mxp_config {
    _private: [u8; 0],
}

pub(crate) static CONFIGS: HandleTable<Mutex<Settings>> = HandleTable::new("config", 1);

/// Everything `mxp_config_set` can change, kept until a dispatcher is built from it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Settings {
    relay: Option<String>,
    routes: Vec<(String, String)>,
    auth_user: Option<String>,
    auth_secret: Option<Secret>,
    classify_rules: Vec<Rule>,
    /// `spool_max_bytes`, `spool_min_free_bytes`, `spool_segment_bytes`, kept until
    /// `spool_dir` is known too.
    spool_sizes: [Option<u64>; 3],
    config: Config,
}

/// A login secret, kept until the user name is known too.
#[derive(Clone)]
enum Secret {
    Password(String),
    OAuth2Token(String),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The deepest BDAT window a setting may ask for (transactions in flight on one connection).
const MAX_BDAT_WINDOW: u64 = 1024;

/// Every key, with the form of its value, for the unknown-key message and the header.
const KEYS: &[&str] = &[
    "relay",
    "route",
    "ehlo_name",
    "connect_timeout",
    "greeting_timeout",
    "command_timeout",
    "data_end_timeout",
    "chunking",
    "bdat_window",
    "bdat_window_bytes",
    "max_connections_per_destination",
    "max_connections",
    "tls_handshake_timeout",
    "max_messages_per_connection",
    "max_recipients_per_transaction",
    "idle_timeout",
    "queue_capacity",
    "max_queued_recipients",
    "retry_initial",
    "retry_max_interval",
    "retry_multiplier",
    "retry_jitter",
    "retry_max_age",
    "loops",
    "record_events",
    "starttls",
    "tls_verify",
    "tls_ca_file",
    "spool_dir",
    "spool_max_bytes",
    "spool_min_free_bytes",
    "spool_segment_bytes",
    "dsn_reports",
    "auth_user",
    "auth_password",
    "auth_oauth2_token",
    "allow_plaintext_auth",
    "source_address",
    "messages_per_second",
    "messages_per_minute",
    "messages_per_hour",
    "connections_per_minute",
    "limit_override",
    "adaptive_initial_concurrency",
    "adaptive_pause",
    "adaptive_max_pause",
    "adaptive_dead_after",
    "adaptive_dead_for",
    "adaptive_throttle_memory",
    "classify_rule",
    "direct_mx",
    "mx_nameservers",
    "mx_smtp_port",
    "mx_ipv4",
    "mx_ipv6",
    "mx_max_hosts",
    "mx_max_addresses",
    "mx_timeout",
    "mx_cache_capacity",
    "mx_allow_loopback",
    "mta_sts",
    "mta_sts_port",
    "trace_file",
];

fn bad_value(key: &str, value: &str, problem: &str) -> FfiError {
    FfiError::new(
        mxp_result::MXP_ERR_INVALID_CONFIG,
        format!("config {key}: {:?} {problem}", excerpt(value)),
    )
}

fn parse_bool(key: &str, value: &str) -> Result<bool, FfiError> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(bad_value(
            key,
            value,
            "is not a boolean (true, false, yes, no, on, off, 1 or 0)",
        )),
    }
}

fn parse_count(key: &str, value: &str, min: u64, max: u64) -> Result<u64, FfiError> {
    value
        .parse::<u64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| {
            bad_value(
                key,
                value,
                &format!("is not a whole number from {min} to {max}"),
            )
        })
}

fn parse_float(
    key: &str,
    value: &str,
    ok: impl Fn(f64) -> bool,
    what: &str,
) -> Result<f64, FfiError> {
    value
        .parse::<f64>()
        .ok()
        .filter(|f| f.is_finite() && ok(*f))
        .ok_or_else(|| bad_value(key, value, &format!("is not {what}")))
}

/// A duration: a number of seconds ("30", "1.5"), or a number with a unit: ms, s, m, h or d.
fn parse_duration(key: &str, value: &str, allow_zero: bool) -> Result<Duration, FfiError> {
    let text = value.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => f64::NAN,
    };
    let seconds = number.parse::<f64>().map(|n| n * scale).unwrap_or(f64::NAN);
    // A hundred years is "forever" for every setting here and keeps Instant arithmetic safe.
    let limit = 100.0 * 365.0 * 86400.0;
    match Duration::try_from_secs_f64(seconds) {
        Ok(d) if seconds <= limit && (allow_zero || !d.is_zero()) => Ok(d),
        _ => Err(bad_value(
            key,
            value,
            &format!(
                "is not a duration{} of at most 100 years (seconds, or a number followed by \
                 ms, s, m, h or d)",
                if allow_zero { "" } else { " above zero" }
            ),
        )),
    }
}

/// `host:port` with a port from 1 to 65535; whether the host resolves is checked at start.
fn parse_destination(key: &str, value: &str) -> Result<String, FfiError> {
    let address = value
        .strip_prefix("smtps://")
        .or_else(|| value.strip_prefix("smtp://"))
        .unwrap_or(value);
    let port_ok = address
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty())
        .and_then(|(_, port)| port.parse::<u16>().ok())
        .is_some_and(|p| p != 0);
    if !port_ok
        || value
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(bad_value(
            key,
            value,
            "is not host:port (a host name or address and a port from 1 to 65535, after \
             smtps:// for implicit TLS)",
        ));
    }
    if address.len() > MAX_DESTINATION_LEN {
        return Err(bad_value(
            key,
            value,
            &format!("is longer than {MAX_DESTINATION_LEN} octets"),
        ));
    }
    Ok(value.to_string())
}

fn parse_rate(key: &str, value: &str) -> Result<f64, FfiError> {
    parse_float(key, value, |f| f > 0.0, "a number above zero")
}

fn parse_ip(key: &str, value: &str) -> Result<IpAddr, FfiError> {
    value
        .trim()
        .parse()
        .map_err(|_| bad_value(key, value, "is not an IPv4 or IPv6 address"))
}

/// Comma-separated nameservers: `ip` (port 53), `ip:port` or `[v6]:port`.
fn parse_nameservers(key: &str, value: &str) -> Result<Vec<SocketAddr>, FfiError> {
    let list = value
        .split(',')
        .map(str::trim)
        .map(|item| {
            item.parse::<SocketAddr>()
                .or_else(|_| item.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        })
        .collect::<Result<Vec<_>, _>>()
        .ok()
        .filter(|list| !list.is_empty());
    list.ok_or_else(|| {
        bad_value(
            key,
            value,
            "is not a comma-separated list of addresses (ip, ip:port or [v6]:port)",
        )
    })
}

/// A parsed `head: name=value, name=value`.
type Spec<'a> = (&'a str, Vec<(&'a str, &'a str)>);

/// `head: name=value, name=value`: the form of `limit_override` and `classify_rule`.
fn parse_spec<'a>(key: &str, value: &'a str) -> Result<Spec<'a>, FfiError> {
    let (head, rest) = value
        .split_once(':')
        .ok_or_else(|| bad_value(key, value, "is not \"name: key=value, ...\""))?;
    let items = rest
        .split(',')
        .filter(|item| !item.trim().is_empty())
        .map(|item| {
            item.split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .ok_or_else(|| bad_value(key, value, &format!("has {:?} without '='", item.trim())))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((head.trim(), items))
}

/// `pattern: max_connections=2, messages_per_second=5, ...` where the pattern is a host name
/// or `.suffix`, or, after an `@`, a recipient domain or `.suffix` (`@yahoo.com`).
fn parse_limit_override(key: &str, value: &str) -> Result<LimitOverride, FfiError> {
    let (pattern, items) = parse_spec(key, value)?;
    let (recipient_domain, pattern) = match pattern.strip_prefix('@') {
        Some(domain) => (true, domain),
        None => (false, pattern),
    };
    if pattern.is_empty() || pattern.bytes().any(|b| b.is_ascii_whitespace()) {
        return Err(bad_value(
            key,
            value,
            "does not start with a host name or .suffix, or @ and a recipient domain or .suffix",
        ));
    }
    let mut o = LimitOverride {
        pattern: pattern.to_string(),
        recipient_domain,
        ..LimitOverride::default()
    };
    let mut user = None;
    let mut secret_of = None;
    for (name, v) in items {
        let whole = || parse_count(key, v, 1, u32::MAX.into());
        match name {
            "max_connections" => o.max_connections = Some(whole()? as usize),
            "max_messages_per_connection" => o.max_messages_per_connection = Some(whole()? as u32),
            "max_recipients_per_transaction" => {
                o.max_recipients_per_transaction = Some(whole()? as usize)
            }
            "messages_per_second" => o.messages_per_second = Some(parse_rate(key, v)?),
            "messages_per_minute" => o.messages_per_minute = Some(parse_rate(key, v)?),
            "messages_per_hour" => o.messages_per_hour = Some(parse_rate(key, v)?),
            "connections_per_minute" => o.connections_per_minute = Some(parse_rate(key, v)?),
            "tls_policy" => {
                o.tls_policy = Some(TlsPolicy::from_name(v).ok_or_else(|| {
                    bad_value(
                    key,
                    value,
                    "has a tls_policy that is not none, opportunistic, required, verify or secure",
                )
                })?)
            }
            "tls_ca_file" if !v.is_empty() => o.tls_ca_file = Some(v.into()),
            // Secrets never go in the override's text (it is shown in errors): only the name
            // of the environment variable that holds one.
            "auth_user" if !v.is_empty() => user = Some(v),
            "auth_password_env" | "auth_oauth2_token_env" if !v.is_empty() => {
                let secret = std::env::var(v).map_err(|_| {
                    bad_value(key, value, &format!("names {v:?}, which is not set"))
                })?;
                secret_of = Some((name, secret));
            }
            _ => {
                return Err(bad_value(
                    key,
                    value,
                    &format!(
                        "has the unknown limit {name:?} (max_connections, \
                         max_messages_per_connection, max_recipients_per_transaction, \
                         messages_per_second, messages_per_minute, messages_per_hour, \
                         connections_per_minute, tls_policy, tls_ca_file, auth_user, \
                         auth_password_env, auth_oauth2_token_env)"
                    ),
                ))
            }
        }
    }
    o.credentials =
        match (user, secret_of) {
            (None, None) => None,
            (Some(user), Some((kind, secret))) => Some(
                if kind == "auth_password_env" {
                    Credentials::password(user, &secret)
                } else {
                    Credentials::oauth2(user, &secret)
                }
                .ok_or_else(|| {
                    bad_value(
                        key,
                        value,
                        "has a user or secret that is empty or contains CR or LF",
                    )
                })?,
            ),
            _ => return Err(bad_value(
                key,
                value,
                "needs auth_user and one of auth_password_env or auth_oauth2_token_env together",
            )),
        };
    Ok(o)
}

/// `category: class=5, code=550, enhanced=7.1, text=phrase, text=phrase`.
fn parse_classify_rule(key: &str, value: &str) -> Result<Rule, FfiError> {
    let (category, items) = parse_spec(key, value)?;
    let category = Category::from_name(category).ok_or_else(|| {
        bad_value(
            key,
            value,
            "does not start with a category (bad_mailbox, mailbox_full, no_such_domain, \
             policy_block, throttled, tls, dns, connection, protocol, other)",
        )
    })?;
    let mut rule = Rule {
        category,
        class: None,
        code: None,
        enhanced: None,
        text: Vec::new(),
    };
    for (name, v) in items {
        match name {
            "class" => rule.class = Some(parse_count(key, v, 4, 5)? as u8),
            "code" => rule.code = Some(parse_count(key, v, 200, 599)? as u16),
            "enhanced" => {
                let mut parts = v.split('.').map(|p| p.parse::<u16>().ok());
                rule.enhanced = match (parts.next().flatten(), parts.next(), parts.next()) {
                    (Some(subject), None, None) => Some((subject, None)),
                    (Some(subject), Some(Some(detail)), None) => Some((subject, Some(detail))),
                    _ => return Err(bad_value(key, v, "is not subject or subject.detail")),
                }
            }
            "text" => rule.text.push(v.to_lowercase()),
            _ => {
                return Err(bad_value(
                    key,
                    value,
                    &format!("has the unknown condition {name:?} (class, code, enhanced, text)"),
                ))
            }
        }
    }
    Ok(rule)
}

/// The keys that add one each time they are set, which TOML gives as a list.
const REPEATABLE: [&str; 4] = ["route", "limit_override", "classify_rule", "source_address"];

/// A dispatcher builder from a TOML document with the keys of `mxp_config_set`: the file C and
/// Python programs load with `mxp_config_from_toml`, for the command line's `--config`. The
/// error names the key (and, for a bad value, the value).
pub fn builder_from_toml(text: &str) -> Result<DispatcherBuilder, String> {
    let mut settings = Settings::default();
    settings
        .apply_toml(text)
        .and_then(|()| settings.builder())
        .map_err(|e| e.message.into_owned())
}

impl Settings {
    /// Sets one key; on error nothing changes.
    pub(crate) fn set(&mut self, key: &str, value: &str) -> Result<(), FfiError> {
        let count = |min, max| parse_count(key, value, min, max);
        let c = &mut self.config;
        match key {
            "relay" => self.relay = Some(parse_destination(key, value)?),
            "route" => {
                let (domain, target) = value
                    .split_once('=')
                    .ok_or_else(|| bad_value(key, value, "is not domain=host:port"))?;
                let domain = domain.trim();
                if domain.is_empty()
                    || domain.len() > 253
                    || domain
                        .bytes()
                        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
                {
                    return Err(bad_value(key, value, "does not start with a domain name"));
                }
                let target = parse_destination(key, target.trim())?;
                self.routes.push((domain.to_string(), target));
            }
            "ehlo_name" => {
                // The same rule as the builder's check, here so that the error names the value.
                let ok = !value.is_empty()
                    && value.len() <= 255
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b));
                if !ok {
                    return Err(bad_value(
                        key,
                        value,
                        "is not a domain name or an address literal",
                    ));
                }
                c.session.ehlo_name = value.to_string();
            }
            "connect_timeout" => c.session.timeouts.connect = parse_duration(key, value, false)?,
            "greeting_timeout" => c.session.timeouts.greeting = parse_duration(key, value, false)?,
            "command_timeout" => c.session.timeouts.command = parse_duration(key, value, false)?,
            "data_end_timeout" => c.session.timeouts.data_end = parse_duration(key, value, false)?,
            "chunking" => c.session.use_chunking = parse_bool(key, value)?,
            "bdat_window" => c.session.bdat_window = count(0, MAX_BDAT_WINDOW)? as usize,
            "bdat_window_bytes" => c.session.bdat_window_bytes = count(1, 1 << 30)? as usize,
            "max_connections_per_destination" => {
                c.max_connections_per_destination = count(1, 1 << 20)? as usize
            }
            "max_connections" => c.max_connections = count(1, 1 << 20)? as usize,
            "tls_handshake_timeout" => {
                c.session.timeouts.tls_handshake = parse_duration(key, value, false)?
            }
            "max_messages_per_connection" => {
                c.max_messages_per_connection = count(1, u32::MAX.into())? as u32
            }
            "max_recipients_per_transaction" => {
                c.max_recipients_per_transaction = count(1, 1 << 20)? as usize
            }
            "idle_timeout" => c.idle_timeout = parse_duration(key, value, true)?,
            "queue_capacity" => c.queue_capacity = count(1, 1 << 30)? as usize,
            "max_queued_recipients" => c.max_queued_recipients = count(1, 1 << 40)? as usize,
            "retry_initial" => c.retry.initial = parse_duration(key, value, true)?,
            "retry_max_interval" => c.retry.max_interval = parse_duration(key, value, true)?,
            "retry_multiplier" => {
                c.retry.multiplier =
                    parse_float(key, value, |f| f >= 1.0, "a number of at least 1")?
            }
            "retry_jitter" => {
                c.retry.jitter = parse_float(
                    key,
                    value,
                    |f| (0.0..1.0).contains(&f),
                    "a number from 0 up to (not including) 1",
                )?
            }
            "retry_max_age" => c.retry.max_age = parse_duration(key, value, true)?,
            "loops" => c.loops = count(1, 64)? as usize,
            "record_events" => c.record_events = parse_bool(key, value)?,
            "starttls" => {
                c.session.starttls = match value.to_ascii_lowercase().as_str() {
                    "disabled" => StartTls::Disabled,
                    "opportunistic" => StartTls::Opportunistic,
                    "required" => StartTls::Required,
                    _ => {
                        return Err(bad_value(
                            key,
                            value,
                            "is not disabled, opportunistic or required",
                        ))
                    }
                }
            }
            "tls_verify" => c.tls_verify = Some(parse_bool(key, value)?),
            "tls_ca_file" => {
                if value.is_empty() {
                    return Err(bad_value(key, value, "is not a file name"));
                }
                c.tls_ca_file = Some(value.into());
            }
            "dsn_reports" => c.dsn_reports = parse_bool(key, value)?,
            "spool_dir" => {
                if value.is_empty() {
                    return Err(bad_value(key, value, "is not a directory name"));
                }
                c.spool = Some(crate::spool::SpoolConfig::new(value));
            }
            "spool_max_bytes" => self.spool_sizes[0] = Some(count(1 << 20, u64::MAX >> 1)?),
            "spool_min_free_bytes" => self.spool_sizes[1] = Some(count(0, u64::MAX >> 1)?),
            "spool_segment_bytes" => self.spool_sizes[2] = Some(count(1 << 12, 1 << 40)?),
            "auth_user" | "auth_password" | "auth_oauth2_token" => {
                // RFC 4954 mechanisms cannot carry CR or LF (NUL cannot reach here).
                if value.is_empty() || value.bytes().any(|b| b == b'\r' || b == b'\n') {
                    let shown = if key == "auth_user" {
                        value
                    } else {
                        "(secret)"
                    };
                    return Err(bad_value(key, shown, "is empty or contains CR or LF"));
                }
                match key {
                    "auth_user" => self.auth_user = Some(value.to_string()),
                    "auth_password" => self.auth_secret = Some(Secret::Password(value.into())),
                    _ => self.auth_secret = Some(Secret::OAuth2Token(value.into())),
                }
            }
            "allow_plaintext_auth" => c.session.allow_plaintext_auth = parse_bool(key, value)?,
            "source_address" => c.source_addresses.push(parse_ip(key, value)?),
            "trace_file" => {
                let trace = crate::engine::Trace::create(std::path::Path::new(value))
                    .map_err(|e| bad_value(key, value, &format!("cannot create: {e}")))?;
                c.trace = Some(trace);
            }
            "messages_per_second" => c.messages_per_second = Some(parse_rate(key, value)?),
            "messages_per_minute" => c.messages_per_minute = Some(parse_rate(key, value)?),
            "messages_per_hour" => c.messages_per_hour = Some(parse_rate(key, value)?),
            "connections_per_minute" => c.connections_per_minute = Some(parse_rate(key, value)?),
            "limit_override" => c.limit_overrides.push(parse_limit_override(key, value)?),
            "adaptive_initial_concurrency" => {
                c.adaptive.initial_concurrency =
                    parse_float(key, value, |f| f >= 1.0, "a number of at least 1")?
            }
            "adaptive_pause" => c.adaptive.pause = parse_duration(key, value, false)?,
            "adaptive_max_pause" => c.adaptive.max_pause = parse_duration(key, value, false)?,
            "adaptive_dead_after" => c.adaptive.dead_after = count(1, u32::MAX.into())? as u32,
            "adaptive_dead_for" => c.adaptive.dead_for = parse_duration(key, value, true)?,
            "adaptive_throttle_memory" => {
                c.adaptive.throttle_memory = parse_duration(key, value, true)?
            }
            "classify_rule" => self.classify_rules.push(parse_classify_rule(key, value)?),
            "direct_mx" => c.mx = parse_bool(key, value)?.then(|| c.mx.clone().unwrap_or_default()),
            "mx_nameservers" | "mx_smtp_port" | "mx_ipv4" | "mx_ipv6" | "mx_max_hosts"
            | "mx_max_addresses" | "mx_timeout" | "mx_cache_capacity" | "mx_allow_loopback"
            | "mta_sts" | "mta_sts_port" => {
                // Any MX setting turns direct MX delivery on.
                let mut mx = c.mx.clone().unwrap_or_default();
                match key {
                    "mx_nameservers" => mx.nameservers = Some(parse_nameservers(key, value)?),
                    "mx_smtp_port" => mx.smtp_port = count(1, 65535)? as u16,
                    "mx_ipv4" => mx.ipv4 = parse_bool(key, value)?,
                    "mx_ipv6" => mx.ipv6 = parse_bool(key, value)?,
                    "mx_max_hosts" => mx.max_hosts = count(1, 1 << 16)? as usize,
                    "mx_max_addresses" => mx.max_addresses = count(1, 1 << 16)? as usize,
                    "mx_timeout" => mx.timeout = parse_duration(key, value, false)?,
                    "mx_allow_loopback" => mx.allow_loopback = parse_bool(key, value)?,
                    "mta_sts" => mx.mta_sts = parse_bool(key, value)?,
                    "mta_sts_port" => mx.mta_sts_port = count(1, 65535)? as u16,
                    _ => mx.cache_capacity = count(0, 1 << 30)? as usize,
                }
                c.mx = Some(mx);
            }
            _ => {
                return Err(FfiError::new(
                    mxp_result::MXP_ERR_UNKNOWN_KEY,
                    format!(
                        "unknown configuration key {:?}; the keys are: {}",
                        excerpt(key),
                        KEYS.join(", ")
                    ),
                ))
            }
        }
        Ok(())
    }

    /// Applies a TOML document: top-level keys are the keys of `mxp_config_set` (a list for
    /// the keys that add one each time); a `[routes]` table maps domains to `host:port`.
    pub(crate) fn apply_toml(&mut self, text: &str) -> Result<(), FfiError> {
        // The error's own Display quotes the offending line, which may hold a secret
        // (auth_password, auth_oauth2_token): only its message and position are shown.
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let at = e.span().map_or(String::new(), |span| {
                let before = text.get(..span.start).unwrap_or(text);
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                format!(" at line {line}, column {column}")
            });
            FfiError::new(
                mxp_result::MXP_ERR_INVALID_CONFIG,
                format!("config: not valid TOML{at}: {}", e.message().trim_end()),
            )
        })?;
        for (key, value) in &table {
            match (key.as_str(), value) {
                ("routes", toml::Value::Table(routes)) => {
                    for (domain, target) in routes {
                        let target = scalar(&format!("routes.{domain}"), target)?;
                        self.set("route", &format!("{domain}={target}"))?;
                    }
                }
                ("route", toml::Value::Array(items)) => {
                    for item in items {
                        self.set("route", &scalar("route", item)?)?;
                    }
                }
                // The nameservers are one setting, written as a list or comma-separated.
                ("mx_nameservers", toml::Value::Array(items)) => {
                    let servers = items
                        .iter()
                        .map(|item| scalar("mx_nameservers", item))
                        .collect::<Result<Vec<_>, _>>()?;
                    self.set("mx_nameservers", &servers.join(","))?;
                }
                // A key that adds one each time (route, limit_override, classify_rule,
                // source_address) takes a list.
                (key, toml::Value::Array(items)) if REPEATABLE.contains(&key) => {
                    for item in items {
                        self.set(key, &scalar(key, item)?)?;
                    }
                }
                (key, value) if KEYS.contains(&key) => self.set(key, &scalar(key, value)?)?,
                (key, _) => {
                    return Err(FfiError::new(
                        mxp_result::MXP_ERR_UNKNOWN_KEY,
                        format!(
                            "unknown configuration key {:?}; the keys are: {}, and a [routes] \
                             table",
                            excerpt(key),
                            KEYS.join(", ")
                        ),
                    ))
                }
            }
        }
        Ok(())
    }

    /// A builder holding these settings; fails when they contradict each other.
    pub(crate) fn builder(&self) -> Result<DispatcherBuilder, FfiError> {
        let mut builder = Dispatcher::builder();
        *builder.config_mut() = self.config.clone();
        if let Some(relay) = &self.relay {
            builder = builder.relay(relay);
        }
        for (domain, target) in &self.routes {
            builder = builder.route(domain, target);
        }
        if !self.classify_rules.is_empty() {
            builder = builder.classify_rules(self.classify_rules.clone());
        }
        let config_error =
            |message: &str| FfiError::new(mxp_result::MXP_ERR_INVALID_CONFIG, message.to_string());
        let [max_bytes, min_free_bytes, segment_bytes] = self.spool_sizes;
        let sizes = [
            ("spool_max_bytes", max_bytes),
            ("spool_min_free_bytes", min_free_bytes),
            ("spool_segment_bytes", segment_bytes),
        ];
        match builder.config_mut().spool.as_mut() {
            Some(spool) => {
                spool.max_bytes = max_bytes.unwrap_or(spool.max_bytes);
                spool.min_free_bytes = min_free_bytes.unwrap_or(spool.min_free_bytes);
                spool.segment_bytes = segment_bytes.unwrap_or(spool.segment_bytes);
            }
            None => {
                if let Some((key, _)) = sizes.iter().find(|(_, v)| v.is_some()) {
                    return Err(config_error(&format!(
                        "config {key}: set spool_dir as well"
                    )));
                }
            }
        }
        match (&self.auth_user, &self.auth_secret) {
            (None, None) => {}
            (Some(user), Some(secret)) => {
                let credentials = match secret {
                    Secret::Password(p) => Credentials::password(user, p),
                    Secret::OAuth2Token(t) => Credentials::oauth2(user, t),
                };
                builder = builder.credentials(credentials.ok_or_else(|| {
                    config_error("config auth_user: these credentials cannot be sent")
                })?);
            }
            (Some(_), None) => {
                return Err(config_error(
                    "config auth_user: set auth_password or auth_oauth2_token as well",
                ))
            }
            (None, Some(_)) => {
                return Err(config_error("config auth_password: set auth_user as well"))
            }
        }
        Ok(builder)
    }

    /// The configured value of `key`, for start-up errors that name only the key.
    pub(crate) fn value_of(&self, key: &str) -> Option<String> {
        match key {
            "relay" => self.relay.clone(),
            "route" => Some(
                self.routes
                    .iter()
                    .map(|(d, t)| format!("{d}={t}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            _ => None,
        }
    }

    pub(crate) fn record_events(&self) -> bool {
        self.config.record_events
    }
}

/// A TOML value as the text `mxp_config_set` takes.
fn scalar(key: &str, value: &toml::Value) -> Result<String, FfiError> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(FfiError::new(
            mxp_result::MXP_ERR_INVALID_CONFIG,
            format!(
                "config {key}: expected a string, number or boolean, found a {}",
                other.type_str()
            ),
        )),
    }
}

/// Creates an empty configuration (every setting at its default; a relay or a route must be
/// set before `mxp_dispatcher_new`) and writes its handle to `*out`.
///
/// Ownership: the caller owns the new handle and frees it with `mxp_config_free`. Any thread may
/// call this.
///
/// # Safety
///
/// `out` must be NULL or point to writable storage for one pointer.
#[no_mangle]
pub unsafe extern "C" fn mxp_config_new(out: *mut *mut mxp_config) -> mxp_result {
    boundary("mxp_config_new", || {
        let out = out_ptr(out, "out")?;
        let handle = CONFIGS.insert(Mutex::new(Settings::default()))?;
        // SAFETY: checked non-NULL; the caller gives writable storage.
        unsafe { out.write(to_ptr(handle)) };
        Ok(())
    })
}

/// Parses a TOML document into a new configuration and writes its handle to `*out`.
///
/// Top-level keys are the keys of `mxp_config_set`, with TOML strings, numbers or booleans as
/// values (durations as seconds or as text such as "500ms"); a `[routes]` table maps domains to
/// `host:port`. Example:
///
/// ```toml
/// relay = "127.0.0.1:2525"
/// max_connections_per_destination = 8
/// connect_timeout = "10s"
/// [routes]
/// "example.org" = "10.0.0.5:25"
/// ```
///
/// Errors: `MXP_ERR_INVALID_CONFIG` (not TOML, or a bad value: the message names key and value),
/// `MXP_ERR_UNKNOWN_KEY`, `MXP_ERR_INVALID_UTF8`, `MXP_ERR_NULL_POINTER`.
///
/// Ownership: `toml` is only read during the call. The caller owns the new handle and frees it
/// with `mxp_config_free`. Any thread may call this.
///
/// # Safety
///
/// `toml` must be NULL or a NUL-terminated string; `out` must be NULL or point to writable
/// storage for one pointer.
#[no_mangle]
pub unsafe extern "C" fn mxp_config_from_toml(
    toml: *const c_char,
    out: *mut *mut mxp_config,
) -> mxp_result {
    boundary("mxp_config_from_toml", || {
        // SAFETY: the caller passes NULL or a NUL-terminated string.
        let text = unsafe { c_str(toml, "toml") }?;
        let out = out_ptr(out, "out")?;
        let mut settings = Settings::default();
        settings.apply_toml(text)?;
        let handle = CONFIGS.insert(Mutex::new(settings))?;
        // SAFETY: checked non-NULL; the caller gives writable storage.
        unsafe { out.write(to_ptr(handle)) };
        Ok(())
    })
}

/// Sets one setting from text. The keys, and the form of their values:
///
/// | key | value |
/// |---|---|
/// | `relay` | `host:port` of the smarthost that takes all mail without a route |
/// | `route` | `domain=host:port`; each call adds a route |
/// | `ehlo_name` | the name sent in EHLO (default `localhost`) |
/// | `connect_timeout`, `greeting_timeout`, `command_timeout`, `data_end_timeout` | durations above zero |
/// | `chunking` | boolean: use BDAT when offered (default true) |
/// | `bdat_window` | whole number 0 to 1024: with CHUNKING and PIPELINING, at most this many whole transactions in flight per connection; the window adapts from 4 up to this (default 32; 0: BDAT waits for the RCPT replies) |
/// | `bdat_window_bytes` | whole number 1 to 1073741824: content octets in flight per connection with a BDAT window (default 1048576) |
/// | `max_connections_per_destination` | whole number >= 1 (default 20) |
/// | `max_connections` | whole number >= 1: connections per loop over all destinations (default 8192) |
/// | `tls_handshake_timeout` | duration above zero (default 30s) |
/// | `max_messages_per_connection` | whole number >= 1 (default 10000) |
/// | `max_recipients_per_transaction` | whole number >= 1 (default 100) |
/// | `idle_timeout` | duration (default 5s) |
/// | `queue_capacity` | messages the ingress queue holds (default 65536) |
/// | `max_queued_recipients` | recipients one loop holds (default 1000000) |
/// | `retry_initial`, `retry_max_interval`, `retry_max_age` | durations |
/// | `retry_multiplier` | number >= 1 (default 2) |
/// | `retry_jitter` | number in [0, 1) (default 0.2) |
/// | `loops` | event-loop threads, 1 to 64 (default 1) |
/// | `record_events` | boolean: keep outcome events for polling or a callback (default true) |
/// | `starttls` | `disabled`, `opportunistic` (default) or `required`; a relay or route written `smtps://host:port` uses implicit TLS |
/// | `tls_verify` | boolean (default: verify under `required` and implicit TLS only) |
/// | `tls_ca_file` | a PEM file of extra trust anchors |
/// | `auth_user` with `auth_password` or `auth_oauth2_token` | log in (RFC 4954) after EHLO, only over TLS whose certificate was verified (credentials turn verification on unless `tls_verify` is false) unless `allow_plaintext_auth` is true |
/// | `source_address` | a local IP address to send from; each call adds one (used in turn) |
/// | `messages_per_second`, `messages_per_minute`, `messages_per_hour`, `connections_per_minute` | numbers above zero, per destination (default unlimited); each message limit allows a burst of a tenth of its budget |
/// | `limit_override` | `host-or-.suffix: max_connections=N, max_messages_per_connection=N, max_recipients_per_transaction=N, messages_per_second=X, messages_per_minute=X, messages_per_hour=X, connections_per_minute=X, tls_policy=none, opportunistic, required, verify or secure; tls_ca_file=PEM; auth_user=U with auth_password_env=VAR or auth_oauth2_token_env=VAR` (the secret is read from that environment variable) (any of them) for the destination hosts that match (an MX host's limits are shared by every domain it serves); `@domain-or-.suffix: ...` for recipient domains, whose recipients then get connections of their own, under these limits and TLS policy (`secure`, which checks the certificate against the recipient domain, only for an exact `@domain`); each call adds one |
/// | `adaptive_initial_concurrency` (number >= 1), `adaptive_pause`, `adaptive_max_pause`, `adaptive_dead_after` (whole number), `adaptive_dead_for`, `adaptive_throttle_memory` | slow start, backoff, dead-destination settings, and how long a throttle caps the window |
/// | `classify_rule` | `category: class=5, code=550, enhanced=7.1, text=phrase, text=phrase` (any of the conditions; categories as `mxp_category`, lower case: `bad_mailbox`, `policy_block`, ...); tried before the built-in table; each call adds one |
/// | `direct_mx` | boolean: deliver to each domain's MX hosts when no relay or route applies |
/// | `mx_nameservers` (comma-separated ip or ip:port), `mx_smtp_port`, `mx_ipv4`, `mx_ipv6`, `mx_max_hosts`, `mx_max_addresses`, `mx_timeout`, `mx_cache_capacity`, `mx_allow_loopback` (deliver to MX hosts on this machine; off: they bounce 5.4.6), `mta_sts` (boolean, default true: apply the recipient domains' MTA-STS policies, RFC 8461), `mta_sts_port` (the HTTPS port of policy hosts, default 443; for tests) | direct MX settings; setting any turns direct MX on |
/// | `trace_file` | a file to write every connection's SMTP dialogue to (created now; AUTH secrets and message content redacted) |
/// | `spool_dir` | a directory to keep custody in: a submission is durable once fsynced there, and what is not final survives restarts and crashes |
/// | `spool_max_bytes` | whole number of octets, at least 1048576 (default 17179869184, 16 GiB): with `spool_dir`, submissions are refused once the spool holds this much |
/// | `spool_min_free_bytes` | whole number of octets (default 268435456, 256 MiB): with `spool_dir`, submissions are refused while the file system has less free space than this |
/// | `spool_segment_bytes` | whole number of octets, 4096 to 1099511627776 (default 268435456, 256 MiB): with `spool_dir`, a new segment file is started past this size, and the segments before the last are compacted (finished mail is given back) |
/// | `dsn_reports` | boolean, default true: with `spool_dir`, send the envelope sender a delivery status notification (RFC 3464) for each recipient that bounces or expires, as its NOTIFY asks (never to the null sender) |
///
/// A duration is a number of seconds ("30", "0.5") or a number with a unit: "250ms", "30s",
/// "5m", "2h", "3d". A boolean is true/false, yes/no, on/off or 1/0.
///
/// Errors: `MXP_ERR_UNKNOWN_KEY` (the message names the key), `MXP_ERR_INVALID_CONFIG` (names
/// key and value; the setting keeps its previous value), `MXP_ERR_INVALID_UTF8`,
/// `MXP_ERR_NULL_POINTER`, `MXP_ERR_BAD_HANDLE`.
///
/// Ownership: `key` and `value` are only read during the call. Any thread may call this.
///
/// # Safety
///
/// `key` and `value` must each be NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn mxp_config_set(
    config: *mut mxp_config,
    key: *const c_char,
    value: *const c_char,
) -> mxp_result {
    boundary("mxp_config_set", || {
        let handle = from_ptr(config);
        if handle == 0 {
            return Err(FfiError::null("config"));
        }
        // SAFETY: the caller passes NULL or NUL-terminated strings.
        let key = unsafe { c_str(key, "key") }?;
        if value.is_null() {
            return Err(FfiError::null("value"));
        }
        // SAFETY: checked non-NULL; the caller passes a NUL-terminated string.
        let value = unsafe { CStr::from_ptr(value) }.to_str().map_err(|_| {
            FfiError::new(
                mxp_result::MXP_ERR_INVALID_UTF8,
                format!("config {}: the value is not valid UTF-8", excerpt(key)),
            )
        })?;
        CONFIGS.with(handle, |settings| {
            settings
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set(key, value)
        })?
    })
}

/// Frees a configuration. NULL is a no-op (`MXP_OK`); a handle freed already gives
/// `MXP_ERR_BAD_HANDLE`. Dispatchers made from it are not affected.
///
/// # Safety
///
/// None beyond passing a value that `mxp_config_new` returned, or NULL; stale values are caught.
#[no_mangle]
pub unsafe extern "C" fn mxp_config_free(config: *mut mxp_config) -> mxp_result {
    boundary("mxp_config_free", || {
        let handle = from_ptr(config);
        if handle != 0 {
            drop(CONFIGS.remove(handle)?);
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &mut Settings, key: &str, value: &str) -> Result<(), String> {
        s.set(key, value).map_err(|e| e.message.into_owned())
    }

    #[test]
    fn every_key_is_settable() {
        let mut s = Settings::default();
        let examples = [
            ("relay", "smtps://127.0.0.1:465"),
            ("route", "example.org=127.0.0.1:2526"),
            ("ehlo_name", "mx.example"),
            ("connect_timeout", "250ms"),
            ("greeting_timeout", "2s"),
            ("command_timeout", "1.5"),
            ("data_end_timeout", "3m"),
            ("chunking", "off"),
            ("bdat_window", "16"),
            ("bdat_window_bytes", "65536"),
            ("max_connections_per_destination", "4"),
            ("max_connections", "512"),
            ("tls_handshake_timeout", "10s"),
            ("max_messages_per_connection", "100"),
            ("max_recipients_per_transaction", "50"),
            ("idle_timeout", "0"),
            ("queue_capacity", "1024"),
            ("max_queued_recipients", "5000"),
            ("retry_initial", "1s"),
            ("retry_max_interval", "1h"),
            ("retry_multiplier", "1.5"),
            ("retry_jitter", "0"),
            ("retry_max_age", "2d"),
            ("loops", "2"),
            ("record_events", "false"),
            ("starttls", "required"),
            ("tls_verify", "no"),
            ("tls_ca_file", "/etc/ssl/ca.pem"),
            ("spool_dir", "/var/spool/mxpipe"),
            ("spool_max_bytes", "1073741824"),
            ("spool_min_free_bytes", "0"),
            ("spool_segment_bytes", "65536"),
            ("dsn_reports", "off"),
            ("auth_user", "bulk"),
            ("auth_password", "s3cret"),
            ("auth_oauth2_token", "token"),
            ("allow_plaintext_auth", "yes"),
            ("source_address", "127.0.0.2"),
            ("messages_per_second", "20"),
            ("messages_per_minute", "600"),
            ("messages_per_hour", "10000"),
            ("connections_per_minute", "60"),
            (
                "limit_override",
                ".example.com: max_connections=2, messages_per_second=0.5",
            ),
            ("adaptive_initial_concurrency", "2"),
            ("adaptive_pause", "2s"),
            ("adaptive_max_pause", "10m"),
            ("adaptive_dead_after", "5"),
            ("adaptive_dead_for", "1m"),
            ("adaptive_throttle_memory", "10m"),
            (
                "classify_rule",
                "policy_block: class=5, enhanced=7.1, text=Listed At",
            ),
            ("direct_mx", "true"),
            ("mx_nameservers", "127.0.0.1:5353, ::1"),
            ("mx_smtp_port", "2525"),
            ("mx_ipv4", "true"),
            ("mx_ipv6", "false"),
            ("mx_max_hosts", "3"),
            ("mx_max_addresses", "6"),
            ("mx_timeout", "2s"),
            ("mx_cache_capacity", "0"),
            ("mx_allow_loopback", "true"),
            ("mta_sts", "false"),
            ("mta_sts_port", "8443"),
            ("trace_file", "/dev/null"),
        ];
        for (key, value) in examples {
            set(&mut s, key, value).unwrap();
        }
        let mut covered: Vec<&str> = examples.iter().map(|(k, _)| *k).collect();
        covered.sort();
        let mut keys = KEYS.to_vec();
        keys.sort();
        assert_eq!(covered, keys, "every key has an example here");
        let c = &s.config;
        assert_eq!(c.session.timeouts.connect, Duration::from_millis(250));
        assert_eq!(c.session.timeouts.command, Duration::from_millis(1500));
        assert_eq!(c.session.timeouts.data_end, Duration::from_secs(180));
        assert!(!c.session.use_chunking);
        assert_eq!(
            (c.session.bdat_window, c.session.bdat_window_bytes),
            (16, 65536)
        );
        assert_eq!(c.max_recipients_per_transaction, 50);
        assert_eq!(c.retry.max_age, Duration::from_secs(2 * 86400));
        assert_eq!(c.loops, 2);
        assert!(!c.record_events);
        assert!(!c.dsn_reports);
        assert_eq!(c.session.starttls, StartTls::Required);
        assert_eq!(c.limit_overrides[0].pattern, ".example.com");
        assert_eq!(c.limit_overrides[0].max_connections, Some(2));
        assert_eq!(c.limit_overrides[0].messages_per_second, Some(0.5));
        let mx = c.mx.as_ref().unwrap();
        assert_eq!(mx.nameservers.as_ref().unwrap().len(), 2);
        assert_eq!((mx.smtp_port, mx.ipv6, mx.cache_capacity), (2525, false, 0));
        assert_eq!((mx.mta_sts, mx.mta_sts_port), (false, 8443));
        assert_eq!(s.classify_rules[0].enhanced, Some((7, Some(1))));
        assert_eq!(s.classify_rules[0].text, ["listed at"]);
        assert_eq!(s.routes, [("example.org".into(), "127.0.0.1:2526".into())]);
        assert!(s.builder().is_ok());
    }

    #[test]
    fn credentials_need_a_user_and_one_secret() {
        let mut s = Settings::default();
        set(&mut s, "auth_user", "bulk").unwrap();
        let e = s.builder().unwrap_err();
        assert_eq!(
            e.message,
            "config auth_user: set auth_password or auth_oauth2_token as well"
        );
        let e = set(&mut s, "auth_password", "a\r\nb").unwrap_err();
        assert_eq!(
            e,
            "config auth_password: \"(secret)\" is empty or contains CR or LF"
        );
    }

    #[test]
    fn spool_sizes_need_a_spool_and_apply_in_any_order() {
        let mut s = Settings::default();
        set(&mut s, "relay", "127.0.0.1:25").unwrap();
        assert_eq!(
            set(&mut s, "spool_segment_bytes", "100").unwrap_err(),
            "config spool_segment_bytes: \"100\" is not a whole number from 4096 to 1099511627776"
        );
        set(&mut s, "spool_segment_bytes", "65536").unwrap();
        assert_eq!(
            s.builder().err().map(|e| e.message.into_owned()),
            Some("config spool_segment_bytes: set spool_dir as well".to_string())
        );
        set(&mut s, "spool_max_bytes", "2097152").unwrap();
        set(&mut s, "spool_dir", "/var/spool/mxpipe").unwrap();
        let mut b = s.builder().unwrap();
        let spool = b.config_mut().spool.clone().unwrap();
        assert_eq!(
            (spool.segment_bytes, spool.max_bytes, spool.min_free_bytes),
            (65536, 2097152, 256 << 20)
        );
        // `--spool DIR` names another directory: the sizes stay.
        let mut b = b.spool("/tmp/elsewhere");
        let spool = b.config_mut().spool.clone().unwrap();
        assert_eq!(
            (spool.dir, spool.segment_bytes),
            ("/tmp/elsewhere".into(), 65536)
        );
    }

    #[test]
    fn errors_name_key_and_value() {
        let mut s = Settings::default();
        assert_eq!(
            set(&mut s, "relai", "x").unwrap_err(),
            format!(
                "unknown configuration key \"relai\"; the keys are: {}",
                KEYS.join(", ")
            )
        );
        assert_eq!(
            set(&mut s, "max_connections_per_destination", "0").unwrap_err(),
            "config max_connections_per_destination: \"0\" is not a whole number from 1 to 1048576"
        );
        assert_eq!(
            set(&mut s, "connect_timeout", "soon").unwrap_err(),
            "config connect_timeout: \"soon\" is not a duration above zero of at most 100 years \
             (seconds, or a number followed by ms, s, m, h or d)"
        );
        assert!(set(&mut s, "connect_timeout", "0s").is_err());
        assert!(set(&mut s, "connect_timeout", "-1").is_err());
        assert_eq!(
            set(&mut s, "relay", "localhost").unwrap_err(),
            "config relay: \"localhost\" is not host:port (a host name or address and a port \
             from 1 to 65535, after smtps:// for implicit TLS)"
        );
        assert!(set(&mut s, "relay", "host:0").is_err());
        assert!(set(&mut s, "route", "example.org").is_err());
        assert!(set(&mut s, "chunking", "maybe").is_err());
        assert_eq!(
            set(&mut s, "bdat_window", "1025").unwrap_err(),
            "config bdat_window: \"1025\" is not a whole number from 0 to 1024"
        );
        assert_eq!(
            set(&mut s, "bdat_window_bytes", "0").unwrap_err(),
            "config bdat_window_bytes: \"0\" is not a whole number from 1 to 1073741824"
        );
        assert_eq!(s.config.session.bdat_window, 32);
        assert!(set(&mut s, "retry_jitter", "1").is_err());
        assert!(set(&mut s, "ehlo_name", "bad name").is_err());
        assert!(set(&mut s, "loops", "65").is_err());
        // A refused value leaves the setting as it was.
        assert_eq!(s.config.session.timeouts.connect, Duration::from_secs(30));
    }

    #[test]
    fn toml_uses_the_same_keys() {
        let mut s = Settings::default();
        s.apply_toml(
            "relay = \"127.0.0.1:2525\"\nchunking = false\nconnect_timeout = 5\n\
             retry_multiplier = 3.0\nroute = [\"a.example=127.0.0.1:1\"]\n\
             [routes]\n\"b.example\" = \"127.0.0.1:2\"\n",
        )
        .unwrap();
        assert_eq!(s.relay.as_deref(), Some("127.0.0.1:2525"));
        assert!(!s.config.session.use_chunking);
        assert_eq!(s.config.session.timeouts.connect, Duration::from_secs(5));
        assert_eq!(s.config.retry.multiplier, 3.0);
        assert_eq!(s.routes.len(), 2);
        let e = Settings::default().apply_toml("nope = 1").unwrap_err();
        assert_eq!(e.code, mxp_result::MXP_ERR_UNKNOWN_KEY);
        assert!(e.message.starts_with("unknown configuration key \"nope\""));
        let mut s = Settings::default();
        s.apply_toml("limit_override = [\"@a.example: max_connections=1\", \".b.example: messages_per_hour=60\"]")
            .unwrap();
        assert_eq!(s.config.limit_overrides.len(), 2);
        assert!(s.config.limit_overrides[0].recipient_domain);
        assert_eq!(s.config.limit_overrides[1].messages_per_hour, Some(60.0));
        let mut s = Settings::default();
        s.apply_toml("mx_nameservers = [\"127.0.0.1:5353\", \"::1\"]")
            .unwrap();
        let servers = s.config.mx.as_ref().and_then(|m| m.nameservers.clone());
        assert_eq!(
            servers,
            Some(vec![
                "127.0.0.1:5353".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ])
        );
        let e = Settings::default().apply_toml("relay = [1]").unwrap_err();
        assert_eq!(
            e.message,
            "config relay: expected a string, number or boolean, found a array"
        );
        let e = Settings::default().apply_toml("relay = ").unwrap_err();
        assert_eq!(e.code, mxp_result::MXP_ERR_INVALID_CONFIG);
        assert!(
            e.message.starts_with("config: not valid TOML"),
            "{}",
            e.message
        );
    }

    /// Issue 12, defect 3: a TOML error names the line, never shows its text, which may hold
    /// a secret (syntax errors, duplicate keys, values of the wrong type).
    #[test]
    fn toml_errors_never_show_the_configuration_text() {
        let documents = [
            "relay = \"127.0.0.1:25\"\nauth_password = \"Secr3tPw\nauth_user = \"u\"\n",
            "auth_password = \"Secr3tPw\"\nauth_password = \"Secr3tPw2\"\n",
            "auth_oauth2_token = Secr3tPw\n",
            "auth_password = [\"Secr3tPw\"]\n",
            "auth_password = { inner = \"Secr3tPw\" }\n",
        ];
        for doc in documents {
            let e = Settings::default().apply_toml(doc).unwrap_err();
            assert!(!e.message.contains("Secr3t"), "{doc:?} gave {}", e.message);
            assert!(e.message.starts_with("config"), "{}", e.message);
        }
        let e = Settings::default().apply_toml(documents[1]).unwrap_err();
        assert!(
            e.message.contains("line 2") && e.message.contains("duplicate key"),
            "{}",
            e.message
        );
    }

    #[test]
    fn limit_overrides_carry_a_tls_policy() {
        let o = parse_limit_override(
            "limit_override",
            "@bank.example: tls_policy=secure, tls_ca_file=/etc/bank-ca.pem, max_connections=2",
        )
        .unwrap();
        assert_eq!(o.tls_policy, Some(TlsPolicy::Secure));
        assert_eq!(
            o.tls_ca_file.as_deref(),
            Some(std::path::Path::new("/etc/bank-ca.pem"))
        );
        assert_eq!(o.max_connections, Some(2));
        let e =
            parse_limit_override("limit_override", ".example.net: tls_policy=strict").unwrap_err();
        assert_eq!(
            e.message,
            "config limit_override: \".example.net: tls_policy=strict\" has a tls_policy that \
             is not none, opportunistic, required, verify or secure"
        );

        std::env::set_var("MXPIPE_TEST_ROUTE_SECRET", "Secr3tRoute");
        let o = parse_limit_override(
            "limit_override",
            "@bank.example: auth_user=news, auth_password_env=MXPIPE_TEST_ROUTE_SECRET",
        )
        .unwrap();
        assert_eq!(
            o.credentials,
            Credentials::password("news", "Secr3tRoute"),
            "the secret is read from the variable"
        );
        let e = parse_limit_override(
            "limit_override",
            "@bank.example: auth_user=news, auth_password_env=MXPIPE_TEST_UNSET_VARIABLE",
        )
        .unwrap_err();
        assert!(e.message.contains("which is not set"), "{}", e.message);
        let e =
            parse_limit_override("limit_override", "@bank.example: auth_user=news").unwrap_err();
        assert!(
            e.message.contains("needs auth_user and one of"),
            "{}",
            e.message
        );
    }
}
