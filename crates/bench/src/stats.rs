//! Medians and percentiles of samples, and the rows of the results table.

use serde_json::{json, Value};

/// Summary of samples (nearest-rank percentiles).
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(samples: &[f64]) -> Summary {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return Summary {
                n: 0,
                min: f64::NAN,
                p50: f64::NAN,
                p90: f64::NAN,
                p99: f64::NAN,
                max: f64::NAN,
            };
        }
        let rank = |p: f64| {
            let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
            v[i]
        };
        Summary {
            n: v.len(),
            min: v[0],
            p50: rank(0.5),
            p90: rank(0.9),
            p99: rank(0.99),
            max: v[v.len() - 1],
        }
    }

    pub fn json(&self) -> Value {
        json!({"n": self.n, "min": self.min, "p50": self.p50, "p90": self.p90, "p99": self.p99, "max": self.max})
    }
}

/// One line of the results table.
pub struct Row {
    pub section: String,
    pub what: String,
    /// The figure (median) with its unit.
    pub value: String,
    /// Spread: p90/p99 or min–max over runs.
    pub spread: String,
    /// The floor of the same run it is compared with.
    pub floor: String,
    /// The figure against that floor.
    pub ratio: String,
    pub target: String,
    /// "yes", "no", or "" when there is no target.
    pub met: String,
}

pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| # | measurement | median | spread | floor (same run) | vs floor | target | met |\n\
         |---|---|---:|---|---:|---:|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.section, r.what, r.value, r.spread, r.floor, r.ratio, r.target, r.met
        ));
    }
    out
}

pub fn ms(seconds: f64) -> String {
    if seconds < 0.01 {
        format!("{:.2} ms", seconds * 1e3)
    } else if seconds < 10.0 {
        format!("{:.1} ms", seconds * 1e3)
    } else {
        format!("{seconds:.1} s")
    }
}

pub fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

pub fn yes(ok: bool) -> String {
    if ok { "yes" } else { "**no**" }.into()
}
