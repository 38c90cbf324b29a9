//! Command-line arguments of the user commands.

use std::path::PathBuf;

/// Where the server is and who is asking; shared by every user command.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectionOpts {
    /// Base URL of the jobrelay server.
    #[arg(long, env = "JOBRELAY_SERVER", default_value = "http://127.0.0.1:5000")]
    pub server: String,
    /// Your user id.
    #[arg(long, env = "JOBRELAY_USER")]
    pub user: Option<i64>,
    /// Your token, for a server with a users file (sent as `Authorization: Bearer`); the
    /// server then knows your user id from it. Prefer the variable: a flag shows in `ps`.
    #[arg(long, env = "JOBRELAY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Extra CA certificates (PEM) to trust for an `https://` server, besides the system's.
    #[arg(long, env = "JOBRELAY_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Print machine-readable JSON instead of human output.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Subcommand, Debug)]
pub enum UserCommand {
    /// Upload a job (a run.sh plus inputs; a directory uploads its files).
    Submit(SubmitArgs),
    /// Show a job's state.
    Status(JobArgs),
    /// Follow a job until it finishes (exit code tells how it ended).
    Wait(WaitArgs),
    /// Download a job's results.
    Download(DownloadArgs),
    /// Cancel a job wherever it is.
    Cancel(JobArgs),
    /// List jobs.
    Jobs(JobsArgs),
    /// Print a job's stdout or stderr (--follow: keep printing until the job ends).
    Logs(LogsArgs),
    /// List the server's clients, configured and joined (`jobrelay client --connect`).
    Clients(ClientsArgs),
}

#[derive(clap::Args, Debug)]
pub struct ClientsArgs {
    #[command(flatten)]
    pub conn: ConnectionOpts,
    /// Only the clients that joined at run time.
    #[arg(long)]
    pub joined: bool,
}

#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    #[command(flatten)]
    pub conn: ConnectionOpts,
    /// Job id.
    pub id: u64,
    /// Which output: stdout or stderr.
    #[arg(long, default_value = "stdout", value_parser = ["stdout", "stderr"])]
    pub stream: String,
    /// Keep printing new output until the job has finished.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

#[derive(clap::Args, Debug)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub conn: ConnectionOpts,
    /// Service that runs the job.
    #[arg(long)]
    pub service: String,
    /// Files and directories to upload; one of them must be (or contain) run.sh.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Follow the job until it finishes.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: download the results and unpack them into this directory.
    #[arg(long, requires = "wait")]
    pub output: Option<PathBuf>,
    /// With --wait: give up after this many seconds.
    #[arg(long, requires = "wait")]
    pub timeout: Option<f64>,
    /// URL the server POSTs the job's JSON to, signed, when it ends (its host must be in the
    /// server's webhook allowlist).
    #[arg(long, value_name = "URL")]
    pub callback: Option<String>,
    #[command(flatten)]
    pub request: RequestArgs,
}

/// What a job asks for; the service's defaults where not given.
#[derive(clap::Args, Debug, Default)]
pub struct RequestArgs {
    /// Cores the job needs.
    #[arg(long)]
    pub cores: Option<u32>,
    /// Memory the job needs: MiB, or with a unit (`4G`, `512M`).
    #[arg(long, value_parser = jobrelay_common::resources::parse_memory_mb)]
    pub memory: Option<u64>,
    /// GPUs the job needs.
    #[arg(long)]
    pub gpus: Option<u32>,
    /// Longest the job may run: seconds, or with a unit (`90m`, `2h`); killed past it.
    #[arg(long, value_parser = jobrelay_common::resources::parse_seconds)]
    pub walltime: Option<u64>,
    /// Order among the user's own queued jobs: higher first (default 0; may be negative).
    #[arg(long, allow_negative_numbers = true)]
    pub priority: Option<i64>,
}

impl RequestArgs {
    /// The upload's text fields for what was given (memory in MiB, walltime in seconds).
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        use jobrelay_common::resources::{
            CORES_FIELD, GPUS_FIELD, MEMORY_FIELD, PRIORITY_FIELD, WALLTIME_FIELD,
        };
        [
            (CORES_FIELD, self.cores.map(|n| n.to_string())),
            (MEMORY_FIELD, self.memory.map(|n| n.to_string())),
            (GPUS_FIELD, self.gpus.map(|n| n.to_string())),
            (WALLTIME_FIELD, self.walltime.map(|n| n.to_string())),
            (PRIORITY_FIELD, self.priority.map(|n| n.to_string())),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.map(|v| (name, v)))
        .collect()
    }
}

#[derive(clap::Args, Debug)]
pub struct JobArgs {
    #[command(flatten)]
    pub conn: ConnectionOpts,
    /// Job id.
    pub id: u64,
}

#[derive(clap::Args, Debug)]
pub struct WaitArgs {
    #[command(flatten)]
    pub conn: ConnectionOpts,
    /// Job id.
    pub id: u64,
    /// Give up after this many seconds.
    #[arg(long)]
    pub timeout: Option<f64>,
}

#[derive(clap::Args, Debug)]
pub struct DownloadArgs {
    #[command(flatten)]
    pub conn: ConnectionOpts,
    /// Job id.
    pub id: u64,
    /// Write the ZIP to this file (default: job-<id>.zip).
    #[arg(short = 'o', long = "file", conflicts_with = "output")]
    pub file: Option<PathBuf>,
    /// Unpack the results into this directory instead of saving the ZIP.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// The work directory as it is now (also for jobs that failed or were killed).
    #[arg(long)]
    pub partial: bool,
}

#[derive(clap::Args, Debug)]
pub struct JobsArgs {
    #[command(flatten)]
    pub conn: ConnectionOpts,
    /// Only this service's jobs.
    #[arg(long)]
    pub service: Option<String>,
    /// Only jobs in this state (Queued, Running, Completed, ...).
    #[arg(long)]
    pub status: Option<String>,
    /// Most jobs to list.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Skip this many jobs (paging).
    #[arg(long, default_value_t = 0)]
    pub offset: u32,
}
