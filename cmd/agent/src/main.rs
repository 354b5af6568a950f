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
    /// Where the enrolled identity is stored.
    #[arg(long, global = true, env = "RM_AGENT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll this host with a server using an enrollment token.
    Enroll {
        #[arg(long, env = "RM_SERVER")]
        server: String,
        #[arg(long, env = "RM_ENROLL_TOKEN", hide_env_values = true)]
        token: String,
        /// Trust this PEM CA bundle for the server's certificate.
        #[arg(long, env = "RM_CACERT")]
        cacert: Option<PathBuf>,
        /// Do not verify the server's certificate (testing only).
        #[arg(long, env = "RM_INSECURE")]
        insecure: bool,
        /// Replace an existing enrollment.
        #[arg(long)]
        force: bool,
    },
    /// Send heartbeats and follow the build the server serves.
    Run {
        /// One heartbeat (and update if needed), then exit.
        #[arg(long)]
        once: bool,
    },
    /// Install the build the server serves now.
    Update {
        /// Only report whether an update is available.
        #[arg(long)]
        check: bool,
    },
    /// Show this agent's build, identity and whether it matches the served build.
    Status,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = cli.config.unwrap_or_else(rm_agent::config::default_path);
    let result = match cli.command {
        Command::Enroll { server, token, cacert, insecure, force } => {
            commands::enroll(&server, &token, &config, Tls { cacert, insecure }, force)
        }
        Command::Run { once } => commands::run(&config, once),
        Command::Update { check } => commands::update(&config, check),
        Command::Status => commands::status(&config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("restic-manager-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
