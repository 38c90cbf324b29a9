//! Payload records: kept in memory, each persisted as JSON in the data directory (rewritten
//! in place, see `record_pages`), with ids that only ever grow, also across restarts.
//!
//! Layout of the data directory:
//! - `node-id`: identity of this data directory, made once;
//! - `next-id`: ids below it may have been handed out (reserved a block at a time);
//! - `payloads/<n>.page`: the records of payloads `64 n` to `64 n + 63`, and
//!   `payloads/<id>.json` for a record too long for its slot (`record_pages`);
//! - `work/<id>/`: the payload's work directory;
//! - `staging/`: uploads being received (emptied at start).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use jobrelay_common::fsutil::{remove_dir_all_if_exists, write_atomic};
use jobrelay_common::protocol::{PayloadRecord, PayloadStatus};
use jobrelay_common::resources::Request;
use jobrelay_common::upload::ReceivedUpload;

use crate::events::EventLog;
use crate::record_pages::RecordPages;
use crate::workdir::{Lease, Leases};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a submission turned into.
pub enum Created {
    New(PayloadRecord),
    /// The idempotency key was seen before: this is the payload it created.
    Existing(PayloadRecord),
}

/// Why a state change was not made.
#[derive(Debug)]
pub enum Refused {
    NotFound,
    /// The payload is in a state the change does not apply to.
    InState(Box<PayloadRecord>),
}

struct Records {
    by_id: BTreeMap<u64, PayloadRecord>,
    by_key: HashMap<String, u64>,
    next_id: u64,
    /// Ids below this are reserved in the `next-id` file: it is rewritten once per
    /// [`ID_BLOCK`] payloads, not once per payload.
    reserved: u64,
}

/// Ids reserved at a time in `next-id`. A restart continues above the reservation, so ids
/// still only grow; a gap of up to this many is the price of one file write per payload.
const ID_BLOCK: u64 = 1000;

pub struct PayloadStore {
    pages: RecordPages,
    work_dir: PathBuf,
    staging_dir: PathBuf,
    next_id_file: PathBuf,
    node: String,
    records: Mutex<Records>,
    pub events: EventLog,
    /// Readers of work directories; a clean-up removes a directory only once they are done.
    leases: Leases,
}

impl PayloadStore {
    /// Opens (or creates) the store in `data_dir` and loads every record.
    pub fn open(data_dir: &Path) -> io::Result<Self> {
        /// Ids at or past this are damage, not history (2^63: no client counts that far).
        const MAX_ID: u64 = 1 << 63;
        let records_dir = data_dir.join("payloads");
        let work_dir = data_dir.join("work");
        let staging_dir = data_dir.join("staging");
        std::fs::create_dir_all(&work_dir)?;
        remove_dir_all_if_exists(&staging_dir)?;
        std::fs::create_dir_all(&staging_dir)?;
        // Every payload's directory is made here (then renamed into work/): spread over the
        // disk, their inodes do not all queue in one ext4 group (`spread_subdirectories`).
        if let Err(e) = jobrelay_common::fsutil::spread_subdirectories(&staging_dir) {
            tracing::debug!(error = %e, "staging directory: no FS_TOPDIR_FL");
        }

        let node_file = data_dir.join("node-id");
        let node = match std::fs::read_to_string(&node_file) {
            Ok(text) if !text.trim().is_empty() => text.trim().to_owned(),
            _ => {
                let node = uuid::Uuid::new_v4().to_string();
                write_atomic(&node_file, node.as_bytes())?;
                node
            }
        };

        let (pages, by_id) = RecordPages::open(&records_dir, MAX_ID)?;
        let next_id_file = data_dir.join("next-id");
        let stored_next = std::fs::read_to_string(&next_id_file)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .filter(|n| *n < MAX_ID)
            .unwrap_or(1);
        let highest_record = by_id.keys().next_back().copied();
        let highest_work = highest_work_dir_id(&work_dir, MAX_ID)?;
        check_counter(stored_next, highest_record, highest_work)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let next_id = stored_next;
        let by_key = by_id
            .values()
            .filter_map(|r| r.key.clone().map(|k| (k, r.id)))
            .collect();
        Ok(PayloadStore {
            pages,
            work_dir,
            staging_dir,
            next_id_file,
            events: EventLog::new(node.clone()),
            node,
            records: Mutex::new(Records {
                by_id,
                by_key,
                next_id,
                reserved: next_id,
            }),
            leases: Leases::default(),
        })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn staging_dir(&self) -> &Path {
        &self.staging_dir
    }

    pub fn work_dir_of(&self, id: u64) -> PathBuf {
        self.work_dir.join(id.to_string())
    }

    /// Writes a record, new or over its earlier version (`record_pages`).
    fn persist(&self, record: &PayloadRecord) -> io::Result<()> {
        self.pages.write(record)
    }

    /// Turns a received upload into a Prepared payload, or returns the payload an earlier
    /// submission with the same idempotency key created.
    pub fn create(
        &self,
        upload: ReceivedUpload,
        key: Option<String>,
        resources: Option<Request>,
    ) -> io::Result<Created> {
        let mut records = self.records.lock().unwrap();
        if let Some(id) = key.as_ref().and_then(|k| records.by_key.get(k)) {
            // The upload's staging directory is removed when `upload` drops.
            return Ok(Created::Existing(records.by_id[id].clone()));
        }
        let id = records.next_id;
        if id >= records.reserved {
            let reserved = id + ID_BLOCK;
            write_atomic(&self.next_id_file, reserved.to_string().as_bytes())?;
            records.reserved = reserved;
        }
        records.next_id = id + 1;
        let loc = self.work_dir_of(id);
        upload.staging.persist(&loc)?;
        let record = PayloadRecord {
            id,
            status: PayloadStatus::Prepared,
            loc: loc.to_string_lossy().into_owned(),
            pid: 0,
            killed: false,
            input: BTreeMap::new(),
            exit_code: None,
            signal: None,
            reason: None,
            key: key.clone(),
            node: Some(self.node.clone()),
            created_ms: Some(now_ms()),
            started_ms: None,
            finished_ms: None,
            slurm_job_id: None,
            resources,
            gpu_ids: Vec::new(),
        };
        if let Err(e) = self.persist(&record) {
            let _ = remove_dir_all_if_exists(&loc);
            return Err(e);
        }
        if let Some(key) = key {
            records.by_key.insert(key, id);
        }
        records.by_id.insert(id, record.clone());
        tracing::info!(id, status = "Prepared", "payload state");
        Ok(Created::New(record))
    }

    pub fn get(&self, id: u64) -> Option<PayloadRecord> {
        self.records.lock().unwrap().by_id.get(&id).cloned()
    }

    /// Applies `change` to the record if its status is one of `from`, persists it and
    /// publishes the change. Returns the new record.
    pub fn transition(
        &self,
        id: u64,
        from: &[PayloadStatus],
        change: impl FnOnce(&mut PayloadRecord),
    ) -> Result<PayloadRecord, Refused> {
        let mut records = self.records.lock().unwrap();
        let Some(current) = records.by_id.get(&id) else {
            return Err(Refused::NotFound);
        };
        if !from.contains(&current.status) {
            return Err(Refused::InState(Box::new(current.clone())));
        }
        let mut updated = current.clone();
        change(&mut updated);
        if updated.status.is_finished() && updated.finished_ms.is_none() {
            updated.finished_ms = Some(now_ms());
        }
        if let Err(e) = self.persist(&updated) {
            // Memory stays the truth for this run; the next write will try again.
            tracing::error!(id, error = %e, "could not persist payload record");
        }
        if updated.status != current.status {
            tracing::info!(
                id,
                status = %updated.status,
                exit_code = ?updated.exit_code,
                reason = updated.reason.as_deref().unwrap_or(""),
                "payload state"
            );
            self.events.publish(&updated);
        }
        records.by_id.insert(id, updated.clone());
        Ok(updated)
    }

    /// Ids of payloads in `status`, oldest first.
    pub fn ids_in(&self, status: PayloadStatus) -> Vec<u64> {
        let records = self.records.lock().unwrap();
        records
            .by_id
            .values()
            .filter(|r| r.status == status)
            .map(|r| r.id)
            .collect()
    }

    /// Finished payloads (not yet Cleaned) that finished before `cutoff_ms`.
    pub fn finished_before(&self, cutoff_ms: u64) -> Vec<u64> {
        let records = self.records.lock().unwrap();
        records
            .by_id
            .values()
            .filter(|r| r.status.is_finished() && r.status != PayloadStatus::Cleaned)
            .filter(|r| r.finished_ms.unwrap_or(0) < cutoff_ms)
            .map(|r| r.id)
            .collect()
    }

    /// Number of payloads in each of the given states.
    pub fn count(&self, status: PayloadStatus) -> usize {
        let records = self.records.lock().unwrap();
        records
            .by_id
            .values()
            .filter(|r| r.status == status)
            .count()
    }

    /// Takes a lease on payload `id`'s work directory (see `workdir`) if its record passes
    /// `accept`: the directory is not removed before the lease ends. A record that does not
    /// pass is returned as `Refused::InState`.
    pub fn lease(
        &self,
        id: u64,
        accept: impl FnOnce(&PayloadRecord) -> bool,
    ) -> Result<(PayloadRecord, Lease), Refused> {
        self.leases.take(id, || match self.get(id) {
            None => Err(Refused::NotFound),
            Some(record) if accept(&record) => Ok(record),
            Some(record) => Err(Refused::InState(Box::new(record))),
        })
    }

    /// Marks a finished payload Cleaned, then removes its work directory: at once, or when
    /// the last reader holding it (a ZIP being streamed) is done. In that order, a reader
    /// sees either the record Cleaned or the whole directory, never a Completed record whose
    /// directory is half gone; a crash in between leaves a directory that the next start
    /// removes (`janitor::start`).
    pub fn clean(&self, id: u64, reason: &str) -> Result<PayloadRecord, Refused> {
        const FINISHED: [PayloadStatus; 4] = [
            PayloadStatus::Completed,
            PayloadStatus::Failed,
            PayloadStatus::Invalid,
            PayloadStatus::Killed,
        ];
        let cleaned = self.transition(id, &FINISHED, |r| {
            r.status = PayloadStatus::Cleaned;
            r.reason = Some(match r.reason.take() {
                Some(before) => format!("{before}; {reason}"),
                None => reason.to_owned(),
            });
        });
        match cleaned {
            Ok(record) => {
                self.leases.remove_when_free(id, self.work_dir_of(id));
                Ok(record)
            }
            Err(Refused::InState(record)) if record.status == PayloadStatus::Cleaned => Ok(*record),
            Err(refused) => Err(refused),
        }
    }

    /// Removes the work directories that Cleaned payloads still have (a client stopped
    /// between marking one Cleaned and removing its directory).
    pub fn remove_leftover_work_dirs(&self) {
        for id in self.ids_in(PayloadStatus::Cleaned) {
            let dir = self.work_dir_of(id);
            if dir.exists() {
                tracing::info!(id, "removing the work directory a Cleaned payload left");
                self.leases.remove_when_free(id, dir);
            }
        }
    }
}

/// The highest payload id among the work directories (`work/<id>`), ignoring other names.
fn highest_work_dir_id(work_dir: &Path, max_id: u64) -> io::Result<Option<u64>> {
    let mut highest = None;
    for entry in std::fs::read_dir(work_dir)? {
        let name = entry?.file_name();
        if let Some(id) = name.to_str().and_then(|n| n.parse::<u64>().ok()) {
            if id < max_id {
                highest = highest.max(Some(id));
            }
        }
    }
    Ok(highest)
}

/// Refuses an id counter that is behind the ids the data directory shows (restored from an
/// older copy, or `next-id` lost): continuing would hand out an id an earlier payload had, and
/// a server holding that id would take another job's results for its own. Ids below the
/// counter are the only ones ever handed out, and the counter is written before the id it
/// covers, so a healthy directory never fails this.
fn check_counter(
    stored_next: u64,
    highest_record: Option<u64>,
    highest_work: Option<u64>,
) -> Result<(), String> {
    for (what, id) in [
        ("payload record", highest_record),
        ("work directory", highest_work),
    ] {
        if let Some(id) = id.filter(|id| *id >= stored_next) {
            return Err(format!(
                "the id counter (next-id: {stored_next}) is behind {what} {id}: this data \
                 directory was restored from an older copy or lost its next-id, and would hand \
                 out ids earlier payloads had. Refusing to start; if the records and work \
                 directories are the ones to keep, write a number above {id} (e.g. {}) into \
                 next-id, or start with an empty data directory",
                id + ID_BLOCK
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_counter;

    #[test]
    fn a_counter_ahead_of_every_id_passes() {
        assert!(check_counter(1, None, None).is_ok());
        assert!(check_counter(1001, Some(7), Some(12)).is_ok());
    }

    #[test]
    fn a_counter_at_or_behind_a_record_or_work_dir_is_refused() {
        let e = check_counter(1001, Some(1001), None).unwrap_err();
        assert!(e.contains("payload record 1001"), "{e}");
        let e = check_counter(1, None, Some(3)).unwrap_err();
        assert!(e.contains("work directory 3"), "{e}");
    }
}
