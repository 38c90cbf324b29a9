//! Receives a multipart upload into a fresh staging directory, streaming every file to disk
//! as it arrives. The directory is removed again unless the caller persists it, so a refused
//! or broken upload leaves nothing behind. [`receive_keeping_small`] holds an upload whose
//! files total at most a bound in memory instead (no directory, no file), and spills it to a
//! staging directory as soon as it passes the bound.
//!
//! Every part that has a filename is a file, whatever its field name, as in the deployed
//! reference (its server sends `/submit` with one part per file, named by the file's path
//! relative to the job directory; platforms post `-F pdb=@x.pdb` or repeated `-F files=@…`).
//! [`stored_name`] says where such a file lands. Other text fields are kept for the endpoint,
//! which ignores those it does not use.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use axum::extract::multipart::{Field, Multipart};
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, StatusCode};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::filename::NameSet;
use crate::fsutil::{is_disk_full, remove_dir_all_if_exists, unique_name};

/// Name of the multipart field whose filename may carry sub-directories (`a/b.pdb`).
pub const FILE_FIELD: &str = "file";
/// Largest accepted text field, in bytes.
pub const MAX_TEXT_FIELD: usize = 64 * 1024;
/// Slack allowed for multipart framing when comparing `Content-Length` with the size limit.
const FRAMING_SLACK: u64 = 1024 * 1024;
const WRITE_BUFFER: usize = 256 * 1024;
/// After refusing an upload, up to this many more bytes are read and discarded, so that the
/// sender finishes writing and reads the error instead of a reset connection.
const DRAIN_LIMIT: u64 = 64 * 1024 * 1024;

/// Why an upload was refused.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("malformed multipart request: {0}")]
    Malformed(String),
    #[error("no file in the upload: send one or more multipart parts with a filename (e.g. curl -F file=@run.sh)")]
    NoFiles,
    #[error("bad file name {name:?}: {why}")]
    BadName { name: String, why: String },
    #[error("text field {0:?} is larger than {MAX_TEXT_FIELD} bytes")]
    FieldTooLarge(String),
    #[error("upload is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("upload has more than {limit} files, the most accepted")]
    TooManyFiles { limit: usize },
    #[error("not enough disk space to store the upload")]
    DiskFull,
    #[error("could not store the upload: {0}")]
    Io(io::Error),
}

impl UploadError {
    /// The HTTP status that tells a caller what went wrong.
    pub fn status(&self) -> StatusCode {
        match self {
            UploadError::TooLarge { .. } | UploadError::TooManyFiles { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            UploadError::DiskFull => StatusCode::INSUFFICIENT_STORAGE,
            UploadError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    fn from_io(error: io::Error) -> Self {
        if is_disk_full(&error) {
            UploadError::DiskFull
        } else {
            UploadError::Io(error)
        }
    }
}

/// A directory that is deleted when dropped, unless persisted.
#[derive(Debug)]
pub struct StagingDir {
    path: PathBuf,
    keep: bool,
}

impl StagingDir {
    pub fn create(root: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(root)?;
        let path = root.join(unique_name("upload-"));
        std::fs::create_dir(&path)?;
        Ok(StagingDir { path, keep: false })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the directory to `dest` (same file system) and stops guarding it.
    pub fn persist(mut self, dest: &Path) -> io::Result<()> {
        std::fs::rename(&self.path, dest)?;
        self.keep = true;
        Ok(())
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.keep {
            if let Err(e) = remove_dir_all_if_exists(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "could not remove staging directory");
            }
        }
    }
}

/// A complete upload, still in its staging directory.
#[derive(Debug)]
pub struct ReceivedUpload {
    pub staging: StagingDir,
    /// Stored file names, in arrival order.
    pub files: Vec<String>,
    /// Text fields (the last value wins when a name repeats).
    pub fields: BTreeMap<String, String>,
    pub total_bytes: u64,
}

/// A complete upload from [`receive_keeping_small`]: its files in memory, or in a staging
/// directory once they passed the bound.
#[derive(Debug)]
pub struct KeptUpload {
    /// Stored file names, in arrival order.
    pub files: Vec<String>,
    /// Text fields (the last value wins when a name repeats).
    pub fields: BTreeMap<String, String>,
    pub total_bytes: u64,
    pub contents: Contents,
}

/// Where the files of a [`KeptUpload`] are.
#[derive(Debug)]
pub enum Contents {
    /// Every file's bytes, in the order of [`KeptUpload::files`]; nothing is on disk.
    InMemory(Vec<bytes::Bytes>),
    /// In a staging directory, as [`receive`] leaves them.
    Staged(StagingDir),
}

/// Refuses a request at once when its declared length is far beyond the limit.
pub fn check_content_length(headers: &HeaderMap, limit: u64) -> Result<(), UploadError> {
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(length) if length > limit.saturating_add(FRAMING_SLACK) => {
            Err(UploadError::TooLarge { limit })
        }
        _ => Ok(()),
    }
}

/// Receives a whole upload request: refuses a declared length far over `limit` at once,
/// parses the multipart body with [`receive`], and on refusal drains what the sender is still
/// sending (up to a bound) so that it reads the error.
pub async fn receive_request(
    request: Request,
    staging_root: &Path,
    limit: u64,
) -> Result<ReceivedUpload, UploadError> {
    if let Err(e) = check_content_length(request.headers(), limit) {
        drain_body(request.into_body(), DRAIN_LIMIT).await;
        return Err(e);
    }
    let multipart = Multipart::from_request(request, &())
        .await
        .map_err(|e| UploadError::Malformed(format!("expected a multipart/form-data body: {e}")))?;
    receive(multipart, staging_root, limit).await
}

/// Reads and drops what is left of a request's body, up to a bound, so that a sender still
/// writing it reads the error answer instead of a reset connection (a server that closes a
/// connection with unread data makes the kernel reset it).
pub async fn drain_body(body: axum::body::Body, limit: u64) {
    let mut stream = body.into_data_stream();
    let mut drained = 0u64;
    while let Some(Ok(chunk)) = stream.next().await {
        drained += chunk.len() as u64;
        if drained > limit {
            break;
        }
    }
}

async fn drain_multipart(multipart: &mut Multipart) {
    let mut drained = 0u64;
    while let Ok(Some(mut field)) = multipart.next_field().await {
        while let Ok(Some(chunk)) = field.chunk().await {
            drained += chunk.len() as u64;
            if drained > DRAIN_LIMIT {
                return;
            }
        }
    }
}

/// Reads the whole multipart body: files into a new directory under `staging_root`, text
/// fields into a map. At most `limit` bytes of file content are accepted in total.
pub async fn receive(
    multipart: Multipart,
    staging_root: &Path,
    limit: u64,
) -> Result<ReceivedUpload, UploadError> {
    receive_at_most(multipart, staging_root, limit, usize::MAX).await
}

/// [`receive`], refusing the upload as soon as it brings more than `max_files` files (so a
/// body of a million tiny files does not fill the staging directory first).
pub async fn receive_at_most(
    multipart: Multipart,
    staging_root: &Path,
    limit: u64,
    max_files: usize,
) -> Result<ReceivedUpload, UploadError> {
    let upload = receive_kept(multipart, staging_root, limit, max_files, None).await?;
    match upload.contents {
        Contents::Staged(staging) => Ok(ReceivedUpload {
            staging,
            files: upload.files,
            fields: upload.fields,
            total_bytes: upload.total_bytes,
        }),
        Contents::InMemory(_) => unreachable!("no bound given: every upload is staged"),
    }
}

/// [`receive_at_most`], holding the files in memory while they total at most `in_memory`
/// bytes: such an upload touches no disk ([`Contents::InMemory`]). The first byte past the
/// bound makes a staging directory, writes the files held so far into it and goes on as
/// [`receive_at_most`] does ([`Contents::Staged`]). Names, limits and errors are the same
/// either way.
pub async fn receive_keeping_small(
    multipart: Multipart,
    staging_root: &Path,
    limit: u64,
    max_files: usize,
    in_memory: u64,
) -> Result<KeptUpload, UploadError> {
    receive_kept(multipart, staging_root, limit, max_files, Some(in_memory)).await
}

async fn receive_kept(
    mut multipart: Multipart,
    staging_root: &Path,
    limit: u64,
    max_files: usize,
    in_memory: Option<u64>,
) -> Result<KeptUpload, UploadError> {
    let result = receive_fields(&mut multipart, staging_root, limit, max_files, in_memory).await;
    if let Err(e) = &result {
        if !matches!(e, UploadError::Malformed(_)) {
            drain_multipart(&mut multipart).await;
        }
    }
    result
}

/// Files held in memory so far: path relative to the job directory, bytes.
type Held = Vec<(PathBuf, bytes::Bytes)>;

/// Makes a staging directory under `root` and writes the files `held` into it, in one
/// blocking call.
async fn spill(root: &Path, held: Held) -> Result<StagingDir, UploadError> {
    let root = root.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let staging = StagingDir::create(&root)?;
        for (relative, bytes) in held {
            let dest = staging.path().join(relative);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&dest, &bytes)?;
        }
        Ok::<_, io::Error>(staging)
    })
    .await
    .map_err(|e| UploadError::from_io(io::Error::other(e)))?
    .map_err(UploadError::from_io)
}

async fn receive_fields(
    multipart: &mut Multipart,
    staging_root: &Path,
    limit: u64,
    max_files: usize,
    in_memory: Option<u64>,
) -> Result<KeptUpload, UploadError> {
    // Without a bound the staging directory is made first, as it always was.
    let mut staging = match in_memory {
        None => Some(StagingDir::create(staging_root).map_err(UploadError::from_io)?),
        Some(_) => None,
    };
    let mut held: Held = Vec::new();
    let mut upload = KeptUpload {
        files: Vec::new(),
        fields: BTreeMap::new(),
        total_bytes: 0,
        contents: Contents::InMemory(Vec::new()),
    };
    let mut names = NameSet::default();
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| UploadError::Malformed(e.body_text()))?
    {
        let field_name =
            crate::disposition::field_name(field.name(), field.headers()).unwrap_or_default();
        match field.file_name().map(str::to_owned) {
            Some(file_name) if file_name.is_empty() => {
                // A browser's form sends an unfilled file input as a part with an empty
                // filename and no content: nothing was chosen, so nothing is stored.
                let mut field = field;
                let chunk = field
                    .chunk()
                    .await
                    .map_err(|e| UploadError::Malformed(e.body_text()))?;
                if chunk.is_some_and(|c| !c.is_empty()) {
                    return Err(UploadError::BadName {
                        name: String::new(),
                        why: format!("the part {field_name:?} has content but an empty filename"),
                    });
                }
            }
            Some(file_name) => {
                if upload.files.len() >= max_files {
                    return Err(UploadError::TooManyFiles { limit: max_files });
                }
                let name = stored_name(&field_name, &file_name).to_owned();
                let relative = names.admit(&name).map_err(|why| UploadError::BadName {
                    name: name.clone(),
                    why,
                })?;
                let mut field = field;
                let (head, ended) = read_head(&mut field, limit, &mut upload.total_bytes).await?;
                let bound = in_memory.unwrap_or(0);
                if staging.is_none() && ended && upload.total_bytes <= bound {
                    held.push((relative, head.into()));
                } else {
                    if staging.is_none() {
                        staging = Some(spill(staging_root, std::mem::take(&mut held)).await?);
                    }
                    let dest = staging.as_ref().expect("staged").path().join(relative);
                    store_file(field, head, ended, &dest, limit, &mut upload.total_bytes).await?;
                }
                upload.files.push(name);
            }
            None if field_name == FILE_FIELD => {
                return Err(UploadError::BadName {
                    name: String::new(),
                    why: "the 'file' field has no file name".into(),
                });
            }
            None => {
                let value = read_text_field(field, &field_name).await?;
                upload.fields.insert(field_name, value);
            }
        }
    }
    if upload.files.is_empty() {
        return Err(UploadError::NoFiles);
    }
    upload.contents = match staging {
        Some(staging) => Contents::Staged(staging),
        None => Contents::InMemory(held.into_iter().map(|(_, bytes)| bytes).collect()),
    };
    Ok(upload)
}

/// Where a part with a filename lands, relative to the job directory:
/// - in a field named [`FILE_FIELD`], at its filename (which may hold sub-directories);
/// - in any other field, at the field name when that is a valid relative path whose last
///   component is the filename (the reference server's `/submit`: field `data/a.pdb`,
///   filename `a.pdb`), otherwise at the filename (`-F pdb=@x.pdb` stores `x.pdb`).
///
/// The name returned still goes through [`NameSet::admit`], so the same rules hold whichever
/// way it came.
pub fn stored_name<'a>(field_name: &'a str, file_name: &'a str) -> &'a str {
    if field_name == FILE_FIELD {
        return file_name;
    }
    let last_component = field_name.rsplit('/').next().unwrap_or_default();
    if last_component == file_name && crate::filename::validate(field_name).is_ok() {
        field_name
    } else {
        file_name
    }
}

/// A file whose content ends within this many bytes is gathered in memory and written in
/// one blocking call (directory, create, write) rather than one per operation.
const SMALL_FILE: usize = 64 * 1024;

/// Reads a file part until it ends or holds more than [`SMALL_FILE`] bytes: the bytes read,
/// and whether the part ended. Counts them against `limit`.
async fn read_head(
    field: &mut Field<'_>,
    limit: u64,
    total: &mut u64,
) -> Result<(Vec<u8>, bool), UploadError> {
    let mut head = Vec::new();
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| UploadError::Malformed(e.body_text()))?
    {
        *total += chunk.len() as u64;
        if *total > limit {
            return Err(UploadError::TooLarge { limit });
        }
        head.extend_from_slice(&chunk);
        if head.len() > SMALL_FILE {
            return Ok((head, false));
        }
    }
    Ok((head, true))
}

/// Writes a file part to `dest`: `head`, read by [`read_head`], then the rest of the part
/// unless it `ended` (a small file: written in one blocking call).
async fn store_file(
    mut field: Field<'_>,
    head: Vec<u8>,
    ended: bool,
    dest: &Path,
    limit: u64,
    total: &mut u64,
) -> Result<(), UploadError> {
    if ended {
        let dest = dest.to_path_buf();
        return tokio::task::spawn_blocking(move || {
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&dest, &head)
        })
        .await
        .map_err(|e| UploadError::from_io(io::Error::other(e)))?
        .map_err(UploadError::from_io);
    }
    if let Some(parent) = dest.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(UploadError::from_io)?;
    }
    let file = tokio::fs::File::create(dest)
        .await
        .map_err(UploadError::from_io)?;
    let mut out = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, file);
    out.write_all(&head).await.map_err(UploadError::from_io)?;
    drop(head);
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| UploadError::Malformed(e.body_text()))?
    {
        *total += chunk.len() as u64;
        if *total > limit {
            return Err(UploadError::TooLarge { limit });
        }
        out.write_all(&chunk).await.map_err(UploadError::from_io)?;
    }
    out.flush().await.map_err(UploadError::from_io)?;
    Ok(())
}

async fn read_text_field(mut field: Field<'_>, name: &str) -> Result<String, UploadError> {
    let mut value = Vec::new();
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| UploadError::Malformed(e.body_text()))?
    {
        if value.len() + chunk.len() > MAX_TEXT_FIELD {
            return Err(UploadError::FieldTooLarge(name.to_owned()));
        }
        value.extend_from_slice(&chunk);
    }
    String::from_utf8(value)
        .map_err(|_| UploadError::Malformed(format!("text field {name:?} is not UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::stored_name;

    #[test]
    fn a_file_lands_where_its_field_and_filename_say() {
        // Our form: the filename may hold sub-directories.
        assert_eq!(stored_name("file", "data/a.pdb"), "data/a.pdb");
        assert_eq!(stored_name("file", "run.sh"), "run.sh");
        // The reference server's /submit: the field is the relative path, the filename its base.
        assert_eq!(stored_name("data/a.pdb", "a.pdb"), "data/a.pdb");
        assert_eq!(stored_name("run.sh", "run.sh"), "run.sh");
        // Any other field name: the filename.
        assert_eq!(stored_name("pdb", "x.pdb"), "x.pdb");
        assert_eq!(stored_name("files", "b/c.txt"), "b/c.txt");
        assert_eq!(stored_name("data/a.pdb", "b.pdb"), "b.pdb");
        // A field name that breaks the name rules is never used, even when it ends right.
        assert_eq!(stored_name("../a.pdb", "a.pdb"), "a.pdb");
        assert_eq!(stored_name("/etc/a.pdb", "a.pdb"), "a.pdb");
        assert_eq!(stored_name("x//a.pdb", "a.pdb"), "a.pdb");
        // A part without a field name: the filename, as the reference does.
        assert_eq!(stored_name("", "run.sh"), "run.sh");
        assert_eq!(stored_name("", ""), "");
    }
}
