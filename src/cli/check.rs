//! `mxpipe check ADDRESS...`: asks each address's mail server whether it would take mail for
//! it, the way list-cleaning tools do, without sending any. Per server one connection: EHLO
//! (HELO when refused), then per address `VRFY` (RFC 5321 3.5.3), and where the server does not
//! answer it usefully (252, 502, a refusal that is not about the address) `MAIL FROM`,
//! `RCPT TO` and a second `RCPT TO` of an address that cannot exist (accepted too: a catch-all
//! domain), then `RSET`; `QUIT` at the end. DATA is never sent.
//!
//! Verdicts: `deliverable` (VRFY 250/251, or RCPT accepted and the made-up address refused),
//! `rejected` (VRFY or RCPT refused permanently), `catch-all` (every address accepted: the
//! answer says nothing), `unknown` (a temporary refusal, no server reachable, a lookup failure).
//! Checks are paced (`--per-second`) so as not to look like a dictionary attack. This module
//! must not send content.

use super::options::{host_port, nameserver_addr};
use super::CliResult;
use clap::Args;
use mxpipe::error::Field;
use mxpipe::message::Address;
use mxpipe::route::mx::{MxAnswer, MxConfig, MxResolver, Resolution};
use mxpipe::smtp::command;
use mxpipe::smtp::reply::{Reply, ReplyLimits, ReplyParser};
use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub(crate) struct CheckArgs {
    /// The addresses to check.
    #[arg(required = true, value_name = "ADDRESS")]
    addresses: Vec<String>,
    /// Ask this server, HOST[:PORT] (port 25 by default), instead of each domain's MX hosts.
    #[arg(long, value_name = "HOST[:PORT]")]
    server: Option<String>,
    /// Ask these DNS servers for MX records, HOST[:PORT] (port 53 by default; default: the
    /// system's).
    #[arg(long, value_name = "ADDR", value_parser = nameserver_addr)]
    nameserver: Vec<SocketAddr>,
    /// The SMTP port of MX hosts.
    #[arg(long, default_value_t = 25)]
    mx_port: u16,
    /// Ask MX hosts on this machine (loopback, 0.0.0.0, its own addresses) too; without it
    /// such a domain is reported as a mail loop.
    #[arg(long)]
    mx_allow_loopback: bool,
    /// The sender of the MAIL FROM probe ("" for the null sender, the default).
    #[arg(long, default_value = "")]
    from: String,
    /// The name sent in EHLO.
    #[arg(long, default_value = "localhost")]
    ehlo_name: String,
    /// At most this many addresses checked per second.
    #[arg(long, default_value_t = 2.0)]
    per_second: f64,
    /// How long one reply may take, in seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// One JSON object per address instead of a line of text.
    #[arg(long)]
    json: bool,
}

/// What the server said about one address.
#[derive(Debug, Clone)]
struct Verdict {
    address: String,
    verdict: &'static str,
    /// `VRFY`, `RCPT`, or empty when no server answered.
    method: &'static str,
    server: String,
    code: u16,
    enhanced: String,
    text: String,
}

pub(crate) fn run_check(args: CheckArgs) -> CliResult {
    if !(args.per_second > 0.0 && args.per_second.is_finite()) {
        return Err("--per-second must be a number above 0".into());
    }
    let sender = if args.from.is_empty() {
        Address::null()
    } else {
        Address::parse(&args.from, Field::Sender).map_err(|e| format!("--from: {e}"))?
    };
    let mut by_domain: BTreeMap<String, Vec<Address>> = BTreeMap::new();
    let mut verdicts = Vec::new();
    for (i, text) in args.addresses.iter().enumerate() {
        match Address::parse(text, Field::Recipient(i)) {
            Ok(a) => by_domain
                .entry(a.domain().to_ascii_lowercase())
                .or_default()
                .push(a),
            Err(mxpipe::Error::InvalidAddress { problem, .. }) => verdicts.push(
                Verdict::without_server(text, "rejected", format!("not an address: {problem}")),
            ),
            Err(e) => verdicts.push(Verdict::without_server(text, "rejected", e.to_string())),
        }
    }
    let server = args
        .server
        .as_deref()
        .map(|s| host_port(s, 25).map_err(|e| format!("--server: {e}")))
        .transpose()?;
    let resolver = match server {
        Some(_) => None,
        None => Some(Resolver::start(&args)?),
    };
    let mut pace = Pace::new(args.per_second);
    for (domain, addresses) in by_domain {
        let servers = match (server, &resolver) {
            (Some(s), _) => vec![s],
            (None, Some(r)) => match r.hosts(&domain) {
                Ok(servers) => servers,
                Err((verdict, text)) => {
                    for a in &addresses {
                        verdicts.push(Verdict::without_server(a.as_str(), verdict, text.clone()));
                    }
                    continue;
                }
            },
            (None, None) => unreachable!("a resolver is started without --server"),
        };
        verdicts.extend(check_domain(
            &args, &sender, &domain, &addresses, &servers, &mut pace,
        ));
    }
    let order = |v: &Verdict| args.addresses.iter().position(|a| *a == v.address);
    verdicts.sort_by_key(order);
    for v in &verdicts {
        if args.json {
            println!("{}", v.json());
        } else {
            println!("{}", v.line());
        }
    }
    let all_good = verdicts
        .iter()
        .all(|v| matches!(v.verdict, "deliverable" | "catch-all"));
    Ok(if all_good {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

impl Verdict {
    fn without_server(address: &str, verdict: &'static str, text: String) -> Verdict {
        Verdict {
            address: address.to_string(),
            verdict,
            method: "",
            server: String::new(),
            code: 0,
            enhanced: String::new(),
            text,
        }
    }

    fn from_reply(
        address: &Address,
        verdict: &'static str,
        method: &'static str,
        server: SocketAddr,
        reply: &Reply,
    ) -> Verdict {
        Verdict {
            address: address.as_str().to_string(),
            verdict,
            method,
            server: server.to_string(),
            code: reply.code,
            enhanced: reply.enhanced.map(|e| e.to_string()).unwrap_or_default(),
            text: reply.text.replace('\n', " "),
        }
    }

    fn line(&self) -> String {
        let mut line = format!("{} {}", self.address, self.verdict);
        if self.code != 0 {
            line.push_str(&format!(" {}", self.code));
        }
        if !self.enhanced.is_empty() {
            line.push_str(&format!(" {}", self.enhanced));
        }
        line.push_str(&format!(" {}", self.text));
        if !self.method.is_empty() {
            line.push_str(&format!(" ({} at {})", self.method, self.server));
        }
        line
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "address": self.address,
            "verdict": self.verdict,
            "method": self.method,
            "server": self.server,
            "code": self.code,
            "enhanced": self.enhanced,
            "text": self.text,
        })
    }
}

/// At most `per_second` checks a second.
struct Pace {
    interval: Duration,
    next: Instant,
}

impl Pace {
    fn new(per_second: f64) -> Pace {
        Pace {
            interval: Duration::from_secs_f64(1.0 / per_second),
            next: Instant::now(),
        }
    }

    fn wait(&mut self) {
        let now = Instant::now();
        if self.next > now {
            std::thread::sleep(self.next - now);
        }
        self.next = self.next.max(now) + self.interval;
    }
}

/// MX lookups through the engine's resolver.
struct Resolver {
    resolver: MxResolver,
    answers: crossbeam_channel::Receiver<MxAnswer>,
    // The resolver wakes this after each answer; nobody polls it.
    _poll: mio::Poll,
}

impl Resolver {
    fn start(args: &CheckArgs) -> Result<Resolver, String> {
        let poll = mio::Poll::new().map_err(|e| format!("check: {e}"))?;
        let waker = Arc::new(
            mio::Waker::new(poll.registry(), mio::Token(0)).map_err(|e| format!("check: {e}"))?,
        );
        let config = MxConfig {
            nameservers: (!args.nameserver.is_empty()).then(|| args.nameserver.clone()),
            smtp_port: args.mx_port,
            allow_loopback: args.mx_allow_loopback,
            ..MxConfig::default()
        };
        let (resolver, answers) =
            MxResolver::start(config, waker).map_err(|e| format!("check: DNS: {e}"))?;
        Ok(Resolver {
            resolver,
            answers,
            _poll: poll,
        })
    }

    /// The addresses of a domain's MX hosts in the order to try, or a verdict and why.
    fn hosts(&self, domain: &str) -> Result<Vec<SocketAddr>, (&'static str, String)> {
        let key = MxResolver::domain_key(domain);
        self.resolver.resolve(domain);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.answers.recv_timeout(left) {
                Ok((k, resolution, _expires)) if k == key => {
                    return match resolution {
                        Resolution::Hosts(hosts) => {
                            Ok(hosts.iter().flat_map(|h| h.addrs.clone()).collect())
                        }
                        Resolution::NullMx => Err((
                            "rejected",
                            format!("{domain} accepts no mail (null MX, RFC 7505)"),
                        )),
                        Resolution::LoopsBack => Err((
                            "unknown",
                            format!(
                                "mail for {domain} loops back to myself (its MX is this machine)"
                            ),
                        )),
                        Resolution::NoSuchDomain(text) => Err(("rejected", text)),
                        Resolution::TempFail(text) | Resolution::MtaStsRefused(text) => {
                            Err(("unknown", text))
                        }
                    };
                }
                Ok(_) => {}
                Err(_) => return Err(("unknown", format!("{domain}: no DNS answer in time"))),
            }
        }
    }
}

/// Checks a domain's addresses at the first of `servers` that answers.
fn check_domain(
    args: &CheckArgs,
    sender: &Address,
    domain: &str,
    addresses: &[Address],
    servers: &[SocketAddr],
    pace: &mut Pace,
) -> Vec<Verdict> {
    let mut last_error = String::from("no server to ask");
    for &server in servers {
        match Conversation::open(server, args) {
            Ok(mut c) => {
                let verdicts = addresses
                    .iter()
                    .map(|a| {
                        pace.wait();
                        c.check(a, sender, domain).unwrap_or_else(|e| {
                            Verdict::without_server(a.as_str(), "unknown", format!("{server}: {e}"))
                        })
                    })
                    .collect();
                c.quit();
                return verdicts;
            }
            Err(e) => last_error = format!("{server}: {e}"),
        }
    }
    addresses
        .iter()
        .map(|a| Verdict::without_server(a.as_str(), "unknown", last_error.clone()))
        .collect()
}

/// One SMTP connection, one command at a time.
struct Conversation {
    server: SocketAddr,
    stream: TcpStream,
    parser: ReplyParser,
    replies: VecDeque<Reply>,
    /// The server answered VRFY in a way that says it will not help.
    vrfy_useless: bool,
    /// Per domain: whether the server accepted an address that cannot exist.
    catch_all: BTreeMap<String, bool>,
}

impl Conversation {
    fn open(server: SocketAddr, args: &CheckArgs) -> Result<Conversation, String> {
        let timeout = Duration::from_secs(args.timeout.max(1));
        let stream = TcpStream::connect_timeout(&server, timeout).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(|e| e.to_string())?;
        let mut c = Conversation {
            server,
            stream,
            parser: ReplyParser::new(ReplyLimits::default()),
            replies: VecDeque::new(),
            vrfy_useless: false,
            catch_all: BTreeMap::new(),
        };
        let greeting = c.read()?;
        if greeting.code != 220 {
            return Err(format!("greeting {} {}", greeting.code, greeting.text));
        }
        let mut out = Vec::new();
        command::ehlo(&mut out, &args.ehlo_name);
        let ehlo = c.ask(&out)?;
        if !ehlo.is_positive() {
            out.clear();
            command::helo(&mut out, &args.ehlo_name);
            let helo = c.ask(&out)?;
            if !helo.is_positive() {
                return Err(format!("HELO {} {}", helo.code, helo.text));
            }
        }
        Ok(c)
    }

    fn read(&mut self) -> Result<Reply, String> {
        let mut buffer = [0u8; 4096];
        loop {
            if let Some(reply) = self.replies.pop_front() {
                return Ok(reply);
            }
            let n = self.stream.read(&mut buffer).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("the server closed the connection".into());
            }
            self.parser
                .feed(&buffer[..n], &mut self.replies)
                .map_err(|e| e.to_string())?;
        }
    }

    fn ask(&mut self, line: &[u8]) -> Result<Reply, String> {
        self.stream.write_all(line).map_err(|e| e.to_string())?;
        self.read()
    }

    fn check(
        &mut self,
        address: &Address,
        sender: &Address,
        domain: &str,
    ) -> Result<Verdict, String> {
        if !self.vrfy_useless {
            let reply = self.ask(format!("VRFY {}\r\n", address.as_str()).as_bytes())?;
            let about_address = reply.enhanced.is_some_and(|e| e.subject == 1)
                || (reply.enhanced.is_none() && matches!(reply.code, 550 | 551 | 553));
            match reply.code {
                250 | 251 => {
                    return Ok(Verdict::from_reply(
                        address,
                        "deliverable",
                        "VRFY",
                        self.server,
                        &reply,
                    ))
                }
                550 | 551 | 553 if about_address => {
                    return Ok(Verdict::from_reply(
                        address,
                        "rejected",
                        "VRFY",
                        self.server,
                        &reply,
                    ))
                }
                // 252: cannot verify, but will take mail: only RCPT tells. Anything else
                // (502 disabled, a policy refusal) will not change for the next address.
                252 => {}
                _ => self.vrfy_useless = true,
            }
        }
        let mut out = Vec::new();
        command::mail_from(&mut out, sender, Default::default(), None);
        let mail = self.ask(&out)?;
        if !mail.is_positive() {
            self.reset()?;
            let verdict = if mail.is_transient() {
                "unknown"
            } else {
                "rejected"
            };
            return Ok(Verdict::from_reply(
                address,
                verdict,
                "MAIL",
                self.server,
                &mail,
            ));
        }
        out.clear();
        command::rcpt_to(&mut out, address, None);
        let rcpt = self.ask(&out)?;
        let verdict = if rcpt.is_positive() {
            if self.accepts_anything(domain)? {
                "catch-all"
            } else {
                "deliverable"
            }
        } else if rcpt.is_permanent() {
            "rejected"
        } else {
            "unknown"
        };
        self.reset()?;
        Ok(Verdict::from_reply(
            address,
            verdict,
            "RCPT",
            self.server,
            &rcpt,
        ))
    }

    /// Whether the server takes an address at `domain` that cannot exist (asked once per
    /// domain, inside the open transaction).
    fn accepts_anything(&mut self, domain: &str) -> Result<bool, String> {
        if let Some(&known) = self.catch_all.get(domain) {
            return Ok(known);
        }
        let made_up = format!("mxpipe-check-{:016x}@{domain}", fastrand::u64(..));
        let made_up = Address::parse(&made_up, Field::Recipient(0)).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        command::rcpt_to(&mut out, &made_up, None);
        let accepted = self.ask(&out)?.is_positive();
        self.catch_all.insert(domain.to_string(), accepted);
        Ok(accepted)
    }

    fn reset(&mut self) -> Result<(), String> {
        let mut out = Vec::new();
        command::rset(&mut out);
        self.ask(&out).map(|_| ())
    }

    fn quit(mut self) {
        let mut out = Vec::new();
        command::quit(&mut out);
        let _ = self.ask(&out);
    }
}
