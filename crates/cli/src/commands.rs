//! The user commands themselves.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use serde_json::{json, Value};

use crate::api::{collect_files, ServerApi};
use crate::args::{
    ClientsArgs, DownloadArgs, JobArgs, JobsArgs, LogsArgs, SubmitArgs, UserCommand, WaitArgs,
};
use crate::output::{self, exit, exit_code_for};
use crate::progress;

/// Uploads smaller than this get no progress bar.
const BAR_THRESHOLD: u64 = 1024 * 1024;
const POLL_FIRST: Duration = Duration::from_millis(50);
const POLL_MAX: Duration = Duration::from_millis(500);
/// Longest single long-poll of a job's state.
const LONG_POLL: Duration = Duration::from_secs(2);

/// Runs one user command and turns its outcome into an exit code.
pub async fn run(command: UserCommand) -> ExitCode {
    let result = match command {
        UserCommand::Submit(args) => submit(args).await,
        UserCommand::Status(args) => status(args).await,
        UserCommand::Wait(args) => wait(args).await,
        UserCommand::Download(args) => download(args).await,
        UserCommand::Cancel(args) => cancel(args).await,
        UserCommand::Jobs(args) => jobs(args).await,
        UserCommand::Logs(args) => logs(args).await,
        UserCommand::Clients(args) => clients(args).await,
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => output::fail(&e),
    }
}

fn status_of(record: &Value) -> &str {
    record["status"].as_str().unwrap_or("Unknown")
}

/// Outcome of following a job.
enum Followed {
    Finished(Value),
    TimedOut(Value),
}

/// Polls a job until it reaches a final state, showing its live state on a spinner.
async fn follow(
    api: &ServerApi,
    id: u64,
    timeout: Option<f64>,
    json: bool,
) -> anyhow::Result<Followed> {
    let deadline = timeout
        .map(|s| {
            Duration::try_from_secs_f64(s)
                .map_err(|_| anyhow!("--timeout must be a positive number"))
        })
        .transpose()?
        .map(|d| Instant::now() + d);
    let spinner = progress::spinner(json, &format!("job {id}: waiting"));
    let mut delay = POLL_FIRST;
    loop {
        // Long-poll in slices, so the spinner shows each state the job passes through.
        let slice = deadline.map_or(LONG_POLL, |d| {
            d.saturating_duration_since(Instant::now()).min(LONG_POLL)
        });
        let asked = Instant::now();
        let record = api.job_waiting(id, slice).await?;
        let status = status_of(&record).to_owned();
        spinner.set_message(format!("job {id}: {status}"));
        if exit_code_for(&status).is_some() {
            spinner.finish_and_clear();
            return Ok(Followed::Finished(record));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            spinner.finish_and_clear();
            return Ok(Followed::TimedOut(record));
        }
        if asked.elapsed() < slice / 2 {
            // The server answered early without a final state: it has no long-poll (or the
            // state changed); back off so as not to hammer it.
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(POLL_MAX);
        }
    }
}

fn describe_end(record: &Value) -> String {
    let id = &record["id"];
    let status = status_of(record);
    match record["message"].as_str().filter(|m| !m.is_empty()) {
        Some(message) => format!("job {id} {status}: {message}"),
        None => format!("job {id} {status}"),
    }
}

/// Downloads into a temporary file beside `dir`, unpacks, and removes the ZIP.
async fn download_into(
    api: &ServerApi,
    id: u64,
    partial: bool,
    dir: &Path,
    json: bool,
) -> anyhow::Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let zip = tempfile::NamedTempFile::new_in(dir)?;
    api.download(id, partial, zip.path(), json).await?;
    let zip_path = zip.path().to_path_buf();
    let dest = dir.to_path_buf();
    let unpacked =
        tokio::task::spawn_blocking(move || crate::unpack::unpack(&zip_path, &dest)).await??;
    drop(zip);
    for link in &unpacked.skipped_links {
        eprintln!(
            "jobrelay: warning: left out {link}: a link pointing outside {}",
            dir.display()
        );
    }
    Ok(unpacked
        .files
        .iter()
        .map(|f| f.display().to_string())
        .collect())
}

async fn submit(args: SubmitArgs) -> anyhow::Result<u8> {
    let json = args.conn.json;
    // With a token the server takes the user id from it.
    let user = args.conn.user;
    if user.is_none() && args.conn.token.is_none() {
        return Err(anyhow!(
            "a user id is needed to submit: pass --user or set JOBRELAY_USER (or a token: \
             --token or JOBRELAY_TOKEN)"
        ));
    }
    let files = collect_files(&args.files)?;
    if !files
        .iter()
        .any(|f| f.name == jobrelay_common::protocol::RUN_SCRIPT)
    {
        eprintln!("jobrelay: warning: no run.sh among the files; the job will end Invalid");
    }
    let api = ServerApi::connect(&args.conn)?;
    let total: u64 = files.iter().map(|f| f.size).sum();
    let bar = progress::transfer(json || total < BAR_THRESHOLD, Some(total), "uploading");
    let answer = api
        .upload(
            &args.service,
            user,
            args.callback.as_deref(),
            &args.request.fields(),
            &files,
            &bar,
        )
        .await?;
    bar.finish_and_clear();
    let id = answer["id"]
        .as_u64()
        .ok_or_else(|| anyhow!("the server's answer has no job id: {answer}"))?;
    if !args.wait {
        if json {
            output::print_json(&answer);
        } else {
            println!("{id}");
            eprintln!(
                "job {id} queued on service {} ({} files, {total} bytes)",
                args.service,
                files.len()
            );
        }
        return Ok(exit::OK);
    }
    if !json {
        eprintln!("job {id} queued on service {}", args.service);
    }
    let api_ref = &api;
    let (record, code) = match follow(api_ref, id, args.timeout, json).await? {
        Followed::Finished(record) => {
            let code = exit_code_for(status_of(&record)).unwrap_or(exit::ERROR);
            (record, code)
        }
        Followed::TimedOut(record) => (record, exit::TIMEOUT),
    };
    let mut unpacked = None;
    if let (Some(dir), "Completed") = (&args.output, status_of(&record)) {
        unpacked = Some(download_into(&api, id, false, dir, json).await?);
    }
    if json {
        let mut out = json!({ "job": record });
        if let (Some(dir), Some(files)) = (&args.output, &unpacked) {
            out["output"] = json!(dir);
            out["files"] = json!(files);
        }
        out["timed_out"] = json!(code == exit::TIMEOUT);
        output::print_json(&out);
    } else {
        println!("{id}");
        if code == exit::TIMEOUT {
            eprintln!(
                "timed out waiting for job {id} (still {})",
                status_of(&record)
            );
        } else {
            eprintln!("{}", describe_end(&record));
        }
        if let (Some(dir), Some(files)) = (&args.output, &unpacked) {
            eprintln!("{} files unpacked into {}", files.len(), dir.display());
        }
    }
    Ok(code)
}

async fn status(args: JobArgs) -> anyhow::Result<u8> {
    let api = ServerApi::connect(&args.conn)?;
    let record = api.job(args.id).await?;
    if args.conn.json {
        output::print_json(&record);
        return Ok(exit::OK);
    }
    let fields = [
        "id",
        "status",
        "service",
        "user_id",
        "attempts",
        "exit_code",
        "message",
        "created_at",
        "updated_at",
    ];
    for field in fields {
        if let Some(value) = record.get(field).filter(|v| !v.is_null()) {
            println!("{field:>10}: {}", output::cell(value));
        }
    }
    if let Some(asked) = request_line(&record) {
        println!("{:>10}: {asked}", "asks");
    }
    if let Some(waiting) = record.get("waiting_for") {
        let message = waiting["message"].as_str().unwrap_or("");
        let reason = waiting["reason"].as_str().unwrap_or("");
        println!("{:>10}: {message} ({reason})", "waiting");
    }
    Ok(exit::OK)
}

/// "4 cores, 4096 MiB, 1 GPU, walltime 7200 s, priority 2": what the job asked for beyond one
/// core at priority 0; `None` when it asked for nothing more (or the server does not say).
fn request_line(record: &Value) -> Option<String> {
    let number = |name: &str| record.get(name).and_then(Value::as_i64);
    let cores = number("cores")?;
    let mut parts = Vec::new();
    if cores != 1 {
        parts.push(format!("{cores} cores"));
    }
    if let Some(mb) = number("memory_mb") {
        parts.push(format!("{mb} MiB"));
    }
    match number("gpus") {
        Some(0) | None => {}
        Some(1) => parts.push("1 GPU".into()),
        Some(n) => parts.push(format!("{n} GPUs")),
    }
    if let Some(secs) = number("walltime_s") {
        parts.push(format!("walltime {secs} s"));
    }
    match number("priority") {
        Some(0) | None => {}
        Some(p) => parts.push(format!("priority {p}")),
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

async fn wait(args: WaitArgs) -> anyhow::Result<u8> {
    let api = ServerApi::connect(&args.conn)?;
    let json = args.conn.json;
    match follow(&api, args.id, args.timeout, json).await? {
        Followed::Finished(record) => {
            if json {
                output::print_json(&record);
            } else {
                println!("{}", describe_end(&record));
            }
            Ok(exit_code_for(status_of(&record)).unwrap_or(exit::ERROR))
        }
        Followed::TimedOut(record) => {
            if json {
                output::print_json(&json!({ "job": record, "timed_out": true }));
            } else {
                eprintln!(
                    "jobrelay: timed out waiting for job {} (still {})",
                    args.id,
                    status_of(&record)
                );
            }
            Ok(exit::TIMEOUT)
        }
    }
}

async fn download(args: DownloadArgs) -> anyhow::Result<u8> {
    let api = ServerApi::connect(&args.conn)?;
    let json = args.conn.json;
    if let Some(dir) = &args.output {
        let files = download_into(&api, args.id, args.partial, dir, json).await?;
        if json {
            output::print_json(&json!({ "id": args.id, "output": dir, "files": files }));
        } else {
            println!("{} files unpacked into {}", files.len(), dir.display());
        }
        return Ok(exit::OK);
    }
    let file = args.file.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "job-{}{}.zip",
            args.id,
            if args.partial { "-partial" } else { "" }
        ))
    });
    let partial_path = file.with_extension("zip.part");
    let bytes = match api
        .download(args.id, args.partial, &partial_path, json)
        .await
    {
        Ok(bytes) => bytes,
        Err(e) => {
            let _ = std::fs::remove_file(&partial_path);
            return Err(e);
        }
    };
    std::fs::rename(&partial_path, &file)?;
    if json {
        output::print_json(&json!({ "id": args.id, "file": file, "bytes": bytes }));
    } else {
        println!("{} ({bytes} bytes)", file.display());
    }
    Ok(exit::OK)
}

async fn cancel(args: JobArgs) -> anyhow::Result<u8> {
    let api = ServerApi::connect(&args.conn)?;
    let answer = api.terminate(args.id).await?;
    if args.conn.json {
        output::print_json(&answer);
    } else {
        println!("job {} cancelled ({})", args.id, status_of(&answer));
    }
    Ok(exit::OK)
}

async fn clients(args: ClientsArgs) -> anyhow::Result<u8> {
    let api = ServerApi::connect(&args.conn)?;
    let answer = api.clients().await?;
    let list: Vec<serde_json::Value> = answer
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|c| !args.joined || c.get("joined").is_some())
        .collect();
    if args.conn.json {
        output::print_json(&serde_json::Value::Array(list));
        return Ok(exit::OK);
    }
    let header = [
        "CLIENT",
        "KIND",
        "SERVICES",
        "HEALTH",
        "EXECUTOR",
        "SLOTS",
        "ACTIVE",
        "FROM",
        "SINCE",
        "HEARTBEAT",
    ];
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|c| {
            let joined = c.get("joined");
            let field = |key: &str| joined.map(|j| output::cell(&j[key])).unwrap_or_default();
            let services: Vec<String> = c["services"]
                .as_array()
                .map(|s| s.iter().map(output::cell).collect())
                .unwrap_or_default();
            let health = match (c["healthy"].as_bool(), joined.map(|j| &j["leaving"])) {
                (_, Some(serde_json::Value::Bool(true))) => "leaving",
                (Some(true), _) => "healthy",
                _ => "unreachable",
            };
            vec![
                output::cell(&c["url"]),
                if joined.is_some() {
                    "joined"
                } else {
                    "configured"
                }
                .to_owned(),
                services.join(","),
                health.to_owned(),
                output::cell(&c["executor"]),
                output::cell(&c["slots"]),
                output::cell(&c["active"]),
                field("from"),
                field("since"),
                field("last_heartbeat"),
            ]
        })
        .collect();
    println!("{}", output::table(&header, &rows));
    Ok(exit::OK)
}

async fn jobs(args: JobsArgs) -> anyhow::Result<u8> {
    let api = ServerApi::connect(&args.conn)?;
    let mut query = vec![
        ("limit", args.limit.to_string()),
        ("offset", args.offset.to_string()),
    ];
    if let Some(user) = args.conn.user {
        query.push(("user_id", user.to_string()));
    }
    if let Some(service) = &args.service {
        query.push(("service", service.clone()));
    }
    if let Some(status) = &args.status {
        query.push(("status", status.clone()));
    }
    let answer = api.jobs(&query).await?;
    if args.conn.json {
        output::print_json(&answer);
        return Ok(exit::OK);
    }
    let list = answer["jobs"].as_array().cloned().unwrap_or_default();
    let header = [
        "ID", "USER", "SERVICE", "STATUS", "ATTEMPTS", "CREATED", "MESSAGE",
    ];
    let keys = [
        "id",
        "user_id",
        "service",
        "status",
        "attempts",
        "created_at",
        "message",
    ];
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|job| keys.iter().map(|k| output::cell(&job[*k])).collect())
        .collect();
    println!("{}", output::table(&header, &rows));
    if let Some(total) = answer["total"].as_u64() {
        eprintln!(
            "{} of {total} jobs shown (--limit/--offset to page)",
            rows.len()
        );
    }
    Ok(exit::OK)
}

async fn logs(args: LogsArgs) -> anyhow::Result<u8> {
    use std::io::Write;
    let api = ServerApi::new(&args.conn.server)?;
    let mut offset = 0;
    let mut stdout = std::io::stdout();
    let mut delay = POLL_FIRST;
    loop {
        let (bytes, next, status) = api.log(args.id, &args.stream, offset).await?;
        stdout.write_all(&bytes)?;
        stdout.flush()?;
        offset = next;
        if !bytes.is_empty() {
            delay = POLL_FIRST;
            continue;
        }
        if !args.follow || exit_code_for(&status).is_some() {
            return Ok(exit::OK);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(POLL_MAX);
    }
}
