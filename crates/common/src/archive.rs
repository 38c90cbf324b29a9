//! Streams a directory as a ZIP archive in constant memory.
//!
//! Regular files that compress (text, sparse files, anything whose first 64 KiB deflate to
//! less than 90 %) are deflated, streamed at the fastest level; others are stored as they are.
//! Directories become directory entries, and symbolic links are stored as links: their target is never
//! followed, so no file outside the directory can reach the archive. Files are opened one path
//! component at a time with `O_NOFOLLOW`, so a running job that swaps a file or a directory
//! for a link while the archive is written cannot lead it out either. Other file types
//! (sockets, FIFOs, devices) are left out, and so are files of another owner than the
//! directory's (with `--run-as`, a hard link to a file the job could not read).
//!
//! Names that are not UTF-8 (a job may create any bytes) cannot be written as ZIP names
//! without changing them, and changed names could collide: such entries (and everything
//! below such a directory, and links whose target is not UTF-8) are left out, and the archive
//! ends with a note, [`SKIPPED_NOTE`], listing them with their bytes escaped.

use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::sync::mpsc;
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

/// Size of the chunks handed to the network.
const CHUNK: usize = 64 * 1024;
/// Chunks buffered between the archiving thread and the network.
const CHANNEL_DEPTH: usize = 4;
/// Longest the archiving thread waits for the network to take a chunk: a reader that takes
/// nothing for this long gets a cut stream (an error, never a short archive mistaken for a
/// whole one), and the blocking thread is free again.
const STALL_LIMIT: Duration = Duration::from_secs(120);
/// Archives given up because their reader took nothing for [`STALL_LIMIT`].
static STALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Above this size an entry is written with ZIP64 sizes.
const LARGE_FILE: u64 = 0xFFFF_0000;
/// How much of a file is tried with deflate to decide whether the file is deflated.
const SAMPLE: usize = 64 * 1024;
/// Name of the note listing the entries left out because their names are not UTF-8.
pub const SKIPPED_NOTE: &str = ".jobrelay.skipped-names.txt";

/// Writes `dir` as a ZIP archive to `out`.
pub fn write_zip<W: Write>(dir: &Path, out: W) -> io::Result<W> {
    let root = File::options()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)?;
    let mut listing = Listing::default();
    collect_entries(&root, Path::new(""), &mut listing)?;
    write_entries(&root, listing, out)
}

/// A ZIP archive of files held in memory (name relative to the job directory with '/',
/// bytes), as [`write_zip`] writes a directory holding them: a directory entry for each
/// directory on their paths, files readable by all (0644), deflated when that pays.
pub fn zip_of_files<'a>(
    files: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> io::Result<Vec<u8>> {
    let mut zip = ZipWriter::new(io::Cursor::new(Vec::new()));
    let mut dirs = std::collections::BTreeSet::new();
    for (name, bytes) in files {
        for (at, _) in name.match_indices('/') {
            let dir = &name[..=at];
            if dirs.insert(dir.to_owned()) {
                let options = SimpleFileOptions::default()
                    .compression_method(CompressionMethod::Stored)
                    .unix_permissions(0o755);
                zip.add_directory(dir, options).map_err(io::Error::other)?;
            }
        }
        let compressible = bytes.len() >= 64 && {
            let mut encoder = flate2::write::DeflateEncoder::new(
                Vec::with_capacity(bytes.len()),
                flate2::Compression::fast(),
            );
            encoder
                .write_all(&bytes[..bytes.len().min(SAMPLE)])
                .and_then(|_| encoder.finish())
                .is_ok_and(|c| c.len() * 10 < bytes.len().min(SAMPLE) * 9)
        };
        let options = SimpleFileOptions::default()
            .unix_permissions(0o644)
            .compression_method(if compressible {
                CompressionMethod::Deflated
            } else {
                CompressionMethod::Stored
            });
        let options = if compressible {
            options.compression_level(Some(1))
        } else {
            options
        };
        zip.start_file(name, options).map_err(io::Error::other)?;
        zip.write_all(bytes)?;
    }
    Ok(zip.finish().map_err(io::Error::other)?.into_inner())
}

/// Writes the listed entries of the directory `root` as a ZIP archive to `out`. Whatever
/// changed since the listing (a running job) cannot lead outside `root`.
fn write_entries<W: Write>(root: &File, listing: Listing, out: W) -> io::Result<W> {
    let mut zip = ZipWriter::new_stream(out);
    let owner = root.metadata()?.uid();
    // With names to list, the note is ours: a job's own file of that name cannot stand in
    // for it (it is left out, and the note says so).
    let note_needed = !listing.skipped.is_empty();
    let mut job_note_left_out = false;
    for (relative, meta, link) in listing.entries {
        let Some(name) = zip_name(&relative) else {
            continue;
        };
        if note_needed && name == SKIPPED_NOTE {
            job_note_left_out = true;
            continue;
        }
        let mode = meta.permissions().mode() & 0o7777;
        let options = SimpleFileOptions::default()
            .compression_method(CompressionMethod::Stored)
            .unix_permissions(mode)
            .large_file(meta.len() >= LARGE_FILE);
        let kind = meta.file_type();
        if let Some(target) = link {
            zip.add_symlink(name, target.to_string_lossy(), options)
                .map_err(io::Error::other)?;
        } else if kind.is_dir() {
            zip.add_directory(name, options).map_err(io::Error::other)?;
        } else if kind.is_file() {
            // Opened one component at a time without following any link, so a file or a
            // directory on its path swapped for a link since it was listed cannot lead out.
            let mut file = match open_beneath(root, &relative, false) {
                Ok(file) => file,
                // Removed or swapped for a link while we were archiving (a running job):
                // leave it out.
                Err(e) if vanished(&e) => continue,
                Err(e) => return Err(e),
            };
            let opened = file.metadata()?;
            // Swapped for a FIFO or a device: leave it out. A file of another owner than the
            // directory's (a hard link to a file the job could not read itself, made where
            // protected_hardlinks is off): leave it out.
            if !opened.file_type().is_file() || opened.uid() != owner {
                continue;
            }
            let mut sample = Vec::with_capacity(SAMPLE);
            (&mut file).take(SAMPLE as u64).read_to_end(&mut sample)?;
            let options = if worth_deflating(&sample, &opened) {
                options
                    .compression_method(CompressionMethod::Deflated)
                    .compression_level(Some(1))
            } else {
                options
            };
            zip.start_file(name, options).map_err(io::Error::other)?;
            zip.write_all(&sample)?;
            let rest = meta.len().saturating_sub(sample.len() as u64);
            drop(sample);
            // No more than the size listed (and announced to the ZIP writer): a job that keeps
            // writing the file cannot make the archive endless, nor outgrow its header.
            io::copy(&mut (&mut file).take(rest), &mut zip)?;
        }
    }
    if note_needed {
        let mut note = String::from(
            "Left out of this archive: their names are not UTF-8 (bytes shown escaped).\n",
        );
        if job_note_left_out {
            note.push_str(&format!(
                "(The job's own {SKIPPED_NOTE} was left out too.)\n"
            ));
        }
        for path in &listing.skipped {
            note.push_str(
                &path
                    .as_os_str()
                    .as_encoded_bytes()
                    .escape_ascii()
                    .to_string(),
            );
            note.push('\n');
        }
        let options = SimpleFileOptions::default()
            .compression_method(CompressionMethod::Stored)
            .unix_permissions(0o644);
        zip.start_file(SKIPPED_NOTE, options)
            .map_err(io::Error::other)?;
        zip.write_all(note.as_bytes())?;
    }
    let stream = zip.finish().map_err(io::Error::other)?;
    Ok(stream.into_inner())
}

/// Whether a file is deflated: when it has holes (a sparse file: zeros that cost the job
/// nothing would cost the network and the server their full size), or when its first bytes
/// shrink by at least a tenth at deflate's fastest level. Small files are deflated when that
/// helps too; already compressed data (images, archives) is stored as it is.
fn worth_deflating(sample: &[u8], meta: &Metadata) -> bool {
    if sample.len() < 64 {
        return false;
    }
    let allocated = meta.blocks().saturating_mul(512);
    if allocated.saturating_add(SAMPLE as u64) < meta.len() {
        return true;
    }
    let mut encoder = flate2::write::DeflateEncoder::new(
        Vec::with_capacity(sample.len()),
        flate2::Compression::fast(),
    );
    match encoder.write_all(sample).and_then(|_| encoder.finish()) {
        Ok(compressed) => compressed.len() * 10 < sample.len() * 9,
        Err(_) => false,
    }
}

/// Opens `relative` below the directory `root` one component at a time with `O_NOFOLLOW`
/// (directories on the way with `O_DIRECTORY`), so no symbolic link anywhere on the path is
/// followed. The last component is opened as a directory if `directory`, else with
/// `O_NONBLOCK` so that a FIFO put in a file's place does not block the opening.
pub(crate) fn open_beneath(root: &File, relative: &Path, directory: bool) -> io::Result<File> {
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::ffi::OsStrExt;
    let components: Vec<_> = relative.components().collect();
    let mut dir: Option<File> = None;
    for (i, component) in components.iter().enumerate() {
        let std::path::Component::Normal(part) = component else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "unexpected path",
            ));
        };
        let name = CString::new(part.as_bytes()).map_err(io::Error::other)?;
        let last = i + 1 == components.len();
        let flags = libc::O_RDONLY
            | libc::O_NOFOLLOW
            | libc::O_CLOEXEC
            | if last && !directory {
                libc::O_NONBLOCK
            } else {
                libc::O_DIRECTORY
            };
        let at = dir.as_ref().unwrap_or(root).as_raw_fd();
        // SAFETY: `at` is an open directory descriptor and `name` a NUL-terminated string;
        // the descriptor returned is owned by the `File` made from it.
        let fd = unsafe { libc::openat(at, name.as_ptr(), flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let file = unsafe { File::from_raw_fd(fd) };
        if last {
            return Ok(file);
        }
        dir = Some(file);
    }
    Err(io::Error::new(io::ErrorKind::InvalidInput, "empty path"))
}

/// One entry to archive: its path below the root, its metadata, and for a link its target.
type Entry = (PathBuf, Metadata, Option<PathBuf>);

/// What [`collect_entries`] found: the entries to archive, and the paths left out because
/// their name (or a link's target) is not UTF-8.
#[derive(Default)]
struct Listing {
    entries: Vec<Entry>,
    skipped: Vec<PathBuf>,
}

/// Lists every entry below `root` (depth first, sorted by name) without following links:
/// each directory is opened with [`open_beneath`] and read through its descriptor, so a
/// directory swapped for a link since its parent was listed is left out, not followed.
fn collect_entries(root: &File, relative: &Path, out: &mut Listing) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let dir = if relative.as_os_str().is_empty() {
        root.try_clone()?
    } else {
        match open_beneath(root, relative, true) {
            Ok(dir) => dir,
            // Removed or swapped for a link (a running job): nothing of it goes in.
            Err(e) if vanished(&e) => return Ok(()),
            Err(e) => return Err(e),
        }
    };
    // The descriptor's own path: names below it resolve in that very directory.
    let base = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    let mut children: Vec<_> = fs::read_dir(&base)?
        .collect::<io::Result<Vec<_>>>()?
        .into_iter()
        .map(|entry| entry.file_name())
        .collect();
    children.sort();
    for name in children {
        let child = relative.join(&name);
        if name.to_str().is_none() {
            out.skipped.push(child);
            continue;
        }
        let meta = match fs::symlink_metadata(base.join(&name)) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let kind = meta.file_type();
        if kind.is_symlink() {
            match fs::read_link(base.join(&name)) {
                Ok(target) if target.to_str().is_none() => out.skipped.push(child),
                Ok(target) => out.entries.push((child, meta, Some(target))),
                Err(e) if vanished(&e) || e.kind() == io::ErrorKind::InvalidInput => {}
                Err(e) => return Err(e),
            }
        } else if kind.is_dir() {
            out.entries.push((child.clone(), meta, None));
            collect_entries(root, &child, out)?;
        } else if kind.is_file() {
            out.entries.push((child, meta, None));
        }
    }
    Ok(())
}

/// An entry removed, or swapped for a link or a file, while a job runs.
fn vanished(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
        || e.raw_os_error() == Some(libc::ELOOP)
        || e.raw_os_error() == Some(libc::ENOTDIR)
}

/// The entry's name in the archive (components joined by '/'); `None` if it is not UTF-8
/// (the listing leaves those out already).
fn zip_name(relative: &Path) -> Option<String> {
    relative
        .components()
        .map(|c| c.as_os_str().to_str())
        .collect::<Option<Vec<_>>>()
        .map(|parts| parts.join("/"))
}

/// Hands bytes written by the archiving thread to an async receiver, in bounded chunks.
struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: BytesMut,
    runtime: tokio::runtime::Handle,
    stall_limit: Duration,
}

impl ChannelWriter {
    fn send_buffer(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        let sent = self.runtime.block_on(tokio::time::timeout(
            self.stall_limit,
            self.tx.send(Ok(chunk)),
        ));
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "receiver went away",
            )),
            Err(_) => Err({
                STALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                metrics::counter!("jobrelay_archive_stalls_total").increment(1);
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the reader took nothing for {:?}", self.stall_limit),
                )
            }),
        }
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send_buffer()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffer()
    }
}

/// Streams `dir` as a ZIP archive. The archive is produced on a blocking thread; an error
/// midway ends the stream with that error, so a consumer never mistakes a cut archive for a
/// whole one.
pub fn zip_stream(dir: PathBuf) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    zip_stream_with_stall_limit(dir, STALL_LIMIT)
}

/// [`zip_stream`] with another bound on how long a reader may take nothing.
fn zip_stream_with_stall_limit(
    dir: PathBuf,
    stall_limit: Duration,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    let runtime = tokio::runtime::Handle::current();
    let whole = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let finished = whole.clone();
    tokio::task::spawn_blocking(move || {
        let writer = ChannelWriter {
            tx: tx.clone(),
            buf: BytesMut::with_capacity(CHUNK),
            runtime,
            stall_limit,
        };
        let result = write_zip(&dir, writer).and_then(|mut writer| writer.flush());
        match result {
            Ok(()) => finished.store(true, std::sync::atomic::Ordering::SeqCst),
            Err(e) => {
                if e.kind() != io::ErrorKind::BrokenPipe {
                    tracing::warn!(dir = %dir.display(), error = %e, "archiving failed");
                }
                // Never waits: a full channel (a reader taking nothing) cannot take the
                // error, and the stream below reports the cut itself.
                let _ = tx.try_send(Err(e));
            }
        }
    });
    // The stream ends with an error unless the archive was written whole, also when the
    // error itself could not be queued.
    futures_util::stream::unfold(Some((rx, whole)), |state| async move {
        let (mut rx, whole) = state?;
        match rx.recv().await {
            Some(Err(e)) => Some((Err(e), None)),
            Some(Ok(chunk)) => Some((Ok(chunk), Some((rx, whole)))),
            None if whole.load(std::sync::atomic::Ordering::SeqCst) => None,
            None => Some((Err(io::Error::other("the archive was cut short")), None)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn names_in(archive: &[u8]) -> Vec<String> {
        let mut zip = zip::ZipArchive::new(io::Cursor::new(archive)).unwrap();
        (0..zip.len())
            .map(|i| zip.by_index(i).unwrap().name().unwrap().to_string())
            .collect()
    }

    #[test]
    fn archives_files_directories_and_links_without_following_them() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"do not leak").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("out.txt"), b"hello").unwrap();
        std::fs::create_dir_all(dir.path().join("sub/empty")).unwrap();
        std::fs::write(dir.path().join("sub/b.txt"), b"b").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("linkdir")).unwrap();

        let bytes = write_zip(dir.path(), Vec::new()).unwrap();
        assert!(!bytes.windows(11).any(|w| w == b"do not leak"));
        let names = names_in(&bytes);
        assert_eq!(
            names,
            [
                "link",
                "linkdir",
                "out.txt",
                "sub/",
                "sub/b.txt",
                "sub/empty/"
            ]
        );
        let mut zip = zip::ZipArchive::new(io::Cursor::new(&bytes)).unwrap();
        let mut content = String::new();
        zip.by_name("out.txt")
            .unwrap()
            .read_to_string(&mut content)
            .unwrap();
        assert_eq!(content, "hello");
        assert!(zip.by_name("link").unwrap().is_symlink());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_reader_that_takes_nothing_frees_the_archiving_thread() {
        use futures_util::StreamExt;
        let dir = tempfile::tempdir().unwrap();
        // More than the channel holds, so the archiving thread has to wait for the reader;
        // incompressible, so deflate does not shrink it below that.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..CHUNK * (CHANNEL_DEPTH + 4))
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        std::fs::write(dir.path().join("big"), noise).unwrap();
        let mut stream = Box::pin(zip_stream_with_stall_limit(
            dir.path().to_path_buf(),
            Duration::from_millis(200),
        ));
        let first = stream.next().await.unwrap();
        assert!(first.is_ok());
        // Take nothing until the archiving thread gave up; then what it had queued is read
        // and the stream ends with an error, not as if the archive were whole.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while STALLS.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the thread never gave up"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut ended_with_error = false;
        while let Some(item) = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("the stream neither ended nor gave more")
        {
            if item.is_err() {
                ended_with_error = true;
            }
        }
        assert!(ended_with_error, "a stalled archive ended as if whole");
    }

    #[test]
    fn open_beneath_follows_no_link_on_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"secret").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/ok"), b"ok").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("linkdir")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("link")).unwrap();
        let root = File::open(dir.path()).unwrap();
        let mut text = String::new();
        io::Read::read_to_string(
            &mut open_beneath(&root, Path::new("sub/ok"), false).unwrap(),
            &mut text,
        )
        .unwrap();
        assert_eq!(text, "ok");
        assert!(open_beneath(&root, Path::new("sub"), true).is_ok());
        assert!(open_beneath(&root, Path::new("linkdir"), true).is_err());
        for path in ["linkdir/secret", "link"] {
            let e = open_beneath(&root, Path::new(path), false).unwrap_err();
            assert!(
                matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)),
                "{path}: {e}"
            );
        }
    }

    #[test]
    fn entries_swapped_for_links_after_listing_stay_out() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("file"), b"SECRET").unwrap();
        std::fs::write(outside.path().join("other"), b"SECRET").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/file"), b"harmless").unwrap();
        std::fs::write(dir.path().join("other"), b"harmless").unwrap();
        let root = File::open(dir.path()).unwrap();
        let mut entries = Listing::default();
        collect_entries(&root, Path::new(""), &mut entries).unwrap();
        // The job swaps a directory and a file for links once they were listed.
        std::fs::rename(dir.path().join("sub"), dir.path().join("sub.old")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("sub")).unwrap();
        std::fs::remove_file(dir.path().join("other")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("other"), dir.path().join("other")).unwrap();
        let bytes = write_entries(&root, entries, Vec::new()).unwrap();
        let mut zip = zip::ZipArchive::new(io::Cursor::new(bytes)).unwrap();
        for i in 0..zip.len() {
            let mut entry = zip.by_index(i).unwrap();
            let mut content = Vec::new();
            io::Read::read_to_end(&mut entry, &mut content).unwrap();
            assert_ne!(content, b"SECRET", "{:?}", entry.name());
        }
        // Listing after the swap does not follow the directory link either.
        let mut listing = Listing::default();
        collect_entries(&root, Path::new(""), &mut listing).unwrap();
        let entries = listing.entries;
        assert!(entries
            .iter()
            .all(|(path, _, _)| path == Path::new("sub") || !path.starts_with("sub")));
        assert!(entries
            .iter()
            .any(|(path, _, link)| path == Path::new("sub") && link.is_some()));
    }

    fn read_entry(archive: &[u8], name: &str) -> (CompressionMethod, u64, Vec<u8>) {
        let mut zip = zip::ZipArchive::new(io::Cursor::new(archive)).unwrap();
        let mut entry = zip.by_name(name).unwrap();
        let (method, compressed) = (entry.compression(), entry.compressed_size());
        let mut content = Vec::new();
        entry.read_to_end(&mut content).unwrap();
        (method, compressed, content)
    }

    /// Bytes that deflate cannot shrink (a xorshift sequence).
    fn noise(len: usize) -> Vec<u8> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn text_and_sparse_files_are_deflated_and_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let text = "residue 42 chain A\n".repeat(20_000);
        std::fs::write(dir.path().join("log.txt"), &text).unwrap();
        // 64 MiB of holes but a few bytes: costs the job nothing on disk.
        let sparse = File::create(dir.path().join("sparse.bin")).unwrap();
        sparse.set_len(64 << 20).unwrap();
        std::os::unix::fs::FileExt::write_at(&sparse, b"end", (64 << 20) - 3).unwrap();
        drop(sparse);
        let random = noise(300_000);
        std::fs::write(dir.path().join("random.bin"), &random).unwrap();
        std::fs::write(dir.path().join("tiny"), b"x").unwrap();

        let bytes = write_zip(dir.path(), Vec::new()).unwrap();
        // The whole archive is far smaller than what it holds.
        assert!(bytes.len() < 400_000 + 300_000, "{} bytes", bytes.len());

        let (method, compressed, content) = read_entry(&bytes, "log.txt");
        assert_eq!(method, CompressionMethod::Deflated);
        assert!(compressed * 50 < text.len() as u64, "{compressed}");
        assert_eq!(content, text.as_bytes());

        let (method, compressed, content) = read_entry(&bytes, "sparse.bin");
        assert_eq!(method, CompressionMethod::Deflated);
        assert!(compressed < (64 << 20) / 100, "{compressed}");
        assert_eq!(content.len(), 64 << 20);
        assert!(content[..content.len() - 3].iter().all(|&b| b == 0));
        assert_eq!(&content[content.len() - 3..], b"end");

        let (method, _, content) = read_entry(&bytes, "random.bin");
        assert_eq!(method, CompressionMethod::Stored);
        assert_eq!(content, random);

        let (method, _, content) = read_entry(&bytes, "tiny");
        assert_eq!(method, CompressionMethod::Stored);
        assert_eq!(content, b"x");
    }

    #[test]
    fn names_that_are_not_utf8_are_left_out_with_a_note() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ok.txt"), b"ok").unwrap();
        // Two names that a lossy conversion would both turn into "bad\u{FFFD}".
        std::fs::write(dir.path().join(OsStr::from_bytes(b"bad\xff")), b"1").unwrap();
        std::fs::write(dir.path().join(OsStr::from_bytes(b"bad\xfe")), b"2").unwrap();
        let sub = dir.path().join(OsStr::from_bytes(b"dir\xff"));
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("inside"), b"3").unwrap();
        std::os::unix::fs::symlink(OsStr::from_bytes(b"to\xff"), dir.path().join("link")).unwrap();

        let bytes = write_zip(dir.path(), Vec::new()).unwrap();
        assert_eq!(names_in(&bytes), ["ok.txt", SKIPPED_NOTE]);
        let (_, _, note) = read_entry(&bytes, SKIPPED_NOTE);
        let note = String::from_utf8(note).unwrap();
        for escaped in ["bad\\xff", "bad\\xfe", "dir\\xff", "link"] {
            assert!(note.contains(escaped), "{escaped} in {note}");
        }
        assert!(!note.contains("inside"), "{note}");
    }

    #[test]
    fn a_jobs_own_note_cannot_stand_in_for_the_real_one() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SKIPPED_NOTE), b"nothing was left out").unwrap();
        std::fs::write(dir.path().join(OsStr::from_bytes(b"bad\xff")), b"1").unwrap();
        let bytes = write_zip(dir.path(), Vec::new()).unwrap();
        assert_eq!(names_in(&bytes), [SKIPPED_NOTE]);
        let (_, _, note) = read_entry(&bytes, SKIPPED_NOTE);
        let note = String::from_utf8(note).unwrap();
        assert!(note.contains("bad\\xff"), "{note}");
        assert!(note.contains("own"), "{note}");
    }
}
