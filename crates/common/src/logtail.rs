//! Reading a window of a job's stdout or stderr file: the bytes from an offset, bounded, so a
//! caller can follow a growing log by asking again from where it stopped.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::protocol::{STDERR_FILE, STDOUT_FILE};

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

/// Reads up to [`MAX_CHUNK`] bytes of `path` from `offset`. A missing file reads as empty.
pub fn read_from(path: &Path, offset: u64) -> std::io::Result<Vec<u8>> {
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
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
        let path = dir.path().join("log");
        assert!(read_from(&path, 0).unwrap().is_empty());
        std::fs::write(&path, b"hello world").unwrap();
        assert_eq!(read_from(&path, 6).unwrap(), b"world");
        assert!(read_from(&path, 99).unwrap().is_empty());
        assert_eq!(Stream::parse(Some("stderr")).unwrap(), Stream::Stderr);
        assert!(Stream::parse(Some("x")).is_err());
    }
}
