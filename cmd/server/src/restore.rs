//! `restic-manager-server restore --agent ID --snapshot S [--include P]... [--target DIR] [--overwrite]`: queues a
//! restore straight in the data dir's database, like `plan run` (works beside a running server, which cannot be woken
//! from another process: the agent takes it when its long-poll's wait ends and the server reads the database again,
//! within about 25 s, or at its next heartbeat if that is sooner). The same checks and audit event
//! (`restore_requested`, source `cli`) as the API.

use anyhow::bail;
use rm_fleet::AuditEvent;
use rm_fleet::restores::{RestoreRefused, request_restore};
use rm_protocol::restore::CreateRestore;

use crate::cli::{RestoreArgs, ServeArgs};
use crate::token::open_existing_db;

pub async fn run(args: &ServeArgs, restore: &RestoreArgs) -> anyhow::Result<()> {
    let db = open_existing_db(args)?;
    let now = rm_fleet::now();
    let event = AuditEvent { at: now, source: Some("cli".into()), ..Default::default() };
    let spec = CreateRestore {
        snapshot: restore.snapshot.clone(),
        include: restore.include.clone(),
        target: restore.target.clone(),
        overwrite: restore.overwrite,
        source_agent: restore.source_agent.clone(),
    };
    let agent = restore.agent.clone();
    let outcome = db.call(move |c| request_restore(c, now, &agent, &spec, event)).await?;
    match outcome {
        Ok((operation_id, _)) => println!("{operation_id}"),
        Err(RestoreRefused::UnknownAgent(id)) => bail!("no agent with id {id:?} (see `agents list`)"),
        Err(refused) => bail!("{refused}"),
    }
    Ok(())
}
