//! Change-feed news of payloads whose Submitted commit the collector has not seen yet.
//!
//! A client answers `/submit` and may report the payload Running, or already ended, on its
//! change feed before the server has committed the payload id to the job. The collector
//! finds no job for such an event; it notes the payload id here instead of dropping it. The
//! dispatcher, once its commit is done, [claims](EarlyEvents::claim) the id: only a payload
//! with news noted (or one whose news the feed may have skipped, a *gap*) needs the look at
//! `/retrieve` that used to follow every submission. Every other payload's first news comes
//! after the commit and reaches its job through the feed, so the look would only have said
//! Prepared.
//!
//! Why no news falls between: the collector's look-up of a payload and its note are one step
//! under this lock ([`EarlyEvents::note_unless_known`]), and the dispatcher claims under the
//! same lock after its commit. Either the look-up ran after the commit (and found the job),
//! or its note is there when the claim runs.
//!
//! A gap is anything after which the collector does not read every event in order: a feed
//! call that failed, a client restarted or a page truncated (it then checks every job it
//! finds on the client, but a commit that lands after that listing is not among them), or a
//! note dropped because too many were kept. The dispatcher takes the [generation] before its
//! `/submit`; a claim made after a gap keeps the look.
//!
//! [generation]: EarlyEvents::generation

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a note waits for its claim. A payload whose commit never comes (its job was
/// terminated while sent and the payload killed, another server's payload) is forgotten then.
const KEEP: Duration = Duration::from_secs(600);

/// Most notes kept; beyond, the oldest is dropped and that counts as a gap.
const MOST: usize = 65_536;

#[derive(Default)]
pub struct EarlyEvents {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Noted payload ids, with when each was first noted.
    noted: HashMap<i64, Instant>,
    /// The same, oldest first (an id may stay here after its claim: then `noted` disagrees).
    order: VecDeque<(i64, Instant)>,
    /// Gaps so far.
    generation: u64,
}

impl EarlyEvents {
    /// Gaps so far: taken before a `/submit`, handed to [`EarlyEvents::claim`] after its commit.
    pub fn generation(&self) -> u64 {
        crate::lock(&self.inner).generation
    }

    /// The collector may have skipped events of payloads it does not know yet.
    pub fn gap(&self) {
        crate::lock(&self.inner).generation += 1;
    }

    /// Runs `look_up` (the job of payload `dest`, from the database) and, when it finds no
    /// job, notes `dest` before anyone may claim it. Returns what `look_up` returned.
    pub fn note_unless_known<T, E>(
        &self,
        dest: i64,
        look_up: impl FnOnce() -> Result<Option<T>, E>,
    ) -> Result<Option<T>, E> {
        self.note_at(dest, Instant::now(), look_up)
    }

    fn note_at<T, E>(
        &self,
        dest: i64,
        now: Instant,
        look_up: impl FnOnce() -> Result<Option<T>, E>,
    ) -> Result<Option<T>, E> {
        let mut inner = crate::lock(&self.inner);
        let found = look_up();
        if let Ok(None) = found {
            inner.forget_old(now);
            if let std::collections::hash_map::Entry::Vacant(entry) = inner.noted.entry(dest) {
                entry.insert(now);
                inner.order.push_back((dest, now));
                while inner.noted.len() > MOST {
                    inner.drop_oldest();
                    inner.generation += 1;
                }
            }
        }
        found
    }

    /// After the Submitted commit of payload `dest`, whose `/submit` was sent at generation
    /// `since`: whether its state must be looked at, because news of it came first or may
    /// have been missed. Removes its note.
    pub fn claim(&self, dest: i64, since: u64) -> bool {
        let mut inner = crate::lock(&self.inner);
        let noted = inner.noted.remove(&dest).is_some();
        noted || inner.generation != since
    }

    #[cfg(test)]
    fn kept(&self) -> usize {
        crate::lock(&self.inner).noted.len()
    }
}

impl Inner {
    fn forget_old(&mut self, now: Instant) {
        while let Some(&(_, at)) = self.order.front() {
            if now.duration_since(at) < KEEP {
                break;
            }
            self.drop_oldest();
        }
    }

    fn drop_oldest(&mut self) {
        if let Some((dest, at)) = self.order.pop_front() {
            // A later note of the same id (claimed, then noted again) is not this one.
            if self.noted.get(&dest) == Some(&at) {
                self.noted.remove(&dest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> Result<Option<()>, ()> {
        Ok(None)
    }

    #[test]
    fn news_before_the_commit_is_claimed_once_and_news_after_it_is_not_noted() {
        let early = EarlyEvents::default();
        let since = early.generation();
        // The feed saw payload 7 before its commit: noted.
        assert_eq!(early.note_unless_known(7, none), Ok(None));
        assert!(early.claim(7, since), "news came first: look");
        assert!(!early.claim(7, since), "claimed once");
        // Payload 8's news came after the commit: the look-up found the job, nothing noted.
        assert_eq!(
            early.note_unless_known(8, || Ok::<_, ()>(Some(()))),
            Ok(Some(()))
        );
        assert!(!early.claim(8, since), "no news before the commit: no look");
        assert_eq!(early.kept(), 0);
    }

    #[test]
    fn a_failed_look_up_notes_nothing_and_is_passed_on() {
        let early = EarlyEvents::default();
        assert_eq!(
            early.note_unless_known(3, || Err::<Option<()>, _>("db down")),
            Err("db down")
        );
        assert_eq!(early.kept(), 0);
        assert!(!early.claim(3, early.generation()));
    }

    #[test]
    fn a_gap_after_the_submit_makes_the_claim_look_and_one_before_it_does_not() {
        let early = EarlyEvents::default();
        early.gap();
        let since = early.generation();
        assert!(!early.claim(1, since), "the gap came before this submit");
        early.gap();
        assert!(early.claim(1, since), "the feed may have skipped its news");
    }

    #[test]
    fn the_look_up_and_the_note_are_one_step_against_a_claim() {
        // A claim made while a look-up runs waits for its note: the look-up below holds the
        // lock while the claiming thread has already committed and tries to claim.
        let early = std::sync::Arc::new(EarlyEvents::default());
        let since = early.generation();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let claimer = {
            let early = early.clone();
            std::thread::spawn(move || {
                started_rx.recv().unwrap();
                early.claim(5, since)
            })
        };
        let _ = early.note_unless_known(5, || {
            started_tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            none()
        });
        assert!(claimer.join().unwrap(), "the claim saw the note");
    }

    #[test]
    fn old_notes_are_forgotten_and_too_many_count_as_a_gap() {
        let early = EarlyEvents::default();
        let start = Instant::now();
        let _ = early.note_at(1, start, none);
        let _ = early.note_at(2, start + KEEP, none);
        assert_eq!(early.kept(), 1, "the note of 1 outlived its keep");
        assert!(!early.claim(1, early.generation()));
        assert!(early.claim(2, early.generation()));

        let since = early.generation();
        for dest in 0..=MOST as i64 {
            let _ = early.note_at(dest, start + KEEP, none);
        }
        assert_eq!(early.kept(), MOST);
        assert!(
            early.claim(MOST as i64 + 5, since),
            "a note was dropped: any claim since may have lost its news"
        );
    }

    #[test]
    fn a_note_taken_again_after_its_claim_survives_the_old_entry_being_dropped() {
        let early = EarlyEvents::default();
        let start = Instant::now();
        let _ = early.note_at(9, start, none);
        assert!(early.claim(9, early.generation()));
        let _ = early.note_at(9, start + Duration::from_secs(1), none);
        // The first entry of 9 is dropped by age; the second note stays.
        let _ = early.note_at(10, start + KEEP, none);
        assert_eq!(early.kept(), 2);
    }
}
