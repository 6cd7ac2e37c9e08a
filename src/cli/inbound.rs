//! `mxpipe inbound`: the bounce, feedback-report and unsubscribe receiver. Runs the inbound
//! SMTP listener and the HTTP endpoint (RFC 8058 one-click POSTs, `/metrics`) over one
//! [`mxpipe::inbound::Inbound`] until SIGINT or SIGTERM.
//!
//! It only wires addresses, the configuration file and the signal to the library; the rules
//! live in `mxpipe::inbound`.

use super::{signal, CliResult};
use clap::Args;
use mxpipe::inbound::{listener, unsubscribe, Inbound, InboundConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Args, Debug)]
pub(crate) struct InboundArgs {
    /// Where bounces, feedback reports and unsubscribe mail arrive (port 0 picks one; the
    /// address is printed).
    #[arg(long, value_name = "HOST:PORT")]
    smtp: SocketAddr,
    /// Where one-click unsubscribe POSTs and GET /metrics are served.
    #[arg(long, value_name = "HOST:PORT")]
    http: SocketAddr,
    /// The inbound configuration (TOML: suppression, quarantine, campaigns; see the
    /// `mxpipe::inbound` docs).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// The name the SMTP greeting gives.
    #[arg(long, default_value = "localhost")]
    hostname: String,
}

pub(crate) fn run_inbound(args: InboundArgs) -> CliResult {
    let config = InboundConfig::load(&args.config).map_err(|e| e.to_string())?;
    let inbound = Inbound::open(&config).map_err(|e| e.to_string())?;
    let state = Arc::new(Mutex::new(inbound));
    signal::install()?;
    let smtp = listener::SmtpListener::start(args.smtp, Arc::clone(&state), &args.hostname)
        .map_err(|e| format!("--smtp {}: {e}", args.smtp))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let http = tokio::net::TcpListener::bind(args.http)
            .await
            .map_err(|e| format!("--http {}: {e}", args.http))?;
        let http_addr = http.local_addr().map_err(|e| e.to_string())?;
        println!("smtp listening on {}", smtp.local_addr());
        println!("http listening on {http_addr}");
        let http_task = tokio::spawn(async move {
            let _ = axum::serve(http, unsubscribe::router(state)).await;
        });
        while !signal::STOP.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        http_task.abort();
        smtp.stop();
        Ok::<_, String>(())
    })?;
    Ok(ExitCode::SUCCESS)
}
