//! `restic-manager-server channel|rule|notifications …`: notifications from the command line, straight against the
//! database like `repo`, with the same validation and audit events as the API (source `cli`). A channel's JSON
//! comes on standard input, so its secrets are never in argv; they are sealed with the data dir's `secret.key`.

use std::io::Read;

use anyhow::{Context, bail};
use rm_fleet::AuditEvent;
use rm_protocol::notify::{ChannelList, ChannelSpec, NotificationList, RuleList, RuleSpec, RuleView};

use crate::cli::{ChannelCommand, NotificationsArgs, RuleCommand, ServeArgs};
use crate::token::open_existing_db;

fn audit(kind: &str) -> AuditEvent {
    AuditEvent { at: rm_fleet::now(), kind: kind.into(), source: Some("cli".into()), ..Default::default() }
}

pub async fn channel(args: &ServeArgs, command: ChannelCommand) -> anyhow::Result<()> {
    let db = open_existing_db(args)?;
    let (key, _) = rm_fleet::unlock(&db, &args.data_dir, false).context("cannot use the secret key")?;
    match command {
        ChannelCommand::Add => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).context("cannot read the channel's JSON from stdin")?;
            let spec: ChannelSpec = serde_json::from_str(&text).context("the channel's JSON")?;
            spec.validate().map_err(anyhow::Error::msg)?;
            let now = rm_fleet::now();
            let name = spec.name.clone();
            let created = db
                .call(move |c| rm_fleet::notify::create_channel(c, &key, now, &spec, audit("notify_channel")))
                .await?;
            if created.is_err() {
                bail!("a channel named {name:?} already exists");
            }
            println!("channel {name} created");
        }
        ChannelCommand::List { json } => {
            let channels = db
                .call(move |c| {
                    let mut out = Vec::new();
                    for row in rm_fleet::notify::list_channels(c, &key)? {
                        let origin = match rm_fleet::notify::channel_for_send(c, &key, &row.spec.name)? {
                            Some(Ok(full)) => full.url.as_deref().map(rm_protocol::notify::url_origin),
                            _ => None,
                        };
                        out.push(rm_server::channel_view(row, origin));
                    }
                    Ok(out)
                })
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&ChannelList { channels })?);
            } else {
                println!("NAME\tKIND\tTARGET\tSECRETS");
                for c in channels {
                    let target = match (&c.url_origin, &c.smtp_host) {
                        (Some(origin), _) => origin.clone(),
                        (None, Some(host)) => format!("{host} -> {}", c.to.join(",")),
                        _ => String::new(),
                    };
                    println!("{}\t{}\t{target}\t{}", c.name, c.kind, c.secrets_set.join(","));
                }
            }
        }
        ChannelCommand::Rm { name } => {
            let what = name.clone();
            if !db.call(move |c| rm_fleet::notify::delete_channel(c, &what, audit("notify_channel"))).await? {
                bail!("no channel named {name:?}");
            }
            println!("channel {name} deleted");
        }
        ChannelCommand::Test { name } => {
            let what = name.clone();
            let channel = db
                .call(move |c| rm_fleet::notify::channel_for_send(c, &key, &what))
                .await?
                .with_context(|| format!("no channel named {name:?}"))??;
            let sample = rm_server::notify::sample(args.public_url.as_ref().map(|u| u.to_string()));
            let outcome = tokio::task::spawn_blocking(move || rm_server::notify::send(&channel, &sample)).await?;
            let detail = format!("tested {name}: ok={} {}", outcome.ok, outcome.answer);
            let event = AuditEvent { detail: Some(detail), ..audit("notify_channel_test") };
            db.call(move |c| rm_fleet::record_audit(c, &event)).await?;
            println!("{}", outcome.answer);
            if !outcome.ok {
                bail!("the channel did not accept the message");
            }
        }
    }
    Ok(())
}

pub async fn rule(args: &ServeArgs, command: RuleCommand) -> anyhow::Result<()> {
    let db = open_existing_db(args)?;
    match command {
        RuleCommand::Add { name, channel, events, labels, warning_digest } => {
            let rule = RuleSpec { name, channel, events, labels: labels.into_iter().collect(), warning_digest };
            rule.validate().map_err(anyhow::Error::msg)?;
            let now = rm_fleet::now();
            let stored = rule.clone();
            db.call(move |c| rm_fleet::notify::create_rule(c, now, &stored, audit("notify_rule")))
                .await?
                .map_err(anyhow::Error::msg)?;
            println!("rule {} created", rule.name);
        }
        RuleCommand::List { json } => {
            let rules = db.call(rm_fleet::notify::list_rules).await?;
            let rules: Vec<RuleView> =
                rules.into_iter().map(|(rule, created_at)| RuleView { rule, created_at }).collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&RuleList { rules })?);
            } else {
                println!("NAME\tCHANNEL\tEVENTS\tLABELS\tDIGEST");
                for r in rules {
                    let r = r.rule;
                    let events = if r.events.is_empty() {
                        "all".into()
                    } else {
                        r.events.iter().map(|e| e.as_str()).collect::<Vec<_>>().join(",")
                    };
                    let labels = r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
                    println!("{}\t{}\t{events}\t{labels}\t{}", r.name, r.channel, r.warning_digest);
                }
            }
        }
        RuleCommand::Rm { name } => {
            let what = name.clone();
            if !db.call(move |c| rm_fleet::notify::delete_rule(c, &what, audit("notify_rule"))).await? {
                bail!("no rule named {name:?}");
            }
            println!("rule {name} deleted");
        }
    }
    Ok(())
}

pub async fn notifications(args: &ServeArgs, a: &NotificationsArgs) -> anyhow::Result<()> {
    let db = open_existing_db(args)?;
    if !(1..=1000).contains(&a.limit) {
        bail!("--limit must be 1-1000");
    }
    let (status, limit) = (a.status, a.limit);
    let list = db.call(move |c| rm_fleet::notify::list_notifications(c, status, limit)).await?;
    println!("{}", serde_json::to_string_pretty(&NotificationList { notifications: list })?);
    Ok(())
}
