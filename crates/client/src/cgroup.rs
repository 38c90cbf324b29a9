//! A cgroup v2 per local payload, where the machine gives us one: every process a payload
//! starts stays in its cgroup whatever it does with sessions and process groups (`setsid`,
//! double forks), so `cgroup.kill` ends all of them and `cgroup.events` tells whether any is
//! left.
//!
//! Delegation: the client never touches cgroups it did not make. It finds its own cgroup
//! (`/proc/self/cgroup`, the `0::` line) on the cgroup2 mount (`/proc/self/mountinfo`),
//! makes one sub-tree there for this data directory (`jobrelay-<node id>`), and one leaf per
//! payload below it (`payload-<id>`). It enables no controller in its own cgroup, so the "no
//! internal processes" rule does not apply and the client may stay there; `memcg` may enable
//! `memory` in `jobrelay-<node>` (which holds no process) when it is delegated. Under systemd
//! give the unit `Delegate=yes` (deploy/systemd). Without a writable cgroup2 with
//! `cgroup.kill` (Linux 5.14) the client falls back to the environment marker (`process`).
//!
//! The files are few and plain (`cgroup.procs`, `cgroup.kill`, `cgroup.events`), written as
//! the kernel documents them; a crate would add more than it saves.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Set (to anything) to do without cgroups: the marker fallback, as on a machine without
/// cgroup v2 (the tests run both ways).
pub const DISABLE_VAR: &str = "JOBRELAY_NO_CGROUP";

/// The client's sub-tree of payload cgroups.
#[derive(Debug)]
pub struct CgroupTree {
    root: PathBuf,
}

impl CgroupTree {
    /// Finds or makes the sub-tree for data directory `node`, or says why there is none.
    pub fn detect(node: &str) -> Result<CgroupTree, String> {
        if std::env::var_os(DISABLE_VAR).is_some() {
            return Err(format!("disabled by {DISABLE_VAR}"));
        }
        let base = own_cgroup_dir()?;
        // The mount and /proc/self/cgroup may disagree (another cgroup namespace's view, a
        // host's hierarchy bind-mounted into a container): only a cgroup that holds this
        // process is ours, or the payloads' cgroups would be made outside the client's own
        // (and outside a container's limits).
        let me = std::process::id() as i32;
        if !pids(&base).contains(&me) {
            return Err(format!(
                "this process is not in {} (its cgroup.procs), so it is not its cgroup",
                base.display()
            ));
        }
        let root = base.join(format!("jobrelay-{node}"));
        let made = match std::fs::create_dir(&root) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(format!("cannot create {}: {e}", root.display())),
        };
        // Asked of the sub-tree, not of our own cgroup: the root cgroup (a client in a
        // container often runs there) has no cgroup.kill, its children do.
        if !root.join("cgroup.kill").exists() {
            if made {
                let _ = std::fs::remove_dir(&root);
            }
            return Err(format!(
                "{} has no cgroup.kill (Linux 5.14 or later needed)",
                root.display()
            ));
        }
        Ok(CgroupTree { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The leaf of payload `name` (its work directory's name), whether it exists or not.
    pub fn leaf(&self, name: &str) -> PathBuf {
        self.root.join(format!("payload-{name}"))
    }

    /// Makes the (empty) leaf of payload `name`.
    pub fn create_leaf(&self, name: &str) -> io::Result<PathBuf> {
        let leaf = self.leaf(name);
        match std::fs::create_dir(&leaf) {
            Ok(()) => Ok(leaf),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(leaf),
            Err(e) => Err(e),
        }
    }

    /// Removes the empty payload cgroups and then the sub-tree if nothing is left in it
    /// (clean shutdown, after the payloads were killed: waits up to 1 s for them to go).
    pub fn remove_if_empty(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        loop {
            if let Ok(entries) = std::fs::read_dir(&self.root) {
                for entry in entries.flatten() {
                    let leaf = entry.path();
                    if leaf.is_dir() && !populated(&leaf) {
                        let _ = std::fs::remove_dir(&leaf);
                    }
                }
            }
            if std::fs::remove_dir(&self.root).is_ok() || std::time::Instant::now() > deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Moves the calling process into `leaf` (the payload supervisor does this before it starts
/// the payload, so that nothing of the payload runs outside).
pub fn join(leaf: &Path) -> io::Result<()> {
    std::fs::write(leaf.join("cgroup.procs"), "0")
}

/// SIGKILL to every process in `leaf`.
pub fn kill(leaf: &Path) {
    let _ = std::fs::write(leaf.join("cgroup.kill"), "1");
}

/// Whether any process is left in `leaf` (false when it does not exist).
pub fn populated(leaf: &Path) -> bool {
    std::fs::read_to_string(leaf.join("cgroup.events"))
        .map(|events| events.lines().any(|l| l.trim() == "populated 1"))
        .unwrap_or(false)
}

/// Pids of the processes in `leaf`.
pub fn pids(leaf: &Path) -> Vec<i32> {
    std::fs::read_to_string(leaf.join("cgroup.procs"))
        .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Kills everything in `leaf`, waits (at most `limit`) until it is empty and removes it.
/// Returns false if processes were still there at the limit (the leaf is then kept).
pub async fn kill_and_remove(leaf: &Path, limit: Duration) -> bool {
    if !leaf.exists() {
        return true;
    }
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if !populated(leaf) {
            let _ = std::fs::remove_dir(leaf);
            return true;
        }
        kill(leaf);
        if tokio::time::Instant::now() >= deadline {
            tracing::error!(cgroup = %leaf.display(), "processes left in a payload cgroup after cgroup.kill");
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// This process's own cgroup v2 directory: its `0::` path on the cgroup2 mount, or why
/// there is none.
pub(crate) fn own_cgroup_dir() -> Result<PathBuf, String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    let (mount, mount_root) =
        parse_cgroup2_mount(&info).ok_or("no cgroup2 file system is mounted")?;
    let own = own_cgroup().ok_or("this process has no cgroup v2 (no 0:: line)")?;
    Ok(place_in_mount(&mount, &mount_root, &own))
}

/// Where cgroup `own` (as `/proc/self/cgroup` names it) is under a mount of the hierarchy
/// whose root is `mount_root` (a container's mount shows its own cgroup as the root).
fn place_in_mount(mount: &Path, mount_root: &str, own: &str) -> PathBuf {
    let relative = own
        .strip_prefix(mount_root)
        .filter(|_| mount_root != "/")
        .unwrap_or(own);
    mount.join(relative.trim_start_matches('/'))
}

/// The mount point and root of the last cgroup2 file system in a mountinfo text: the last
/// one mounted hides those before it at the same place.
fn parse_cgroup2_mount(info: &str) -> Option<(PathBuf, String)> {
    info.lines().rev().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fs_type = right.split_whitespace().next()?;
        if fs_type != "cgroup2" {
            return None;
        }
        let mut left = left.split_whitespace();
        let root = left.nth(3)?.to_owned();
        Some((PathBuf::from(left.next()?), root))
    })
}

pub(crate) fn own_cgroup() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::{parse_cgroup2_mount, place_in_mount};
    use std::path::{Path, PathBuf};

    #[test]
    fn finds_the_cgroup2_mount_among_v1_ones() {
        let info = "35 31 0:30 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(info),
            Some((PathBuf::from("/sys/fs/cgroup/unified"), "/".into()))
        );
        let pure = "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(pure),
            Some((PathBuf::from("/sys/fs/cgroup"), "/".into()))
        );
        assert_eq!(
            parse_cgroup2_mount("1 2 0:1 / / rw - ext4 /dev/sda rw\n"),
            None
        );
    }

    /// A container's own read-only mount (its cgroup as the root) under a bind mount of the
    /// host's whole hierarchy: the last mount is the one seen at that place.
    #[test]
    fn the_last_cgroup2_mount_hides_those_before_it() {
        let info = "700 690 0:30 /docker/abc /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw\n\
                    710 700 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(info),
            Some((PathBuf::from("/sys/fs/cgroup"), "/".into()))
        );
    }

    #[test]
    fn a_cgroup_is_placed_under_its_mounts_root() {
        let mount = Path::new("/sys/fs/cgroup");
        // The host's view: the whole path.
        assert_eq!(
            place_in_mount(mount, "/", "/system.slice/c.service"),
            PathBuf::from("/sys/fs/cgroup/system.slice/c.service")
        );
        // A container's mount whose root is its own cgroup, seen without a cgroup namespace.
        assert_eq!(
            place_in_mount(mount, "/docker/abc", "/docker/abc"),
            PathBuf::from("/sys/fs/cgroup")
        );
        assert_eq!(
            place_in_mount(mount, "/docker/abc", "/docker/abc/sub"),
            PathBuf::from("/sys/fs/cgroup/sub")
        );
    }
}
