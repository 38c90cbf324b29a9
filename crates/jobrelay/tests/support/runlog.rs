//! Run logs: test jobs append a line (their name) to a file outside their work directory, so
//! that a test can tell how often each one ran, whatever happened to its results.

use std::collections::BTreeMap;
use std::path::Path;

/// How many times each line stands in `log` (empty if the file does not exist yet).
pub fn count_lines(log: &Path) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        *counts.entry(line.to_owned()).or_insert(0) += 1;
    }
    counts
}
