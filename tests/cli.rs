//! The `mxpipe` binary as a user drives it: each test runs the built command line against real
//! servers on loopback (Postfix's `smtp-sink`, mxpipe's own sink for scripted faults) and
//! checks what a user would: the exit code, the summary and errors printed, the report and
//! journal files, and what arrived.

mod util;

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output};

/// A directory of inputs, removed on drop.
struct Dir {
    dir: PathBuf,
}

impl Dir {
    fn new(label: &str) -> Dir {
        Dir {
            dir: util::fresh_temp_dir(label),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn write(&self, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path(name);
        fs::write(&path, content).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    fn read(&self, name: &str) -> String {
        let path = self.path(name);
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn mxpipe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mxpipe"))
}

fn run(command: &mut Command) -> Output {
    command.output().expect("run mxpipe")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A campaign of `recipients` (one address a row) relayed to `relay`.
fn campaign(d: &Dir, relay: &str, recipients: &[&str]) -> PathBuf {
    let mut csv = String::from("email,first_name\n");
    for r in recipients {
        csv.push_str(&format!("{r},Reader\n"));
    }
    d.write("recipients.csv", csv);
    d.write(
        "campaign.toml",
        format!(
            "from = \"News <news@example.org>\"\n\
             subject = \"Hello {{{{first_name}}}}\"\n\
             text = \"Hi {{{{first_name}}}}.\"\n\
             recipients = \"recipients.csv\"\n\
             [delivery]\n\
             relay = \"{relay}\"\n"
        ),
    )
}

/// Report lines (JSON Lines) as values.
fn report_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

fn statuses(report: &[serde_json::Value]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = report
        .iter()
        .map(|o| {
            (
                o["recipient"].as_str().unwrap().to_string(),
                o["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Defect 1: a campaign honours the delivery options of the command line, over its own file.
#[test]
fn campaign_send_honours_command_line_delivery_options() {
    let d = Dir::new("cli-campaign-options");
    let sink = util::SmtpSink::start_dumping("127.0.0.1", &[]);
    let file = campaign(&d, &sink.addr().to_string(), &["ann@example.net"]);

    // smtp-sink offers no STARTTLS: under --starttls required nothing may go out.
    let out = run(mxpipe()
        .arg("send")
        .arg(&file)
        .args([
            "--starttls",
            "required",
            "--max-age",
            "1",
            "--retry-after",
            "1",
        ])
        .arg("--report")
        .arg(d.path("required.jsonl"))
        .arg("--quiet"));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        statuses(&report_lines(&d.read("required.jsonl"))),
        [("ann@example.net".to_string(), "expired".to_string())]
    );
    assert!(sink.dumps().is_empty(), "nothing may arrive in plaintext");

    // --ehlo-name replaces the default; the message arrives.
    let out = run(mxpipe().arg("send").arg(&file).args([
        "--ehlo-name",
        "cli.example.org",
        "--connections",
        "1",
    ]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("{:<16}{:>12}\n", "delivered", 1)),
        "{}",
        stdout(&out)
    );
    let dumps = sink.dumps();
    assert_eq!(dumps.len(), 1);
    assert_eq!(dumps[0].helo_args.as_deref(), Some("cli.example.org"));

    // What makes no sense for a campaign is refused, not ignored.
    let out = run(mxpipe()
        .arg("send")
        .arg(&file)
        .args(["--from", "x@example.org"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--from"), "{}", stderr(&out));
}
