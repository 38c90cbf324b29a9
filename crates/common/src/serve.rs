//! The HTTP accept loop of server and client: axum's `serve` without its one gap, timeouts.
//! `axum::serve` gives hyper no timer, so hyper's header-read timeout never fires and a client
//! that trickles a request one byte at a time holds its connection (and task, and file
//! descriptor) forever. Here every connection gets:
//! - a header-read timeout: the request line and headers must arrive within [`slow_request`]
//!   (hyper also counts an idle keep-alive connection's wait for its next request, so idle
//!   connections close after that time: HTTP clients must pool them for less);
//! - a body rate floor: past that same time, a request body must have averaged at least
//!   [`MIN_BODY_RATE`] bytes per second, or the body errors (the handler answers 400 and
//!   cleans up as for any cut upload) and the connection closes.
//!
//! `JOBRELAY_SLOW_REQUEST_SECS` sets the time (default 30 s; the fault tests use a few seconds).
//!
//! Graceful stop ([`serve_until`], [`Serving`]): when asked to stop, the listening socket is
//! closed at once (a new connection is refused, so a load balancer tries another server), every
//! open connection finishes the requests it has (uploads included) and then closes, for at
//! most [`shutdown_grace`] (`JOBRELAY_SHUTDOWN_GRACE_SECS`, default 20 s); connections still
//! busy after that are cut. [`stopping`] resolves from the moment a stop is asked, so
//! long-polls can answer at once instead of holding the stop for their whole wait.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use bytes::Bytes;
use http_body::{Body, Frame};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::sync::{oneshot, watch};
use tower_service::Service;

/// Default of [`slow_request`].
pub const DEFAULT_SLOW_REQUEST: Duration = Duration::from_secs(30);
/// Bytes per second a request body must average once [`slow_request`] has passed.
pub const MIN_BODY_RATE: u64 = 1024;

/// How long one of our HTTP clients keeps an idle connection to a jobrelay server or client
/// in its pool: half of [`slow_request`], after which the other side closes an idle
/// keep-alive connection (the header-read timeout also runs between requests). Pooled for as
/// long, a connection could be reused just as the other side closes it, and the request
/// fails with `IncompleteMessage` (seen after 30 s idle in a test).
pub fn pool_idle() -> Duration {
    slow_request() / 2
}

/// How long headers may take, and the grace before a body's rate is checked.
pub fn slow_request() -> Duration {
    std::env::var("JOBRELAY_SLOW_REQUEST_SECS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(DEFAULT_SLOW_REQUEST)
}

/// Default of [`shutdown_grace`].
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// How long a stopping server lets open connections finish their requests.
pub fn shutdown_grace() -> Duration {
    std::env::var("JOBRELAY_SHUTDOWN_GRACE_SECS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(DEFAULT_SHUTDOWN_GRACE)
}

/// Process-wide: set once a stop of any serving loop was asked.
fn stop_flag() -> &'static watch::Sender<bool> {
    static FLAG: std::sync::OnceLock<watch::Sender<bool>> = std::sync::OnceLock::new();
    FLAG.get_or_init(|| watch::channel(false).0)
}

/// Resolves once this process is stopping (a [`Serving::stop`] was called): long-polls
/// select on it to answer at once rather than keep a stopping server for their whole wait.
pub async fn stopping() {
    let mut rx = stop_flag().subscribe();
    let _ = rx.wait_for(|stopping| *stopping).await;
}

/// Serves `app` on `listener` until the task is aborted. Any axum listener: a
/// `TcpListener` (wrap it with `tap_io` to set TCP_NODELAY) or the TLS listener.
pub async fn serve<L>(listener: L, app: Router) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    L::Addr: Clone + Send + Sync + 'static,
{
    serve_until(listener, app, std::future::pending(), Duration::ZERO).await
}

/// A serving loop on its own task, stopped gracefully by [`Serving::stop`].
pub struct Serving {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Serving {
    /// Starts serving `app` on `listener` on a task of its own.
    pub fn spawn<L>(listener: L, app: Router) -> Serving
    where
        L: axum::serve::Listener,
        L::Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        L::Addr: Clone + Send + Sync + 'static,
    {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(serve_until(
            listener,
            app,
            async move {
                let _ = stopped.await;
            },
            shutdown_grace(),
        ));
        Serving {
            stop: Some(stop),
            task,
        }
    }

    /// Closes the listening socket, lets open requests finish for at most
    /// [`shutdown_grace`], then returns.
    pub async fn stop(mut self) {
        stop_flag().send_replace(true);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Err(e) = (&mut self.task).await {
            tracing::warn!(error = %e, "serving task ended abnormally");
        }
    }

    /// Stops at once: the listening socket and every connection are dropped.
    pub fn abort(&self) {
        self.task.abort();
    }
}

/// Serves `app` on `listener` until `stop` resolves; then closes the listener and lets open
/// connections finish their requests for at most `grace`.
pub async fn serve_until<L, F>(
    mut listener: L,
    app: Router,
    stop: F,
    grace: Duration,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    L::Addr: Clone + Send + Sync + 'static,
    F: Future<Output = ()>,
{
    let limit = slow_request();
    let graceful = GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    // Every connection's task, so those still busy after the grace are cut, not left behind.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        // Accept errors (out of file descriptors and the like) are waited out inside.
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break,
        };
        let app = app.clone();
        let watcher = graceful.watcher();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let mut request =
                    request.map(|body| axum::body::Body::new(RateFloor::new(body, limit)));
                // Who is asking, for the handlers that say (axum's `ConnectInfo`).
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer.clone()));
                let mut app = app.clone();
                async move { app.call(request).await }
            });
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limit);
            builder.http2().timer(TokioTimer::new());
            let connection = builder
                .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                .into_owned();
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    // New connections are refused from here on.
    drop(listener);
    let open = graceful.count();
    tracing::info!(
        open,
        grace_secs = grace.as_secs_f64(),
        "stopped accepting; finishing open requests"
    );
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still open after the shutdown grace; cutting them");
    }
    connections.abort_all();
    Ok(())
}

/// A request body that errors once it is slower than [`MIN_BODY_RATE`] after `grace`.
struct RateFloor {
    inner: Incoming,
    start: Instant,
    grace: Duration,
    received: u64,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl RateFloor {
    fn new(inner: Incoming, grace: Duration) -> Self {
        RateFloor {
            inner,
            start: Instant::now(),
            grace,
            received: 0,
            timer: Box::pin(tokio::time::sleep(grace)),
        }
    }

    fn too_slow(&self) -> bool {
        let elapsed = self.start.elapsed();
        elapsed > self.grace
            && (self.received as f64) < MIN_BODY_RATE as f64 * elapsed.as_secs_f64()
    }
}

impl Body for RateFloor {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.received += data.len() as u64;
                }
                if self.too_slow() {
                    return Poll::Ready(Some(Err(slow_error())));
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        // Nothing arrived: wake up at the next check even if nothing ever does.
        while self.timer.as_mut().poll(cx).is_ready() {
            if self.too_slow() {
                return Poll::Ready(Some(Err(slow_error())));
            }
            let next = tokio::time::Instant::now() + Duration::from_secs(1);
            self.timer.as_mut().reset(next);
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn slow_error() -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("request body slower than {MIN_BODY_RATE} bytes/s"),
    ))
}
