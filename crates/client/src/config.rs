//! Command-line options of `jobrelay client` and the validated configuration built from them.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Options of `jobrelay client`. `PORT` and `DATA_PATH` are honoured as deployed peers of the
/// protocol do; a flag wins over its variable.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: IpAddr,
    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "PORT", default_value_t = 9000)]
    pub port: u16,
    /// Directory for payload records and work directories.
    #[arg(long, env = "DATA_PATH", default_value = "./data/client")]
    pub data_dir: PathBuf,
    /// Payloads running at once (default: the number of CPUs).
    #[arg(long)]
    pub slots: Option<usize>,
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
}

/// Everything the client needs to run, checked.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub listen: SocketAddr,
    /// Absolute path of the data directory.
    pub data_dir: PathBuf,
    pub slots: usize,
    pub max_upload: u64,
    pub kill_grace: Duration,
    pub max_runtime: Option<Duration>,
    pub max_age: Duration,
}

fn seconds(name: &str, value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| anyhow::anyhow!("--{name} must be a non-negative number of seconds"))
}

impl ClientArgs {
    pub fn into_config(self) -> anyhow::Result<ClientConfig> {
        let slots = match self.slots {
            Some(0) => anyhow::bail!("--slots must be at least 1"),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        std::fs::create_dir_all(&self.data_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot create data directory {}: {e}",
                self.data_dir.display()
            )
        })?;
        let data_dir = std::fs::canonicalize(&self.data_dir)?;
        Ok(ClientConfig {
            listen: SocketAddr::new(self.bind, self.port),
            data_dir,
            slots,
            max_upload: self.max_upload,
            kill_grace: seconds("kill-grace", self.kill_grace)?,
            max_runtime: self
                .max_runtime
                .map(|s| seconds("max-runtime", s))
                .transpose()?,
            max_age: seconds("max-age", self.max_age)?,
        })
    }
}
