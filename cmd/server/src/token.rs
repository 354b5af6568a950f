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
        TokenCommand::Create { uses, expires, note, labels } => {
            let labels = labels.into_iter().collect();
            let new = NewToken::validated(uses, expires, note, labels, now).map_err(anyhow::Error::msg)?;
            let (info, token) = db.call(move |c| rm_fleet::create_token(c, now, &new)).await?;
            println!("{token}");
            eprintln!("{}", describe(&info, now));
            eprintln!(
                "This token is shown once; store it now. Revoke it with: restic-manager-server token revoke {}",
                info.id
            );
            eprint!("{}", install_lines(args, &token));
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

/// The exact install commands for this server: its public URL (or the listen address and this machine's name), and
/// the certificate's key pin when the certificate is self-signed (no public CA vouches for it).
fn install_lines(args: &ServeArgs, token: &str) -> String {
    let tls = args.tls_config();
    let cert = tls.cert.clone().unwrap_or_else(|| args.data_dir.join("tls").join(rm_server::tls::CERT_FILE));
    let tls_on = tls.mode != rm_server::tls::TlsMode::Off && cert.is_file();
    let url = match &args.public_url {
        Some(url) => url.to_string(),
        None => {
            let host = if args.listen.ip().is_unspecified() {
                std::fs::read_to_string("/proc/sys/kernel/hostname").map_or("SERVER".into(), |h| h.trim().to_owned())
            } else {
                args.listen.ip().to_string()
            };
            let scheme = if tls_on { "https" } else { "http" };
            format!("{scheme}://{}:{}", if host.contains(':') { format!("[{host}]") } else { host }, args.listen.port())
        }
    };
    let pin = tls_on.then(|| pinned_key(&cert)).flatten();
    let mut out = format!(
        "\nInstall on each Linux host (as root):\n  {}\nInstall on each Windows host (elevated PowerShell):\n  {}\n",
        rm_server::install_lines::linux(&url, token, pin.as_deref()),
        rm_server::install_lines::windows(&url, token)
    );
    if pin.is_some() {
        out += "  (the certificate is self-signed: curl and the agent check its key against the pin; the Windows \
                installer cannot pin a key, so trust the certificate on Windows hosts first)\n";
    }
    if args.public_url.is_none() {
        out += "  (set --public-url if hosts reach this server under another name)\n";
    }
    out
}

/// The pin of a self-signed certificate file (`None` for a publicly issued one, or one that cannot be read).
fn pinned_key(cert: &std::path::Path) -> Option<String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_file(cert).ok()?;
    rm_protocol::pin::is_self_signed(&der).ok()?.then(|| rm_protocol::pin::pin_of_certificate(&der).ok()).flatten()
}

fn describe(info: &TokenInfo, now: rm_fleet::Timestamp) -> String {
    let uses = match info.max_uses {
        Some(max) => format!("{}/{max}", info.uses),
        None => format!("{}/unlimited", info.uses),
    };
    let expires = info.expires_at.map_or("never".to_string(), rm_fleet::rfc3339);
    let mut line =
        format!("id={} status={} uses={uses} expires={expires} note={:?}", info.id, info.status(now), info.note);
    if !info.labels.is_empty() {
        line += &format!(" labels={}", rm_fleet::labels::describe(&info.labels));
    }
    line
}
