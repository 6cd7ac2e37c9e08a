//! The key references, generated from the code so that they cannot drift: `mxpipe config keys`
//! (the engine file: the keys of the C ABI's `mxp_config_set`, as the engine itself lists them)
//! and `mxpipe campaign keys` (the campaign file, the report's columns), each with the exit
//! codes and the one order in which settings override each other. Unit tests check that every
//! key the code accepts has a line here and that no line names a key that is gone.
//!
//! This module only prints.

use super::CliResult;
use mxpipe::campaign::{config::KEYS as CAMPAIGN_KEYS, REPORT_COLUMNS};
use std::process::ExitCode;

/// What each engine key takes. The keys themselves come from the engine (see [`engine_keys`]).
const ENGINE_KEYS: &[(&str, &str)] = &[
    ("relay", "host:port of the smarthost that takes all mail without a route (smtps://host:port: implicit TLS)"),
    ("route", "domain=host:port; a list adds several (or a [routes] table: domain = \"host:port\")"),
    ("ehlo_name", "the name sent in EHLO (default localhost)"),
    ("connect_timeout", "duration above zero"),
    ("greeting_timeout", "duration above zero"),
    ("command_timeout", "duration above zero"),
    ("data_end_timeout", "duration above zero"),
    ("chunking", "boolean: use BDAT when offered (default true)"),
    ("bdat_window", "whole number 0 to 1024: with CHUNKING and PIPELINING, at most this many whole transactions in flight per connection; the window adapts from 4 up to this (default 32; 0: BDAT waits for the RCPT replies)"),
    ("bdat_window_bytes", "whole number 1 to 1073741824: content octets in flight per connection with a BDAT window (default 1048576)"),
    ("max_connections_per_destination", "whole number >= 1 (default 20)"),
    ("max_connections", "whole number >= 1: connections per loop over all destinations (default 8192)"),
    ("tls_handshake_timeout", "duration above zero (default 30s)"),
    ("max_messages_per_connection", "whole number >= 1 (default 10000)"),
    ("max_recipients_per_transaction", "whole number >= 1 (default 100)"),
    ("idle_timeout", "duration (default 5s)"),
    ("queue_capacity", "messages the ingress queue holds (default 65536)"),
    ("max_queued_recipients", "recipients one loop holds (default 1000000)"),
    ("retry_initial", "duration: the first retry"),
    ("retry_max_interval", "duration: the longest wait between retries"),
    ("retry_multiplier", "number >= 1 (default 2)"),
    ("retry_jitter", "number in [0, 1) (default 0.2)"),
    ("retry_max_age", "duration: a recipient still failing temporarily then expires"),
    ("loops", "event-loop threads, 1 to 64 (default 1); limits hold per loop"),
    ("record_events", "boolean: keep outcome events (default true; the CLI always does)"),
    ("starttls", "disabled, opportunistic (default) or required"),
    ("tls_verify", "boolean (default: verify under required and implicit TLS only)"),
    ("tls_ca_file", "a PEM file of extra trust anchors"),
    ("auth_user", "log in (RFC 4954) with auth_password or auth_oauth2_token"),
    ("auth_password", "the password for auth_user (AUTH PLAIN or LOGIN)"),
    ("auth_oauth2_token", "an OAuth 2.0 bearer token for auth_user (AUTH XOAUTH2)"),
    ("allow_plaintext_auth", "boolean: allow AUTH without TLS (default false)"),
    ("source_address", "a local IP to send from; a list adds several (used in turn)"),
    ("spool_dir", "a directory to keep custody in: submissions are acknowledged once fsynced, and what is not final survives restarts (see the README, Custody)"),
    ("spool_max_bytes", "whole number of octets, at least 1048576 (default 16 GiB): with spool_dir, submissions are refused once the spool holds this much"),
    ("spool_min_free_bytes", "whole number of octets (default 256 MiB): with spool_dir, submissions are refused while the file system has less free space"),
    ("spool_segment_bytes", "whole number of octets, 4096 to 1099511627776 (default 256 MiB): with spool_dir, a new segment is started past this size and the ones before the last are compacted"),
    ("dsn_reports", "boolean, default true: with spool_dir, a delivery status notification (RFC 3464) to the sender for each recipient that bounces or expires, as its NOTIFY asks"),
    ("messages_per_second", "number above zero, per destination (a burst of a tenth of the budget)"),
    ("messages_per_minute", "number above zero, per destination"),
    ("messages_per_hour", "number above zero, per destination"),
    ("connections_per_minute", "number above zero, per destination"),
    ("limit_override", "\"host-or-.suffix: max_connections=N, messages_per_minute=X, tls_policy=verify, ...\" or \"@domain: ...\" (limits, tls_policy, tls_ca_file, auth_user with auth_password_env or auth_oauth2_token_env); a list adds several"),
    ("adaptive_initial_concurrency", "number >= 1: slow start"),
    ("adaptive_pause", "duration: the first pause after a refusal"),
    ("adaptive_max_pause", "duration: the longest pause"),
    ("adaptive_dead_after", "whole number: failures in a row before a destination is dead"),
    ("adaptive_dead_for", "duration: how long a dead destination rests"),
    ("adaptive_throttle_memory", "duration: how long a 421 caps the connections"),
    ("classify_rule", "\"category: class=5, code=550, enhanced=7.1, text=phrase\"; a list adds several"),
    ("direct_mx", "boolean: deliver to each domain's MX hosts when no relay or route applies"),
    ("mx_nameservers", "DNS servers, ip or ip:port, a list or comma-separated (default: the system's)"),
    ("mx_smtp_port", "the SMTP port of MX hosts (default 25)"),
    ("mx_ipv4", "boolean: use A records (default true)"),
    ("mx_ipv6", "boolean: use AAAA records (default true)"),
    ("mx_max_hosts", "MX hosts kept per domain (default 5)"),
    ("mx_max_addresses", "addresses kept per domain (default 10)"),
    ("mx_timeout", "duration: one DNS query (default 5s)"),
    ("mx_cache_capacity", "domains whose answers are remembered (default 100000; 0: none)"),
    ("mx_allow_loopback", "boolean: deliver to MX hosts on this machine (loopback, 0.0.0.0, its own addresses); off: such mail bounces 5.4.6 as a loop (default false)"),
    ("mta_sts", "boolean: apply the recipient domains' MTA-STS policies (RFC 8461): under enforce, only the MX hosts the policy names, over verified TLS (default true)"),
    ("mta_sts_port", "the HTTPS port of MTA-STS policy hosts (default 443; another only for tests)"),
    ("trace_file", "write every connection's SMTP dialogue here (secrets and content redacted)"),
];

/// The order in which settings override each other, for every command that delivers.
pub(crate) const PRECEDENCE: &str = "Precedence (highest first): the command line; the campaign \
file ([delivery], [limits]); the engine file (--config, which replaces a campaign's \
limits.engine); the defaults.";

/// The exit codes of `mxpipe send` (and `check`, `bench`, `demo`).
const EXIT_CODES: &[(u8, &str)] = &[
    (0, "every recipient was delivered (check: every address deliverable or catch-all)"),
    (1, "the run ended, and some recipients were not delivered (bounced, expired, invalid, failed, not final)"),
    (2, "bad input or setup: nothing was sent, or the run could not start (the error names the field)"),
    (super::signal::INTERRUPTED, "stopped by SIGINT or SIGTERM: report, journal and summary written (a second signal: at once)"),
];

/// The engine's keys, as the engine lists them in its unknown-key error.
fn engine_keys() -> Vec<String> {
    let error = match mxpipe::ffi::builder_from_toml("zz_not_a_key = 1") {
        Err(e) => e,
        Ok(_) => return Vec::new(),
    };
    let list = error
        .split_once("the keys are: ")
        .map_or("", |(_, rest)| rest);
    let list = list.split(", and a [routes] table").next().unwrap_or(list);
    list.split(", ").map(str::to_string).collect()
}

fn print_table(title: &str, rows: impl IntoIterator<Item = (String, String)>) {
    println!("{title}");
    for (key, what) in rows {
        println!("  {key:<34} {what}");
    }
    println!();
}

fn print_exit_codes() {
    print_table(
        "Exit codes:",
        EXIT_CODES
            .iter()
            .map(|(code, what)| (code.to_string(), what.to_string())),
    );
    println!("{PRECEDENCE}");
}

/// `mxpipe config keys`.
pub(crate) fn config_keys() -> CliResult {
    let rows = engine_keys().into_iter().map(|key| {
        let what = ENGINE_KEYS
            .iter()
            .find(|(k, _)| *k == key)
            .map_or("", |(_, w)| w);
        (key, what.to_string())
    });
    print_table(
        "Engine file keys (TOML, for --config and limits.engine; the C ABI's mxp_config_set). A \
         duration is seconds (\"30\", \"0.5\") or \"250ms\", \"30s\", \"5m\", \"2h\", \"3d\"; a \
         boolean is true/false, yes/no, on/off or 1/0:",
        rows,
    );
    print_exit_codes();
    Ok(ExitCode::SUCCESS)
}

/// `mxpipe campaign keys`.
pub(crate) fn campaign_keys() -> CliResult {
    print_table(
        "Campaign file keys (TOML; relative paths are relative to the campaign file; templates \
         take {{column}} fields of the recipients file):",
        CAMPAIGN_KEYS
            .iter()
            .map(|(k, w)| (k.to_string(), w.to_string())),
    );
    print_table(
        "Report columns (--report: CSV for a .csv name, JSON Lines otherwise; the journal's lines \
         have the same fields):",
        REPORT_COLUMNS
            .iter()
            .map(|(k, w)| (k.to_string(), w.to_string())),
    );
    print_exit_codes();
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_engine_key_is_described_and_no_description_is_stale() {
        let mut from_engine = engine_keys();
        assert!(from_engine.len() > 10, "{from_engine:?}");
        from_engine.sort();
        let mut described: Vec<String> = ENGINE_KEYS.iter().map(|(k, _)| k.to_string()).collect();
        described.sort();
        assert_eq!(described, from_engine);
    }
}
