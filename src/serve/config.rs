//! The `mxpipe serve` configuration file: listeners, limits, the spool and the delivery
//! settings, read from TOML and checked before anything listens.
//!
//! Delivery reuses the engine file of `mxpipe send --config` (the keys of `mxpipe config
//! keys`) as the `[delivery]` table, so there is one way to say how mail leaves. Every error
//! names the key it is about. This module must not open sockets or files other than the ones
//! it reads (certificates, password files).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::engine::DispatcherBuilder;

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Smtp,
    Lmtp,
}

/// When a listener answers the end of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// 250 once the message is durable in the spool: mxpipe owns it from then on.
    Custody,
    /// Each recipient's reply waits for its delivery outcome (or the deadline): the upstream
    /// MTA stays the queue of record.
    PassThrough,
}

/// One `[[listener]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub protocol: Protocol,
    pub address: SocketAddr,
    pub mode: Mode,
    /// PEM certificate chain and key: STARTTLS is offered (RFC 3207).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// `user:argon2-hash` lines: AUTH PLAIN and LOGIN are offered over TLS (RFC 4954).
    pub auth_password_file: Option<PathBuf>,
    /// Clients in these networks may inject without AUTH.
    #[serde(default)]
    pub allow_networks: Vec<IpNet>,
    /// Pass-through: how long a reply waits for a delivery outcome before it is 451.
    #[serde(default = "default_deadline_seconds")]
    pub pass_through_deadline_seconds: u64,
}

fn default_deadline_seconds() -> u64 {
    60
}

/// The `[limits]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Open connections per listener; more get a 421 greeting.
    pub max_connections: usize,
    /// Open connections per client address and listener; more get a 421 greeting.
    pub max_connections_per_client: usize,
    /// Messages per client address and minute; more get 450 4.7.1 at RCPT (0: no limit).
    pub messages_per_client_per_minute: u32,
    /// The advertised SIZE; larger messages get 552 5.3.4.
    pub max_message_size: u64,
    /// Recipients per transaction; more get 452 4.5.3.
    pub max_recipients: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1000,
            max_connections_per_client: 100,
            messages_per_client_per_minute: 0,
            max_message_size: 50 * 1024 * 1024,
            max_recipients: 1000,
        }
    }
}

/// `[inbound]`: the bounce, complaint and unsubscribe receiver (README "Bounces, complaints
/// and unsubscribes") beside the injection listeners.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundSection {
    /// Where bounces, feedback reports and unsubscribe mail arrive over SMTP.
    pub smtp: SocketAddr,
    /// Where one-click unsubscribe POSTs (RFC 8058) and the inbound `/metrics` are served.
    pub http: Option<SocketAddr>,
    /// The inbound configuration file (suppression, quarantine, campaigns).
    pub config: PathBuf,
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    hostname: Option<String>,
    spool: Option<PathBuf>,
    http: Option<String>,
    inbound: Option<InboundSection>,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    listener: Vec<ListenerConfig>,
    #[serde(default)]
    delivery: toml::Table,
}

/// A checked `mxpipe serve` configuration.
#[derive(Debug)]
pub struct ServeConfig {
    /// The name in greetings and `Received:` headers.
    pub hostname: String,
    pub spool: Option<PathBuf>,
    /// Where HTTP injection (`POST /v1/messages`) and `GET /metrics` listen, on the custody
    /// engine (needs `spool`).
    pub http: Option<std::net::SocketAddr>,
    pub inbound: Option<InboundSection>,
    pub limits: Limits,
    pub listeners: Vec<ListenerConfig>,
    /// The `[delivery]` table as an engine file.
    pub delivery: String,
}

impl ServeConfig {
    /// Parses and checks a configuration; the error names the key.
    pub fn parse(text: &str) -> Result<ServeConfig, String> {
        let file: File = toml::from_str(text).map_err(|e| {
            let at = e.span().map_or(String::new(), |span| {
                let line = text.get(..span.start).unwrap_or(text).matches('\n').count() + 1;
                format!(" (line {line})")
            });
            format!("serve config{at}: {}", e.message().trim_end())
        })?;
        if file.listener.is_empty() {
            return Err("serve config: no [[listener]]; at least one is needed".to_owned());
        }
        for (i, listener) in file.listener.iter().enumerate() {
            let name = format!("listener[{i}] ({})", listener.address);
            if listener.mode == Mode::Custody && file.spool.is_none() {
                return Err(format!(
                    "serve config: {name}: mode = \"custody\" needs the top-level key spool"
                ));
            }
            if listener.tls_cert.is_some() != listener.tls_key.is_some() {
                return Err(format!(
                    "serve config: {name}: tls_cert and tls_key go together"
                ));
            }
            if listener.auth_password_file.is_some() && listener.tls_cert.is_none() {
                return Err(format!(
                    "serve config: {name}: auth_password_file needs tls_cert and tls_key \
                     (AUTH is offered over TLS only)"
                ));
            }
            if listener.allow_networks.is_empty() && listener.auth_password_file.is_none() {
                return Err(format!(
                    "serve config: {name}: neither allow_networks nor auth_password_file: \
                     nobody could inject"
                ));
            }
            if listener.pass_through_deadline_seconds == 0 {
                return Err(format!(
                    "serve config: {name}: pass_through_deadline_seconds must be above 0"
                ));
            }
        }
        let limits = &file.limits;
        for (key, value) in [
            ("limits.max_connections", limits.max_connections as u64),
            (
                "limits.max_connections_per_client",
                limits.max_connections_per_client as u64,
            ),
            ("limits.max_message_size", limits.max_message_size),
            ("limits.max_recipients", limits.max_recipients as u64),
        ] {
            if value == 0 {
                return Err(format!("serve config: {key} must be above 0"));
            }
        }
        let http =
            match &file.http {
                Some(_) if file.spool.is_none() => return Err(
                    "serve config: http needs the top-level key spool (it answers after custody)"
                        .to_owned(),
                ),
                Some(addr) => Some(addr.parse().map_err(|e| {
                    format!("serve config: http: {addr:?} is not an address:port ({e})")
                })?),
                None => None,
            };
        let delivery = toml::to_string(&file.delivery)
            .map_err(|e| format!("serve config: [delivery]: {e}"))?;
        // Checked now, so that a bad delivery key stops the start, not the first message.
        crate::ffi::builder_from_toml(&delivery)
            .map_err(|e| format!("serve config: [delivery]: {e}"))?;
        Ok(ServeConfig {
            hostname: file.hostname.unwrap_or_else(|| "localhost".to_owned()),
            spool: file.spool,
            http,
            inbound: file.inbound,
            limits: file.limits,
            listeners: file.listener,
            delivery,
        })
    }

    /// A dispatcher builder with the `[delivery]` settings.
    pub fn delivery_builder(&self) -> Result<DispatcherBuilder, String> {
        crate::ffi::builder_from_toml(&self.delivery)
            .map_err(|e| format!("serve config: [delivery]: {e}"))
    }
}

impl ListenerConfig {
    pub fn deadline(&self) -> Duration {
        Duration::from_secs(self.pass_through_deadline_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTENER: &str = "[[listener]]\nprotocol = \"smtp\"\naddress = \"127.0.0.1:2526\"\n";

    fn error(text: &str) -> String {
        ServeConfig::parse(text).unwrap_err()
    }

    #[test]
    fn a_good_file_parses_with_its_defaults() {
        let config = ServeConfig::parse(&format!(
            "spool = \"/tmp/s\"\n{LISTENER}mode = \"custody\"\nallow_networks = [\"127.0.0.0/8\"]\n\
             [delivery]\nrelay = \"127.0.0.1:25\"\n"
        ))
        .unwrap();
        assert_eq!(config.hostname, "localhost");
        assert_eq!(config.limits.max_recipients, 1000);
        assert_eq!(config.listeners[0].mode, Mode::Custody);
        assert_eq!(config.listeners[0].deadline(), Duration::from_secs(60));
    }

    #[test]
    fn errors_name_the_key() {
        assert!(error("").contains("no [[listener]]"));
        let e = error(&format!(
            "{LISTENER}mode = \"custody\"\nallow_networks = [\"127.0.0.0/8\"]\n"
        ));
        assert!(e.contains("needs the top-level key spool"), "{e}");
        let e = error(&format!("{LISTENER}mode = \"pass-through\"\n"));
        assert!(
            e.contains("neither allow_networks nor auth_password_file"),
            "{e}"
        );
        let e = error(&format!(
            "{LISTENER}mode = \"pass-through\"\nallow_networks = [\"127.0.0.0/33\"]\n"
        ));
        assert!(e.contains("line 5") && e.contains("invalid"), "{e}");
        let e = error(&format!(
            "{LISTENER}mode = \"relay\"\nallow_networks = []\n"
        ));
        assert!(e.contains("unknown variant `relay`"), "{e}");
        let e = error(&format!(
            "{LISTENER}mode = \"pass-through\"\nallow_networks = [\"10.0.0.0/8\"]\nmax_conns = 1\n"
        ));
        assert!(e.contains("unknown field `max_conns`"), "{e}");
        let e = error(&format!(
            "{LISTENER}mode = \"pass-through\"\nallow_networks = [\"10.0.0.0/8\"]\n\
             [limits]\nmax_recipients = 0\n"
        ));
        assert!(e.contains("limits.max_recipients must be above 0"), "{e}");
        let e = error(&format!(
            "{LISTENER}mode = \"pass-through\"\nallow_networks = [\"10.0.0.0/8\"]\n\
             [delivery]\nrelays = \"x\"\n"
        ));
        assert!(e.contains("[delivery]") && e.contains("\"relays\""), "{e}");
        let e = error(&format!(
            "{LISTENER}mode = \"pass-through\"\nauth_password_file = \"/p\"\n"
        ));
        assert!(e.contains("auth_password_file needs tls_cert"), "{e}");
    }
}
