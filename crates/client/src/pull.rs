//! A client that dials out (`--connect`): it joins the server with a join token, then keeps a
//! few tunnels on offer (`GET /join/tunnel`, an HTTP upgrade the server holds until it needs
//! a connection to this client). Each tunnel the server takes becomes a connection the
//! client's own API serves ([`TunnelListener`] is an axum listener of them), so a pulled
//! payload is received, run, followed and collected exactly as a pushed one (same store,
//! runner, executors, change feed, result ZIP, idempotency key), and the client needs no
//! listening port. Each tunnel request is also its heartbeat.
//!
//! On SIGTERM the client leaves (`POST /join/leave`: the server places no new job here), lets
//! its payloads finish and be collected for at most `--leave-grace`, then stops.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use jobrelay_common::auth::Secret;
use jobrelay_common::protocol::PayloadStatus;
use reqwest::header::{AUTHORIZATION, CONNECTION, UPGRADE};
use reqwest::StatusCode;

use crate::config::PullConfig;
use crate::store::PayloadStore;

/// The `Upgrade` protocol of a tunnel (the server's `http::join::TUNNEL_PROTOCOL`).
pub const TUNNEL_PROTOCOL: &str = "jobrelay-tunnel";
/// Tunnels kept on offer at once: the server's next connections need no round trip.
const OFFERED: usize = 3;
/// First and longest pause after a failed join or tunnel request.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Longest a tunnel request may go unanswered (the server holds it for about 20 s).
const TUNNEL_TIMEOUT: Duration = Duration::from_secs(60);

/// The file in the data directory that keeps the credential of the last join, so that a
/// restarted client shows it and keeps its seat (the server refuses its node id to a join
/// without it while the seat's client is alive).
pub const CREDENTIAL_FILE: &str = "join-credential";

/// The joining side: the HTTP client to the server, and the credential of this join.
pub struct Puller {
    http: reqwest::Client,
    config: PullConfig,
    node: String,
    credential: tokio::sync::Mutex<Option<Secret>>,
    /// The credential of the last join (also after the server forgot it), shown when
    /// joining again, and where it is kept.
    last: std::sync::Mutex<Option<Secret>>,
    credential_file: std::path::PathBuf,
}

#[derive(serde::Deserialize)]
struct JoinAnswer {
    credential: String,
    client: String,
}

impl Puller {
    pub fn new(
        config: PullConfig,
        node: &str,
        data_dir: &std::path::Path,
    ) -> anyhow::Result<Arc<Puller>> {
        let credential_file = data_dir.join(CREDENTIAL_FILE);
        let last = match std::fs::read_to_string(&credential_file) {
            Ok(text) => Secret::new(text.trim().to_owned()).ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => anyhow::bail!("cannot read {}: {e}", credential_file.display()),
        };
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .pool_idle_timeout(jobrelay_common::serve::pool_idle())
            .connect_timeout(Duration::from_secs(10))
            .http1_only();
        if let Some(pem) = &config.ca {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| anyhow::anyhow!("no usable CA certificate in --ca: {e}"))?;
            builder = builder.tls_certs_only(certs);
        }
        Ok(Arc::new(Puller {
            http: builder.build()?,
            config,
            node: node.to_owned(),
            credential: tokio::sync::Mutex::new(None),
            last: std::sync::Mutex::new(last),
            credential_file,
        }))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.config.server)
    }

    /// This join's credential, joining (again) first if there is none, retrying until the
    /// server takes us.
    async fn credential(&self) -> Secret {
        let mut backoff = BACKOFF_MIN;
        loop {
            let mut held = self.credential.lock().await;
            if let Some(credential) = held.as_ref() {
                return credential.clone();
            }
            match self.join().await {
                Ok(credential) => {
                    *held = Some(credential.clone());
                    return credential;
                }
                Err(why) => {
                    drop(held);
                    if backoff == BACKOFF_MIN {
                        tracing::warn!(server = %self.config.server, "cannot join: {why}");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    async fn join(&self) -> Result<Secret, String> {
        let mut body = serde_json::json!({
            "node": self.node,
            "services": self.config.services,
            "version": env!("CARGO_PKG_VERSION"),
        });
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(last) = last {
            body["credential"] = last.expose().into();
        }
        let response = self
            .http
            .post(self.url("/join"))
            .header(AUTHORIZATION, self.config.join_token.header_value())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let text = response.text().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("{status}: {text}"));
        }
        let answer: JoinAnswer =
            serde_json::from_str(&text).map_err(|e| format!("bad join answer: {e}"))?;
        tracing::info!(server = %self.config.server, client = %answer.client, services = ?self.config.services, "joined");
        let credential =
            Secret::new(answer.credential).map_err(|e| format!("bad credential: {e}"))?;
        self.keep(&credential);
        Ok(credential)
    }

    /// Keeps the credential of this join for the next one (in memory and in the data
    /// directory, readable by this user only). A failed write costs only a seat refused
    /// after a restart while this one is still alive, so it is logged, not fatal.
    fn keep(&self, credential: &Secret) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last
            .as_ref()
            .is_some_and(|l| l.expose() == credential.expose())
        {
            return;
        }
        *last = Some(credential.clone());
        if let Err(e) = jobrelay_common::fsutil::write_atomic_with_mode(
            &self.credential_file,
            credential.expose().as_bytes(),
            0o600,
        ) {
            tracing::warn!(file = %self.credential_file.display(), error = %e, "cannot keep the join credential");
        }
    }

    /// Forgets a credential the server no longer knows (it restarted): the next tunnel joins
    /// again.
    async fn forget(&self, stale: &Secret) {
        let mut held = self.credential.lock().await;
        if held.as_ref().is_some_and(|c| c.expose() == stale.expose()) {
            *held = None;
        }
    }

    /// Offers one tunnel: `Ok(Some)` once the server took it, `Ok(None)` when it needed none
    /// within its wait.
    async fn offer(&self) -> Result<Option<reqwest::Upgraded>, String> {
        let credential = self.credential().await;
        let response = self
            .http
            .get(self.url("/join/tunnel"))
            .header(AUTHORIZATION, credential.header_value())
            .header(CONNECTION, "upgrade")
            .header(UPGRADE, TUNNEL_PROTOCOL)
            .timeout(TUNNEL_TIMEOUT)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        match response.status() {
            StatusCode::SWITCHING_PROTOCOLS => response
                .upgrade()
                .await
                .map(Some)
                .map_err(|e| e.to_string()),
            StatusCode::NO_CONTENT => Ok(None),
            StatusCode::UNAUTHORIZED => {
                self.forget(&credential).await;
                Err("the server does not know our credential: joining again".into())
            }
            status => Err(format!(
                "{status}: {}",
                response.text().await.unwrap_or_default()
            )),
        }
    }

    /// Tells the server we leave: no new job comes here.
    pub async fn leave(&self) {
        let Some(credential) = self.credential.lock().await.clone() else {
            return;
        };
        let sent = self
            .http
            .post(self.url("/join/leave"))
            .header(AUTHORIZATION, credential.header_value())
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => tracing::info!("left the server: no new jobs"),
            Ok(r) => tracing::warn!(status = %r.status(), "the server refused our leave"),
            Err(e) => tracing::warn!(error = %e, "could not tell the server we leave"),
        }
    }

    /// The tunnels as an axum listener; `OFFERED` tasks keep offering until it is dropped.
    pub fn listener(self: &Arc<Self>) -> TunnelListener {
        let (sender, receiver) = tokio::sync::mpsc::channel(OFFERED);
        let offering = (0..OFFERED)
            .map(|_| {
                let (puller, sender) = (self.clone(), sender.clone());
                tokio::spawn(async move { puller.keep_offering(sender).await })
            })
            .collect();
        TunnelListener {
            receiver,
            offering,
            server: self.config.server.clone(),
        }
    }

    async fn keep_offering(&self, tunnels: tokio::sync::mpsc::Sender<reqwest::Upgraded>) {
        let mut backoff = BACKOFF_MIN;
        while !tunnels.is_closed() {
            match self.offer().await {
                Ok(Some(tunnel)) => {
                    backoff = BACKOFF_MIN;
                    if tunnels.send(tunnel).await.is_err() {
                        return;
                    }
                }
                Ok(None) => backoff = BACKOFF_MIN,
                Err(why) => {
                    tracing::debug!(server = %self.config.server, "tunnel: {why}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

/// The connections the server opened to this client, through the tunnels we offered.
pub struct TunnelListener {
    receiver: tokio::sync::mpsc::Receiver<reqwest::Upgraded>,
    offering: Vec<tokio::task::JoinHandle<()>>,
    server: String,
}

impl Drop for TunnelListener {
    fn drop(&mut self) {
        for task in &self.offering {
            task.abort();
        }
    }
}

impl axum::serve::Listener for TunnelListener {
    type Io = reqwest::Upgraded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.receiver.recv().await {
            Some(tunnel) => (tunnel, SocketAddr::from(([0, 0, 0, 0], 0))),
            // Only when every offering task ended, which they do only once we are dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        let _ = &self.server;
        Ok(SocketAddr::from(([0, 0, 0, 0], 0)))
    }
}

/// Payloads not yet released by the server (received, running, or finished and not
/// collected).
pub fn unreleased(store: &PayloadStore) -> usize {
    [
        PayloadStatus::Prepared,
        PayloadStatus::Running,
        PayloadStatus::Completed,
        PayloadStatus::Failed,
        PayloadStatus::Invalid,
        PayloadStatus::Killed,
    ]
    .into_iter()
    .map(|s| store.count(s))
    .sum()
}

/// SIGTERM's leave: waits until every payload here was released by the server (collected),
/// for at most `grace`. Returns how many were left.
pub async fn drain(store: &PayloadStore, grace: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        let left = unreleased(store);
        if left == 0 || tokio::time::Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
