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
use tower_service::Service;

/// Default of [`slow_request`].
pub const DEFAULT_SLOW_REQUEST: Duration = Duration::from_secs(30);
/// Bytes per second a request body must average once [`slow_request`] has passed.
pub const MIN_BODY_RATE: u64 = 1024;

/// How long headers may take, and the grace before a body's rate is checked.
pub fn slow_request() -> Duration {
    std::env::var("JOBRELAY_SLOW_REQUEST_SECS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(DEFAULT_SLOW_REQUEST)
}

/// Serves `app` on `listener` until the task is aborted. Any axum listener: a
/// `TcpListener` (wrap it with `tap_io` to set TCP_NODELAY) or the TLS listener.
pub async fn serve<L>(mut listener: L, app: Router) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let limit = slow_request();
    loop {
        // Accept errors (out of file descriptors and the like) are waited out inside.
        let (tcp, _) = listener.accept().await;
        let app = app.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let request =
                    request.map(|body| axum::body::Body::new(RateFloor::new(body, limit)));
                let mut app = app.clone();
                async move { app.call(request).await }
            });
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limit);
            builder.http2().timer(TokioTimer::new());
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                .await
            {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
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
