//! `mxpipe http`: the HTTP injection listener ([`mxpipe::http`]) in front of a dispatcher built
//! from the shared delivery options. Runs until killed or stopped by a signal, then shuts the
//! dispatcher down (what is spooled and not final stays in the spool for the next run).

use super::options::{self, Overrides};
use super::{signal, CliResult};
use mxpipe::http::{self, HttpState};
use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

pub(crate) fn listen_addr(value: &str) -> Result<SocketAddr, String> {
    options::host_port(value, 8025)
}

pub(crate) fn run_http(listen: SocketAddr, overrides: Overrides) -> CliResult {
    if overrides.relay.is_none() && !overrides.delivery.direct_mx {
        return Err("http: give --relay HOST:PORT or --direct-mx".into());
    }
    signal::install()?;
    let mut builder = overrides.apply(overrides.delivery.base_builder()?)?;
    let ehlo_name = builder.config_mut().session.ehlo_name.clone();
    // Nobody reads outcome events here: keeping them would grow without bound.
    let dispatcher = builder
        .record_events(false)
        .start()
        .map_err(|e| e.to_string())?;
    if let Some(recovered) = dispatcher.spool_report() {
        eprintln!("{recovered}");
    }
    let dispatcher = Arc::new(dispatcher);
    if let Some(addr) = overrides.delivery.metrics {
        options::serve_metrics(addr, &dispatcher)?;
    }
    let server = http::start(listen, HttpState::new(Arc::clone(&dispatcher), &ehlo_name))
        .map_err(|e| format!("http: cannot listen on {listen}: {e}"))?;
    println!("mxpipe http listening on {}", server.local_addr());
    let _ = std::io::stdout().flush();
    while !signal::stop_requested() {
        std::thread::sleep(Duration::from_millis(200));
    }
    server.stop();
    dispatcher.shutdown_timeout(signal::GRACE);
    Ok(ExitCode::SUCCESS)
}
