//! `restic-manager-server plan …`: backup plans from the command line, straight against the database like `repo`
//! (works through `docker exec` beside a running server). Changes bump the configuration revision and are audited
//! with source `cli`, exactly as through the API.

use anyhow::bail;
use rm_fleet::{AuditEvent, NewPlan, PlanInfo, PlanRefused};
use rm_protocol::backup::{CreatePlan, PlanList};
use rm_protocol::retention::Retention;

use crate::cli::{PlanCommand, ServeArgs};
use crate::token::open_existing_db;

pub async fn run(args: &ServeArgs, command: PlanCommand) -> anyhow::Result<()> {
    let db = open_existing_db(args)?;
    let now = rm_fleet::now();
    let audit = || AuditEvent { at: now, source: Some("cli".into()), ..Default::default() };
    match command {
        PlanCommand::Add {
            name,
            repo,
            paths,
            excludes,
            schedule,
            timezone,
            tags,
            one_file_system,
            exclude_caches,
            agents,
            selector,
            timeout,
            jitter,
            keep_last,
            keep_hourly,
            keep_daily,
            keep_weekly,
            keep_monthly,
            keep_yearly,
            keep_within,
            keep_tag,
        } => {
            let retention = Retention {
                last: keep_last,
                hourly: keep_hourly,
                daily: keep_daily,
                weekly: keep_weekly,
                monthly: keep_monthly,
                yearly: keep_yearly,
                within: keep_within,
                keep_tag,
                ..Default::default()
            };
            let spec = CreatePlan {
                name,
                repository: repo,
                paths,
                excludes,
                schedule,
                timezone,
                tags,
                one_file_system,
                exclude_caches,
                agents,
                selector: selector.into_iter().collect(),
                timeout,
                jitter,
                retention: (!retention.keeps_nothing()).then_some(retention),
            };
            let plan = NewPlan::validated(spec).map_err(anyhow::Error::msg)?;
            let event = audit();
            let created = db
                .call(move |c| {
                    Ok(match rm_fleet::create_plan(c, now, &plan, event)? {
                        Ok(info) => Ok((info, rm_fleet::plans::agent_labels(c)?, rm_fleet::plans::agent_hostnames(c)?)),
                        Err(r) => Err(r),
                    })
                })
                .await?;
            match created {
                Ok((info, agents, hosts)) => {
                    println!("{}", describe(&info, &agents));
                    warn(&info, &agents, &hosts);
                }
                Err(refused) => bail!("{refused}"),
            }
        }
        PlanCommand::List { json } => {
            let (plans, agents, hosts) = db
                .call(|c| {
                    let hosts = rm_fleet::plans::agent_hostnames(c)?;
                    Ok((rm_fleet::list_plans(c)?, rm_fleet::plans::agent_labels(c)?, hosts))
                })
                .await?;
            if json {
                let views = plans.into_iter().map(|p| rm_server::plan_view(p, &agents, &hosts)).collect();
                let list = PlanList { plans: views };
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            if plans.is_empty() {
                eprintln!("no plans");
            }
            for info in plans {
                println!("{}", describe(&info, &agents));
                warn(&info, &agents, &hosts);
            }
        }
        PlanCommand::Rm { name } => {
            let (event, lookup) = (audit(), name.clone());
            if !db.call(move |c| rm_fleet::delete_plan(c, now, &lookup, event)).await? {
                bail!("no plan named {name:?}");
            }
            println!("deleted {name}");
        }
        PlanCommand::Run { name, agent } => {
            let event = audit();
            let outcome = db.call(move |c| rm_fleet::request_run(c, now, &name, &agent, event)).await?;
            match outcome {
                Ok(operation_id) => println!("{operation_id}"),
                Err(PlanRefused::UnknownAgent(id)) => bail!("no agent with id {id:?} (see `agents list`)"),
                Err(refused) => bail!("{refused}"),
            }
        }
    }
    Ok(())
}

/// The plan's warnings (`PlanView::warnings`), one `warning: plan <name>: …` line each on standard error (standard
/// output stays one line per plan).
fn warn(info: &PlanInfo, agents: &[(String, rm_fleet::Labels)], hosts: &std::collections::BTreeMap<String, String>) {
    let applies = rm_fleet::plans::applies_to(info, agents);
    for warning in rm_fleet::plans::plan_warnings(info, &applies, hosts) {
        eprintln!("warning: plan {}: {warning}", info.plan.name);
    }
}

/// One line per plan: name, repository, schedule, paths, retention, and whom it applies to.
fn describe(info: &PlanInfo, agents: &[(String, rm_fleet::Labels)]) -> String {
    let p = &info.plan;
    let applies = rm_fleet::plans::applies_to(info, agents);
    let selector = if p.selector.is_empty() { "-".into() } else { rm_fleet::labels::describe(&p.selector) };
    format!(
        "{}\trepo {}\tschedule {:?} ({:?})\tpaths {}\tkeep {}\tagents {}\tselector {selector}\tapplies to {}",
        p.name,
        p.repository,
        p.schedule,
        p.timezone,
        p.paths.join(","),
        p.retention.as_ref().map_or_else(|| "all".into(), Retention::describe),
        if p.agents.is_empty() { "-".into() } else { p.agents.join(",") },
        if applies.is_empty() { "none".into() } else { applies.join(",") }
    )
}
