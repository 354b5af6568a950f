//! `restic-manager-server token …`: enrollment tokens from the command line, straight against the database (SQLite
//! WAL lets this run beside a live server).

use anyhow::{Context, bail};
use rm_fleet::Db;
use rm_fleet::{NewToken, TokenInfo};

use crate::cli::{ServeArgs, TokenCommand};

/// The data dir's database, which must already exist: a mistyped `--data-dir` must not get a new, empty one.
pub fn open_existing_db(args: &ServeArgs) -> anyhow::Result<Db> {
    let path = args.data_dir.join(rm_server::DB_FILE);
    if !path.is_file() {
        bail!(
            "no database at {}: is the data dir right (--data-dir or RM_DATA_DIR)? The server creates it on its \
             first start",
            path.display()
        );
    }
    Db::open(&path).context("cannot open the database")
}

pub async fn run(args: &ServeArgs, command: TokenCommand) -> anyhow::Result<()> {
    let db = open_existing_db(args)?;
    let now = rm_fleet::now();
    match command {
        TokenCommand::Create { uses, expires, note } => {
            let new = NewToken::validated(uses, expires, note, now).map_err(anyhow::Error::msg)?;
            let (info, token) = db.call(move |c| rm_fleet::create_token(c, now, &new)).await?;
            println!("{token}");
            eprintln!("{}", describe(&info, now));
            eprintln!(
                "This token is shown once; store it now. Revoke it with: restic-manager-server token revoke {}",
                info.id
            );
        }
        TokenCommand::List => {
            let tokens = db.call(rm_fleet::list_tokens).await?;
            if tokens.is_empty() {
                eprintln!("no enrollment tokens");
            }
            for info in tokens {
                println!("{}", describe(&info, now));
            }
        }
        TokenCommand::Revoke { id } => {
            let lookup = id.clone();
            match db.call(move |c| rm_fleet::revoke_token(c, now, &lookup)).await? {
                Some(info) => println!("{}", describe(&info, now)),
                None => bail!("no enrollment token with id {id:?}"),
            }
        }
    }
    Ok(())
}

fn describe(info: &TokenInfo, now: rm_fleet::Timestamp) -> String {
    let uses = match info.max_uses {
        Some(max) => format!("{}/{max}", info.uses),
        None => format!("{}/unlimited", info.uses),
    };
    let expires = info.expires_at.map_or("never".to_string(), rm_fleet::rfc3339);
    format!("id={} status={} uses={uses} expires={expires} note={:?}", info.id, info.status(now), info.note)
}
