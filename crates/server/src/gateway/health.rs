//! What a client is and how loaded: `GET /info` (else `/health`, seed contract) and
//! `GET /load`.

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use jobrelay_common::protocol::ClientInfo;

use super::{url, To};
use crate::clients::{self, ClientHandle};
use crate::Shared;

/// Start of the probe error of a client that answers 401/403.
pub const REFUSES_TOKEN: &str = "the client refuses our token";

/// What a probe found.
pub enum Probe {
    /// `/info` answered.
    Info(Box<ClientInfo>),
    /// No `/info`, but `/health` answered (a seed-contract client).
    Seed,
}

/// Asks `/info`, else `/health`, each within `timeout`. The client is marked reached when
/// it answers, failed (since the probe was sent) when not or when it refuses our token.
pub async fn probe(
    shared: &Shared,
    client: &ClientHandle,
    timeout: Duration,
) -> Result<Probe, String> {
    let sent = Instant::now();
    let probe = probe_once(client, timeout).await;
    match &probe {
        Ok(_) => clients::reached(client),
        Err(why) => clients::failed_since(&shared.lifecycle, client, why, sent),
    }
    probe
}

async fn probe_once(client: &ClientHandle, timeout: Duration) -> Result<Probe, String> {
    let response = client
        .http
        .get(url(&client.endpoint, To::Info))
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| format!("GET /info: {e}"))?;
    if matches!(
        response.status(),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
    ) {
        return Err(format!(
            "{REFUSES_TOKEN} ({}): give the server the client's token \
             (--client-token-file, or token_file of the service)",
            response.status()
        ));
    }
    if response.status().is_success() {
        if let Ok(info) = response.json::<ClientInfo>().await {
            return Ok(Probe::Info(Box::new(info)));
        }
    }
    let health = client
        .http
        .get(url(&client.endpoint, To::Health))
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| format!("GET /health: {e}"))?;
    if health.status().is_success() {
        Ok(Probe::Seed)
    } else {
        Err(format!("GET /health answered {}", health.status()))
    }
}

/// `GET /load`: the client's load, 0 when it does not say.
pub async fn load(client: &ClientHandle, timeout: Duration) -> f64 {
    let answer = client
        .http
        .get(url(&client.endpoint, To::Load))
        .timeout(timeout)
        .send()
        .await;
    match answer {
        Ok(r) if r.status().is_success() => r.json::<f64>().await.unwrap_or(0.0),
        _ => 0.0,
    }
}
