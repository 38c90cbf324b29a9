//! Reading a window of a job's stdout or stderr file: the bytes from an offset, bounded, so a
//! caller can follow a growing log by asking again from where it stopped.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::protocol::{STDERR_FILE, STDOUT_FILE};
use crate::workfile::{self, WorkFileError};

/// Most bytes returned by one read.
pub const MAX_CHUNK: u64 = 1024 * 1024;
/// Header naming the offset to ask for next.
pub const NEXT_OFFSET_HEADER: &str = "x-log-next-offset";

/// Which of the two output files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    /// Parses `stdout` / `stderr` (absent means stdout).
    pub fn parse(text: Option<&str>) -> Result<Self, String> {
        match text {
            None | Some("stdout") => Ok(Stream::Stdout),
            Some("stderr") => Ok(Stream::Stderr),
            Some(other) => Err(format!("stream must be stdout or stderr, not {other:?}")),
        }
    }

    pub fn file_name(self) -> &'static str {
        match self {
            Stream::Stdout => STDOUT_FILE,
            Stream::Stderr => STDERR_FILE,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Reads up to [`MAX_CHUNK`] bytes of the log `stream` in the work directory `dir` from
/// `offset`. A missing file reads as empty. The job owns that directory: the log is opened
/// the way [`crate::workfile`] says, so a link, a FIFO or another user's file in its place is
/// an error, never read (and never blocks).
pub fn read_from(dir: &Path, stream: Stream, offset: u64) -> Result<Vec<u8>, WorkFileError> {
    let root = workfile::open_dir(dir)?;
    let Some(mut file) = workfile::open_regular(&root, Path::new(stream.file_name()))? else {
        return Ok(Vec::new());
    };
    file.seek(SeekFrom::Start(offset))?;
    let mut bytes = Vec::new();
    file.take(MAX_CHUNK).read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_windows_of_a_growing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STDOUT_FILE);
        assert!(read_from(dir.path(), Stream::Stdout, 0).unwrap().is_empty());
        std::fs::write(&path, b"hello world").unwrap();
        assert_eq!(read_from(dir.path(), Stream::Stdout, 6).unwrap(), b"world");
        assert!(read_from(dir.path(), Stream::Stdout, 99)
            .unwrap()
            .is_empty());
        assert_eq!(Stream::parse(Some("stderr")).unwrap(), Stream::Stderr);
        assert!(Stream::parse(Some("x")).is_err());
    }

    #[test]
    fn a_log_swapped_for_a_link_is_refused_not_followed() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("shadow"), b"SECRET").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path().join("shadow"), dir.path().join(STDERR_FILE))
            .unwrap();
        let error = read_from(dir.path(), Stream::Stderr, 0).unwrap_err();
        assert!(matches!(error, WorkFileError::NotRegular { .. }), "{error}");
    }
}
