//! `restic-manager-agent`: runs on every managed host. Flags here; behaviour in `rm_agent`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rm_agent::commands::{self, Tls};

#[derive(Parser)]
#[command(
    name = "restic-manager-agent",
    about = "restic-manager agent",
    version = rm_buildinfo::current().version_line(),
    long_version = rm_buildinfo::current().version_line(),
    arg_required_else_help = true
)]
struct Cli {
    /// The enrolled identity file (mode 0600); agent-state.json is kept beside it.
    ///
    /// The default follows where this binary is installed, as install.sh --prefix does:
    /// <PREFIX>/bin/restic-manager-agent uses <PREFIX>/etc/restic-manager/agent.json; one in /usr/local/bin, /usr/bin
    /// or /bin uses /etc/restic-manager/agent.json.
    #[arg(long, global = true, env = "RM_AGENT_CONFIG", value_name = "FILE",
          default_value_os_t = rm_agent::config::default_path())]
    config: PathBuf,
    /// The restic executable backups run (default: `restic` on PATH). Version 0.14 or newer.
    #[arg(long, global = true, env = "RM_RESTIC", value_name = "PATH")]
    restic: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll this host with a server using an enrollment token.
    Enroll {
        /// The restic-manager server's URL (https://…); the agent talks to this origin only, as enrolled.
        #[arg(long, env = "RM_SERVER", value_name = "URL")]
        server: String,
        /// The enrollment token (`restic-manager-server token create`). Prefer RM_ENROLL_TOKEN: a command-line
        /// argument shows in ps.
        #[arg(long, env = "RM_ENROLL_TOKEN", hide_env_values = true, value_name = "TOKEN")]
        token: String,
        /// Trust this PEM CA bundle for the server's certificate.
        #[arg(long, env = "RM_CACERT", value_name = "FILE")]
        cacert: Option<PathBuf>,
        /// Do not verify the server's certificate (testing only).
        #[arg(long, env = "RM_INSECURE", conflicts_with = "pin")]
        insecure: bool,
        /// Trust the server whose certificate has this public key, `sha256//<base64>` (curl's --pinnedpubkey form;
        /// the server prints it). Its certificate is fetched, checked against the pin and stored beside the config as
        /// server-cert.pem, the only root trusted from then on; a renewed certificate with the same key replaces it.
        /// Needs an https:// URL.
        #[arg(long, env = "RM_PIN", value_name = "sha256//BASE64", conflicts_with = "cacert")]
        pin: Option<String>,
        /// Allow plain http to a server that is not this machine (127.0.0.0/8, ::1, localhost): the token and the
        /// agent's credential then cross the network unencrypted. Remembered in the config.
        #[arg(long, env = "RM_ALLOW_PLAIN_HTTP")]
        allow_plain_http: bool,
        /// Replace an existing enrollment.
        #[arg(long)]
        force: bool,
    },
    /// Send heartbeats, follow the build the server serves, and run the server's backup plans on schedule.
    Run {
        /// One heartbeat (and update if needed), the backup config sync and the run-now requests it carries, then
        /// deliver every queued report and exit. No scheduled runs.
        #[arg(long)]
        once: bool,
    },
    /// Install the build the server serves now.
    Update {
        /// Only report whether an update is available.
        #[arg(long)]
        check: bool,
    },
    /// Put the previous build (<binary>.previous, kept by the last update) back and remember this one as failed: not
    /// installed again until the server serves another build. Refused unless .previous is the build this one
    /// replaced (or, with no record of that, a working agent). Restart the service afterwards.
    Revert,
    /// The agent's managed restic.
    #[command(subcommand)]
    Restic(ResticCommand),
    /// Show this agent's build, identity, backups (restic, plans, next runs, queued reports) and whether it matches
    /// the served build.
    Status,
}

#[derive(Subcommand)]
enum ResticCommand {
    /// Install (or replace) the managed restic, restic-manager-restic beside this binary, with the server's build
    /// for this host: size and SHA-256 checked against the server's manifest, `version` smoke-run, swapped in
    /// atomically. The host's own restic on PATH is never touched; `run` prefers the newer of the two.
    Install,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = cli.config;
    let result = match cli.command {
        Command::Enroll { server, token, cacert, insecure, pin, allow_plain_http, force } => {
            commands::enroll(&server, &token, &config, Tls { cacert, insecure, pin, allow_plain_http }, force)
        }
        Command::Run { once } => commands::run(&config, once, cli.restic),
        Command::Update { check } => commands::update(&config, check),
        Command::Status => commands::status(&config, cli.restic.as_deref()),
        Command::Revert => commands::revert(&config),
        Command::Restic(ResticCommand::Install) => commands::restic_install(&config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("restic-manager-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
