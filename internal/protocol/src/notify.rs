//! Notifications (issue 19): the operator's channels (e-mail over SMTP, webhooks in three body formats) and rules
//! (which events go to which channel, filtered by host labels), the queued messages with their delivery attempts,
//! and the event a message is about. Strict validation naming the field; secrets (`password`, `token`, a webhook's
//! `url`) are write-only: views say which are set, never their values.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::admin::Timestamp;

/// How a channel delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelKind {
    /// E-mail over SMTP.
    Email,
    /// A JSON POST of [`EventPayload`].
    Webhook,
    /// A Slack-compatible incoming webhook (`{"text": …}`; Mattermost, Rocket.Chat and Discord's `/slack` accept it).
    Slack,
    /// An ntfy topic URL: the text as the body, `Title`, `Tags`, `Priority` and `Click` headers.
    Ntfy,
}

impl ChannelKind {
    pub const ALL: [ChannelKind; 4] = [ChannelKind::Email, ChannelKind::Webhook, ChannelKind::Slack, ChannelKind::Ntfy];

    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Email => "email",
            ChannelKind::Webhook => "webhook",
            ChannelKind::Slack => "slack",
            ChannelKind::Ntfy => "ntfy",
        }
    }
}

spelled_enum!(ChannelKind, "channel kind");

/// How the SMTP connection is protected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS, required (port 587 by default).
    #[default]
    Starttls,
    /// TLS from the first byte (port 465 by default).
    Implicit,
    /// No TLS at all: only to a loopback server (tests, a local relay); refused for any other host.
    None,
}

impl SmtpTls {
    pub const ALL: [SmtpTls; 3] = [SmtpTls::Starttls, SmtpTls::Implicit, SmtpTls::None];

    pub fn as_str(self) -> &'static str {
        match self {
            SmtpTls::Starttls => "starttls",
            SmtpTls::Implicit => "implicit",
            SmtpTls::None => "none",
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            SmtpTls::Starttls => 587,
            SmtpTls::Implicit => 465,
            SmtpTls::None => 25,
        }
    }
}

spelled_enum!(SmtpTls, "smtp_tls");

/// `POST /api/v1/channels` (and `channel add`). Operator input: unknown fields are refused. Which fields apply
/// depends on `kind`; a field of another kind is an error.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelSpec {
    pub name: String,
    pub kind: Option<ChannelKind>,
    /// Webhook, Slack and ntfy: where to POST. Secret (a Slack URL carries its token): never shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Webhook and ntfy: sent as `Authorization: Bearer <token>`. Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp_host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp_tls: Option<SmtpTls>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// SMTP password. Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<String>,
}

impl std::fmt::Debug for ChannelSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelSpec")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("smtp_host", &self.smtp_host)
            .field("to", &self.to)
            .finish_non_exhaustive()
    }
}

/// The secret fields of a channel, sealed together in the database.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelSecrets {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

impl ChannelSecrets {
    /// The names of the secrets that are set, in a fixed order.
    pub fn names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, set) in
            [("url", self.url.is_some()), ("token", self.token.is_some()), ("password", self.password.is_some())]
        {
            if set {
                out.push(name.to_owned());
            }
        }
        out
    }
}

impl ChannelSpec {
    /// Takes the secrets out (for sealing), leaving the shown part.
    pub fn split_secrets(mut self) -> (ChannelSpec, ChannelSecrets) {
        let secrets = ChannelSecrets { url: self.url.take(), token: self.token.take(), password: self.password.take() };
        (self, secrets)
    }

    /// Puts sealed secrets back (for sending).
    pub fn with_secrets(mut self, secrets: ChannelSecrets) -> ChannelSpec {
        self.url = secrets.url;
        self.token = secrets.token;
        self.password = secrets.password;
        self
    }

    pub fn kind(&self) -> ChannelKind {
        self.kind.unwrap_or(ChannelKind::Webhook)
    }

    /// The SMTP port: the configured one or the TLS mode's default.
    pub fn port(&self) -> u16 {
        self.smtp_port.unwrap_or_else(|| self.smtp_tls.unwrap_or_default().default_port())
    }

    /// Checks the channel, naming the field; fills nothing in.
    pub fn validate(&self) -> Result<(), String> {
        crate::validate::name("name", &self.name)?;
        let Some(kind) = self.kind else {
            return Err(format!("kind is required: one of {}", ChannelKind::ALL.map(ChannelKind::as_str).join(", ")));
        };
        let refuse = |field: &str, set: bool| {
            if set { Err(format!("{field} does not apply to a {} channel", kind.as_str())) } else { Ok(()) }
        };
        if kind == ChannelKind::Email {
            refuse("url", self.url.is_some())?;
            refuse("token", self.token.is_some())?;
            let host = self.smtp_host.as_deref().ok_or("smtp_host is required for an email channel")?;
            validate_host("smtp_host", host)?;
            if self.smtp_port == Some(0) {
                return Err("smtp_port must be 1-65535".into());
            }
            if self.smtp_tls == Some(SmtpTls::None) && !is_loopback_host(host) {
                return Err(format!(
                    "smtp_tls none is allowed only for a loopback smtp_host (127.0.0.1, ::1, localhost), not {host:?}: \
                     the password and the messages would cross the network in clear; use starttls or implicit"
                ));
            }
            match (&self.username, &self.password) {
                (Some(u), Some(p)) => {
                    text("username", u, 256)?;
                    if p.is_empty() || p.len() > 1024 || p.contains(['\r', '\n', '\0']) {
                        return Err("password must be 1-1024 bytes without line breaks or NUL".into());
                    }
                }
                (None, None) => {}
                _ => return Err("username and password go together: give both or neither".into()),
            }
            validate_address("from", self.from.as_deref().ok_or("from is required for an email channel")?)?;
            if self.to.is_empty() || self.to.len() > 50 {
                return Err("to must list 1-50 addresses".into());
            }
            for to in &self.to {
                validate_address("to", to)?;
            }
        } else {
            for (field, set) in [
                ("smtp_host", self.smtp_host.is_some()),
                ("smtp_port", self.smtp_port.is_some()),
                ("smtp_tls", self.smtp_tls.is_some()),
                ("username", self.username.is_some()),
                ("password", self.password.is_some()),
                ("from", self.from.is_some()),
                ("to", !self.to.is_empty()),
            ] {
                refuse(field, set)?;
            }
            if kind == ChannelKind::Slack {
                refuse("token", self.token.is_some())?;
            }
            let url = self.url.as_deref().ok_or_else(|| format!("url is required for a {} channel", kind.as_str()))?;
            validate_url(url)?;
            if let Some(token) = &self.token {
                let ok = !token.is_empty() && token.len() <= 1024 && token.bytes().all(|b| b.is_ascii_graphic());
                if !ok {
                    return Err("token must be 1-1024 printable ASCII characters without spaces".into());
                }
            }
        }
        Ok(())
    }
}

/// `scheme://host[:port]` of a URL: what a view shows of a webhook (its path may carry a secret).
pub fn url_origin(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return String::new() };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    format!("{scheme}://{host}")
}

fn text(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.is_empty() || !crate::validate::is_printable(value, max) {
        return Err(format!("{field} must be 1-{max} printable characters"));
    }
    Ok(())
}

fn validate_host(field: &str, host: &str) -> Result<(), String> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && (host.parse::<IpAddr>().is_ok()
            || host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-')) && !host.starts_with('-'));
    if ok { Ok(()) } else { Err(format!("{field} must be a host name or an IP address, not {:?}", clean(host))) }
}

fn is_loopback_host(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// An address `local@domain` (no display name, nothing that could add a header).
fn validate_address(field: &str, address: &str) -> Result<(), String> {
    let ok = address.len() <= 254
        && address.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && !domain.is_empty()
                && !domain.contains('@')
                && address.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'<' | b'>' | b',' | b'"' | b'\\'))
        });
    if ok {
        Ok(())
    } else {
        Err(format!("{field} must be an e-mail address like ops@example.com, not {:?}", clean(address)))
    }
}

fn validate_url(url: &str) -> Result<(), String> {
    let scheme_ok = url.starts_with("https://") || url.starts_with("http://");
    if !scheme_ok || url.len() > 2048 || !url.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("url must be an http:// or https:// URL of at most 2048 printable ASCII characters".into());
    }
    let origin = url_origin(url);
    let host = origin.split_once("://").map_or("", |(_, h)| h);
    if host.is_empty() {
        return Err("url must name a host".into());
    }
    Ok(())
}

fn clean(text: &str) -> String {
    crate::validate::clean_text(text, 64)
}

/// A channel as the API shows it: never a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelView {
    pub name: String,
    pub kind: ChannelKind,
    /// `scheme://host[:port]` of a webhook's URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_origin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp_host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp_tls: Option<SmtpTls>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<String>,
    /// Which secrets are set (`url`, `token`, `password`).
    pub secrets_set: Vec<String>,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelList {
    pub channels: Vec<ChannelView>,
}

/// What a notification is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    BackupFailed,
    BackupWarning,
    BackupOverdue,
    /// A plan that was failed, warning or overdue is ok again.
    BackupRecovered,
    AgentStale,
    AgentBack,
    CheckFailed,
    CheckRecovered,
    RolloutHalted,
    /// The daily collection of a rule's `backup_warning` events (`warning_digest`).
    WarningDigest,
    /// `POST /api/v1/channels/{name}/test`.
    Test,
}

impl EventKind {
    pub const ALL: [EventKind; 11] = [
        EventKind::BackupFailed,
        EventKind::BackupWarning,
        EventKind::BackupOverdue,
        EventKind::BackupRecovered,
        EventKind::AgentStale,
        EventKind::AgentBack,
        EventKind::CheckFailed,
        EventKind::CheckRecovered,
        EventKind::RolloutHalted,
        EventKind::WarningDigest,
        EventKind::Test,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::BackupFailed => "backup_failed",
            EventKind::BackupWarning => "backup_warning",
            EventKind::BackupOverdue => "backup_overdue",
            EventKind::BackupRecovered => "backup_recovered",
            EventKind::AgentStale => "agent_stale",
            EventKind::AgentBack => "agent_back",
            EventKind::CheckFailed => "check_failed",
            EventKind::CheckRecovered => "check_recovered",
            EventKind::RolloutHalted => "rollout_halted",
            EventKind::WarningDigest => "warning_digest",
            EventKind::Test => "test",
        }
    }

    /// Whether the event is about a problem (ntfy priority, Slack emoji).
    pub fn is_bad(self) -> bool {
        matches!(
            self,
            EventKind::BackupFailed
                | EventKind::BackupWarning
                | EventKind::BackupOverdue
                | EventKind::AgentStale
                | EventKind::CheckFailed
                | EventKind::RolloutHalted
                | EventKind::WarningDigest
        )
    }
}

spelled_enum!(EventKind, "event");

/// `POST /api/v1/rules` (and `rule add`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: String,
    pub channel: String,
    /// The events this rule sends; empty = every event.
    #[serde(default)]
    pub events: Vec<EventKind>,
    /// Only hosts carrying every one of these labels (`env=prod`); empty = every host. Events without a host
    /// (repository checks, rollouts) match only rules without labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `backup_warning` events are collected and sent once a day as one `warning_digest` message.
    #[serde(default)]
    pub warning_digest: bool,
}

impl RuleSpec {
    pub fn validate(&self) -> Result<(), String> {
        crate::validate::name("name", &self.name)?;
        crate::validate::name("channel", &self.channel)?;
        if self.events.iter().any(|e| matches!(e, EventKind::Test | EventKind::WarningDigest)) {
            return Err("events: test and warning_digest are not chosen by rules (use warning_digest: true)".into());
        }
        if self.labels.len() > 32 {
            return Err("labels: at most 32".into());
        }
        for (k, v) in &self.labels {
            text("labels key", k, 63)?;
            if !crate::validate::is_printable(v, 256) {
                return Err(format!("labels {k}: the value must be at most 256 printable characters"));
            }
        }
        Ok(())
    }

    /// Whether an event of `kind` about a host with `labels` (`None`: no host) goes to this rule.
    pub fn matches(&self, kind: EventKind, labels: Option<&BTreeMap<String, String>>) -> bool {
        let event = self.events.is_empty() || self.events.contains(&kind);
        let host = match labels {
            Some(labels) => self.labels.iter().all(|(k, v)| labels.get(k) == Some(v)),
            None => self.labels.is_empty(),
        };
        event && host
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleView {
    #[serde(flatten)]
    pub rule: RuleSpec,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleList {
    pub rules: Vec<RuleView>,
}

/// The host an event is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRef {
    pub id: String,
    pub hostname: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// What a message says: the generic webhook's JSON body, and what e-mail, Slack and ntfy render.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventPayload {
    /// The notification's id, the same on every retry (receivers may use it to drop duplicates).
    #[serde(default)]
    pub id: i64,
    pub event: EventKind,
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<i64>,
    /// Since when the state holds (Unix seconds) and the same in RFC 3339.
    pub since: Timestamp,
    pub since_rfc3339: String,
    /// restic's (or the rollout's) message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The host's page on the web UI, when a public URL is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    pub title: String,
    pub text: String,
    /// A digest's events.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<EventPayload>,
}

impl EventPayload {
    /// Fills `title` and `text` from the other fields.
    pub fn render(mut self) -> EventPayload {
        let host = self.host.as_ref().map(|h| h.hostname.clone());
        let what = match (&host, &self.plan) {
            (Some(h), Some(p)) => format!("{h} / {p}"),
            (Some(h), None) => h.clone(),
            _ => match (&self.repository, self.rollout) {
                (Some(r), _) => format!("repository {r}"),
                (None, Some(id)) => format!("rollout {id}"),
                _ => "restic-manager".into(),
            },
        };
        self.title = match self.event {
            EventKind::BackupFailed => format!("Backup failed: {what}"),
            EventKind::BackupWarning => format!("Backup warning: {what}"),
            EventKind::BackupOverdue => format!("Backup overdue: {what}"),
            EventKind::BackupRecovered => format!("Backup ok again: {what}"),
            EventKind::AgentStale => format!("Agent stale: {what}"),
            EventKind::AgentBack => format!("Agent back: {what}"),
            EventKind::CheckFailed => format!("Repository check failed: {what}"),
            EventKind::CheckRecovered => format!("Repository check ok again: {what}"),
            EventKind::RolloutHalted => format!("Rollout halted: {what}"),
            EventKind::WarningDigest => format!("Backup warnings: {} in the last day", self.items.len()),
            EventKind::Test => "restic-manager test notification".into(),
        };
        let mut lines = Vec::new();
        if let Some(h) = &self.host {
            lines.push(format!("Host: {} ({})", h.hostname, h.id));
        }
        if let Some(p) = &self.plan {
            lines.push(format!("Plan: {p}"));
        }
        if let Some(r) = &self.repository {
            lines.push(format!("Repository: {r}"));
        }
        if let Some(id) = self.rollout {
            lines.push(format!("Rollout: {id}"));
        }
        match &self.previous_state {
            Some(prev) => lines.push(format!("State: {} (was {prev})", self.state)),
            None => lines.push(format!("State: {}", self.state)),
        }
        lines.push(format!("Since: {}", self.since_rfc3339));
        if let Some(m) = &self.message {
            lines.push(format!("Message: {m}"));
        }
        for item in &self.items {
            lines.push(format!(
                "- {} since {}: {}",
                item.title,
                item.since_rfc3339,
                item.message.as_deref().unwrap_or("")
            ));
        }
        if let Some(l) = &self.link {
            lines.push(format!("Link: {l}"));
        }
        self.text = lines.join("\n");
        self
    }
}

/// Where a queued message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Waiting for its next attempt.
    Pending,
    Delivered,
    /// Given up after the retry window.
    Failed,
    /// A warning waiting for its rule's daily digest.
    Held,
    /// A held warning that went out in a digest.
    Digested,
}

impl DeliveryStatus {
    pub const ALL: [DeliveryStatus; 5] = [
        DeliveryStatus::Pending,
        DeliveryStatus::Delivered,
        DeliveryStatus::Failed,
        DeliveryStatus::Held,
        DeliveryStatus::Digested,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
            DeliveryStatus::Held => "held",
            DeliveryStatus::Digested => "digested",
        }
    }
}

spelled_enum!(DeliveryStatus, "status");

/// One delivery attempt: the SMTP reply or HTTP status line, or the error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptView {
    pub at: Timestamp,
    pub ok: bool,
    pub answer: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationView {
    pub id: i64,
    pub channel: String,
    pub rule: String,
    pub event: EventKind,
    pub title: String,
    pub status: DeliveryStatus,
    pub created_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<Timestamp>,
    pub give_up_at: Timestamp,
    pub attempts: Vec<AttemptView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationList {
    pub notifications: Vec<NotificationView>,
}

/// `POST /api/v1/channels/{name}/test`: what the SMTP server or the webhook answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestResult {
    pub ok: bool,
    pub answer: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn email() -> ChannelSpec {
        ChannelSpec {
            name: "mail".into(),
            kind: Some(ChannelKind::Email),
            smtp_host: Some("smtp.example.com".into()),
            from: Some("rm@example.com".into()),
            to: vec!["ops@example.com".into()],
            ..Default::default()
        }
    }

    #[test]
    fn channels_are_checked_per_kind_naming_the_field() {
        assert_eq!(email().validate(), Ok(()));
        let bad = |f: fn(&mut ChannelSpec), want: &str| {
            let mut c = email();
            f(&mut c);
            let err = c.validate().unwrap_err();
            assert!(err.contains(want), "{err}");
        };
        bad(|c| c.url = Some("https://x".into()), "url does not apply to a email");
        bad(|c| c.smtp_tls = Some(SmtpTls::None), "loopback");
        bad(|c| c.username = Some("u".into()), "username and password go together");
        bad(|c| c.to = vec!["ops@example.com\r\nBcc: x@y".into()], "to must be an e-mail address");
        bad(|c| c.from = None, "from is required");
        bad(|c| c.name = "Bad Name".into(), "name must be");
        let mut local = email();
        local.smtp_host = Some("127.0.0.1".into());
        local.smtp_tls = Some(SmtpTls::None);
        assert_eq!(local.validate(), Ok(()));

        let hook = ChannelSpec {
            name: "hook".into(),
            kind: Some(ChannelKind::Slack),
            url: Some("https://hooks.example.com/services/T0/B0/secret".into()),
            ..Default::default()
        };
        assert_eq!(hook.validate(), Ok(()));
        let mut h = hook.clone();
        h.token = Some("t".into());
        assert!(h.validate().unwrap_err().contains("token does not apply"));
        let mut h = hook.clone();
        h.url = Some("ftp://x/".into());
        assert!(h.validate().unwrap_err().contains("http:// or https://"));
        let mut h = hook;
        h.to = vec!["a@b".into()];
        assert!(h.validate().unwrap_err().contains("to does not apply"));
        assert_eq!(url_origin("https://u:p@hooks.example.com:8443/services/T0?x"), "https://hooks.example.com:8443");
    }

    #[test]
    fn rules_match_events_and_labels() {
        let rule = RuleSpec {
            name: "oncall".into(),
            channel: "hook".into(),
            events: vec![EventKind::BackupFailed],
            labels: [("env".to_string(), "prod".to_string())].into(),
            warning_digest: false,
        };
        let prod: BTreeMap<_, _> = [("env".to_string(), "prod".to_string())].into();
        let dev: BTreeMap<_, _> = [("env".to_string(), "dev".to_string())].into();
        assert!(rule.matches(EventKind::BackupFailed, Some(&prod)));
        assert!(!rule.matches(EventKind::BackupFailed, Some(&dev)));
        assert!(!rule.matches(EventKind::BackupRecovered, Some(&prod)));
        assert!(!rule.matches(EventKind::BackupFailed, None));
        let all = RuleSpec { name: "all".into(), channel: "hook".into(), ..Default::default() };
        assert!(all.matches(EventKind::RolloutHalted, None));
        let bad = RuleSpec { events: vec![EventKind::Test], ..all };
        assert!(bad.validate().is_err());
    }
}
