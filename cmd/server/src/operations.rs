//! `restic-manager-server operations`: the operations agents reported, newest first, straight from the data dir's
//! database (works with the server running or stopped, and through `docker exec`).

use rm_protocol::backup::{OperationPage, OperationQuery, OperationView};

use crate::cli::{OperationsArgs, ServeArgs};
use crate::token::open_existing_db;

pub async fn run(args: &ServeArgs, op: &OperationsArgs) -> anyhow::Result<()> {
    let db = open_existing_db(args)?;
    let query = OperationQuery {
        agent: op.agent.clone(),
        plan: op.plan.clone(),
        status: op.status,
        kind: op.kind,
        repository: op.repository.clone(),
        before: None,
        limit: Some(op.limit),
    };
    let (operations, next_before) = db.call(move |c| rm_fleet::list_operations(c, &query)).await?;
    if op.json {
        println!("{}", serde_json::to_string_pretty(&OperationPage { operations, next_before })?);
    } else if operations.is_empty() {
        eprintln!("no operations");
    } else {
        print!("{}", table(&operations));
    }
    Ok(())
}

/// Bytes as restic shows them (binary units).
fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// One line per operation under a header; a failure's first message line last.
fn table(operations: &[OperationView]) -> String {
    let header =
        ["STARTED", "HOST", "PLAN", "KIND", "TRIGGER", "STATUS", "DURATION", "ADDED", "SNAPSHOT", "ID", "MESSAGE"];
    let word = |v: serde_json::Result<serde_json::Value>| {
        v.ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
    };
    let rows: Vec<[String; 11]> = operations
        .iter()
        .map(|o| {
            [
                rm_fleet::rfc3339(o.started_at.unwrap_or(o.created_at)),
                o.hostname.clone().unwrap_or_else(|| o.agent_id.clone()),
                // A repository's prune or check names its repository: `repo:<name>`.
                o.repository.as_ref().map_or_else(|| o.plan.clone(), |r| format!("repo:{r}")),
                word(serde_json::to_value(o.kind)),
                word(serde_json::to_value(o.trigger)),
                o.status.to_string(),
                o.duration_ms.map_or_else(|| "-".into(), |ms| format!("{:.1}s", ms as f64 / 1000.0)),
                o.summary.as_ref().map_or_else(|| "-".into(), |s| size(s.data_added)),
                o.summary
                    .as_ref()
                    .and_then(|s| s.snapshot_id.as_deref())
                    .map_or_else(|| "-".into(), |id| id.chars().take(8).collect()),
                o.id.clone(),
                match (&o.forget, o.message.as_deref().and_then(|m| m.lines().next())) {
                    (_, Some(first)) => first.chars().take(120).collect(),
                    (Some(f), None) => format!("removed {}, kept {}", f.removed, f.kept),
                    (None, None) => String::new(),
                },
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
    out
}
