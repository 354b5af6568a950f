//! `restic-manager-agent`: runs on every managed host. For now it only reports its build.

use clap::Parser;

#[derive(Parser)]
#[command(name = "restic-manager-agent", about = "restic-manager agent", version = version(), long_version = version(), arg_required_else_help = true)]
struct Cli {}

fn version() -> String {
    rm_buildinfo::current().version_line()
}

fn main() {
    Cli::parse();
}
