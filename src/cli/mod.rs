//! The `mxpipe` command-line tool: one module per command, and [`options`], the one place where
//! delivery options on the command line become a [`mxpipe::engine::DispatcherBuilder`].
//!
//! ```text
//! mxpipe demo                                   # a bulk send to the built-in sink, no setup
//! mxpipe sink --listen 127.0.0.1:2525           # a fast SMTP sink
//! mxpipe serve --config serve.toml              # take mail from an MTA over SMTP/LMTP
//! mxpipe send --relay 127.0.0.1:2525 --from news@example.org --to-file list.txt msg.eml
//! mxpipe send campaign.toml --report report.csv --journal campaign.journal
//! mxpipe send campaign.toml --dry-run rendered/
//! mxpipe bench --messages 200000 --size 2048 --connections 20
//! mxpipe send --direct-mx --from news@example.org --to-file list.txt msg.eml --metrics 127.0.0.1:9464
//! ```
//!
//! This module parses the command line and hands each command to its module; it must not
//! deliver anything itself.

mod bench;
mod campaign;
mod check;
mod demo;
mod http;
mod inbound;
mod keys;
mod node;
mod options;
mod send;
mod serve;
mod signal;
mod sink;

use clap::{Parser, Subcommand};
use mxpipe::engine::Event;
use options::DeliveryArgs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

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

#[derive(Subcommand)]
enum Command {
    /// Run a fast SMTP sink (PIPELINING, CHUNKING, 8BITMIME, SIZE) until killed.
    Sink {
        /// Address to listen on, HOST[:PORT] (port 2525 by default; port 0 picks one; the
        /// address is printed). Repeat it to serve several addresses from one sink, as one
        /// host with several addresses would.
        #[arg(
            long,
            default_value = "127.0.0.1:2525",
            value_name = "HOST[:PORT]",
            value_parser = listen_addr
        )]
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
        /// The smarthost, host:port (a campaign: replaces delivery.relay).
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
        /// Campaign: send again to recipients the journal has as expired (after a relay was
        /// down, say); without it they are final and counted as "already final".
        #[arg(long)]
        retry_expired: bool,
        /// Campaign: use a journal written for another campaign (another campaign file,
        /// recipients or templates); refused without it.
        #[arg(long)]
        journal_any_campaign: bool,
        /// Campaign: no progress bar, no warnings about skipped rows, no summary table.
        #[arg(long)]
        quiet: bool,
        /// Campaign: print the summary as one JSON object.
        #[arg(long)]
        json: bool,
        /// Connections per destination at most (default 20; a campaign: replaces
        /// limits.connections).
        #[arg(long)]
        connections: Option<usize>,
        /// The name sent in EHLO (default localhost; a campaign: replaces
        /// delivery.ehlo_name).
        #[arg(long)]
        ehlo_name: Option<String>,
        /// Write one line per recipient outcome here (campaign: CSV for a .csv name, JSON Lines
        /// otherwise; message mode: JSON Lines).
        #[arg(long)]
        report: Option<PathBuf>,
        /// Keep retrying deferred recipients until they are final (up to --max-age); a
        /// campaign always does.
        #[arg(long)]
        wait_final: bool,
        /// Give up on a recipient after this many seconds of temporary failures (default 3
        /// days; a campaign: replaces limits.max_age_secs).
        #[arg(long)]
        max_age: Option<u64>,
        /// First retry after this many seconds (default 300; doubling, with jitter; a
        /// campaign: replaces limits.retry_after_secs).
        #[arg(long)]
        retry_after: Option<u64>,
        #[command(flatten)]
        delivery: DeliveryArgs,
        #[command(flatten)]
        redis: campaign::CampaignRedisArgs,
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
        /// Every message gets recipients of its own, built before the clock starts (default:
        /// every message goes to the same --recipients addresses): --messages 1000
        /// --recipients 1000 is then one body to 1,000,000 different recipients.
        #[arg(long)]
        distinct_recipients: bool,
        #[command(flatten)]
        delivery: DeliveryArgs,
    },
    /// Take messages over HTTP (POST /v1/messages, JSON) and deliver them; GET /metrics.
    /// With --spool, a message is acknowledged (202) once fsynced.
    Http {
        /// Address to listen on, HOST[:PORT] (port 8025 by default; port 0 picks one; the
        /// address is printed).
        #[arg(long, value_name = "HOST[:PORT]", value_parser = http::listen_addr)]
        listen: SocketAddr,
        /// The smarthost, host:port (or --direct-mx).
        #[arg(long)]
        relay: Option<String>,
        /// The name this host gives in EHLO (and in DSN reports).
        #[arg(long)]
        ehlo_name: Option<String>,
        #[command(flatten)]
        delivery: DeliveryArgs,
    },
    /// Queue tools on a spool no process holds: list, show ID, retry [ID|--all], delete ID,
    /// stats.
    Queue(mxpipe::spool::admin::QueueArgs),
    /// Ask each address's mail server whether it would take mail for it (VRFY, else MAIL,
    /// RCPT and RSET); nothing is sent. Prints deliverable, rejected, catch-all or unknown.
    Check(check::CheckArgs),
    /// Receive bounces, feedback reports and unsubscribes (SMTP, and RFC 8058 one-click POSTs
    /// over HTTP) for the campaigns in --config; suppress and record them.
    Inbound(inbound::InboundArgs),
    /// Engine files: `mxpipe config keys` prints every key, the exit codes and the order in
    /// which settings override each other.
    Config {
        #[command(subcommand)]
        what: Reference,
    },
    /// Campaign files: `mxpipe campaign keys` prints every key, the report's columns, the exit
    /// codes and the order in which settings override each other.
    Campaign {
        #[command(subcommand)]
        what: Reference,
    },
    /// A real bulk send of a generated newsletter to the built-in sink, with no setup.
    Demo {
        #[arg(long, default_value_t = 10_000)]
        recipients: usize,
    },
    /// Take mail from existing MTAs over SMTP or LMTP and deliver it (custody or pass-through).
    Serve(serve::ServeArgs),
    /// Deliver work from a Redis stream with the local engine, beside other nodes: shared work,
    /// deferrals and outcomes (README "Scale-out through Redis").
    Node {
        #[command(flatten)]
        node: node::NodeArgs,
        /// The smarthost, host:port.
        #[arg(long)]
        relay: Option<String>,
        /// Connections per destination at most (default 20).
        #[arg(long)]
        connections: Option<usize>,
        #[command(flatten)]
        delivery: DeliveryArgs,
    },
    /// Put a message for a list of recipients into Redis as work for `mxpipe node`, its body
    /// stored once.
    Enqueue(node::EnqueueArgs),
    /// Internal: a built-in sink for `bench`, printing its address on the first line.
    #[command(hide = true)]
    BenchSink {
        #[arg(long)]
        tls: bool,
    },
}

/// What `config` and `campaign` print.
#[derive(Subcommand)]
enum Reference {
    /// Every key, generated from the code.
    Keys,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Sink {
            listen,
            capture,
            no_chunking,
            no_pipelining,
            reply_delay_ms,
        } => sink::run_sink(sink::SinkArgs {
            listen,
            capture,
            chunking: !no_chunking,
            pipelining: !no_pipelining,
            reply_delay: reply_delay_ms.map(Duration::from_millis),
        }),
        Command::Send {
            relay,
            from: None,
            to_file: None,
            message,
            dry_run,
            journal,
            retry_expired,
            journal_any_campaign,
            quiet,
            json,
            report,
            connections,
            ehlo_name,
            wait_final: _,
            max_age,
            retry_after,
            delivery,
            redis,
        } if message
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("toml")) =>
        {
            // --wait-final is what a campaign always does.
            campaign::run_campaign(campaign::CampaignArgs {
                campaign: message,
                dry_run,
                report,
                journal,
                retry_expired,
                journal_any_campaign,
                quiet,
                json,
                overrides: options::Overrides {
                    relay,
                    connections,
                    ehlo_name,
                    max_age: max_age.map(Duration::from_secs),
                    retry_after: retry_after.map(Duration::from_secs),
                    delivery,
                },
                redis,
            })
        }
        Command::Send {
            relay,
            from: Some(from),
            to_file: Some(to_file),
            message,
            dry_run: None,
            journal: None,
            retry_expired: false,
            journal_any_campaign: false,
            quiet: false,
            json: false,
            connections,
            ehlo_name,
            report,
            wait_final,
            max_age,
            retry_after,
            delivery,
            redis,
        } if !redis.is_given()
            && (relay.is_some() || delivery.direct_mx || delivery.config.is_some()) =>
        {
            send::run_send(send::SendArgs {
                from,
                to_file,
                message,
                report,
                wait_final,
                overrides: options::Overrides {
                    relay,
                    connections,
                    ehlo_name,
                    max_age: max_age.map(Duration::from_secs),
                    retry_after: retry_after.map(Duration::from_secs),
                    delivery,
                },
            })
        }
        Command::Send {
            from: Some(_),
            to_file: Some(_),
            dry_run: None,
            journal: None,
            retry_expired: false,
            journal_any_campaign: false,
            quiet: false,
            json: false,
            redis,
            ..
        } if !redis.is_given() => {
            Err("send: a message needs --relay HOST:PORT or --direct-mx".into())
        }
        Command::Send {
            from: Some(_),
            to_file: Some(_),
            ..
        } => Err(
            "send: --dry-run, --journal, --retry-expired, --journal-any-campaign, --quiet, \
             --json and --redis are for campaign files; a message sent with \
             --relay/--from/--to-file takes none of them (`mxpipe enqueue` puts one into Redis)"
                .into(),
        ),
        Command::Send {
            message,
            from,
            to_file,
            ..
        } if (from.is_some() || to_file.is_some())
            && message
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("toml")) =>
        {
            Err(format!(
                "send: {} is a campaign file, which names its sender and recipients itself; \
                 --from and --to-file are for sending a ready message",
                message.display()
            ))
        }
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
            distinct_recipients,
            delivery,
        } => bench::run_bench(bench::BenchArgs {
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
            distinct_recipients,
            delivery,
        }),
        Command::Http {
            listen,
            relay,
            ehlo_name,
            delivery,
        } => http::run_http(
            listen,
            options::Overrides {
                relay,
                connections: None,
                ehlo_name,
                max_age: None,
                retry_after: None,
                delivery,
            },
        ),
        Command::Queue(args) => mxpipe::spool::admin::run_cli(args).map(|()| ExitCode::SUCCESS),
        Command::Check(args) => check::run_check(args),
        Command::Inbound(args) => inbound::run_inbound(args),
        Command::Config {
            what: Reference::Keys,
        } => keys::config_keys(),
        Command::Campaign {
            what: Reference::Keys,
        } => keys::campaign_keys(),
        Command::Demo { recipients } => demo::run_demo(recipients),
        Command::Node {
            node,
            relay,
            connections,
            delivery,
        } => node::run_node(
            node,
            options::Overrides {
                relay,
                connections,
                ehlo_name: None,
                max_age: None,
                retry_after: None,
                delivery,
            },
        ),
        Command::Enqueue(args) => node::run_enqueue(args),
        Command::BenchSink { tls } => sink::run_bench_sink(tls),
        Command::Serve(args) => serve::run_serve(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mxpipe: {e}");
            ExitCode::from(2)
        }
    }
}

pub(crate) type CliResult = Result<ExitCode, String>;

/// Where `sink --listen` listens: port 2525 unless given.
fn listen_addr(value: &str) -> Result<SocketAddr, String> {
    options::host_port(value, 2525)
}

/// One outcome's report fields, in sorted order (the order of [`event_value`]'s map).
#[derive(serde::Serialize)]
struct EventLine<'a> {
    attempts: u32,
    code: u16,
    destination: &'a str,
    elapsed_ms: u64,
    enhanced: Option<String>,
    message_id: u64,
    recipient: &'a str,
    retry_after_s: Option<f64>,
    status: &'static str,
    text: &'a str,
    tls: Option<&'static str>,
    tls_policy: Option<&'static str>,
    tls_verified: Option<bool>,
}

impl<'a> EventLine<'a> {
    fn of(e: &'a Event) -> Self {
        EventLine {
            attempts: e.attempts,
            code: e.reply.code,
            destination: &e.destination,
            elapsed_ms: e.elapsed.as_millis() as u64,
            enhanced: e.reply.enhanced.map(|c| c.to_string()),
            message_id: e.message_id,
            recipient: e.recipient.as_str(),
            retry_after_s: e.retry_after.map(|d| d.as_secs_f64()),
            status: e.kind.as_str(),
            text: &e.reply.text,
            tls: e.tls.map(|t| t.version.unwrap_or("plaintext")),
            tls_policy: e.tls.map(|t| t.policy.as_str()),
            tls_verified: e.tls.and_then(|t| t.version.map(|_| t.verified)),
        }
    }
}

/// One outcome as a JSON line for reports, written without building a map first (a report
/// may get a million of them).
pub(crate) fn event_json(e: &Event) -> String {
    serde_json::to_string(&EventLine::of(e)).expect("a struct of strings and numbers serializes")
}

/// One outcome as a JSON object: the report line's fields.
pub(crate) fn event_value(e: &Event) -> serde_json::Value {
    serde_json::to_value(EventLine::of(e)).expect("a struct of strings and numbers serializes")
}

/// Thousands of connections need thousands of descriptors: lift the soft limit to the hard one
/// (the child sink inherits it).
pub(crate) fn raise_fd_limit() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use mxpipe::engine::{EventKind, TlsPolicy, TlsUse};
    use mxpipe::message::Address;
    use mxpipe::smtp::{EnhancedCode, Reply};
    use std::sync::Arc;

    fn event(tls: Option<TlsUse>, retry_after: Option<Duration>) -> Event {
        Event {
            kind: EventKind::Deferred,
            message_id: 7,
            tag: 0,
            recipient: Address::parse("kim@example.org", mxpipe::error::Field::Recipient(0))
                .expect("valid"),
            reply: Arc::new(Reply::new(
                451,
                Some(EnhancedCode::new(4, 3, 0)),
                "try \"later\"\nsecond line",
            )),
            destination: Arc::from("mx.example.org:25"),
            attempts: 2,
            retry_after,
            category: None,
            elapsed: Duration::from_millis(1500),
            tls,
        }
    }

    #[test]
    fn event_json_is_the_event_value_line() {
        let tls = TlsUse {
            version: Some("TLSv1.3"),
            verified: true,
            policy: TlsPolicy::Opportunistic,
        };
        for e in [
            event(None, None),
            event(Some(tls), Some(Duration::from_millis(2500))),
        ] {
            assert_eq!(event_json(&e), event_value(&e).to_string());
        }
    }
}
