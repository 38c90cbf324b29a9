//! Which hosts callbacks may go to. Without an allowlist there are no callbacks at all: a
//! user who may upload must not be able to make the server call an internal address (a cloud
//! metadata service, an admin port on localhost).

/// Hosts callbacks may go to: exact names or addresses (`hooks.example.org`, `10.0.0.5`,
/// `[::1]`), or every sub-domain of a name (`*.example.org`, not `example.org` itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowlist {
    exact: Vec<String>,
    suffixes: Vec<String>,
}

/// Longest callback URL accepted (it is stored with the job and shown on it).
const MAX_URL_LEN: usize = 2048;

impl Allowlist {
    /// Checks the entries of `[webhooks] allowed_hosts`.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let mut list = Allowlist {
            exact: Vec::new(),
            suffixes: Vec::new(),
        };
        for entry in entries {
            let host = normalise(entry);
            let bad = host.is_empty()
                || host
                    .chars()
                    .any(|c| c.is_whitespace() || "/?#@".contains(c) || c.is_control());
            if bad {
                return Err(format!(
                    "[webhooks] allowed_hosts: {entry:?} is not a host name or address \
                     (give hosts, not URLs; `*.example.org` for its sub-domains)"
                ));
            }
            match host.strip_prefix("*.") {
                Some(domain) if !domain.is_empty() && !domain.contains('*') => {
                    list.suffixes.push(format!(".{domain}"))
                }
                _ if host.contains('*') => {
                    return Err(format!(
                        "[webhooks] allowed_hosts: {entry:?}: a wildcard is only allowed as \
                         a leading `*.`"
                    ))
                }
                _ => list.exact.push(host),
            }
        }
        Ok(list)
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.suffixes.is_empty()
    }

    fn allows_host(&self, host: &str) -> bool {
        let host = normalise(host);
        self.exact.contains(&host) || self.suffixes.iter().any(|s| host.ends_with(s.as_str()))
    }

    /// `raw` as a URL callbacks may be POSTed to, or why not.
    pub fn check(&self, raw: &str) -> Result<url::Url, String> {
        if raw.len() > MAX_URL_LEN {
            return Err(format!("callback_url is longer than {MAX_URL_LEN} bytes"));
        }
        let url = url::Url::parse(raw.trim())
            .map_err(|e| format!("callback_url {raw:?} is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("callback_url {raw:?} must be http:// or https://"));
        }
        // A password in the URL would be stored and shown on the job.
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!(
                "callback_url {raw:?} must not carry credentials: receivers check the signature"
            ));
        }
        let Some(host) = url.host_str() else {
            return Err(format!("callback_url {raw:?} has no host"));
        };
        if self.is_empty() {
            return Err(
                "this server takes no callbacks: its [webhooks] allowed_hosts is empty".into(),
            );
        }
        if !self.allows_host(host) {
            return Err(format!(
                "callback host {host:?} is not in this server's [webhooks] allowed_hosts"
            ));
        }
        Ok(url)
    }
}

/// Lower case, without a trailing dot or IPv6 brackets: how hosts are compared.
fn normalise(host: &str) -> String {
    let host = host.trim().to_ascii_lowercase();
    let host = host.trim_end_matches('.');
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> Allowlist {
        Allowlist::parse(&entries.iter().map(|e| e.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn exact_hosts_and_sub_domains_are_allowed_and_nothing_else() {
        let allow = list(&["Hooks.Example.org", "*.platform.test", "127.0.0.1", "[::1]"]);
        for ok in [
            "https://hooks.example.org/jobrelay",
            "http://HOOKS.example.org.:8080/x?y=1",
            "https://a.platform.test/",
            "https://deep.a.platform.test/",
            "http://127.0.0.1:9/",
            "http://[::1]:8000/",
        ] {
            assert!(allow.check(ok).is_ok(), "{ok} should be allowed");
        }
        for refused in [
            "https://example.org/",
            "https://evil-hooks.example.org/",
            "https://hooks.example.org.evil.test/",
            "https://platform.test/",
            "https://xplatform.test/",
            "http://127.0.0.2/",
            "http://169.254.169.254/latest/meta-data",
            "http://localhost/",
            "ftp://hooks.example.org/",
            "https://user:pw@hooks.example.org/",
            "not a url",
        ] {
            assert!(allow.check(refused).is_err(), "{refused} should be refused");
        }
    }

    #[test]
    fn an_empty_allowlist_refuses_every_callback() {
        let allow = list(&[]);
        assert!(allow.is_empty());
        let why = allow.check("http://127.0.0.1/").unwrap_err();
        assert!(why.contains("no callbacks"), "{why}");
    }

    #[test]
    fn entries_must_be_hosts() {
        for bad in [
            "https://hooks.example.org/",
            "",
            "a*.example.org",
            "*.",
            "a b",
        ] {
            assert!(
                Allowlist::parse(&[bad.to_owned()]).is_err(),
                "{bad:?} should be refused"
            );
        }
    }
}
