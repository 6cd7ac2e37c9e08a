//! `mxpipe serve`: the daemon that takes mail from existing MTAs (Postfix, Exim, ...) over SMTP
//! or LMTP and delivers it with the engine, without losing any at the hand-off.
//!
//! Each `[[listener]]` is one loop of the shared server ([`crate::server`]) with a
//! [`ServePolicy`](policy::ServePolicy): custody listeners share one engine with the spool,
//! pass-through listeners one engine without it (the upstream MTA stays the queue of record).
//! See [`config`] for the file and the README for how to point Postfix or Exim at it. This
//! module wires things together; it makes no protocol decisions.

pub mod auth;
pub mod config;
mod policy;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use mio::Waker;

use crate::engine::Dispatcher;
use crate::server::listener::Server;
use crate::server::{tls, Counters, Settings};
use auth::PasswordFile;
use config::{Mode, Protocol, ServeConfig};
use policy::ServePolicy;

/// A running `serve`: its listeners' threads and its engines.
pub struct ServeHandle {
    addrs: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    loops: Vec<(Arc<Waker>, JoinHandle<io::Result<()>>)>,
    engines: Vec<Arc<Dispatcher>>,
    http: Option<crate::http::HttpServer>,
    inbound: Option<crate::inbound::listener::SmtpListener>,
    inbound_http: Option<crate::http::HttpServer>,
}

/// Starts every listener of `config`; errors name the listener or the key.
pub fn start(config: &ServeConfig) -> Result<ServeHandle, String> {
    let needs = |mode| config.listeners.iter().any(|l| l.mode == mode);
    let custody = if needs(Mode::Custody) || config.http.is_some() {
        let spool = config
            .spool
            .as_ref()
            .expect("checked by ServeConfig::parse");
        let builder = config.delivery_builder()?.spool(spool).record_events(false);
        Some(Arc::new(
            builder
                .start()
                .map_err(|e| format!("serve: the custody engine: {e}"))?,
        ))
    } else {
        None
    };
    let pass_through = if needs(Mode::PassThrough) {
        let mut builder = config.delivery_builder()?.record_events(true);
        // A recipient whose reply was 4xx is the upstream MTA's to retry: the engine gives up
        // on it by the time the longest deadline passes, so it is not delivered twice.
        let longest = config
            .listeners
            .iter()
            .map(|l| l.deadline())
            .max()
            .unwrap_or(Duration::from_secs(60));
        builder.config_mut().retry.max_age = longest;
        Some(Arc::new(builder.start().map_err(|e| {
            format!("serve: the pass-through engine: {e}")
        })?))
    } else {
        None
    };

    let stop = Arc::new(AtomicBool::new(false));
    let mut handle = ServeHandle {
        addrs: Vec::new(),
        stop: Arc::clone(&stop),
        loops: Vec::new(),
        engines: custody.iter().chain(pass_through.iter()).cloned().collect(),
        http: None,
        inbound: None,
        inbound_http: None,
    };
    if let Some(section) = &config.inbound {
        let inbound_config = crate::inbound::InboundConfig::load(&section.config)
            .map_err(|e| format!("serve: [inbound] config: {e}"))?;
        let inbound = crate::inbound::Inbound::open(&inbound_config)
            .map_err(|e| format!("serve: [inbound]: {e}"))?;
        let state = Arc::new(std::sync::Mutex::new(inbound));
        let smtp = crate::inbound::listener::SmtpListener::start(
            section.smtp,
            Arc::clone(&state),
            &config.hostname,
        )
        .map_err(|e| format!("serve: [inbound] smtp {}: {e}", section.smtp))?;
        handle.inbound = Some(smtp);
        if let Some(addr) = section.http {
            let app = crate::inbound::unsubscribe::router(state);
            let server = crate::http::start_router(addr, app)
                .map_err(|e| format!("serve: [inbound] http {addr}: {e}"))?;
            handle.inbound_http = Some(server);
        }
    }
    if let (Some(addr), Some(engine)) = (config.http, &custody) {
        let state = crate::http::HttpState::new(Arc::clone(engine), &config.hostname);
        let server = crate::http::start(addr, state)
            .map_err(|e| format!("serve: http: cannot listen on {addr}: {e}"))?;
        handle.http = Some(server);
    }
    for (i, listener) in config.listeners.iter().enumerate() {
        let name = format!("listener[{i}] ({})", listener.address);
        let limits = &config.limits;
        let mut settings = Settings::new(&config.hostname, limits.max_message_size);
        settings.lmtp = listener.protocol == Protocol::Lmtp;
        settings.max_connections = Some(limits.max_connections);
        settings.max_connections_per_client = Some(limits.max_connections_per_client);
        settings.max_recipients = Some(limits.max_recipients);
        settings.forbid_bare_newline = true;
        settings.keep_content = true;
        if let (Some(cert), Some(key)) = (&listener.tls_cert, &listener.tls_key) {
            let read = |path: &std::path::Path| {
                std::fs::read(path).map_err(|e| format!("serve: {name}: {}: {e}", path.display()))
            };
            settings.tls = Some(
                tls::server_config(&format!("serve {name}"), &read(cert)?, &read(key)?)
                    .map_err(|e| e.to_string())?,
            );
        }
        let passwords = match &listener.auth_password_file {
            Some(path) => {
                settings.auth = true;
                Some(Arc::new(
                    PasswordFile::load(path).map_err(|e| format!("serve: {name}: {e}"))?,
                ))
            }
            None => None,
        };
        let dispatcher = match listener.mode {
            Mode::Custody => custody.clone(),
            Mode::PassThrough => pass_through.clone(),
        }
        .expect("an engine was started for every mode in use");
        let policy = ServePolicy::new(
            config.hostname.clone(),
            listener.protocol,
            listener.mode,
            listener.allow_networks.clone(),
            passwords,
            dispatcher,
            listener.deadline(),
            limits.messages_per_client_per_minute,
        );
        let server = Server::bind(
            &[listener.address],
            settings,
            policy,
            Arc::new(Counters::default()),
        )
        .map_err(|e| format!("serve: {name}: {e}"))?;
        handle
            .addrs
            .push(server.local_addr().map_err(|e| e.to_string())?);
        let waker = server.waker();
        let stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(format!("mxpipe-serve-{i}"))
            .spawn(move || server.run(&stop))
            .map_err(|e| format!("serve: {name}: {e}"))?;
        handle.loops.push((waker, thread));
    }
    Ok(handle)
}

impl ServeHandle {
    /// The listeners' addresses, in the order of the file (with the ports given by the OS
    /// where the file said 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Where the inbound SMTP and HTTP listeners listen, when the file has `[inbound]`.
    pub fn inbound_addrs(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        (
            self.inbound.as_ref().map(|l| l.local_addr()),
            self.inbound_http.as_ref().map(|h| h.local_addr()),
        )
    }

    /// Where HTTP injection listens, when the file has `http`.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|h| h.local_addr())
    }

    /// Stops listening (open connections are closed, unanswered messages stay the client's),
    /// then gives the engines up to `grace` to finish what is under way. Custody work not final
    /// by then stays in the spool for the next start.
    pub fn stop(mut self, grace: Duration) {
        self.stop_loops();
        for engine in &self.engines {
            engine.shutdown_timeout(grace);
        }
    }

    fn stop_loops(&mut self) {
        if let Some(http) = self.http.take() {
            http.stop();
        }
        if let Some(http) = self.inbound_http.take() {
            http.stop();
        }
        if let Some(smtp) = self.inbound.take() {
            smtp.stop();
        }
        self.stop.store(true, Ordering::Release);
        for (waker, thread) in self.loops.drain(..) {
            let _ = waker.wake();
            let _ = thread.join();
        }
    }
}

impl Drop for ServeHandle {
    fn drop(&mut self) {
        self.stop_loops();
    }
}
