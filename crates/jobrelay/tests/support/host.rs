//! What the machine running the tests offers: tests of `--run-as` and `--sandbox` need root
//! and bubblewrap, and skip themselves without.

pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

pub fn have_bwrap() -> bool {
    std::process::Command::new("bwrap")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}
