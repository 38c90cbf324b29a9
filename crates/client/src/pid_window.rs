//! Which pids the processes started since a moment can have, so that the sweep for a
//! payload's marker ([`crate::process`]) reads the environment of the handful of processes
//! started during the payload instead of every process on the machine (that full sweep was
//! a tenth of the client's CPU per trivial payload, issue 18).
//!
//! Every process carrying a payload's marker was started after the payload's supervisor,
//! which the client starts itself. Linux hands out pids in a cycle: the next free one after
//! the last handed out, wrapping at `pid_max` (back to 300). So unless the cycle has come all
//! the way round since, a process started after a moment has a pid after the last pid handed
//! out before that moment and up to the last one handed out now (both in `/proc/loadavg`).
//!
//! Whether it can have come round is bounded by counters the kernel keeps. Each pid handed
//! out moves the cursor one step, plus one for each pid in use it skips; within one lap a pid
//! in use is skipped at most once, and the pids in use since the moment are at most three per
//! task (its own, and the group and session ids it may keep alive) of the tasks there were
//! then or started since. With `forks` tasks started since (`processes` in `/proc/stat`) and
//! `tasks` tasks then (`/proc/loadavg`), the cursor has moved at most
//! `forks + 3 * (tasks + forks)`: while that is shorter than a lap, the window holds every
//! pid handed out since. Both counters count every pid namespace, so they err toward more.
//!
//! Anything that does not fit gives [`Candidates::Any`], the full sweep: a counter that
//! cannot be read, a lap that may have been run, a cursor that moved farther than the forks
//! allow (someone wrote `ns_last_pid`), a window without the supervisor's own pid in it. The
//! window is as strong as the marker itself: a process that wants to hide can shed the
//! marker (SECURITY.md); this finds what a payload leaves behind by accident.

/// The lowest pid the cycle wraps back to (the kernel's `RESERVED_PIDS`).
const WRAPS_TO: u32 = 300;

/// The pid counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// The last pid handed out in this pid namespace.
    pub last_pid: u32,
    /// Tasks started since boot, threads included, in every namespace.
    pub forks: u64,
    /// Tasks there are, in every namespace.
    pub tasks: u64,
    /// The pid after the highest one that can be handed out.
    pub pid_max: u32,
}

impl Counters {
    /// Reads them from `/proc`; `None` when any cannot be read.
    pub fn read() -> Option<Counters> {
        let loadavg = std::fs::read_to_string("/proc/loadavg").ok()?;
        let (tasks, last_pid) = parse_loadavg(&loadavg)?;
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let forks = parse_forks(&stat)?;
        let pid_max = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some(Counters {
            last_pid,
            forks,
            tasks,
            pid_max,
        })
    }
}

/// Tasks and the last pid, from `/proc/loadavg` (`0.25 0.10 0.03 6/114 3473`).
fn parse_loadavg(text: &str) -> Option<(u64, u32)> {
    let mut fields = text.split_ascii_whitespace().skip(3);
    let (_, tasks) = fields.next()?.split_once('/')?;
    let last_pid = fields.next()?.parse().ok()?;
    Some((tasks.parse().ok()?, last_pid))
}

/// Tasks started since boot, from `/proc/stat`'s `processes` line.
fn parse_forks(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("processes "))?
        .trim()
        .parse()
        .ok()
}

/// The moment a payload's processes started from: taken before its supervisor is started,
/// and given the supervisor's pid once it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Since {
    then: Counters,
    /// The supervisor's pid: it must be in the window, or the readings are not to be trusted.
    first: Option<u32>,
}

impl Since {
    /// Now, before the supervisor starts; `None` when the counters cannot be read.
    pub fn now() -> Option<Since> {
        Counters::read().map(|then| Since { then, first: None })
    }

    /// With the supervisor's pid, once it has one.
    pub fn started(self, pid: u32) -> Since {
        Since {
            first: Some(pid),
            ..self
        }
    }

    /// Where the pids of the processes started since can be, by the counters `now`.
    pub fn candidates(&self, now: &Counters) -> Candidates {
        let then = &self.then;
        let Some(first) = self.first else {
            return Candidates::Any;
        };
        // A smaller pid_max since makes the lap shorter: the shortest one counts.
        let pid_max = then.pid_max.min(now.pid_max);
        let lap = u64::from(pid_max.saturating_sub(WRAPS_TO));
        let Some(forks) = now.forks.checked_sub(then.forks) else {
            return Candidates::Any;
        };
        let most_travel = forks.saturating_add(then.tasks.saturating_add(forks).saturating_mul(3));
        if most_travel >= lap || then.last_pid >= pid_max || now.last_pid >= pid_max {
            return Candidates::Any;
        }
        let window = Candidates::After {
            after: then.last_pid,
            through: now.last_pid,
            pid_max,
        };
        if window.len() > most_travel || !window.contains(first) {
            return Candidates::Any;
        }
        window
    }

    /// [`Since::candidates`] by the counters read now.
    pub fn candidates_now(&self) -> Candidates {
        match Counters::read() {
            Some(now) => self.candidates(&now),
            None => Candidates::Any,
        }
    }
}

/// The pids a sweep has to look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Candidates {
    /// Any pid at all.
    Any,
    /// The pids after `after` and up to `through`, in the cycle below `pid_max` (round
    /// through the wrap when `through` is below `after`).
    After {
        after: u32,
        through: u32,
        pid_max: u32,
    },
}

impl Candidates {
    pub fn contains(&self, pid: u32) -> bool {
        match *self {
            Candidates::Any => true,
            Candidates::After { after, through, .. } if after <= through => {
                pid > after && pid <= through
            }
            Candidates::After { after, through, .. } => pid > after || pid <= through,
        }
    }

    /// How many pids there are in it (`u64::MAX` for any).
    pub fn len(&self) -> u64 {
        match *self {
            Candidates::Any => u64::MAX,
            Candidates::After { after, through, .. } if after <= through => {
                u64::from(through - after)
            }
            // From after + 1 to pid_max - 1, then from WRAPS_TO to through (the cycle skips
            // the pids below WRAPS_TO once it has wrapped).
            Candidates::After {
                after,
                through,
                pid_max,
            } => u64::from(pid_max - 1 - after) + u64::from(through.saturating_sub(WRAPS_TO - 1)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Its pids in the order they were handed out; `None` for [`Candidates::Any`].
    pub fn pids(&self) -> Option<impl Iterator<Item = u32>> {
        match *self {
            Candidates::Any => None,
            Candidates::After { after, through, .. } if after <= through => {
                // No second part: an empty range of the same type.
                Some((after + 1..=through).chain(through + 1..=through))
            }
            Candidates::After {
                after,
                through,
                pid_max,
            } => Some((after + 1..=pid_max - 1).chain(WRAPS_TO.min(through + 1)..=through)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(last_pid: u32, forks: u64) -> Counters {
        Counters {
            last_pid,
            forks,
            tasks: 100,
            pid_max: 32_768,
        }
    }

    fn since(then: Counters, first: u32) -> Since {
        Since { then, first: None }.started(first)
    }

    /// Whether the window from `then` (supervisor `first`) to `now` is given up for any pid.
    fn any_pid(then: Counters, first: u32, now: Counters) -> bool {
        since(then, first).candidates(&now) == Candidates::Any
    }

    #[test]
    fn the_counters_are_read_from_the_kernels_text() {
        assert_eq!(
            parse_loadavg("0.25 0.10 0.03 6/114 3473\n"),
            Some((114, 3473))
        );
        assert_eq!(parse_loadavg("0.25 0.10 0.03 6"), None);
        assert_eq!(parse_loadavg(""), None);
        let stat = "cpu  1 2 3\nintr 5 0 0\nctxt 99\nbtime 1\nprocesses 3475\nprocs_running 6\n";
        assert_eq!(parse_forks(stat), Some(3475));
        assert_eq!(parse_forks("cpu 1 2 3\n"), None);
        let here = Counters::read().expect("this machine's /proc has the counters");
        assert!(here.last_pid < here.pid_max && here.forks > 0 && here.tasks > 0);
    }

    #[test]
    fn the_window_holds_the_pids_handed_out_since_and_no_other() {
        let window = since(at(1_000, 5_000), 1_001).candidates(&at(1_010, 5_012));
        assert_eq!(
            window,
            Candidates::After {
                after: 1_000,
                through: 1_010,
                pid_max: 32_768
            }
        );
        assert!(!window.contains(1_000) && window.contains(1_001) && window.contains(1_010));
        assert!(!window.contains(1_011) && !window.contains(1));
        assert_eq!(window.len(), 10);
        assert_eq!(
            window.pids().unwrap().collect::<Vec<_>>(),
            (1_001..=1_010).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_window_through_the_wrap_goes_round_to_the_lowest_pid_the_cycle_uses() {
        let window = since(at(32_760, 0), 32_762).candidates(&at(305, 20));
        assert!(window.contains(32_761) && window.contains(32_767) && window.contains(300));
        assert!(window.contains(305) && !window.contains(306) && !window.contains(32_760));
        let pids: Vec<u32> = window.pids().unwrap().collect();
        assert_eq!(pids.len() as u64, window.len());
        assert_eq!(
            &pids[..7],
            &[32_761, 32_762, 32_763, 32_764, 32_765, 32_766, 32_767]
        );
        assert_eq!(&pids[7..], &[300, 301, 302, 303, 304, 305]);
    }

    #[test]
    fn enough_forks_for_a_whole_lap_mean_any_pid() {
        // 100 tasks then: 300 steps, plus 4 per fork; 8,100 forks may have gone round the
        // 32,468 pids of the lap.
        assert!(any_pid(at(1_000, 0), 1_001, at(1_010, 8_100)));
        assert!(!any_pid(at(1_000, 0), 1_001, at(1_010, 7_000)));
        // A lower pid_max since shortens the lap.
        let lower = Counters {
            pid_max: 4_000,
            ..at(1_010, 1_000)
        };
        assert!(any_pid(at(1_000, 0), 1_001, lower));
    }

    #[test]
    fn readings_that_do_not_fit_mean_any_pid() {
        // The cursor moved farther than the forks allow (ns_last_pid written, or a frozen
        // fork counter): 10 forks cannot move it 5,000 on.
        assert!(any_pid(at(1_000, 50), 1_001, at(6_000, 60)));
        // Moved back a little: as a wrap that is almost a lap.
        assert!(any_pid(at(1_000, 50), 1_001, at(990, 60)));
        // A cursor that did not move (a frozen last pid) cannot hold the supervisor.
        assert!(any_pid(at(1_000, 50), 1_001, at(1_000, 60)));
        // The supervisor's pid outside the window.
        assert!(any_pid(at(1_000, 50), 2_000, at(1_010, 60)));
        // A fork counter that went back.
        assert!(any_pid(at(1_000, 50), 1_001, at(1_010, 40)));
        // No supervisor pid given.
        let unstarted = Since {
            then: at(1_000, 50),
            first: None,
        };
        assert_eq!(unstarted.candidates(&at(1_010, 60)), Candidates::Any);
        assert!(Candidates::Any.pids().is_none() && Candidates::Any.contains(7));
    }

    #[test]
    fn a_process_started_here_falls_in_the_window() {
        let before = Since::now().expect("this machine's /proc has the counters");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let window = before.started(pid).candidates_now();
        assert_ne!(window, Candidates::Any, "a quiet start is a window");
        assert!(window.contains(pid));
        assert!(window.pids().unwrap().any(|p| p == pid));
    }
}
