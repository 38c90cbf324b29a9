//! Small file-system helpers: atomic replacement and classification of I/O errors.

use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name unique within this process, for temporary files and directories.
pub fn unique_name(prefix: &str) -> String {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}-{n}", std::process::id())
}

/// Replaces `path` with `contents` so that a reader (or a restart after `kill -9`) sees
/// either the old or the new file, never a half-written one.
pub fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_atomic_with_mode(path, contents, 0o666)
}

/// [`write_atomic`] of a file created with `mode` (before the umask): a secret is written
/// 0o600 and is never readable by others, not even for a moment.
pub fn write_atomic_with_mode(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(unique_name(".tmp-"));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(contents)?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Largest contents [`overwrite_padded`] writes in place: one page, written by one `write`,
/// which a process crash cannot cut in two.
pub const IN_PLACE_MAX: usize = 4096;

/// Rewrites the existing file `path` in place with `contents` followed by spaces up to the
/// file's current length, in one `write` at offset 0: no new inode (creating files is what a
/// busy ext4 without a journal spends most time on), and a process killed at any moment
/// leaves either the old or the new contents (JSON ignores the trailing spaces). Like
/// [`write_atomic`] without fsync, it does not guard against a power loss. Returns `false`
/// (nothing written) when the file does not exist or the contents are over
/// [`IN_PLACE_MAX`]; use [`write_atomic`] then.
pub fn overwrite_padded(path: &Path, contents: &[u8]) -> io::Result<bool> {
    use std::os::unix::fs::FileExt;
    if contents.len() > IN_PLACE_MAX {
        return Ok(false);
    }
    let file = match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let old_len = file.metadata()?.len() as usize;
    if old_len > IN_PLACE_MAX {
        return Ok(false);
    }
    let mut buffer = Vec::with_capacity(old_len.max(contents.len()));
    buffer.extend_from_slice(contents);
    buffer.resize(old_len.max(contents.len()), b' ');
    let written = file.write_at(&buffer, 0)?;
    if written != buffer.len() {
        // Cannot happen for a regular file short of a full disk; the rest follows.
        file.write_all_at(&buffer[written..], written as u64)?;
    }
    Ok(true)
}

/// True for "no space left on device" and "disk quota exceeded".
pub fn is_disk_full(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::ENOSPC) | Some(libc::EDQUOT)
    ) || error.kind() == io::ErrorKind::StorageFull
}

/// Removes a directory tree, treating "already gone" as success.
pub fn remove_dir_all_if_exists(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// `FS_IOC_GETFLAGS` / `FS_IOC_SETFLAGS` (`linux/fs.h`, `_IOR`/`_IOW('f', 1|2, long)`), which
/// read and write an `int` of `FS_*_FL` flags; libc does not define them.
const FS_IOC_GETFLAGS: libc::c_ulong = 0x8008_6601;
const FS_IOC_SETFLAGS: libc::c_ulong = 0x4008_6602;
/// "Top of a directory hierarchy": ext4's allocator (Orlov) spreads the directories made in
/// it over the whole disk, as it does for directories made in the root.
const FS_TOPDIR_FL: libc::c_int = 0x0002_0000;

/// Asks the file system to spread the directories made in `dir` over its block groups
/// (`chattr +T`). Returns whether it took the hint; a file system without it (not ext2/3/4)
/// says no and nothing changes.
///
/// Why: on ext4 without a journal, a new inode is never given a number freed in the last
/// minute or more, and finding a free one scans past every such number in its group: a
/// directory that gets a new subdirectory per job, each removed soon after, puts all of that
/// churn in one group, and each new file there pays a scan that grows with the rate of jobs
/// (a fifth of the client's CPU in issue 18's benchmark). Spread, each group sees a sliver.
pub fn spread_subdirectories(dir: &Path) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let handle = std::fs::File::open(dir)?;
    let Some(flags) = flags_of(&handle)? else {
        return Ok(false);
    };
    if flags & FS_TOPDIR_FL != 0 {
        return Ok(true);
    }
    let flags = flags | FS_TOPDIR_FL;
    // SAFETY: FS_IOC_SETFLAGS reads one int from `flags`, which outlives the call.
    if unsafe { libc::ioctl(handle.as_raw_fd(), FS_IOC_SETFLAGS as _, &flags) } != 0 {
        return unsupported(io::Error::last_os_error()).map(|()| false);
    }
    Ok(true)
}

/// The `FS_*_FL` flags of an open file, or `None` where its file system has none.
fn flags_of(file: &std::fs::File) -> io::Result<Option<libc::c_int>> {
    use std::os::fd::AsRawFd;
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int into `flags`, which outlives the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_GETFLAGS as _, &mut flags) } != 0 {
        return unsupported(io::Error::last_os_error()).map(|()| None);
    }
    Ok(Some(flags))
}

/// `Ok` for the errors of a file system that has no such flags, else the error.
fn unsupported(error: io::Error) -> io::Result<()> {
    match error.raw_os_error() {
        Some(libc::ENOTTY) | Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => Ok(()),
        _ => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `dir` has the flag [`spread_subdirectories`] sets.
    fn spreads_subdirectories(dir: &Path) -> io::Result<bool> {
        let flags = flags_of(&std::fs::File::open(dir)?)?;
        Ok(flags.is_some_and(|f| f & FS_TOPDIR_FL != 0))
    }

    #[test]
    fn a_directory_asked_to_spread_its_subdirectories_keeps_the_flag_where_the_fs_has_it() {
        let dir = tempfile::tempdir().unwrap();
        let staging = dir.path().join("staging");
        std::fs::create_dir(&staging).unwrap();
        assert!(!spreads_subdirectories(&staging).unwrap());
        if !spread_subdirectories(&staging).unwrap() {
            eprintln!("skipped: the file system of the temp directory has no FS_TOPDIR_FL");
            return;
        }
        assert!(spreads_subdirectories(&staging).unwrap());
        // Asked again: no change, no error; the flag is not inherited by what is made in it.
        assert!(spread_subdirectories(&staging).unwrap());
        std::fs::create_dir(staging.join("job")).unwrap();
        assert!(!spreads_subdirectories(&staging.join("job")).unwrap());
        assert!(spread_subdirectories(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("record.json");
        write_atomic(&target, b"one").unwrap();
        write_atomic(&target, b"two").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn overwrite_padded_rewrites_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("record.json");
        assert!(
            !overwrite_padded(&target, b"{}").unwrap(),
            "no file: nothing written"
        );
        write_atomic(&target, br#"{"status":"Running","long":"xxxxxxxx"}"#).unwrap();
        use std::os::unix::fs::MetadataExt;
        let inode = std::fs::metadata(&target).unwrap().ino();
        assert!(overwrite_padded(&target, br#"{"status":"Done"}"#).unwrap());
        let text = std::fs::read_to_string(&target).unwrap();
        assert_eq!(text.trim_end(), r#"{"status":"Done"}"#);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&text).unwrap()["status"],
            "Done"
        );
        assert_eq!(std::fs::metadata(&target).unwrap().ino(), inode);
        assert!(
            overwrite_padded(&target, br#"{"status":"Longer than before, much longer"}"#).unwrap()
        );
        assert_eq!(
            std::fs::read_to_string(&target).unwrap(),
            r#"{"status":"Longer than before, much longer"}"#
        );
        assert!(!overwrite_padded(&target, &vec![b' '; IN_PLACE_MAX + 1]).unwrap());
    }

    #[test]
    fn disk_full_is_recognised() {
        assert!(is_disk_full(&io::Error::from_raw_os_error(libc::ENOSPC)));
        assert!(!is_disk_full(&io::Error::from_raw_os_error(libc::EACCES)));
    }
}
