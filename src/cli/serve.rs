//! `mxpipe serve`: runs the injection daemon of [`mxpipe::serve`] until SIGTERM or Ctrl-C, and
//! `mxpipe serve hash-password`, which makes a password file line.
//!
//! This module only reads the file, starts, prints the addresses and stops; the daemon is the
//! library's.

use super::{raise_fd_limit, signal, CliResult};
use clap::{Args, Subcommand};
use mxpipe::serve::config::ServeConfig;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct ServeArgs {
    #[command(subcommand)]
    action: Option<ServeAction>,
    /// The serve configuration (TOML: listeners, limits, spool, [delivery]).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ServeAction {
    /// Reads a password from the first line of standard input and prints its Argon2id hash,
    /// for a `user:hash` line of the auth_password_file.
    HashPassword,
}

pub(crate) fn run_serve(args: ServeArgs) -> CliResult {
    if let Some(ServeAction::HashPassword) = args.action {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| format!("serve hash-password: standard input: {e}"))?;
        let password = line.strip_suffix('\n').unwrap_or(&line);
        let password = password.strip_suffix('\r').unwrap_or(password);
        if password.is_empty() {
            return Err("serve hash-password: the password (first line of input) is empty".into());
        }
        println!(
            "{}",
            mxpipe::serve::auth::hash_password(password.as_bytes())?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let path = args
        .config
        .ok_or("serve: --config FILE is needed (or: serve hash-password)")?;
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("serve: --config {}: {e}", path.display()))?;
    let config = ServeConfig::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    signal::install()?;
    raise_fd_limit();
    let handle = mxpipe::serve::start(&config)?;
    for (listener, addr) in config.listeners.iter().zip(handle.local_addrs()) {
        println!(
            "mxpipe serve listening on {addr} ({:?}, {:?})",
            listener.protocol, listener.mode
        );
    }
    if let Some(addr) = handle.http_addr() {
        println!("mxpipe serve listening on {addr} (HTTP injection)");
    }
    let (inbound_smtp, inbound_http) = handle.inbound_addrs();
    if let Some(addr) = inbound_smtp {
        println!(
            "mxpipe serve listening on {addr} (inbound SMTP: bounces, complaints, unsubscribes)"
        );
    }
    if let Some(addr) = inbound_http {
        println!("mxpipe serve listening on {addr} (inbound HTTP: one-click unsubscribe)");
    }
    let _ = std::io::stdout().flush();
    while !signal::stop_requested() {
        std::thread::sleep(Duration::from_millis(100));
    }
    handle.stop(signal::GRACE);
    Ok(ExitCode::SUCCESS)
}
