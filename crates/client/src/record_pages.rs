//! Payload records on disk, [`PER_PAGE`] to a file: payload `id`'s record is the
//! [`SLOT`]-byte slot `id % PER_PAGE` of `payloads/<id / PER_PAGE>.page`, JSON padded with
//! spaces, rewritten in place by one write.
//!
//! One file per record made a new inode per payload, and on a file system without a journal
//! ext4 skips every recently freed inode when it looks for a free one (issue 18's profile);
//! a page file is made once per [`PER_PAGE`] payloads. A write is one `pwrite` of a whole
//! slot, aligned to it, so it never spans two memory pages and a process killed at any moment
//! leaves the slot's old record or its new one, never a mix (like `overwrite_padded`, it does
//! not guard against a power loss: records were never fsynced). A record too long for a
//! slot (a very long reason) goes to a file of its own, `payloads/<id>.json`, written
//! atomically as before, which wins over the slot from then on; data directories from before
//! the pages hold only such files, and they load and update as they are.

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use jobrelay_common::fsutil::{overwrite_padded, write_atomic};
use jobrelay_common::protocol::PayloadRecord;

/// Records per page file.
pub const PER_PAGE: u64 = 64;
/// Bytes per record slot: a power of two no larger than a memory page, so an aligned slot
/// never spans two.
pub const SLOT: usize = 2048;

pub struct RecordPages {
    dir: PathBuf,
    /// Payloads whose record is in a file of its own (`<id>.json`).
    own_files: Mutex<HashSet<u64>>,
    /// The page file written last, kept open: a payload's state changes all go to one page,
    /// and new payloads fill it in turn, so most writes need no `open`.
    last_page: Mutex<Option<(u64, std::fs::File)>>,
}

impl RecordPages {
    /// Reads every record in `dir` (made if missing), skipping damaged ones and those with an
    /// id at or past `max_id` (logged), and removes the temporary files of interrupted writes.
    pub fn open(dir: &Path, max_id: u64) -> io::Result<(Self, BTreeMap<u64, PayloadRecord>)> {
        std::fs::create_dir_all(dir)?;
        let mut in_pages = BTreeMap::new();
        let mut in_files = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            match path.extension().and_then(|e| e.to_str()) {
                Some("page") => match stem.parse::<u64>() {
                    Ok(page) => read_page(&path, page, max_id, &mut in_pages),
                    Err(_) => {
                        tracing::error!(path = %path.display(), "record page with a bad name skipped")
                    }
                },
                Some("json") => {
                    if let Some(record) = read_own_file(&path, max_id) {
                        in_files.insert(record.id, record);
                    }
                }
                // Leftover temporary file from an interrupted write.
                _ => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let own_files = in_files.keys().copied().collect();
        in_pages.extend(in_files);
        let pages = RecordPages {
            dir: dir.to_path_buf(),
            own_files: Mutex::new(own_files),
            last_page: Mutex::new(None),
        };
        Ok((pages, in_pages))
    }

    /// Writes `record`, over its earlier version if any.
    pub fn write(&self, record: &PayloadRecord) -> io::Result<()> {
        let mut bytes = serde_json::to_vec(record).map_err(io::Error::other)?;
        let mut own_files = self.own_files.lock().unwrap_or_else(|e| e.into_inner());
        if bytes.len() < SLOT && !own_files.contains(&record.id) {
            drop(own_files);
            bytes.resize(SLOT - 1, b' ');
            bytes.push(b'\n');
            let page = record.id / PER_PAGE;
            let mut last = self.last_page.lock().unwrap_or_else(|e| e.into_inner());
            if last.as_ref().is_none_or(|(open, _)| *open != page) {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    // Other slots of the page are other payloads' records.
                    .truncate(false)
                    .open(self.dir.join(format!("{page}.page")))?;
                *last = Some((page, file));
            }
            let (_, file) = last.as_ref().expect("opened above");
            return file.write_all_at(&bytes, (record.id % PER_PAGE) * SLOT as u64);
        }
        let path = self.dir.join(format!("{}.json", record.id));
        if !overwrite_padded(&path, &bytes)? {
            write_atomic(&path, &bytes)?;
        }
        // From now on the file wins over the slot, whatever the slot still holds.
        own_files.insert(record.id);
        Ok(())
    }
}

fn read_page(path: &Path, page: u64, max_id: u64, into: &mut BTreeMap<u64, PayloadRecord>) {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "unreadable record page skipped");
            return;
        }
    };
    for (slot, chunk) in bytes.chunks(SLOT).enumerate() {
        // A slot never written is a hole (zeros); a written one is JSON and spaces.
        let text = chunk
            .iter()
            .position(|b| !matches!(b, 0 | b' ' | b'\n'))
            .map(|start| &chunk[start..])
            .unwrap_or_default();
        if text.is_empty() {
            continue;
        }
        let expected = page.saturating_mul(PER_PAGE).saturating_add(slot as u64);
        match serde_json::from_slice::<PayloadRecord>(text.trim_ascii_end()) {
            Ok(record) if record.id == expected && record.id < max_id => {
                into.insert(record.id, record);
            }
            Ok(record) => tracing::error!(
                path = %path.display(), slot, id = record.id,
                "payload record in the wrong slot, or with an impossible id, skipped"
            ),
            Err(e) => tracing::error!(
                path = %path.display(), slot, error = %e, "unreadable payload record skipped"
            ),
        }
    }
}

fn read_own_file(path: &Path, max_id: u64) -> Option<PayloadRecord> {
    match std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice::<PayloadRecord>(&b).map_err(|e| e.to_string()))
    {
        // Ids are handed out counting up from 1; one near u64::MAX is a damaged record, and
        // trusting it would overflow the next id (a panic at every start).
        Ok(record) if record.id >= max_id => {
            tracing::error!(path = %path.display(), id = record.id, "payload record with an impossible id skipped");
            None
        }
        Ok(record) => Some(record),
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "unreadable payload record skipped");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jobrelay_common::protocol::PayloadStatus;

    fn record(id: u64, reason: &str) -> PayloadRecord {
        PayloadRecord {
            id,
            status: PayloadStatus::Prepared,
            loc: format!("/data/work/{id}"),
            pid: 0,
            killed: false,
            input: BTreeMap::new(),
            exit_code: None,
            signal: None,
            reason: Some(reason.to_owned()),
            key: None,
            node: None,
            created_ms: Some(1),
            started_ms: None,
            finished_ms: None,
            slurm_job_id: None,
            resources: None,
            gpu_ids: Vec::new(),
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn records_share_page_files_and_the_last_write_of_each_is_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let (pages, loaded) = RecordPages::open(dir.path(), u64::MAX).unwrap();
        assert!(loaded.is_empty());
        for id in [1, 2, 63, 64, 130] {
            pages
                .write(&record(id, "first, and longer than the next"))
                .unwrap();
            pages.write(&record(id, &format!("second {id}"))).unwrap();
        }
        assert_eq!(names(dir.path()), ["0.page", "1.page", "2.page"]);
        let (_, loaded) = RecordPages::open(dir.path(), u64::MAX).unwrap();
        assert_eq!(
            loaded.keys().copied().collect::<Vec<_>>(),
            [1, 2, 63, 64, 130]
        );
        for (id, r) in &loaded {
            assert_eq!(r.reason.as_deref(), Some(format!("second {id}").as_str()));
        }
    }

    #[test]
    fn a_record_too_long_for_its_slot_goes_to_a_file_that_wins_from_then_on() {
        let dir = tempfile::tempdir().unwrap();
        let (pages, _) = RecordPages::open(dir.path(), u64::MAX).unwrap();
        pages.write(&record(5, "short")).unwrap();
        pages.write(&record(5, &"x".repeat(3 * SLOT))).unwrap();
        pages.write(&record(5, "short again")).unwrap();
        assert!(dir.path().join("5.json").exists());
        let (pages, loaded) = RecordPages::open(dir.path(), u64::MAX).unwrap();
        assert_eq!(loaded[&5].reason.as_deref(), Some("short again"));
        // Still the file's after a restart: the slot's stale "short" never comes back.
        pages.write(&record(5, "after restart")).unwrap();
        let (_, loaded) = RecordPages::open(dir.path(), u64::MAX).unwrap();
        assert_eq!(loaded[&5].reason.as_deref(), Some("after restart"));
    }

    #[test]
    fn damage_is_skipped_and_records_of_the_old_layout_load_and_update() {
        let dir = tempfile::tempdir().unwrap();
        let (pages, _) = RecordPages::open(dir.path(), 1 << 63).unwrap();
        pages.write(&record(1, "kept")).unwrap();
        // A record in the wrong slot, garbage in another, an impossible id in a file.
        let page = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("0.page"))
            .unwrap();
        let mut wrong = serde_json::to_vec(&record(9, "wrong slot")).unwrap();
        wrong.resize(SLOT, b' ');
        page.write_all_at(&wrong, 2 * SLOT as u64).unwrap();
        page.write_all_at(b"{not json", 3 * SLOT as u64).unwrap();
        let huge = serde_json::to_vec(&record(u64::MAX - 1, "impossible")).unwrap();
        std::fs::write(dir.path().join("77.json"), huge).unwrap();
        std::fs::write(dir.path().join(".tmp-1-2"), "half").unwrap();
        // The old layout: one file per record.
        let old = serde_json::to_vec(&record(200, "old layout")).unwrap();
        std::fs::write(dir.path().join("200.json"), old).unwrap();

        let (pages, loaded) = RecordPages::open(dir.path(), 1 << 63).unwrap();
        assert_eq!(loaded.keys().copied().collect::<Vec<_>>(), [1, 200]);
        assert!(!dir.path().join(".tmp-1-2").exists());
        pages.write(&record(200, "updated")).unwrap();
        assert!(!dir.path().join("3.page").exists(), "kept in its own file");
        let (_, loaded) = RecordPages::open(dir.path(), 1 << 63).unwrap();
        assert_eq!(loaded[&200].reason.as_deref(), Some("updated"));
    }
}
