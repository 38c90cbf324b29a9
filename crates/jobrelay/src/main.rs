//! `jobrelay`: one binary for the orchestrator server, the executor client and the user CLI.

mod up;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "jobrelay",
    version,
    about = "Job orchestration for scientific web platforms"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run an executor client: accepts payloads over HTTP and runs their run.sh.
    Client(Box<jobrelay_client::ClientArgs>),
    /// Run a server and a local client with a service `example`: a working system in one command.
    Up(up::UpArgs),
    /// Run the orchestrator server: queues jobs and dispatches them to clients.
    Server(ServerCommand),
    #[command(flatten)]
    User(jobrelay_cli::UserCommand),
}

/// `jobrelay server [OPTIONS]` runs the server; `jobrelay server migrate` moves its database.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
struct ServerCommand {
    #[command(subcommand)]
    action: Option<ServerAction>,
    #[command(flatten)]
    args: jobrelay_server::ServerArgs,
}

#[derive(Subcommand, Debug)]
enum ServerAction {
    /// Move a server's SQLite database to PostgreSQL, whole, in one transaction (the server
    /// stopped; the target holding no job).
    Migrate(jobrelay_server::migrate::MigrateArgs),
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("JOBRELAY_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> std::process::ExitCode {
    // A payload supervisor started by a client: plain std, before any runtime exists.
    if let Some(code) = jobrelay_client::supervisor::run_if_invoked() {
        std::process::exit(code);
    }
    run()
}

#[tokio::main]
async fn run() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::User(command) => return jobrelay_cli::run(command).await,
        Command::Client(args) => {
            init_logging();
            jobrelay_client::run(*args).await
        }
        Command::Server(ServerCommand {
            action: Some(ServerAction::Migrate(args)),
            ..
        }) => {
            init_logging();
            match tokio::task::spawn_blocking(move || jobrelay_server::migrate::run(&args)).await {
                Ok(Ok(report)) => {
                    println!("{report}");
                    Ok(())
                }
                Ok(Err(e)) => Err(e),
                Err(e) => Err(anyhow::anyhow!("the migration stopped: {e}")),
            }
        }
        Command::Server(ServerCommand { args, .. }) => {
            init_logging();
            jobrelay_server::run(args).await
        }
        Command::Up(args) => {
            init_logging();
            up::run(args).await
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jobrelay: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
