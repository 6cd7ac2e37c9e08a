//! Delivery options shared by the commands that deliver (`send`, `bench`): TLS, AUTH, routing,
//! shaping, metrics, the engine file. The one place where the command line becomes a
//! [`DispatcherBuilder`]; a new shared option (such as a spool directory) goes here.
//!
//! One order of precedence, for every setting: the command line over the campaign file over the
//! engine file (`--config`, which replaces a campaign's `limits.engine`) over the defaults.
//!
//! This module must not send anything; it only builds.

use clap::Args;
use mxpipe::engine::{Dispatcher, DispatcherBuilder};
use mxpipe::route::mx::MxConfig;
use mxpipe::smtp::{Credentials, StartTls};
use std::io::Write;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How deliveries are made: TLS, AUTH, routing, shaping, metrics. Shared by `send` (message
/// mode) and `bench`.
#[derive(Args, Clone, Debug)]
pub(crate) struct DeliveryArgs {
    /// STARTTLS policy: none, opportunistic (use it when offered; the default) or required
    /// (never send in plaintext). Write the relay as smtps://host:port for implicit TLS.
    #[arg(long, value_parser = ["none", "opportunistic", "required"])]
    pub(crate) starttls: Option<String>,
    /// Verify certificates (default: under required TLS and implicit TLS only).
    #[arg(long, value_name = "BOOL")]
    pub(crate) tls_verify: Option<bool>,
    /// Trust the CA certificates in this PEM file as well as the Mozilla roots.
    #[arg(long, value_name = "PEM")]
    pub(crate) tls_ca_file: Option<PathBuf>,
    /// Log in (RFC 4954) as this user; the secret comes from --auth-password-env or
    /// --auth-token-env, never from the command line, where other users could read it.
    #[arg(long)]
    pub(crate) auth_user: Option<String>,
    /// The environment variable that holds the password (AUTH PLAIN or LOGIN).
    #[arg(long, value_name = "VAR")]
    pub(crate) auth_password_env: Option<String>,
    /// The environment variable that holds an OAuth 2.0 bearer token (AUTH XOAUTH2).
    #[arg(long, value_name = "VAR")]
    pub(crate) auth_token_env: Option<String>,
    /// Allow AUTH without TLS, or over TLS whose certificate was not verified (off by default).
    #[arg(long)]
    pub(crate) allow_plaintext_auth: bool,
    /// Deliver straight to each recipient domain's MX hosts instead of a relay.
    #[arg(long)]
    pub(crate) direct_mx: bool,
    /// With --direct-mx: ask these DNS servers, HOST[:PORT] (port 53 by default; default:
    /// the system's).
    #[arg(long, value_name = "ADDR", value_parser = nameserver_addr)]
    pub(crate) nameserver: Vec<SocketAddr>,
    /// With --direct-mx: the SMTP port of MX hosts (default 25).
    #[arg(long)]
    pub(crate) mx_port: Option<u16>,
    /// With --direct-mx: deliver to MX hosts on this machine (loopback, 0.0.0.0, its own
    /// addresses), as local tests need; without it such mail bounces as a loop (5.4.6).
    #[arg(long)]
    pub(crate) mx_allow_loopback: bool,
    /// Engine settings from a TOML file with the keys of the C ABI's `mxp_config_set` (limits
    /// and overrides by host or @recipient-domain, adaptive backoff, retries, DNS, ...); the
    /// other options here apply on top.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// At most this many messages per second to each destination.
    #[arg(long)]
    pub(crate) messages_per_second: Option<f64>,
    /// At most this many messages per minute to each destination.
    #[arg(long)]
    pub(crate) messages_per_minute: Option<f64>,
    /// At most this many messages per hour to each destination.
    #[arg(long)]
    pub(crate) messages_per_hour: Option<f64>,
    /// Send from this local address (repeat for several, used in turn).
    #[arg(long, value_name = "IP")]
    pub(crate) source_address: Vec<IpAddr>,
    /// Serve Prometheus metrics over HTTP on this address while running.
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics: Option<SocketAddr>,
    /// Write every connection's SMTP dialogue to this file: client and server lines with
    /// timestamps and connection numbers; AUTH secrets and message content are redacted.
    #[arg(long, value_name = "FILE")]
    pub(crate) trace: Option<PathBuf>,
    /// Keep custody in this spool directory: submissions are acknowledged once fsynced, and
    /// what is not final when the process ends (deferred, or cut short by a crash) is sent by
    /// the next process that opens it (`send` with an empty --to-file sends only that).
    #[arg(long, value_name = "DIR")]
    pub(crate) spool: Option<PathBuf>,
    /// With CHUNKING and PIPELINING: at most this many whole transactions (MAIL, RCPTs,
    /// BDAT LAST and content) in flight per connection, 0 to 1024; the window adapts from 4 up
    /// to this (default 32; 0: BDAT content waits for the RCPT replies).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub(crate) bdat_window: Option<u16>,
    // Options every delivering command shares go here, and into `apply` below, so that `send`
    // and `bench` (and a later `serve`) take them alike.
}

/// What the command line of `send` sets over a campaign file's `[delivery]` and `[limits]` or
/// over a `--config` file: the delivery options and the few settings of `send` alone.
pub(crate) struct Overrides {
    pub(crate) relay: Option<String>,
    pub(crate) connections: Option<usize>,
    pub(crate) ehlo_name: Option<String>,
    pub(crate) max_age: Option<Duration>,
    pub(crate) retry_after: Option<Duration>,
    pub(crate) delivery: DeliveryArgs,
}

impl Overrides {
    /// Applies what the command line gives over `builder`; the rest of its settings stay.
    pub(crate) fn apply(
        &self,
        mut builder: DispatcherBuilder,
    ) -> Result<DispatcherBuilder, String> {
        if let Some(relay) = &self.relay {
            builder = builder.relay(relay);
        }
        let mut builder = self.delivery.apply(builder)?;
        if let Some(name) = &self.ehlo_name {
            builder = builder.ehlo_name(name);
        }
        if let Some(n) = self.connections {
            builder = builder.max_connections_per_destination(n);
        }
        let retry = &mut builder.config_mut().retry;
        if let Some(after) = self.retry_after {
            retry.initial = after;
        }
        if let Some(age) = self.max_age {
            retry.max_age = age;
        }
        Ok(builder)
    }
}

impl DeliveryArgs {
    /// A builder with the `--config` file's settings, or the defaults.
    pub(crate) fn base_builder(&self) -> Result<DispatcherBuilder, String> {
        match (self.config_text()?, &self.config) {
            (Some(text), Some(path)) => mxpipe::ffi::builder_from_toml(&text)
                .map_err(|e| format!("{}: {e}", path.display())),
            _ => Ok(Dispatcher::builder()),
        }
    }

    /// The text of the `--config` file, when one was given.
    pub(crate) fn config_text(&self) -> Result<Option<String>, String> {
        self.config
            .as_ref()
            .map(|path| {
                std::fs::read_to_string(path)
                    .map_err(|e| format!("--config {}: {e}", path.display()))
            })
            .transpose()
    }

    /// Applies these settings to a builder.
    pub(crate) fn apply(&self, mut b: DispatcherBuilder) -> Result<DispatcherBuilder, String> {
        if let Some(dir) = &self.spool {
            b = b.spool(dir);
        }
        // Only what was given on the command line replaces the --config file's settings.
        if let Some(policy) = &self.starttls {
            b = b.starttls(match policy.as_str() {
                "none" => StartTls::Disabled,
                "required" => StartTls::Required,
                _ => StartTls::Opportunistic,
            });
        }
        if let Some(v) = self.tls_verify {
            b = b.tls_verify(v);
        }
        if let Some(ca) = &self.tls_ca_file {
            b = b.tls_ca_file(ca);
        }
        let secret = |var: &str| {
            std::env::var(var)
                .map_err(|_| format!("--auth-*-env: environment variable {var} is not set"))
        };
        match (
            &self.auth_user,
            &self.auth_password_env,
            &self.auth_token_env,
        ) {
            (None, None, None) => {}
            (Some(user), Some(var), None) => {
                let c = Credentials::password(user, &secret(var)?)
                    .ok_or("--auth-user: the user or password contains NUL, CR or LF")?;
                b = b.credentials(c);
            }
            (Some(user), None, Some(var)) => {
                let c = Credentials::oauth2(user, &secret(var)?)
                    .ok_or("--auth-user: the user or token contains NUL, CR or LF")?;
                b = b.credentials(c);
            }
            _ => {
                return Err(
                    "--auth-user needs exactly one of --auth-password-env and --auth-token-env"
                        .into(),
                )
            }
        }
        if self.allow_plaintext_auth {
            b = b.allow_plaintext_auth(true);
        }
        if self.direct_mx {
            // On top of the --config file's MX settings, if it has any.
            let mut mx: MxConfig = b.config_mut().mx.clone().unwrap_or_default();
            if !self.nameserver.is_empty() {
                mx.nameservers = Some(self.nameserver.clone());
            }
            if let Some(port) = self.mx_port {
                mx.smtp_port = port;
            }
            if self.mx_allow_loopback {
                mx.allow_loopback = true;
            }
            b = b.direct_mx(mx);
        }
        if let Some(n) = self.bdat_window {
            b.config_mut().session.bdat_window = n.into();
        }
        if let Some(rate) = self.messages_per_second {
            b = b.messages_per_second(rate);
        }
        if let Some(rate) = self.messages_per_minute {
            b = b.messages_per_minute(rate);
        }
        if let Some(rate) = self.messages_per_hour {
            b = b.messages_per_hour(rate);
        }
        for ip in &self.source_address {
            b = b.source_address(*ip);
        }
        if let Some(path) = &self.trace {
            let trace = mxpipe::engine::Trace::create(path)
                .map_err(|e| format!("--trace {}: cannot create: {e}", path.display()))?;
            b = b.trace(trace);
        }
        Ok(b)
    }
}

/// Serves `GET /metrics` (any path, in fact) as Prometheus text until the process ends.
pub(crate) fn serve_metrics(addr: SocketAddr, dispatcher: &Arc<Dispatcher>) -> Result<(), String> {
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| format!("--metrics: cannot listen on {addr}: {e}"))?;
    let weak = Arc::downgrade(dispatcher);
    std::thread::Builder::new()
        .name("mxpipe-metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut request = [0u8; 1024];
                let _ = std::io::Read::read(&mut stream, &mut request);
                let Some(d) = weak.upgrade() else { break };
                let body = d.prometheus();
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })
        .map_err(|e| format!("--metrics: {e}"))?;
    Ok(())
}

/// `HOST[:PORT]`, `IP`, `IP:PORT` or `[IPv6]:PORT` as an address, with `default_port` when none
/// is given; a host name is resolved (its first address is taken).
pub(crate) fn host_port(value: &str, default_port: u16) -> Result<SocketAddr, String> {
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bare = value
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .unwrap_or(value);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, default_port));
    }
    let (host, port) = match value.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .map_err(|_| format!("{port:?} is not a port number"))?,
        ),
        None => (value, default_port),
    };
    if host.is_empty() {
        return Err("no host name or address".into());
    }
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host:?} has no address"))
}

/// A DNS server: port 53 unless given.
pub(crate) fn nameserver_addr(value: &str) -> Result<SocketAddr, String> {
    host_port(value, 53)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_take_host_names_and_default_ports() {
        let v4 = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(nameserver_addr("127.0.0.1"), Ok(v4("127.0.0.1:53")));
        assert_eq!(nameserver_addr("127.0.0.2:5353"), Ok(v4("127.0.0.2:5353")));
        assert_eq!(nameserver_addr("[::1]"), Ok(v4("[::1]:53")));
        assert_eq!(nameserver_addr("::1"), Ok(v4("[::1]:53")));
        assert_eq!(nameserver_addr("[::1]:5300"), Ok(v4("[::1]:5300")));
        let local = host_port("localhost:2600", 25).unwrap();
        assert!(local.ip().is_loopback() && local.port() == 2600, "{local}");
        let local = host_port("localhost", 2525).unwrap();
        assert!(local.ip().is_loopback() && local.port() == 2525, "{local}");
        assert_eq!(
            host_port("localhost:x", 25),
            Err("\"x\" is not a port number".into())
        );
        assert_eq!(host_port(":25", 25), Err("no host name or address".into()));
    }
}
