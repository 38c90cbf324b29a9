//! Completion webhooks: a job may carry a callback URL (or its service a default one); when
//! the job reaches a final state (and, if asked, when it starts running) the server POSTs the
//! job's JSON there, signed with the service's secret.
//!
//! Delivery is durable and at least once: the notification is written by the store in the
//! transaction of the state change it announces (the outbox, [`crate::store::JobDb`]); the
//! [`delivery`] loop sends what is due, retries with exponential backoff for the configured
//! period, and a restart resumes what was pending. Receivers deduplicate by the delivery id
//! (`X-Jobrelay-Delivery`), the same on every try.
//!
//! - [`allowlist`]: which hosts callbacks may go to (none without an allowlist);
//! - [`signing`]: the `X-Jobrelay-Signature` header;
//! - [`delivery`]: the loop that sends notifications;
//! - [`resolver`]: names resolved to public addresses only.

pub mod allowlist;
pub mod delivery;
pub mod resolver;
pub mod signing;

use std::collections::BTreeMap;

use serde::Serialize;

pub use allowlist::Allowlist;

use crate::config::ServerConfig;
use crate::store::{Callback, Job, Notification};

/// Upload field naming where the job's notifications go.
pub const URL_FIELD: &str = "callback_url";
/// Upload field naming the states announced besides the final one: `final` (the default)
/// or `running` (also when the job starts running), comma-separated.
pub const EVENTS_FIELD: &str = "callback_events";

/// Checks the webhook settings at start: the allowlist's entries, and each service's default
/// `webhook_url` (allowed, and signed: a secret is needed).
pub fn check_config(config: &ServerConfig) -> anyhow::Result<()> {
    let allowlist = Allowlist::parse(&config.webhooks.allowed_hosts).map_err(anyhow::Error::msg)?;
    for (name, service) in &config.services {
        if let Some(url) = &service.webhook_url {
            allowlist
                .check(url)
                .map_err(|e| anyhow::anyhow!("service {name:?}: webhook_url: {e}"))?;
            if service.webhook_secret.is_none() {
                anyhow::bail!(
                    "service {name:?}: webhook_url needs webhook_secret or webhook_secret_file \
                     (every notification is signed)"
                );
            }
        }
    }
    Ok(())
}

/// Why an upload's callback is refused (answered 400).
#[derive(Debug, PartialEq, Eq)]
pub struct CallbackRefused(pub String);

impl std::fmt::Display for CallbackRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The callback of an upload to `service` from its form fields (`callback_url`,
/// `callback_events`), or the service's default `webhook_url`; `None` when there is neither.
/// A URL whose host is off the allowlist, or a callback to a service without a webhook
/// secret, is refused.
pub fn callback_from_fields(
    fields: &BTreeMap<String, String>,
    config: &ServerConfig,
    service: &str,
) -> Result<Option<Callback>, CallbackRefused> {
    let given = |name: &str| fields.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
    let on_running = match given(EVENTS_FIELD) {
        None => false,
        Some(text) => parse_events(text)?,
    };
    let settings = config.services.get(service);
    let url = match given(URL_FIELD) {
        Some(url) => url.to_owned(),
        None => match settings.and_then(|s| s.webhook_url.clone()) {
            Some(url) => url,
            None if given(EVENTS_FIELD).is_some() => {
                return Err(CallbackRefused(format!(
                    "{EVENTS_FIELD} needs a {URL_FIELD} (service {service:?} has no webhook_url)"
                )))
            }
            None => return Ok(None),
        },
    };
    let allowlist = Allowlist::parse(&config.webhooks.allowed_hosts).map_err(CallbackRefused)?;
    let url = allowlist.check(&url).map_err(CallbackRefused)?;
    if settings.is_none_or(|s| s.webhook_secret.is_none()) {
        return Err(CallbackRefused(format!(
            "service {service:?} takes no callbacks: it has no webhook_secret to sign them"
        )));
    }
    Ok(Some(Callback {
        url: url.to_string(),
        on_running,
    }))
}

/// `callback_events`: whether `running` is asked for. The final state is always announced
/// (`running` alone adds the start to it): a platform is never left polling for the end.
fn parse_events(text: &str) -> Result<bool, CallbackRefused> {
    let mut on_running = false;
    for event in text.split([',', ' ']).filter(|e| !e.is_empty()) {
        match event.to_ascii_lowercase().as_str() {
            "running" => on_running = true,
            "final" => {}
            other => {
                return Err(CallbackRefused(format!(
                    "{EVENTS_FIELD}: unknown event {other:?}; use final, running or both \
                     (running,final)"
                )))
            }
        }
    }
    Ok(on_running)
}

/// A job with its notifications, as `GET /jobs/{id}` answers: the job's fields unchanged, and
/// `notifications` only for a job that has some.
#[derive(Serialize, utoipa::ToSchema)]
pub struct JobWithNotifications {
    #[serde(flatten)]
    pub job: Job,
    /// The job's notifications to its callback, oldest first (absent when it has none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notifications: Vec<Notification>,
    /// Why a Queued job is not running yet (absent in other states).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<crate::scheduler::Waiting>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ServiceConfig, WebhookConfig};
    use jobrelay_common::auth::Secret;

    fn config(allowed: &[&str], secret: bool, default: Option<&str>) -> ServerConfig {
        let mut service = ServiceConfig::new(Vec::new());
        service.webhook_secret = secret.then(|| Secret::new("s3cret").unwrap());
        service.webhook_url = default.map(str::to_owned);
        let mut config = ServerConfig::new(
            "/nonexistent".into(),
            BTreeMap::from([("svc".to_owned(), service)]),
        );
        config.webhooks = WebhookConfig {
            allowed_hosts: allowed.iter().map(|h| h.to_string()).collect(),
            ..Default::default()
        };
        config
    }

    fn fields(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn an_upload_takes_an_allowed_callback_or_the_default() {
        let config = config(&["hooks.test"], true, Some("https://hooks.test/default"));
        let given = fields(&[
            ("callback_url", "https://hooks.test/job"),
            ("callback_events", "running,final"),
        ]);
        assert_eq!(
            callback_from_fields(&given, &config, "svc"),
            Ok(Some(Callback {
                url: "https://hooks.test/job".into(),
                on_running: true
            }))
        );
        assert_eq!(
            callback_from_fields(&fields(&[]), &config, "svc"),
            Ok(Some(Callback {
                url: "https://hooks.test/default".into(),
                on_running: false
            }))
        );
    }

    #[test]
    fn callbacks_off_the_allowlist_or_unsigned_are_refused() {
        let allowed = config(&["hooks.test"], true, None);
        let off = fields(&[("callback_url", "http://169.254.169.254/")]);
        let why = callback_from_fields(&off, &allowed, "svc").unwrap_err().0;
        assert!(why.contains("not in this server's"), "{why}");
        assert_eq!(
            callback_from_fields(&fields(&[]), &allowed, "svc"),
            Ok(None)
        );
        let events_alone = fields(&[("callback_events", "running")]);
        assert!(callback_from_fields(&events_alone, &allowed, "svc").is_err());
        let bad_event = fields(&[
            ("callback_url", "https://hooks.test/"),
            ("callback_events", "queued"),
        ]);
        assert!(callback_from_fields(&bad_event, &allowed, "svc").is_err());

        let no_allowlist = config(&[], true, None);
        let ok_host = fields(&[("callback_url", "https://hooks.test/")]);
        let why = callback_from_fields(&ok_host, &no_allowlist, "svc")
            .unwrap_err()
            .0;
        assert!(why.contains("no callbacks"), "{why}");
        let no_secret = config(&["hooks.test"], false, None);
        let why = callback_from_fields(&ok_host, &no_secret, "svc")
            .unwrap_err()
            .0;
        assert!(why.contains("webhook_secret"), "{why}");
    }

    #[test]
    fn a_default_webhook_must_be_allowed_and_signed() {
        assert!(check_config(&config(&["hooks.test"], true, Some("https://hooks.test/"))).is_ok());
        assert!(check_config(&config(&["other.test"], true, Some("https://hooks.test/"))).is_err());
        assert!(
            check_config(&config(&["hooks.test"], false, Some("https://hooks.test/"))).is_err()
        );
        assert!(check_config(&config(&["https://hooks.test/"], true, None)).is_err());
    }
}
