//! Command-line options, the TOML service file and the reference's environment variables,
//! merged into one checked [`ServerConfig`].
//!
//! Services come from two sources, merged by name:
//! - the TOML file (`[services.NAME]` with `clients`, `runs_per_user`, `max_runs`,
//!   `max_result`, `max_files`);
//! - `SERVICE_<NAME>_UPLOAD_URL`, `_DOWNLOAD_URL`, `_TERMINATE_URL`, `_RUNS_PER_USER`,
//!   `_MAX_RUNS` as the deployed reference reads them, and our `_MAX_RESULT`, `_MAX_FILES` (`<NAME>` lower-cased is the service).
//!   Those URLs are full endpoint URLs (`http://host:9000/submit`); the client's base URL is
//!   the upload URL without its `/submit`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use jobrelay_common::auth::Secret;
use jobrelay_common::tls::TlsFiles;
use serde::Deserialize;
use std::sync::Arc;

use crate::auth::Users;

/// Default number of active jobs per user and service.
pub const DEFAULT_RUNS_PER_USER: usize = 5;
/// Default number of active jobs per service.
pub const DEFAULT_MAX_RUNS: usize = 10;
/// Default largest result ZIP of a job, in bytes (10 GiB).
pub const DEFAULT_MAX_RESULT: u64 = 10 << 30;
/// Default largest number of files in one upload.
pub const DEFAULT_MAX_FILES: usize = 10_000;

/// Options of `jobrelay server`. A flag wins over its environment variable.
#[derive(clap::Args, Debug, Clone)]
pub struct ServerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: IpAddr,
    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "PORT", default_value_t = 5000)]
    pub port: u16,
    /// Directory for uploaded jobs and stored results.
    #[arg(long, env = "DATA_PATH", default_value = "./data/server")]
    pub data_dir: PathBuf,
    /// The database: a SQLite file (default: <data-dir>/jobrelay.sqlite), or a PostgreSQL
    /// server as `postgres://user[:password]@host[:port]/database` (also read from
    /// DATABASE_URL when neither this flag nor DB_PATH is given).
    #[arg(long, env = "DB_PATH")]
    pub db: Option<String>,
    /// TOML file describing the services and their clients.
    #[arg(long, env = "JOBRELAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Seconds a finished job's files are kept before it becomes Cleaned.
    #[arg(long, env = "MAX_AGE", default_value_t = 864000.0)]
    pub max_age: f64,
    /// Largest accepted upload, in bytes of file content.
    #[arg(long, default_value_t = 400 * 1024 * 1024)]
    pub max_upload: u64,
    /// Dispatch attempts of a job before it is Failed.
    #[arg(long, default_value_t = 3)]
    pub max_attempts: u32,
    /// Seconds between two `/retrieve` polls towards a client without a change feed.
    #[arg(long, default_value_t = 0.5)]
    pub poll_interval: f64,
    /// Seconds a client may stay unreachable before its jobs are queued again.
    #[arg(long, default_value_t = 30.0)]
    pub client_timeout: f64,
    /// With PostgreSQL, several servers may share the database: one leads (schedules,
    /// dispatches, collects) under a lease it renews every third of this many seconds; when
    /// it cannot, a standby takes over after this long. Unused with SQLite.
    #[arg(long, env = "JOBRELAY_LEADER_TIMEOUT", default_value_t = 5.0)]
    pub leader_timeout: f64,
    /// File holding the token sent to every client (`Authorization: Bearer`), the one each
    /// client reads from its --token-file; a service's `token_file` in the TOML wins.
    #[arg(long, env = "JOBRELAY_CLIENT_TOKEN_FILE")]
    pub client_token_file: Option<PathBuf>,
    /// TOML file of users (`[[users]] token = "..." user_id = 7 admin = false`): requests
    /// must then carry a user's token, which decides the user id and what the caller sees.
    /// Without it the `user_id` a caller gives is trusted.
    #[arg(long, env = "JOBRELAY_USERS_FILE")]
    pub users_file: Option<PathBuf>,
    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that `https://` clients' certificates must be signed by; the
    /// system's trusted roots are not used then.
    #[arg(long, env = "JOBRELAY_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
    /// File holding the token a client must give to join a service at run time
    /// (`jobrelay client --connect ... --join-token-file`); a service's `join_token_file` in
    /// the TOML wins. Without either, joining that service is off.
    #[arg(long, env = "JOBRELAY_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<PathBuf>,
}

/// One executor client of a service, with the endpoints the server calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientEndpoint {
    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:9000`.
    pub base: String,
    /// `POST` target of submissions.
    pub submit: String,
    /// `GET {retrieve}/{id}`.
    pub retrieve: String,
    /// `POST {kill}/{id}`.
    pub kill: String,
    /// Token sent to the client as `Authorization: Bearer`; `None`: none is sent.
    pub token: Option<Secret>,
}

impl ClientEndpoint {
    /// A client given by its base URL; endpoints are the protocol's paths below it.
    pub fn from_base(raw: &str) -> anyhow::Result<Self> {
        let base = parse_http_url(raw)?;
        let base = base.as_str().trim_end_matches('/').to_owned();
        Ok(ClientEndpoint {
            submit: format!("{base}/submit"),
            retrieve: format!("{base}/retrieve"),
            kill: format!("{base}/kill"),
            base,
            token: None,
        })
    }

    /// A client given the reference's way: the full upload URL, optionally the download and
    /// terminate URLs.
    pub fn from_reference(
        upload: &str,
        download: Option<&str>,
        terminate: Option<&str>,
    ) -> anyhow::Result<Self> {
        let url = parse_http_url(upload)?;
        let text = url.as_str().trim_end_matches('/');
        let mut endpoint = match text.strip_suffix("/submit") {
            Some(base) => {
                let mut e = ClientEndpoint::from_base(base)?;
                e.submit = text.to_owned();
                e
            }
            None => ClientEndpoint::from_base(text)?,
        };
        if let Some(download) = download {
            endpoint.retrieve = parse_http_url(download)?
                .as_str()
                .trim_end_matches('/')
                .to_owned();
        }
        if let Some(terminate) = terminate {
            endpoint.kill = parse_http_url(terminate)?
                .as_str()
                .trim_end_matches('/')
                .to_owned();
        }
        Ok(endpoint)
    }
}

fn parse_http_url(raw: &str) -> anyhow::Result<url::Url> {
    let url = url::Url::parse(raw.trim()).map_err(|e| anyhow::anyhow!("bad URL {raw:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        anyhow::bail!("bad URL {raw:?}: expected http://host:port");
    }
    if url.query().is_some() || url.fragment().is_some() {
        anyhow::bail!("bad URL {raw:?}: a client URL takes no query or fragment");
    }
    Ok(url)
}

/// A named kind of work and the clients that run it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    pub clients: Vec<ClientEndpoint>,
    pub runs_per_user: usize,
    pub max_runs: usize,
    /// Largest result ZIP stored for a job, in bytes; a larger one fails the job, and is
    /// cut off as it streams in (never stored whole).
    pub max_result: u64,
    /// Most files one upload may hold (an upload with more is refused with 413).
    pub max_files: usize,
    /// Where the notifications of its jobs go when a job gives no `callback_url`.
    pub webhook_url: Option<String>,
    /// Key of the HMAC signature of its notifications; without it, its jobs take no
    /// callback.
    pub webhook_secret: Option<Secret>,
    /// Defaults and maxima of what its jobs may ask for.
    pub resources: ResourceRules,
    /// Whose job goes next: round-robin (default) or fair share by recent usage.
    pub policy: crate::scheduler::Policy,
    /// How long a job whose turn came may wait for room before a client is held for it
    /// (`None`: never).
    pub reserve_after: Option<Duration>,
    /// Jobs of one core (no memory, no GPU asked) its only healthy client may hold beyond its
    /// slots, queued there to start the moment a slot frees (`scheduler::set_send_ahead`);
    /// 0: none.
    pub send_ahead: usize,
    /// Uploads a user may make per hour, with a burst; `None`: no limit.
    pub rate: Option<crate::ratelimit::RateQuota>,
    /// The token a client must give to join this service at run time; `None`: it cannot.
    pub join_token: Option<Secret>,
}

/// Default half-life of fair-share usage: one hour.
pub const DEFAULT_FAIR_SHARE_HALF_LIFE: Duration = Duration::from_secs(3600);
/// Default wait for room after which a client is held for a job: ten minutes.
pub const DEFAULT_RESERVE_AFTER: Duration = Duration::from_secs(600);

/// Most jobs a service's `send_ahead` may queue on its client beyond its slots: a few cover
/// the server's round trip; more would only hold jobs back from a client that joins later.
pub const MAX_SEND_AHEAD: usize = 16;

/// What a service's jobs get when they ask for nothing, and the most they may ask for
/// (`None`: no default, or no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceRules {
    pub default_cores: u32,
    pub max_cores: Option<u32>,
    /// MiB.
    pub default_memory_mb: Option<u64>,
    pub max_memory_mb: Option<u64>,
    pub default_gpus: u32,
    pub max_gpus: Option<u32>,
    /// Seconds.
    pub default_walltime_s: Option<u64>,
    pub max_walltime_s: Option<u64>,
}

impl Default for ResourceRules {
    /// One core, no memory, GPU or walltime asked, no maxima.
    fn default() -> Self {
        ResourceRules {
            default_cores: 1,
            max_cores: None,
            default_memory_mb: None,
            max_memory_mb: None,
            default_gpus: 0,
            max_gpus: None,
            default_walltime_s: None,
            max_walltime_s: None,
        }
    }
}

/// A memory amount or a duration in the TOML file: a number (MiB, seconds) or a text with a
/// unit (`"4G"`, `"2h"`).
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
enum Amount {
    Number(u64),
    Text(String),
}

impl Amount {
    fn read(
        value: &Option<Amount>,
        parse: fn(&str) -> Result<u64, String>,
    ) -> Result<Option<u64>, String> {
        match value {
            None => Ok(None),
            Some(Amount::Number(n)) => Ok(Some(*n)),
            Some(Amount::Text(text)) => parse(text).map(Some),
        }
    }
}

impl ServiceConfig {
    /// A service of these clients with the default limits.
    pub fn new(clients: Vec<ClientEndpoint>) -> Self {
        ServiceConfig {
            clients,
            runs_per_user: DEFAULT_RUNS_PER_USER,
            max_runs: DEFAULT_MAX_RUNS,
            max_result: DEFAULT_MAX_RESULT,
            max_files: DEFAULT_MAX_FILES,
            webhook_url: None,
            webhook_secret: None,
            resources: ResourceRules::default(),
            policy: crate::scheduler::Policy::RoundRobin,
            reserve_after: Some(DEFAULT_RESERVE_AFTER),
            send_ahead: 0,
            rate: None,
            join_token: None,
        }
    }
}

/// Everything the server needs to run, checked.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub db: Database,
    pub services: BTreeMap<String, ServiceConfig>,
    pub max_age: Duration,
    pub max_upload: u64,
    pub max_attempts: u32,
    pub poll_interval: Duration,
    pub client_timeout: Duration,
    /// How long a leader's lease lasts unrenewed (PostgreSQL only).
    pub leader_timeout: Duration,
    /// Users and their tokens; `None`: the caller's `user_id` is trusted.
    pub users: Option<Arc<Users>>,
    /// Serve HTTPS with these files; `None`: plain HTTP.
    pub tls: Option<TlsFiles>,
    /// CA file that `https://` clients' certificates are verified against (only these CAs);
    /// `None`: the system's roots.
    pub client_ca: Option<PathBuf>,
    /// Completion webhooks, server-wide (see [`crate::webhooks`]).
    pub webhooks: WebhookConfig,
}

/// Where the server keeps its jobs.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    /// The embedded default: one SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL server, by its `postgres://` URL (checked when the store connects).
    Postgres(String),
}

/// A URL may hold a password: `Debug` (of a whole `ServerConfig`, say) never shows it.
impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite(path) => f.debug_tuple("Sqlite").field(path).finish(),
            Database::Postgres(_) => f.write_str("Postgres(..)"),
        }
    }
}

impl Database {
    /// `--db`, else `DATABASE_URL`, else the SQLite file in the data directory. A value of
    /// `--db` that starts with `postgres://` or `postgresql://` is a PostgreSQL URL, any other
    /// a SQLite file; `DATABASE_URL` must be a PostgreSQL URL (the variable's usual meaning).
    pub fn from_args(
        db: Option<&str>,
        database_url: Option<&str>,
        data_dir: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let is_postgres =
            |value: &str| value.starts_with("postgres://") || value.starts_with("postgresql://");
        Ok(match (db, database_url) {
            (Some(value), _) if is_postgres(value) => Database::Postgres(value.to_owned()),
            (Some(path), _) => Database::Sqlite(PathBuf::from(path)),
            (None, Some(url)) if is_postgres(url) => Database::Postgres(url.to_owned()),
            (None, Some(_)) => anyhow::bail!(
                "DATABASE_URL must be a postgres:// URL (a SQLite file is given with --db or DB_PATH)"
            ),
            (None, None) => Database::Sqlite(data_dir.join("jobrelay.sqlite")),
        })
    }
}

/// Default time a notification is retried before it is given up: 24 h.
pub const DEFAULT_WEBHOOK_RETRY: Duration = Duration::from_secs(24 * 3600);

/// The `[webhooks]` table of the TOML file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// Hosts callbacks may go to (`hooks.example.org`, `*.example.org`, `10.0.0.5`); empty:
    /// no callbacks at all, so a user cannot make the server call an internal address.
    pub allowed_hosts: Vec<String>,
    /// How long a notification is retried before it is given up.
    pub retry_period: Duration,
    /// Host names may resolve to loopback or private addresses (by default a delivery to such
    /// a name is refused; addresses written in `allowed_hosts` are always allowed).
    pub allow_private_addresses: bool,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            allowed_hosts: Vec::new(),
            retry_period: DEFAULT_WEBHOOK_RETRY,
            allow_private_addresses: false,
        }
    }
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct TomlWebhooks {
    #[serde(default)]
    allowed_hosts: Vec<String>,
    /// Seconds.
    retry_period: Option<f64>,
    #[serde(default)]
    allow_private_addresses: bool,
}

/// The `[webhooks]` table of the TOML text (the defaults without one).
pub fn webhooks_from(toml_text: Option<&str>) -> anyhow::Result<WebhookConfig> {
    let file: TomlFile = match toml_text {
        Some(text) => {
            toml::from_str(text).map_err(|e| anyhow::anyhow!("bad configuration file: {e}"))?
        }
        None => TomlFile::default(),
    };
    let table = file.webhooks.unwrap_or_default();
    let retry_period = match table.retry_period {
        Some(secs) => Duration::try_from_secs_f64(secs)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                anyhow::anyhow!("[webhooks] retry_period must be a positive number of seconds")
            })?,
        None => DEFAULT_WEBHOOK_RETRY,
    };
    Ok(WebhookConfig {
        allowed_hosts: table.allowed_hosts,
        retry_period,
        allow_private_addresses: table.allow_private_addresses,
    })
}

impl ServerConfig {
    /// A configuration with the defaults of `jobrelay server` and the given services.
    pub fn new(data_dir: PathBuf, services: BTreeMap<String, ServiceConfig>) -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            db: Database::Sqlite(data_dir.join("jobrelay.sqlite")),
            data_dir,
            services,
            max_age: Duration::from_secs(864000),
            max_upload: 400 * 1024 * 1024,
            max_attempts: 3,
            poll_interval: Duration::from_millis(500),
            client_timeout: Duration::from_secs(30),
            leader_timeout: Duration::from_secs(5),
            users: None,
            tls: None,
            client_ca: None,
            webhooks: WebhookConfig::default(),
        }
    }
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct TomlFile {
    #[serde(default)]
    services: BTreeMap<String, TomlService>,
    webhooks: Option<TomlWebhooks>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct TomlService {
    #[serde(default)]
    clients: Vec<String>,
    runs_per_user: Option<usize>,
    max_runs: Option<usize>,
    max_result: Option<u64>,
    max_files: Option<usize>,
    /// File holding the token of this service's clients.
    token_file: Option<PathBuf>,
    /// File holding the token a client gives to join this service at run time.
    join_token_file: Option<PathBuf>,
    webhook_url: Option<String>,
    webhook_secret: Option<String>,
    webhook_secret_file: Option<PathBuf>,
    default_cores: Option<u32>,
    max_cores: Option<u32>,
    default_memory: Option<Amount>,
    max_memory: Option<Amount>,
    default_gpus: Option<u32>,
    max_gpus: Option<u32>,
    default_walltime: Option<Amount>,
    max_walltime: Option<Amount>,
    /// `round_robin` (default) or `fair_share`.
    policy: Option<String>,
    fair_share_half_life: Option<Amount>,
    /// A duration; 0 never holds a client.
    reserve_after: Option<Amount>,
    /// Jobs sent ahead to a lone client beyond its slots (0 to MAX_SEND_AHEAD).
    send_ahead: Option<usize>,
    max_jobs_per_user_per_hour: Option<u32>,
    burst: Option<u32>,
}

impl TomlService {
    fn policy(&self) -> Result<crate::scheduler::Policy, String> {
        use jobrelay_common::resources::parse_seconds;
        let half_life = Amount::read(&self.fair_share_half_life, parse_seconds)?;
        match self.policy.as_deref() {
            None | Some("round_robin") => {
                if half_life.is_some() {
                    return Err("fair_share_half_life needs policy = \"fair_share\"".into());
                }
                Ok(crate::scheduler::Policy::RoundRobin)
            }
            Some("fair_share") => {
                let half_life_s = half_life.unwrap_or(DEFAULT_FAIR_SHARE_HALF_LIFE.as_secs());
                if half_life_s == 0 {
                    return Err("fair_share_half_life must be above 0".into());
                }
                Ok(crate::scheduler::Policy::FairShare { half_life_s })
            }
            Some(other) => Err(format!(
                "policy must be \"round_robin\" or \"fair_share\", not {other:?}"
            )),
        }
    }

    fn reserve_after(&self) -> Result<Option<Duration>, String> {
        use jobrelay_common::resources::parse_seconds;
        Ok(match Amount::read(&self.reserve_after, parse_seconds)? {
            None => Some(DEFAULT_RESERVE_AFTER),
            Some(0) => None,
            Some(secs) => Some(Duration::from_secs(secs)),
        })
    }

    fn rate(&self) -> Result<Option<crate::ratelimit::RateQuota>, String> {
        match (self.max_jobs_per_user_per_hour, self.burst) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err("burst needs max_jobs_per_user_per_hour".into()),
            (Some(0), _) => Err("max_jobs_per_user_per_hour must be at least 1".into()),
            (Some(_), Some(0)) => Err("burst must be at least 1".into()),
            (Some(per_hour), burst) => Ok(Some(crate::ratelimit::RateQuota {
                per_hour,
                burst: burst.unwrap_or(per_hour),
            })),
        }
    }

    fn resource_rules(&self) -> Result<ResourceRules, String> {
        use jobrelay_common::resources::{parse_memory_mb, parse_seconds};
        let rules = ResourceRules {
            default_cores: self.default_cores.unwrap_or(1),
            max_cores: self.max_cores,
            default_memory_mb: Amount::read(&self.default_memory, parse_memory_mb)?,
            max_memory_mb: Amount::read(&self.max_memory, parse_memory_mb)?,
            default_gpus: self.default_gpus.unwrap_or(0),
            max_gpus: self.max_gpus,
            default_walltime_s: Amount::read(&self.default_walltime, parse_seconds)?,
            max_walltime_s: Amount::read(&self.max_walltime, parse_seconds)?,
        };
        if rules.default_cores == 0 {
            return Err("default_cores must be at least 1".into());
        }
        let over = |default: Option<u64>, max: Option<u64>| matches!((default, max), (Some(d), Some(m)) if d > m);
        if over(
            Some(rules.default_cores.into()),
            rules.max_cores.map(u64::from),
        ) || over(rules.default_memory_mb, rules.max_memory_mb)
            || over(
                Some(rules.default_gpus.into()),
                rules.max_gpus.map(u64::from),
            )
            || over(rules.default_walltime_s, rules.max_walltime_s)
        {
            return Err("a default is above its maximum".into());
        }
        Ok(rules)
    }
}

#[derive(Default)]
struct EnvService {
    upload: Option<String>,
    download: Option<String>,
    terminate: Option<String>,
    runs_per_user: Option<String>,
    max_runs: Option<String>,
    max_result: Option<String>,
    max_files: Option<String>,
}

/// Builds the services from the TOML text (if any) and the environment variables given.
pub fn services_from(
    toml_text: Option<&str>,
    env: impl IntoIterator<Item = (String, String)>,
) -> anyhow::Result<BTreeMap<String, ServiceConfig>> {
    services_joinable(toml_text, env, None)
}

/// [`services_from`], with the server-wide join token (`--join-token-file`) for the services
/// that have none of their own: such a service may have no configured client.
pub fn services_joinable(
    toml_text: Option<&str>,
    env: impl IntoIterator<Item = (String, String)>,
    join_token: Option<&Secret>,
) -> anyhow::Result<BTreeMap<String, ServiceConfig>> {
    let file: TomlFile = match toml_text {
        Some(text) => {
            toml::from_str(text).map_err(|e| anyhow::anyhow!("bad configuration file: {e}"))?
        }
        None => TomlFile::default(),
    };
    let mut services = BTreeMap::new();
    for (name, service) in file.services {
        check_name(&name)?;
        let token = service
            .token_file
            .as_deref()
            .map(Secret::read_file)
            .transpose()
            .map_err(|e| anyhow::anyhow!("service {name:?}: {e}"))?;
        let clients = service
            .clients
            .iter()
            .map(|c| {
                ClientEndpoint::from_base(c).map(|mut e| {
                    e.token = token.clone();
                    e
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .map_err(|e| anyhow::anyhow!("service {name:?}: {e}"))?;
        let webhook_secret = match (&service.webhook_secret, &service.webhook_secret_file) {
            (Some(_), Some(_)) => anyhow::bail!(
                "service {name:?}: give webhook_secret or webhook_secret_file, not both"
            ),
            (Some(text), None) => Some(Secret::new(text.clone())),
            (None, Some(path)) => Some(Secret::read_file(path)),
            (None, None) => None,
        }
        .transpose()
        .map_err(|e| anyhow::anyhow!("service {name:?}: webhook secret: {e}"))?;
        let resources = service
            .resource_rules()
            .map_err(|e| anyhow::anyhow!("service {name:?}: {e}"))?;
        let policy = service
            .policy()
            .map_err(|e| anyhow::anyhow!("service {name:?}: {e}"))?;
        let reserve_after = service
            .reserve_after()
            .map_err(|e| anyhow::anyhow!("service {name:?}: {e}"))?;
        let rate = service
            .rate()
            .map_err(|e| anyhow::anyhow!("service {name:?}: {e}"))?;
        let send_ahead = service.send_ahead.unwrap_or(0);
        if send_ahead > MAX_SEND_AHEAD {
            anyhow::bail!(
                "service {name:?}: send_ahead is at most {MAX_SEND_AHEAD} (jobs queued on a \
                 client beyond its slots), not {send_ahead}"
            );
        }
        let own_join_token = service
            .join_token_file
            .as_deref()
            .map(Secret::read_file)
            .transpose()
            .map_err(|e| anyhow::anyhow!("service {name:?}: join token: {e}"))?;
        services.insert(
            name,
            ServiceConfig {
                clients,
                runs_per_user: service.runs_per_user.unwrap_or(DEFAULT_RUNS_PER_USER),
                max_runs: service.max_runs.unwrap_or(DEFAULT_MAX_RUNS),
                max_result: service.max_result.unwrap_or(DEFAULT_MAX_RESULT),
                max_files: service.max_files.unwrap_or(DEFAULT_MAX_FILES),
                webhook_url: service.webhook_url,
                webhook_secret,
                resources,
                policy,
                reserve_after,
                send_ahead,
                rate,
                join_token: own_join_token,
            },
        );
    }

    let mut from_env: BTreeMap<String, EnvService> = BTreeMap::new();
    for (key, value) in env {
        let Some(rest) = key.strip_prefix("SERVICE_") else {
            continue;
        };
        let suffixes = [
            "_UPLOAD_URL",
            "_DOWNLOAD_URL",
            "_TERMINATE_URL",
            "_RUNS_PER_USER",
            "_MAX_RUNS",
            "_MAX_RESULT",
            "_MAX_FILES",
        ];
        let Some((suffix, name)) = suffixes
            .iter()
            .find_map(|s| rest.strip_suffix(s).map(|name| (*s, name)))
        else {
            continue;
        };
        if name.is_empty() {
            continue;
        }
        let entry = from_env.entry(name.to_lowercase()).or_default();
        let slot = match suffix {
            "_UPLOAD_URL" => &mut entry.upload,
            "_DOWNLOAD_URL" => &mut entry.download,
            "_TERMINATE_URL" => &mut entry.terminate,
            "_RUNS_PER_USER" => &mut entry.runs_per_user,
            "_MAX_RESULT" => &mut entry.max_result,
            "_MAX_FILES" => &mut entry.max_files,
            _ => &mut entry.max_runs,
        };
        *slot = Some(value);
    }
    for (name, env) in from_env {
        check_name(&name)?;
        let number = |what: &str, value: &Option<String>| -> anyhow::Result<Option<usize>> {
            value
                .as_deref()
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| {
                        anyhow::anyhow!(
                            "SERVICE_{}_{what} must be a non-negative integer, not {v:?}",
                            name.to_uppercase()
                        )
                    })
                })
                .transpose()
        };
        let runs_per_user = number("RUNS_PER_USER", &env.runs_per_user)?;
        let max_runs = number("MAX_RUNS", &env.max_runs)?;
        let max_result = number("MAX_RESULT", &env.max_result)?;
        let max_files = number("MAX_FILES", &env.max_files)?;
        let service = services
            .entry(name.clone())
            .or_insert_with(|| ServiceConfig::new(Vec::new()));
        match &env.upload {
            Some(upload) => {
                let mut endpoint = ClientEndpoint::from_reference(
                    upload,
                    env.download.as_deref(),
                    env.terminate.as_deref(),
                )
                .map_err(|e| anyhow::anyhow!("SERVICE_{}_*: {e}", name.to_uppercase()))?;
                // The same client in the TOML file, with its service's token.
                endpoint.token = service
                    .clients
                    .iter()
                    .find(|c| c.base == endpoint.base)
                    .and_then(|c| c.token.clone());
                if !service.clients.contains(&endpoint) {
                    service.clients.push(endpoint);
                }
            }
            None if env.download.is_some() || env.terminate.is_some() => anyhow::bail!(
                "SERVICE_{}_DOWNLOAD_URL/_TERMINATE_URL given without SERVICE_{}_UPLOAD_URL",
                name.to_uppercase(),
                name.to_uppercase()
            ),
            None => {}
        }
        if let Some(n) = runs_per_user {
            service.runs_per_user = n;
        }
        if let Some(n) = max_runs {
            service.max_runs = n;
        }
        if let Some(n) = max_result {
            service.max_result = n as u64;
        }
        if let Some(n) = max_files {
            service.max_files = n;
        }
    }

    for service in services.values_mut() {
        if service.join_token.is_none() {
            service.join_token = join_token.cloned();
        }
    }
    for (name, service) in &services {
        if service.clients.is_empty() && service.join_token.is_none() {
            anyhow::bail!(
                "service {name:?} has no clients (list some, or let clients join it with a join token)"
            );
        }
        if service.runs_per_user == 0 || service.max_runs == 0 {
            anyhow::bail!("service {name:?}: runs_per_user and max_runs must be at least 1");
        }
        if service.max_result == 0 || service.max_files == 0 {
            anyhow::bail!("service {name:?}: max_result and max_files must be at least 1");
        }
        // One client serving a service twice would be counted twice.
        for (i, client) in service.clients.iter().enumerate() {
            if service.clients[..i].iter().any(|c| c.base == client.base) {
                anyhow::bail!("service {name:?} lists client {} twice", client.base);
            }
        }
    }
    Ok(services)
}

fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !ok {
        anyhow::bail!("bad service name {name:?}: use letters, digits, '_' and '-'");
    }
    Ok(())
}

fn seconds(name: &str, value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| anyhow::anyhow!("--{name} must be a non-negative number of seconds"))
}

impl ServerArgs {
    /// Reads the TOML file and the process environment, and checks everything.
    pub fn into_config(self) -> anyhow::Result<ServerConfig> {
        let text = match &self.config {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("cannot read configuration {}: {e}", path.display())
            })?),
            None => None,
        };
        let join_token = self
            .join_token_file
            .as_deref()
            .map(Secret::read_file)
            .transpose()
            .map_err(|e| anyhow::anyhow!("--join-token-file: {e}"))?;
        let mut services =
            services_joinable(text.as_deref(), std::env::vars(), join_token.as_ref())?;
        if let Some(path) = &self.client_token_file {
            let token = Secret::read_file(path).map_err(anyhow::Error::msg)?;
            for client in services.values_mut().flat_map(|s| s.clients.iter_mut()) {
                client.token.get_or_insert_with(|| token.clone());
            }
        }
        let users = self
            .users_file
            .as_deref()
            .map(Users::read)
            .transpose()?
            .map(Arc::new);
        if services.is_empty() {
            anyhow::bail!(
                "no service configured: give --config with [services.NAME] or SERVICE_<NAME>_UPLOAD_URL"
            );
        }
        if self.max_attempts == 0 {
            anyhow::bail!("--max-attempts must be at least 1");
        }
        std::fs::create_dir_all(&self.data_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot create data directory {}: {e}",
                self.data_dir.display()
            )
        })?;
        let data_dir = std::fs::canonicalize(&self.data_dir)?;
        let database_url = std::env::var("DATABASE_URL")
            .ok()
            .filter(|url| !url.is_empty());
        let db = Database::from_args(self.db.as_deref(), database_url.as_deref(), &data_dir)?;
        Ok(ServerConfig {
            listen: SocketAddr::new(self.bind, self.port),
            data_dir,
            db,
            services,
            max_age: seconds("max-age", self.max_age)?,
            max_upload: self.max_upload,
            max_attempts: self.max_attempts,
            poll_interval: seconds("poll-interval", self.poll_interval)?
                .max(Duration::from_millis(10)),
            client_timeout: seconds("client-timeout", self.client_timeout)?,
            leader_timeout: leader_timeout(self.leader_timeout)?,
            users,
            tls: TlsFiles::from_args(self.tls_cert, self.tls_key).map_err(anyhow::Error::msg)?,
            client_ca: self.client_ca,
            webhooks: webhooks_from(text.as_deref())?,
        })
    }
}

/// `--leader-timeout`: at least 0.3 s (a renewal every 0.1 s), at most an hour.
fn leader_timeout(secs: f64) -> anyhow::Result<Duration> {
    if !(0.3..=3600.0).contains(&secs) {
        anyhow::bail!("--leader-timeout must be between 0.3 and 3600 seconds, not {secs}");
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn toml_services_with_defaults() {
        let services = services_from(
            Some(
                r#"
                [services.example]
                clients = ["http://127.0.0.1:9000", "http://127.0.0.1:9001/"]
                [services.nmr]
                clients = ["http://10.0.0.1:9000"]
                runs_per_user = 2
                max_runs = 3
                max_result = 1048576
                max_files = 20
                "#,
            ),
            env(&[]),
        )
        .unwrap();
        let example = &services["example"];
        assert_eq!(example.runs_per_user, 5);
        assert_eq!(example.max_runs, 10);
        assert_eq!(example.max_result, 10 << 30);
        assert_eq!(example.max_files, 10_000);
        assert_eq!(example.clients[1].base, "http://127.0.0.1:9001");
        assert_eq!(example.clients[1].submit, "http://127.0.0.1:9001/submit");
        assert_eq!(example.clients[1].kill, "http://127.0.0.1:9001/kill");
        assert_eq!(services["nmr"].runs_per_user, 2);
        assert_eq!(services["nmr"].max_runs, 3);
        assert_eq!(services["nmr"].max_result, 1 << 20);
        assert_eq!(services["nmr"].max_files, 20);
    }

    #[test]
    fn the_example_service_file_in_deploy_reads() {
        let services =
            services_from(Some(include_str!("../../../deploy/server.toml")), env(&[])).unwrap();
        assert_eq!(services["docking"].max_runs, 16);
        assert_eq!(services["docking"].send_ahead, 0);
        assert_eq!(services["nmr"].send_ahead, 2);
    }

    #[test]
    fn scheduling_policy_and_rate_quota_keys() {
        use crate::scheduler::Policy;
        let services = services_from(
            Some(
                r#"
                [services.plain]
                clients = ["http://127.0.0.1:9000"]
                [services.fair]
                clients = ["http://127.0.0.1:9000"]
                policy = "fair_share"
                fair_share_half_life = "2h"
                reserve_after = "90s"
                send_ahead = 2
                max_jobs_per_user_per_hour = 30
                burst = 5
                [services.fair_defaults]
                clients = ["http://127.0.0.1:9000"]
                policy = "fair_share"
                reserve_after = 0
                max_jobs_per_user_per_hour = 12
                "#,
            ),
            env(&[]),
        )
        .unwrap();
        let plain = &services["plain"];
        assert_eq!(plain.policy, Policy::RoundRobin);
        assert_eq!(plain.reserve_after, Some(DEFAULT_RESERVE_AFTER));
        assert_eq!(plain.rate, None);
        let fair = &services["fair"];
        assert_eq!(fair.policy, Policy::FairShare { half_life_s: 7200 });
        assert_eq!(fair.reserve_after, Some(Duration::from_secs(90)));
        assert_eq!(
            fair.rate,
            Some(crate::ratelimit::RateQuota {
                per_hour: 30,
                burst: 5
            })
        );
        assert_eq!(plain.send_ahead, 0, "nothing sent ahead unless asked");
        assert_eq!(fair.send_ahead, 2);
        let defaults = &services["fair_defaults"];
        assert_eq!(defaults.policy, Policy::FairShare { half_life_s: 3600 });
        assert_eq!(defaults.reserve_after, None, "0 never holds a client");
        assert_eq!(
            defaults.rate.unwrap().burst,
            12,
            "the burst defaults to the rate"
        );
        for (bad, says) in [
            ("policy = \"lottery\"", "policy must be"),
            ("fair_share_half_life = \"1h\"", "needs policy"),
            (
                "policy = \"fair_share\"\nfair_share_half_life = 0",
                "above 0",
            ),
            ("burst = 3", "burst needs"),
            ("max_jobs_per_user_per_hour = 0", "at least 1"),
            ("reserve_after = \"soon\"", "service \"x\""),
            ("send_ahead = 100", "send_ahead is at most 16"),
            ("send_ahead = -1", "send_ahead"),
        ] {
            let text = format!("[services.x]\nclients = [\"http://h:1\"]\n{bad}\n");
            let e = services_from(Some(&text), env(&[]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn reference_environment_variables() {
        let services = services_from(
            None,
            env(&[
                ("SERVICE_DOCKING_UPLOAD_URL", "http://host:9000/submit"),
                ("SERVICE_DOCKING_DOWNLOAD_URL", "http://host:9000/retrieve"),
                ("SERVICE_DOCKING_TERMINATE_URL", "http://host:9000/kill"),
                ("SERVICE_DOCKING_RUNS_PER_USER", "3"),
                ("SERVICE_DOCKING_MAX_RUNS", "7"),
                ("SERVICE_DOCKING_MAX_RESULT", "5000"),
                ("SERVICE_DOCKING_MAX_FILES", "9"),
                ("SERVICE_MY_NMR_UPLOAD_URL", "http://other:9100/submit"),
                ("PATH", "/usr/bin"),
            ]),
        )
        .unwrap();
        let docking = &services["docking"];
        assert_eq!(docking.runs_per_user, 3);
        assert_eq!(docking.max_runs, 7);
        assert_eq!((docking.max_result, docking.max_files), (5000, 9));
        assert_eq!(
            docking.clients,
            vec![ClientEndpoint {
                base: "http://host:9000".into(),
                submit: "http://host:9000/submit".into(),
                retrieve: "http://host:9000/retrieve".into(),
                kill: "http://host:9000/kill".into(),
                token: None,
            }]
        );
        let nmr = &services["my_nmr"];
        assert_eq!(nmr.clients[0].base, "http://other:9100");
        assert_eq!(nmr.runs_per_user, DEFAULT_RUNS_PER_USER);
    }

    #[test]
    fn environment_adds_to_and_overrides_the_file() {
        let services = services_from(
            Some("[services.example]\nclients = [\"http://a:1\"]\n"),
            env(&[
                ("SERVICE_EXAMPLE_UPLOAD_URL", "http://b:2/submit"),
                ("SERVICE_EXAMPLE_MAX_RUNS", "4"),
            ]),
        )
        .unwrap();
        assert_eq!(services["example"].clients.len(), 2);
        assert_eq!(services["example"].max_runs, 4);
    }

    #[test]
    fn webhook_settings_from_the_file() {
        let text = "[webhooks]\nallowed_hosts = [\"hooks.test\"]\nretry_period = 60\n\n\
                    [services.x]\nclients = [\"http://a:1\"]\n\
                    webhook_url = \"https://hooks.test/x\"\nwebhook_secret = \"s3cret\"\n";
        let webhooks = webhooks_from(Some(text)).unwrap();
        assert_eq!(webhooks.allowed_hosts, ["hooks.test"]);
        assert_eq!(webhooks.retry_period, Duration::from_secs(60));
        let x = &services_from(Some(text), env(&[])).unwrap()["x"];
        assert_eq!(x.webhook_url.as_deref(), Some("https://hooks.test/x"));
        assert_eq!(
            x.webhook_secret.as_ref().map(|s| s.expose()),
            Some("s3cret")
        );
        assert_eq!(webhooks_from(None).unwrap(), WebhookConfig::default());
        assert_eq!(WebhookConfig::default().retry_period, DEFAULT_WEBHOOK_RETRY);

        let both = "[services.x]\nclients = [\"http://a:1\"]\nwebhook_secret = \"s\"\n\
                    webhook_secret_file = \"/nonexistent\"\n";
        let why = services_from(Some(both), env(&[])).unwrap_err().to_string();
        assert!(why.contains("not both"), "{why}");
        let zero = "[webhooks]\nretry_period = 0\n";
        assert!(webhooks_from(Some(zero)).is_err());
    }

    #[test]
    fn a_service_sets_defaults_and_maxima_of_what_its_jobs_ask_for() {
        let text = "[services.docking]\nclients = [\"http://a:1\"]\ndefault_cores = 2\n\
                    max_cores = 16\ndefault_memory = \"2G\"\nmax_memory = 65536\nmax_gpus = 2\n\
                    default_walltime = \"1h\"\nmax_walltime = 86400\n";
        let services = services_from(Some(text), Vec::new()).unwrap();
        assert_eq!(
            services["docking"].resources,
            ResourceRules {
                default_cores: 2,
                max_cores: Some(16),
                default_memory_mb: Some(2048),
                max_memory_mb: Some(65536),
                default_gpus: 0,
                max_gpus: Some(2),
                default_walltime_s: Some(3600),
                max_walltime_s: Some(86400),
            }
        );
        let over = "[services.x]\nclients = [\"http://a:1\"]\ndefault_cores = 4\nmax_cores = 2\n";
        let e = services_from(Some(over), Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("above its maximum"), "{e}");
        let bad = "[services.x]\nclients = [\"http://a:1\"]\nmax_memory = \"lots\"\n";
        let e = services_from(Some(bad), Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("memory must be"), "{e}");
    }

    #[test]
    fn bad_configurations_name_the_problem() {
        type Case<'a> = (Option<&'a str>, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            (
                Some("[services.x]\nclients = [\"http://a:1\"]\nmax_run = 3\n"),
                &[],
                "max_run",
            ),
            (Some("[service.x]\n"), &[], "service"),
            (
                Some("[services.x]\nclients = [\"not a url\"]\n"),
                &[],
                "not a url",
            ),
            (
                Some("[services.x]\nclients = [\"ftp://a:1\"]\n"),
                &[],
                "ftp://a:1",
            ),
            (Some("[services.x]\nclients = []\n"), &[], "has no clients"),
            (
                Some("[services.x]\nclients = [\"http://a:1\"]\nruns_per_user = 0\n"),
                &[],
                "at least 1",
            ),
            (None, &[("SERVICE_Y_MAX_RUNS", "3")], "\"y\" has no clients"),
            (
                None,
                &[
                    ("SERVICE_Y_UPLOAD_URL", "http://a:1/submit"),
                    ("SERVICE_Y_RUNS_PER_USER", "many"),
                ],
                "SERVICE_Y_RUNS_PER_USER",
            ),
            (
                None,
                &[
                    ("SERVICE_Y_UPLOAD_URL", "http://a:1/submit"),
                    ("SERVICE_Y_MAX_RESULT", "10G"),
                ],
                "SERVICE_Y_MAX_RESULT",
            ),
            (
                Some("[services.x]\nclients = [\"http://a:1\"]\nmax_files = 0\n"),
                &[],
                "at least 1",
            ),
            (
                None,
                &[("SERVICE_Z_UPLOAD_URL", "http//oops")],
                "http//oops",
            ),
        ];
        for (text, vars, needle) in cases {
            let error = services_from(*text, env(vars)).unwrap_err().to_string();
            assert!(
                error.contains(needle),
                "error {error:?} should mention {needle:?}"
            );
        }
    }

    #[test]
    fn the_database_comes_from_the_flag_then_database_url_then_the_data_directory() {
        let dir = std::path::Path::new("/data");
        let pg = "postgres://jr@db:5432/jobs";
        let from = |db, url| Database::from_args(db, url, dir).unwrap();
        assert_eq!(
            from(None, None),
            Database::Sqlite(dir.join("jobrelay.sqlite"))
        );
        assert_eq!(from(Some(pg), None), Database::Postgres(pg.into()));
        assert_eq!(
            from(Some("postgresql://h/d"), None),
            Database::Postgres("postgresql://h/d".into())
        );
        assert_eq!(
            from(Some("/srv/jobs.sqlite"), Some(pg)),
            Database::Sqlite("/srv/jobs.sqlite".into())
        );
        assert_eq!(from(None, Some(pg)), Database::Postgres(pg.into()));
        let why = Database::from_args(None, Some("/srv/jobs.sqlite"), dir)
            .unwrap_err()
            .to_string();
        assert!(
            why.contains("DATABASE_URL must be a postgres:// URL"),
            "{why}"
        );
    }
}
