//! `mxpipe send CAMPAIGN.toml`: load and check a campaign, then send it (or render it with
//! `--dry-run`, or hand it to `mxpipe node`s with `--redis`) and print the summary.
//!
//! This module only drives [`mxpipe::campaign`]; loading, rendering and sending are its.

use super::options::{serve_metrics, Overrides};
use super::{signal, CliResult};
use clap::Args;
use mxpipe::campaign::{Campaign, RedisTarget, SendOptions};
use mxpipe::cluster::Target;
use mxpipe::engine::DispatcherBuilder;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// `send CAMPAIGN.toml --redis URL`: the campaign's messages go to `mxpipe node`s.
#[derive(Args, Clone, Debug, Default)]
pub(crate) struct CampaignRedisArgs {
    /// Campaign: put every message into this Redis's work stream for `mxpipe node`s instead of
    /// sending it, and build the report from the outcomes stream (redis://HOST:PORT/DB; with
    /// --cluster, a seed node, repeat for several).
    #[arg(long = "redis", value_name = "URL")]
    pub(crate) urls: Vec<String>,
    /// With --redis: the URLs are nodes of a Redis Cluster.
    #[arg(long)]
    pub(crate) cluster: bool,
    /// With --redis: the hash tag of every key, as the nodes' --namespace (default mxpipe).
    #[arg(long)]
    pub(crate) namespace: Option<String>,
    /// With --redis: stop waiting for outcomes after this many seconds (what is not final
    /// stays in Redis for the nodes; with --journal the same command waits for it again).
    #[arg(long, value_name = "SECS")]
    pub(crate) deadline: Option<f64>,
}

impl CampaignRedisArgs {
    pub(crate) fn is_given(&self) -> bool {
        !self.urls.is_empty() || self.cluster || self.namespace.is_some() || self.deadline.is_some()
    }

    fn target(&self) -> Result<Option<RedisTarget>, String> {
        if self.urls.is_empty() {
            return match self.is_given() {
                true => Err("send: --cluster, --namespace and --deadline go with --redis".into()),
                false => Ok(None),
            };
        }
        let deadline = self
            .deadline
            .map(|d| {
                Duration::try_from_secs_f64(d)
                    .map_err(|_| format!("--deadline: {d} is not a number of seconds"))
            })
            .transpose()?;
        Ok(Some(RedisTarget {
            target: Target {
                urls: self.urls.clone(),
                cluster: self.cluster,
            },
            namespace: self.namespace.clone().unwrap_or_else(|| "mxpipe".into()),
            deadline,
        }))
    }
}

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
    pub(crate) redis: CampaignRedisArgs,
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
    let redis = args.redis.target()?;
    let options = SendOptions {
        report: args.report.clone(),
        journal: args.journal.clone(),
        progress: !args.quiet && !args.json,
        retry_expired: args.retry_expired,
        journal_any_campaign: args.journal_any_campaign,
        stop: Some(&signal::STOP),
        stop_grace: signal::GRACE,
    };
    let summary = match (&args.dry_run, redis) {
        (Some(_), Some(_)) => {
            return Err("send: --dry-run renders the messages here; --redis sends them".into())
        }
        (None, Some(redis)) => {
            if args.overrides.relay.is_some() || args.overrides.delivery.direct_mx {
                return Err(
                    "send: with --redis the nodes deliver: give --relay or --direct-mx \
                            to `mxpipe node`"
                        .into(),
                );
            }
            signal::install()?;
            campaign
                .send_through_redis(&redis, &options)
                .map_err(|e| e.to_string())?
        }
        (Some(dir), None) => {
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
        (None, None) => {
            let builder = args.overrides.builder(&campaign)?;
            signal::install()?;
            let metrics = args.overrides.delivery.metrics;
            campaign
                .send_with(builder, &options, &|dispatcher| match metrics {
                    Some(addr) => serve_metrics(addr, dispatcher),
                    None => Ok(()),
                })
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
