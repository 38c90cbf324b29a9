//! `jobrelay up`: a server and one local client with a service `example`, in one process,
//! for a first run and for development. State lives under one data directory, so a later
//! `up` on the same directory continues where the last one stopped.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use jobrelay_client::{ClientConfig, ExecutorConfig};
use jobrelay_common::auth::Secret;
use jobrelay_server::{ClientEndpoint, ServerConfig, ServiceConfig};

/// The service `up` configures.
pub const SERVICE: &str = "example";
const EXAMPLE_SCRIPT: &str = include_str!("../../../examples/residues/run.sh");
const EXAMPLE_PDB: &str = include_str!("../../../examples/residues/peptides.pdb");
/// Remembers the local client's port, so that jobs recorded on it are found after a restart.
const CLIENT_PORT_FILE: &str = "client.port";

#[derive(clap::Args, Debug, Clone)]
pub struct UpArgs {
    /// Port of the server's API (0 picks a free one).
    #[arg(long, env = "PORT", default_value_t = 5000)]
    pub port: u16,
    /// Address the server's API listens on; 0.0.0.0 in a container, where the published port
    /// decides who reaches it. The local client always listens on 127.0.0.1.
    #[arg(long, env = "JOBRELAY_UP_HOST", default_value_t = Ipv4Addr::LOCALHOST)]
    pub host: Ipv4Addr,
    /// Directory for everything: SQLite database, jobs, results, the client's work directories.
    #[arg(long, default_value = "./jobrelay-data")]
    pub data_dir: PathBuf,
    /// Jobs the local client runs at once (default: the number of CPUs).
    #[arg(long)]
    pub slots: Option<usize>,
    /// Port of the local client (default: the one it had last time, else a free one).
    #[arg(long)]
    pub client_port: Option<u16>,
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Writes the bundled example job where the printed commands can find it.
fn write_example_job(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let dir = data_dir.join("example-job");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("run.sh"), EXAMPLE_SCRIPT)?;
    std::fs::write(dir.join("peptides.pdb"), EXAMPLE_PDB)?;
    Ok(dir)
}

async fn start_client(
    data_dir: &Path,
    slots: usize,
    port: Option<u16>,
    token: &Secret,
) -> anyhow::Result<jobrelay_client::RunningClient> {
    let port_file = data_dir.join(CLIENT_PORT_FILE);
    let remembered = std::fs::read_to_string(&port_file)
        .ok()
        .and_then(|p| p.trim().parse::<u16>().ok());
    let config = |port: u16| ClientConfig {
        listen: Some(loopback(port)),
        data_dir: data_dir.join("client"),
        slots,
        // As many cores as slots (a job asking for nothing takes one), the memory as
        // detected, no GPUs: `up` is the one-machine quick start.
        capacity: jobrelay_common::resources::Capacity {
            cores: u32::try_from(slots).unwrap_or(u32::MAX),
            memory_mb: jobrelay_client::allot::detected_memory_mb(),
            gpus: 0,
        },
        gpu_ids: Vec::new(),
        max_upload: 1 << 30,
        kill_grace: Duration::from_secs(10),
        max_runtime: None,
        max_age: Duration::from_secs(864000),
        executor: ExecutorConfig::Local,
        token: Some(token.clone()),
        confinement: Default::default(),
        tls: None,
        pull: None,
    };
    std::fs::create_dir_all(data_dir.join("client"))?;
    let client = match (port, remembered) {
        (Some(port), _) => jobrelay_client::start(config(port)).await?,
        (None, Some(port)) => match jobrelay_client::start(config(port)).await {
            Ok(client) => client,
            Err(e) => {
                tracing::warn!(port, error = %e, "the local client's previous port is taken; using another");
                jobrelay_client::start(config(0)).await?
            }
        },
        (None, None) => jobrelay_client::start(config(0)).await?,
    };
    jobrelay_common::fsutil::write_atomic(
        &port_file,
        client
            .addr
            .expect("up's client listens")
            .port()
            .to_string()
            .as_bytes(),
    )?;
    Ok(client)
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    let slots = match args.slots {
        Some(0) => anyhow::bail!("--slots must be at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let example = write_example_job(&data_dir)?;

    // A fresh secret between the server and its local client, at every start.
    let token = Secret::generate()?;
    let client = start_client(&data_dir, slots, args.client_port, &token).await?;
    let client_url = format!("http://{}", client.addr.expect("up's client listens"));
    let mut endpoint = ClientEndpoint::from_base(&client_url)?;
    endpoint.token = Some(token);
    let mut services = BTreeMap::new();
    services.insert(SERVICE.to_owned(), ServiceConfig::new(vec![endpoint]));
    let mut config = ServerConfig::new(data_dir.join("server"), services);
    config.listen = SocketAddr::from((args.host, args.port));
    let db = jobrelay_server::describe(&config.db);
    let server = match jobrelay_server::start(config).await {
        Ok(server) => server,
        Err(e) => {
            client.shutdown();
            return Err(e);
        }
    };
    let api = format!("http://{}", server.addr);
    println!("jobrelay up: listening on {api}");
    println!(
        "\n  API       {api}\n  OpenAPI   {api}/docs  (spec: {api}/openapi.json)\n  client    {client_url}  (service \"{SERVICE}\", {slots} slots)\n  data      {}\n  database  {}\n",
        data_dir.display(),
        db
    );
    println!("Try the bundled example job (counts residues per chain in a PDB file):\n");
    println!(
        "  curl -F file=@{ex}/run.sh -F file=@{ex}/peptides.pdb -F user_id=1 -F service={SERVICE} {api}/upload",
        ex = example.display()
    );
    println!("  curl -o results.zip {api}/download/1\n");
    println!(
        "  jobrelay submit --server {api} --user 1 --service {SERVICE} --wait --output results {}\n",
        example.display()
    );
    println!("Stop with Ctrl-C: running jobs are killed; a later `jobrelay up` continues.");

    jobrelay_client::shutdown_signal().await;
    tracing::info!("stopping: running jobs are killed, queued ones wait for the next start");
    // The API first (no new uploads; those in flight are committed), then the client.
    server.stop_gracefully().await;
    client.stop_gracefully().await;
    Ok(())
}
