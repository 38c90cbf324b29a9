//! `jobrelay-bench`: starts real `jobrelay` server and client processes on loopback
//! ephemeral ports, measures issue 5's figures and writes them as a Markdown table
//! (`results.md`) and JSON (`results.json`) in `--out`. Every figure is a median (with its
//! spread) shown next to a floor measured in the same run, because absolute times on a
//! shared machine drift.
//!
//! It is a program, not a test: `cargo test` never runs it. `--quick` is the smoke mode CI
//! runs (small counts, a few seconds).

mod measure;
mod on_signal;
mod peers;
mod postgres;
mod procs;
mod pull;
mod stats;

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "jobrelay-bench",
    about = "Benchmarks of jobrelay against the floor of running bash directly"
)]
pub struct Args {
    /// Small counts: a smoke run of a few seconds (what CI runs).
    #[arg(long)]
    pub quick: bool,
    /// Where results.md and results.json are written.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
    /// The jobrelay binary (default: next to this executable).
    #[arg(long)]
    pub jobrelay: Option<PathBuf>,
    /// Directory for the processes' data (default: a fresh temporary directory, removed after).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Keep the processes' data and logs (under --work-dir, or printed) instead of removing them.
    #[arg(long)]
    pub keep: bool,
    /// Only these measurements (comma-separated: floor,latency,throughput,memory,idle,queue,clients,postgres,fairshare,pull).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// How jobs are followed to their end: `auto` (the best the server offers),
    /// `download-wait` (`GET /download/{id}?wait=` answers the ZIP), `jobs-wait`
    /// (`GET /jobs/{id}?wait=`, then `GET /download/{id}`), `poll` (`GET /jobs/{id}` every
    /// millisecond, then the download).
    #[arg(long, value_enum, default_value = "auto")]
    pub follow: Follow,
    /// Override the number of latency jobs.
    #[arg(long)]
    pub latency_jobs: Option<usize>,
    /// Override the number of throughput jobs.
    #[arg(long)]
    pub throughput_jobs: Option<usize>,
    /// Override the number of jobs queued for the queue-scale figures.
    #[arg(long)]
    pub queue_jobs: Option<usize>,
    /// Runs of the throughput and many-clients measurements (median over them).
    #[arg(long)]
    pub runs: Option<usize>,
    /// `send_ahead` of the bench's service (jobs its one client may hold beyond its slots,
    /// README "Scheduling"); 0, the server's default, writes no key (a binary from before
    /// the key reads the file too).
    #[arg(long, default_value_t = 0)]
    pub send_ahead: usize,
    /// Peers run in the throughput scenario, in the same run as jobrelay and its floor:
    /// `hyperqueue` (HyperQueue from PyPI in a virtualenv of the cache directory, made if
    /// missing) or `reference=PATH` (a job-orchestrator binary). Repeatable; a peer that
    /// cannot run is skipped with the reason printed.
    #[arg(long, value_parser = peers::Peer::parse)]
    pub peer: Vec<peers::Peer>,
    /// The peers' cache directory (default: $XDG_CACHE_HOME/jobrelay-bench or ~/.cache/jobrelay-bench).
    #[arg(long)]
    pub peer_cache: Option<PathBuf>,
    /// Jobs per run for the reference peer (it ticks every 500 ms: the full count would take
    /// many minutes); default the throughput count, at most 500.
    #[arg(long)]
    pub reference_jobs: Option<usize>,
    /// PostgreSQL to measure against SQLite (`--only postgres`; also JOBRELAY_BENCH_POSTGRES):
    /// a `postgres://` URL of a role that may create databases; the run makes one of its own
    /// there and drops it.
    #[arg(long)]
    pub postgres: Option<String>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    Auto,
    DownloadWait,
    JobsWait,
    Poll,
}

impl Args {
    pub fn wants(&self, what: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == what)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    on_signal::stop_tree_on_signal(&runtime)?;
    let result = runtime.block_on(measure::run_all(args.clone()));
    let (mut rows, mut json) = result?;
    if args.wants("postgres") {
        let (pg_rows, pg_json) = runtime.block_on(postgres::run_for(&args))?;
        rows.extend(pg_rows);
        json["postgres"] = pg_json;
    }
    if args.wants("pull") {
        let (pull_rows, pull_json) = runtime.block_on(pull::run(&args))?;
        rows.extend(pull_rows);
        json["pull"] = pull_json;
    }
    std::fs::create_dir_all(&args.out)?;
    let table = stats::markdown(&rows);
    std::fs::write(args.out.join("results.md"), &table)?;
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    println!("{table}");
    println!(
        "written to {} and {} in {:.1} s",
        args.out.join("results.md").display(),
        args.out.join("results.json").display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
