//! `mxpipe send CAMPAIGN.toml`: load and check a campaign, then send it (or render it with
//! `--dry-run`) and print the summary.
//!
//! This module only drives [`mxpipe::campaign`]; loading, rendering and sending are its.

use super::options::{serve_metrics, Overrides};
use super::{signal, CliResult};
use mxpipe::campaign::{Campaign, SendOptions};
use mxpipe::engine::DispatcherBuilder;
use std::path::PathBuf;
use std::process::ExitCode;

pub(crate) struct CampaignArgs {
    pub(crate) campaign: PathBuf,
    pub(crate) dry_run: Option<PathBuf>,
    pub(crate) report: Option<PathBuf>,
    pub(crate) journal: Option<PathBuf>,
    pub(crate) retry_expired: bool,
    pub(crate) journal_any_campaign: bool,
    pub(crate) quiet: bool,
    pub(crate) json: bool,
    pub(crate) overrides: Overrides,
}

impl Overrides {
    /// The campaign's builder with the command line's settings applied, in the documented
    /// order: the command line over the campaign file over the engine file (`--config`
    /// replacing `limits.engine`).
    fn builder(&self, campaign: &Campaign) -> Result<DispatcherBuilder, String> {
        // Checked here so that an error names --config, not the campaign's limits.engine.
        self.delivery.base_builder()?;
        let engine = self.delivery.config_text()?;
        let route_given = self.relay.is_some() || self.delivery.direct_mx;
        let builder = campaign
            .builder(engine.as_deref(), route_given)
            .map_err(|e| e.to_string())?;
        self.apply(builder)
    }
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
    let resumable = args.journal.is_some();
    let summary = match &args.dry_run {
        Some(dir) => {
            if args.report.is_some()
                || args.journal.is_some()
                || args.retry_expired
                || args.journal_any_campaign
            {
                return Err(
                    "send: --report, --journal, --retry-expired and --journal-any-campaign are \
                     about deliveries; a --dry-run makes none"
                        .into(),
                );
            }
            let summary = campaign.dry_run(dir).map_err(|e| e.to_string())?;
            if let (Some((name, record)), false) = (campaign.dkim_record(), args.quiet) {
                eprintln!("DKIM: publish TXT {name} \"{record}\"");
            }
            summary
        }
        None => {
            let builder = args.overrides.builder(&campaign)?;
            signal::install()?;
            let metrics = args.overrides.delivery.metrics;
            campaign
                .send_with(
                    builder,
                    &SendOptions {
                        report: args.report,
                        journal: args.journal,
                        progress: !args.quiet && !args.json,
                        retry_expired: args.retry_expired,
                        journal_any_campaign: args.journal_any_campaign,
                        stop: Some(&signal::STOP),
                        stop_grace: signal::GRACE,
                    },
                    &|dispatcher| match metrics {
                        Some(addr) => serve_metrics(addr, dispatcher),
                        None => Ok(()),
                    },
                )
                .map_err(|e| e.to_string())?
        }
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
    if summary.interrupted {
        let resume = if resumable {
            "the same command resumes from the journal"
        } else {
            "without --journal a new run starts over"
        };
        eprintln!(
            "mxpipe: interrupted: {} sent in this run had no outcome yet; {resume}",
            summary.not_final
        );
        return Ok(ExitCode::from(signal::INTERRUPTED));
    }
    Ok(if summary.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
