//! MTA-STS in the MX resolver (RFC 8461 sections 3 to 5): the `_mta-sts` TXT record is asked
//! beside the MX records, the policy is fetched over HTTPS on a blocking thread when its id is
//! new, kept per domain for its `max_age`, and applied to the domain's MX hosts.
//!
//! Under `enforce` only the hosts the policy names stay, marked so that the engine requires
//! verified TLS to them; none left is a deferral. Under `testing` every host stays, marked with
//! whether the policy names it. A policy that cannot be had (no TXT record, a failed fetch, an
//! invalid file) changes nothing unless an unexpired one is cached, which is then used
//! (section 5.1). It never runs on the event loop and never blocks the resolver's own thread.

use super::cache::ExpiringCache;
use super::lookup::{Answer, Dns, Policy, Query};
use super::{MxHost, Resolution};
use crate::route::mta_sts::{self, StsHost, StsMode, StsPolicy};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use rustls::ClientConfig;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The most one policy fetch may take (connection, TLS handshake, request and answer).
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The resolver's MTA-STS settings and cached policies.
pub(super) struct Sts {
    /// The HTTPS port of policy hosts (443).
    port: u16,
    /// Verifying client settings: the Mozilla roots and the configured CA file.
    https: Arc<ClientConfig>,
    policies: Mutex<ExpiringCache<Cached>>,
}

#[derive(Debug, Clone)]
struct Cached {
    id: String,
    policy: Arc<StsPolicy>,
}

impl Sts {
    pub(super) fn new(port: u16, https: Arc<ClientConfig>, capacity: usize) -> Sts {
        Sts {
            port,
            https,
            policies: Mutex::new(ExpiringCache::new(capacity)),
        }
    }

    fn cached(&self, domain: &str, now: Instant) -> Option<(Cached, Instant)> {
        let policies = self.policies.lock().unwrap_or_else(|p| p.into_inner());
        policies
            .get_until(domain, now)
            .map(|(cached, until)| (cached.clone(), until))
    }

    /// The policy id the domain's `_mta-sts` TXT record announces, if any.
    pub(super) async fn announced_id(dns: &Dns, domain: &str) -> Option<String> {
        let name = Name::from_utf8(format!("_mta-sts.{domain}.")).ok()?;
        let Query::Records { records, .. } = dns.query(&name, RecordType::TXT).await else {
            return None;
        };
        let texts: Vec<String> = records
            .iter()
            .filter_map(|r| match &r.data {
                RData::TXT(txt) => Some(
                    txt.txt_data
                        .iter()
                        .map(|part| String::from_utf8_lossy(part))
                        .collect(),
                ),
                _ => None,
            })
            .collect();
        mta_sts::txt_policy_id(&texts)
    }

    /// `answer` under the domain's policy: `announced` is the id of its TXT record.
    pub(super) async fn apply(
        &self,
        dns: &Dns,
        families: &Policy,
        domain: &str,
        announced: Option<String>,
        answer: Answer,
    ) -> Answer {
        let Resolution::Hosts(hosts) = &answer.resolution else {
            return answer;
        };
        let now = Instant::now();
        let cached = self.cached(domain, now);
        let policy = match choose(announced, cached) {
            Choice::Cached(cached, until) => Some((cached.policy, until)),
            Choice::None => None,
            Choice::Fetch(id, cached) => match self.fetch(dns, families, domain).await {
                Ok(policy) => {
                    let policy = Arc::new(policy);
                    let until = now + policy.max_age;
                    let entry = Cached {
                        id,
                        policy: Arc::clone(&policy),
                    };
                    let mut policies = self.policies.lock().unwrap_or_else(|p| p.into_inner());
                    policies.insert(domain.to_string(), entry, until, now);
                    Some((policy, until))
                }
                // Section 5.1: a policy that cannot be refreshed is used while it lasts;
                // with none, delivery goes on as without MTA-STS.
                Err(_) => cached.map(|(c, until)| (c.policy, until)),
            },
        };
        let Some((policy, until)) = policy else {
            return answer;
        };
        let expires = answer.expires.min(until);
        let mark = |host: &MxHost, sts: StsHost| MxHost {
            mta_sts: Some(sts),
            ..host.clone()
        };
        let resolution = match policy.mode {
            StsMode::None => return answer,
            StsMode::Testing => Resolution::Hosts(
                hosts
                    .iter()
                    .map(|h| {
                        let allowed = policy.allows(&h.name);
                        mark(h, StsHost::Testing { allowed })
                    })
                    .collect(),
            ),
            StsMode::Enforce => {
                let allowed: Vec<MxHost> = hosts
                    .iter()
                    .filter(|h| policy.allows(&h.name))
                    .map(|h| mark(h, StsHost::Enforce))
                    .collect();
                if allowed.is_empty() {
                    let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
                    Resolution::MtaStsRefused(format!(
                        "the MTA-STS policy of {domain} (mode enforce) allows the MX hosts {}; \
                         none of {} matches: not delivered",
                        policy.mx.join(", "),
                        names.join(", ")
                    ))
                } else {
                    Resolution::Hosts(allowed.into())
                }
            }
        };
        Answer {
            resolution,
            expires,
        }
    }

    /// Fetches and parses the domain's policy: the policy host's addresses from DNS, the
    /// HTTPS GET on a blocking thread.
    async fn fetch(&self, dns: &Dns, families: &Policy, domain: &str) -> Result<StsPolicy, String> {
        let host = Name::from_utf8(format!("mta-sts.{domain}."))
            .map_err(|e| format!("mta-sts.{domain}: {e}"))?;
        let mut addrs = Vec::new();
        for (enabled, record_type) in [
            (families.ipv4, RecordType::A),
            (families.ipv6, RecordType::AAAA),
        ] {
            if !enabled {
                continue;
            }
            if let Query::Records { records, .. } = dns.query(&host, record_type).await {
                addrs.extend(records.iter().filter_map(|r| match &r.data {
                    RData::A(a) => Some(SocketAddr::new(IpAddr::V4(a.0), self.port)),
                    RData::AAAA(a) => Some(SocketAddr::new(IpAddr::V6(a.0), self.port)),
                    _ => None,
                }));
            }
        }
        // In A-labels, as SNI, the certificate and the Host header need it.
        let host = host.to_ascii().trim_end_matches('.').to_string();
        let (port, https) = (self.port, Arc::clone(&self.https));
        let body = tokio::task::spawn_blocking(move || {
            mta_sts::fetch(&host, &addrs, port, &https, FETCH_TIMEOUT)
        })
        .await
        .map_err(|_| "the policy fetch failed unexpectedly".to_string())??;
        StsPolicy::parse(&body)
    }
}

/// What to do about a domain's policy, from its TXT record's id and the cached policy.
#[derive(Debug)]
enum Choice {
    /// The cached policy: its id is the one announced, or no id could be read (section 5.1:
    /// a policy stays in force until its `max_age`, TXT record or not).
    Cached(Cached, Instant),
    /// A new id: fetch the policy; should that fail, the cached one (if any) still holds.
    Fetch(String, Option<(Cached, Instant)>),
    /// No policy announced and none cached.
    None,
}

fn choose(announced: Option<String>, cached: Option<(Cached, Instant)>) -> Choice {
    match (announced, cached) {
        (Some(id), Some((cached, until))) if cached.id == id => Choice::Cached(cached, until),
        (Some(id), cached) => Choice::Fetch(id, cached),
        (None, Some((cached, until))) => Choice::Cached(cached, until),
        (None, None) => Choice::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_is_fetched_only_for_a_new_id_and_kept_without_a_txt_record() {
        let until = Instant::now() + Duration::from_secs(60);
        let cached = |id: &str| {
            let policy = StsPolicy {
                mode: StsMode::Enforce,
                mx: vec!["mx.example.com".into()],
                max_age: Duration::from_secs(60),
            };
            Some((
                Cached {
                    id: id.into(),
                    policy: Arc::new(policy),
                },
                until,
            ))
        };
        assert!(
            matches!(choose(Some("1".into()), cached("1")), Choice::Cached(c, _) if c.id == "1")
        );
        assert!(
            matches!(choose(Some("2".into()), cached("1")), Choice::Fetch(id, Some((c, _))) if id == "2" && c.id == "1")
        );
        assert!(matches!(choose(Some("1".into()), None), Choice::Fetch(id, None) if id == "1"));
        assert!(matches!(choose(None, cached("1")), Choice::Cached(c, _) if c.id == "1"));
        assert!(matches!(choose(None, None), Choice::None));
    }
}
