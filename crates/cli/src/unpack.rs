//! Unpacks a result ZIP into a directory without letting any entry land outside it.
//!
//! Every name is checked before anything is written: an absolute name or one that climbs out
//! with `..` refuses the whole archive. Symbolic links are created last and only when their
//! target stays inside the directory whatever the archive's other links point at (see
//! `link_stays_inside`); nothing is ever written through a link.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context};

/// What an unpack produced.
#[derive(Debug, Default)]
pub struct Unpacked {
    pub files: Vec<PathBuf>,
    /// Links left out because their target points outside the directory (or climbs back up
    /// after descending, which another link could lead outside).
    pub skipped_links: Vec<String>,
}

enum Entry {
    Dir(PathBuf),
    File(PathBuf, usize, Option<u32>),
    Link(PathBuf, PathBuf),
}

/// True when `target`, taken relative to the directory of `link` (itself relative to the
/// root), stays inside the root whatever the other links of the archive point at: it may
/// climb (`..`) only at its start, and no higher than the link's own directory, then only
/// descend. A `..` after a name is refused: that name may be a link (made before or after
/// this one), and `..` from where a link leads is not the lexical parent (`a -> b/c/../..`
/// with `b -> .` resolves above the root). Since the link's own directory is a real one
/// (nothing is written through a link) and every link obeys the same rule, descending
/// through any of them stays inside.
fn link_stays_inside(link: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth: i64 = link.components().count() as i64 - 1;
    let mut descended = false;
    for component in target.components() {
        match component {
            Component::ParentDir if descended => return false,
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => descended = true,
            Component::CurDir => {}
            _ => return false,
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

/// Refuses to write through a symbolic link anywhere between `root` and `path`.
fn check_no_link_on_the_way(root: &Path, relative: &Path) -> anyhow::Result<()> {
    let mut current = root.to_path_buf();
    for component in relative.components() {
        current.push(component);
        if let Ok(meta) = fs::symlink_metadata(&current) {
            if meta.file_type().is_symlink() {
                bail!(
                    "refusing to write through the symbolic link {}",
                    current.display()
                );
            }
        }
    }
    Ok(())
}

/// Unpacks the ZIP at `archive` into `dest` (created if missing).
pub fn unpack(archive: &Path, dest: &Path) -> anyhow::Result<Unpacked> {
    let file = File::open(archive).with_context(|| format!("cannot open {}", archive.display()))?;
    let mut zip = zip::ZipArchive::new(file).context("the download is not a valid ZIP")?;

    let mut entries = Vec::new();
    for index in 0..zip.len() {
        let entry = zip.by_index(index)?;
        let raw_name = entry.name().map(|n| n.to_string()).unwrap_or_default();
        let Some(name) = entry.enclosed_name() else {
            bail!(
                "refusing the archive: entry {raw_name:?} would land outside {}",
                dest.display()
            );
        };
        if entry.is_symlink() {
            let mut target = String::new();
            let mut entry = entry;
            entry.read_to_string(&mut target)?;
            entries.push(Entry::Link(name, PathBuf::from(target)));
        } else if entry.is_dir() {
            entries.push(Entry::Dir(name));
        } else {
            entries.push(Entry::File(name, index, entry.unix_mode()));
        }
    }

    fs::create_dir_all(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    let mut unpacked = Unpacked::default();
    let mut links = Vec::new();
    for entry in entries {
        match entry {
            Entry::Dir(name) => {
                check_no_link_on_the_way(dest, &name)?;
                fs::create_dir_all(dest.join(&name))?;
            }
            Entry::File(name, index, mode) => {
                check_no_link_on_the_way(dest, &name)?;
                let path = dest.join(&name);
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent)?;
                }
                let mut out = File::create(&path)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                io::copy(&mut zip.by_index(index)?, &mut out)?;
                if let Some(mode) = mode {
                    fs::set_permissions(&path, fs::Permissions::from_mode(mode & 0o777))?;
                }
                unpacked.files.push(name);
            }
            Entry::Link(name, target) => links.push((name, target)),
        }
    }
    for (name, target) in links {
        if !link_stays_inside(&name, &target) {
            unpacked.skipped_links.push(name.display().to_string());
            continue;
        }
        check_no_link_on_the_way(dest, &name)?;
        let path = dest.join(&name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        std::os::unix::fs::symlink(&target, &path)?;
    }
    Ok(unpacked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use zip::write::SimpleFileOptions;

    fn archive_with(entries: &[(&str, &[u8])], links: &[(&str, &str)]) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut zip = zip::ZipWriter::new(file.reopen().unwrap());
        for (name, content) in entries {
            zip.start_file(*name, SimpleFileOptions::default()).unwrap();
            zip.write_all(content).unwrap();
        }
        for (name, target) in links {
            zip.add_symlink(*name, *target, SimpleFileOptions::default())
                .unwrap();
        }
        zip.finish().unwrap();
        file
    }

    #[test]
    fn unpacks_files_and_inner_links() {
        let archive = archive_with(
            &[("a.txt", b"a"), ("sub/b.txt", b"b")],
            &[("sub/l", "../a.txt")],
        );
        let dest = tempfile::tempdir().unwrap();
        let unpacked = unpack(archive.path(), dest.path()).unwrap();
        assert_eq!(unpacked.files.len(), 2);
        assert_eq!(fs::read(dest.path().join("sub/l")).unwrap(), b"a");
    }

    #[test]
    fn refuses_entries_that_climb_out() {
        let archive = archive_with(&[("ok.txt", b"x"), ("../evil.txt", b"x")], &[]);
        let dest = tempfile::tempdir().unwrap();
        let inner = dest.path().join("out");
        let error = unpack(archive.path(), &inner).unwrap_err();
        assert!(error.to_string().contains("outside"), "{error}");
        assert!(!dest.path().join("evil.txt").exists());
        assert!(
            !inner.join("ok.txt").exists(),
            "nothing is written from a refused archive"
        );
    }

    #[test]
    fn leaves_out_links_pointing_outside() {
        let archive = archive_with(
            &[("a.txt", b"a")],
            &[("l1", "/etc/passwd"), ("l2", "../../x")],
        );
        let dest = tempfile::tempdir().unwrap();
        let unpacked = unpack(archive.path(), dest.path()).unwrap();
        assert_eq!(unpacked.skipped_links, ["l1", "l2"]);
        assert!(fs::symlink_metadata(dest.path().join("l1")).is_err());
    }

    #[test]
    fn leaves_out_links_that_another_link_leads_outside() {
        // `b -> .` makes `b/c/../..` the root's parent, although it looks like the root.
        let archive = archive_with(
            &[("c/keep.txt", b"k"), ("sub/x.txt", b"x")],
            &[
                ("b", "."),
                ("a", "b/c/../.."),
                ("z", "c/.."),
                ("sub/up", "../c/keep.txt"),
            ],
        );
        let parent = tempfile::tempdir().unwrap();
        let dest = parent.path().join("out");
        let unpacked = unpack(archive.path(), &dest).unwrap();
        assert_eq!(unpacked.skipped_links, ["a", "z"]);
        assert!(fs::symlink_metadata(dest.join("a")).is_err());
        assert_eq!(fs::read(dest.join("sub/up")).unwrap(), b"k");
        // Every link that was made resolves inside the directory.
        let root = fs::canonicalize(&dest).unwrap();
        for link in ["b", "sub/up"] {
            let resolved = fs::canonicalize(dest.join(link)).unwrap();
            assert!(
                resolved.starts_with(&root),
                "{link} -> {}",
                resolved.display()
            );
        }
    }

    #[test]
    fn never_writes_through_an_existing_link() {
        let outside = tempfile::tempdir().unwrap();
        let dest = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dest.path().join("sub")).unwrap();
        let archive = archive_with(&[("sub/x.txt", b"x")], &[]);
        assert!(unpack(archive.path(), dest.path()).is_err());
        assert!(!outside.path().join("x.txt").exists());
    }
}
