//! Where a recipient's mail goes: a smarthost for everything, static per-domain routes, or the
//! domain's own mail exchangers ([`mx`]).
//!
//! Routing maps a recipient domain to a [`Target`] (a host and port, resolved to addresses once,
//! when the dispatcher starts). The engine keys its connection pools by target, so every domain
//! routed to the same host shares that host's connections and limits. The static routes perform
//! no I/O after start-up; MX lookups run on the resolver's own thread, never on the loop's.

pub mod mta_sts;
pub mod mx;

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};

/// A host and port mail is handed to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// As configured (`host:port`, `smtps://host:port` for implicit TLS): the destination
    /// named in outcomes and metrics.
    pub name: String,
    /// The host part: the TLS server name (SNI and certificate check).
    pub host: String,
    /// The addresses it resolved to, tried in order.
    pub addrs: Vec<SocketAddr>,
    /// TLS from the first byte (RFC 8314, usually port 465), written `smtps://host:port`.
    pub implicit_tls: bool,
}

impl Target {
    /// Parses `host:port` (or `[v6]:port`, or `smtps://host:port` for implicit TLS) and
    /// resolves it now; `key` names the setting.
    pub fn resolve(spec: &str, key: &'static str) -> Result<Self> {
        let invalid = |problem| Error::InvalidConfig { key, problem };
        let (implicit_tls, spec) = match spec.strip_prefix("smtps://") {
            Some(rest) => (true, rest),
            None => (false, spec.strip_prefix("smtp://").unwrap_or(spec)),
        };
        let (host, port) = spec.rsplit_once(':').ok_or(invalid("expected host:port"))?;
        if host.is_empty() {
            return Err(invalid("the host is empty"));
        }
        port.parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or(invalid("the port is not a number from 1 to 65535"))?;
        let addrs: Vec<SocketAddr> = spec
            .to_socket_addrs()
            .map_err(|_| invalid("the host does not resolve"))?
            .collect();
        if addrs.is_empty() {
            return Err(invalid("the host does not resolve"));
        }
        Ok(Target {
            name: if implicit_tls {
                format!("smtps://{spec}")
            } else {
                spec.to_string()
            },
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            addrs,
            implicit_tls,
        })
    }
}

/// The routing table: per-domain routes, then a default (the smarthost).
#[derive(Debug, Clone, Default)]
pub struct Routes {
    by_domain: HashMap<String, usize>,
    default: Option<usize>,
    targets: Vec<Target>,
}

impl Routes {
    /// Every domain goes to this relay.
    pub fn relay(target: Target) -> Self {
        let mut routes = Routes::default();
        routes.default = Some(routes.add_target(target));
        routes
    }

    /// Sends mail for `domain` (case-insensitive, exact match) to `target`.
    pub fn add_route(&mut self, domain: &str, target: Target) {
        let index = self.add_target(target);
        self.by_domain.insert(domain.to_ascii_lowercase(), index);
    }

    /// Mail for domains without a route goes to `target`.
    pub fn set_default(&mut self, target: Target) {
        self.default = Some(self.add_target(target));
    }

    /// One target per distinct session: the same host and port with and without implicit TLS
    /// are two (sharing connections would send one's mail over the other's session).
    fn add_target(&mut self, target: Target) -> usize {
        if let Some(i) = self
            .targets
            .iter()
            .position(|t| t.name == target.name && t.implicit_tls == target.implicit_tls)
        {
            return i;
        }
        self.targets.push(target);
        self.targets.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// Every domain goes to the same place (a relay and no per-domain routes).
    pub fn is_single_target(&self) -> bool {
        self.by_domain.is_empty()
    }

    /// Every target, indexed as [`Routes::lookup`] answers.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// The index of the target for a recipient domain, or `None` when nothing routes it.
    pub fn lookup(&self, domain: &str) -> Option<usize> {
        if self.by_domain.is_empty() {
            return self.default;
        }
        let found = if domain.bytes().any(|b| b.is_ascii_uppercase()) || domain.ends_with('.') {
            let key = domain.trim_end_matches('.').to_ascii_lowercase();
            self.by_domain.get(&key).copied()
        } else {
            self.by_domain.get(domain).copied()
        };
        found.or(self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_by_domain_then_default() {
        let a = Target::resolve("127.0.0.1:2525", "relay").unwrap();
        let b = Target::resolve("127.0.0.2:2526", "route").unwrap();
        let mut routes = Routes::relay(a.clone());
        routes.add_route("Example.ORG", b.clone());
        assert_eq!(routes.lookup("example.org"), Some(1));
        assert_eq!(routes.lookup("EXAMPLE.org."), Some(1));
        assert_eq!(routes.lookup("other.example"), Some(0));
        assert_eq!(routes.targets()[1], b);
        let mut only = Routes::default();
        only.add_route("x.example", a);
        assert_eq!(only.lookup("y.example"), None);
    }

    #[test]
    fn bad_specs_name_the_key() {
        let e = Target::resolve("localhost", "relay").unwrap_err();
        assert_eq!(e.to_string(), "config relay: expected host:port");
        let e = Target::resolve("localhost:0", "relay").unwrap_err();
        assert_eq!(
            e.to_string(),
            "config relay: the port is not a number from 1 to 65535"
        );
        let e = Target::resolve("[::1]:25", "relay").unwrap();
        assert_eq!(e.addrs[0].port(), 25);
        assert_eq!(e.host, "::1");
        let t = Target::resolve("smtps://localhost:465", "relay").unwrap();
        assert!(t.implicit_tls);
        assert_eq!(
            (t.host.as_str(), t.name.as_str()),
            ("localhost", "smtps://localhost:465")
        );
    }
}
