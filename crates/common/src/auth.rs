//! Bearer tokens: a [`Secret`] that never shows in logs or `Debug` output, compared in
//! constant time, read from a file or generated; and the parsing of `Authorization: Bearer`.

use std::fmt;
use std::io::Read;
use std::path::Path;

use axum::http::{header, HeaderMap, HeaderValue};

/// A shared secret (a bearer token). `Debug` prints `Secret(..)`, never the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A token given in code. Refuses an empty value or one that is not a valid HTTP
    /// header value (control characters).
    pub fn new(value: impl Into<String>) -> Result<Self, String> {
        let value = value.into();
        if value.is_empty() {
            return Err("a token must not be empty".into());
        }
        if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("a token must not contain spaces or control characters".into());
        }
        Ok(Secret(value))
    }

    /// 32 random bytes from the kernel, as 64 hex digits (for a client started by
    /// `jobrelay up`, or an operator's `--token-file`).
    pub fn generate() -> std::io::Result<Self> {
        let mut bytes = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(Secret(bytes.iter().map(|b| format!("{b:02x}")).collect()))
    }

    /// Reads a token file: its content without surrounding white space. A file others may
    /// read is refused, since anyone who can read it can run code on the clients.
    pub fn read_file(path: &Path) -> Result<Self, String> {
        use std::os::unix::fs::PermissionsExt;
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
        let mode = std::fs::metadata(path)
            .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o004 != 0 {
            return Err(format!(
                "token file {} is readable by every user (mode {:o}); chmod o-r it",
                path.display(),
                mode & 0o777
            ));
        }
        Secret::new(text.trim()).map_err(|e| format!("token file {}: {e}", path.display()))
    }

    /// The value, to send it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True if `candidate` is this secret; the time taken does not depend on where they
    /// differ.
    pub fn matches(&self, candidate: &str) -> bool {
        constant_time_eq::constant_time_eq(self.0.as_bytes(), candidate.as_bytes())
    }

    /// The `Authorization: Bearer <token>` header value, marked sensitive (kept out of
    /// HTTP/2 header compression tables and of reqwest's `Debug`).
    pub fn header_value(&self) -> HeaderValue {
        let mut value =
            HeaderValue::from_str(&format!("Bearer {}", self.0)).expect("checked by Secret::new");
        value.set_sensitive(true);
        value
    }
}

/// The token of an `Authorization: Bearer <token>` header, if there is one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_and_hide() {
        let secret = Secret::new("s3cret").unwrap();
        assert!(secret.matches("s3cret"));
        assert!(!secret.matches("s3cre"));
        assert!(!secret.matches("s3cret!"));
        assert!(!secret.matches(""));
        assert_eq!(format!("{secret:?}"), "Secret(..)");
        assert!(Secret::new("").is_err());
        assert!(Secret::new("a b").is_err());
        let generated = Secret::generate().unwrap();
        assert_eq!(generated.expose().len(), 64);
        assert_ne!(generated, Secret::generate().unwrap());
    }

    #[test]
    fn bearer_header_parsing() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer(&headers), None);
        headers.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&headers), Some("abc"));
        headers.insert(header::AUTHORIZATION, "bearer  abc ".parse().unwrap());
        assert_eq!(bearer(&headers), Some("abc"));
        headers.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&headers), None);
        headers.insert(header::AUTHORIZATION, "Bearer".parse().unwrap());
        assert_eq!(bearer(&headers), None);
    }

    #[test]
    fn token_files_must_not_be_world_readable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "abc\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Secret::read_file(&path).unwrap().expose(), "abc");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Secret::read_file(&path)
            .unwrap_err()
            .contains("readable by every user"));
    }
}
