//! `restic-manager-server repo …`: restic repositories from the command line, straight against the database like
//! `token`. Secrets are sealed with the data dir's `secret.key`, which must exist (the server creates it); secrets
//! never come from argv: the password from standard input or `RM_REPO_PASSWORD`, environment values from this
//! command's own environment.

use std::collections::BTreeMap;
use std::io::BufRead;

use anyhow::{Context, bail};
use rm_fleet::{AuditEvent, NewRepository};
use rm_protocol::admin::RepositoryList;
use rm_protocol::maintenance::{CheckPolicy, PrunePolicy};

use crate::cli::{RepoCommand, ServeArgs};
use crate::token::open_existing_db;

pub async fn run(args: &ServeArgs, command: RepoCommand) -> anyhow::Result<()> {
    let db = open_existing_db(args)?;
    let now = rm_fleet::now();
    // Who made the change (the detail is filled in by rm_fleet).
    let audit = || AuditEvent { at: now, source: Some("cli".into()), ..Default::default() };
    match command {
        RepoCommand::Add {
            name,
            url,
            password_stdin,
            env,
            ca_cert,
            auto_init,
            min_restic_version,
            prune_schedule,
            prune_max_unused,
            check_schedule,
            check_read_data_subset,
        } => {
            let (key, _) = rm_fleet::unlock(&db, &args.data_dir, false).context("cannot use the secret key")?;
            let password = if password_stdin {
                let mut line = String::new();
                std::io::stdin().lock().read_line(&mut line).context("cannot read the password from stdin")?;
                line.strip_suffix('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)).unwrap_or(&line).to_owned()
            } else {
                match std::env::var("RM_REPO_PASSWORD") {
                    Ok(password) => password,
                    Err(_) => bail!("no password: pipe it with --password-stdin or set RM_REPO_PASSWORD"),
                }
            };
            let mut values = BTreeMap::new();
            for var in env {
                let Ok(value) = std::env::var(&var) else {
                    bail!("--env {var}: the variable is not set in this command's environment");
                };
                values.insert(var, value);
            }
            let ca_cert = match ca_cert {
                Some(path) => {
                    Some(std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?)
                }
                None => None,
            };
            let prune = prune_schedule.map(|schedule| PrunePolicy {
                schedule,
                max_unused: prune_max_unused,
                ..Default::default()
            });
            let check = check_schedule.map(|schedule| CheckPolicy {
                schedule,
                read_data_subset: check_read_data_subset,
                ..Default::default()
            });
            let new = NewRepository {
                name,
                url,
                password,
                env: values,
                ca_cert,
                auto_init,
                min_restic_version,
                prune,
                check,
            };
            new.validate().map_err(anyhow::Error::msg)?;
            let event = audit();
            let created = db
                .call(move |c| Ok(rm_fleet::create_repository(c, &key, now, &new, event)?.map_err(|_| new.name)))
                .await?;
            match created {
                Ok(info) => println!("{}", describe(&info)),
                Err(name) => bail!("a repository named {name:?} already exists"),
            }
        }
        RepoCommand::List { json } => {
            let rows = db.call(rm_fleet::list_repositories).await?;
            if json {
                let list = RepositoryList { repositories: rows.into_iter().map(rm_server::repository_view).collect() };
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            if rows.is_empty() {
                eprintln!("no repositories");
            }
            for info in rows {
                println!("{}", describe(&info));
            }
        }
        RepoCommand::Rm { name } => {
            let (event, lookup) = (audit(), name.clone());
            let deleted =
                db.call(move |c| rm_fleet::delete_repository(c, &lookup, event)).await?.map_err(anyhow::Error::msg)?;
            if !deleted {
                bail!("no repository named {name:?}");
            }
            println!("deleted {name}");
        }
    }
    Ok(())
}

fn describe(info: &rm_fleet::RepositoryInfo) -> String {
    let env = if info.env_names.is_empty() { "-".to_owned() } else { info.env_names.join(",") };
    let mut line = format!(
        "{}\t{}\tpassword set\tenv {env}\tca_cert {}\tauto_init {}",
        info.name,
        info.url,
        if info.ca_cert.is_some() { "set" } else { "-" },
        info.auto_init
    );
    if let Some(p) = &info.prune {
        line += &format!("\tprune {:?} max_unused {}", p.schedule, p.max_unused.as_deref().unwrap_or("default"));
    }
    if let Some(c) = &info.check {
        line += &format!("\tcheck {:?} read_data_subset {}", c.schedule, c.read_data_subset.as_deref().unwrap_or("-"));
    }
    line
}
