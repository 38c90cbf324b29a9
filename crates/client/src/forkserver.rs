//! The payload fork server ("spawner"): one small, single-threaded helper process per client
//! process that forks each payload's supervisor without an exec, so a payload no longer costs
//! an exec of the 25 MB `jobrelay` binary (kernel exec, page faults, ld.so's relocations:
//! about 1.9 ms of CPU per trivial job, BENCHMARKS.md).
//!
//! The client (`spawner`) posix_spawns `/proc/self/exe __jobrelay-payload-supervisor
//! --spawner` in a process group of its own, with one end of a Unix socket pair as its stdin.
//! `main` branches here (`supervisor::run_if_invoked`) before any runtime or thread exists,
//! so forking it is safe: no other thread can hold a lock the child would need. Its argv[1]
//! is the supervisor's argument, so the supervisors it forks (same binary, same argv) pass
//! `process::Tracker::supervisor_alive`'s identity check as the exec'd ones do.
//!
//! Protocol, newline-delimited JSON on that socket:
//! - client → spawner: [`Start`] `{"req", "dir", "stdout", "stderr", "spec"}`: the
//!   supervisor's `Spec`, whose `env` holds what the exec path sets on the supervisor itself
//!   (the launch environment, the allotment's, the `JOBRELAY_PAYLOAD` marker).
//! - spawner → client ([`Reply`]): `{"reply":"started","req","pid","moved_in"}` once the
//!   forked supervisor is in its process group (its pid), its cgroup leaf and memory cgroup, with
//!   its logs open as stdout/stderr, stdin /dev/null, in the work directory; or
//!   `{"reply":"failed","req","error"}` (the child told why, exited 127 and was reaped; or
//!   it was not in place within 30 s, `JOBRELAY_SPAWNER_PLACE_TIMEOUT_MS`, and was killed);
//!   then `{"reply":"ended","pid","code"|"signal"}` when that supervisor ends (it ends as the
//!   payload did).
//!
//! A supervisor with a cgroup leaf is forked straight into it (`clone3` with
//! `CLONE_INTO_CGROUP`, Linux 5.7), not moved there after the fork by a write to
//! `cgroup.procs`: such a move takes the cgroup threadgroup lock for writing, which waits for
//! an RCU grace period, 5–20 ms on an idle machine and about 1 ms back to back (BENCHMARKS.md),
//! and the fork server waits for it before the next start. Where the kernel refuses (older
//! kernel, a leaf that is no cgroup v2 directory), it forks and the child moves itself in as
//! before; `moved_in` says which, and the client counts those
//! (`jobrelay_client_cgroup_moves_total`).
//!
//! The child reports over a close-on-exec pipe, and the spawner answers only after it said it
//! is in place: a client killed at any point after "started" finds the supervisor in the
//! leaf after a restart, as with the exec path. The child then runs the same supervisor code
//! (`supervisor::supervise_forked`) and `_exit`s with the payload's code (or raises its
//! signal). The spawner reaps its children on SIGCHLD (a signalfd, beside the socket in one
//! `poll`). On EOF of the socket (the client is gone) it exits at once; the supervisors are
//! re-parented and go on, and write their exit records, as after a client `kill -9`.
//!
//! A forked supervisor's `/proc/PID/environ` is the spawner's: it does not carry the payload's
//! marker (bash and everything below it does). So the client uses the fork server only where
//! payloads have cgroup leaves, which is where a restarted client looks for the supervisor.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::supervisor::{self, Spec};

/// Second argument (after `supervisor::ARG`) that makes `jobrelay` a fork server.
pub const SPAWNER_ARG: &str = "--spawner";

/// A request to start one payload's supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Start {
    pub req: u64,
    /// The work directory, the payload's current directory.
    pub dir: PathBuf,
    /// Its log files, made (empty) by the client, opened here without following a link.
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    pub spec: Spec,
}

/// What the fork server says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "lowercase")]
pub enum Reply {
    Started {
        req: u64,
        pid: u32,
        /// It was forked outside its cgroup and moved in by a write to `cgroup.procs` (the
        /// kernel could not fork it straight in).
        #[serde(default)]
        moved_in: bool,
    },
    Failed {
        req: u64,
        error: String,
    },
    Ended {
        pid: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<i32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
    },
}

/// Longest a line the fork server accepts (a spec is a few KiB).
const MAX_LINE: usize = 1 << 20;

/// The fork server's loop, on stdin (fd 0). Returns its exit code.
pub fn serve() -> i32 {
    // SAFETY: plain libc calls on this single-threaded process; every buffer is ours.
    unsafe {
        let mut chld: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut chld);
        libc::sigaddset(&mut chld, libc::SIGCHLD);
        if libc::sigprocmask(libc::SIG_BLOCK, &chld, &mut old) != 0 {
            eprintln!(
                "jobrelay spawner: sigprocmask: {}",
                std::io::Error::last_os_error()
            );
            return 1;
        }
        let sfd = libc::signalfd(-1, &chld, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if sfd < 0 {
            eprintln!(
                "jobrelay spawner: signalfd: {}",
                std::io::Error::last_os_error()
            );
            return 1;
        }
        let place_timeout_ms = std::env::var(PLACE_TIMEOUT_VAR)
            .ok()
            .and_then(|v| v.parse::<libc::c_int>().ok())
            .filter(|ms| *ms > 0)
            .unwrap_or(PLACE_TIMEOUT_MS);
        let server = Server {
            sfd,
            old_mask: old,
            place_timeout_ms,
        };
        server.run()
    }
}

struct Server {
    sfd: libc::c_int,
    old_mask: libc::sigset_t,
    /// Longest a forked child may take to say it is in place.
    place_timeout_ms: libc::c_int,
}

/// Longest a forked supervisor may take to get in place (join its cgroups, open its logs,
/// enter its work directory: milliseconds, unless a file system hangs) before the fork server
/// kills it and answers "failed": one stuck child must not stop every later payload's start.
const PLACE_TIMEOUT_MS: libc::c_int = 30_000;

/// Overrides [`PLACE_TIMEOUT_MS`] (milliseconds), for the fork server's process.
pub const PLACE_TIMEOUT_VAR: &str = "JOBRELAY_SPAWNER_PLACE_TIMEOUT_MS";

impl Server {
    fn run(&self) -> i32 {
        let mut pending: Vec<u8> = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: 0,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.sfd,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // A second's timeout as a backstop: children are reaped at every wake.
            // SAFETY: fds is a valid array of two pollfd.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
            if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return 1;
            }
            if fds[1].revents != 0 {
                self.drain_signals();
            }
            if !self.reap() {
                return 0;
            }
            if fds[0].revents == 0 {
                continue;
            }
            // SAFETY: reading into our own buffer.
            let got = unsafe { libc::read(0, chunk.as_mut_ptr().cast(), chunk.len()) };
            if got == 0 {
                // The client is gone: its supervisors go on without us.
                return 0;
            }
            if got < 0 {
                match std::io::Error::last_os_error().kind() {
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock => continue,
                    _ => return 0,
                }
            }
            pending.extend_from_slice(&chunk[..got as usize]);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let reply = self.start(&line[..line.len() - 1]);
                if !send(&reply) {
                    return 0;
                }
            }
            if pending.len() > MAX_LINE {
                eprintln!("jobrelay spawner: a request line past {MAX_LINE} bytes");
                return 1;
            }
        }
    }

    fn drain_signals(&self) {
        let mut info = [0u8; 128];
        // SAFETY: reading signalfd_siginfo records into our own buffer until EAGAIN.
        while unsafe { libc::read(self.sfd, info.as_mut_ptr().cast(), info.len()) } > 0 {}
    }

    /// Reaps every ended child and says so. False when the client is gone.
    fn reap(&self) -> bool {
        loop {
            let mut status = 0;
            // SAFETY: waitpid on our own children.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return true;
            }
            let (code, signal) = if libc::WIFEXITED(status) {
                (Some(libc::WEXITSTATUS(status)), None)
            } else if libc::WIFSIGNALED(status) {
                (None, Some(libc::WTERMSIG(status)))
            } else {
                continue;
            };
            if !send(&Reply::Ended {
                pid: pid as u32,
                code,
                signal,
            }) {
                return false;
            }
        }
    }

    /// Forks the supervisor of one request and waits until it is in place (or failed).
    fn start(&self, line: &[u8]) -> Reply {
        let start = match serde_json::from_slice::<Start>(line) {
            Ok(start) => start,
            Err(e) => {
                let req = serde_json::from_slice::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v.get("req")?.as_u64())
                    .unwrap_or(0);
                return Reply::Failed {
                    req,
                    error: format!("bad start request: {e}"),
                };
            }
        };
        let req = start.req;
        if start.spec.argv.is_empty() {
            return Reply::Failed {
                req,
                error: "no command to run".into(),
            };
        }
        let mut ends = [0 as libc::c_int; 2];
        // SAFETY: pipe2 fills the array on success.
        if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Reply::Failed {
                req,
                error: format!("pipe: {}", std::io::Error::last_os_error()),
            };
        }
        // SAFETY: both fds were just made and are ours alone.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
        let (pid, in_leaf) = fork_into(start.spec.cgroup.as_deref());
        if pid < 0 {
            return Reply::Failed {
                req,
                error: format!("fork: {}", std::io::Error::last_os_error()),
            };
        }
        if pid == 0 {
            drop(read_end);
            self.child(&start, in_leaf, write_end);
        }
        drop(write_end);
        let Some(said) = read_report(read_end, self.place_timeout_ms) else {
            // Reaped by the loop later; its "ended" is for no payload the client follows.
            // SAFETY: kill of our own child, not yet reaped (so its pid is still its own).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return Reply::Failed {
                req,
                error: format!(
                    "the supervisor was not in place within {} ms (its cgroup, its logs or \
                     its work directory did not answer); killed",
                    self.place_timeout_ms
                ),
            };
        };
        if said == [0] {
            return Reply::Started {
                req,
                pid: pid as u32,
                moved_in: start.spec.cgroup.is_some() && !in_leaf,
            };
        }
        // It exits at once after saying why: reap it here, before the loop could.
        let mut status = 0;
        // SAFETY: waitpid on our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let error = if said.is_empty() {
            "the supervisor ended before it was in place".to_owned()
        } else {
            String::from_utf8_lossy(&said).into_owned()
        };
        Reply::Failed { req, error }
    }

    /// In the forked child: puts itself in place, tells the parent, supervises. Never returns.
    fn child(&self, start: &Start, in_leaf: bool, report: OwnedFd) -> ! {
        // SAFETY: restoring the mask and closing our copy of the signalfd; setpgid on self.
        unsafe {
            libc::sigprocmask(libc::SIG_SETMASK, &self.old_mask, std::ptr::null_mut());
            libc::close(self.sfd);
            libc::setpgid(0, 0);
        }
        let mut report = std::fs::File::from(report);
        match in_place(start, in_leaf) {
            Ok(()) => {
                let _ = report.write_all(&[0]);
                drop(report);
                let code = supervisor::supervise_forked(&start.spec);
                // SAFETY: ends this process without running the parent's exit handlers.
                unsafe { libc::_exit(code) }
            }
            Err(why) => {
                let _ = report.write_all(why.as_bytes());
                drop(report);
                // SAFETY: as above.
                unsafe { libc::_exit(127) }
            }
        }
    }
}

/// What the child wrote on its report pipe until it closed it, or `None` past `timeout_ms`.
fn read_report(pipe: OwnedFd, timeout_ms: libc::c_int) -> Option<Vec<u8>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(timeout_ms as u64);
    let mut pipe = std::fs::File::from(pipe);
    let mut said = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return None;
        }
        let mut fd = libc::pollfd {
            fd: pipe.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut fd, 1, left.as_millis().max(1) as libc::c_int) };
        if ready < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Some(said);
        }
        if ready == 0 {
            continue;
        }
        match pipe.read(&mut chunk) {
            Ok(0) => return Some(said),
            Ok(n) => said.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Some(said),
        }
    }
}

/// `linux/sched.h` (libc's constant is an `c_int` it does not fit in).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Forks this single-threaded process: straight into the cgroup v2 directory `leaf` where the
/// kernel can (`clone3` with `CLONE_INTO_CGROUP`), else a plain `fork`. Returns what `fork`
/// does (0 in the child, -1 on failure) and whether the child starts in `leaf`.
fn fork_into(leaf: Option<&Path>) -> (libc::pid_t, bool) {
    // O_DIRECTORY: whatever is at that path, this open never waits (a FIFO would hold the
    // fork server itself, outside the child's place timeout).
    let open_dir = |leaf: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NONBLOCK)
            .open(leaf)
            .ok()
    };
    if let Some(dir) = leaf.and_then(open_dir) {
        // SAFETY: clone_args is plain data; all-zero is "no flags, no pointers".
        let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
        args.flags = CLONE_INTO_CGROUP;
        args.exit_signal = libc::SIGCHLD as u64;
        args.cgroup = dir.as_raw_fd() as u64;
        // SAFETY: clone3 without CLONE_VM is a fork: the child gets a copy of this process,
        // which has one thread, so it may do anything the parent may (as after `fork`). The
        // arguments are valid for the call. glibc's fork handlers do not run, and none is
        // needed: no other thread can hold a lock the child would take.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &mut args as *mut libc::clone_args,
                std::mem::size_of::<libc::clone_args>(),
            )
        } as libc::pid_t;
        // Closed in both: the child needs no handle on its cgroup.
        drop(dir);
        if pid >= 0 {
            return (pid, true);
        }
        // ENOSYS (before 5.3), E2BIG/EINVAL (before 5.7), EBADF (no cgroup v2 directory),
        // EBUSY/EOPNOTSUPP (not a leaf that takes processes): the fork and the write to
        // cgroup.procs below say what is wrong, if anything is.
    }
    // SAFETY: this process has one thread, so the child may do anything the parent may.
    (unsafe { libc::fork() }, false)
}

/// The child's steps before its payload may start: cgroups (the v2 leaf unless forked into
/// it), stdio, directory.
fn in_place(start: &Start, in_leaf: bool) -> Result<(), String> {
    if in_leaf {
        supervisor::join_memory(&start.spec)?;
    } else {
        supervisor::join(&start.spec)?;
    }
    let stdout = open_log(&start.stdout)?;
    let stderr = open_log(&start.stderr)?;
    let null = std::fs::File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
    for (fd, target) in [
        (null.as_raw_fd(), 0),
        (stdout.as_raw_fd(), 1),
        (stderr.as_raw_fd(), 2),
    ] {
        // SAFETY: dup2 onto the standard descriptors of this process (the socket, fd 0, goes).
        if unsafe { libc::dup2(fd, target) } < 0 {
            return Err(format!("dup2: {}", std::io::Error::last_os_error()));
        }
    }
    std::env::set_current_dir(&start.dir)
        .map_err(|e| format!("cannot enter {}: {e}", start.dir.display()))
}

/// Opens a log file the client made, without following a link and without waiting on a FIFO
/// put in its place; only a regular file is taken.
fn open_log(path: &Path) -> Result<std::fs::File, String> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let regular = file.metadata().is_ok_and(|m| m.is_file());
    if !regular {
        return Err(format!("{} is not a regular file", path.display()));
    }
    // SAFETY: fcntl on our own descriptor.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
    }
    Ok(file)
}

/// Writes one reply line to the client (fd 0, the socket). False when it is gone.
fn send(reply: &Reply) -> bool {
    let Ok(mut line) = serde_json::to_vec(reply) else {
        return false;
    };
    line.push(b'\n');
    let mut rest = &line[..];
    while !rest.is_empty() {
        // SAFETY: writing our own buffer to fd 0.
        let n = unsafe { libc::write(0, rest.as_ptr().cast(), rest.len()) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        rest = &rest[n as usize..];
    }
    true
}

#[cfg(test)]
mod tests {
    use super::Reply;

    #[test]
    fn replies_read_back_as_written() {
        for reply in [
            Reply::Started {
                req: 3,
                pid: 42,
                moved_in: true,
            },
            Reply::Failed {
                req: 4,
                error: "no".into(),
            },
            Reply::Ended {
                pid: 42,
                code: Some(3),
                signal: None,
            },
            Reply::Ended {
                pid: 42,
                code: None,
                signal: Some(9),
            },
        ] {
            let line = serde_json::to_string(&reply).unwrap();
            assert!(!line.contains('\n'));
            assert_eq!(serde_json::from_str::<Reply>(&line).unwrap(), reply);
        }
        let ended: Reply = serde_json::from_str(r#"{"reply":"ended","pid":7,"code":0}"#).unwrap();
        assert_eq!(
            ended,
            Reply::Ended {
                pid: 7,
                code: Some(0),
                signal: None
            }
        );
    }
}
