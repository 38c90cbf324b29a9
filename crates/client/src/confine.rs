//! What keeps a local payload in its box: the unprivileged user it runs as (`--run-as`), its
//! resource limits (`setrlimit` before `exec`), and the bubblewrap sandbox (`--sandbox`: no
//! network, a private /tmp, a read-only view of the system with only its work directory
//! writable, the client's data directory hidden).
//!
//! The payload supervisor (`supervisor`) applies this: it runs the command [`launch`] gives,
//! as its user and with its limits.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use jobrelay_common::protocol::RUN_SCRIPT;
use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::Uid;
use tokio::process::Command;

use serde::{Deserialize, Serialize};

/// The unprivileged account payloads run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// Looks a user up by name or number; refuses root.
    pub fn lookup(user: &str) -> anyhow::Result<Self> {
        let found = match user.parse::<u32>() {
            Ok(uid) => nix::unistd::User::from_uid(Uid::from_raw(uid))?,
            Err(_) => nix::unistd::User::from_name(user)?,
        };
        let Some(found) = found else {
            anyhow::bail!("--run-as: no user {user:?} on this system");
        };
        if found.uid.is_root() {
            anyhow::bail!("--run-as: {user:?} is root; give an unprivileged user");
        }
        Ok(RunAs {
            name: found.name,
            uid: found.uid.as_raw(),
            gid: found.gid.as_raw(),
        })
    }
}

/// Resource limits of every payload process (hard limits, so a payload cannot raise them;
/// for CPU time the hard limit is one second past the soft one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Bytes of virtual memory (RLIMIT_AS): allocations past it fail.
    pub address_space: Option<u64>,
    /// Seconds of CPU time per process (RLIMIT_CPU): SIGXCPU, then SIGKILL a second later.
    pub cpu_seconds: Option<u64>,
    /// Processes of the payload's user (RLIMIT_NPROC; counted per user, and not enforced for
    /// root: use it with `--run-as`).
    pub processes: Option<u64>,
    /// Bytes one file may grow to (RLIMIT_FSIZE): SIGXFSZ.
    pub file_size: Option<u64>,
    /// Open file descriptors per process (RLIMIT_NOFILE).
    pub open_files: Option<u64>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }

    fn each(&self) -> [(Resource, Option<u64>); 5] {
        [
            (Resource::RLIMIT_AS, self.address_space),
            (Resource::RLIMIT_CPU, self.cpu_seconds),
            (Resource::RLIMIT_NPROC, self.processes),
            (Resource::RLIMIT_FSIZE, self.file_size),
            (Resource::RLIMIT_NOFILE, self.open_files),
        ]
    }
}

/// How the local executor confines payloads. The default confines nothing (as before).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Confinement {
    pub run_as: Option<RunAs>,
    pub limits: Limits,
    /// Run inside bubblewrap. Needs `bwrap` (checked at start by [`check_sandbox`]).
    pub sandbox: bool,
}

impl Confinement {
    pub fn is_none(&self) -> bool {
        self.run_as.is_none() && self.limits.is_empty() && !self.sandbox
    }
}

/// Checks at start that bubblewrap exists and can make its namespaces here, so that
/// `--sandbox` fails at once with a clear error instead of failing every payload.
/// With `run_as`, also that `setpriv` (util-linux) can become that user inside it.
pub async fn check_sandbox(run_as: Option<&RunAs>) -> anyhow::Result<()> {
    let mut command = Command::new("bwrap");
    command.args([
        "--die-with-parent",
        "--cap-drop",
        "ALL",
        "--unshare-net",
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
    ]);
    match run_as {
        Some(run_as) => command
            .args(["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--"])
            .arg("setpriv")
            .arg(format!("--reuid={}", run_as.uid))
            .arg(format!("--regid={}", run_as.gid))
            .args(["--clear-groups", "--", "true"]),
        None => command.args(["--", "true"]),
    };
    let output = command.stdin(Stdio::null()).output().await;
    match output {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "--sandbox needs bubblewrap (`bwrap`), which is not installed \
             (Debian/Ubuntu: apt-get install bubblewrap)"
        ),
        Err(e) => anyhow::bail!("--sandbox: cannot run bwrap: {e}"),
        Ok(out) if !out.status.success() => anyhow::bail!(
            "--sandbox: bwrap cannot make a sandbox here ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Ok(_) => Ok(()),
    }
}

/// Prepares the data directory at start for payloads running as `run_as`: the records and
/// uploads in flight become private to the client (0700), and every directory on the way to
/// the work directories must let the user pass (x), or the payloads could not start.
pub fn prepare_data_dir(data_dir: &Path, run_as: &RunAs) -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    for private in ["payloads", "staging"] {
        let dir = data_dir.join(private);
        if dir.is_dir() {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    let work = data_dir.join("work");
    std::fs::create_dir_all(&work)?;
    // Others may enter the work directory but not list it.
    std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o711))?;
    for dir in work.ancestors() {
        let meta = std::fs::metadata(dir)?;
        let mode = meta.mode();
        let passable = mode & 0o001 != 0
            || (meta.uid() == run_as.uid && mode & 0o100 != 0)
            || (meta.gid() == run_as.gid && mode & 0o010 != 0);
        if !passable {
            anyhow::bail!(
                "--run-as {}: the user cannot reach the work directories, since {} is not \
                 searchable by it (mode {:o}); give it o+x (e.g. chmod o+x {})",
                run_as.name,
                dir.display(),
                mode & 0o7777,
                dir.display()
            );
        }
    }
    Ok(())
}

/// Gives a payload's work directory (and everything in it: the uploaded files, the output
/// files) to the user it runs as, private to that user. Symbolic links are not followed.
fn give_work_dir(dir: &Path, run_as: &RunAs) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let (uid, gid) = (Some(run_as.uid), Some(run_as.gid));
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        std::os::unix::fs::lchown(&path, uid, gid)?;
        if std::fs::symlink_metadata(&path)?.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// The data directory that holds `work_dir` (`<data>/work/<id>`), hidden in the sandbox.
fn data_dir_of(work_dir: &Path) -> Option<PathBuf> {
    Some(work_dir.parent()?.parent()?.to_path_buf())
}

/// What runs a payload under its confinement: the command line, the environment it adds,
/// the user and the limits. The payload supervisor (`supervisor`) applies it.
#[derive(Debug, Clone)]
pub struct Launch {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// (uid, gid) the supervisor switches to before `exec` (without the sandbox; inside it
    /// `setpriv` does).
    pub run_as: Option<(u32, u32)>,
    pub limits: Limits,
}

/// How to run `bash run.sh` in `dir` under `confinement` (gives the work directory to the
/// `--run-as` user first). The caller sets the directory, stdio, the marker and the group.
pub fn launch(dir: &Path, confinement: &Confinement) -> std::io::Result<Launch> {
    if let Some(run_as) = &confinement.run_as {
        give_work_dir(dir, run_as)?;
    }
    let strings = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut run_as_ids = None;
    let argv = if confinement.sandbox {
        let dir_text = dir.to_string_lossy().into_owned();
        // As root bwrap would leave the payload every capability: drop them all.
        let mut c = strings(&["bwrap", "--die-with-parent", "--unshare-net"]);
        c.extend(strings(&["--cap-drop", "ALL", "--ro-bind", "/", "/"]));
        c.extend(strings(&["--dev", "/dev", "--proc", "/proc"]));
        c.extend(strings(&["--perms", "1777", "--tmpfs", "/tmp"]));
        if let Some(data) = data_dir_of(dir) {
            // Other payloads' directories and the client's records stay out of sight.
            c.push("--tmpfs".into());
            c.push(data.to_string_lossy().into_owned());
        }
        c.extend(["--bind".into(), dir_text.clone(), dir_text.clone()]);
        c.extend(["--chdir".into(), dir_text]);
        match &confinement.run_as {
            // bwrap runs as root (it needs no user namespaces then) and keeps only what it
            // needs to enter the user's private work directory (DAC_READ_SEARCH) and what
            // `setpriv` needs to become the user (SETUID, SETGID); the change of user clears
            // all three (all uids become non-zero).
            Some(run_as) => {
                c.extend(strings(&[
                    "--cap-add",
                    "CAP_SETUID",
                    "--cap-add",
                    "CAP_SETGID",
                ]));
                c.extend(strings(&[
                    "--cap-add",
                    "CAP_DAC_READ_SEARCH",
                    "--",
                    "setpriv",
                ]));
                c.push(format!("--reuid={}", run_as.uid));
                c.push(format!("--regid={}", run_as.gid));
                c.extend(strings(&["--clear-groups", "--inh-caps=-all", "--"]));
                c.extend(strings(&["bash", RUN_SCRIPT]));
            }
            None => c.extend(strings(&["--", "bash", RUN_SCRIPT])),
        }
        c
    } else {
        run_as_ids = confinement.run_as.as_ref().map(|r| (r.uid, r.gid));
        strings(&["bash", RUN_SCRIPT])
    };
    let mut env = Vec::new();
    if let Some(run_as) = &confinement.run_as {
        env.push(("HOME".into(), dir.to_string_lossy().into_owned()));
        env.push(("USER".into(), run_as.name.clone()));
        env.push(("LOGNAME".into(), run_as.name.clone()));
    }
    Ok(Launch {
        argv,
        env,
        run_as: run_as_ids,
        limits: confinement.limits,
    })
}

/// Sets `limits` on the calling process (in the payload, between fork and exec): hard limits,
/// and for CPU time SIGXCPU at the limit (a job may catch it and stop cleanly), SIGKILL one
/// second later. Async-signal-safe: it only calls setrlimit and allocates nothing.
pub fn apply_limits(limits: Limits) -> std::io::Result<()> {
    for (resource, value) in limits.each() {
        if let Some(value) = value {
            let hard = match resource {
                Resource::RLIMIT_CPU => value.saturating_add(1),
                _ => value,
            };
            setrlimit(resource, value, hard)?;
        }
    }
    Ok(())
}

/// True when this process may change user (root), for `--run-as`.
pub fn can_change_user() -> bool {
    Uid::effective().is_root()
}
