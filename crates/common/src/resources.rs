//! What a job asks for and what a client has: cores, memory, GPUs and a walltime, with the
//! readable forms people write them in (`4G`, `512M`, `2h`, `90m`). Shared by the server
//! (upload fields, service file), the CLI (`--memory 4G`) and the client (its flags, and
//! the fields the server adds to `/submit`).

use serde::{Deserialize, Serialize};

/// Text fields of an upload (server `/upload`) and of a submission (client `/submit`) that
/// carry a job's request. The reference client ignores text fields, so sending them is
/// harmless there.
pub const CORES_FIELD: &str = "cores";
pub const MEMORY_FIELD: &str = "memory";
pub const GPUS_FIELD: &str = "gpus";
pub const WALLTIME_FIELD: &str = "walltime";
pub const PRIORITY_FIELD: &str = "priority";

/// What a client can hold at once, as its `/info` advertises it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Capacity {
    pub cores: u32,
    /// MiB.
    pub memory_mb: u64,
    pub gpus: u32,
}

/// What one payload asked for, as the server sends it with `/submit`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Request {
    pub cores: u32,
    /// MiB; `None`: no limit asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    #[serde(default)]
    pub gpus: u32,
    /// Seconds; `None`: no limit asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub walltime_s: Option<u64>,
}

/// A memory amount in MiB: a plain number is MiB, else a number with a unit `K`, `M`, `G`
/// or `T` (binary multiples, an optional trailing `B` or `iB`): `4G` is 4096.
pub fn parse_memory_mb(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let upper = t.to_ascii_uppercase();
    let digits_end = upper
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(upper.len());
    let (number, unit) = upper.split_at(digits_end);
    let bad = || format!("memory must be MiB or a number with K, M, G or T (4G), not {text:?}");
    let value: f64 = number.parse().map_err(|_| bad())?;
    let unit = unit.trim();
    let unit = unit
        .strip_suffix("IB")
        .or_else(|| unit.strip_suffix('B'))
        .unwrap_or(unit);
    let mib = match unit {
        "" | "M" => value,
        "K" => value / 1024.0,
        "G" => value * 1024.0,
        "T" => value * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    if !mib.is_finite() || mib < 0.0 || mib > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(mib.ceil() as u64)
}

/// A duration in seconds: a plain number is seconds, else a number with `s`, `m`, `h` or `d`
/// (`90m`, `2h`), or `H:MM:SS`.
pub fn parse_seconds(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let bad = || {
        format!(
            "walltime must be seconds, a number with s, m, h or d (2h), or H:MM:SS, not {text:?}"
        )
    };
    if t.contains(':') {
        let mut total: u64 = 0;
        for part in t.split(':') {
            let n: u64 = part.parse().map_err(|_| bad())?;
            total = total
                .checked_mul(60)
                .and_then(|x| x.checked_add(n))
                .ok_or_else(bad)?;
        }
        return Ok(total);
    }
    let lower = t.to_ascii_lowercase();
    let (number, factor) = match lower.chars().last() {
        Some('s') => (&lower[..lower.len() - 1], 1.0),
        Some('m') => (&lower[..lower.len() - 1], 60.0),
        Some('h') => (&lower[..lower.len() - 1], 3600.0),
        Some('d') => (&lower[..lower.len() - 1], 86400.0),
        _ => (lower.as_str(), 1.0),
    };
    let value: f64 = number.trim().parse().map_err(|_| bad())?;
    let secs = value * factor;
    if !secs.is_finite() || secs < 0.0 || secs > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(secs.ceil() as u64)
}

/// A count (cores, GPUs): a non-negative integer.
pub fn parse_count(what: &str, text: &str) -> Result<u32, String> {
    text.trim()
        .parse::<u32>()
        .map_err(|_| format!("{what} must be a non-negative integer, not {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_in_the_forms_people_write() {
        assert_eq!(parse_memory_mb("512"), Ok(512));
        assert_eq!(parse_memory_mb("512M"), Ok(512));
        assert_eq!(parse_memory_mb("4G"), Ok(4096));
        assert_eq!(parse_memory_mb("4GiB"), Ok(4096));
        assert_eq!(parse_memory_mb("1.5g"), Ok(1536));
        assert_eq!(parse_memory_mb("1T"), Ok(1024 * 1024));
        assert_eq!(parse_memory_mb("100K"), Ok(1));
        assert!(parse_memory_mb("4X").is_err());
        assert!(parse_memory_mb("").is_err());
        assert!(parse_memory_mb("-1G").is_err());
    }

    #[test]
    fn walltime_in_the_forms_people_write() {
        assert_eq!(parse_seconds("30"), Ok(30));
        assert_eq!(parse_seconds("90m"), Ok(5400));
        assert_eq!(parse_seconds("2h"), Ok(7200));
        assert_eq!(parse_seconds("1d"), Ok(86400));
        assert_eq!(parse_seconds("1:30:00"), Ok(5400));
        assert_eq!(parse_seconds("45s"), Ok(45));
        assert!(parse_seconds("2w").is_err());
        assert!(parse_seconds("h").is_err());
    }
}
