//! `restic-manager-server`: parse flags, set up logging, then serve or probe.

mod agents;
mod cli;
mod notify;
mod operations;
mod plan;
mod repo;
mod restore;
mod rollout;
mod token;
mod web_token;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use cli::{Cli, Command, LogFormat};
use rm_server::{AppState, Config, NetSettings, Settings};
use tracing::info;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("restic-manager-server: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run(cli));
    // Once serving has ended (grace period included), do not wait for stray blocking work: exit now.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    code
}

async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Some(Command::Healthcheck(ref args)) => {
            let pin = cli.serve.local_pin();
            let url = args.url_for(cli.serve.listen, pin.is_some());
            let probe = match pin {
                Some(Err(e)) => Err(format!("the server's certificate does not load, so it cannot be pinned: {e}")),
                pin => rm_server::healthcheck::probe(&url, args.timeout, pin.and_then(Result::ok).as_deref()).await,
            };
            match probe {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("unhealthy: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Agents(cli::AgentsCommand::List { state, health, json })) => {
            exit_code(agents::list(&cli.serve, state, health, json).await)
        }
        Some(Command::Agents(cli::AgentsCommand::Label { id, labels })) => {
            exit_code(agents::label(&cli.serve, id, labels).await)
        }
        Some(Command::Plan(command)) => exit_code(plan::run(&cli.serve, command).await),
        Some(Command::Operations(ref args)) => exit_code(operations::run(&cli.serve, args).await),
        Some(Command::Restore(ref args)) => exit_code(restore::run(&cli.serve, args).await),
        Some(Command::Rollout(command)) => exit_code(rollout::run(&cli.serve, command).await),
        Some(Command::Channel(command)) => exit_code(notify::channel(&cli.serve, command).await),
        Some(Command::Rule(command)) => exit_code(notify::rule(&cli.serve, command).await),
        Some(Command::Notifications(ref args)) => exit_code(notify::notifications(&cli.serve, args).await),
        Some(Command::Token(command)) => exit_code(token::run(&cli.serve, command).await),
        Some(Command::WebToken(command)) => exit_code(web_token::run(&cli.serve, command).await),
        Some(Command::Repo(command)) => exit_code(repo::run(&cli.serve, command).await),
        None | Some(Command::Serve) => {
            // Held past serving: dropping it writes what the log thread has not written yet, the error below included.
            let _log = match init_logging(cli.serve.log_format, &cli.serve.log) {
                Ok(guard) => guard,
                Err(e) => {
                    eprintln!("restic-manager-server: {e:#}");
                    return ExitCode::FAILURE;
                }
            };
            match serve(cli.serve).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// How an offline command ends: its error on stderr and exit status 1.
fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("restic-manager-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: cli::ServeArgs) -> anyhow::Result<()> {
    let info = rm_buildinfo::current();
    info!(version = info.version, commit = info.commit, date = info.date, "restic-manager-server starting");
    match rm_server::raise_fd_limit() {
        Ok((before, after)) if before != after => info!(before, after, "raised the open-file limit"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not read or raise the open-file limit"),
    }
    // Bind before touching the data dir: a taken port must not leave a new database or admin token behind.
    let listener = tokio::net::TcpListener::bind(args.listen).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            "; another process uses this port: choose another with --listen (make run PORT=8081)"
        } else {
            ""
        };
        anyhow::anyhow!("cannot listen on {}: {e}{hint}", args.listen)
    })?;
    let state = AppState::new(Config {
        data_dir: args.data_dir.clone(),
        bundled_dir: args.bundled_assets_dir.clone(),
        public_url: args.public_url.clone(),
        admin_token: args.admin_token.clone(),
        settings: Settings {
            heartbeat_interval: args.heartbeat_interval,
            stale_after: args.stale_after,
            max_upload_bytes: args.max_upload_size,
            require_download_auth: args.require_download_auth,
            api_timeout: args.api_timeout,
            trusted_proxies: args.trusted_proxies.clone(),
            tls: args.tls_config(),
            audit_retention: args.audit_retention,
            audit_max_events: args.audit_max_events,
            download_audit_interval: args.download_audit_interval,
            net: NetSettings {
                header_read_timeout: args.header_read_timeout,
                idle_timeout: args.idle_timeout,
                send_timeout: args.send_timeout,
                body_min_bytes: (args.body_min_rate as f64 * args.body_rate_window.as_secs_f64()) as u64,
                body_rate_window: args.body_rate_window,
                max_connections: args.max_connections.map(|n| n as usize),
                conn_threads: args.conn_threads.map(usize::from),
                ..NetSettings::default()
            },
            metrics_public: args.metrics_public,
            max_lease_ttl: args.max_lease_ttl,
            web_session_idle: args.web_session_idle,
            web_session_max: args.web_session_max,
            rollout_strategy: args.rollout_strategy.0.clone(),
            rollout_tick: args.rollout_tick,
            notify_tick: args.notify_tick,
            notify_retry_base: args.notify_retry_base,
            notify_retry_max: args.notify_retry_max,
            notify_give_up: args.notify_give_up,
            notify_digest_every: args.notify_digest_every,
        },
    })
    .context("cannot start")?;
    info!(
        data_dir = %state.store().data_dir().display(),
        bundled_dir = state.store().bundled_dir().map(|p| p.display().to_string()).unwrap_or_else(|| "(none)".into()),
        public_url = state.public_url().map(|u| u.to_string()).unwrap_or_else(|| "(from Host header)".into()),
        "asset roots"
    );
    info!(addr = %listener.local_addr()?, "listening");
    let warm = state.clone();
    tokio::task::spawn_blocking(move || rm_server::warm_up(&warm));
    rm_server::spawn_maintenance(&state);
    rm_server::spawn_rollouts(&state);
    rm_server::spawn_notifications(&state);
    rm_server::run(listener, state, shutdown_signal(), args.shutdown_grace).await.context("server failed")
}

/// Log lines go to stderr through [`rm_server::log_buffer`]: batched, never dropped, written within 10 ms.
fn init_logging(format: LogFormat, filter: &str) -> anyhow::Result<rm_server::log_buffer::LogGuard> {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).with_context(|| format!("invalid log filter {filter:?}"))?;
    // Colours only for a person at a terminal, never escape codes in a log file or journal.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = rm_server::log_buffer::start(std::io::stderr()).context("cannot start the log writer")?;
    rm_server::log_buffer::route_access_log(
        &writer,
        match format {
            LogFormat::Text => rm_server::log_buffer::Format::Text,
            LogFormat::Json => rm_server::log_buffer::Format::Json,
        },
    );
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(guard)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        () = ctrl_c => info!("SIGINT received"),
        () = term => info!("SIGTERM received"),
    }
}
