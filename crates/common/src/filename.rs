//! The rules an uploaded file name must follow before it may touch the disk.
//!
//! A name is a relative path with `/` separators. Sub-directories are allowed
//! (`inputs/a.pdb`); anything that could leave the work directory or confuse a
//! file system is refused with a reason fit for an error message.

use std::collections::HashSet;
use std::path::PathBuf;

/// Longest accepted name, in bytes (Linux's PATH_MAX less room for the work directory).
pub const MAX_NAME_BYTES: usize = 1024;
/// Longest accepted path component, in bytes (NAME_MAX).
pub const MAX_COMPONENT_BYTES: usize = 255;

/// Checks one uploaded file name and returns it as a relative path.
pub fn validate(name: &str) -> Result<PathBuf, String> {
    if name.is_empty() {
        return Err("file name is empty".into());
    }
    if name.contains('\0') {
        return Err("file name contains a NUL byte".into());
    }
    if name.contains('\\') {
        return Err("file name contains a backslash".into());
    }
    if name.starts_with('/') {
        return Err("file name is absolute".into());
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!("file name is longer than {MAX_NAME_BYTES} bytes"));
    }
    let mut path = PathBuf::new();
    for component in name.split('/') {
        match component {
            ".." => return Err("file name contains '..'".into()),
            "" | "." => return Err("file name has an empty or '.' path component".into()),
            c if c.len() > MAX_COMPONENT_BYTES => {
                return Err(format!(
                    "a path component is longer than {MAX_COMPONENT_BYTES} bytes"
                ))
            }
            c if c.chars().any(char::is_control) => {
                return Err("file name contains a control character".into())
            }
            c => path.push(c),
        }
    }
    Ok(path)
}

/// Tracks the names of one submission so that no two files collide: the same name twice,
/// or a name used both as a file and as a directory (`a` and `a/b`).
#[derive(Default, Debug)]
pub struct NameSet {
    files: HashSet<String>,
    dirs: HashSet<String>,
}

impl NameSet {
    /// Validates `name` and records it; returns the relative path to store it under.
    pub fn admit(&mut self, name: &str) -> Result<PathBuf, String> {
        let path = validate(name)?;
        if self.files.contains(name) {
            return Err("file name is repeated in this upload".into());
        }
        if self.dirs.contains(name) {
            return Err("file name is also used as a directory in this upload".into());
        }
        let parents: Vec<&str> = name
            .match_indices('/')
            .map(|(index, _)| &name[..index])
            .collect();
        if let Some(clash) = parents.iter().find(|p| self.files.contains(**p)) {
            return Err(format!(
                "file name needs '{clash}' as a directory, but it is a file in this upload"
            ));
        }
        self.dirs.extend(parents.into_iter().map(str::to_owned));
        self.files.insert(name.to_owned());
        Ok(path)
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_and_nested_names() {
        assert_eq!(validate("run.sh").unwrap(), PathBuf::from("run.sh"));
        assert_eq!(
            validate("inputs/a.pdb").unwrap(),
            PathBuf::from("inputs").join("a.pdb")
        );
        assert_eq!(
            validate("model..v2.pdb").unwrap(),
            PathBuf::from("model..v2.pdb")
        );
        assert_eq!(validate(".hidden").unwrap(), PathBuf::from(".hidden"));
    }

    #[test]
    fn refuses_names_that_escape_or_confuse() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/..",
            "..",
            "a\\b",
            "a\0b",
            "a//b",
            "./a",
            "a/",
            "a\nb",
        ] {
            assert!(validate(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(validate(&"x".repeat(256)).is_err());
        assert!(validate(&"a/".repeat(600)).is_err());
    }

    #[test]
    fn name_set_refuses_repeats_and_file_directory_clashes() {
        let mut names = NameSet::default();
        names.admit("run.sh").unwrap();
        assert!(names.admit("run.sh").is_err());
        names.admit("inputs/a.pdb").unwrap();
        assert!(names.admit("inputs").is_err());
        assert!(names.admit("run.sh/x").is_err());
        names.admit("inputs/b.pdb").unwrap();
        assert_eq!(names.len(), 3);
    }
}
