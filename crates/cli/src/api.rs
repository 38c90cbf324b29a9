//! Typed calls to the jobrelay server's HTTP API, with errors a person can read.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context};
use futures_util::{StreamExt, TryStreamExt};
use indicatif::ProgressBar;
use reqwest::multipart::{Form, Part};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// One file to upload: its name in the job, and where it is on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadFile {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
}

pub struct ServerApi {
    base: String,
    http: reqwest::Client,
}

/// Turns a server's error answer into one readable line.
async fn error_from(response: reqwest::Response) -> anyhow::Error {
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| {
            ["message", "error", "detail"]
                .iter()
                .find_map(|k| v.get(*k).and_then(Value::as_str).map(str::to_owned))
        })
        .unwrap_or_else(|| text.trim().to_owned());
    if message.is_empty() {
        anyhow!("the server answered {status}")
    } else {
        anyhow!("{message} (HTTP {})", status.as_u16())
    }
}

impl ServerApi {
    pub fn new(base: &str) -> anyhow::Result<Self> {
        Self::with_token(base, None)
    }

    /// The server and token of a user command's options.
    pub fn connect(conn: &crate::args::ConnectionOpts) -> anyhow::Result<Self> {
        Self::build(&conn.server, conn.token.as_deref(), conn.ca_cert.as_deref())
    }

    /// A server that wants `Authorization: Bearer <token>` (one with a users file).
    pub fn with_token(base: &str, token: Option<&str>) -> anyhow::Result<Self> {
        Self::build(base, token, None)
    }

    fn build(base: &str, token: Option<&str>, ca: Option<&Path>) -> anyhow::Result<Self> {
        let base = base.trim_end_matches('/').to_owned();
        reqwest::Url::parse(&base).with_context(|| format!("--server {base:?} is not a URL"))?;
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(jobrelay_common::serve::pool_idle());
        if let Some(ca) = ca {
            let pem = std::fs::read(ca)
                .with_context(|| format!("cannot read --ca-cert {}", ca.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("no usable certificate in {}", ca.display()))?;
            builder = builder.tls_certs_merge(certs);
        }
        if let Some(token) = token.map(str::trim).filter(|t| !t.is_empty()) {
            let secret = jobrelay_common::auth::Secret::new(token)
                .map_err(|e| anyhow!("bad token (--token or JOBRELAY_TOKEN): {e}"))?;
            let mut headers = reqwest::header::HeaderMap::new();
            headers.insert(reqwest::header::AUTHORIZATION, secret.header_value());
            builder = builder.default_headers(headers);
        }
        Ok(ServerApi {
            base,
            http: builder.build()?,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let response = request.send().await.map_err(|e| {
            if e.is_connect() || e.is_timeout() {
                anyhow!(
                    "cannot reach the server at {}: {}",
                    self.base,
                    root_cause(&e)
                )
            } else {
                anyhow!("request to {} failed: {}", self.base, root_cause(&e))
            }
        })?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(error_from(response).await)
        }
    }

    async fn json(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        self.send(request)
            .await?
            .json()
            .await
            .context("the server's answer is not JSON")
    }

    /// Uploads a job; returns the server's answer (`id`, `status`, `message`).
    pub async fn upload(
        &self,
        service: &str,
        user: Option<i64>,
        callback: Option<&str>,
        request: &[(&'static str, String)],
        files: &[UploadFile],
        bar: &ProgressBar,
    ) -> anyhow::Result<Value> {
        let mut form = Form::new().text("service", service.to_owned());
        if let Some(user) = user {
            form = form.text("user_id", user.to_string());
        }
        if let Some(url) = callback {
            form = form.text("callback_url", url.to_owned());
        }
        for (name, value) in request {
            form = form.text(*name, value.clone());
        }
        // Each file is opened only when the body reaches it: one descriptor at a time, so a
        // directory of more files than the open-file limit uploads too.
        for file in files {
            let bar = bar.clone();
            let path = file.path.clone();
            let stream = futures_util::stream::once(async move {
                let handle = tokio::fs::File::open(&path).await.map_err(|e| {
                    std::io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display()))
                })?;
                Ok::<_, std::io::Error>(tokio_util::io::ReaderStream::new(handle))
            })
            .try_flatten()
            .inspect(move |chunk| {
                if let Ok(chunk) = chunk {
                    bar.inc(chunk.len() as u64);
                }
            });
            let part = Part::stream_with_length(reqwest::Body::wrap_stream(stream), file.size)
                .file_name(file.name.clone());
            form = form.part("file", part);
        }
        self.json(self.http.post(self.url("/upload")).multipart(form))
            .await
    }

    /// A job's record (always JSON, whatever its state).
    pub async fn job(&self, id: u64) -> anyhow::Result<Value> {
        self.json(self.http.get(self.url(&format!("/jobs/{id}"))))
            .await
            .with_context(|| format!("job {id}"))
    }

    /// A job's record once it has finished, or after `wait` (the server's long-poll; a server
    /// without it answers at once).
    pub async fn job_waiting(&self, id: u64, wait: Duration) -> anyhow::Result<Value> {
        let url = self.url(&format!("/jobs/{id}?wait={:.3}", wait.as_secs_f64()));
        self.json(self.http.get(url).timeout(wait + Duration::from_secs(30)))
            .await
            .with_context(|| format!("job {id}"))
    }

    pub async fn terminate(&self, id: u64) -> anyhow::Result<Value> {
        self.json(self.http.post(self.url(&format!("/terminate/{id}"))))
            .await
            .with_context(|| format!("cannot cancel job {id}"))
    }

    /// A window of a job's output: (bytes, offset to continue from, job status).
    pub async fn log(
        &self,
        id: u64,
        stream: &str,
        offset: u64,
    ) -> anyhow::Result<(bytes::Bytes, u64, String)> {
        let response = self
            .send(self.http.get(self.url(&format!("/jobs/{id}/log"))).query(&[
                ("stream", stream.to_owned()),
                ("offset", offset.to_string()),
            ]))
            .await
            .with_context(|| format!("cannot read the log of job {id}"))?;
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let status = header("x-job-status").unwrap_or_default();
        let next: Option<u64> =
            header(jobrelay_common::logtail::NEXT_OFFSET_HEADER).and_then(|v| v.parse().ok());
        let bytes = response.bytes().await?;
        let next = next.unwrap_or(offset + bytes.len() as u64);
        Ok((bytes, next, status))
    }

    /// The server's clients (`/clients`).
    pub async fn clients(&self) -> anyhow::Result<Value> {
        self.json(self.http.get(self.url("/clients"))).await
    }

    pub async fn jobs(&self, query: &[(&str, String)]) -> anyhow::Result<Value> {
        self.json(self.http.get(self.url("/jobs")).query(query))
            .await
    }

    /// Streams a job's result ZIP (or partial ZIP) to `dest`; returns the bytes written.
    pub async fn download(
        &self,
        id: u64,
        partial: bool,
        dest: &Path,
        json: bool,
    ) -> anyhow::Result<u64> {
        let path = if partial {
            format!("/download_partial/{id}")
        } else {
            format!("/download/{id}")
        };
        let response = self
            .send(self.http.get(self.url(&path)))
            .await
            .with_context(|| format!("cannot download job {id}"))?;
        let is_zip = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/zip"));
        if !is_zip {
            let record: Value = response.json().await.unwrap_or(Value::Null);
            let status = record["status"].as_str().unwrap_or("unknown");
            let message = record["message"].as_str().unwrap_or("");
            return Err(anyhow!(
                "job {id} has no results to download: it is {status}{}",
                if message.is_empty() {
                    String::new()
                } else {
                    format!(" ({message})")
                }
            ));
        }
        let bar = crate::progress::transfer(json, response.content_length(), "downloading");
        let mut out = tokio::fs::File::create(dest)
            .await
            .with_context(|| format!("cannot write {}", dest.display()))?;
        let mut written = 0u64;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk =
                chunk.map_err(|e| anyhow!("download of job {id} was cut: {}", root_cause(&e)))?;
            out.write_all(&chunk).await?;
            written += chunk.len() as u64;
            bar.set_position(written);
        }
        out.flush().await?;
        bar.finish_and_clear();
        Ok(written)
    }
}

fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Expands the command line's paths into the files to upload: a file is sent under its own
/// name, a directory's files under their paths relative to it.
pub fn collect_files(paths: &[PathBuf]) -> anyhow::Result<Vec<UploadFile>> {
    let mut files = Vec::new();
    for path in paths {
        let meta =
            std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        if meta.is_dir() {
            walk(path, Path::new(""), &mut files)?;
        } else {
            let name = path
                .file_name()
                .ok_or_else(|| anyhow!("{} has no file name", path.display()))?;
            let name = utf8_name(Path::new(name), path)?;
            files.push(UploadFile {
                name,
                path: path.clone(),
                size: meta.len(),
            });
        }
    }
    let mut seen = jobrelay_common::filename::NameSet::default();
    for file in &files {
        seen.admit(&file.name)
            .map_err(|why| anyhow!("cannot upload {:?}: {why}", file.name))?;
    }
    Ok(files)
}

/// A file's name in the job. Names are UTF-8 on the wire: one that is not is refused rather
/// than sent changed (two such names could become one).
fn utf8_name(name: &Path, path: &Path) -> anyhow::Result<String> {
    name.to_str().map(str::to_owned).ok_or_else(|| {
        anyhow!(
            "cannot upload {}: its name is not UTF-8; rename it",
            path.display()
        )
    })
}

fn walk(root: &Path, relative: &Path, out: &mut Vec<UploadFile>) -> anyhow::Result<()> {
    let mut names: Vec<_> = std::fs::read_dir(root.join(relative))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        let child = relative.join(&name);
        let full = root.join(&child);
        let meta = std::fs::metadata(&full)?;
        if meta.is_dir() {
            walk(root, &child, out)?;
        } else if meta.is_file() {
            out.push(UploadFile {
                name: utf8_name(&child, &full)?,
                path: full,
                size: meta.len(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_uploads_its_files_under_relative_names() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("run.sh"), "true").unwrap();
        std::fs::create_dir(dir.path().join("inputs")).unwrap();
        std::fs::write(dir.path().join("inputs/a.pdb"), "ATOM").unwrap();
        let extra = tempfile::tempdir().unwrap();
        std::fs::write(extra.path().join("params.txt"), "k=1").unwrap();
        let files = collect_files(&[dir.path().into(), extra.path().join("params.txt")]).unwrap();
        let names: Vec<_> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["inputs/a.pdb", "run.sh", "params.txt"]);
        assert_eq!(files[0].size, 4);
    }

    #[test]
    fn names_that_are_not_utf8_are_refused() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("run.sh"), "true").unwrap();
        let bad = dir
            .path()
            .join(std::ffi::OsStr::from_bytes(b"data\xff.txt"));
        std::fs::write(&bad, "x").unwrap();
        for arg in [dir.path().to_path_buf(), bad] {
            let error = collect_files(&[arg]).unwrap_err();
            assert!(error.to_string().contains("not UTF-8"), "{error}");
        }
    }

    #[test]
    fn clashing_names_are_refused_before_uploading() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        std::fs::write(a.path().join("run.sh"), "true").unwrap();
        std::fs::write(b.path().join("run.sh"), "false").unwrap();
        let error = collect_files(&[a.path().into(), b.path().into()]).unwrap_err();
        assert!(error.to_string().contains("repeated"), "{error}");
    }
}
