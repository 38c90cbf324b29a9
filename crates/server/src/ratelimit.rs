//! Rate quotas of uploads (`max_jobs_per_user_per_hour`, `burst`): a token bucket of `burst`
//! tokens refilled at `per_hour` an hour, kept as one number per user and service, the
//! instant the bucket would be full again minus one token's time (the "theoretical arrival
//! time" of the generic cell rate algorithm). Pure: the caller keeps that number (in the
//! database, so a restart does not refill the bucket) and passes the time in.
//!
//! A user may upload `burst` jobs at once, then one every `3600 / per_hour` seconds; over
//! any long stretch no more than `per_hour` an hour (plus the one burst).

/// The quota of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateQuota {
    /// Jobs a user may upload per hour, sustained (at least 1).
    pub per_hour: u32,
    /// Jobs a user may upload at once (at least 1).
    pub burst: u32,
}

impl RateQuota {
    /// Milliseconds one token takes to come back.
    pub fn interval_ms(&self) -> i64 {
        3_600_000 / i64::from(self.per_hour.max(1))
    }

    /// How far ahead of now the kept instant may be for an upload still to pass.
    fn tolerance_ms(&self) -> i64 {
        self.interval_ms() * (i64::from(self.burst.max(1)) - 1)
    }

    /// One upload at `now_ms` given the kept instant `tat_ms` (`None`: a full bucket):
    /// `Ok(instant to keep)` when it passes, `Err(milliseconds until one would)` when not.
    pub fn take(&self, tat_ms: Option<i64>, now_ms: i64) -> Result<i64, i64> {
        let tat = tat_ms.unwrap_or(now_ms).max(now_ms);
        let ahead = tat - now_ms;
        if ahead > self.tolerance_ms() {
            return Err(ahead - self.tolerance_ms());
        }
        Ok(tat + self.interval_ms())
    }
}

/// Whole seconds for a `Retry-After` header: rounded up, at least 1.
pub fn retry_after_secs(ms: i64) -> u64 {
    (ms.max(1) as u64).div_ceil(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_at_once_then_one_per_interval() {
        // 60 an hour: one a minute, 5 at once.
        let q = RateQuota {
            per_hour: 60,
            burst: 5,
        };
        let mut tat = None;
        let t0 = 1_000_000;
        for _ in 0..5 {
            tat = Some(q.take(tat, t0).expect("within the burst"));
        }
        let wait = q.take(tat, t0).expect_err("the sixth waits");
        assert_eq!(wait, 60_000);
        assert_eq!(retry_after_secs(wait), 60);
        // A minute later one more passes, and only one.
        tat = Some(q.take(tat, t0 + 60_000).expect("a token came back"));
        assert!(q.take(tat, t0 + 60_000).is_err());
        // After a long pause the bucket is full again, but no fuller.
        let later = t0 + 3_600_000;
        for _ in 0..5 {
            tat = Some(q.take(tat, later).unwrap());
        }
        assert!(q.take(tat, later).is_err());
    }

    #[test]
    fn no_more_than_the_rate_over_an_hour() {
        let q = RateQuota {
            per_hour: 10,
            burst: 10,
        };
        let mut tat = None;
        let mut passed = 0;
        // Try every second for two hours: 10 at once, then one each 6 minutes (at 6, 12,
        // ..., 114 minutes).
        for s in 0..7200 {
            if let Ok(t) = q.take(tat, i64::from(s) * 1000) {
                tat = Some(t);
                passed += 1;
            }
        }
        assert_eq!(passed, 10 + 19);
        assert_eq!(retry_after_secs(1), 1);
        assert_eq!(retry_after_secs(1001), 2);
    }
}
