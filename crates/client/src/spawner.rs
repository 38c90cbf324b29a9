//! The client's handle on its fork server (`forkserver`): starts it at the first payload, sends
//! it start requests and routes its replies, so that a payload's supervisor is forked from a
//! small single-threaded process instead of exec'ing the `jobrelay` binary per payload.
//!
//! One reader task per fork server routes "started"/"failed" to the request's waiter and
//! "ended" to the waiter of that pid. The reader registers a pid's "ended" waiter as it routes
//! its "started" (the fork server never reaps a child before it said "started" for it), so an
//! "ended" is never lost to a waiter that registered late: it waits in its channel. When the
//! fork server is gone (EOF: killed, crashed), every waiter hears so (`ended` gives
//! `Err`): its payload's supervisor runs on, re-parented, and the local executor follows it
//! as it follows an adopted run (exit record, else `Tracker::supervisor_alive`). The next
//! start starts a new fork server.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::oneshot;

use crate::forkserver::{Reply, Start, SPAWNER_ARG};
use crate::supervisor;

/// A payload's supervisor, started by the fork server.
pub struct Started {
    /// Its pid, which is its process group too.
    pub pid: u32,
    /// How it ended; `Err` if the fork server went away first.
    pub ended: oneshot::Receiver<ExitStatus>,
}

/// Why a start did not happen.
#[derive(Debug)]
pub enum StartError {
    /// No fork server could take the request (none could be started, or it went away before
    /// the request reached it): nothing was started, the caller may use the exec path.
    Unavailable(String),
    /// The fork server said it could not start it: nothing runs.
    Failed(String),
    /// The fork server went away after it got the request and before it answered: a
    /// supervisor may have been forked; the caller kills what is in the payload's cgroup.
    Lost,
}

/// The fork server of this client process, started on first use and again after it died.
#[derive(Default)]
pub struct Spawner {
    current: tokio::sync::Mutex<Option<Arc<Conn>>>,
}

struct Conn {
    pid: u32,
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    routes: Arc<Mutex<Routes>>,
    next_req: AtomicU64,
}

#[derive(Default)]
struct Routes {
    open: bool,
    starts: HashMap<u64, oneshot::Sender<Result<Started, String>>>,
    ends: HashMap<u32, oneshot::Sender<ExitStatus>>,
}

impl Spawner {
    /// Starts a payload's supervisor through the fork server (starting one if needed).
    pub async fn start(&self, mut request: Start) -> Result<Started, StartError> {
        // A second try with a new fork server if the first one was gone before it got the
        // request (killed since the last payload).
        for _ in 0..2 {
            let conn = self.conn().await?;
            request.req = conn.next_req.fetch_add(1, Ordering::Relaxed);
            match conn.start(&request).await {
                Err(Sent::No) => {
                    conn.routes.lock().unwrap().open = false;
                    continue;
                }
                Err(Sent::Yes) => return Err(StartError::Lost),
                Ok(Err(error)) => return Err(StartError::Failed(error)),
                Ok(Ok(started)) => return Ok(started),
            }
        }
        Err(StartError::Unavailable(
            "the payload fork server went away twice".into(),
        ))
    }

    async fn conn(&self) -> Result<Arc<Conn>, StartError> {
        let mut current = self.current.lock().await;
        if let Some(conn) = current.as_ref() {
            if conn.routes.lock().unwrap().open {
                return Ok(conn.clone());
            }
        }
        let conn = Arc::new(Conn::spawn().map_err(|e| {
            StartError::Unavailable(format!("cannot start the payload fork server: {e}"))
        })?);
        tracing::debug!(pid = conn.pid, "payload fork server started");
        *current = Some(conn.clone());
        Ok(conn)
    }
}

/// Whether a request that got no answer reached the fork server.
enum Sent {
    No,
    Yes,
}

impl Conn {
    fn spawn() -> std::io::Result<Conn> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        // No pre_exec, uid or gid: std starts it with posix_spawn (vfork), as the exec'd
        // supervisors are. In a group of its own, as they are, so a signal to the client's
        // group (a terminal's ^C) does not reach it.
        let mut child = {
            let mut command = tokio::process::Command::new("/proc/self/exe");
            command
                .arg(supervisor::ARG)
                .arg(SPAWNER_ARG)
                .stdin(Stdio::from(OwnedFd::from(theirs)))
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .process_group(0)
                .kill_on_drop(false);
            command.spawn()?
            // The command, and with it our copy of the fork server's end, goes here: its
            // death must read as EOF.
        };
        let pid = child.id().unwrap_or(0);
        // Shown from the first fork server on, so a zero reads as "none moved in".
        metrics::counter!("jobrelay_client_cgroup_moves_total").increment(0);
        ours.set_nonblocking(true)?;
        let (read, write) = tokio::net::UnixStream::from_std(ours)?.into_split();
        let routes = Arc::new(Mutex::new(Routes {
            open: true,
            ..Routes::default()
        }));
        let reader_routes = routes.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Reply>(&line) {
                    Ok(reply) => route(&reader_routes, reply),
                    Err(e) => {
                        tracing::warn!(error = %e, "unreadable reply of the payload fork server")
                    }
                }
            }
            let (starts, ends) = {
                let mut routes = reader_routes.lock().unwrap();
                routes.open = false;
                (
                    std::mem::take(&mut routes.starts).len(),
                    std::mem::take(&mut routes.ends).len(),
                )
            };
            let status = child.wait().await;
            tracing::warn!(
                pid,
                status = ?status,
                waiting_starts = starts,
                running = ends,
                "the payload fork server ended; its running payloads are followed by their \
                 exit records, and the next payload starts a new one"
            );
        });
        Ok(Conn {
            pid,
            writer: Arc::new(tokio::sync::Mutex::new(write)),
            routes,
            next_req: AtomicU64::new(1),
        })
    }

    async fn start(&self, request: &Start) -> Result<Result<Started, String>, Sent> {
        let (tx, rx) = oneshot::channel();
        {
            let mut routes = self.routes.lock().unwrap();
            if !routes.open {
                return Err(Sent::No);
            }
            routes.starts.insert(request.req, tx);
        }
        let mut line = serde_json::to_vec(request).map_err(|_| Sent::No)?;
        line.push(b'\n');
        // The write runs on a task of its own: a caller that gives up cannot leave half a
        // line on the socket.
        let writer = self.writer.clone();
        let written = tokio::spawn(async move { writer.lock().await.write_all(&line).await })
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
        if written.is_err() {
            self.routes.lock().unwrap().starts.remove(&request.req);
            return Err(Sent::No);
        }
        rx.await.map_err(|_| Sent::Yes)
    }
}

fn route(routes: &Mutex<Routes>, reply: Reply) {
    let mut routes = routes.lock().unwrap();
    match reply {
        Reply::Started { req, pid, moved_in } => {
            if moved_in {
                // Forked outside its leaf and moved in: a wait for the cgroup lock per start.
                metrics::counter!("jobrelay_client_cgroup_moves_total").increment(1);
            }
            let (tx, rx) = oneshot::channel();
            routes.ends.insert(pid, tx);
            let delivered = match routes.starts.remove(&req) {
                Some(waiter) => waiter.send(Ok(Started { pid, ended: rx })).is_ok(),
                None => false,
            };
            if !delivered {
                // Nobody will follow it (its start was given up): it must not run untracked.
                routes.ends.remove(&pid);
                crate::process::kill_leftovers(pid);
            }
        }
        Reply::Failed { req, error } => {
            if let Some(waiter) = routes.starts.remove(&req) {
                let _ = waiter.send(Err(error));
            }
        }
        Reply::Ended { pid, code, signal } => {
            let status = match (code, signal) {
                (Some(code), _) => ExitStatus::from_raw((code & 0xff) << 8),
                (None, Some(signal)) => ExitStatus::from_raw(signal & 0x7f),
                (None, None) => ExitStatus::from_raw(127 << 8),
            };
            if let Some(waiter) = routes.ends.remove(&pid) {
                let _ = waiter.send(status);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_replies_reach_the_pid_registered_by_started() {
        let routes = Mutex::new(Routes {
            open: true,
            ..Routes::default()
        });
        let (tx, mut rx) = oneshot::channel();
        routes.lock().unwrap().starts.insert(5, tx);
        route(
            &routes,
            Reply::Started {
                req: 5,
                pid: 77,
                moved_in: false,
            },
        );
        let mut started = rx.try_recv().unwrap().unwrap();
        assert_eq!(started.pid, 77);
        // An "ended" that comes before anyone waits on it is kept in its channel.
        route(
            &routes,
            Reply::Ended {
                pid: 77,
                code: Some(3),
                signal: None,
            },
        );
        assert_eq!(started.ended.try_recv().unwrap().code(), Some(3));
        let (tx, mut rx) = oneshot::channel();
        routes.lock().unwrap().starts.insert(6, tx);
        route(
            &routes,
            Reply::Started {
                req: 6,
                pid: 78,
                moved_in: true,
            },
        );
        let mut started = rx.try_recv().unwrap().unwrap();
        route(
            &routes,
            Reply::Ended {
                pid: 78,
                code: None,
                signal: Some(9),
            },
        );
        assert_eq!(started.ended.try_recv().unwrap().signal(), Some(9));
        assert!(routes.lock().unwrap().ends.is_empty());
    }
}
