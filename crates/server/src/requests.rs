//! What a job asks for, read from its upload's text fields (`cores`, `memory`, `gpus`,
//! `walltime`, `priority`) with its service's defaults, and checked against the service's
//! maxima. Pure: the fields in, the request or the reason for a 400 out.

use std::collections::BTreeMap;

use jobrelay_common::resources::{
    parse_count, parse_memory_mb, parse_seconds, CORES_FIELD, GPUS_FIELD, MEMORY_FIELD,
    PRIORITY_FIELD, WALLTIME_FIELD,
};

use crate::config::ResourceRules;
use crate::store::JobResources;

/// The job's request: each field given (non-empty) or the service's default, refused when
/// it does not parse or is over the service's maximum.
pub fn from_fields(
    fields: &BTreeMap<String, String>,
    rules: &ResourceRules,
    service: &str,
) -> Result<JobResources, String> {
    let field = |name: &str| fields.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
    let cores = match field(CORES_FIELD) {
        Some(text) => parse_count("cores", text)?,
        None => rules.default_cores,
    };
    if cores == 0 {
        return Err("cores must be at least 1".into());
    }
    let memory_mb = match field(MEMORY_FIELD) {
        Some(text) => Some(parse_memory_mb(text)?),
        None => rules.default_memory_mb,
    };
    let gpus = match field(GPUS_FIELD) {
        Some(text) => parse_count("gpus", text)?,
        None => rules.default_gpus,
    };
    let walltime_s = match field(WALLTIME_FIELD) {
        Some(text) => Some(parse_seconds(text)?).filter(|s| *s > 0),
        None => rules.default_walltime_s,
    };
    let priority = match field(PRIORITY_FIELD) {
        Some(text) => text
            .parse::<i64>()
            .map_err(|_| format!("priority must be an integer, not {text:?}"))?,
        None => 0,
    };
    let over = |what: &str, asked: Option<u64>, max: Option<u64>, unit: &str| match (asked, max) {
        (Some(a), Some(m)) if a > m => Err(format!(
            "asks for {a}{unit} {what}; service {service} allows at most {m}{unit} (its max_{what})"
        )),
        _ => Ok(()),
    };
    over(
        "cores",
        Some(cores.into()),
        rules.max_cores.map(u64::from),
        "",
    )?;
    over("memory", memory_mb, rules.max_memory_mb, " MiB")?;
    over("gpus", Some(gpus.into()), rules.max_gpus.map(u64::from), "")?;
    over("walltime", walltime_s, rules.max_walltime_s, " s")?;
    Ok(JobResources {
        cores,
        memory_mb,
        gpus,
        walltime_s,
        priority,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn nothing_asked_is_the_service_default() {
        let rules = ResourceRules {
            default_cores: 2,
            default_memory_mb: Some(1024),
            default_walltime_s: Some(600),
            ..Default::default()
        };
        let r = from_fields(&fields(&[]), &rules, "s").unwrap();
        assert_eq!(
            (r.cores, r.memory_mb, r.gpus, r.walltime_s, r.priority),
            (2, Some(1024), 0, Some(600), 0)
        );
        assert_eq!(
            from_fields(&fields(&[]), &ResourceRules::default(), "s"),
            Ok(JobResources::default())
        );
    }

    #[test]
    fn fields_in_readable_forms() {
        let r = from_fields(
            &fields(&[
                ("cores", "4"),
                ("memory", "4G"),
                ("gpus", "1"),
                ("walltime", "2h"),
                ("priority", "-3"),
            ]),
            &ResourceRules::default(),
            "s",
        )
        .unwrap();
        assert_eq!(
            (r.cores, r.memory_mb, r.gpus, r.walltime_s, r.priority),
            (4, Some(4096), 1, Some(7200), -3)
        );
    }

    #[test]
    fn over_a_maximum_or_unreadable_is_refused_with_the_reason() {
        let rules = ResourceRules {
            max_cores: Some(8),
            max_memory_mb: Some(2048),
            ..Default::default()
        };
        let e = from_fields(&fields(&[("cores", "16")]), &rules, "docking").unwrap_err();
        assert!(e.contains("16 cores") && e.contains("at most 8"), "{e}");
        let e = from_fields(&fields(&[("memory", "4G")]), &rules, "docking").unwrap_err();
        assert!(e.contains("4096 MiB") && e.contains("max_memory"), "{e}");
        assert!(from_fields(&fields(&[("cores", "0")]), &rules, "d").is_err());
        assert!(from_fields(&fields(&[("cores", "two")]), &rules, "d").is_err());
        assert!(from_fields(&fields(&[("walltime", "soon")]), &rules, "d").is_err());
        assert!(from_fields(&fields(&[("priority", "high")]), &rules, "d").is_err());
    }
}
