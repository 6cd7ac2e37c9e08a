//! Bounce classification: every failed, deferred or expired outcome gets a [`Category`] derived
//! from the reply code, the enhanced status code (RFC 3463) and the text.
//!
//! The rules live in one readable table ([`Classifier::default_rules`]), tried in order, first
//! match wins; callers put their own rules in front ([`Classifier::with_rules`]). Text matching is
//! case-insensitive substring matching, because providers phrase the same condition many ways
//! and often with the wrong enhanced code. Nothing here performs I/O.

use crate::smtp::Reply;
use std::fmt;

/// Why a recipient was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Category {
    /// The mailbox does not exist, is disabled, or the address is invalid.
    BadMailbox,
    /// Over quota.
    MailboxFull,
    /// The domain does not exist or accepts no mail (null MX).
    NoSuchDomain,
    /// Refused for spam, reputation, authentication (SPF/DKIM/DMARC) or local policy.
    PolicyBlock,
    /// Slow down: rate limits, too many connections, temporary reputation deferrals.
    Throttled,
    /// TLS could not be negotiated or verified.
    Tls,
    /// Name resolution failed or routing is impossible.
    Dns,
    /// The connection could not be made, was lost, or timed out.
    Connection,
    /// The server and client disagreed about the protocol.
    Protocol,
    Other,
}

impl Category {
    pub fn as_str(self) -> &'static str {
        match self {
            Category::BadMailbox => "bad_mailbox",
            Category::MailboxFull => "mailbox_full",
            Category::NoSuchDomain => "no_such_domain",
            Category::PolicyBlock => "policy_block",
            Category::Throttled => "throttled",
            Category::Tls => "tls",
            Category::Dns => "dns",
            Category::Connection => "connection",
            Category::Protocol => "protocol",
            Category::Other => "other",
        }
    }

    /// Parses the names [`Category::as_str`] gives.
    pub fn from_name(name: &str) -> Option<Category> {
        Self::ALL.iter().copied().find(|c| c.as_str() == name)
    }

    /// Every category, in the order of the C ABI's `mxp_category` (after its "none").
    pub const ALL: [Category; 10] = [
        Category::BadMailbox,
        Category::MailboxFull,
        Category::NoSuchDomain,
        Category::PolicyBlock,
        Category::Throttled,
        Category::Tls,
        Category::Dns,
        Category::Connection,
        Category::Protocol,
        Category::Other,
    ];
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of the table. Every condition given must hold; `text` matches when the reply text
/// contains any of the phrases (lower case).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub category: Category,
    /// The reply class: 4 (transient) or 5 (permanent), from the code, or from the enhanced
    /// code when the code is 0 (a client-made reply).
    pub class: Option<u8>,
    /// The basic reply code, e.g. 421.
    pub code: Option<u16>,
    /// The enhanced code's subject and, optionally, detail: `(7, Some(1))` is x.7.1.
    pub enhanced: Option<(u16, Option<u16>)>,
    pub text: Vec<String>,
}

impl Rule {
    /// A rule on text alone.
    pub fn text(category: Category, phrases: &[&str]) -> Rule {
        Rule {
            category,
            class: None,
            code: None,
            enhanced: None,
            text: phrases.iter().map(|p| p.to_ascii_lowercase()).collect(),
        }
    }

    /// A rule on the enhanced code x.subject[.detail].
    pub fn enhanced(category: Category, subject: u16, detail: Option<u16>) -> Rule {
        Rule {
            category,
            class: None,
            code: None,
            enhanced: Some((subject, detail)),
            text: Vec::new(),
        }
    }

    /// Restricts the rule to a reply class (4 or 5).
    pub fn in_class(mut self, class: u8) -> Rule {
        self.class = Some(class);
        self
    }

    /// Restricts the rule to a basic reply code.
    pub fn with_code(mut self, code: u16) -> Rule {
        self.code = Some(code);
        self
    }

    fn matches(&self, reply: &Reply, lower_text: &str) -> bool {
        let class = if reply.code != 0 {
            (reply.code / 100) as u8
        } else {
            reply.enhanced.map_or(0, |e| e.class)
        };
        self.class.is_none_or(|c| c == class)
            && self.code.is_none_or(|c| c == reply.code)
            && self.enhanced.is_none_or(|(subject, detail)| {
                reply
                    .enhanced
                    .is_some_and(|e| e.subject == subject && detail.is_none_or(|d| d == e.detail))
            })
            && (self.text.is_empty() || self.text.iter().any(|p| lower_text.contains(p.as_str())))
    }
}

/// The ordered rule table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classifier {
    rules: Vec<Rule>,
}

impl Default for Classifier {
    fn default() -> Self {
        Classifier {
            rules: Classifier::default_rules(),
        }
    }
}

impl Classifier {
    /// `rules` first, then the defaults.
    pub fn with_rules(rules: Vec<Rule>) -> Self {
        let mut all = rules;
        all.extend(Classifier::default_rules());
        Classifier { rules: all }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn classify(&self, reply: &Reply) -> Category {
        let lower = reply.text.to_ascii_lowercase();
        self.rules
            .iter()
            .find(|r| r.matches(reply, &lower))
            .map_or(Category::Other, |r| r.category)
    }

    /// The built-in table. Text rules come first because providers often attach a generic
    /// enhanced code (5.5.0, 5.7.1) to a specific condition; within a family the more specific
    /// rows come first.
    pub fn default_rules() -> Vec<Rule> {
        use Category::*;
        vec![
            // TLS (our own and servers' words).
            Rule::text(
                Tls,
                &[
                    "tls handshake failed",
                    "starttls",
                    "tls is required",
                    "certificate",
                ],
            ),
            Rule::enhanced(Tls, 7, Some(10)),
            Rule::enhanced(Tls, 7, Some(5)),
            // Slowing down: only temporary replies.
            Rule::text(
                Throttled,
                &[
                    "rate limit",
                    "rate-limit",
                    "ratelimit",
                    "too many connections",
                    "too many messages",
                    "too many concurrent",
                    "unexpected volume",
                    "try again later",
                    "temporarily deferred",
                    "throttl",
                    "slow down",
                    "exceeded",
                    "insufficient system resources",
                    "too many recipients",
                ],
            )
            .in_class(4),
            Rule::enhanced(Throttled, 7, Some(28)).in_class(4),
            Rule::enhanced(Throttled, 4, Some(5)).in_class(4),
            Rule::enhanced(Throttled, 3, Some(2)).in_class(4),
            Rule::enhanced(Throttled, 3, Some(1)).in_class(4),
            // A temporary security or policy refusal from a large provider means "slow down".
            Rule::enhanced(Throttled, 7, None).in_class(4),
            // Mailbox full.
            Rule::text(
                MailboxFull,
                &[
                    "over quota",
                    "quota exceeded",
                    "mailbox full",
                    "mailbox is full",
                    "insufficient storage",
                    "out of storage",
                ],
            ),
            Rule::enhanced(MailboxFull, 2, Some(2)),
            // Domains that do not exist or take no mail.
            Rule::text(
                NoSuchDomain,
                &[
                    "domain does not exist",
                    "no such domain",
                    "domain not found",
                    "does not accept mail",
                    "null mx",
                    "host not found",
                    "nxdomain",
                ],
            ),
            // Mailboxes that do not exist.
            Rule::text(
                BadMailbox,
                &[
                    "user unknown",
                    "unknown user",
                    "no such user",
                    "does not exist",
                    "mailbox not found",
                    "mailbox unavailable",
                    "recipient not found",
                    "address rejected",
                    "invalid recipient",
                    "invalid address",
                    "no mailbox",
                    "account is disabled",
                    "is disabled",
                    "unrouteable address",
                    "user doesn't have",
                ],
            )
            .in_class(5),
            // After the mailbox phrases: Microsoft 365 answers 5.1.10 for an unknown
            // recipient ("RESOLVER.ADR.RecipientNotFound"), RFC 7505 uses it for null MX.
            Rule::enhanced(NoSuchDomain, 1, Some(2)),
            Rule::enhanced(NoSuchDomain, 1, Some(10)),
            Rule::enhanced(BadMailbox, 1, Some(1)).in_class(5),
            Rule::enhanced(BadMailbox, 1, Some(3)).in_class(5),
            Rule::enhanced(BadMailbox, 1, Some(6)).in_class(5),
            Rule::enhanced(BadMailbox, 2, Some(1)).in_class(5),
            // Spam, reputation, authentication and policy.
            Rule::text(
                PolicyBlock,
                &[
                    "spam",
                    "blocked",
                    "block list",
                    "blocklist",
                    "blacklist",
                    "listed",
                    "reputation",
                    "policy",
                    "unauthenticated",
                    "dmarc",
                    "spf",
                    "dkim",
                    "not accepted",
                    "denied",
                ],
            ),
            Rule::enhanced(PolicyBlock, 7, None),
            // Routing and name resolution.
            Rule::text(
                Dns,
                &["dns", "name resolution", "no route to domain", "servfail"],
            ),
            Rule::enhanced(Dns, 4, Some(3)),
            Rule::enhanced(Dns, 4, Some(4)),
            // Connections.
            Rule::text(
                Connection,
                &[
                    "connection lost",
                    "connection refused",
                    "timed out",
                    "connect to",
                    "connection reset",
                ],
            ),
            Rule::enhanced(Connection, 4, Some(1)),
            Rule::enhanced(Connection, 4, Some(2)),
            Rule::enhanced(Connection, 4, Some(7)),
            // Protocol disagreements.
            Rule::text(
                Protocol,
                &[
                    "protocol error",
                    "reply arrived before",
                    "unexpected reply",
                    "syntax error",
                ],
            ),
            Rule::enhanced(Protocol, 5, None),
            // Conversions the server cannot do (8BITMIME, SMTPUTF8) versus content refused.
            Rule::enhanced(Protocol, 6, Some(3)),
            Rule::enhanced(Protocol, 6, Some(7)),
            Rule::enhanced(PolicyBlock, 6, None),
            Rule::text(Throttled, &[]).with_code(421),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::EnhancedCode;

    fn reply(code: u16, enhanced: &str, text: &str) -> Reply {
        let e = (!enhanced.is_empty()).then(|| {
            let p: Vec<u16> = enhanced.split('.').map(|n| n.parse().unwrap()).collect();
            EnhancedCode::new(p[0] as u8, p[1], p[2])
        });
        Reply::new(code, e, text)
    }

    /// Real-world replies (Gmail, Outlook, Yahoo and common MTAs) and their categories.
    #[test]
    fn real_world_replies() {
        use Category::*;
        let table = [
            (550, "5.1.1", "The email account that you tried to reach does not exist. Please try double-checking the recipient's email address for typos or unnecessary spaces.", BadMailbox),
            (452, "4.2.2", "The email account that you tried to reach is over quota. Please direct the recipient to https://support.google.com/mail/?p=OverQuotaTemp", MailboxFull),
            (552, "5.2.2", "The email account that you tried to reach is over quota and inactive.", MailboxFull),
            (550, "5.2.1", "The email account that you tried to reach is disabled.", BadMailbox),
            (421, "4.7.28", "[203.0.113.9] Our system has detected an unusual rate of unsolicited mail originating from your IP address. To protect our users from spam, mail sent from your IP address has been temporarily rate limited.", Throttled),
            (550, "5.7.1", "[203.0.113.9] Our system has detected an unusual rate of unsolicited mail originating from your IP address. To protect our users from spam, mail sent from your IP address has been blocked.", PolicyBlock),
            (550, "5.7.26", "This mail is unauthenticated, which poses a security risk to the sender and Gmail users, and has been blocked.", PolicyBlock),
            (421, "4.7.0", "[203.0.113.9] Our system has detected that this message is suspicious due to the very low reputation of the sending IP address.", Throttled),
            (550, "5.5.0", "Requested action not taken: mailbox unavailable (S2017)", BadMailbox),
            (550, "5.7.1", "Unfortunately, messages from [203.0.113.9] weren't sent. Please contact your Internet service provider since part of their network is on our block list (S3150).", PolicyBlock),
            (451, "4.7.650", "The mail server [203.0.113.9] has been temporarily rate limited due to IP reputation.", Throttled),
            (421, "4.7.0", "[TSS04] Messages from 203.0.113.9 temporarily deferred due to unexpected volume or user complaints - 4.16.55.1", Throttled),
            (554, "5.7.9", "Message not accepted for policy reasons.", PolicyBlock),
            (552, "", "1 Requested mail action aborted, mailbox not found", BadMailbox),
            (554, "5.7.1", "Service unavailable; Client host [203.0.113.9] blocked using zen.spamhaus.org", PolicyBlock),
            (550, "5.1.1", "<nobody@example.org>: Recipient address rejected: User unknown in virtual mailbox table", BadMailbox),
            (450, "4.2.1", "<busy@example.org>: Mailbox busy, try again later", Throttled),
            (421, "4.3.2", "Service shutting down", Throttled),
            (452, "4.5.3", "Too many recipients", Throttled),
            (0, "5.1.10", "example.org does not accept mail (null MX)", NoSuchDomain),
            (0, "4.4.1", "connect to 192.0.2.1:25 failed: Connection refused (os error 111)", Connection),
            (0, "4.4.2", "timed out waiting for reply to MAIL FROM", Connection),
            (0, "4.7.5", "TLS handshake failed: invalid peer certificate: UnknownIssuer", Tls),
            (0, "4.5.0", "protocol error: malformed reply line", Protocol),
            (0, "4.4.3", "DNS lookup for example.org failed: SERVFAIL", Dns),
            (0, "5.1.2", "example.invalid: domain does not exist (NXDOMAIN)", NoSuchDomain),
            (550, "5.1.10", "RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup", BadMailbox),
            (554, "5.6.0", "Message content rejected", PolicyBlock),
            (0, "5.6.3", "message has 8-bit content and the server does not offer 8BITMIME", Protocol),
            (451, "4.3.0", "Temporary local problem", Other),
        ];
        let classifier = Classifier::default();
        for (code, enhanced, text, want) in table {
            let got = classifier.classify(&reply(code, enhanced, text));
            assert_eq!(got, want, "{code} {enhanced} {text}");
        }
    }

    #[test]
    fn user_rules_come_first() {
        let rule = Rule::text(Category::PolicyBlock, &["ACME-BLOCK"]);
        let c = Classifier::with_rules(vec![rule]);
        let r = reply(550, "5.1.1", "user unknown (acme-block 42)");
        assert_eq!(c.classify(&r), Category::PolicyBlock);
        assert_eq!(Classifier::default().classify(&r), Category::BadMailbox);
        assert_eq!(Category::from_name("throttled"), Some(Category::Throttled));
        assert_eq!(Category::from_name("nope"), None);
    }
}
