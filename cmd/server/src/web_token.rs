//! `restic-manager-server web-token …`: sign-in tokens for the web page, straight against the database (SQLite WAL
//! lets this run beside a live server).

use anyhow::bail;
use rm_fleet::web_tokens::{self, NewWebToken, WebTokenInfo};

use crate::cli::{ServeArgs, WebTokenCommand};
use crate::token::open_existing_db;

pub async fn run(args: &ServeArgs, command: WebTokenCommand) -> anyhow::Result<()> {
    let db = open_existing_db(args)?;
    let now = rm_fleet::now();
    match command {
        WebTokenCommand::Create { note, expires } => {
            let new = NewWebToken::validated(&note, expires, now).map_err(anyhow::Error::msg)?;
            let (info, secret) = db.call(move |c| web_tokens::create_web_token(c, now, &new)).await?;
            println!("{secret}");
            eprintln!("{}", describe(&info, now));
            eprintln!(
                "This token is shown once; store it now. Sign in to the web page with it. Revoke it (and end its \
                 sessions) with: restic-manager-server web-token revoke {}",
                info.id
            );
        }
        WebTokenCommand::List => {
            let tokens = db.call(web_tokens::list_web_tokens).await?;
            if tokens.is_empty() {
                eprintln!("no web tokens");
            }
            for info in tokens {
                println!("{}", describe(&info, now));
            }
        }
        WebTokenCommand::Revoke { id } => {
            let lookup = id.clone();
            match db.call(move |c| web_tokens::revoke_web_token(c, now, &lookup)).await? {
                Some((info, ended)) => {
                    println!("{}", describe(&info, now));
                    eprintln!("{ended} session(s) ended");
                }
                None => bail!("no web token with id {id:?}"),
            }
        }
    }
    Ok(())
}

fn describe(info: &WebTokenInfo, now: rm_fleet::Timestamp) -> String {
    let expires = info.expires_at.map_or("never".to_string(), rm_fleet::rfc3339);
    format!(
        "id={} status={} created={} expires={expires} note={:?}",
        info.id,
        info.status(now),
        rm_fleet::rfc3339(info.created_at),
        info.note
    )
}
