//! The README smoke test: every `mxpipe` command line in the README's code blocks (and `cargo
//! run --release -- demo`) is run against servers on loopback, so that none can rot. Each line
//! runs without its `[optional]` parts and once with each of them; the README's addresses
//! (`127.0.0.X:2525`, `127.0.0.1:9464`) are mapped to free ports, `HOST:PORT` and `DIR` to a
//! server and a directory of the test's, and counts are scaled down (`--messages` 200,
//! `--tarpit-messages` 20, `--recipients` 50). `--direct-mx` gets a dnsmasq nameserver, the
//! sink's port and `--mx-allow-loopback`; `redis://127.0.0.1:6379` a redis-server of the test's
//! (and `send --redis` an `mxpipe node` delivering to the sink meanwhile).
//! A command passes when it exits 0 (a daemon: when it says where it listens).

mod util;

use mxpipe::sink::{Sink, SinkConfig, SinkHandle};
use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Every command line in a fenced block of the README: continuations joined, comments cut.
fn readme_commands() -> Vec<String> {
    let readme = fs::read_to_string(util::repo_root().join("README.md")).expect("README.md");
    let mut commands = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in readme.lines() {
        if line.starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if !in_block {
            continue;
        }
        let text = line.split(" #").next().unwrap_or("").trim();
        if pending.is_empty() && !(text.starts_with("mxpipe ") || text.starts_with("cargo run")) {
            continue;
        }
        pending.push_str(text.trim_end_matches('\\').trim());
        pending.push(' ');
        if !text.ends_with('\\') {
            commands.push(pending.trim().to_string());
            pending.clear();
        }
    }
    commands
}

/// The command without its `[...]` groups, then with each group alone.
fn variants(command: &str) -> Vec<Vec<String>> {
    let mut base = Vec::new();
    let mut groups: Vec<Vec<String>> = Vec::new();
    let mut group: Option<Vec<String>> = None;
    for token in command.split_whitespace() {
        let opens = token.starts_with('[');
        let closes = token.ends_with(']');
        let word = token
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        match (&mut group, opens) {
            (None, true) => group = Some(vec![word]),
            (Some(g), _) => g.push(word),
            (None, false) => base.push(word),
        }
        if closes {
            groups.extend(group.take());
        }
    }
    let mut all = vec![base.clone()];
    for g in groups {
        let mut v = base.clone();
        v.extend(g);
        all.push(v);
    }
    all
}

/// The servers and files one command runs against.
struct World {
    dir: std::path::PathBuf,
    sinks: BTreeMap<String, SinkHandle>,
    dns: util::dns::Dnsmasq,
    /// A Redis for the scale-out lines (started on first use).
    redis: Option<util::redis::RedisServer>,
}

impl World {
    fn new() -> World {
        let dir = util::fresh_temp_dir("readme");
        let dns = util::dns::Dnsmasq::builder()
            .mx("example.test", "mx.example.test", 10)
            .host("mx.example.test", "127.0.0.1")
            .start();
        World {
            dir,
            sinks: BTreeMap::new(),
            dns,
            redis: None,
        }
    }

    /// A sink on `ip` (started on first use).
    fn sink(&mut self, ip: &str) -> SocketAddr {
        self.sinks
            .entry(ip.to_string())
            .or_insert_with(|| {
                Sink::start(SinkConfig {
                    listen: format!("{ip}:0").parse().unwrap(),
                    ..SinkConfig::default()
                })
                .expect("sink starts")
            })
            .local_addr()
    }

    /// The world's spool directory.
    fn spool(&self) -> std::path::PathBuf {
        self.dir.join("spool")
    }

    /// A spool holding message 1, whose two recipients were deferred (the relay refuses
    /// connections), for the `queue` lines to look at.
    fn seed_spool(&mut self) {
        let refused = format!("127.0.0.1:{}", util::free_port("127.0.0.1"));
        let args: Vec<String> = [
            "send",
            "--spool",
            &self.spool().display().to_string(),
            "--relay",
            &refused,
            "--from",
            "news@example.org",
            "--to-file",
            "list.txt",
            "message.eml",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Exits 1: the recipients are deferred, not final; the spool keeps them.
        let out = Command::new(env!("CARGO_BIN_EXE_mxpipe"))
            .args(&args)
            .current_dir(&self.dir)
            .output()
            .expect("run mxpipe send --spool");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("spooled id=1 recipients=2"),
            "seeding the spool: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn write_inputs(&mut self) {
        let relay = self.sink("127.0.0.1");
        let w = |name: &str, text: String| fs::write(self.dir.join(name), text).unwrap();
        w("list.txt", "ann@example.test\nbob@example.test\n".into());
        w(
            "message.eml",
            "From: news@example.org\r\nSubject: README\r\n\r\nHello.\r\n".into(),
        );
        w(
            "recipients.csv",
            "email,first_name\nann@example.test,Ann\n".into(),
        );
        w(
            "inbound.toml",
            "suppression = \"suppressed.txt\"\nquarantine = \"quarantine\"\n\
             soft_bounces = \"soft-bounces.jsonl\"\n[[campaign]]\nname = \"digest\"\n\
             return_path = \"bounces-digest+{local}={domain}@news.example.org\"\n\
             outcomes = \"digest-async.jsonl\"\n"
                .into(),
        );
        w(
            "campaign.toml",
            format!(
                "from = \"News <news@example.org>\"\nsubject = \"Hi {{{{first_name}}}}\"\n\
                 text = \"Hello {{{{first_name}}}}.\"\nrecipients = \"recipients.csv\"\n\
                 [delivery]\nrelay = \"{relay}\"\n"
            ),
        );
        let port = util::free_port("127.0.0.1");
        w(
            "serve.toml",
            format!(
                "spool = \"spool\"\n[[listener]]\nprotocol = \"smtp\"\n\
                 address = \"127.0.0.1:{port}\"\nmode = \"custody\"\n\
                 allow_networks = [\"127.0.0.0/8\"]\n[delivery]\nrelay = \"{relay}\"\n"
            ),
        );
    }

    /// The README's words with this world's addresses, directories and smaller counts.
    fn adapt(&mut self, words: &[String], is_sink: bool) -> Vec<String> {
        let mut out = Vec::new();
        let mut scale = None;
        for word in words {
            if let Some(n) = scale.take() {
                out.push(n);
                continue;
            }
            let adapted = match word.as_str() {
                "--messages" => {
                    scale = Some("200".to_string());
                    word.clone()
                }
                "--tarpit-messages" => {
                    scale = Some("20".to_string());
                    word.clone()
                }
                "--recipients" => {
                    scale = Some("50".to_string());
                    word.clone()
                }
                "HOST:PORT" => self.sink("127.0.0.1").to_string(),
                "DIR" => self.dir.join("out").display().to_string(),
                "/var/spool/mxpipe" | "/tmp/spool" => self.spool().display().to_string(),
                "127.0.0.1:9464" | "127.0.0.1:8025" => {
                    format!("127.0.0.1:{}", util::free_port("127.0.0.1"))
                }
                "redis://127.0.0.1:6379" => self
                    .redis
                    .get_or_insert_with(util::redis::RedisServer::start)
                    .url(),
                w if w.starts_with("127.0.0.") && w.ends_with(":2525") => {
                    let ip = w.trim_end_matches(":2525");
                    if is_sink {
                        format!("{ip}:{}", util::free_port(ip))
                    } else {
                        self.sink(ip).to_string()
                    }
                }
                _ => word.clone(),
            };
            out.push(adapted);
        }
        if out.iter().any(|w| w == "--direct-mx") {
            let port = self.sink("127.0.0.1").port();
            out.extend([
                "--nameserver".to_string(),
                self.dns.addr().to_string(),
                "--mx-port".to_string(),
                port.to_string(),
                // The sink is on this machine, which direct MX refuses by default (a loop).
                "--mx-allow-loopback".to_string(),
            ]);
        }
        out
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs a sink command until it says where it listens.
fn run_sink(args: &[String], dir: &Path) -> Result<(), String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mxpipe"))
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    let read = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
    let exited = child.try_wait().ok().flatten();
    kill(child);
    match (read, exited) {
        (Ok(_), None)
            if line.starts_with("mxpipe sink listening on ")
                || line.starts_with("mxpipe serve listening on ")
                || line.starts_with("mxpipe http listening on ")
                || line.starts_with("smtp listening on ") =>
        {
            Ok(())
        }
        _ => Err(format!("printed {line:?}, exited {exited:?}")),
    }
}

/// Runs a command to its end (at most two minutes), with `input` on its standard input.
fn run_to_end(args: &[String], dir: &Path, input: &[u8]) -> Result<(), String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mxpipe"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let _ = child.stdin.take().unwrap().write_all(input);
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if Instant::now() > deadline {
            kill(child);
            return Err("still running after 120 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "exit {:?}\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[test]
fn every_readme_command_line_runs() {
    let commands = readme_commands();
    // The README shows these at least; a parser that finds fewer is broken.
    for expected in [
        "cargo run --release -- demo",
        "mxpipe check",
        "mxpipe config keys",
    ] {
        assert!(
            commands.iter().any(|c| c.starts_with(expected)),
            "{expected:?} not found in {commands:#?}"
        );
    }
    let mut failures = Vec::new();
    let mut ran = 0;
    for command in &commands {
        let command = command.replace("cargo run --release -- ", "mxpipe ");
        let Some(rest) = command.strip_prefix("mxpipe ") else {
            continue;
        };
        for words in variants(rest) {
            let mut world = World::new();
            world.write_inputs();
            if words.first().is_some_and(|w| w == "queue") {
                world.seed_spool();
            }
            // Daemons pass when they say where they listen; `inbound` is a sink of mail too.
            let is_sink = words.first().is_some_and(|w| w == "sink" || w == "inbound");
            let is_daemon = is_sink
                || words.first().is_some_and(|w| w == "http")
                || (words.first().is_some_and(|w| w == "serve")
                    && words.get(1).is_some_and(|w| w == "--config"));
            let args = world.adapt(&words, is_sink);
            // A campaign sent through Redis waits for a node to deliver it.
            let node = (words.first().is_some_and(|w| w == "send"))
                .then(|| args.iter().position(|w| w == "--redis"))
                .flatten()
                .map(|at| {
                    let relay = world.sink("127.0.0.1").to_string();
                    Command::new(env!("CARGO_BIN_EXE_mxpipe"))
                        .args(["node", "--redis", &args[at + 1], "--relay", &relay])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .expect("spawn mxpipe node")
                });
            let result = if is_daemon {
                run_sink(&args, &world.dir)
            } else {
                // `serve hash-password` reads the password from its standard input.
                run_to_end(&args, &world.dir, b"readme-password\n")
            };
            if let Some(node) = node {
                kill(node);
            }
            ran += 1;
            if let Err(e) = result {
                failures.push(format!("mxpipe {}: {e}", args.join(" ")));
            }
        }
    }
    assert!(ran >= 15, "only {ran} command lines ran");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
