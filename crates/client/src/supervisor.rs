//! The payload supervisor: a small process between the client and `run.sh` that outlives a
//! client killed with `kill -9`, so that a restarted client learns how the run actually ended
//! instead of guessing.
//!
//! Where payloads get cgroups of their own, the client's fork server (`forkserver`, started
//! once per client process as `/proc/self/exe` with [`ARG`] and `--spawner`) forks each
//! supervisor, which then runs [`supervise_forked`] (no exec); without cgroups the client
//! starts `/proc/self/exe` (the `jobrelay` binary, even if it was replaced on disk since)
//! with [`ARG`] and a JSON [`Spec`] per payload. Either way the supervisor joins the payload's cgroup
//! and its v1 memory cgroup (if any), starts the payload as the spec says (user, resource limits, command), waits for
//! it and records its exit status, in one write naming the payload, in the spec's exit file in
//! the data directory (out of the payload's reach: `runs/`, private to the client, hidden by
//! the sandbox; a file reused across payloads, see `exits`), then
//! ends the same way as the payload (same code, or the same signal), so the client sees the
//! payload's own status. It ignores SIGTERM, SIGINT and SIGHUP (the payload gets them back
//! to their defaults), so stopping the payload's group does not lose the status; SIGKILL of
//! the group ends it too.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::confine::{self, Limits};

/// First argument that turns `jobrelay` into a payload supervisor.
pub const ARG: &str = "__jobrelay-payload-supervisor";

/// What the supervisor runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    pub exit_file: PathBuf,
    /// The payload whose end is recorded in `exit_file`, named in the record (`exits`: a slot
    /// file is reused by later payloads).
    #[serde(default)]
    pub payload: Option<u64>,
    /// Which run of that payload id this is (its record's `created_ms`), named in the record
    /// too: a client whose records were wiped or restored gives an id again, and the end of
    /// an orphaned earlier run under that id must not count for the new one.
    #[serde(default)]
    pub run: Option<u64>,
    /// The payload's cgroup, joined before the payload starts.
    pub cgroup: Option<PathBuf>,
    /// The payload's cgroup v1 memory cgroup (`memcg`), joined too.
    #[serde(default)]
    pub memory_cgroup: Option<PathBuf>,
    /// (uid, gid) to run the payload as (supplementary groups are dropped).
    pub run_as: Option<(u32, u32)>,
    pub limits: Limits,
    pub argv: Vec<String>,
    /// Environment the payload gets on top of the supervisor's own: set by the fork server's
    /// supervisors, whose own environment is the fork server's (the exec'd supervisor gets
    /// it as its own environment instead, so this is empty then).
    #[serde(default)]
    pub env: Vec<(String, String)>,
}

/// How a run ended, as the exit file records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    pub fn parts(self) -> (Option<i32>, Option<i32>) {
        match self {
            Exit::Code(code) => (Some(code), None),
            Exit::Signal(signal) => (None, Some(signal)),
        }
    }

    fn text(self) -> String {
        match self {
            Exit::Code(code) => format!("code {code}\n"),
            Exit::Signal(signal) => format!("signal {signal}\n"),
        }
    }

    fn parse(text: &str) -> Option<Exit> {
        let (kind, value) = text.trim().split_once(' ')?;
        let value = value.parse().ok()?;
        match kind {
            "code" => Some(Exit::Code(value)),
            "signal" => Some(Exit::Signal(value)),
            _ => None,
        }
    }
}

/// Length of an exit record: each is padded to it, so one overwrites the last in full (the
/// longest, `payload <u64> run <u64> signal <i32>`, is 65 bytes).
const RECORD_LEN: usize = 96;

/// The recorded end of payload `id`'s run in `path`, if its supervisor wrote one there: a
/// record that names `id` (`payload <id> run <run> code 0`) and, when both sides know it, the
/// same `run`; one without a run (`payload <id> code 0`, an earlier version's supervisor); or
/// one of the oldest form without an id (`code 0`) in a file named by `id` alone.
pub fn read_exit(path: &Path, id: u64, run: Option<u64>) -> Option<Exit> {
    let text = std::fs::read_to_string(path).ok()?;
    let record = parse_record(&text)?;
    match record.payload {
        Some(named) => {
            let same_run = match (record.run, run) {
                (Some(theirs), Some(ours)) => theirs == ours,
                _ => true,
            };
            (named == id && same_run).then_some(record.exit)
        }
        None => {
            let own = path.file_name()? == std::ffi::OsStr::new(&id.to_string());
            own.then_some(record.exit)
        }
    }
}

/// The payload a record in `path` names, if it names one.
pub fn recorded_payload(path: &Path) -> Option<u64> {
    parse_record(&std::fs::read_to_string(path).ok()?)?.payload
}

struct Record {
    payload: Option<u64>,
    run: Option<u64>,
    exit: Exit,
}

fn parse_record(text: &str) -> Option<Record> {
    let text = text.trim();
    let Some(rest) = text.strip_prefix("payload ") else {
        return Some(Record {
            payload: None,
            run: None,
            exit: Exit::parse(text)?,
        });
    };
    let (id, rest) = rest.split_once(' ')?;
    let payload = Some(id.parse().ok()?);
    let (run, exit) = match rest.strip_prefix("run ") {
        Some(rest) => {
            let (run, exit) = rest.split_once(' ')?;
            (Some(run.parse().ok()?), exit)
        }
        None => (None, rest),
    };
    Some(Record {
        payload,
        run,
        exit: Exit::parse(exit)?,
    })
}

/// Records `exit` of payload `id` in `path`: one write at its start, of a record padded to
/// [`RECORD_LEN`], into the file as it is (made only if missing): no new file for a slot used
/// before (`exits`). A write cut short by a crash cannot be half a record: it is one `write`
/// of less than a page.
pub fn write_exit(
    path: &Path,
    id: Option<u64>,
    run: Option<u64>,
    exit: Exit,
) -> std::io::Result<()> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let exit_text = exit.text();
    let exit_text = exit_text.trim_end();
    let mut record = match (id, run) {
        (Some(id), Some(run)) => format!("payload {id} run {run} {exit_text}"),
        (Some(id), None) => format!("payload {id} {exit_text}"),
        (None, _) => exit_text.to_owned(),
    };
    let pad = RECORD_LEN.saturating_sub(record.len() + 1);
    record.extend(std::iter::repeat_n(' ', pad));
    record.push('\n');
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        // Kept: a slot's earlier record is overwritten in full by this one, of the same
        // length, in one write (truncating first would leave an empty file in between).
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    file.write_all_at(record.as_bytes(), 0)
}

/// In `main`, before anything else: runs the supervisor if the process was started as one,
/// and returns its exit code.
pub fn run_if_invoked() -> Option<i32> {
    let mut args = std::env::args_os().skip(1);
    if args.next()? != ARG {
        return None;
    }
    let second = args.next();
    if second.as_deref() == Some(std::ffi::OsStr::new(crate::forkserver::SPAWNER_ARG)) {
        return Some(crate::forkserver::serve());
    }
    let spec = second.and_then(|a| serde_json::from_slice::<Spec>(a.as_encoded_bytes()).ok());
    Some(match spec {
        Some(spec) if !spec.argv.is_empty() => supervise(&spec),
        _ => {
            eprintln!("jobrelay: {ARG} needs a JSON spec");
            127
        }
    })
}

const DEFERRED: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn supervise(spec: &Spec) -> i32 {
    if let Err(e) = join(spec) {
        eprintln!("jobrelay: {e}");
        return 127;
    }
    supervise_forked(spec)
}

/// Joins the payload's cgroup and its v1 memory cgroup, if the spec has them.
pub fn join(spec: &Spec) -> Result<(), String> {
    if let Some(leaf) = &spec.cgroup {
        crate::cgroup::join(leaf).map_err(|e| format!("cannot join the payload's cgroup: {e}"))?;
    }
    join_memory(spec)
}

/// Joins the payload's v1 memory cgroup, if the spec has one.
pub fn join_memory(spec: &Spec) -> Result<(), String> {
    if let Some(dir) = &spec.memory_cgroup {
        crate::memcg::join_v1(dir)
            .map_err(|e| format!("cannot join the payload's memory cgroup: {e}"))?;
    }
    Ok(())
}

/// The supervisor's work once it is in its cgroups (the fork server's child calls it after
/// [`join`], with its stdio, directory and group in place): runs the payload, records its
/// end and returns its code (or ends by its signal).
pub fn supervise_forked(spec: &Spec) -> i32 {
    // Caught by a handler that does nothing, not ignored: an ignored disposition (and a
    // blocked signal) would pass to the payload through exec, a caught one is reset to the
    // default there. So the payload needs no step of ours between fork and exec unless it
    // has limits, and std then starts it with `posix_spawn` (a vfork: no copy of this
    // process's memory, issue 18) where it can.
    for signal in DEFERRED {
        catch_and_do_nothing(signal);
    }
    // std's fork path empties the child's signal mask, `posix_spawn` passes this one on:
    // empty it here, so the payload never starts with a signal blocked by an ancestor.
    unblock_all_signals();
    let mut command = std::process::Command::new(&spec.argv[0]);
    command.args(&spec.argv[1..]);
    command.envs(spec.env.iter().map(|(k, v)| (k, v)));
    if let Some((uid, gid)) = spec.run_as {
        // std drops the supplementary groups (setgroups) when it changes user from root.
        command.uid(uid).gid(gid);
    }
    let limits = spec.limits;
    if !limits.is_empty() {
        // SAFETY: runs in the child between fork and exec; setrlimit is async-signal-safe
        // and nothing allocates.
        unsafe {
            command.pre_exec(move || confine::apply_limits(limits));
        }
    }
    let exit = match command.status() {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code(code),
            (None, Some(signal)) => Exit::Signal(signal),
            (None, None) => Exit::Code(127),
        },
        Err(e) => {
            eprintln!("jobrelay: cannot start {}: {e}", spec.argv[0]);
            Exit::Code(127)
        }
    };
    if let Err(e) = write_exit(&spec.exit_file, spec.payload, spec.run, exit) {
        // The client then goes by this process's own status (or, after a restart, finds
        // nothing recorded: the run counts as interrupted).
        eprintln!("jobrelay: cannot record how run.sh ended: {e}");
    }
    match exit {
        Exit::Code(code) => code,
        Exit::Signal(signal) => {
            // No core file of the supervisor in the job's directory (it would ship in the
            // results): the payload's own core, if any, is already there.
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: setting a limit of this process, restoring the default disposition and
            // raising a signal.
            unsafe {
                libc::setrlimit(libc::RLIMIT_CORE, &no_core);
                libc::signal(signal, libc::SIG_DFL);
                libc::raise(signal);
            }
            128 + signal
        }
    }
}

/// Empties this thread's signal mask.
fn unblock_all_signals() {
    // SAFETY: a sigset_t is plain data that sigemptyset initialises; pthread_sigmask is
    // given a valid pointer to it.
    unsafe {
        let mut none = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
}

/// Gives `signal` a handler that does nothing (restarting the calls it interrupts).
fn catch_and_do_nothing(signal: libc::c_int) {
    extern "C" fn nothing(_: libc::c_int) {}
    // SAFETY: a sigaction is plain data, zeroed then filled; the handler is a function that
    // does nothing, so it is async-signal-safe.
    unsafe {
        let mut action = std::mem::zeroed::<libc::sigaction>();
        action.sa_sigaction = nothing as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(signal, &action, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_records_round_trip_and_garbage_is_none() {
        for exit in [Exit::Code(0), Exit::Code(3), Exit::Signal(9)] {
            assert_eq!(Exit::parse(&exit.text()), Some(exit));
        }
        for bad in ["", "code", "code x", "signal 9 9", "exit 1"] {
            assert_eq!(Exit::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_record_counts_only_for_the_payload_it_names_and_overwrites_a_longer_one() {
        let dir = tempfile::tempdir().unwrap();
        let slot = dir.path().join("s1");
        write_exit(&slot, Some(123_456_789), None, Exit::Signal(15)).unwrap();
        write_exit(&slot, Some(1), None, Exit::Code(0)).unwrap();
        assert_eq!(std::fs::metadata(&slot).unwrap().len(), RECORD_LEN as u64);
        assert_eq!(read_exit(&slot, 1, None), Some(Exit::Code(0)));
        assert_eq!(read_exit(&slot, 123_456_789, None), None);
        assert_eq!(recorded_payload(&slot), Some(1));
        // The older form, without an id, only in a file named by the payload's id.
        let own = dir.path().join("7");
        write_exit(&own, None, None, Exit::Code(2)).unwrap();
        assert_eq!(read_exit(&own, 7, None), Some(Exit::Code(2)));
        assert_eq!(read_exit(&own, 8, None), None);
        std::fs::write(&slot, "code 3\n").unwrap();
        assert_eq!(read_exit(&slot, 1, None), None);
        std::fs::write(&slot, "payload x code 3\n").unwrap();
        assert_eq!(read_exit(&slot, 1, None), None);
    }

    #[test]
    fn a_record_of_another_run_under_the_same_id_does_not_count() {
        let dir = tempfile::tempdir().unwrap();
        let slot = dir.path().join("s1");
        // An orphan of a wiped client's earlier payload 1 records its end.
        write_exit(&slot, Some(1), Some(1_000), Exit::Code(1)).unwrap();
        assert_eq!(read_exit(&slot, 1, Some(2_000)), None, "not this run's end");
        assert_eq!(read_exit(&slot, 1, Some(1_000)), Some(Exit::Code(1)));
        // A reader that does not know the run, and a record of an earlier supervisor that
        // does not name one, go by the id alone.
        assert_eq!(read_exit(&slot, 1, None), Some(Exit::Code(1)));
        write_exit(&slot, Some(1), None, Exit::Code(0)).unwrap();
        assert_eq!(read_exit(&slot, 1, Some(2_000)), Some(Exit::Code(0)));
        // The longest record still fits, and a shorter one overwrites it in full.
        write_exit(
            &slot,
            Some(u64::MAX),
            Some(u64::MAX),
            Exit::Signal(i32::MIN),
        )
        .unwrap();
        write_exit(&slot, Some(2), Some(3), Exit::Code(0)).unwrap();
        assert_eq!(std::fs::metadata(&slot).unwrap().len(), RECORD_LEN as u64);
        assert_eq!(read_exit(&slot, 2, Some(3)), Some(Exit::Code(0)));
    }
}
