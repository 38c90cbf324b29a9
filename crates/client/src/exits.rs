//! Where payload supervisors record how their runs ended (`runs/` in the data directory,
//! private to the client), reusing a few files instead of making and removing one per payload.
//!
//! A new file costs more than its write: on a file system without a journal, ext4 skips every
//! inode freed in the last minutes when it looks for a free one, so each file made after a
//! stream of payloads scans thousands of them (BENCHMARKS.md, issue 18's profile). So payload
//! `id` records its end in the slot file `runs/s<id % SLOTS>`, overwritten in place and never
//! removed, with the id and the run (the payload record's `created_ms`) in the record: a
//! slot's older record, of an earlier payload or of an earlier run under the same id (an
//! orphan of a wiped client), does not count for this one. When another payload still in flight holds that slot (a long run
//! `SLOTS` ids older), it falls back to a file of its own, `runs/<id>`, removed once the
//! payload's final state is recorded. After a restart the client does not know which of the
//! two an adopted payload's supervisor was given, so it reads both and keeps the slot held
//! until that payload is settled.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::supervisor::{self, Exit};

/// Slot files at most. A payload falls back to a file of its own only while another one in
/// flight holds its slot, which takes a run that outlives `SLOTS` later payloads.
pub const SLOTS: u64 = 64;

pub struct ExitFiles {
    dir: PathBuf,
    /// Slot -> the payload that holds it, and whether that payload's record may be in a file
    /// of its own instead (an adopted one: its supervisor may have been given either).
    held: Mutex<HashMap<u64, (u64, bool)>>,
}

impl ExitFiles {
    pub fn new(dir: &Path) -> Self {
        ExitFiles {
            dir: dir.to_path_buf(),
            held: Mutex::default(),
        }
    }

    fn slot_file(&self, slot: u64) -> PathBuf {
        self.dir.join(format!("s{slot}"))
    }

    fn own_file(&self, id: u64) -> PathBuf {
        self.dir.join(id.to_string())
    }

    /// The file payload `id`'s supervisor is to record its end in, held for it until
    /// [`ExitFiles::release`]. Nothing in it names `id` yet.
    pub fn claim(&self, id: u64) -> PathBuf {
        let slot = id % SLOTS;
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        match held.get(&slot) {
            Some((holder, _)) if *holder != id => {
                let own = self.own_file(id);
                let _ = std::fs::remove_file(&own);
                own
            }
            _ => {
                held.insert(slot, (id, false));
                self.slot_file(slot)
            }
        }
    }

    /// After a restart: payload `id` may still write to its slot (its supervisor runs on),
    /// so no other payload is given it until `id` is released.
    pub fn adopt(&self, id: u64) {
        let slot = id % SLOTS;
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.entry(slot).or_insert((id, true));
    }

    /// How payload `id`'s run `run` (its record's `created_ms`, when known) ended, if its
    /// supervisor recorded it (in its slot or in a file of its own).
    pub fn read(&self, id: u64, run: Option<u64>) -> Option<Exit> {
        supervisor::read_exit(&self.slot_file(id % SLOTS), id, run)
            .or_else(|| supervisor::read_exit(&self.own_file(id), id, run))
    }

    /// Payload `id`'s final state is recorded: its slot is free again (its record stays until
    /// a later payload overwrites it, and names `id`, so it counts for no other) and a file of
    /// its own is removed.
    pub fn release(&self, id: u64) {
        let slot = id % SLOTS;
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((holder, maybe_own_file)) = held.get(&slot).copied() {
            if holder == id {
                held.remove(&slot);
                if !maybe_own_file {
                    // It was given its slot: no file of its own to remove.
                    return;
                }
            }
        }
        drop(held);
        let _ = std::fs::remove_file(self.own_file(id));
    }

    /// Payload ids with a recorded end (after a restart: some of them may belong to payloads
    /// whose final record was written just before the previous client process died).
    pub fn recorded(&self) -> Vec<u64> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut ids = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Ok(id) = name.parse::<u64>() {
                ids.push(id);
            } else if name
                .strip_prefix('s')
                .is_some_and(|n| n.parse::<u64>().is_ok())
            {
                if let Some(id) = supervisor::recorded_payload(&entry.path()) {
                    ids.push(id);
                }
            }
        }
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::write_exit;

    #[test]
    fn a_slot_is_reused_and_an_older_record_in_it_counts_for_no_later_payload() {
        let dir = tempfile::tempdir().unwrap();
        let exits = ExitFiles::new(dir.path());
        let first = exits.claim(3);
        write_exit(&first, Some(3), None, Exit::Code(7)).unwrap();
        assert_eq!(exits.read(3, None), Some(Exit::Code(7)));
        exits.release(3);
        let again = exits.claim(3 + SLOTS);
        assert_eq!(again, first, "the freed slot is reused");
        assert_eq!(
            exits.read(3 + SLOTS, None),
            None,
            "payload 3's record is not its own"
        );
        write_exit(&again, Some(3 + SLOTS), None, Exit::Signal(9)).unwrap();
        assert_eq!(exits.read(3 + SLOTS, None), Some(Exit::Signal(9)));
        assert_eq!(
            exits.read(3, None),
            None,
            "overwritten: payload 3 is settled"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_payload_whose_slot_is_held_gets_a_file_of_its_own_removed_on_release() {
        let dir = tempfile::tempdir().unwrap();
        let exits = ExitFiles::new(dir.path());
        let long = exits.claim(5);
        let other = exits.claim(5 + SLOTS);
        assert_ne!(long, other);
        write_exit(&other, Some(5 + SLOTS), None, Exit::Code(0)).unwrap();
        write_exit(&long, Some(5), None, Exit::Code(1)).unwrap();
        assert_eq!(exits.read(5 + SLOTS, None), Some(Exit::Code(0)));
        assert_eq!(exits.read(5, None), Some(Exit::Code(1)));
        let mut recorded = exits.recorded();
        recorded.sort();
        assert_eq!(recorded, vec![5, 5 + SLOTS]);
        exits.release(5 + SLOTS);
        assert!(!other.exists());
        assert_eq!(
            exits.read(5, None),
            Some(Exit::Code(1)),
            "the slot's holder is untouched"
        );
    }

    #[test]
    fn an_adopted_payload_keeps_its_slot_from_new_payloads_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let exits = ExitFiles::new(dir.path());
        exits.adopt(9);
        let newer = exits.claim(9 + SLOTS);
        assert_eq!(newer, dir.path().join((9 + SLOTS).to_string()));
        // An adopted payload's supervisor may have been given a file of its own.
        write_exit(&dir.path().join("9"), Some(9), None, Exit::Code(0)).unwrap();
        assert_eq!(exits.read(9, None), Some(Exit::Code(0)));
        exits.release(9);
        assert!(!dir.path().join("9").exists());
        assert_eq!(exits.claim(9 + 2 * SLOTS), dir.path().join("s9"));
    }

    #[test]
    fn a_record_of_the_old_format_in_a_payloads_own_file_still_counts() {
        let dir = tempfile::tempdir().unwrap();
        let exits = ExitFiles::new(dir.path());
        std::fs::write(dir.path().join("12"), "code 4\n").unwrap();
        assert_eq!(exits.read(12, None), Some(Exit::Code(4)));
        std::fs::write(dir.path().join("s12"), "code 5\n").unwrap();
        assert_eq!(
            exits.read(12 + SLOTS, None),
            None,
            "a slot's record must name its payload"
        );
        assert_eq!(exits.read(12, None), Some(Exit::Code(4)));
    }
}
