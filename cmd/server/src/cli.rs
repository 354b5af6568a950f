//! Command-line interface: every flag also reads an `RM_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use rm_protocol::admin::AgentState;
use rm_protocol::backup::{Health, OperationKind, OperationStatus, Timezone};
use rm_server::tls::{TlsConfig, TlsMode};
use rm_server::{PublicUrl, TrustedProxies};

#[derive(Parser, Debug)]
#[command(
    name = "restic-manager-server",
    about = "Serves restic-manager agent binaries and install scripts to a fleet of hosts",
    version = rm_buildinfo::current().version_line(),
    long_version = rm_buildinfo::current().version_line(),
)]
pub struct Cli {
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

// Parsed once per process: the size of the largest variant (`plan add` and its flags) does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server (the default when no command is given).
    Serve,
    /// Probe a running server's /healthz and exit 0 if it answers 2xx, 1 otherwise (for container HEALTHCHECKs).
    Healthcheck(HealthcheckArgs),
    /// Manage enrollment tokens in the data dir's database (works while the server runs).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Manage web tokens: sign-in tokens for the operator's web page (works while the server runs).
    #[command(subcommand)]
    WebToken(WebTokenCommand),
    /// The fleet: enrolled agents and how they compare with the builds this server serves.
    #[command(subcommand)]
    Agents(AgentsCommand),
    /// Manage restic repositories in the data dir's database (works while the server runs; needs secret.key).
    #[command(subcommand)]
    Repo(RepoCommand),
    /// Manage backup plans in the data dir's database (works while the server runs) and request runs.
    #[command(subcommand)]
    Plan(PlanCommand),
    /// Backup operations the agents reported, newest first (the same as GET /api/v1/operations).
    Operations(OperationsArgs),
    /// Restore a snapshot onto an agent's host (the same as POST /api/v1/agents/{id}/restore); prints the operation
    /// id. The agent takes it within about 25 s (when its task long-poll ends and the server reads the database again)
    /// or at its next heartbeat, whichever is first.
    Restore(RestoreArgs),
    /// Staged agent rollouts (the same as /api/v1/rollouts): list, show, create, and the verbs start, pause, resume,
    /// abort, rollback. The running server moves them on within a tick.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Notification channels (the same as /api/v1/channels): add, list, rm, and test, which sends a sample message
    /// at once and prints what the SMTP server or webhook answered. Needs secret.key.
    #[command(subcommand)]
    Channel(ChannelCommand),
    /// Notification rules (the same as /api/v1/rules): which events go to which channel, by host label.
    #[command(subcommand)]
    Rule(RuleCommand),
    /// Queued notifications with every delivery attempt, newest first, as JSON (GET /api/v1/notifications).
    Notifications(NotificationsArgs),
}

#[derive(Subcommand, Debug)]
pub enum ChannelCommand {
    /// Create a channel from the JSON body of POST /api/v1/channels, read from standard input (secrets such as
    /// the SMTP password or a Slack URL never go on the command line).
    Add,
    /// List channels (never their secrets).
    List {
        /// JSON (the same shape as GET /api/v1/channels) instead of a table.
        #[arg(long, env = "RM_CHANNEL_JSON")]
        json: bool,
    },
    /// Delete a channel, its rules and its queued messages.
    Rm {
        #[arg(env = "RM_CHANNEL_NAME")]
        name: String,
    },
    /// Send a sample message now and print the answer; exit status 1 unless it was accepted.
    Test {
        #[arg(env = "RM_CHANNEL_NAME")]
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum RuleCommand {
    /// Send events to a channel.
    Add {
        #[arg(env = "RM_RULE_NAME")]
        name: String,
        #[arg(long, env = "RM_RULE_CHANNEL")]
        channel: String,
        /// Events (comma-separated or repeated): backup_failed, backup_warning, backup_overdue, backup_recovered,
        /// agent_stale, agent_back, check_failed, check_recovered, rollout_halted. Default: all of them.
        #[arg(long = "event", env = "RM_RULE_EVENTS", value_delimiter = ',')]
        events: Vec<rm_protocol::notify::EventKind>,
        /// Only hosts with this label (key=value; repeat for more, all must match).
        #[arg(long = "label", env = "RM_RULE_LABELS", value_delimiter = ',', value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Collect backup_warning events and send them once a day as one message.
        #[arg(long, env = "RM_RULE_WARNING_DIGEST")]
        warning_digest: bool,
    },
    List {
        /// JSON (the same shape as GET /api/v1/rules) instead of a table.
        #[arg(long, env = "RM_RULE_JSON")]
        json: bool,
    },
    Rm {
        #[arg(env = "RM_RULE_NAME")]
        name: String,
    },
}

#[derive(clap::Args, Debug)]
pub struct NotificationsArgs {
    /// Only messages in this state: pending, delivered, failed, held, digested.
    #[arg(long, env = "RM_NOTIFICATIONS_STATUS")]
    pub status: Option<rm_protocol::notify::DeliveryStatus>,
    #[arg(long, env = "RM_NOTIFICATIONS_LIMIT", default_value = "100")]
    pub limit: u32,
}

#[derive(Subcommand, Debug)]
pub enum RolloutCommand {
    /// The newest rollouts: id, state, targets, wave progress.
    List {
        /// JSON (the same shape as GET /api/v1/rollouts).
        #[arg(long, env = "RM_ROLLOUT_JSON")]
        json: bool,
    },
    /// One rollout with every host's state, as JSON (the same as GET /api/v1/rollouts/{id}).
    Show {
        #[arg(env = "RM_ROLLOUT_ID")]
        id: u64,
    },
    /// Create a rollout (default targets: every platform whose served build is not the released one).
    Create {
        /// A JSON strategy (see README "Rollouts"); default: --rollout-strategy's, else one canary then the rest.
        #[arg(long, env = "RM_ROLLOUT_CREATE_STRATEGY")]
        strategy: Option<String>,
        /// os/arch=sha256 of an archived build; repeat for more platforms.
        #[arg(long = "target", env = "RM_ROLLOUT_TARGET")]
        targets: Vec<String>,
        /// Start it at once.
        #[arg(long, env = "RM_ROLLOUT_START")]
        start: bool,
    },
    Start {
        #[arg(env = "RM_ROLLOUT_ID")]
        id: u64,
    },
    Pause {
        #[arg(env = "RM_ROLLOUT_ID")]
        id: u64,
    },
    Resume {
        #[arg(env = "RM_ROLLOUT_ID")]
        id: u64,
        /// Mark the failed hosts skipped (they stay on their previous build) and go on.
        #[arg(long, env = "RM_ROLLOUT_SKIP_FAILED")]
        skip_failed: bool,
    },
    Abort {
        #[arg(env = "RM_ROLLOUT_ID")]
        id: u64,
    },
    Rollback {
        #[arg(env = "RM_ROLLOUT_ID")]
        id: u64,
    },
}

#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// The agent to restore onto (its id, see `agents list`); it needs a plan on the snapshot's repository.
    #[arg(long, env = "RM_RESTORE_AGENT")]
    pub agent: String,
    /// The snapshot: its id or a unique prefix of at least 8 hex digits (see GET /api/v1/agents/{id}/snapshots).
    #[arg(long, env = "RM_RESTORE_SNAPSHOT")]
    pub snapshot: String,
    /// An absolute path inside the snapshot to restore, taken literally (commas and glob characters included);
    /// repeat the flag for more (default: everything). RM_RESTORE_INCLUDE holds one path.
    #[arg(long = "include", env = "RM_RESTORE_INCLUDE")]
    pub include: Vec<String>,
    /// An absolute directory on the agent's host (default: <agent state dir>/restores/<operation id>).
    #[arg(long, env = "RM_RESTORE_TARGET")]
    pub target: Option<String>,
    /// Restore into a directory that is not empty (otherwise the agent refuses).
    #[arg(long, env = "RM_RESTORE_OVERWRITE")]
    pub overwrite: bool,
    /// Look the snapshot up among this agent's reported snapshots only (default: every agent's).
    #[arg(long, env = "RM_RESTORE_SOURCE_AGENT")]
    pub source_agent: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct OperationsArgs {
    /// Only this agent's operations (its id).
    #[arg(long, env = "RM_OPERATIONS_AGENT")]
    pub agent: Option<String>,
    /// Only this plan's operations.
    #[arg(long, env = "RM_OPERATIONS_PLAN")]
    pub plan: Option<String>,
    /// Only this repository's prune and check operations.
    #[arg(long, env = "RM_OPERATIONS_REPOSITORY")]
    pub repository: Option<String>,
    /// Only operations in this status: queued, running, success, warning, failed or cancelled.
    #[arg(long, env = "RM_OPERATIONS_STATUS")]
    pub status: Option<OperationStatus>,
    /// Only operations of this kind: backup, forget, prune, check or restore.
    #[arg(long, env = "RM_OPERATIONS_KIND", value_parser = parse_kind)]
    pub kind: Option<OperationKind>,
    /// At most this many (1-500).
    #[arg(long, env = "RM_OPERATIONS_LIMIT", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=500))]
    pub limit: u32,
    /// JSON (the same shape as GET /api/v1/operations) instead of a table.
    #[arg(long, env = "RM_OPERATIONS_JSON")]
    pub json: bool,
}

#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum PlanCommand {
    /// Define a backup plan: what (--path, --exclude), where (--repo), when (--schedule) and on which agents
    /// (--agent ids and/or --selector labels).
    Add {
        /// Lower-case name: a-z, 0-9, '.', '_', '-'.
        #[arg(env = "RM_PLAN_NAME")]
        name: String,
        /// The repository (see `repo list`).
        #[arg(long, env = "RM_PLAN_REPO")]
        repo: String,
        /// An absolute path to back up on the agent's host (/… or C:\…); repeat for more.
        #[arg(long = "path", env = "RM_PLAN_PATH", required = true)]
        paths: Vec<String>,
        /// A restic exclude pattern; repeat for more.
        #[arg(long = "exclude", env = "RM_PLAN_EXCLUDE")]
        excludes: Vec<String>,
        /// A cron expression ("0 3 * * *", "@daily") or "@every 6h".
        #[arg(long, env = "RM_PLAN_SCHEDULE")]
        schedule: String,
        /// The clock the cron expression reads: utc or local (the agent host's).
        #[arg(long, env = "RM_PLAN_TIMEZONE", default_value = "utc", value_parser = parse_timezone)]
        timezone: Timezone,
        /// An extra snapshot tag (no commas); repeat for more.
        #[arg(long = "tag", env = "RM_PLAN_TAG", value_delimiter = ',')]
        tags: Vec<String>,
        /// restic --one-file-system.
        #[arg(long, env = "RM_PLAN_ONE_FILE_SYSTEM")]
        one_file_system: bool,
        /// restic --exclude-caches.
        #[arg(long, env = "RM_PLAN_EXCLUDE_CACHES")]
        exclude_caches: bool,
        /// An agent id the plan applies to; repeat for more.
        #[arg(long = "agent", env = "RM_PLAN_AGENT", value_delimiter = ',')]
        agents: Vec<String>,
        /// A label key=value every selected agent must carry; repeat for more (all must match).
        #[arg(long = "selector", env = "RM_PLAN_SELECTOR", value_parser = parse_label)]
        selector: Vec<(String, String)>,
        /// Run timeout, e.g. 2h (default 24h).
        #[arg(long, env = "RM_PLAN_TIMEOUT")]
        timeout: Option<String>,
        /// Spread of scheduled starts across hosts, e.g. 5m (default: a twentieth of the interval, at most 10m).
        #[arg(long, env = "RM_PLAN_JITTER")]
        jitter: Option<String>,
        /// Retention: after each backup, keep this host's newest N snapshots of the plan (restic forget
        /// --keep-last); the other --keep-* flags add to it. Without any --keep-* flag every snapshot is kept.
        #[arg(long, env = "RM_PLAN_KEEP_LAST", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        keep_last: Option<u32>,
        /// Retention: keep the newest snapshot of each of the last N hours.
        #[arg(long, env = "RM_PLAN_KEEP_HOURLY", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        keep_hourly: Option<u32>,
        /// Retention: keep the newest snapshot of each of the last N days.
        #[arg(long, env = "RM_PLAN_KEEP_DAILY", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        keep_daily: Option<u32>,
        /// Retention: keep the newest snapshot of each of the last N weeks.
        #[arg(long, env = "RM_PLAN_KEEP_WEEKLY", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        keep_weekly: Option<u32>,
        /// Retention: keep the newest snapshot of each of the last N months.
        #[arg(long, env = "RM_PLAN_KEEP_MONTHLY", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        keep_monthly: Option<u32>,
        /// Retention: keep the newest snapshot of each of the last N years.
        #[arg(long, env = "RM_PLAN_KEEP_YEARLY", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        keep_yearly: Option<u32>,
        /// Retention: keep every snapshot newer than this (restic's spelling: 7d, 1y2m, 36h).
        #[arg(long, env = "RM_PLAN_KEEP_WITHIN")]
        keep_within: Option<String>,
        /// Retention: keep every snapshot carrying this tag; repeat for more.
        #[arg(long = "keep-tag", env = "RM_PLAN_KEEP_TAG", value_delimiter = ',')]
        keep_tag: Vec<String>,
    },
    /// List plans and the agents each applies to.
    List {
        /// JSON (the same shape as GET /api/v1/plans) instead of lines.
        #[arg(long, env = "RM_PLAN_JSON")]
        json: bool,
    },
    /// Delete a plan (its snapshots are not touched; its queued run-now requests are cancelled).
    Rm {
        #[arg(env = "RM_PLAN_NAME")]
        name: String,
    },
    /// Run a plan now on one agent; prints the operation id.
    Run {
        #[arg(env = "RM_PLAN_NAME")]
        name: String,
        /// The agent id (see `agents list`).
        #[arg(long, env = "RM_PLAN_AGENT")]
        agent: String,
    },
}

/// `key=value` by the label rules.
pub fn parse_label(raw: &str) -> Result<(String, String), String> {
    rm_fleet::labels::parse_pair(raw)
}

fn parse_timezone(raw: &str) -> Result<Timezone, String> {
    match raw {
        "utc" | "UTC" => Ok(Timezone::Utc),
        "local" => Ok(Timezone::Local),
        other => Err(format!("{other:?}: use utc or local")),
    }
}

fn parse_kind(raw: &str) -> Result<OperationKind, String> {
    serde_json::from_value(serde_json::Value::String(raw.to_owned()))
        .map_err(|_| format!("{raw:?}: use backup, forget, prune, check or restore"))
}

#[derive(Subcommand, Debug)]
pub enum RepoCommand {
    /// Define a repository. The password comes from standard input (--password-stdin) or RM_REPO_PASSWORD, never
    /// from a flag; --env names variables whose values are taken from this command's own environment.
    Add {
        /// Lower-case name: a-z, 0-9, '.', '_', '-'.
        #[arg(env = "RM_REPO_NAME")]
        name: String,
        /// An absolute local path or an sftp:, s3:, rest:, b2:, azure:, gs:, rclone: URL.
        #[arg(long, env = "RM_REPO_URL")]
        url: String,
        /// Read the password from the first line of standard input.
        #[arg(long, env = "RM_REPO_PASSWORD_STDIN")]
        password_stdin: bool,
        /// Names of environment variables to store for restic (comma-separated or repeated), e.g.
        /// AWS_SECRET_ACCESS_KEY; each value is read from this command's environment.
        #[arg(long = "env", env = "RM_REPO_ENV", value_delimiter = ',')]
        env: Vec<String>,
        /// A PEM file of CA certificate(s) restic should trust for this repository.
        #[arg(long, env = "RM_REPO_CA_CERT")]
        ca_cert: Option<PathBuf>,
        /// Let restic initialise the repository if it does not exist.
        #[arg(long, env = "RM_REPO_AUTO_INIT")]
        auto_init: bool,
        /// The oldest restic agents may use this repository with (e.g. 0.16.0): an agent with an older restic
        /// installs the server's restic (restic-binaries/) first.
        #[arg(long, env = "RM_REPO_MIN_RESTIC_VERSION", value_name = "VERSION")]
        min_restic_version: Option<String>,
        /// Prune the repository on this schedule (cron or @every; one agent using it runs each firing).
        #[arg(long, env = "RM_REPO_PRUNE_SCHEDULE")]
        prune_schedule: Option<String>,
        /// restic prune's --max-unused: 10%, 5G, 0 or unlimited (needs --prune-schedule).
        #[arg(long, env = "RM_REPO_PRUNE_MAX_UNUSED", requires = "prune_schedule")]
        prune_max_unused: Option<String>,
        /// Check the repository on this schedule (structure only unless --check-read-data-subset).
        #[arg(long, env = "RM_REPO_CHECK_SCHEDULE")]
        check_schedule: Option<String>,
        /// restic check's --read-data-subset: n/t (1/5) or a percentage (10%) (needs --check-schedule).
        #[arg(long, env = "RM_REPO_CHECK_READ_DATA_SUBSET", requires = "check_schedule")]
        check_read_data_subset: Option<String>,
    },
    /// List repositories (never their secrets).
    List {
        /// JSON (the same shape as GET /api/v1/repositories) instead of a table.
        #[arg(long, env = "RM_REPO_JSON")]
        json: bool,
    },
    /// Delete a repository definition (the repository's data is not touched).
    Rm {
        #[arg(env = "RM_REPO_NAME")]
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum AgentsCommand {
    /// A table of enrolled agents (hostname, id, platform, version, state, last seen) and counts per state.
    List {
        /// Only agents in this state: current, out_of_date, stale or unknown.
        #[arg(long, env = "RM_AGENTS_STATE")]
        state: Option<AgentState>,
        /// Only agents whose backup health (their worst plan's) is this: ok, warning, failed, overdue or never.
        #[arg(long, env = "RM_AGENTS_HEALTH")]
        health: Option<Health>,
        /// JSON (the same shape as GET /api/v1/agents) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Replace an agent's labels with the given key=value pairs (none: remove them all).
    Label {
        /// The agent id (see `agents list`).
        #[arg(env = "RM_AGENT_ID")]
        id: String,
        /// key=value pairs (keys: a-z 0-9 . _ / -).
        #[arg(env = "RM_AGENT_LABELS", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
}

#[derive(Subcommand, Debug)]
pub enum WebTokenCommand {
    /// Create a web token; prints it (shown only this once) on stdout. Sign in to the web page with it instead of the
    /// admin token.
    Create {
        /// Free text shown in listings and the audit log (who the token is for).
        #[arg(long, env = "RM_WEB_TOKEN_NOTE", default_value = "")]
        note: String,
        /// Lifetime, e.g. 30d or 12h (no expiry when absent); sessions it opens end when it expires.
        #[arg(long, env = "RM_WEB_TOKEN_EXPIRES", value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
    },
    /// List web tokens (never their secrets).
    List,
    /// Revoke a web token by id; the sessions it opened end at once.
    Revoke {
        /// The token id shown by `web-token list`.
        #[arg(env = "RM_WEB_TOKEN_ID")]
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create an enrollment token; prints the token (shown only this once) on stdout.
    Create {
        /// How many hosts may enroll with it (unlimited when absent).
        #[arg(long, env = "RM_TOKEN_USES")]
        uses: Option<u32>,
        /// Lifetime, e.g. 24h or 30m (no expiry when absent).
        #[arg(long, env = "RM_TOKEN_EXPIRES", value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
        /// Free text shown in listings.
        #[arg(long, env = "RM_TOKEN_NOTE", default_value = "")]
        note: String,
        /// A label key=value every agent enrolled with the token starts with (plans select agents by label); repeat
        /// for more.
        #[arg(long = "label", env = "RM_TOKEN_LABEL", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// List enrollment tokens (never their secrets).
    List,
    /// Revoke an enrollment token by id.
    Revoke {
        /// The token id shown by `token list`.
        #[arg(env = "RM_TOKEN_ID")]
        id: String,
    },
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on: IP:PORT or HOST:PORT (e.g. localhost:8080).
    #[arg(long, global = true, env = "RM_LISTEN", default_value = "0.0.0.0:8080", value_parser = parse_listen)]
    pub listen: SocketAddr,

    /// Operator state: database, secrets, and asset overrides under agent-binaries/ and install/.
    #[arg(long, global = true, env = "RM_DATA_DIR", default_value = "/var/lib/restic-manager")]
    pub data_dir: PathBuf,

    /// Read-only assets baked into the image; used when the data dir has no override.
    #[arg(long, global = true, env = "RM_BUNDLED_ASSETS_DIR", default_value = "/opt/restic-manager/dist")]
    pub bundled_assets_dir: PathBuf,

    /// URL hosts use to reach this server (e.g. https://rm.example.com); otherwise taken from each request's Host.
    #[arg(long, env = "RM_PUBLIC_URL", value_parser = parse_public_url)]
    pub public_url: Option<PublicUrl>,

    /// Log line format.
    #[arg(long, env = "RM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter, in tracing's EnvFilter syntax (e.g. "info", "debug", "info,access=warn").
    #[arg(long, env = "RM_LOG", default_value = "info")]
    pub log: String,

    /// Admin API bearer token (at least 16 characters); by default generated into <data-dir>/admin.token.
    #[arg(long, env = "RM_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// The longest repository lease granted to an agent (10s to 1h): a host that dies while it runs a backup, prune or
    /// check blocks the repository for at most this long. Agents renew at a third of the lifetime granted.
    #[arg(long, env = "RM_MAX_LEASE_TTL", default_value = "1h", value_parser = parse_lease_ttl)]
    pub max_lease_ttl: Duration,

    /// What publishing a new agent build does: `manual` (a pending rollout that waits for `rollout start`),
    /// `immediate` (a rollout to every host at once, the behaviour before rollouts), or a JSON strategy such as
    /// '{"canaries":{"count":2},"waves":[{"percent":25},{"percent":75}],"settle_secs":120}' started by itself.
    #[arg(long, env = "RM_ROLLOUT_STRATEGY", default_value = "manual", value_parser = parse_rollout_strategy)]
    pub rollout_strategy: RolloutDefault,

    /// How often rollouts move on (tell hosts, verify them, halt, start the next wave).
    #[arg(long, env = "RM_ROLLOUT_TICK", default_value = "1s", value_parser = parse_rollout_tick)]
    pub rollout_tick: Duration,

    /// How often notification events (a backup failing, going overdue or recovering, an agent going stale or
    /// coming back, a failed repository check, a halted rollout) are looked for.
    #[arg(long, env = "RM_NOTIFY_TICK", default_value = "15s", value_parser = parse_positive)]
    pub notify_tick: Duration,

    /// A notification that could not be delivered is retried after this long, doubling per attempt.
    #[arg(long, env = "RM_NOTIFY_RETRY_BASE", default_value = "30s", value_parser = parse_positive)]
    pub notify_retry_base: Duration,

    /// The longest wait between two attempts of a notification.
    #[arg(long, env = "RM_NOTIFY_RETRY_MAX", default_value = "1h", value_parser = parse_positive)]
    pub notify_retry_max: Duration,

    /// A notification not delivered this long after it was queued is given up (status failed).
    #[arg(long, env = "RM_NOTIFY_GIVE_UP", default_value = "24h", value_parser = parse_positive)]
    pub notify_give_up: Duration,

    /// Rules with warning_digest send their collected backup_warning events this long after the oldest.
    #[arg(long, env = "RM_NOTIFY_DIGEST_EVERY", default_value = "24h", value_parser = parse_positive)]
    pub notify_digest_every: Duration,

    /// How often agents are asked to send a heartbeat.
    #[arg(long, env = "RM_HEARTBEAT_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,

    /// An agent without a heartbeat for this long is reported as stale.
    #[arg(long, global = true, env = "RM_STALE_AFTER", default_value = "5m", value_parser = humantime::parse_duration)]
    pub stale_after: Duration,

    /// Largest accepted asset upload, e.g. 512MiB.
    #[arg(long, env = "RM_MAX_UPLOAD_SIZE", default_value = "512MiB", value_parser = parse_size)]
    pub max_upload_size: u64,

    /// Require an agent credential or an active enrollment token (Authorization: Bearer) for downloads.
    #[arg(long, env = "RM_REQUIRE_DOWNLOAD_AUTH")]
    pub require_download_auth: bool,

    /// Reverse proxies (IP addresses or CIDR ranges, comma-separated) whose Forwarded / X-Forwarded-Proto /
    /// X-Forwarded-Host headers give the public scheme and host. Forwarding headers from anyone else make links
    /// relative. Not needed when --public-url is set.
    #[arg(long, env = "RM_TRUSTED_PROXIES", default_value = "", value_parser = parse_trusted_proxies)]
    pub trusted_proxies: TrustedProxies,

    /// Audit events older than this are deleted (checked every ten minutes).
    #[arg(long, env = "RM_AUDIT_RETENTION", default_value = "90d", value_parser = humantime::parse_duration)]
    pub audit_retention: Duration,

    /// At most this many audit events are kept; the oldest are deleted first.
    #[arg(long, env = "RM_AUDIT_MAX_EVENTS", default_value_t = 100_000)]
    pub audit_max_events: u64,

    /// Downloads are audited at most once per client address, platform and build in this interval, so no number of
    /// requests can grow the database without bound.
    #[arg(long, env = "RM_DOWNLOAD_AUDIT_INTERVAL", default_value = "10m", value_parser = humantime::parse_duration)]
    pub download_audit_interval: Duration,

    /// TLS: auto (https when a certificate is configured or in <data-dir>/tls/, plain HTTP otherwise), self-signed
    /// (as auto, but generate a key and self-signed certificate into <data-dir>/tls/ when there is none) or off.
    #[arg(long, global = true, env = "RM_TLS", default_value = "auto", value_parser = parse_tls_mode)]
    pub tls: TlsMode,

    /// PEM certificate chain (leaf first); default <data-dir>/tls/cert.pem. Replacing the file takes effect without a
    /// restart.
    #[arg(long, global = true, env = "RM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert; default <data-dir>/tls/key.pem.
    #[arg(long, global = true, env = "RM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Extra host names or addresses (comma-separated) a generated self-signed certificate is valid for, besides
    /// localhost, 127.0.0.1 and ::1 (and the host of --public-url).
    #[arg(long, env = "RM_TLS_NAMES", value_delimiter = ',')]
    pub tls_names: Vec<String>,

    /// Longest an agent or admin API request may take, body included; downloads and uploads are not limited.
    #[arg(long, env = "RM_API_TIMEOUT", default_value = "30s", value_parser = positive_duration)]
    pub api_timeout: Duration,

    /// On SIGTERM/SIGINT, how long in-flight requests may run before the server exits anyway.
    #[arg(long, env = "RM_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// A connection must send a complete request head within this long of connecting (or, when kept alive, of the
    /// first byte of its next request); otherwise it is closed.
    #[arg(long, env = "RM_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub header_read_timeout: Duration,

    /// A kept-alive connection with no request in progress is closed after this long.
    #[arg(long, env = "RM_IDLE_TIMEOUT", default_value = "60s", value_parser = positive_duration)]
    pub idle_timeout: Duration,

    /// A response (e.g. a download) whose client takes no bytes for this long is closed; slow readers that make
    /// progress are not.
    #[arg(long, env = "RM_SEND_TIMEOUT", default_value = "60s", value_parser = positive_duration)]
    pub send_timeout: Duration,

    /// Slowest accepted request body (uploads included), in bytes per second averaged over --body-rate-window;
    /// a slower body fails and a partial upload is discarded.
    #[arg(long, env = "RM_BODY_MIN_RATE", default_value = "1KiB", value_parser = parse_size)]
    pub body_min_rate: u64,

    /// The window over which --body-min-rate is measured.
    #[arg(long, env = "RM_BODY_RATE_WINDOW", default_value = "30s", value_parser = positive_duration)]
    pub body_rate_window: Duration,

    /// Connections served at once (default 4096, capped to the open-file limit minus 64). At the limit the connection
    /// waiting longest for a request is closed to make room.
    #[arg(long, env = "RM_MAX_CONNECTIONS", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: Option<u32>,

    /// Threads that serve connections, each with its own event loop (default: one per CPU). 0 serves them on the
    /// runtime that also runs the background tasks.
    #[arg(long, env = "RM_CONN_THREADS", value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub conn_threads: Option<u16>,

    /// Serve GET /metrics without the admin token (for a Prometheus on a trusted network). By default a scrape needs
    /// `Authorization: Bearer <admin token>`.
    #[arg(long, env = "RM_METRICS_PUBLIC")]
    pub metrics_public: bool,

    /// A web page session with no request for this long is signed out.
    #[arg(long, env = "RM_WEB_SESSION_IDLE", default_value = "1h", value_parser = positive_duration)]
    pub web_session_idle: Duration,

    /// A web page session ends this long after sign-in, however busy.
    #[arg(long, env = "RM_WEB_SESSION_MAX", default_value = "12h", value_parser = positive_duration)]
    pub web_session_max: Duration,
}

#[derive(clap::Args, Debug)]
pub struct HealthcheckArgs {
    /// URL to probe; defaults to /healthz on the --listen address (0.0.0.0 becomes 127.0.0.1).
    #[arg(long, env = "RM_HEALTHCHECK_URL")]
    pub url: Option<String>,

    /// Give up after this long.
    #[arg(long, env = "RM_HEALTHCHECK_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

fn parse_public_url(raw: &str) -> Result<PublicUrl, String> {
    raw.parse()
}

fn parse_trusted_proxies(raw: &str) -> Result<TrustedProxies, String> {
    raw.parse()
}

/// `IP:PORT`, or `HOST:PORT` resolved to its first address (IPv4 first, as `localhost` usually means 127.0.0.1).
fn parse_listen(raw: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = raw.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(raw)
        .map_err(|e| format!("{raw:?} is not IP:PORT or HOST:PORT ({e})"))?
        .collect();
    addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()).copied().ok_or_else(|| format!("{raw:?} resolves to nothing"))
}

/// A duration above zero: a zero timeout would close every connection at once, not disable the limit.
fn positive_duration(raw: &str) -> Result<Duration, String> {
    match humantime::parse_duration(raw) {
        Ok(d) if d.is_zero() => Err(format!("{raw:?}: must be above zero")),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_tls_mode(raw: &str) -> Result<TlsMode, String> {
    raw.parse()
}

impl ServeArgs {
    /// `None` when these flags and the data dir make the server speak plain HTTP; otherwise the pin of the
    /// certificate it uses, or why that file does not load (nothing is generated here).
    pub fn local_pin(&self) -> Option<Result<String, String>> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let tls = self.tls_config();
        let cert = tls.cert.unwrap_or_else(|| self.data_dir.join("tls").join(rm_server::tls::CERT_FILE));
        if tls.mode == TlsMode::Off || !cert.exists() {
            return None;
        }
        let der = CertificateDer::from_pem_file(&cert).map_err(|e| format!("{}: {e}", cert.display()));
        Some(der.and_then(|der| rm_protocol::pin::pin_of_certificate(&der).map_err(|e| e.to_string())))
    }

    /// The TLS settings these flags describe.
    pub fn tls_config(&self) -> TlsConfig {
        let mut names = self.tls_names.clone();
        if let Some(host) = self.public_url.as_ref().and_then(|u| u.host()) {
            names.push(host.to_owned());
        }
        TlsConfig { mode: self.tls.clone(), cert: self.tls_cert.clone(), key: self.tls_key.clone(), names }
    }
}

/// A lease lifetime: a duration from 10 s to 1 h.
fn parse_lease_ttl(raw: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(raw).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(10) || d > Duration::from_secs(3600) {
        return Err(format!("{raw:?} must be between 10s and 1h"));
    }
    Ok(d)
}

/// Bytes with an optional binary suffix: `1048576`, `64KiB`, `512MiB`, `2GiB`.
fn parse_size(raw: &str) -> Result<u64, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (digits, suffix) = raw.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("{raw:?} is not a size (e.g. 512MiB)"))?;
    let unit: u64 = match suffix.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?}; use B, KiB, MiB or GiB")),
    };
    n.checked_mul(unit).filter(|&n| n > 0).ok_or_else(|| format!("{raw:?} is out of range"))
}

impl HealthcheckArgs {
    /// The URL to probe: --url, else /healthz on the listen address, over https when the server's flags and data dir
    /// say it speaks TLS.
    pub fn url_for(&self, listen: SocketAddr, tls: bool) -> String {
        if let Some(url) = &self.url {
            return url.clone();
        }
        let mut addr = listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(if addr.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
        }
        format!("{}://{addr}/healthz", if tls { "https" } else { "http" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_flag_has_an_rm_env_var() {
        let cmd = Cli::command();
        let subcommands: Vec<_> = cmd.get_subcommands().cloned().collect();
        for c in std::iter::once(cmd).chain(subcommands) {
            for arg in c.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                let env = arg.get_env().and_then(|e| e.to_str()).unwrap_or_default();
                assert!(env.starts_with("RM_"), "--{id} of {} has no RM_* env var", c.get_name());
            }
        }
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        for bad in ["", "0", "12MB", "x", "-1", "99999999999999999999GiB", "5 TiB"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn restore_includes_are_never_split_on_commas() {
        let cli = Cli::try_parse_from([
            "restic-manager-server",
            "restore",
            "--agent",
            "a1",
            "--snapshot",
            "90a410e6",
            "--include",
            "/srv/a,b",
            "--include",
            "/srv/we[ir]d",
        ])
        .unwrap();
        let Some(Command::Restore(args)) = cli.command else { panic!("not a restore") };
        assert_eq!(args.include, ["/srv/a,b", "/srv/we[ir]d"]);
    }

    #[test]
    fn zero_timeouts_are_refused() {
        for flag in ["--header-read-timeout", "--idle-timeout", "--send-timeout", "--body-rate-window", "--api-timeout"]
        {
            let err = Cli::try_parse_from(["restic-manager-server", flag, "0s"]).unwrap_err().to_string();
            assert!(err.contains("above zero"), "{flag}: {err}");
            assert!(Cli::try_parse_from(["restic-manager-server", flag, "5s"]).is_ok(), "{flag}");
        }
    }

    #[test]
    fn healthcheck_url_defaults_to_loopback() {
        let args = HealthcheckArgs { url: None, timeout: Duration::from_secs(1) };
        assert_eq!(args.url_for("0.0.0.0:9000".parse().unwrap(), false), "http://127.0.0.1:9000/healthz");
        assert_eq!(args.url_for("[::]:9000".parse().unwrap(), false), "http://[::1]:9000/healthz");
        assert_eq!(args.url_for("10.1.2.3:80".parse().unwrap(), true), "https://10.1.2.3:80/healthz");
    }
}

/// `--rollout-strategy`: `None` is `manual`.
#[derive(Clone, Debug)]
pub struct RolloutDefault(pub Option<rm_protocol::rollout::Strategy>);

fn parse_rollout_strategy(text: &str) -> Result<RolloutDefault, String> {
    match text.trim() {
        "manual" => Ok(RolloutDefault(None)),
        "immediate" => Ok(RolloutDefault(Some(rm_protocol::rollout::Strategy::immediate()))),
        json if json.starts_with('{') => {
            let strategy: rm_protocol::rollout::Strategy =
                serde_json::from_str(json).map_err(|e| format!("not a rollout strategy: {e}"))?;
            strategy.validate()?;
            Ok(RolloutDefault(Some(strategy)))
        }
        other => Err(format!("{other:?}: use manual, immediate or a JSON strategy")),
    }
}

fn parse_positive(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d.is_zero() { Err("must be more than 0".into()) } else { Ok(d) }
}

fn parse_rollout_tick(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(50) || d > Duration::from_secs(60) {
        return Err("between 50ms and 60s".into());
    }
    Ok(d)
}
