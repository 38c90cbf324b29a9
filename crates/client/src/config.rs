//! Command-line options of `jobrelay client` and the validated configuration built from them.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use jobrelay_common::auth::Secret;
use jobrelay_common::tls::TlsFiles;

use jobrelay_common::resources::{parse_memory_mb, Capacity};

use crate::allot;
use crate::confine::{Confinement, Limits, RunAs};
use crate::executor::slurm::SlurmConfig;

/// Where payloads run.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutorKind {
    /// `bash run.sh` in a process group on this machine.
    Local,
    /// An `sbatch` job on a Slurm cluster (the work directory must be on a file system the
    /// compute nodes share).
    Slurm,
}

/// Default `--slots` with `--executor slurm`: payloads handed to Slurm at once (pending or
/// running there); Slurm's own queue and limits decide what runs.
pub const DEFAULT_SLURM_SLOTS: usize = 256;

/// Options of `jobrelay client`. `PORT` and `DATA_PATH` are honoured as deployed peers of the
/// protocol do; a flag wins over its variable.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: IpAddr,
    /// Port to listen on (0 picks a free one; default 9000). With --connect the client needs
    /// no port: it listens only when given one (for `/health` and `/metrics`, say).
    #[arg(long, env = "PORT")]
    pub port: Option<u16>,
    /// Directory for payload records and work directories.
    #[arg(long, env = "DATA_PATH", default_value = "./data/client")]
    pub data_dir: PathBuf,
    /// Payloads running at once (default: the number of CPUs; with `--executor slurm`,
    /// payloads handed to Slurm at once, default 256).
    #[arg(long)]
    pub slots: Option<usize>,
    /// Cores payloads may share, advertised in `/info` (default: `--slots` when given, else
    /// detected: the CPUs this process may use, cgroup quota included). Also the default of
    /// `--slots`.
    #[arg(long)]
    pub cores: Option<u32>,
    /// Memory payloads may share, advertised in `/info`: MiB or with a unit (`64G`)
    /// (default: detected, `/proc/meminfo` or a lower cgroup `memory.max`).
    #[arg(long, value_parser = parse_memory_mb)]
    pub memory: Option<u64>,
    /// Number of GPUs, ids 0 to N-1 (default: none).
    #[arg(long, conflicts_with = "gpu_ids")]
    pub gpus: Option<u32>,
    /// The GPU ids payloads may be given (`0,1`); each running payload gets its own in
    /// `CUDA_VISIBLE_DEVICES`.
    #[arg(long, value_delimiter = ',')]
    pub gpu_ids: Option<Vec<u32>>,
    /// Largest accepted submission, in bytes of file content.
    #[arg(long, default_value_t = 1 << 30)]
    pub max_upload: u64,
    /// Seconds between SIGTERM and SIGKILL when a payload is stopped.
    #[arg(long, default_value_t = 10.0)]
    pub kill_grace: f64,
    /// Longest a payload may run, in seconds (default: no limit).
    #[arg(long)]
    pub max_runtime: Option<f64>,
    /// Seconds a finished payload's work directory is kept.
    #[arg(long, default_value_t = 864000.0)]
    pub max_age: f64,
    /// Where payloads run: `local` (process groups on this machine) or `slurm` (sbatch jobs).
    #[arg(long, value_enum, default_value_t = ExecutorKind::Local)]
    pub executor: ExecutorKind,
    /// Slurm partition for the payloads' jobs (`sbatch --partition`).
    #[arg(long)]
    pub slurm_partition: Option<String>,
    /// Slurm account for the payloads' jobs (`sbatch --account`).
    #[arg(long)]
    pub slurm_account: Option<String>,
    /// Extra `sbatch` option, passed through as it is; repeatable
    /// (e.g. `--slurm-arg=--time=01:00:00 --slurm-arg=--mem=2G`).
    #[arg(long = "slurm-arg", allow_hyphen_values = true)]
    pub slurm_args: Vec<String>,
    /// Seconds between two `squeue` calls (one call for all followed jobs).
    #[arg(long, default_value_t = 2.0)]
    pub slurm_poll_interval: f64,
    /// File holding the token the server must send (`Authorization: Bearer <token>`); every
    /// request but `GET /` and `GET /health` without it is refused with 401. Without it anyone
    /// who can reach the client can run code on it.
    #[arg(long, env = "JOBRELAY_CLIENT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Run every payload as this unprivileged user (name or uid); needs the client to run as
    /// root. Its work directory is given to that user.
    #[arg(long)]
    pub run_as: Option<String>,
    /// Run every payload inside a bubblewrap sandbox: no network, a private /tmp, the system
    /// read-only, only its work directory writable, the client's data directory hidden.
    #[arg(long)]
    pub sandbox: bool,
    /// Limit of a payload process's virtual memory, in bytes (RLIMIT_AS).
    #[arg(long)]
    pub limit_memory: Option<u64>,
    /// Limit of a payload process's CPU time, in seconds (RLIMIT_CPU).
    #[arg(long)]
    pub limit_cpu: Option<u64>,
    /// Limit of the processes of the payloads' user (RLIMIT_NPROC; not enforced for root, so
    /// use it with --run-as).
    #[arg(long)]
    pub limit_processes: Option<u64>,
    /// Limit of the size of one file a payload writes, in bytes (RLIMIT_FSIZE).
    #[arg(long)]
    pub limit_file_size: Option<u64>,
    /// Limit of a payload process's open files (RLIMIT_NOFILE).
    #[arg(long)]
    pub limit_open_files: Option<u64>,
    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Join the server at this URL and pull work from it (the client dials out; no server
    /// configuration names it). Needs --service and --join-token-file.
    #[arg(long, requires_all = ["service", "join_token_file"])]
    pub connect: Option<String>,
    /// A service to serve when joining with --connect; repeatable.
    #[arg(long, requires = "connect")]
    pub service: Vec<String>,
    /// File holding the service's join token (the server's --join-token-file or the
    /// service's `join_token_file`).
    #[arg(long, env = "JOBRELAY_JOIN_TOKEN_FILE", requires = "connect")]
    pub join_token_file: Option<PathBuf>,
    /// CA certificates (PEM) the --connect server's certificate must be signed by (default:
    /// the system's roots).
    #[arg(long, requires = "connect")]
    pub ca: Option<PathBuf>,
    /// With --connect, how long SIGTERM waits for the payloads here to finish and be
    /// collected before the client stops (the server queues the rest again elsewhere once it
    /// finds the client gone).
    #[arg(long, default_value_t = 600.0)]
    pub leave_grace: f64,
}

/// How a client that dials out joins its server (`--connect`).
#[derive(Debug, Clone)]
pub struct PullConfig {
    /// The server's base URL, without a trailing `/`.
    pub server: String,
    pub services: Vec<String>,
    pub join_token: Secret,
    /// PEM certificates the server's must be signed by; `None`: the system's roots.
    pub ca: Option<Vec<u8>>,
    pub leave_grace: Duration,
}

/// Everything the client needs to run, checked.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Where the API listens; `None` (a client that only dials out): nowhere.
    pub listen: Option<SocketAddr>,
    /// Absolute path of the data directory.
    pub data_dir: PathBuf,
    pub slots: usize,
    /// Cores, memory and GPUs advertised in `/info`.
    pub capacity: Capacity,
    /// The GPUs' ids, `capacity.gpus` of them.
    pub gpu_ids: Vec<u32>,
    pub max_upload: u64,
    pub kill_grace: Duration,
    pub max_runtime: Option<Duration>,
    pub max_age: Duration,
    pub executor: ExecutorConfig,
    /// Token the server must send; `None` accepts every request (the seed contract).
    pub token: Option<Secret>,
    /// How local payloads are confined; the default confines nothing.
    pub confinement: Confinement,
    /// Serve HTTPS with these files; `None`: plain HTTP.
    pub tls: Option<TlsFiles>,
    /// Join a server and pull work from it (`--connect`); `None`: wait to be pushed to.
    pub pull: Option<PullConfig>,
}

#[derive(Debug, Clone)]
pub enum ExecutorConfig {
    Local,
    Slurm(SlurmConfig),
}

/// Port of a client that is given none.
pub const DEFAULT_PORT: u16 = 9000;

fn pull_config(
    server: &str,
    services: &[String],
    join_token_file: Option<&std::path::Path>,
    ca: Option<&std::path::Path>,
    leave_grace: Duration,
) -> anyhow::Result<PullConfig> {
    let parsed = reqwest::Url::parse(server.trim())
        .map_err(|e| anyhow::anyhow!("--connect {server:?}: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        anyhow::bail!("--connect {server:?}: expected http(s)://host[:port]");
    }
    if services.is_empty() {
        anyhow::bail!("--connect needs at least one --service");
    }
    let join_token = Secret::read_file(
        join_token_file.ok_or_else(|| anyhow::anyhow!("--connect needs --join-token-file"))?,
    )
    .map_err(|e| anyhow::anyhow!("--join-token-file: {e}"))?;
    let ca = ca
        .map(|path| {
            std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("cannot read --ca {}: {e}", path.display()))
        })
        .transpose()?;
    Ok(PullConfig {
        server: parsed.as_str().trim_end_matches('/').to_owned(),
        services: services.to_vec(),
        join_token,
        ca,
        leave_grace,
    })
}

fn seconds(name: &str, value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| anyhow::anyhow!("--{name} must be a non-negative number of seconds"))
}

impl ClientArgs {
    pub fn into_config(self) -> anyhow::Result<ClientConfig> {
        if self.cores == Some(0) {
            anyhow::bail!("--cores must be at least 1");
        }
        let gpu_ids = match (&self.gpu_ids, self.gpus) {
            (Some(ids), _) => {
                let mut sorted = ids.clone();
                sorted.sort_unstable();
                sorted.dedup();
                if sorted.len() != ids.len() {
                    anyhow::bail!("--gpu-ids names a GPU twice");
                }
                ids.clone()
            }
            (None, Some(n)) => (0..n).collect(),
            (None, None) => Vec::new(),
        };
        // Without --cores, a client given --slots has that many cores: a job that asks for
        // nothing takes one, so N slots still run N such jobs at once (as before cores were
        // counted). A Slurm client's cores are the cluster's, which it does not know.
        let cores = match (self.cores, self.slots, self.executor) {
            (Some(cores), _, _) => cores,
            (None, Some(slots), _) => u32::try_from(slots).unwrap_or(u32::MAX),
            (None, None, ExecutorKind::Local) => allot::detected_cores(),
            (None, None, ExecutorKind::Slurm) => DEFAULT_SLURM_SLOTS as u32,
        };
        let capacity = Capacity {
            cores,
            memory_mb: self.memory.unwrap_or_else(allot::detected_memory_mb),
            gpus: gpu_ids.len() as u32,
        };
        let slots = match (self.slots, self.executor) {
            (Some(0), _) => anyhow::bail!("--slots must be at least 1"),
            (Some(n), _) => n,
            (None, ExecutorKind::Local) => capacity.cores as usize,
            (None, ExecutorKind::Slurm) => DEFAULT_SLURM_SLOTS,
        };
        let executor = match self.executor {
            ExecutorKind::Local => {
                if self.slurm_partition.is_some()
                    || self.slurm_account.is_some()
                    || !self.slurm_args.is_empty()
                {
                    anyhow::bail!("--slurm-* options need --executor slurm");
                }
                ExecutorConfig::Local
            }
            ExecutorKind::Slurm => {
                let poll_interval = seconds("slurm-poll-interval", self.slurm_poll_interval)?;
                if poll_interval < Duration::from_millis(50) {
                    anyhow::bail!("--slurm-poll-interval must be at least 0.05 seconds");
                }
                ExecutorConfig::Slurm(SlurmConfig {
                    partition: self.slurm_partition.filter(|p| !p.is_empty()),
                    account: self.slurm_account.filter(|a| !a.is_empty()),
                    extra_args: self.slurm_args,
                    poll_interval,
                })
            }
        };
        let confinement = Confinement {
            run_as: self.run_as.as_deref().map(RunAs::lookup).transpose()?,
            limits: Limits {
                address_space: self.limit_memory,
                cpu_seconds: self.limit_cpu,
                processes: self.limit_processes,
                file_size: self.limit_file_size,
                open_files: self.limit_open_files,
            },
            sandbox: self.sandbox,
        };
        if !confinement.is_none() && !matches!(executor, ExecutorConfig::Local) {
            anyhow::bail!(
                "--run-as, --sandbox and --limit-* apply to the local executor; with \
                 --executor slurm confine jobs with Slurm's own limits (--slurm-arg)"
            );
        }
        let token = self
            .token_file
            .as_deref()
            .map(Secret::read_file)
            .transpose()
            .map_err(anyhow::Error::msg)?;
        std::fs::create_dir_all(&self.data_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot create data directory {}: {e}",
                self.data_dir.display()
            )
        })?;
        let data_dir = std::fs::canonicalize(&self.data_dir)?;
        let pull = match &self.connect {
            None => None,
            Some(server) => Some(pull_config(
                server,
                &self.service,
                self.join_token_file.as_deref(),
                self.ca.as_deref(),
                seconds("leave-grace", self.leave_grace)?,
            )?),
        };
        let listen = match (self.port, &pull) {
            (Some(port), _) => Some(SocketAddr::new(self.bind, port)),
            (None, Some(_)) => None,
            (None, None) => Some(SocketAddr::new(self.bind, DEFAULT_PORT)),
        };
        Ok(ClientConfig {
            listen,
            pull,
            data_dir,
            slots,
            capacity,
            gpu_ids,
            max_upload: self.max_upload,
            kill_grace: seconds("kill-grace", self.kill_grace)?,
            max_runtime: self
                .max_runtime
                .map(|s| seconds("max-runtime", s))
                .transpose()?,
            max_age: seconds("max-age", self.max_age)?,
            executor,
            token,
            confinement,
            tls: TlsFiles::from_args(self.tls_cert, self.tls_key).map_err(anyhow::Error::msg)?,
        })
    }
}
