//! A bench stopped by SIGTERM or SIGINT takes its processes with it. The [`crate::procs::Proc`]
//! guards stop them when dropped, but a signal ends the bench without running a destructor:
//! servers, clients and HyperQueue's workers were left running. Here the whole tree below the
//! bench (read from `/proc`, since peers start processes of their own) gets SIGTERM, then
//! SIGKILL after a grace, before the bench exits with the signal's status.

use std::time::{Duration, Instant};

/// How long the processes get to stop on SIGTERM before SIGKILL.
const GRACE: Duration = Duration::from_secs(5);

/// Watches for SIGTERM and SIGINT on `runtime`.
pub fn stop_tree_on_signal(runtime: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let _entered = runtime.enter();
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    runtime.spawn(async move {
        let code = tokio::select! {
            _ = term.recv() => 128 + libc::SIGTERM,
            _ = interrupt.recv() => 128 + libc::SIGINT,
        };
        eprintln!("jobrelay-bench: stopping its processes");
        tokio::task::spawn_blocking(|| stop_tree(std::process::id()))
            .await
            .ok();
        std::process::exit(code);
    });
    Ok(())
}

/// SIGTERM to every process below `root`, then SIGKILL to those left after [`GRACE`].
fn stop_tree(root: u32) {
    let tree = descendants(root, &parents());
    signal_all(&tree, libc::SIGTERM);
    let deadline = Instant::now() + GRACE;
    while Instant::now() < deadline && tree.iter().any(|&pid| running(pid)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    signal_all(&tree, libc::SIGKILL);
}

fn signal_all(pids: &[u32], signal: i32) {
    for &pid in pids {
        if let Ok(pid) = i32::try_from(pid) {
            // SAFETY: kill(2) with a pid read from /proc; a pid gone meanwhile is ESRCH.
            unsafe { libc::kill(pid, signal) };
        }
    }
}

/// Every process's parent, from `/proc/<pid>/stat`.
fn parents() -> Vec<(u32, u32)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            Some((pid, parse_stat(&stat)?.1))
        })
        .collect()
}

/// The state and parent pid of a `/proc/<pid>/stat` line (the name in parentheses may hold
/// spaces and parentheses itself, so fields are read after its last `)`).
fn parse_stat(stat: &str) -> Option<(char, u32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    Some((state, parent))
}

/// The processes below `root` in `parents`, parents before children.
fn descendants(root: u32, parents: &[(u32, u32)]) -> Vec<u32> {
    let mut found = vec![root];
    let mut next = 0;
    while next < found.len() {
        let parent = found[next];
        found.extend(
            parents
                .iter()
                .filter(|&&(pid, ppid)| ppid == parent && pid != root)
                .map(|&(pid, _)| pid),
        );
        next += 1;
    }
    found.remove(0);
    found
}

/// Alive and not a zombie (a child of ours that exited stays a zombie until reaped).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| parse_stat(&stat))
        .is_some_and(|(state, _)| state != 'Z')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_is_read_after_the_names_last_parenthesis() {
        let stat = "4242 (a (weird) name) S 17 4242 4242 0 -1 4194560";
        assert_eq!(parse_stat(stat), Some(('S', 17)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn the_tree_below_a_process_is_its_descendants_only() {
        let parents = [
            (1, 0),
            (10, 1),
            (11, 10),
            (12, 10),
            (13, 12),
            (20, 1),
            (21, 20),
        ];
        assert_eq!(descendants(10, &parents), vec![11, 12, 13]);
        assert_eq!(descendants(13, &parents), Vec::<u32>::new());
    }

    #[test]
    fn a_real_child_and_grandchild_are_stopped() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 60 & wait"])
            .spawn()
            .unwrap();
        let me = std::process::id();
        let deadline = Instant::now() + Duration::from_secs(10);
        let tree = loop {
            let tree = descendants(child.id(), &parents());
            if !tree.is_empty() || Instant::now() > deadline {
                break tree;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(tree.len(), 1, "the sleep below the shell");
        assert!(descendants(me, &parents()).contains(&child.id()));
        stop_tree(child.id());
        assert!(!running(tree[0]), "the grandchild is stopped");
        // The shell, left out (it is the root), ends once its sleep is gone.
        child.wait().unwrap();
    }
}
