//! The `repositories` table: restic repositories defined on the server. The password and the environment values are
//! sealed ([`crate::sealing`]) under the data dir's key; the environment's variable *names* are kept in clear so
//! they can be listed. Rows never carry plaintext secrets out of this module except through
//! [`repository_secrets`].

use std::collections::BTreeMap;

use rm_protocol::maintenance::{CheckPolicy, PrunePolicy};
use rusqlite::{Connection, OptionalExtension, params};

use crate::DbError;
use crate::audit::{AuditEvent, record_audit};
use crate::sealing::{OpenError, SecretKey};
use crate::time::Timestamp;

/// The URL schemes restic understands besides a local path.
pub const URL_SCHEMES: &[&str] = &["sftp:", "s3:", "rest:", "b2:", "azure:", "gs:", "rclone:"];
pub const MAX_PASSWORD: usize = 4096;
pub const MAX_ENV: usize = 64;
const MAX_URL: usize = 2048;
const MAX_ENV_VALUE: usize = 16 * 1024;
const MAX_CA_CERT: usize = 64 * 1024;

/// A row of `repositories`, without its secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepositoryInfo {
    pub name: String,
    pub url: String,
    pub env_names: Vec<String>,
    pub ca_cert: Option<String>,
    pub auto_init: bool,
    /// The oldest restic the repository may be used with (`0.16.0`).
    pub min_restic_version: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// Maintenance policies (normalised, see [`crate::maintenance`]).
    pub prune: Option<PrunePolicy>,
    pub check: Option<CheckPolicy>,
}

/// A repository's decrypted secrets, for the code that hands them to restic.
#[derive(Clone, PartialEq, Eq)]
pub struct RepositorySecrets {
    pub password: String,
    pub env: BTreeMap<String, String>,
}

impl std::fmt::Debug for RepositorySecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepositorySecrets").field("env", &self.env.keys().collect::<Vec<_>>()).finish_non_exhaustive()
    }
}

/// A checked new repository (API and command line alike).
#[derive(Clone)]
pub struct NewRepository {
    pub name: String,
    pub url: String,
    pub password: String,
    pub env: BTreeMap<String, String>,
    pub ca_cert: Option<String>,
    pub auto_init: bool,
    pub min_restic_version: Option<String>,
    pub prune: Option<PrunePolicy>,
    pub check: Option<CheckPolicy>,
}

/// A checked change: each `Some` replaces the stored value; `ca_cert: Some(None)` removes the certificate.
#[derive(Clone, Default)]
pub struct RepositoryChanges {
    pub url: Option<String>,
    pub password: Option<String>,
    pub env: Option<BTreeMap<String, String>>,
    pub ca_cert: Option<Option<String>>,
    pub auto_init: Option<bool>,
    /// `Some(None)` removes the policy.
    pub prune: Option<Option<PrunePolicy>>,
    pub check: Option<Option<CheckPolicy>>,
    /// `Some(None)` removes the requirement.
    pub min_restic_version: Option<Option<String>>,
}

/// `min_restic_version`: `major.minor[.patch]`, at least restic 0.14 (the oldest the agent runs).
pub fn validate_min_restic_version(version: &str) -> Result<(), String> {
    let parsed = rm_protocol::restic_dist::parse_version(version)
        .filter(|_| version.chars().all(|c| c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("min_restic_version must be a version like 0.16.4, not {:?}", clean(version)))?;
    if parsed < (0, 14, 0) {
        return Err("min_restic_version must be 0.14.0 or newer (the oldest restic the agent runs)".into());
    }
    Ok(())
}

fn clean(text: &str) -> String {
    rm_protocol::validate::clean_text(text, 32)
}

pub fn validate_url(url: &str) -> Result<(), String> {
    if url.is_empty() || !rm_protocol::validate::is_printable(url, MAX_URL) || url.chars().any(char::is_whitespace) {
        return Err(format!("url must be 1-{MAX_URL} printable characters without white space"));
    }
    if url.starts_with('/') {
        return Ok(());
    }
    let Some(scheme) = URL_SCHEMES.iter().find(|s| url.starts_with(**s)) else {
        return Err(format!("url must be an absolute local path or start with one of {}", URL_SCHEMES.join(" ")));
    };
    if url.len() == scheme.len() {
        return Err(format!("url {scheme} needs a location after the scheme"));
    }
    // restic hands sftp and rclone locations to ssh/rclone as arguments: one starting with '-' would be an option.
    let location = url[scheme.len()..].trim_start_matches('/');
    if location.starts_with('-') || location.contains("@-") {
        return Err(format!(
            "url {scheme} location must not start with '-' (it would reach ssh or rclone as an option)"
        ));
    }
    // `rest:https://user:password@host/`: a password in the URL would be shown by every listing and audit entry.
    if *scheme == "rest:" {
        let authority = url[scheme.len()..].split("://").nth(1).unwrap_or("").split('/').next().unwrap_or("");
        if authority.rsplit_once('@').is_some_and(|(userinfo, _)| userinfo.contains(':')) {
            return Err("url must not contain a password; put it in env as RESTIC_REST_PASSWORD".into());
        }
    }
    Ok(())
}

pub fn validate_password(password: &str) -> Result<(), String> {
    if password.is_empty() || password.len() > MAX_PASSWORD {
        return Err(format!("password must be 1-{MAX_PASSWORD} bytes"));
    }
    // Agents hand the password to restic in a file, and restic trims white space around what it reads from one.
    if password.trim() != password {
        return Err("password must not begin or end with white space (restic would trim it)".into());
    }
    Ok(())
}

pub fn validate_env(env: &BTreeMap<String, String>) -> Result<(), String> {
    if env.len() > MAX_ENV {
        return Err(format!("env may have at most {MAX_ENV} variables"));
    }
    for (name, value) in env {
        let ok = !name.is_empty()
            && name.len() <= 128
            && name
                .bytes()
                .enumerate()
                .all(|(i, b)| b.is_ascii_uppercase() || b == b'_' || (i > 0 && b.is_ascii_digit()));
        if !ok {
            return Err(format!(
                "env name {:?} must match [A-Z_][A-Z0-9_]* (at most 128 characters)",
                name.chars().take(64).collect::<String>()
            ));
        }
        if let Some(why) = reserved_env(name) {
            return Err(format!("env {name} is not allowed: {why}"));
        }
        if value.len() > MAX_ENV_VALUE || value.contains('\0') {
            return Err(format!("env {name}: the value must be at most {MAX_ENV_VALUE} bytes without NUL"));
        }
    }
    Ok(())
}

/// Why an environment variable may not be set for restic, if it may not: the agent sets the repository and its
/// password itself, and variables that make the dynamic loader, the shell search path or ssh run other programs would
/// turn a repository definition into code run as root on every host.
fn reserved_env(name: &str) -> Option<&'static str> {
    const OURS: [&str; 5] = [
        "RESTIC_REPOSITORY",
        "RESTIC_REPOSITORY_FILE",
        "RESTIC_PASSWORD",
        "RESTIC_PASSWORD_FILE",
        "RESTIC_PASSWORD_COMMAND",
    ];
    if OURS.contains(&name) {
        return Some("the repository's url and password set it");
    }
    let loader = ["LD_", "DYLD_"].iter().any(|p| name.starts_with(p));
    if loader || ["PATH", "GCONV_PATH", "SSH_ASKPASS", "SSH_ASKPASS_REQUIRE", "SSH_AUTH_SOCK"].contains(&name) {
        return Some("it would change which programs restic or ssh run");
    }
    None
}

/// One or more PEM certificates and nothing else; each must parse as X.509.
pub fn validate_ca_cert(pem: &str) -> Result<(), String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::{PemObject, SectionKind};
    if pem.len() > MAX_CA_CERT {
        return Err(format!("ca_cert must be at most {MAX_CA_CERT} bytes"));
    }
    let mut certificates = 0;
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(pem.as_bytes()) {
        match section {
            Ok((SectionKind::Certificate, der)) => {
                rm_protocol::pin::pin_of_certificate(CertificateDer::from(der).as_ref())
                    .map_err(|e| format!("ca_cert: certificate {} does not parse: {e}", certificates + 1))?;
                certificates += 1;
            }
            Ok((kind, _)) => return Err(format!("ca_cert may contain only certificates, not {kind:?}")),
            Err(e) => return Err(format!("ca_cert is not valid PEM: {e}")),
        }
    }
    if certificates == 0 {
        return Err("ca_cert must contain at least one PEM certificate (-----BEGIN CERTIFICATE-----)".into());
    }
    Ok(())
}

impl NewRepository {
    /// Checks the repository (maintenance policies included; they are stored normalised).
    pub fn validate(&self) -> Result<(), String> {
        rm_protocol::validate::name("name", &self.name)?;
        validate_url(&self.url)?;
        validate_password(&self.password)?;
        validate_env(&self.env)?;
        self.min_restic_version.as_deref().map_or(Ok(()), validate_min_restic_version)?;
        self.ca_cert.as_deref().map_or(Ok(()), validate_ca_cert)?;
        self.prune.as_ref().map(crate::maintenance::validate_prune).transpose()?;
        self.check.as_ref().map(crate::maintenance::validate_check).transpose()?;
        Ok(())
    }
}

impl RepositoryChanges {
    /// Checks the changes (maintenance policies included; they are stored normalised).
    pub fn validate(&self) -> Result<(), String> {
        self.url.as_deref().map_or(Ok(()), validate_url)?;
        self.password.as_deref().map_or(Ok(()), validate_password)?;
        self.env.as_ref().map_or(Ok(()), validate_env)?;
        self.min_restic_version.as_ref().and_then(Option::as_deref).map_or(Ok(()), validate_min_restic_version)?;
        self.ca_cert.as_ref().and_then(Option::as_deref).map_or(Ok(()), validate_ca_cert)?;
        self.prune.as_ref().and_then(Option::as_ref).map(crate::maintenance::validate_prune).transpose()?;
        self.check.as_ref().and_then(Option::as_ref).map(crate::maintenance::validate_check).transpose()?;
        Ok(())
    }

    /// What the changes replace, for the audit log (names, never secret values).
    pub fn describe(&self) -> String {
        let mut what = Vec::new();
        if let Some(url) = &self.url {
            what.push(format!("url={url}"));
        }
        if self.password.is_some() {
            what.push("password replaced".into());
        }
        if let Some(env) = &self.env {
            what.push(format!("env=[{}]", env.keys().cloned().collect::<Vec<_>>().join(",")));
        }
        if let Some(ca) = &self.ca_cert {
            what.push(if ca.is_some() { "ca_cert replaced" } else { "ca_cert removed" }.into());
        }
        if let Some(auto_init) = self.auto_init {
            what.push(format!("auto_init={auto_init}"));
        }
        if let Some(min) = &self.min_restic_version {
            what.push(format!("min_restic_version={}", min.as_deref().unwrap_or("none")));
        }
        if let Some(p) = &self.prune {
            what.push(p.as_ref().map_or("prune removed".into(), |p| format!("prune={}", describe_prune(p))));
        }
        if let Some(c) = &self.check {
            what.push(c.as_ref().map_or("check removed".into(), |c| format!("check={}", describe_check(c))));
        }
        what.join(", ")
    }

    pub fn is_empty(&self) -> bool {
        self.url.is_none()
            && self.password.is_none()
            && self.env.is_none()
            && self.ca_cert.is_none()
            && self.auto_init.is_none()
            && self.min_restic_version.is_none()
            && self.prune.is_none()
            && self.check.is_none()
    }
}

fn describe_prune(p: &PrunePolicy) -> String {
    format!("{:?} max_unused={}", p.schedule, p.max_unused.as_deref().unwrap_or("default"))
}

fn describe_check(c: &CheckPolicy) -> String {
    format!("{:?} read_data_subset={}", c.schedule, c.read_data_subset.as_deref().unwrap_or("none"))
}

fn password_context(name: &str) -> String {
    format!("repo-password:{name}")
}

fn env_context(name: &str) -> String {
    format!("repo-env:{name}")
}

/// The sealed environment and its names (`None` for an empty one).
fn seal_env(key: &SecretKey, name: &str, env: &BTreeMap<String, String>) -> (Option<Vec<u8>>, Option<String>) {
    if env.is_empty() {
        return (None, None);
    }
    let json = serde_json::to_vec(env).expect("a string map serialises");
    let names = env.keys().map(String::as_str).collect::<Vec<_>>().join(",");
    (Some(key.seal(&env_context(name), &json)), Some(names))
}

const COLUMNS: &str =
    "name, url, env_names, ca_cert, auto_init, created_at, updated_at, min_restic_version, prune_policy, check_policy";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RepositoryInfo> {
    let names: Option<String> = r.get(2)?;
    Ok(RepositoryInfo {
        name: r.get(0)?,
        url: r.get(1)?,
        env_names: names.map(|n| n.split(',').map(str::to_owned).collect()).unwrap_or_default(),
        ca_cert: r.get(3)?,
        auto_init: r.get(4)?,
        created_at: r.get(5)?,
        updated_at: r.get(6)?,
        min_restic_version: r.get(7)?,
        prune: crate::maintenance::from_json(r.get(8)?),
        check: crate::maintenance::from_json(r.get(9)?),
    })
}

/// The outcome of a create when the name is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameTaken;

/// Inserts a validated repository and records `audit` (who and where; the detail, never a secret, is filled in
/// here) in the same operation; `Ok(Err(NameTaken))` when the name exists (nothing written).
pub fn create_repository(
    conn: &Connection,
    key: &SecretKey,
    now: Timestamp,
    new: &NewRepository,
    audit: AuditEvent,
) -> Result<Result<RepositoryInfo, NameTaken>, DbError> {
    let password = key.seal(&password_context(&new.name), new.password.as_bytes());
    let (env, env_names) = seal_env(key, &new.name, &new.env);
    let inserted = conn
        .prepare_cached(
            "INSERT INTO repositories (name, url, password, env, env_names, ca_cert, auto_init, created_at, updated_at,
                                   min_restic_version, prune_policy, check_policy)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9, ?10, ?11) ON CONFLICT (name) DO NOTHING",
        )?
        .execute(params![
            new.name,
            new.url,
            password,
            env,
            env_names,
            new.ca_cert,
            new.auto_init,
            now,
            new.min_restic_version,
            crate::maintenance::prune_json(&new.prune),
            crate::maintenance::check_json(&new.check)
        ])?;
    if inserted == 0 {
        return Ok(Err(NameTaken));
    }
    crate::plans::bump_config_revision(conn)?;
    let env_names = new.env.keys().cloned().collect::<Vec<_>>().join(",");
    let mut detail = format!("created {} env=[{env_names}] auto_init={}", new.name, new.auto_init);
    if let Some(p) = &new.prune {
        detail += &format!(" prune={}", describe_prune(p));
    }
    if let Some(c) = &new.check {
        detail += &format!(" check={}", describe_check(c));
    }
    record(conn, audit, detail)?;
    Ok(Ok(get_repository(conn, &new.name)?.expect("the row was just inserted")))
}

pub fn list_repositories(conn: &Connection) -> Result<Vec<RepositoryInfo>, DbError> {
    let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM repositories ORDER BY name"))?;
    Ok(stmt.query_map([], row)?.collect::<Result<_, _>>()?)
}

pub fn get_repository(conn: &Connection, name: &str) -> Result<Option<RepositoryInfo>, DbError> {
    Ok(conn.query_row(&format!("SELECT {COLUMNS} FROM repositories WHERE name = ?1"), [name], row).optional()?)
}

/// Applies validated changes and records `audit` (the detail names what changed, never a value of a secret);
/// `Ok(None)` when there is no such repository (nothing written).
pub fn update_repository(
    conn: &Connection,
    key: &SecretKey,
    now: Timestamp,
    name: &str,
    changes: &RepositoryChanges,
    audit: AuditEvent,
) -> Result<Option<RepositoryInfo>, DbError> {
    if get_repository(conn, name)?.is_none() {
        return Ok(None);
    }
    record(conn, audit, format!("updated {name}: {}", changes.describe()))?;
    if let Some(url) = &changes.url {
        conn.prepare_cached("UPDATE repositories SET url = ?2 WHERE name = ?1")?.execute(params![name, url])?;
    }
    if let Some(password) = &changes.password {
        let sealed = key.seal(&password_context(name), password.as_bytes());
        conn.prepare_cached("UPDATE repositories SET password = ?2 WHERE name = ?1")?.execute(params![name, sealed])?;
    }
    if let Some(env) = &changes.env {
        let (sealed, names) = seal_env(key, name, env);
        conn.prepare_cached("UPDATE repositories SET env = ?2, env_names = ?3 WHERE name = ?1")?
            .execute(params![name, sealed, names])?;
    }
    if let Some(ca_cert) = &changes.ca_cert {
        conn.prepare_cached("UPDATE repositories SET ca_cert = ?2 WHERE name = ?1")?.execute(params![name, ca_cert])?;
    }
    if let Some(auto_init) = changes.auto_init {
        conn.prepare_cached("UPDATE repositories SET auto_init = ?2 WHERE name = ?1")?
            .execute(params![name, auto_init])?;
    }
    if let Some(min) = &changes.min_restic_version {
        conn.prepare_cached("UPDATE repositories SET min_restic_version = ?2 WHERE name = ?1")?
            .execute(params![name, min])?;
    }
    if let Some(prune) = &changes.prune {
        let json = crate::maintenance::prune_json(prune);
        conn.prepare_cached("UPDATE repositories SET prune_policy = ?2 WHERE name = ?1")?
            .execute(params![name, json])?;
        if prune.is_none() {
            crate::maintenance::forget_request(conn, name, rm_protocol::maintenance::MaintenanceKind::Prune)?;
        }
    }
    if let Some(check) = &changes.check {
        let json = crate::maintenance::check_json(check);
        conn.prepare_cached("UPDATE repositories SET check_policy = ?2 WHERE name = ?1")?
            .execute(params![name, json])?;
        if check.is_none() {
            crate::maintenance::forget_request(conn, name, rm_protocol::maintenance::MaintenanceKind::Check)?;
        }
    }
    conn.prepare_cached("UPDATE repositories SET updated_at = ?2 WHERE name = ?1")?.execute(params![name, now])?;
    crate::plans::bump_config_revision(conn)?;
    get_repository(conn, name)
}

/// A repository that plans still use cannot be deleted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "repository {name:?} is used by the plans {}; delete those plans or move them to another repository first",
    plans.join(", ")
)]
pub struct RepositoryInUse {
    pub name: String,
    pub plans: Vec<String>,
}

/// Deletes a repository and records `audit`; `Ok(false)` when there was none, `Err(RepositoryInUse)` when plans
/// use it (nothing written either way).
pub fn delete_repository(
    conn: &Connection,
    name: &str,
    audit: AuditEvent,
) -> Result<Result<bool, RepositoryInUse>, DbError> {
    let plans = crate::plans::plans_using(conn, name)?;
    if !plans.is_empty() {
        return Ok(Err(RepositoryInUse { name: name.to_owned(), plans }));
    }
    let deleted = conn.prepare_cached("DELETE FROM repositories WHERE name = ?1")?.execute([name])? > 0;
    if deleted {
        crate::maintenance::forget_repository(conn, name)?;
        crate::plans::bump_config_revision(conn)?;
        record(conn, audit, format!("deleted {name}"))?;
    }
    Ok(Ok(deleted))
}

/// Records a repository change: `audit` says who and where, `detail` what.
fn record(conn: &Connection, audit: AuditEvent, detail: String) -> Result<(), DbError> {
    record_audit(conn, &AuditEvent { kind: "repository".into(), detail: Some(detail), ..audit })
}

/// Decrypts a repository's password and environment: `Ok(None)` for an unknown name, `Ok(Some(Err))` when a stored
/// value does not open (damaged, moved or sealed under another key).
pub fn repository_secrets(
    conn: &Connection,
    key: &SecretKey,
    name: &str,
) -> Result<Option<Result<RepositorySecrets, OpenError>>, DbError> {
    let sealed: Option<(Vec<u8>, Option<Vec<u8>>)> = conn
        .prepare_cached("SELECT password, env FROM repositories WHERE name = ?1")?
        .query_row([name], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((password, env)) = sealed else { return Ok(None) };
    Ok(Some(open_secrets(key, name, &password, env.as_deref())))
}

fn open_secrets(
    key: &SecretKey,
    name: &str,
    password: &[u8],
    env: Option<&[u8]>,
) -> Result<RepositorySecrets, OpenError> {
    let context = password_context(name);
    let password = String::from_utf8(key.open(&context, password)?).map_err(|_| OpenError(context))?;
    let env = match env {
        None => BTreeMap::new(),
        Some(sealed) => {
            let context = env_context(name);
            serde_json::from_slice(&key.open(&context, sealed)?).map_err(|_| OpenError(context))?
        }
    };
    Ok(RepositorySecrets { password, env })
}

/// How many rows hold sealed secrets.
pub fn count_sealed(conn: &Connection) -> Result<u64, DbError> {
    // Notification channels' secrets are sealed under the same key.
    let count: i64 = conn
        .prepare_cached("SELECT (SELECT count(*) FROM repositories) + (SELECT count(*) FROM notify_channels)")?
        .query_row([], |r| r.get(0))?;
    Ok(count.max(0) as u64)
}

/// (rows, rows whose secrets `key` opens).
pub fn check_key(conn: &Connection, key: &SecretKey) -> Result<(u64, u64), DbError> {
    let mut stmt = conn.prepare("SELECT name, password, env FROM repositories")?;
    let mut rows = stmt.query([])?;
    let (mut count, mut opened) = (0, 0);
    while let Some(r) = rows.next()? {
        let (name, password, env): (String, Vec<u8>, Option<Vec<u8>>) = (r.get(0)?, r.get(1)?, r.get(2)?);
        count += 1;
        if open_secrets(key, &name, &password, env.as_deref()).is_ok() {
            opened += 1;
        }
    }
    let (channels, channels_opened) = crate::notify::check_key(conn, key)?;
    Ok((count + channels, opened + channels_opened))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_restic_version_is_a_supported_version() {
        for ok in ["0.14.0", "0.16", "0.17.3", "1.0.0"] {
            assert_eq!(validate_min_restic_version(ok), Ok(()), "{ok}");
        }
        for bad in ["", "latest", "v0.16.0", "0.16.0-rc1", "1.2.3.4", "0.13.9", "0 .16"] {
            let e = validate_min_restic_version(bad).unwrap_err();
            assert!(e.contains("min_restic_version"), "{bad}: {e}");
        }
    }
    use crate::Db;

    fn new_repo(name: &str) -> NewRepository {
        NewRepository {
            name: name.into(),
            url: "s3:s3.amazonaws.com/bucket".into(),
            password: "pw-Zebra-42".into(),
            env: BTreeMap::from([("AWS_SECRET_ACCESS_KEY".into(), "env-Quokka-7".into())]),
            ca_cert: None,
            auto_init: true,
            min_restic_version: None,
            prune: None,
            check: None,
        }
    }

    #[test]
    fn names_urls_and_env_are_checked() {
        for good in [
            "/srv/restic",
            "sftp:u@h:/r",
            "s3:host/b",
            "rest:https://h:8000/",
            "rest:https://u@h/",
            "b2:b:p",
            "azure:c:/",
            "gs:b:/",
            "rclone:r:p",
        ] {
            assert!(validate_url(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "relative/path",
            "ftp://x",
            "s3:",
            "/a b",
            "/a\u{202e}",
            "rest:https://u:p@h/",
            "sftp:-oProxyCommand=x:/r",
            "sftp://-oProxyCommand=x/r",
            "sftp:u@-oProxyCommand=x:/r",
            "rclone:--config=/x:p",
        ] {
            assert!(validate_url(bad).is_err(), "{bad}");
        }
        let env = |k: &str| BTreeMap::from([(k.to_string(), "v".to_string())]);
        assert!(validate_env(&env("AWS_ACCESS_KEY_ID")).is_ok() && validate_env(&env("_X1")).is_ok());
        for bad in ["", "1A", "aws", "A-B", "A B", "LD_PRELOAD", "DYLD_INSERT_LIBRARIES", "PATH", "SSH_ASKPASS"] {
            assert!(validate_env(&env(bad)).is_err(), "{bad}");
        }
        for ours in ["RESTIC_PASSWORD", "RESTIC_PASSWORD_COMMAND", "RESTIC_REPOSITORY"] {
            assert!(validate_env(&env(ours)).unwrap_err().contains("url and password"), "{ours}");
        }
        assert!(validate_env(&env("RESTIC_REST_PASSWORD")).is_ok());
        for bad in [" pw", "pw ", "pw\n"] {
            assert!(validate_password(bad).unwrap_err().contains("white space"), "{bad:?}");
        }
        let many: BTreeMap<_, _> = (0..=MAX_ENV).map(|i| (format!("V{i}"), String::new())).collect();
        assert!(validate_env(&many).is_err());
        assert!(validate_password("").is_err() && validate_password(&"x".repeat(MAX_PASSWORD + 1)).is_err());
        assert!(validate_ca_cert("not pem").is_err());
        assert!(validate_ca_cert("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").is_err());
    }

    #[tokio::test]
    async fn secrets_are_sealed_in_the_row_and_bound_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).unwrap();
        let key = SecretKey::from_bytes(&[1; 32]);
        let k = key.clone();
        let (a, again) = db
            .call(move |c| {
                let a = create_repository(c, &k, 10, &new_repo("a"), AuditEvent::default())?.unwrap();
                let again = create_repository(c, &k, 11, &new_repo("a"), AuditEvent::default())?;
                create_repository(c, &k, 12, &new_repo("b"), AuditEvent::default())?.unwrap();
                Ok((a, again))
            })
            .await
            .unwrap();
        assert_eq!(again, Err(NameTaken));
        assert_eq!(a.env_names, vec!["AWS_SECRET_ACCESS_KEY"]);
        assert!(a.auto_init && a.created_at == 10 && a.updated_at == 10);
        // No plaintext anywhere in the row.
        let raw: Vec<Vec<u8>> = db
            .call(|c| {
                let mut s = c.prepare("SELECT password, env FROM repositories")?;
                let rows = s.query_map([], |r| Ok([r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?].concat()))?;
                Ok(rows.collect::<Result<_, _>>()?)
            })
            .await
            .unwrap();
        for bytes in &raw {
            assert!(!bytes.windows(5).any(|w| w == b"Zebra" || w == b"Quokk"));
        }
        let k = key.clone();
        let secrets = db.call(move |c| repository_secrets(c, &k, "a")).await.unwrap().unwrap().unwrap();
        assert_eq!(secrets.password, "pw-Zebra-42");
        assert_eq!(secrets.env["AWS_SECRET_ACCESS_KEY"], "env-Quokka-7");
        assert!(!format!("{secrets:?}").contains("Zebra") && !format!("{secrets:?}").contains("Quokka"));
        // A ciphertext moved to another row, or one flipped byte, does not open.
        let k = key.clone();
        let (moved, flipped, check) = db
            .call(move |c| {
                c.execute("UPDATE repositories SET password = (SELECT password FROM repositories WHERE name = 'a') WHERE name = 'b'", [])?;
                let moved = repository_secrets(c, &k, "b")?.unwrap();
                c.execute("UPDATE repositories SET env = (SELECT env FROM repositories WHERE name = 'b') WHERE name = 'a'", [])?;
                let flipped = repository_secrets(c, &k, "a")?.unwrap();
                Ok((moved, flipped, check_key(c, &k)?))
            })
            .await
            .unwrap();
        assert!(moved.is_err() && flipped.is_err());
        assert_eq!(check, (2, 0));
        // Replacing the password repairs the row; another key opens nothing.
        let k = key.clone();
        let changes = RepositoryChanges {
            password: Some("new-pw".into()),
            env: Some(BTreeMap::new()),
            auto_init: Some(false),
            ..Default::default()
        };
        let (updated, secrets, missing) = db
            .call(move |c| {
                let updated = update_repository(c, &k, 20, "a", &changes, AuditEvent::default())?.unwrap();
                let missing = update_repository(c, &k, 20, "nope", &changes, AuditEvent::default())?;
                Ok((updated, repository_secrets(c, &k, "a")?.unwrap(), missing))
            })
            .await
            .unwrap();
        assert!(missing.is_none());
        assert!(
            updated.env_names.is_empty() && !updated.auto_init && updated.updated_at == 20 && updated.created_at == 10
        );
        assert_eq!(secrets.unwrap(), RepositorySecrets { password: "new-pw".into(), env: BTreeMap::new() });
        let other = SecretKey::from_bytes(&[2; 32]);
        assert_eq!(db.call(move |c| check_key(c, &other)).await.unwrap(), (2, 0));
        assert_eq!(db.call(move |c| check_key(c, &key)).await.unwrap(), (2, 1));
        assert_eq!(db.call(|c| delete_repository(c, "a", AuditEvent::default())).await.unwrap(), Ok(true));
        assert_eq!(db.call(|c| delete_repository(c, "a", AuditEvent::default())).await.unwrap(), Ok(false));
        assert_eq!(db.call(list_repositories).await.unwrap().len(), 1);
    }

    #[test]
    fn unlock_creates_a_key_only_while_nothing_is_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).unwrap();
        let err = crate::unlock(&db, dir.path(), false).unwrap_err().to_string();
        assert!(err.contains("secret.key is missing"), "{err}");
        let (key, origin) = crate::unlock(&db, dir.path(), true).unwrap();
        assert_eq!(origin, crate::KeyOrigin::Created);
        db.call_blocking(move |c| create_repository(c, &key, 1, &new_repo("a"), AuditEvent::default()).map(|_| ()))
            .unwrap();
        assert_eq!(crate::unlock(&db, dir.path(), false).unwrap().1, crate::KeyOrigin::Loaded);
        let path = dir.path().join(crate::sealing::SECRET_KEY_FILE);
        let original = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let err = crate::unlock(&db, dir.path(), true).unwrap_err().to_string();
        assert!(err.contains("missing") && err.contains("1 repositories") && err.contains("restore"), "{err}");
        assert!(!path.exists(), "no new key was made");
        let mut other = tempfile::NamedTempFile::new_in(dir.path()).unwrap();
        std::io::Write::write_all(&mut other, "ab".repeat(32).as_bytes()).unwrap();
        other.persist(&path).unwrap();
        let err = crate::unlock(&db, dir.path(), true).unwrap_err().to_string();
        assert!(err.contains("does not decrypt"), "{err}");
        std::fs::write(&path, original).unwrap();
        assert!(crate::unlock(&db, dir.path(), true).is_ok());
    }
}
