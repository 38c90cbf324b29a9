//! How a local payload's `memory` request is enforced, in order of preference:
//!
//! 1. **cgroup v2 `memory.max`** on the payload's own v2 leaf (`cgroup`), when the memory
//!    controller can be enabled for the leaves: `memory` must be listed in
//!    `jobrelay-<node>/cgroup.controllers`, i.e. already enabled in the `cgroup.subtree_control`
//!    of the client's own cgroup. The client then writes `+memory` to
//!    `jobrelay-<node>/cgroup.subtree_control` (that cgroup holds no process, only leaves, so
//!    the "no internal processes" rule holds). It never writes its own cgroup's
//!    `subtree_control` and never moves its own process. Delegation this needs: the kernel lets
//!    a cgroup that holds processes have controllers enabled below it only when it is the root
//!    cgroup, so this way is taken by a client running in the machine's root cgroup; a
//!    client in a systemd unit (`Delegate=yes`)
//!    sits in the unit's cgroup, whose `subtree_control` stays empty, and goes on to 2 or 3.
//!    (Putting the payloads' sub-tree beside the client, in a delegated parent, as systemd's
//!    `DelegateSubgroup=` allows, would lift this; not done.) Else:
//! 2. **a cgroup v1 memory hierarchy**, when one is mounted and the client's own memory
//!    cgroup in it is writable (the last memory mount, which hides those before it at its
//!    place, and only a cgroup whose `cgroup.procs` lists the client: a bind mount of some other
//!    part of the tree is not taken for its own): `jobrelay-<node>/payload-<id>` below it, with
//!    `memory.limit_in_bytes` and, where swap is accounted, `memory.memsw.limit_in_bytes`
//!    (so swap does not dodge the limit). v1 has no "no internal processes" rule, the client
//!    stays where it is. Else:
//! 3. **RLIMIT_AS** (the address space of each process), as before: set by the supervisor.
//!
//! With a cgroup limit, the job's memory is not also an RLIMIT_AS (that breaks programs that
//! reserve address space: JVMs, Go, CUDA); the client's own `--limit-memory` stays one.
//! The payload's supervisor joins the memory cgroup before it starts `run.sh`, as it joins
//! the v2 leaf, so nothing of the payload runs outside. When the payload ends, its counters
//! say whether the limit killed it (v2 `memory.events` `oom_kill`; v1 `memory.oom_control`
//! `oom_kill`, or on kernels before 4.13 `memory.failcnt` with a SIGKILLed run), and the
//! v1 directory is removed (the v2 leaf goes with the payload's `Tracker`).
//!
//! Detection falls back quietly (one log line saying why) where a hierarchy is missing or
//! read-only (containers). `JOBRELAY_NO_CGROUP` (see `cgroup`) disables both cgroup ways.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cgroup::DISABLE_VAR;

/// How this client limits the memory of its local payloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enforcement {
    /// `memory.max` on each payload's cgroup v2 leaf, below `tree`.
    CgroupV2 { tree: PathBuf },
    /// `payload-<id>` directories below `root`, the client's `jobrelay-<node>` in its own
    /// cgroup v1 memory cgroup.
    CgroupV1 { root: PathBuf },
    /// RLIMIT_AS of each process; why no cgroup limit is possible.
    Rlimit { why: String },
}

impl Enforcement {
    /// Looks at this machine: `v2_tree` is the client's cgroup v2 sub-tree of payload leaves
    /// (`cgroup::CgroupTree::root`), if it has one.
    pub fn detect(node: &str, v2_tree: Option<&Path>) -> Enforcement {
        if std::env::var_os(DISABLE_VAR).is_some() {
            return Enforcement::Rlimit {
                why: format!("cgroups disabled by {DISABLE_VAR}"),
            };
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        choose(node, v2_tree, &mountinfo, &own)
    }

    /// What `/info` and the startup log say.
    pub fn describe(&self) -> String {
        match self {
            Enforcement::CgroupV2 { .. } => "cgroup v2 memory.max".to_owned(),
            Enforcement::CgroupV1 { .. } => "cgroup v1 memory controller".to_owned(),
            Enforcement::Rlimit { why } => format!("RLIMIT_AS only: {why}"),
        }
    }

    pub fn uses_rlimit(&self) -> bool {
        matches!(self, Enforcement::Rlimit { .. })
    }

    /// Gives payload `name` (its id) a memory cgroup limited to `bytes`, before it starts.
    /// `v2_leaf`: its cgroup v2 leaf, already made. `None` under RLIMIT_AS.
    pub fn limit(
        &self,
        name: &str,
        v2_leaf: Option<&Path>,
        bytes: u64,
    ) -> io::Result<Option<PayloadMemory>> {
        match self {
            Enforcement::Rlimit { .. } => Ok(None),
            Enforcement::CgroupV2 { .. } => {
                let leaf = v2_leaf.ok_or_else(|| io::Error::other("the payload has no cgroup"))?;
                std::fs::write(leaf.join("memory.max"), bytes.to_string())?;
                // No swap beyond the limit (absent when swap is not accounted).
                let swap = leaf.join("memory.swap.max");
                if swap.exists() {
                    std::fs::write(swap, "0")?;
                }
                Ok(Some(PayloadMemory::V2(leaf.to_path_buf())))
            }
            Enforcement::CgroupV1 { root } => {
                let dir = root.join(format!("payload-{name}"));
                match std::fs::create_dir(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
                let written = std::fs::write(dir.join("memory.limit_in_bytes"), bytes.to_string())
                    .and_then(|()| {
                        // Memory + swap, written after the memory limit (it may not be lower).
                        let memsw = dir.join("memory.memsw.limit_in_bytes");
                        if memsw.exists() {
                            std::fs::write(memsw, bytes.to_string())?;
                        }
                        // A new cgroup inherits its parent's oom_kill_disable: with it, a
                        // payload at its limit would hang instead of being killed.
                        let _ = std::fs::write(dir.join("memory.oom_control"), "0");
                        Ok(())
                    });
                if let Err(e) = written {
                    let _ = std::fs::remove_dir(&dir);
                    return Err(e);
                }
                Ok(Some(PayloadMemory::V1(dir)))
            }
        }
    }

    /// The memory cgroup payload `name` has, if it has one still (after a restart).
    pub fn of_payload(&self, name: &str, v2_leaf: Option<&Path>) -> Option<PayloadMemory> {
        match self {
            Enforcement::Rlimit { .. } => None,
            // Every leaf has a memory.max; only a payload that asked for memory has a number.
            Enforcement::CgroupV2 { .. } => v2_leaf
                .map(|leaf| PayloadMemory::V2(leaf.to_path_buf()))
                .filter(|memory| memory.limit_mb().is_some()),
            Enforcement::CgroupV1 { root } => Some(root.join(format!("payload-{name}")))
                .filter(|dir| dir.is_dir())
                .map(PayloadMemory::V1),
        }
    }

    /// Clean shutdown: removes the v1 sub-tree if no payload directory is left in it.
    pub fn release(&self) {
        if let Enforcement::CgroupV1 { root } = self {
            let _ = std::fs::remove_dir(root);
        }
    }
}

/// Chooses the enforcement from the mount table and `/proc/self/cgroup` texts, trying the
/// hierarchies they name (making the v1 `jobrelay-<node>` directory, enabling `memory` for
/// the v2 leaves). Separate from [`Enforcement::detect`] so it can be tried on fake trees.
pub(crate) fn choose(
    node: &str,
    v2_tree: Option<&Path>,
    mountinfo: &str,
    own_cgroups: &str,
) -> Enforcement {
    let v2_why = match v2_tree {
        Some(tree) => match enable_v2_memory(tree) {
            Ok(()) => {
                return Enforcement::CgroupV2 {
                    tree: tree.to_path_buf(),
                }
            }
            Err(why) => why,
        },
        None => "payloads have no cgroup v2".to_owned(),
    };
    let v1_why = match v1_root(node, mountinfo, own_cgroups) {
        Ok(root) => return Enforcement::CgroupV1 { root },
        Err(why) => why,
    };
    Enforcement::Rlimit {
        why: format!("{v2_why}; {v1_why}"),
    }
}

/// Enables the memory controller for the leaves below `tree` (which holds no process).
fn enable_v2_memory(tree: &Path) -> Result<(), String> {
    let controllers = std::fs::read_to_string(tree.join("cgroup.controllers")).unwrap_or_default();
    if !controllers.split_whitespace().any(|c| c == "memory") {
        return Err(format!(
            "the cgroup v2 memory controller is not delegated to {} (not enabled in its \
             parent's cgroup.subtree_control; the client does not move itself to enable it)",
            tree.display()
        ));
    }
    std::fs::write(tree.join("cgroup.subtree_control"), "+memory").map_err(|e| {
        format!(
            "cannot enable memory in {}/cgroup.subtree_control: {e}",
            tree.display()
        )
    })
}

/// Finds the client's own cgroup in a mounted v1 memory hierarchy and makes (or finds) its
/// `jobrelay-<node>` there.
fn v1_root(node: &str, mountinfo: &str, own_cgroups: &str) -> Result<PathBuf, String> {
    let (mount, mount_root) =
        v1_memory_mount(mountinfo).ok_or("no cgroup v1 memory hierarchy is mounted")?;
    let own = own_v1_memory_cgroup(own_cgroups)
        .ok_or("this process has no cgroup v1 memory cgroup (no memory line)")?;
    // A container's mount shows its own cgroup as the root of the hierarchy.
    let relative = own
        .strip_prefix(mount_root.as_str())
        .filter(|_| mount_root != "/")
        .unwrap_or(&own);
    let base = mount.join(relative.trim_start_matches('/'));
    if !base.join("memory.limit_in_bytes").exists() {
        return Err(format!(
            "{} is not a memory cgroup (no memory.limit_in_bytes)",
            base.display()
        ));
    }
    // The mount and /proc/self/cgroup may disagree (another cgroup namespace's view, a bind
    // mount of another part of the tree): only a cgroup that holds this process is ours.
    let me = std::process::id() as i32;
    if !crate::cgroup::pids(&base).contains(&me) {
        return Err(format!(
            "this process is not in {} (its cgroup.procs), so it is not its memory cgroup",
            base.display()
        ));
    }
    let root = base.join(format!("jobrelay-{node}"));
    match std::fs::create_dir(&root) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && root.is_dir() => {}
        Err(e) => return Err(format!("cannot create {}: {e}", root.display())),
    }
    Ok(root)
}

/// Mount point and root of the cgroup v1 hierarchy with the memory controller: the last one
/// mounted, which hides those before it at the same place (a container's own read-only one
/// under a bind mount of the host's).
fn v1_memory_mount(mountinfo: &str) -> Option<(PathBuf, String)> {
    mountinfo.lines().rev().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut right = right.split_whitespace();
        if right.next()? != "cgroup" {
            return None;
        }
        let options = right.nth(1)?;
        if !options.split(',').any(|o| o == "memory") {
            return None;
        }
        let mut left = left.split_whitespace();
        let root = left.nth(3)?.to_owned();
        Some((PathBuf::from(left.next()?), root))
    })
}

/// The path of this process's memory cgroup in a `/proc/self/cgroup` text.
fn own_v1_memory_cgroup(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let _id = parts.next()?;
        let controllers = parts.next()?;
        let path = parts.next()?;
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then(|| path.trim().to_owned())
    })
}

/// A payload's memory cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayloadMemory {
    /// Its cgroup v2 leaf (joined and removed as the payload's `Tracker` does).
    V2(PathBuf),
    /// Its own directory in the v1 memory hierarchy.
    V1(PathBuf),
}

/// What a memory cgroup's counters say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    /// Processes the OOM killer ended in the cgroup; `None`: the kernel does not say.
    pub oom_kills: Option<u64>,
    /// Times usage hit the limit (v1 `memory.failcnt`; also counts reclaims that succeeded).
    pub failcnt: u64,
}

impl Counters {
    /// Whether the limit ended a run that ended with SIGKILL or not (`killed`): an OOM kill
    /// counted, or (a kernel that counts none) a hit limit and a SIGKILLed run.
    pub fn limit_ended_it(&self, killed: bool) -> bool {
        match self.oom_kills {
            Some(kills) => kills > 0,
            None => self.failcnt > 0 && killed,
        }
    }
}

impl PayloadMemory {
    /// The directory the supervisor joins besides the v2 leaf (v1 only).
    pub fn to_join(&self) -> Option<&Path> {
        match self {
            PayloadMemory::V2(_) => None,
            PayloadMemory::V1(dir) => Some(dir),
        }
    }

    pub fn counters(&self) -> Counters {
        let read = |dir: &Path, file: &str| std::fs::read_to_string(dir.join(file)).ok();
        match self {
            PayloadMemory::V2(leaf) => {
                parse_v2_events(&read(leaf, "memory.events").unwrap_or_default())
            }
            PayloadMemory::V1(dir) => parse_v1(
                &read(dir, "memory.oom_control").unwrap_or_default(),
                read(dir, "memory.failcnt").as_deref(),
            ),
        }
    }

    /// The limit in force, MiB (read back, so it is known after a restart too).
    pub fn limit_mb(&self) -> Option<u64> {
        let (dir, file) = match self {
            PayloadMemory::V2(leaf) => (leaf, "memory.max"),
            PayloadMemory::V1(dir) => (dir, "memory.limit_in_bytes"),
        };
        let text = std::fs::read_to_string(dir.join(file)).ok()?;
        text.trim().parse::<u64>().ok().map(|bytes| bytes >> 20)
    }

    /// The reason's words when the limit ended the run (`killed`: it ended with SIGKILL).
    pub fn verdict(&self, killed: bool) -> Option<String> {
        let counters = self.counters();
        if !counters.limit_ended_it(killed) {
            return None;
        }
        let how = match self {
            PayloadMemory::V2(_) => "cgroup v2 memory.max",
            PayloadMemory::V1(_) => "cgroup v1 memory controller",
        };
        let limit = self
            .limit_mb()
            .map_or(String::new(), |mb| format!(" of {mb} MiB"));
        let kills = match counters.oom_kills {
            Some(1) => ", 1 process killed".to_owned(),
            Some(n) => format!(", {n} processes killed"),
            None => String::new(),
        };
        Some(format!(
            "killed: memory limit{limit} reached ({how}{kills})"
        ))
    }

    /// Removes the v1 directory once the payload ended: SIGKILL to whatever is left in it
    /// until it is empty (at most `limit`), then `rmdir`. The v2 leaf is left to the
    /// payload's `Tracker`. Returns false when processes were still there at the limit.
    pub async fn remove(&self, limit: Duration) -> bool {
        let PayloadMemory::V1(dir) = self else {
            return true;
        };
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if !dir.exists() || std::fs::remove_dir(dir).is_ok() {
                return true;
            }
            let pids = crate::cgroup::pids(dir);
            for pid in &pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::error!(cgroup = %dir.display(), left = pids.len(), "could not remove a payload's memory cgroup");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Moves the calling process into a v1 memory cgroup (the supervisor, before `run.sh`).
pub fn join_v1(dir: &Path) -> io::Result<()> {
    std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
}

/// `memory.events` of cgroup v2: `oom_kill N` (0 when the line is missing).
fn parse_v2_events(text: &str) -> Counters {
    Counters {
        oom_kills: Some(field(text, "oom_kill").unwrap_or(0)),
        failcnt: field(text, "max").unwrap_or(0),
    }
}

/// `memory.oom_control` (`oom_kill N` since Linux 4.13) and `memory.failcnt` of cgroup v1.
fn parse_v1(oom_control: &str, failcnt: Option<&str>) -> Counters {
    Counters {
        oom_kills: field(oom_control, "oom_kill"),
        failcnt: failcnt.and_then(|t| t.trim().parse().ok()).unwrap_or(0),
    }
}

/// The number after `key` in a flat keyed file (`key value` lines).
fn field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (name, value) = line.trim().split_once(char::is_whitespace)?;
        (name == key).then(|| value.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_oom_kills_of_v2_and_v1() {
        let v2 = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(
            parse_v2_events(v2),
            Counters {
                oom_kills: Some(1),
                failcnt: 12
            }
        );
        assert_eq!(parse_v2_events("").oom_kills, Some(0));
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(parse_v1(v1, Some("40\n")).oom_kills, Some(3));
        assert_eq!(parse_v1(v1, Some("40\n")).failcnt, 40);
        // A kernel before 4.13: no oom_kill line; then a hit limit and a SIGKILL say it.
        let old = parse_v1("oom_kill_disable 0\nunder_oom 0\n", Some("5"));
        assert_eq!(old.oom_kills, None);
        assert!(old.limit_ended_it(true));
        assert!(!old.limit_ended_it(false));
        assert!(!parse_v1("oom_kill 0\n", Some("5")).limit_ended_it(true));
        assert!(parse_v1("oom_kill 1\n", None).limit_ended_it(false));
        assert!(!parse_v1("garbage", Some("x")).limit_ended_it(true));
    }

    #[test]
    fn finds_the_v1_memory_mount_and_own_cgroup() {
        let info = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                    35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            v1_memory_mount(info),
            Some((PathBuf::from("/sys/fs/cgroup/memory"), "/".to_owned()))
        );
        assert_eq!(
            v1_memory_mount("41 31 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"),
            None
        );
        let own = "5:devices:/\n4:memory:/process_api/1e45\n1:cpu,cpuacct:/\n0::/\n";
        assert_eq!(
            own_v1_memory_cgroup(own).as_deref(),
            Some("/process_api/1e45")
        );
        assert_eq!(own_v1_memory_cgroup("0::/user.slice\n"), None);
    }

    /// A fake file tree: `memory/` as a v1 memory mount with the process in `/job/1`, and
    /// `unified/jobrelay-n` as the v2 sub-tree, with the given controllers.
    struct Fake {
        dir: tempfile::TempDir,
    }

    impl Fake {
        fn new(v2_controllers: &str) -> Fake {
            let dir = tempfile::tempdir().unwrap();
            let own = dir.path().join("memory/job/1");
            std::fs::create_dir_all(&own).unwrap();
            std::fs::write(own.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
            std::fs::write(
                own.join("cgroup.procs"),
                format!("1\n{}\n", std::process::id()),
            )
            .unwrap();
            let tree = dir.path().join("unified/jobrelay-n");
            std::fs::create_dir_all(&tree).unwrap();
            std::fs::write(tree.join("cgroup.controllers"), v2_controllers).unwrap();
            Fake { dir }
        }

        fn mountinfo(&self) -> String {
            format!(
                "35 31 0:32 / {} rw - cgroup cgroup rw,memory\n",
                self.dir.path().join("memory").display()
            )
        }

        fn tree(&self) -> PathBuf {
            self.dir.path().join("unified/jobrelay-n")
        }
    }

    const OWN: &str = "4:memory:/job/1\n0::/\n";

    #[test]
    fn prefers_v2_when_the_leaves_can_have_memory() {
        let fake = Fake::new("cpu io memory pids\n");
        let chosen = choose("n", Some(&fake.tree()), &fake.mountinfo(), OWN);
        assert_eq!(chosen, Enforcement::CgroupV2 { tree: fake.tree() });
        assert_eq!(
            std::fs::read_to_string(fake.tree().join("cgroup.subtree_control")).unwrap(),
            "+memory"
        );
        assert_eq!(chosen.describe(), "cgroup v2 memory.max");
        // A payload's limit lands on its leaf.
        let leaf = fake.tree().join("payload-7");
        std::fs::create_dir(&leaf).unwrap();
        let memory = chosen.limit("7", Some(&leaf), 64 << 20).unwrap().unwrap();
        assert_eq!(memory, PayloadMemory::V2(leaf.clone()));
        assert_eq!(memory.to_join(), None);
        assert_eq!(memory.limit_mb(), Some(64));
        assert_eq!(chosen.of_payload("7", Some(&leaf)), Some(memory.clone()));
        // A leaf without a limit of its own ("max") is no payload's memory cgroup.
        let other = fake.tree().join("payload-8");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("memory.max"), "max\n").unwrap();
        assert_eq!(chosen.of_payload("8", Some(&other)), None);
        std::fs::write(leaf.join("memory.events"), "max 3\noom 1\noom_kill 1\n").unwrap();
        assert_eq!(
            memory.verdict(true).as_deref(),
            Some("killed: memory limit of 64 MiB reached (cgroup v2 memory.max, 1 process killed)")
        );
    }

    #[test]
    fn falls_back_to_v1_when_v2_has_no_memory_controller() {
        let fake = Fake::new("hugetlb\n");
        let chosen = choose("n", Some(&fake.tree()), &fake.mountinfo(), OWN);
        let root = fake.dir.path().join("memory/job/1/jobrelay-n");
        assert_eq!(chosen, Enforcement::CgroupV1 { root: root.clone() });
        assert!(root.is_dir());
        assert!(!fake.tree().join("cgroup.subtree_control").exists());
        assert_eq!(chosen.describe(), "cgroup v1 memory controller");
        // memsw is written when the hierarchy accounts swap (here: a file made up front, as
        // the kernel would make it in the new directory).
        let dir = root.join("payload-3");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("memory.memsw.limit_in_bytes"), "").unwrap();
        let memory = chosen.limit("3", None, 64 << 20).unwrap().unwrap();
        assert_eq!(memory.to_join(), Some(dir.as_path()));
        assert_eq!(
            std::fs::read_to_string(dir.join("memory.memsw.limit_in_bytes")).unwrap(),
            (64u64 << 20).to_string()
        );
        assert_eq!(chosen.of_payload("3", None), Some(memory.clone()));
        assert_eq!(chosen.of_payload("4", None), None);
        assert_eq!(memory.verdict(true), None, "no counters: not the limit");
        std::fs::write(
            dir.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        assert_eq!(
            memory.verdict(false).as_deref(),
            Some("killed: memory limit of 64 MiB reached (cgroup v1 memory controller, 2 processes killed)")
        );
    }

    #[test]
    fn without_a_usable_hierarchy_it_is_rlimit_and_says_why() {
        let fake = Fake::new("");
        // No v1 memory mount at all.
        let chosen = choose("n", Some(&fake.tree()), "", OWN);
        let Enforcement::Rlimit { why } = &chosen else {
            panic!("{chosen:?}")
        };
        assert!(why.contains("not delegated"), "{why}");
        assert!(why.contains("no cgroup v1 memory hierarchy"), "{why}");
        assert!(chosen.describe().starts_with("RLIMIT_AS only: "));
        assert_eq!(chosen.limit("1", None, 1 << 20).unwrap(), None);
        // A v1 hierarchy where our own cgroup is not (another cgroup namespace's view).
        let chosen = choose("n", None, &fake.mountinfo(), "4:memory:/elsewhere\n");
        assert!(chosen.uses_rlimit(), "{chosen:?}");
    }

    #[test]
    fn a_containers_v1_mount_shows_its_own_cgroup_as_the_root() {
        // Docker without a cgroup namespace: the mount's root and our path are the same.
        let fake = Fake::new("");
        let mount = fake.dir.path().join("memory/job/1");
        let info = format!(
            "35 31 0:32 /docker/abc {} rw - cgroup cgroup rw,memory\n",
            mount.display()
        );
        let chosen = choose("n", None, &info, "4:memory:/docker/abc\n");
        assert_eq!(
            chosen,
            Enforcement::CgroupV1 {
                root: mount.join("jobrelay-n")
            }
        );
        // The host's hierarchy bind-mounted over the container's: the later mount is the one
        // seen there, with the root of the whole tree.
        let host = fake.dir.path().join("memory");
        let (docker, ours) = (host.join("docker/abc"), host.join("job/1"));
        std::fs::create_dir_all(&docker).unwrap();
        std::fs::copy(
            ours.join("memory.limit_in_bytes"),
            docker.join("memory.limit_in_bytes"),
        )
        .unwrap();
        std::fs::copy(ours.join("cgroup.procs"), docker.join("cgroup.procs")).unwrap();
        let info = format!(
            "35 31 0:32 /docker/abc {0} ro - cgroup cgroup rw,memory\n\
             90 35 0:32 / {0} rw - cgroup cgroup rw,memory\n",
            host.display()
        );
        let chosen = choose("n", None, &info, "4:memory:/docker/abc\n");
        assert_eq!(
            chosen,
            Enforcement::CgroupV1 {
                root: docker.join("jobrelay-n")
            }
        );
        // Where the view and our cgroup disagree (we are not in the cgroup the path names),
        // nothing is made there.
        std::fs::write(docker.join("cgroup.procs"), "1\n").unwrap();
        std::fs::remove_dir(docker.join("jobrelay-n")).unwrap();
        let chosen = choose("n", None, &info, "4:memory:/docker/abc\n");
        let Enforcement::Rlimit { why } = &chosen else {
            panic!("{chosen:?}")
        };
        assert!(why.contains("not in"), "{why}");
        assert!(!docker.join("jobrelay-n").exists());
    }

    #[test]
    fn a_v1_hierarchy_where_nothing_can_be_made_falls_back_quietly() {
        // As root (CI) a read-only directory is still writable, so the failed creation is
        // made with a file in the way; a read-only mount is what containers.rs meets.
        let fake = Fake::new("");
        std::fs::write(fake.dir.path().join("memory/job/1/jobrelay-n"), "").unwrap();
        let chosen = choose("n", None, &fake.mountinfo(), OWN);
        let Enforcement::Rlimit { why } = &chosen else {
            panic!("not a fallback: {chosen:?}")
        };
        assert!(why.contains("cannot create"), "{why}");
        assert!(why.contains("payloads have no cgroup v2"), "{why}");
    }
}
