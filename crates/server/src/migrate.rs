//! `jobrelay server migrate --from <sqlite file> --to postgres://…`: moves a server's SQLite
//! database to PostgreSQL whole (every job with every column, timelines, the webhook outbox,
//! runs given away, the database's identity, the id sequence past every id handed out) in
//! one transaction, into a database that holds no job. The data directory (uploads, results)
//! stays where it is: a server on PostgreSQL started on it serves the same jobs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::store::postgres::redact;
use crate::store::snapshot::Moved;
use crate::store::sqlite::JOB_ID_MARK;
use crate::store::{JobDb, PgDb, SqliteDb};

/// Options of `jobrelay server migrate`.
#[derive(clap::Args, Debug, Clone)]
pub struct MigrateArgs {
    /// The SQLite database to move (a server's `<data-dir>/jobrelay.sqlite`). It is read, not
    /// changed, and left in place.
    #[arg(long)]
    pub from: PathBuf,
    /// The PostgreSQL database to move it to, `postgres://user[:password]@host[:port]/db`
    /// (also read from DATABASE_URL); it must hold no job.
    #[arg(long, env = "DATABASE_URL")]
    pub to: String,
    /// The data directory the database served, whose job-id mark (`last-job-id`) counts
    /// too (default: the directory of --from).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// What a move did, for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub from: PathBuf,
    /// The target, without its password.
    pub to: String,
    pub moved: Moved,
    /// Jobs moved, per state.
    pub states: BTreeMap<String, usize>,
    pub server_id: String,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let states: Vec<String> = self
            .states
            .iter()
            .map(|(state, n)| format!("{state} {n}"))
            .collect();
        writeln!(f, "moved {} to {}:", self.from.display(), self.to)?;
        writeln!(f, "  jobs: {} ({})", self.moved.jobs, states.join(", "))?;
        writeln!(f, "  timeline events: {}", self.moved.events)?;
        writeln!(f, "  webhook notifications: {}", self.moved.notifications)?;
        writeln!(
            f,
            "  runs given away, still to kill: {}",
            self.moved.abandoned_runs
        )?;
        writeln!(
            f,
            "  result ZIPs kept in the database: {}",
            self.moved.result_zips
        )?;
        writeln!(
            f,
            "  input files kept in the database: {}",
            self.moved.input_files
        )?;
        writeln!(f, "  database identity: {}", self.server_id)?;
        writeln!(f, "  next job id: {}", self.moved.next_id)?;
        write!(
            f,
            "Start the server with --db {} on the same data directory; {} is left as it was.",
            self.to,
            self.from.display()
        )
    }
}

/// Moves the database; blocking (run it off the async workers).
pub fn run(args: &MigrateArgs) -> anyhow::Result<Report> {
    let from = &args.from;
    if !from.is_file() {
        anyhow::bail!(
            "{} is not a file: give the server's SQLite database (<data-dir>/jobrelay.sqlite)",
            from.display()
        );
    }
    let shown = redact(&args.to);
    let data_dir = match &args.data_dir {
        Some(dir) => dir.clone(),
        None => from
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".")),
    };
    // Held until the move is committed: no server can start on the source meanwhile.
    let (_held, mark) = hold_mark(&data_dir.join(JOB_ID_MARK))?;
    let source = SqliteDb::open(from)?;
    let snapshot = source.snapshot(mark)?;
    drop(source);
    let mut target = PgDb::open(&args.to)?;
    let held = target.count()?;
    if held > 0 {
        anyhow::bail!(
            "{shown} already holds {held} job(s): migrate moves a database into one that holds \
             none. Nothing was written."
        );
    }
    let mut states = BTreeMap::new();
    for row in &snapshot.jobs {
        *states.entry(row.job.status.to_string()).or_insert(0) += 1;
    }
    let server_id = snapshot.server_id.clone();
    let moved = target
        .import(snapshot)
        .map_err(|e| anyhow::anyhow!("moving {} to {shown}: {e:#}", from.display()))?;
    Ok(Report {
        from: from.clone(),
        to: shown,
        moved,
        states,
        server_id,
    })
}

/// Takes the job-id mark of the source's data directory for this process alone, refusing
/// while a server holds it (a running server on SQLite keeps it locked, shared), and reads
/// the highest id it records (0 without a mark).
fn hold_mark(path: &Path) -> anyhow::Result<(Option<std::fs::File>, i64)> {
    let file = match std::fs::OpenOptions::new().read(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((None, 0)),
        Err(e) => anyhow::bail!("cannot open {}: {e}", path.display()),
    };
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "a running server holds this database ({} is locked): stop it first, then migrate",
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            anyhow::bail!("cannot lock {}: {e}", path.display())
        }
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let mark = match text.trim() {
        "" => 0,
        t => t.parse::<i64>().map_err(|_| {
            anyhow::anyhow!(
                "{} should hold the highest job id handed out, not {t:?}",
                path.display()
            )
        })?,
    };
    Ok((Some(file), mark))
}
