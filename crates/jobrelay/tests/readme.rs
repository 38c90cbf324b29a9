//! Runs the README's code blocks marked `<!-- readme-test: NAME -->` against a real system, so
//! the commands the README shows keep working. The addresses the README uses
//! (`127.0.0.1:5000` for the server, `127.0.0.1:9000` for a client) are replaced by the ones
//! of processes started on free ports, and `cargo run --release --` by the binary under test.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::*;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The marked blocks of the README, in order: (name, shell text).
fn marked_blocks() -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let mut blocks = Vec::new();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line
            .trim()
            .strip_prefix("<!-- readme-test:")
            .and_then(|rest| rest.strip_suffix("-->"))
        else {
            continue;
        };
        let fence = lines.next().unwrap_or_default();
        assert!(
            fence.starts_with("```"),
            "a code block follows the marker {name}"
        );
        let body: Vec<&str> = lines
            .by_ref()
            .take_while(|l| !l.starts_with("```"))
            .collect();
        blocks.push((name.trim().to_owned(), body.join("\n")));
    }
    blocks
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn readme_commands_work() {
    let blocks = marked_blocks();
    let names: Vec<&str> = blocks.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "first-job",
            "first-job-curl",
            "cli",
            "observe",
            "server-api",
            "client-api"
        ],
        "the README's tested blocks"
    );

    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    copy_dir(
        &repo_root().join("examples/residues"),
        &work.join("examples/residues"),
    );
    std::fs::write(work.join("run.sh"), "echo hello > hello.txt\n").unwrap();
    std::fs::write(work.join("input.pdb"), "ATOM\n").unwrap();
    std::fs::write(work.join("a.pdb"), "ATOM\n").unwrap();

    let system = Proc::up(tmp.path(), &[]);
    let client = TestClient::start(&[]);
    let bin_dir = Path::new(binary()).parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    for (name, text) in &blocks {
        let script = text
            .replace("cargo run --release --", "jobrelay")
            .replace("http://127.0.0.1:5000", &system.url)
            .replace("http://127.0.0.1:9000", &client.proc.url);
        let output = Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .current_dir(&work)
            .env("PATH", &path)
            // The default server address is the README's 127.0.0.1:5000.
            .env("JOBRELAY_SERVER", &system.url)
            .env_remove("JOBRELAY_USER")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "README block {name} failed:\n{script}\n--- stdout\n{}\n--- stderr\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if name == "first-job" {
            assert_eq!(
                String::from_utf8_lossy(&output.stdout),
                "1\nfile\tchain\tresidues\npeptides.pdb\tA\t5\npeptides.pdb\tB\t3\n"
            );
        }
    }
}
