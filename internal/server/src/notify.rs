//! Notifications (issue 19): two background tasks and the senders.
//!
//! * Detection, every `--notify-tick`: `rm_fleet::notify::detect` compares the fleet's states with the stored ones
//!   and queues a message per transition and rule, in one database operation.
//! * Delivery: takes due messages from the queue, sends each on a blocking thread (ureq for webhooks, lettre for
//!   SMTP; at most 16 at once, each bounded by [`SEND_TIMEOUT`]) and records every attempt with its outcome in one
//!   operation (`rm_fleet::notify::record_attempt`): delivered, retried with backoff, or given up after
//!   `--notify-give-up`. Request handling never waits for either task. A message is marked delivered only after
//!   the receiver accepted it, so a process killed in the instant between the receiver's answer and that commit
//!   sends it once more after a restart; every attempt carries the same `id` (JSON field and
//!   `X-Restic-Manager-Notification` header) so a receiver can drop such a duplicate.

use std::sync::Arc;
use std::time::Duration;

use rm_fleet::notify::{Backoff, Due, Tuning};
use rm_protocol::notify::{ChannelKind, ChannelSpec, EventKind, EventPayload, SmtpTls};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::AppState;

/// The longest one attempt may take (connect, TLS, the whole exchange).
pub const SEND_TIMEOUT: Duration = Duration::from_secs(20);
/// How much of a receiver's answer body is kept.
const ANSWER_BODY: usize = 200;

/// What a receiver answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub ok: bool,
    /// `HTTP 200 …`, the SMTP reply (`250 …`), or the error.
    pub answer: String,
}

/// Starts detection and delivery; they run until the runtime stops.
pub fn spawn(state: &AppState) {
    let wake = Arc::new(Notify::new());
    tokio::spawn(detect_loop(state.clone(), wake.clone()));
    tokio::spawn(deliver_loop(state.clone(), wake));
}

fn tuning(state: &AppState) -> Tuning {
    let s = state.settings();
    Tuning {
        stale_after_secs: s.stale_after.as_secs(),
        booted_at: state.started_at(),
        link_base: state.public_url().map(|u| u.to_string()),
        give_up_ms: s.notify_give_up.as_millis().try_into().unwrap_or(i64::MAX),
        digest_every_secs: s.notify_digest_every.as_secs().try_into().unwrap_or(i64::MAX),
    }
}

async fn detect_loop(state: AppState, wake: Arc<Notify>) {
    let tuning = tuning(&state);
    let mut tick = tokio::time::interval(state.settings().notify_tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error = String::new();
    let retention = state.settings().audit_retention.as_secs().try_into().unwrap_or(i64::MAX);
    let mut pruned_at = 0;
    loop {
        tick.tick().await;
        let t = tuning.clone();
        let now = rm_fleet::now();
        // Finished messages are kept as long as audit events, checked hourly.
        if now - pruned_at >= 3600 {
            pruned_at = now;
            let before = now.saturating_sub(retention);
            match state.fleet().call(move |c| rm_fleet::notify::prune_notifications(c, before)).await {
                Ok(0) => {}
                Ok(n) => info!(deleted = n, "old notifications deleted"),
                Err(e) => warn!(error = %e, "old notifications could not be deleted"),
            }
        }
        match state.fleet().call(move |c| rm_fleet::notify::detect(c, now, &t)).await {
            Ok(0) => last_error.clear(),
            Ok(queued) => {
                last_error.clear();
                info!(queued, "notifications queued");
                wake.notify_one();
            }
            Err(e) => {
                let e = e.to_string();
                if e != last_error {
                    warn!(error = %e, "notification events could not be checked; retrying every tick");
                    last_error = e;
                }
            }
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

async fn deliver_loop(state: AppState, wake: Arc<Notify>) {
    let s = state.settings();
    let backoff = Backoff {
        base_ms: s.notify_retry_base.as_millis().try_into().unwrap_or(i64::MAX),
        max_ms: s.notify_retry_max.as_millis().try_into().unwrap_or(i64::MAX),
    };
    loop {
        let key = state.secret_key().clone();
        let due = match state.fleet().call(move |c| rm_fleet::notify::take_due(c, &key, now_ms())).await {
            Ok(due) => due,
            Err(e) => {
                warn!(error = %e, "notification queue unreadable; retrying in 5 s");
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
        };
        if due.is_empty() {
            let next = state.fleet().call(rm_fleet::notify::next_due_ms).await.ok().flatten();
            let wait = next.map_or(5000, |n| (n - now_ms()).clamp(10, 5000));
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
                () = wake.notified() => {}
            }
            continue;
        }
        let sends = due.into_iter().map(|d| {
            let state = state.clone();
            async move {
                let id = d.id;
                let channel_name = d.channel.as_ref().map(|c| c.name.clone()).unwrap_or_default();
                let outcome = tokio::task::spawn_blocking(move || attempt(d))
                    .await
                    .unwrap_or_else(|e| Outcome { ok: false, answer: format!("the sender panicked: {e}") });
                let answer = outcome.answer.clone();
                let recorded = state
                    .fleet()
                    .call(move |c| {
                        rm_fleet::notify::record_attempt(c, id, now_ms(), outcome.ok, &outcome.answer, backoff)
                    })
                    .await;
                match recorded {
                    Ok(Some(status)) => {
                        info!(id, channel = channel_name, status = status.as_str(), answer, "notification attempt")
                    }
                    Ok(None) => {}
                    Err(e) => warn!(id, error = %e, "notification attempt not recorded"),
                }
            }
        });
        futures_util::future::join_all(sends).await;
    }
}

fn attempt(due: Due) -> Outcome {
    match due.channel {
        Ok(channel) => send(&channel, &due.payload),
        Err(e) => Outcome { ok: false, answer: e },
    }
}

/// The message `POST /api/v1/channels/{name}/test` sends.
pub fn sample(link_base: Option<String>) -> EventPayload {
    let now = rm_fleet::now();
    EventPayload {
        id: 0,
        event: EventKind::Test,
        state: "test".into(),
        previous_state: None,
        host: None,
        plan: None,
        repository: None,
        rollout: None,
        since: now,
        since_rfc3339: rm_fleet::rfc3339(now),
        message: Some("This is a test message from restic-manager: this channel works.".into()),
        link: link_base,
        title: String::new(),
        text: String::new(),
        items: Vec::new(),
    }
    .render()
}

/// Sends one message to one channel, blocking (call from a blocking thread).
pub fn send(channel: &ChannelSpec, payload: &EventPayload) -> Outcome {
    match channel.kind() {
        ChannelKind::Email => email(channel, payload),
        kind => webhook(kind, channel, payload),
    }
}

fn failed(answer: impl Into<String>) -> Outcome {
    Outcome { ok: false, answer: answer.into() }
}

fn webhook(kind: ChannelKind, channel: &ChannelSpec, payload: &EventPayload) -> Outcome {
    let Some(url) = channel.url.as_deref() else { return failed("the channel has no url") };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(SEND_TIMEOUT))
        .user_agent(format!("restic-manager/{}", rm_buildinfo::current().version))
        .build()
        .into();
    let mut request = agent
        .post(url)
        .header("X-Restic-Manager-Notification", payload.id.to_string())
        .header("X-Restic-Manager-Event", payload.event.as_str());
    if let Some(token) = &channel.token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let sent = match kind {
        ChannelKind::Ntfy => {
            request = request
                .header("Title", header_text(&payload.title))
                .header("Tags", if payload.event.is_bad() { "warning" } else { "white_check_mark" })
                .header("Priority", if payload.event.is_bad() { "4" } else { "3" })
                .header("Content-Type", "text/plain; charset=utf-8");
            if let Some(link) = &payload.link {
                request = request.header("Click", header_text(link));
            }
            request.send(payload.text.as_bytes())
        }
        ChannelKind::Slack => {
            let body = serde_json::json!({ "text": slack_text(payload) });
            request.header("Content-Type", "application/json").send(body.to_string().as_bytes())
        }
        _ => {
            let body = serde_json::to_vec(payload).expect("a payload serialises");
            request.header("Content-Type", "application/json").send(&body[..])
        }
    };
    match sent {
        Ok(mut response) => {
            let status = response.status();
            let body = response.body_mut().with_config().limit(4096).read_to_string().unwrap_or_default();
            let body: String = body.chars().take(ANSWER_BODY).collect();
            let answer = format!("HTTP {} {}", status.as_u16(), body.trim()).trim().to_owned();
            Outcome { ok: status.is_success(), answer }
        }
        Err(e) => failed(format!("HTTP request failed: {e}")),
    }
}

/// Printable ASCII only (HTTP header values); anything else becomes `?`.
fn header_text(text: &str) -> String {
    text.chars().take(250).map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect()
}

/// Slack's mrkdwn: `&`, `<` and `>` escaped, the title bold.
fn slack_text(payload: &EventPayload) -> String {
    let escape = |t: &str| t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let mut text = format!("*{}*\n{}", escape(&payload.title), escape(&payload.text));
    if let Some(link) = &payload.link {
        text.push_str(&format!("\n<{}|Open the host>", escape(link)));
    }
    text
}

fn email(channel: &ChannelSpec, payload: &EventPayload) -> Outcome {
    use lettre::Transport;
    use lettre::message::header::ContentType;
    use lettre::message::{Mailbox, Message};
    use lettre::transport::smtp::SmtpTransport;
    use lettre::transport::smtp::authentication::Credentials;

    let Some(host) = channel.smtp_host.as_deref() else { return failed("the channel has no smtp_host") };
    let tls = channel.smtp_tls.unwrap_or_default();
    let builder = match tls {
        SmtpTls::Starttls => SmtpTransport::starttls_relay(host),
        SmtpTls::Implicit => SmtpTransport::relay(host),
        SmtpTls::None => Ok(SmtpTransport::builder_dangerous(host)),
    };
    let mut builder = match builder {
        Ok(b) => b.port(channel.port()).timeout(Some(SEND_TIMEOUT)),
        Err(e) => return failed(format!("SMTP setup failed: {e}")),
    };
    if let (Some(user), Some(password)) = (&channel.username, &channel.password) {
        builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
    }
    let mailer = builder.build();
    let mut message = Message::builder().subject(payload.title.clone());
    match channel.from.as_deref().unwrap_or_default().parse::<Mailbox>() {
        Ok(from) => message = message.from(from),
        Err(e) => return failed(format!("from: {e}")),
    }
    for to in &channel.to {
        match to.parse::<Mailbox>() {
            Ok(to) => message = message.to(to),
            Err(e) => return failed(format!("to {to}: {e}")),
        }
    }
    let message = match message
        .header(ContentType::TEXT_PLAIN)
        .message_id(Some(format!("<notification-{}-{}@restic-manager>", payload.id, payload.since)))
        .body(payload.text.clone())
    {
        Ok(m) => m,
        Err(e) => return failed(format!("the message cannot be built: {e}")),
    };
    match mailer.send(&message) {
        Ok(response) => {
            let text: Vec<&str> = response.message().collect();
            Outcome { ok: response.is_positive(), answer: format!("SMTP {} {}", response.code(), text.join(" ")) }
        }
        Err(e) => failed(format!("SMTP: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_slack_text_are_safe() {
        assert_eq!(header_text("Backup failed: hôst\r\nX: y"), "Backup failed: h?st??X: y");
        let mut p = sample(Some("https://rm.example/ui/hosts/a1".into()));
        p.title = "a <b> & c".into();
        p.text = "<!channel>".into();
        let text = slack_text(&p);
        assert!(text.starts_with("*a &lt;b&gt; &amp; c*\n&lt;!channel&gt;"), "{text}");
        assert!(text.ends_with("<https://rm.example/ui/hosts/a1|Open the host>"), "{text}");
    }
}
