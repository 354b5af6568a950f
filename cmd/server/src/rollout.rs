//! `restic-manager-server rollout …`: staged agent rollouts against the data dir's database (the same functions as
//! `/api/v1/rollouts`, audit source `cli`). The running server's rollout task picks changes up at its next tick.

use anyhow::{Context, bail};
use rm_assets::AssetStore;
use rm_protocol::rollout::{CreateRollout, ResumeRollout, RolloutView, Strategy, TargetSpec};
use rm_server::rollout_api::{Action, apply, atomically, create_in, parse_verb};

use crate::cli::{RolloutCommand, ServeArgs};
use crate::token::open_existing_db;

fn tuning(args: &ServeArgs) -> rm_fleet::rollouts::Tuning {
    let interval = args.heartbeat_interval.as_secs().max(1);
    // The CLI does not know when the server started; a start or verb here never fails hosts itself.
    rm_fleet::rollouts::Tuning {
        booted_at: rm_fleet::now(),
        stale_after_secs: args.stale_after.as_secs(),
        default_lost_after_secs: (3 * interval).max(3),
    }
}

pub async fn run(args: &ServeArgs, command: RolloutCommand) -> anyhow::Result<()> {
    let db = open_existing_db(args)?;
    let tuning = tuning(args);
    let (id, verb, resume) = match command {
        RolloutCommand::List { json } => {
            let list = db.call(|c| rm_server::rollouts::list_views(c, 100)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rm_protocol::rollout::RolloutList { rollouts: list })?);
            } else {
                print!("{}", table(&list));
            }
            return Ok(());
        }
        RolloutCommand::Show { id } => {
            let view = db.call(move |c| rm_server::rollouts::load_view(c, id, true)).await?;
            let Some(view) = view else { bail!("no rollout {id} (see `rollout list`)") };
            println!("{}", serde_json::to_string_pretty(&view)?);
            return Ok(());
        }
        RolloutCommand::Create { strategy, targets, start } => {
            let strategy = strategy
                .map(|s| serde_json::from_str::<Strategy>(&s).context("--strategy is not a rollout strategy"))
                .transpose()?;
            let targets = if targets.is_empty() {
                None
            } else {
                Some(targets.iter().map(|t| parse_target(t)).collect::<anyhow::Result<Vec<_>>>()?)
            };
            let store =
                AssetStore::new(&args.data_dir, &args.bundled_assets_dir).context("cannot read the asset roots")?;
            let served: Vec<_> = rm_server::catalog::entries_blocking(&store, "")
                .into_iter()
                .map(|(_, entry)| entry)
                .collect::<Result<_, _>>()
                .context("cannot inspect the published agent builds")?;
            let default = args.rollout_strategy.0.clone();
            let spec = CreateRollout { targets, strategy, start };
            let view = db
                .call(move |c| atomically(c, |c| create_in(c, spec, &served, default.as_ref(), tuning, "cli")))
                .await?
                .map_err(anyhow::Error::msg)?;
            println!("rollout {} {}", view.id, view.state);
            return Ok(());
        }
        RolloutCommand::Start { id } => (id, "start", ResumeRollout::default()),
        RolloutCommand::Pause { id } => (id, "pause", ResumeRollout::default()),
        RolloutCommand::Resume { id, skip_failed } => (id, "resume", ResumeRollout { skip_failed }),
        RolloutCommand::Abort { id } => (id, "abort", ResumeRollout::default()),
        RolloutCommand::Rollback { id } => (id, "rollback", ResumeRollout::default()),
    };
    let action: Action = parse_verb(verb, resume).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    db.call(move |c| apply(c, id, action, tuning, "cli")).await?.map_err(anyhow::Error::msg)?;
    let view = db.call(move |c| rm_server::rollouts::load_view(c, id, false)).await?.context("rollout vanished")?;
    println!("rollout {id} {}", view.state);
    Ok(())
}

/// `linux/amd64=<sha256>`.
fn parse_target(text: &str) -> anyhow::Result<TargetSpec> {
    let (platform, sha) = text.split_once('=').context("--target: use os/arch=sha256")?;
    let (os, arch) = platform.split_once('/').context("--target: use os/arch=sha256")?;
    if !rm_protocol::validate::is_sha256_hex(sha) {
        bail!("--target {text:?}: not a SHA-256");
    }
    Ok(TargetSpec { os: os.into(), arch: arch.into(), sha256: sha.to_ascii_lowercase() })
}

fn table(list: &[RolloutView]) -> String {
    let mut out = String::from("ID\tSTATE\tTARGETS\tWAVE\tVERIFIED/HOSTS\tFAILED\tCREATED\n");
    for r in list {
        let targets: Vec<_> = r
            .targets
            .iter()
            .map(|t| format!("{}/{}={}", t.os, t.arch, &t.to_sha256[..12.min(t.to_sha256.len())]))
            .collect();
        let total: u32 = r.counts.values().sum();
        let count = |s| r.counts.get(&s).copied().unwrap_or(0);
        use rm_protocol::rollout::HostState;
        out.push_str(&format!(
            "{}\t{}\t{}\t{}/{}\t{}/{}\t{}\t{}\n",
            r.id,
            r.state,
            targets.join(","),
            r.current_wave,
            r.waves.len().saturating_sub(1),
            count(HostState::Verified),
            total,
            count(HostState::Failed),
            r.created_at,
        ));
        if let Some(h) = &r.halt {
            out.push_str(&format!("\thalted: {}\n", h.reason));
        }
    }
    out
}
