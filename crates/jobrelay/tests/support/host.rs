//! What the machine running the tests offers: tests of `--run-as` and `--sandbox` need root
//! and bubblewrap, and skip themselves without; memory-cgroup tests look up where they are.

pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

pub fn have_bwrap() -> bool {
    std::process::Command::new("bwrap")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Where the v1 memory hierarchy is mounted, from this process's mount table.
pub fn v1_memory_mount() -> Option<std::path::PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut right = right.split_whitespace();
        (right.next()? == "cgroup" && right.nth(1)?.split(',').any(|o| o == "memory"))
            .then(|| left.split_whitespace().nth(4).map(Into::into))
            .flatten()
    })
}

/// The line of `/proc/<who>/cgroup` for memory: the v1 `memory` one, else the v2 `0::` one.
pub fn memory_cgroup_line(text: &str, v1: bool) -> Option<String> {
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let wanted = if v1 {
            controllers.split(',').any(|c| c == "memory")
        } else {
            controllers.is_empty()
        };
        wanted.then(|| path.trim().to_owned())
    })
}
