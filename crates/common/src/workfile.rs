//! Opening a file inside a job's work directory on the job's behalf (its logs; anything the
//! client reads there while the job may still run). The job controls what is there, so every
//! open goes the way the archive's do: from a descriptor of the work directory, one
//! component at a time with `O_NOFOLLOW` (a link anywhere on the path is refused, never
//! followed), with `O_NONBLOCK` (a FIFO cannot park the opening thread), and the opened file
//! must be a regular file of the work directory's owner (with `--run-as`, a hard link to a
//! file the job could not read itself is refused). Nothing here ever blocks on what a job
//! made.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Why a file in a work directory was not opened.
#[derive(Debug, thiserror::Error)]
pub enum WorkFileError {
    /// A link, FIFO, socket, device or directory where a regular file belongs.
    #[error("{name} is {what}, not a regular file: not read")]
    NotRegular { name: String, what: &'static str },
    /// A file of another owner than the work directory's.
    #[error("{name} belongs to another user than the work directory: not read")]
    ForeignOwner { name: String },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Opens the work directory itself (no link as its last component), for [`open_regular`].
pub fn open_dir(dir: &Path) -> io::Result<File> {
    File::options()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)
}

/// Opens `relative` below the directory `root` for reading, as the module says. `Ok(None)`:
/// there is no such file.
pub fn open_regular(root: &File, relative: &Path) -> Result<Option<File>, WorkFileError> {
    let name = relative.display().to_string();
    let file = match crate::archive::open_beneath(root, relative, false) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) => {
            return Err(WorkFileError::NotRegular {
                name,
                what: "a symbolic link (or below one)",
            })
        }
        Err(e) => return Err(e.into()),
    };
    let meta = file.metadata()?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "a device"
        };
        return Err(WorkFileError::NotRegular { name, what });
    }
    if meta.uid() != root.metadata()?.uid() {
        return Err(WorkFileError::ForeignOwner { name });
    }
    Ok(Some(file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::time::{Duration, Instant};

    fn reason(root: &File, name: &str) -> String {
        open_regular(root, Path::new(name)).unwrap_err().to_string()
    }

    #[test]
    fn opens_regular_files_and_refuses_links_fifos_and_directories_at_once() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"SECRET").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("log"), b"hello").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("linkdir")).unwrap();
        let fifo = std::ffi::CString::new(dir.path().join("fifo").to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let root = open_dir(dir.path()).unwrap();

        let mut text = String::new();
        open_regular(&root, Path::new("log"))
            .unwrap()
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "hello");
        assert!(open_regular(&root, Path::new("missing")).unwrap().is_none());
        assert!(reason(&root, "link").contains("symbolic link"));
        assert!(reason(&root, "linkdir/secret").contains("symbolic link"));
        assert!(reason(&root, "sub").contains("directory"));
        let started = Instant::now();
        assert!(reason(&root, "fifo").contains("FIFO"));
        assert!(started.elapsed() < Duration::from_secs(5), "a FIFO blocked");
        // The work directory itself must not be a link either.
        std::os::unix::fs::symlink(dir.path(), outside.path().join("work")).unwrap();
        assert!(open_dir(&outside.path().join("work")).is_err());
    }

    #[test]
    fn refuses_a_file_of_another_owner_than_the_directory() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to give a file to another user");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mine"), b"ok").unwrap();
        std::fs::write(dir.path().join("theirs"), b"SECRET").unwrap();
        std::os::unix::fs::chown(dir.path().join("theirs"), Some(65534), None).unwrap();
        let root = open_dir(dir.path()).unwrap();
        assert!(open_regular(&root, Path::new("mine")).unwrap().is_some());
        assert!(reason(&root, "theirs").contains("another user"));
    }
}
