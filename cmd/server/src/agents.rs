//! `restic-manager-server agents list|label`: the fleet view from the command line, straight from the data dir's
//! database and the asset roots (works with the server running or stopped), and agents' labels.

use anyhow::{Context, bail};
use rm_assets::AssetStore;
use rm_fleet::AuditEvent;
use rm_protocol::admin::{AgentFilter, AgentList, AgentState};
use rm_protocol::backup::Health;

use crate::cli::ServeArgs;
use crate::token::open_existing_db;

pub async fn list(
    args: &ServeArgs,
    state: Option<AgentState>,
    health: Option<Health>,
    json: bool,
) -> anyhow::Result<()> {
    let db = open_existing_db(args)?;
    let store = AssetStore::new(&args.data_dir, &args.bundled_assets_dir).context("cannot read the asset roots")?;
    let served: Vec<_> = rm_server::catalog::entries_blocking(&store, "")
        .into_iter()
        .map(|(_, entry)| entry)
        .collect::<Result<_, _>>()
        .context("cannot inspect the published agent builds")?;
    let now = rm_fleet::now();
    let (agents, backups, repositories) = db
        .call(move |c| {
            Ok((rm_fleet::list_agents(c)?, rm_fleet::backup_health(c, now)?, rm_fleet::repository_health(c)?))
        })
        .await?;
    let filter = AgentFilter { state, health };
    let mut view = rm_server::catalog::fleet_view(agents, &served, now, args.stale_after, &filter, backups);
    let restic: Vec<_> =
        rm_protocol::PLATFORMS.iter().map(|&p| rm_server::catalog::restic_entry_blocking(&store, p, "")).collect();
    rm_server::catalog::fill_restic_drift(&mut view, &restic);
    let view = AgentList { repositories: rm_server::catalog::sorted_repositories(repositories), ..view };
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print!("{}", table(&view));
    }
    Ok(())
}

/// `agents label ID [k=v …]`: replaces the agent's labels (no pairs: removes them all).
pub async fn label(args: &ServeArgs, id: String, pairs: Vec<(String, String)>) -> anyhow::Result<()> {
    let db = open_existing_db(args)?;
    let labels: rm_fleet::Labels = pairs.into_iter().collect();
    rm_fleet::validate_labels("labels", &labels).map_err(anyhow::Error::msg)?;
    let audit = AuditEvent { at: rm_fleet::now(), source: Some("cli".into()), ..Default::default() };
    let lookup = id.clone();
    match db.call(move |c| rm_fleet::set_labels(c, &lookup, &labels, audit)).await? {
        Some(record) => println!("{}\t{}", record.id, rm_fleet::labels::describe(&record.labels)),
        None => bail!("no agent with id {id:?} (see `agents list`)"),
    }
    Ok(())
}

/// `0.14.0 (current)`, `0.14.0 (behind 0.16.4)`, `- (missing)`, `-`: the host's restic and its drift from the served one.
fn restic_cell(a: &rm_protocol::admin::AgentView) -> String {
    use rm_protocol::restic_dist::ResticDrift;
    let version = a.restic.as_ref().filter(|r| r.error.is_none()).and_then(|r| r.version.clone());
    let version = version.unwrap_or_else(|| "-".into());
    match (a.restic_drift, &a.restic_served) {
        (None, _) => version,
        (Some(d @ (ResticDrift::Behind | ResticDrift::Ahead)), Some(served)) => format!("{version} ({d} {served})"),
        (Some(d), _) => format!("{version} ({d})"),
    }
}

/// One line per agent under a header, then the counts per state and per backup health.
fn table(view: &AgentList) -> String {
    let header = ["HOSTNAME", "ID", "PLATFORM", "VERSION", "STATE", "HEALTH", "LAST SEEN", "RESTIC"];
    let rows: Vec<[String; 8]> = view
        .agents
        .iter()
        .map(|a| {
            [
                a.hostname.clone(),
                a.id.clone(),
                format!("{}/{}", a.os, a.arch),
                a.agent_version.clone(),
                a.state.to_string(),
                a.health.map_or_else(|| "-".to_owned(), |h| h.to_string()),
                a.last_seen.clone(),
                restic_cell(a),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let padded: Vec<String> = cells.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(&header);
    for row in &rows {
        out += &line(&row.each_ref().map(String::as_str));
    }
    let counts: Vec<String> = view.counts.iter().map(|(state, n)| format!("{state}={n}")).collect();
    let total: usize = view.counts.values().sum();
    let shown =
        if view.agents.len() == total { total.to_string() } else { format!("{} of {total}", view.agents.len()) };
    out += &format!("{shown} agents ({})\n", if counts.is_empty() { "none".into() } else { counts.join(" ") });
    if !view.health_counts.is_empty() {
        let health: Vec<String> = view.health_counts.iter().map(|(h, n)| format!("{h}={n}")).collect();
        out += &format!("backup health: {}\n", health.join(" "));
    }
    if !view.repositories.is_empty() {
        out += "\nREPOSITORY  HEALTH  LAST PRUNE  LAST CHECK\n";
        let last = |run: &Option<rm_protocol::maintenance::MaintenanceRun>| {
            run.as_ref()
                .map_or_else(|| "-".to_owned(), |r| format!("{} {}", r.status, rm_fleet::rfc3339(r.finished_at)))
        };
        for r in &view.repositories {
            out += &format!("{}  {}  {}  {}\n", r.repository, r.health, last(&r.last_prune), last(&r.last_check));
        }
    }
    out
}
