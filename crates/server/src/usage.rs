//! Recent usage of a user, as fair share counts it: core-seconds of finished and running
//! jobs, exponentially decayed with a half-life (as HTCondor and Slurm decay usage). Pure:
//! the time is passed in (seconds since the Unix epoch, as `f64`).
//!
//! A [`Decayed`] holds the usage as of an instant (`at`) and the cores running now; its value
//! at a later `t` is the old value decayed over `t - at` plus what the running cores
//! accrued meanwhile, each core-second decayed from when it was used:
//! `v(t) = v(at)·2^(-d/h) + cores·(h/ln 2)·(1 - 2^(-d/h))`, `d = t - at`.
//!
//! Since every user's usage decays at the same rate, their order does not change while time
//! passes without use; [`Decayed::scaled`] is the usage scaled to a fixed instant `base`
//! (`v(t)·2^((t - base)/h)`), a key that stays the same for a user who runs nothing.

/// Usage of one user: its value as of `at`, and the cores of its jobs running since.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Decayed {
    /// Core-seconds, decayed up to `at`.
    pub value: f64,
    /// Seconds since the Unix epoch.
    pub at: f64,
    /// Cores of the user's jobs running now (they add usage as time passes).
    pub running_cores: u64,
}

impl Decayed {
    /// Usage `value` as of `at`, nothing running.
    pub fn at(value: f64, at: f64) -> Self {
        Decayed {
            value: value.max(0.0),
            at,
            running_cores: 0,
        }
    }

    /// The usage at `t` (`t` before `at` counts as `at`).
    pub fn value_at(&self, t: f64, half_life: f64) -> f64 {
        let d = (t - self.at).max(0.0);
        if d == 0.0 {
            return self.value;
        }
        let keep = (-d / half_life).exp2();
        self.value * keep
            + self.running_cores as f64 * (half_life / std::f64::consts::LN_2) * (1.0 - keep)
    }

    /// Brings the value up to `t` (a no-op for a `t` at or before `at`).
    pub fn advance(&mut self, t: f64, half_life: f64) {
        if t > self.at {
            self.value = self.value_at(t, half_life);
            self.at = t;
        }
    }

    /// The usage at `t` scaled to the instant `base`: comparable between users at any `t`
    /// for users whose running cores did not change since.
    pub fn scaled(&self, t: f64, base: f64, half_life: f64) -> f64 {
        self.value_at(t, half_life) * ((t - base) / half_life).exp2()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: f64 = 3600.0;

    #[test]
    fn usage_halves_every_half_life() {
        let u = Decayed::at(1000.0, 0.0);
        assert_eq!(u.value_at(0.0, HOUR), 1000.0);
        assert!((u.value_at(HOUR, HOUR) - 500.0).abs() < 1e-9);
        assert!((u.value_at(3.0 * HOUR, HOUR) - 125.0).abs() < 1e-9);
        assert!(
            u.value_at(40.0 * HOUR, HOUR) < 1e-6,
            "old usage stops counting"
        );
    }

    #[test]
    fn running_cores_accrue_core_seconds() {
        let mut u = Decayed::at(0.0, 0.0);
        u.running_cores = 4;
        // Over a short time (against the half-life) 4 cores for 10 s are about 40.
        let v = u.value_at(10.0, HOUR);
        assert!((v - 40.0).abs() < 0.1, "{v}");
        // Run for ever: the value tends to cores · h / ln 2.
        let limit = 4.0 * HOUR / std::f64::consts::LN_2;
        assert!((u.value_at(100.0 * HOUR, HOUR) - limit).abs() < 1e-6);
        // Advancing in steps gives the same value as in one go.
        let mut stepped = u;
        for t in 1..=10 {
            stepped.advance(f64::from(t), HOUR);
        }
        assert!((stepped.value - v).abs() < 1e-9);
    }

    #[test]
    fn scaled_usage_keeps_the_order_while_nothing_runs() {
        let a = Decayed::at(100.0, 0.0);
        let b = Decayed::at(300.0, 2.0 * HOUR);
        // At 2 h, a is worth 25 and b 300; scaled to any base the order is the same, and
        // the scaled key of each does not depend on when it is computed.
        let ka = a.scaled(2.0 * HOUR, 0.0, HOUR);
        assert!((a.scaled(5.0 * HOUR, 0.0, HOUR) - ka).abs() < 1e-6);
        assert!(ka < b.scaled(2.0 * HOUR, 0.0, HOUR));
    }
}
