//! The `mxpipe` command-line tool: bulk sends, the built-in sink, the throughput benchmark and a
//! self-contained demo.
//!
//! ```text
//! mxpipe demo                                   # a bulk send to the built-in sink, no setup
//! mxpipe sink --listen 127.0.0.1:2525           # a fast SMTP sink
//! mxpipe send --relay 127.0.0.1:2525 --from news@example.org --to-file list.txt msg.eml
//! mxpipe send campaign.toml --report report.csv --journal campaign.journal
//! mxpipe send campaign.toml --dry-run rendered/
//! mxpipe bench --messages 200000 --size 2048 --connections 20
//! mxpipe send --direct-mx --from news@example.org --to-file list.txt msg.eml --metrics 127.0.0.1:9464
//! ```

use clap::{Args, Parser, Subcommand};
use mxpipe::campaign::{Campaign, SendOptions};
use mxpipe::engine::{Dispatcher, DispatcherBuilder, Event, EventKind, StatsSnapshot};
use mxpipe::message::{Address, Body, Message};
use mxpipe::queue::RetryPolicy;
use mxpipe::route::mx::MxConfig;
use mxpipe::sink::{Faults, Sink, SinkConfig, SinkTls};
use mxpipe::smtp::{Credentials, StartTls};
use mxpipe::Error;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "mxpipe",
    version,
    about = "High-throughput bulk mail dispatcher"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How deliveries are made: TLS, AUTH, routing, shaping, metrics. Shared by `send` (message
/// mode) and `bench`.
#[derive(Args, Clone, Debug)]
struct DeliveryArgs {
    /// STARTTLS policy: none, opportunistic (use it when offered; the default) or required
    /// (never send in plaintext). Write the relay as smtps://host:port for implicit TLS.
    #[arg(long, value_parser = ["none", "opportunistic", "required"])]
    starttls: Option<String>,
    /// Verify certificates (default: under required TLS and implicit TLS only).
    #[arg(long, value_name = "BOOL")]
    tls_verify: Option<bool>,
    /// Trust the CA certificates in this PEM file as well as the Mozilla roots.
    #[arg(long, value_name = "PEM")]
    tls_ca_file: Option<PathBuf>,
    /// Log in (RFC 4954) as this user; the secret comes from --auth-password-env or
    /// --auth-token-env, never from the command line, where other users could read it.
    #[arg(long)]
    auth_user: Option<String>,
    /// The environment variable that holds the password (AUTH PLAIN or LOGIN).
    #[arg(long, value_name = "VAR")]
    auth_password_env: Option<String>,
    /// The environment variable that holds an OAuth 2.0 bearer token (AUTH XOAUTH2).
    #[arg(long, value_name = "VAR")]
    auth_token_env: Option<String>,
    /// Allow AUTH without TLS (off by default).
    #[arg(long)]
    allow_plaintext_auth: bool,
    /// Deliver straight to each recipient domain's MX hosts instead of a relay.
    #[arg(long)]
    direct_mx: bool,
    /// With --direct-mx: ask these DNS servers (default: the system's).
    #[arg(long, value_name = "ADDR")]
    nameserver: Vec<SocketAddr>,
    /// With --direct-mx: the SMTP port of MX hosts (default 25).
    #[arg(long)]
    mx_port: Option<u16>,
    /// Engine settings from a TOML file with the keys of the C ABI's `mxp_config_set` (limits
    /// and overrides by host or @recipient-domain, adaptive backoff, retries, DNS, ...); the
    /// other options here apply on top.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// At most this many messages per second to each destination.
    #[arg(long)]
    messages_per_second: Option<f64>,
    /// At most this many messages per minute to each destination.
    #[arg(long)]
    messages_per_minute: Option<f64>,
    /// At most this many messages per hour to each destination.
    #[arg(long)]
    messages_per_hour: Option<f64>,
    /// Send from this local address (repeat for several, used in turn).
    #[arg(long, value_name = "IP")]
    source_address: Vec<IpAddr>,
    /// Serve Prometheus metrics over HTTP on this address while running.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Keep custody in this spool directory: submissions are acknowledged once fsynced, and
    /// what is not final when the process ends (deferred, or cut short by a crash) is sent by
    /// the next process that opens it (`send` with an empty --to-file sends only that).
    #[arg(long, value_name = "DIR")]
    spool: Option<PathBuf>,
}

impl DeliveryArgs {
    /// A builder with the `--config` file's settings, or the defaults.
    fn base_builder(&self) -> Result<DispatcherBuilder, String> {
        let Some(path) = &self.config else {
            return Ok(Dispatcher::builder());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--config {}: {e}", path.display()))?;
        mxpipe::ffi::builder_from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Applies these settings to a builder.
    fn apply(&self, mut b: DispatcherBuilder) -> Result<DispatcherBuilder, String> {
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
            b = b.direct_mx(mx);
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
        Ok(b)
    }
}

/// Serves `GET /metrics` (any path, in fact) as Prometheus text until the process ends.
fn serve_metrics(addr: SocketAddr, dispatcher: &Arc<Dispatcher>) -> Result<(), String> {
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

#[derive(Subcommand)]
enum Command {
    /// Run a fast SMTP sink (PIPELINING, CHUNKING, 8BITMIME, SIZE) until killed.
    Sink {
        /// Address to listen on (port 0 picks one; the address is printed). Repeat it to serve
        /// several addresses from one sink, as one host with several addresses would.
        #[arg(long, default_value = "127.0.0.1:2525")]
        listen: Vec<SocketAddr>,
        /// Write every received message to this directory (.eml + .json envelope).
        #[arg(long)]
        capture: Option<PathBuf>,
        /// Do not advertise CHUNKING.
        #[arg(long)]
        no_chunking: bool,
        /// Do not advertise PIPELINING.
        #[arg(long)]
        no_pipelining: bool,
        /// Hold every reply after the greeting this many milliseconds: a tarpit. Other
        /// connections are served meanwhile.
        #[arg(long, value_name = "MS")]
        reply_delay_ms: Option<u64>,
    },
    /// Send a campaign (CAMPAIGN.toml: templates, recipients CSV, DKIM, ...; see the
    /// `mxpipe::campaign` docs), or one ready message to many recipients (--relay, --from,
    /// --to-file and MESSAGE.eml).
    Send {
        /// Message mode: the smarthost, host:port.
        #[arg(long)]
        relay: Option<String>,
        /// Message mode: envelope sender (MAIL FROM); "" for the null sender.
        #[arg(long)]
        from: Option<String>,
        /// Message mode: recipients, one per line ('#' starts a comment).
        #[arg(long)]
        to_file: Option<PathBuf>,
        /// The campaign file, or in message mode the message (RFC 5322 headers and body).
        #[arg(value_name = "CAMPAIGN.toml|MESSAGE.eml")]
        message: PathBuf,
        /// Campaign: write the rendered messages to this directory as .eml files; send nothing.
        #[arg(long, value_name = "DIR")]
        dry_run: Option<PathBuf>,
        /// Campaign: resume from this journal of final outcomes, and append to it.
        #[arg(long, value_name = "FILE")]
        journal: Option<PathBuf>,
        /// Campaign: no progress bar, no warnings about skipped rows, no summary table.
        #[arg(long)]
        quiet: bool,
        /// Campaign: print the summary as one JSON object.
        #[arg(long)]
        json: bool,
        /// Message mode: connections per destination at most (default 20; a campaign sets
        /// limits.connections).
        #[arg(long)]
        connections: Option<usize>,
        /// Message mode: the name sent in EHLO (default localhost; a campaign sets
        /// delivery.ehlo_name).
        #[arg(long)]
        ehlo_name: Option<String>,
        /// Write one line per recipient outcome here (campaign: CSV for a .csv name, JSON Lines
        /// otherwise; message mode: JSON Lines).
        #[arg(long)]
        report: Option<PathBuf>,
        /// Message mode: keep retrying deferred recipients until they are final (up to
        /// --max-age); a campaign always waits for every recipient to be final.
        #[arg(long)]
        wait_final: bool,
        /// Message mode: give up on a recipient after this many seconds of temporary failures
        /// (default 3 days; a campaign sets limits.max_age_secs).
        #[arg(long)]
        max_age: Option<u64>,
        /// Message mode: first retry after this many seconds (default 300; doubling, with
        /// jitter).
        #[arg(long)]
        retry_after: Option<u64>,
        #[command(flatten)]
        delivery: DeliveryArgs,
    },
    /// Measure end-to-end throughput to a sink (the built-in one, in a child process, by default).
    Bench {
        #[arg(long, default_value_t = 100_000)]
        messages: u64,
        /// Approximate message size in bytes.
        #[arg(long, default_value_t = 2048)]
        size: usize,
        #[arg(long, default_value_t = 20)]
        connections: usize,
        /// Send to this host:port instead of a built-in sink.
        #[arg(long)]
        to: Option<String>,
        /// Recipients per message.
        #[arg(long, default_value_t = 1)]
        recipients: usize,
        /// Event-loop threads.
        #[arg(long, default_value_t = 1)]
        loops: usize,
        /// Transactions per connection before it is replaced (1: a new connection, and with
        /// --tls a new handshake, for every message).
        #[arg(long)]
        messages_per_connection: Option<u32>,
        /// The built-in sink offers STARTTLS (its benchmark certificate); combine with
        /// --starttls required.
        #[arg(long)]
        tls: bool,
        /// With --direct-mx: spread the recipients over this many domains, d0.bench.test ...
        #[arg(long, default_value_t = 1)]
        domains: usize,
        /// A slow server to send to at the same time (e.g. `mxpipe sink --reply-delay-ms`):
        /// --tarpit-messages more messages, to tarpit.bench.test, go there. msgs_per_s then
        /// counts only the --messages, timed until they are all final; the bench ends then,
        /// abandoning what the tarpit has not taken yet.
        #[arg(long, value_name = "HOST:PORT")]
        tarpit: Option<String>,
        /// With --tarpit: how many messages go to the tarpit, spread over the submissions.
        #[arg(long, default_value_t = 100)]
        tarpit_messages: u64,
        /// Every message gets a body of its own (default: one body shared by all).
        #[arg(long)]
        unique_bodies: bool,
        #[command(flatten)]
        delivery: DeliveryArgs,
    },
    /// Queue tools on a spool no process holds: list, show ID, retry [ID|--all], delete ID,
    /// stats.
    Queue(mxpipe::spool::admin::QueueArgs),
    /// A real bulk send of a generated newsletter to the built-in sink, with no setup.
    Demo {
        #[arg(long, default_value_t = 10_000)]
        recipients: usize,
    },
    /// Internal: a built-in sink for `bench`, printing its address on the first line.
    #[command(hide = true)]
    BenchSink {
        #[arg(long)]
        tls: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Sink {
            listen,
            capture,
            no_chunking,
            no_pipelining,
            reply_delay_ms,
        } => run_sink(SinkArgs {
            listen,
            capture,
            chunking: !no_chunking,
            pipelining: !no_pipelining,
            reply_delay: reply_delay_ms.map(Duration::from_millis),
        }),
        Command::Send {
            relay: None,
            from: None,
            to_file: None,
            message,
            dry_run,
            journal,
            quiet,
            json,
            report,
            ..
        } => run_campaign(CampaignArgs {
            campaign: message,
            dry_run,
            report,
            journal,
            quiet,
            json,
        }),
        Command::Send {
            relay,
            from: Some(from),
            to_file: Some(to_file),
            message,
            dry_run: None,
            journal: None,
            quiet: false,
            json: false,
            connections,
            ehlo_name,
            report,
            wait_final,
            max_age,
            retry_after,
            delivery,
        } if relay.is_some() || delivery.direct_mx || delivery.config.is_some() => {
            run_send(SendArgs {
                relay,
                from,
                to_file,
                message,
                connections,
                ehlo_name,
                report,
                wait_final,
                max_age: max_age.map(Duration::from_secs),
                retry_after: retry_after.map(Duration::from_secs),
                delivery,
            })
        }
        Command::Send {
            from: Some(_),
            to_file: Some(_),
            dry_run: None,
            journal: None,
            quiet: false,
            json: false,
            ..
        } => Err("send: a message needs --relay HOST:PORT or --direct-mx".into()),
        Command::Send {
            from: Some(_),
            to_file: Some(_),
            ..
        } => Err(
            "send: --dry-run, --journal, --quiet and --json are for campaign files; a message \
             sent with --relay/--from/--to-file takes none of them"
                .into(),
        ),
        Command::Send { .. } => Err(
            "send: give a campaign file alone, or a message with --from, --to-file and --relay \
             (or --direct-mx)"
                .into(),
        ),
        Command::Bench {
            messages,
            size,
            connections,
            to,
            recipients,
            loops,
            messages_per_connection,
            tls,
            domains,
            tarpit,
            tarpit_messages,
            unique_bodies,
            delivery,
        } => run_bench(BenchArgs {
            messages,
            size,
            connections,
            to,
            recipients,
            loops,
            messages_per_connection,
            tls,
            domains,
            tarpit: tarpit.map(|target| (target, tarpit_messages)),
            unique_bodies,
            delivery,
        }),
        Command::Queue(args) => mxpipe::spool::admin::run_cli(args).map(|()| ExitCode::SUCCESS),
        Command::Demo { recipients } => run_demo(recipients),
        Command::BenchSink { tls } => run_bench_sink(tls),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mxpipe: {e}");
            ExitCode::from(2)
        }
    }
}

type CliResult = Result<ExitCode, String>;

struct SinkArgs {
    listen: Vec<SocketAddr>,
    capture: Option<PathBuf>,
    chunking: bool,
    pipelining: bool,
    reply_delay: Option<Duration>,
}

fn run_sink(args: SinkArgs) -> CliResult {
    let listen = &args.listen;
    let (&first, also) = listen
        .split_first()
        .ok_or("sink: --listen needs an address")?;
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

fn run_bench_sink(tls: bool) -> CliResult {
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

struct CampaignArgs {
    campaign: PathBuf,
    dry_run: Option<PathBuf>,
    report: Option<PathBuf>,
    journal: Option<PathBuf>,
    quiet: bool,
    json: bool,
}

/// `mxpipe send campaign.toml`: load and check everything, then send (or render, with
/// --dry-run); exit 0 when every recipient was delivered, 1 when some were not.
fn run_campaign(args: CampaignArgs) -> CliResult {
    let campaign = Campaign::load(&args.campaign).map_err(|e| e.to_string())?;
    if !args.quiet {
        for s in campaign.skipped() {
            eprintln!(
                "{}:{}: skipped ({}) {:?}: {}",
                campaign.recipients_path().display(),
                s.line,
                s.kind.as_str(),
                s.recipient,
                s.reason
            );
        }
    }
    let summary = match &args.dry_run {
        Some(dir) => {
            if args.report.is_some() || args.journal.is_some() {
                return Err(
                    "send: --report and --journal record deliveries; a --dry-run makes none".into(),
                );
            }
            let summary = campaign.dry_run(dir).map_err(|e| e.to_string())?;
            if let (Some((name, record)), false) = (campaign.dkim_record(), args.quiet) {
                eprintln!("DKIM: publish TXT {name} \"{record}\"");
            }
            summary
        }
        None => campaign
            .send(&SendOptions {
                report: args.report,
                journal: args.journal,
                progress: !args.quiet && !args.json,
            })
            .map_err(|e| e.to_string())?,
    };
    if !args.quiet {
        for failure in &summary.failures {
            eprintln!("mxpipe: failed: {failure}");
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&summary).map_err(|e| e.to_string())?
        );
    } else if !args.quiet {
        print!("{}", summary.table());
    }
    Ok(if summary.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

struct SendArgs {
    relay: Option<String>,
    from: String,
    to_file: PathBuf,
    message: PathBuf,
    connections: Option<usize>,
    ehlo_name: Option<String>,
    report: Option<PathBuf>,
    wait_final: bool,
    max_age: Option<Duration>,
    retry_after: Option<Duration>,
    delivery: DeliveryArgs,
}

fn run_send(args: SendArgs) -> CliResult {
    let content = std::fs::read(&args.message)
        .map_err(|e| format!("{}: cannot read: {e}", args.message.display()))?;
    let body = Body::new(&content).map_err(|e| format!("{}: {e}", args.message.display()))?;
    let sender = if args.from.is_empty() {
        Address::null()
    } else {
        Address::parse(&args.from, mxpipe::error::Field::Sender)
            .map_err(|e| format!("--from: {e}"))?
    };
    let list = std::fs::File::open(&args.to_file)
        .map_err(|e| format!("{}: cannot read: {e}", args.to_file.display()))?;
    let mut recipients = Vec::new();
    let mut invalid = 0u64;
    let mut seen = std::collections::HashSet::new();
    for (n, line) in BufReader::new(list).lines().enumerate() {
        let line = line.map_err(|e| format!("{}: line {}: {e}", args.to_file.display(), n + 1))?;
        let text = line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        match Address::parse(text, mxpipe::error::Field::Recipient(recipients.len())) {
            Ok(a) => {
                if seen.insert(a.as_str().to_ascii_lowercase()) {
                    recipients.push(a);
                }
            }
            Err(Error::InvalidAddress { problem, .. }) => {
                invalid += 1;
                eprintln!(
                    "{}:{}: recipient {text:?} skipped: address {problem}",
                    args.to_file.display(),
                    n + 1
                );
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    if recipients.is_empty() && args.delivery.spool.is_none() {
        return Err(format!("{}: no valid recipients", args.to_file.display()));
    }
    let mut builder = args.delivery.base_builder()?;
    if let Some(relay) = &args.relay {
        builder = builder.relay(relay);
    }
    // What the command line gives replaces the --config file's settings; the rest stays.
    let mut builder = args.delivery.apply(builder)?;
    if let Some(name) = &args.ehlo_name {
        builder = builder.ehlo_name(name);
    }
    if let Some(n) = args.connections {
        builder = builder.max_connections_per_destination(n);
    }
    let retry = &mut builder.config_mut().retry;
    if let Some(after) = args.retry_after {
        retry.initial = after;
    }
    if let Some(age) = args.max_age {
        retry.max_age = age;
    }
    let max_age = retry.max_age;
    // This command reads every outcome: a --config file cannot turn them off.
    let dispatcher = builder
        .record_events(true)
        .start()
        .map_err(|e| e.to_string())?;
    let dispatcher = Arc::new(dispatcher);
    if let Some(addr) = args.delivery.metrics {
        serve_metrics(addr, &dispatcher)?;
    }
    let events = dispatcher.events().expect("events are on");
    if let Some(report) = dispatcher.spool_report() {
        eprintln!("{report}");
    }
    let total = recipients.len();
    if total > 0 {
        let message =
            Message::from_parts(sender, recipients, Arc::new(body)).map_err(|e| e.to_string())?;
        let id = dispatcher
            .submit_timeout(message, Duration::from_secs(60))
            .map_err(|e| e.to_string())?;
        if args.delivery.spool.is_some() {
            // Acknowledged only once on disk: a crash from here on loses nothing.
            dispatcher.sync().map_err(|e| e.to_string())?;
            println!("spooled id={id} recipients={total}");
            std::io::stdout().flush().map_err(|e| e.to_string())?;
        }
    }
    let mut report = match &args.report {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?,
        )),
        None => None,
    };
    if args.wait_final {
        dispatcher.wait_final(max_age + Duration::from_secs(60));
    } else {
        dispatcher.flush();
    }
    dispatcher.shutdown();
    for event in events.try_iter() {
        if let Some(w) = report.as_mut() {
            writeln!(w, "{}", event_json(&event)).map_err(|e| format!("report: {e}"))?;
        }
    }
    if let Some(mut w) = report {
        w.flush().map_err(|e| format!("report: {e}"))?;
    }
    let s = dispatcher.stats();
    print_summary(total as u64, invalid, &s);
    let pending = s.in_flight;
    Ok(if s.bounced + s.expired + invalid + pending == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_summary(recipients: u64, invalid: u64, s: &StatsSnapshot) {
    println!(
        "recipients={recipients} delivered={} bounced={} expired={} deferred_now={} invalid={invalid} connections={}",
        s.delivered, s.bounced, s.expired, s.in_flight, s.connections_opened
    );
}

/// One outcome as a JSON line for reports.
fn event_json(e: &Event) -> String {
    serde_json::json!({
        "message_id": e.message_id,
        "recipient": e.recipient.as_str(),
        "status": e.kind.as_str(),
        "code": e.reply.code,
        "enhanced": e.reply.enhanced.map(|c| c.to_string()),
        "text": e.reply.text,
        "attempts": e.attempts,
        "destination": &*e.destination,
        "retry_after_s": e.retry_after.map(|d| d.as_secs_f64()),
        "elapsed_ms": e.elapsed.as_millis() as u64,
    })
    .to_string()
}

/// A body of about `size` bytes: headers and 76-column lines.
fn bench_body(size: usize) -> Vec<u8> {
    let mut body = b"From: bench@mxpipe.example\r\nTo: sink@mxpipe.example\r\nSubject: mxpipe bench\r\nMessage-ID: <bench@mxpipe.example>\r\n\r\n".to_vec();
    let line =
        b"The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\r\n";
    while body.len() + line.len() <= size.max(body.len() + line.len()) && body.len() < size {
        body.extend_from_slice(line);
    }
    body
}

struct ChildSink {
    child: std::process::Child,
    addr: String,
}

impl ChildSink {
    fn start(tls: bool) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut command = std::process::Command::new(exe);
        command.arg("bench-sink");
        if tls {
            command.arg("--tls");
        }
        let mut child = command
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the sink: {e}"))?;
        let stdout = child.stdout.take().expect("piped");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| format!("sink: {e}"))?;
        Ok(ChildSink {
            child,
            addr: line.trim().to_string(),
        })
    }
}

impl Drop for ChildSink {
    fn drop(&mut self) {
        // Closing stdin tells the sink to stop; wait for it so no process is left behind.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Thousands of connections need thousands of descriptors: lift the soft limit to the hard one
/// (the child sink inherits it).
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn rusage_self() -> (Duration, u64) {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (
        tv(usage.ru_utime) + tv(usage.ru_stime),
        usage.ru_maxrss as u64,
    )
}

/// When each destination had its first delivery, sampled every 200 ms by a thread of its own.
struct FirstDeliveries {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Duration>>,
}

impl FirstDeliveries {
    fn start(dispatcher: Arc<Dispatcher>, start: Instant) -> FirstDeliveries {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = Arc::clone(&stop);
            move || {
                let mut first: std::collections::HashMap<String, Duration> = Default::default();
                loop {
                    let last = stop.load(std::sync::atomic::Ordering::Acquire);
                    let now = start.elapsed();
                    for d in dispatcher.destination_stats() {
                        if d.delivered > 0 && !first.contains_key(&d.name) {
                            first.insert(d.name, now);
                        }
                    }
                    if last {
                        return first.into_values().collect();
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        });
        FirstDeliveries { stop, thread }
    }

    /// Every destination served so far: the time of its first delivery (to within 200 ms).
    fn finish(self) -> Vec<Duration> {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.thread.join().unwrap_or_default()
    }
}

struct BenchArgs {
    messages: u64,
    size: usize,
    connections: usize,
    to: Option<String>,
    recipients: usize,
    loops: usize,
    messages_per_connection: Option<u32>,
    tls: bool,
    domains: usize,
    /// A slow destination and how many messages go there beside the measured ones.
    tarpit: Option<(String, u64)>,
    unique_bodies: bool,
    delivery: DeliveryArgs,
}

/// The domain whose recipients `bench --tarpit` routes to the tarpit.
const TARPIT_DOMAIN: &str = "tarpit.bench.test";

/// A destination's name in the metrics: its target without the scheme (see `route::Target`).
fn destination_name(target: &str) -> &str {
    ["smtps://", "smtp://"]
        .iter()
        .find_map(|scheme| target.strip_prefix(scheme))
        .unwrap_or(target)
}

/// Recipients with a final outcome, and recipients delivered.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    finals: u64,
    delivered: u64,
}

/// The outcomes so far at the measured destinations, and at the tarpit (none without one).
fn tally(dispatcher: &Dispatcher, tarpit: Option<&str>) -> (Tally, Tally) {
    // The loop counts an outcome for its destination before the global one, so the global
    // counters are read first: an outcome caught in between undercounts the measured side
    // rather than stopping the clock early.
    let s = dispatcher.stats();
    let at_tarpit = tarpit
        .and_then(|name| {
            dispatcher
                .destination_stats()
                .into_iter()
                .find(|d| d.name == name)
        })
        .map_or(Tally::default(), |d| Tally {
            finals: d.delivered + d.bounced + d.expired,
            delivered: d.delivered,
        });
    let measured = Tally {
        finals: (s.delivered + s.bounced + s.expired).saturating_sub(at_tarpit.finals),
        delivered: s.delivered.saturating_sub(at_tarpit.delivered),
    };
    (measured, at_tarpit)
}

fn run_bench(args: BenchArgs) -> CliResult {
    let BenchArgs {
        messages,
        size,
        connections,
        recipients,
        loops,
        ..
    } = args;
    if messages == 0 || recipients == 0 || args.domains == 0 {
        return Err("--messages, --recipients and --domains must be at least 1".into());
    }
    raise_fd_limit();
    let direct = args.delivery.direct_mx;
    let sink = match (&args.to, direct) {
        (None, false) => Some(ChildSink::start(args.tls)?),
        _ => None,
    };
    let mut builder = args.delivery.base_builder()?;
    let mut relay = None;
    if !direct {
        let target = args
            .to
            .clone()
            .unwrap_or_else(|| sink.as_ref().expect("started").addr.clone());
        builder = builder.relay(&target);
        relay = Some(target);
    }
    let tarpit = args
        .tarpit
        .as_ref()
        .map(|(target, _)| destination_name(target));
    if let Some((target, _)) = &args.tarpit {
        if tarpit == relay.as_deref().map(destination_name) {
            return Err("--tarpit must be another server than the one measured".into());
        }
        builder = builder.route(TARPIT_DOMAIN, target);
    }
    let mut builder = args.delivery.apply(builder)?;
    if args.tls && args.delivery.tls_verify.is_none() {
        // The built-in sink's benchmark certificate is self-signed: encrypt without verifying.
        builder = builder.tls_verify(false);
    }
    let dispatcher = builder
        // A benchmark reports failures; it does not wait days for retries.
        .retry(RetryPolicy {
            initial: Duration::from_secs(1),
            max_age: Duration::from_secs(30),
            ..RetryPolicy::default()
        })
        .ehlo_name("bench.mxpipe.example")
        .max_connections_per_destination(connections)
        .max_messages_per_connection(args.messages_per_connection.unwrap_or(u32::MAX))
        .record_events(false)
        .loops(loops)
        .start()
        .map_err(|e| e.to_string())?;
    let dispatcher = Arc::new(dispatcher);
    if let Some(addr) = args.delivery.metrics {
        serve_metrics(addr, &dispatcher)?;
    }
    let body = Arc::new(Body::new(&bench_body(size)).map_err(|e| e.to_string())?);
    let sender =
        Address::parse("bench@mxpipe.example", mxpipe::error::Field::Sender).expect("valid");
    // One recipient list per domain (a single one without --direct-mx).
    let lists: Vec<Vec<Address>> = (0..args.domains)
        .map(|d| {
            (0..recipients)
                .map(|i| {
                    let domain = if direct {
                        format!("d{d}.bench.test")
                    } else {
                        "sink.example".to_string()
                    };
                    Address::parse(
                        &format!("user{i}@{domain}"),
                        mxpipe::error::Field::Recipient(i),
                    )
                    .expect("valid")
                })
                .collect()
        })
        .collect();
    let tarpit_rcpt = Address::parse(
        &format!("user@{TARPIT_DOMAIN}"),
        mxpipe::error::Field::Recipient(0),
    )
    .expect("valid");
    let tarpit_messages = args.tarpit.as_ref().map_or(0, |&(_, n)| n);
    let mut tarpit_submitted = 0u64;
    let (cpu0, _) = rusage_self();
    let start = Instant::now();
    let first_deliveries =
        (args.domains > 1).then(|| FirstDeliveries::start(Arc::clone(&dispatcher), start));
    for n in 0..messages {
        // The tarpit's messages are spread evenly over the measured ones.
        while tarpit_submitted < tarpit_messages
            && tarpit_submitted * messages <= n * tarpit_messages
        {
            let m =
                Message::from_parts(sender.clone(), vec![tarpit_rcpt.clone()], Arc::clone(&body))
                    .map_err(|e| e.to_string())?;
            dispatcher
                .submit_timeout(m, Duration::from_secs(60))
                .map_err(|e| e.to_string())?;
            tarpit_submitted += 1;
        }
        let rcpts = lists[n as usize % lists.len()].clone();
        let body = if args.unique_bodies {
            Arc::new(Body::new(&unique_body(&body, n)).map_err(|e| e.to_string())?)
        } else {
            Arc::clone(&body)
        };
        let m = Message::from_parts(sender.clone(), rcpts, body).map_err(|e| e.to_string())?;
        dispatcher
            .submit_timeout(m, Duration::from_secs(60))
            .map_err(|e| e.to_string())?;
    }
    let submitted_in = start.elapsed();
    let limit = Duration::from_secs(600);
    let not_final = || format!("bench: not every message was final after {limit:?}");
    let wanted = messages * recipients as u64;
    // With a tarpit the clock stops when the other destinations' recipients are final: they
    // must not wait for it.
    if tarpit.is_some() {
        while tally(&dispatcher, tarpit).0.finals < wanted {
            if start.elapsed() > limit {
                return Err(not_final());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    } else {
        // Progress on stderr every 10 s, so that a long run shows where it stands.
        while !dispatcher.wait_final(Duration::from_secs(10)) {
            let s = dispatcher.stats();
            eprintln!(
                "bench: {:.0} s: delivered={} deferred={} bounced={} unfinished={} connections_open={}",
                start.elapsed().as_secs_f64(),
                s.delivered,
                s.deferred,
                s.bounced,
                s.in_flight,
                s.connections_open
            );
            if start.elapsed() > limit {
                return Err(not_final());
            }
        }
    }
    let elapsed = start.elapsed();
    let (cpu1, peak_rss_kb) = rusage_self();
    if let Some(spool) = dispatcher.spool_stats() {
        use std::sync::atomic::Ordering::Relaxed;
        let fsyncs = spool.fsyncs.load(Relaxed);
        println!(
            "spool fsyncs={fsyncs} fsyncs_per_s={:.0} messages_per_fsync={:.1} checkpoints={}",
            fsyncs as f64 / elapsed.as_secs_f64(),
            spool.messages.load(Relaxed) as f64 / fsyncs.max(1) as f64,
            spool.checkpoints.load(Relaxed)
        );
    }
    let (measured, at_tarpit) = tally(&dispatcher, tarpit);
    let s = dispatcher.stats();
    let destinations = dispatcher.destination_stats().len();
    if let Some(first) = first_deliveries {
        // Starvation shows as destinations whose first delivery comes late.
        let mut times = first.finish();
        times.sort_unstable();
        let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize].as_secs_f64();
        if !times.is_empty() {
            println!(
                "fairness destinations_served={} first_delivery_s p50={:.1} p99={:.1} max={:.1} of total_s={:.1}",
                times.len(),
                at(0.5),
                at(0.99),
                at(1.0),
                elapsed.as_secs_f64()
            );
        }
    }
    if tarpit.is_some() {
        println!(
            "tarpit messages={tarpit_messages} final={} abandoned={}",
            at_tarpit.finals,
            tarpit_messages - at_tarpit.finals
        );
        // Dropping the dispatcher would wait for the tarpit (shutdown flushes first). A
        // benchmark does not: its messages are abandoned, and the loops end with the process.
        std::mem::forget(dispatcher);
    } else {
        drop(dispatcher);
    }
    drop(sink);
    let cpu = cpu1 - cpu0;
    // Diagnostics on their own line; the result line keeps its fixed form for scripts.
    println!(
        "loop longest_turn_us={} submitted_in_ms={} destinations={destinations} transactions={} connections_per_s={:.0}",
        s.longest_turn_us,
        submitted_in.as_millis(),
        s.transactions,
        s.connections_opened as f64 / elapsed.as_secs_f64()
    );
    println!(
        "result messages={messages} delivered={} msgs_per_s={:.0} cpu_us_per_msg={:.2} peak_rss_kb={peak_rss_kb} connections={}",
        measured.delivered / recipients as u64,
        messages as f64 / elapsed.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / messages as f64,
        s.connections_opened,
    );
    Ok(if measured.delivered == wanted {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The shared bench body with a header naming message `n`: as large, but a body of its own.
fn unique_body(shared: &Body, n: u64) -> Vec<u8> {
    let mut content = format!("X-Bench-Message: {n}\r\n").into_bytes();
    content.extend_from_slice(shared.as_bytes());
    content
}

fn run_demo(recipients: usize) -> CliResult {
    let capture = std::env::temp_dir().join(format!("mxpipe-demo-{}", std::process::id()));
    let sink = Sink::start(SinkConfig {
        capture_dir: Some(capture.clone()),
        ..SinkConfig::default()
    })
    .map_err(|e| format!("sink: {e}"))?;
    println!(
        "built-in sink listening on {} (capturing to {})",
        sink.local_addr(),
        capture.display()
    );
    let dispatcher = Dispatcher::builder()
        .relay(&sink.local_addr().to_string())
        .ehlo_name("demo.mxpipe.example")
        .max_connections_per_destination(8)
        .start()
        .map_err(|e| e.to_string())?;
    let events = dispatcher.events().expect("events are on");
    let start = Instant::now();
    let body = Arc::new(
        Body::new(
            b"From: Newsletter <news@demo.mxpipe.example>\r\nSubject: mxpipe demo newsletter\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello from mxpipe.\r\n.This line starts with a dot and arrives intact.\r\n",
        )
        .map_err(|e| e.to_string())?,
    );
    let sender =
        Address::parse("news@demo.mxpipe.example", mxpipe::error::Field::Sender).expect("valid");
    let all: Vec<Address> = (0..recipients)
        .map(|i| {
            Address::parse(
                &format!("reader{i}@demo.mxpipe.example"),
                mxpipe::error::Field::Recipient(i),
            )
            .expect("valid")
        })
        .collect();
    // One body, many envelopes of 50 recipients each.
    for chunk in all.chunks(50) {
        let m = Message::from_parts(sender.clone(), chunk.to_vec(), Arc::clone(&body))
            .map_err(|e| e.to_string())?;
        dispatcher
            .submit_timeout(m, Duration::from_secs(30))
            .map_err(|e| e.to_string())?;
    }
    let done = dispatcher.wait_final(Duration::from_secs(120));
    let elapsed = start.elapsed();
    let mut by_kind = std::collections::BTreeMap::new();
    let mut sample = None;
    for event in events.try_iter() {
        *by_kind.entry(event.kind.as_str()).or_insert(0u64) += 1;
        if sample.is_none() && event.kind == EventKind::Delivered {
            sample = Some(event_json(&event));
        }
    }
    let s = dispatcher.stats();
    drop(dispatcher);
    let sink_stats = sink.stop();
    println!("outcomes: {by_kind:?}");
    if let Some(sample) = sample {
        println!("first outcome: {sample}");
    }
    println!(
        "sent {} recipients in {} transactions over {} connections in {:.2}s; sink received {} messages for {} recipients",
        s.delivered,
        s.transactions,
        s.connections_opened,
        elapsed.as_secs_f64(),
        sink_stats.messages,
        sink_stats.recipients
    );
    let _ = std::fs::remove_dir_all(&capture);
    Ok(if done && s.delivered == recipients as u64 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
