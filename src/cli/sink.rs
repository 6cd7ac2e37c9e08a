//! `mxpipe sink`: the built-in SMTP sink on the command line, and the hidden `bench-sink` that
//! `bench` starts in a child process.
//!
//! This module only starts and reports the sink; the server is [`mxpipe::sink`]'s.

use super::{raise_fd_limit, CliResult};
use mxpipe::sink::{Faults, Sink, SinkConfig, SinkTls};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

pub(crate) struct SinkArgs {
    pub(crate) listen: Vec<SocketAddr>,
    pub(crate) capture: Option<PathBuf>,
    pub(crate) chunking: bool,
    pub(crate) pipelining: bool,
    pub(crate) reply_delay: Option<Duration>,
}

pub(crate) fn run_sink(args: SinkArgs) -> CliResult {
    let listen = &args.listen;
    let (&first, also) = listen
        .split_first()
        .ok_or("sink: --listen needs an address")?;
    if let Some(dir) = &args.capture {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("sink: --capture {}: cannot create: {e}", dir.display()))?;
    }
    // Every client connection is a descriptor here too.
    raise_fd_limit();
    let sink = Sink::start(SinkConfig {
        listen: first,
        also_listen: also.to_vec(),
        capture_dir: args.capture.clone(),
        chunking: args.chunking,
        pipelining: args.pipelining,
        faults: Faults {
            reply_delay: args.reply_delay,
            ..Faults::default()
        },
        ..SinkConfig::default()
    })
    .map_err(|e| {
        let addrs: Vec<String> = listen.iter().map(|a| a.to_string()).collect();
        format!("sink: cannot listen on {}: {e}", addrs.join(", "))
    })?;
    let mut addrs = vec![sink.local_addr().to_string()];
    addrs.extend(also.iter().map(|a| a.to_string()));
    println!("mxpipe sink listening on {}", addrs.join(", "));
    let _ = std::io::stdout().flush();
    loop {
        std::thread::park();
    }
}

pub(crate) fn run_bench_sink(tls: bool) -> CliResult {
    let sink = Sink::start(SinkConfig {
        tls: tls.then(SinkTls::self_signed_for_benchmarks),
        ..SinkConfig::default()
    })
    .map_err(|e| format!("sink: {e}"))?;
    println!("{}", sink.local_addr());
    let _ = std::io::stdout().flush();
    // Serve until the parent closes our stdin (or kills us).
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    sink.stop();
    Ok(ExitCode::SUCCESS)
}
