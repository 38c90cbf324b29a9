//! How results and errors reach the user: exit codes, one-line errors, tables, JSON.

use std::process::ExitCode;

/// Exit codes of the user commands. 2 is clap's, for usage errors.
pub mod exit {
    pub const OK: u8 = 0;
    /// Server unreachable, job not found, refused request, I/O error.
    pub const ERROR: u8 = 1;
    pub const FAILED: u8 = 3;
    pub const KILLED: u8 = 4;
    pub const INVALID: u8 = 5;
    pub const TIMEOUT: u8 = 6;
    /// The job finished but its results were removed after the retention period.
    pub const CLEANED: u8 = 7;
}

/// Exit code for a job that ended in `status` (None while it is still going).
pub fn exit_code_for(status: &str) -> Option<u8> {
    match status {
        "Completed" => Some(exit::OK),
        "Failed" => Some(exit::FAILED),
        "Killed" => Some(exit::KILLED),
        "Invalid" => Some(exit::INVALID),
        "Cleaned" => Some(exit::CLEANED),
        _ => None,
    }
}

/// Prints an error as one line on stderr and returns the error exit code.
pub fn fail(error: &anyhow::Error) -> ExitCode {
    eprintln!("jobrelay: error: {error:#}");
    ExitCode::from(exit::ERROR)
}

pub fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

/// Text of a JSON field for a table cell.
pub fn cell(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Lays out rows as a table with a header, columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_final_state_has_its_own_exit_code() {
        let codes: Vec<u8> = ["Completed", "Failed", "Killed", "Invalid", "Cleaned"]
            .iter()
            .map(|s| exit_code_for(s).unwrap())
            .collect();
        let mut unique = codes.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), codes.len());
        assert!(!codes.contains(&exit::TIMEOUT) && !codes.contains(&exit::ERROR));
        assert_eq!(exit_code_for("Running"), None);
    }

    #[test]
    fn table_pads_columns() {
        let text = table(
            &["ID", "STATUS"],
            &[
                vec!["1".into(), "Completed".into()],
                vec!["12".into(), "Queued".into()],
            ],
        );
        assert_eq!(text, "ID  STATUS\n1   Completed\n12  Queued");
    }
}
