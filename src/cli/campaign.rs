//! `mxpipe send CAMPAIGN.toml`: load and check a campaign, then send it (or render it with
//! `--dry-run`) and print the summary.
//!
//! This module only drives [`mxpipe::campaign`]; loading, rendering and sending are its.

use super::CliResult;
use mxpipe::campaign::{Campaign, SendOptions};
use std::path::PathBuf;
use std::process::ExitCode;

pub(crate) struct CampaignArgs {
    pub(crate) campaign: PathBuf,
    pub(crate) dry_run: Option<PathBuf>,
    pub(crate) report: Option<PathBuf>,
    pub(crate) journal: Option<PathBuf>,
    pub(crate) quiet: bool,
    pub(crate) json: bool,
}

/// `mxpipe send campaign.toml`: load and check everything, then send (or render, with
/// --dry-run); exit 0 when every recipient was delivered, 1 when some were not.
pub(crate) fn run_campaign(args: CampaignArgs) -> CliResult {
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
