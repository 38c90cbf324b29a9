//! The jobrelay executor client: accepts payloads over HTTP (the seed contract plus
//! extensions), runs their `run.sh` through an executor (local process groups, or Slurm
//! jobs), and serves their results as ZIPs.

pub mod allot;
pub mod api;
pub mod auth;
pub mod blocking;
pub mod cgroup;
pub mod config;
pub mod confine;
pub mod events;
pub mod executor;
pub mod exits;
pub mod forkserver;
pub mod janitor;
pub mod load;
pub mod memcg;
pub mod pid_window;
pub mod process;
pub mod pull;
pub mod record_pages;
pub mod runner;
pub mod spawner;
pub mod store;
pub mod supervisor;
pub mod workdir;

use std::net::SocketAddr;
use std::sync::Arc;

pub use config::{ClientArgs, ClientConfig, ExecutorConfig};
use jobrelay_common::protocol::PayloadStatus;
use jobrelay_common::serve::Serving;

use crate::executor::{local::LocalExecutor, slurm, Executor};
use crate::runner::{Runner, RunnerConfig};
use crate::store::PayloadStore;

/// A client that is serving.
pub struct RunningClient {
    /// Where the API listens; `None` for a client that only dials out.
    pub addr: Option<SocketAddr>,
    /// `http` or `https` (with `ClientConfig.tls`).
    pub scheme: &'static str,
    pub runner: Arc<Runner>,
    server: Option<Serving>,
    /// With `--connect`: the join, and the API served through its tunnels.
    pulling: Option<Pulling>,
}

struct Pulling {
    puller: Arc<pull::Puller>,
    serving: Serving,
    store: Arc<PayloadStore>,
    leave_grace: std::time::Duration,
}

impl RunningClient {
    /// Stops serving and kills the payloads that are running locally (they are settled as
    /// "client restarted" at the next start); Slurm jobs keep running and are followed again
    /// at the next start.
    pub fn shutdown(self) {
        if let Some(server) = &self.server {
            server.abort();
        }
        if let Some(pulling) = &self.pulling {
            pulling.serving.abort();
        }
        self.runner.kill_all_now();
        self.runner.executor().release();
    }

    /// SIGTERM's stop: refuses new connections at once, lets the requests in flight finish
    /// (a payload being uploaded is stored and answered, a result being downloaded is sent)
    /// within the shutdown grace, then stops as [`RunningClient::shutdown`] does.
    ///
    /// A client that joined leaves first: the server places no new job here, and the
    /// payloads here finish and are collected (through the tunnels, still open) for at most
    /// `--leave-grace`; what is left then is killed, and the server queues it again elsewhere
    /// once it finds this client gone.
    pub async fn stop_gracefully(self) {
        if let Some(pulling) = self.pulling {
            pulling.puller.leave().await;
            let left = pull::drain(&pulling.store, pulling.leave_grace).await;
            if left > 0 {
                tracing::warn!(
                    left,
                    grace = ?pulling.leave_grace,
                    "payloads still here after the leave grace: stopping them; the server queues them again"
                );
            } else {
                tracing::info!("every payload here was collected");
            }
            pulling.serving.stop().await;
        }
        if let Some(server) = self.server {
            server.stop().await;
        }
        self.runner.kill_all_now();
        self.runner.executor().release();
    }
}

/// Settles what a previous client process left. Payloads it had handed to an executor that
/// keeps them without us (Slurm jobs; local payloads still running, or whose supervisor
/// recorded their end) are followed again and settled from what they did; other payloads that
/// were running are failed "client restarted" (their processes killed); prepared ones are
/// queued again in arrival order.
async fn recover(store: &PayloadStore, runner: &Arc<Runner>) {
    // Submitted, but the client died before the record got the job id.
    let unrecorded: Vec<(u64, String)> = store
        .ids_in(PayloadStatus::Prepared)
        .into_iter()
        .filter(|id| store.get(*id).is_some_and(|r| r.slurm_job_id.is_none()))
        .map(|id| (id, runner::job_name(store.node(), id)))
        .collect();
    for (id, job_id) in runner.executor().find_unrecorded(&unrecorded).await {
        tracing::warn!(
            id,
            slurm_job_id = job_id,
            "found the payload's job submitted before the restart"
        );
        let _ = store.transition(id, &[PayloadStatus::Prepared], |r| {
            r.slurm_job_id = Some(job_id);
        });
    }
    let mut started = store.ids_in(PayloadStatus::Running);
    started.extend(
        store
            .ids_in(PayloadStatus::Prepared)
            .into_iter()
            // Found by Slurm, or started (`started_ms` is written before the start): either
            // may have a process, so it must not be queued to run again.
            .filter(|id| {
                store
                    .get(*id)
                    .is_some_and(|r| r.slurm_job_id.is_some() || r.started_ms.is_some())
            }),
    );
    started.sort_unstable();
    for id in started {
        let Some(record) = store.get(id) else {
            continue;
        };
        let marker = process::marker(store.node(), id);
        if let Some(job) = runner.executor().reattach(&record, &marker) {
            tracing::info!(id, slurm_job_id = ?record.slurm_job_id, "following the payload's job again");
            runner.adopt(id, job);
            continue;
        }
        let reason = match record.slurm_job_id {
            Some(job_id) => format!(
                "client restarted with --executor {}; Slurm job {job_id} is no longer followed",
                runner.executor().name()
            ),
            None => "client restarted".to_owned(),
        };
        let killed = runner.executor().kill_leftovers_of(id, &marker).await;
        let _ = store.transition(
            id,
            &[PayloadStatus::Running, PayloadStatus::Prepared],
            |r| {
                r.status = PayloadStatus::Failed;
                r.reason = Some(reason);
            },
        );
        tracing::warn!(
            id,
            leftover_processes_killed = killed,
            "payload was running when the client stopped"
        );
    }
    // Exit files of payloads whose final record was written just before the previous client
    // process died (it removes them only after the record).
    for id in runner.executor().kept() {
        if store.get(id).is_none_or(|r| r.status.is_finished()) {
            runner.executor().settled(id);
        }
    }
    // Prepared payloads that were never handed to the executor; those that were (a job
    // pending in Slurm) are followed above and must not be submitted again.
    for id in store.ids_in(PayloadStatus::Prepared) {
        if store.get(id).is_some_and(|r| r.slurm_job_id.is_none()) {
            runner.enqueue(id);
        }
    }
}

/// Opens the data directory, settles leftovers and starts serving.
pub async fn start(config: ClientConfig) -> anyhow::Result<RunningClient> {
    jobrelay_common::telemetry::install();
    let store = Arc::new(PayloadStore::open(&config.data_dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot open data directory {}: {e}",
            config.data_dir.display()
        )
    })?);
    let executor = match &config.executor {
        ExecutorConfig::Local => {
            let confinement = &config.confinement;
            if confinement.run_as.is_some() && !confine::can_change_user() {
                anyhow::bail!("--run-as needs the client to run as root");
            }
            if confinement.sandbox {
                confine::check_sandbox(confinement.run_as.as_ref()).await?;
            }
            if let Some(run_as) = &confinement.run_as {
                confine::prepare_data_dir(&config.data_dir, run_as)?;
            }
            Executor::Local(
                LocalExecutor::new(confinement.clone(), &config.data_dir, store.node())
                    .map_err(|e| anyhow::anyhow!("cannot prepare the local executor: {e}"))?,
            )
        }
        ExecutorConfig::Slurm(slurm_config) => {
            slurm::check_commands().await.map_err(anyhow::Error::msg)?;
            Executor::Slurm(slurm::SlurmExecutor::start(slurm_config.clone()))
        }
    };
    let runner = Runner::new(
        store.clone(),
        executor,
        RunnerConfig {
            slots: config.slots,
            kill_grace: config.kill_grace,
            max_runtime: config.max_runtime,
            capacity: config.capacity,
            gpu_ids: config.gpu_ids.clone(),
        },
    );
    recover(&store, &runner).await;
    runner.start();
    janitor::start(store.clone(), config.max_age);
    let load = load::LoadGauge::default();
    runner.executor().start_load_sampler(&load);

    let state = api::AppState {
        store: store.clone(),
        runner: runner.clone(),
        load,
        max_upload: config.max_upload,
        token: config.token.clone().map(Arc::new),
    };
    let pulling = match &config.pull {
        None => None,
        Some(pull_config) => {
            let puller = pull::Puller::new(pull_config.clone(), store.node(), &config.data_dir)?;
            // The tunnels were opened with this join's credential: no token inside.
            let app = api::router(api::AppState {
                token: None,
                ..state.clone()
            });
            let serving = Serving::spawn(puller.listener(), app);
            tracing::info!(server = %pull_config.server, services = ?pull_config.services, "pulling work from the server");
            Some(Pulling {
                puller,
                serving,
                store: store.clone(),
                leave_grace: pull_config.leave_grace,
            })
        }
    };
    let (addr, server) = match config.listen {
        None => (None, None),
        Some(listen) => {
            let (addr, server) = listen_on(listen, &config, api::router(state)).await?;
            (Some(addr), Some(server))
        }
    };
    tracing::info!(addr = ?addr, slots = config.slots, executor = runner.executor().name(), data_dir = %config.data_dir.display(), "client started");
    Ok(RunningClient {
        addr,
        scheme: if config.tls.is_some() {
            "https"
        } else {
            "http"
        },
        runner,
        server,
        pulling,
    })
}

async fn listen_on(
    listen: SocketAddr,
    config: &ClientConfig,
    app: axum::Router,
) -> anyhow::Result<(SocketAddr, Serving)> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    if config.token.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "NO TOKEN: anyone who can reach this address can run any code on this machine; \
             give --token-file (and the server --client-token-file) or bind to 127.0.0.1"
        );
    }
    // Our accept loop (common::serve): timeouts against slow-loris requests, over TLS or not.
    let server = match &config.tls {
        Some(files) => {
            let acceptor = files.acceptor().map_err(anyhow::Error::msg)?;
            let listener = jobrelay_common::tls::TlsListener::new(listener, acceptor)?;
            Serving::spawn(listener, app)
        }
        None => {
            // Without TCP_NODELAY a streamed answer's last small chunk waits for the peer's
            // delayed ACK (about 40 ms on Linux).
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            Serving::spawn(listener, app)
        }
    };
    Ok((addr, server))
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// `jobrelay client`: serves until SIGINT or SIGTERM.
pub async fn run(args: ClientArgs) -> anyhow::Result<()> {
    let config = args.into_config()?;
    let joining = config.pull.as_ref().map(|p| p.server.clone());
    let client = start(config).await?;
    if let Some(addr) = client.addr {
        println!("jobrelay client listening on {}://{}", client.scheme, addr);
    }
    if let Some(server) = joining {
        println!("jobrelay client pulling work from {server}");
    }
    shutdown_signal().await;
    tracing::info!("client stopping: no new connections, finishing open requests");
    client.stop_gracefully().await;
    Ok(())
}
