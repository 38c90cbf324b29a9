//! The field name of a multipart part, read the way senders really write it.
//!
//! A name that needs escaping is sent by reqwest (and so by the deployed reference server's
//! `/submit`) in the RFC 5987 extended form, `name*=utf-8''data%2Fa.pdb`, which RFC 7578 does
//! not allow and multer does not read (it reports no name at all). [`field_name`] reads both
//! forms; the plain `name="..."` as multer parsed it wins when present.

use axum::http::{header, HeaderMap};
use percent_encoding::percent_decode_str;

/// The part's field name: multer's `plain` one, else the extended `name*` parameter of its
/// `Content-Disposition`, decoded (UTF-8 only); `None` when neither is there or readable.
pub fn field_name(plain: Option<&str>, headers: &HeaderMap) -> Option<String> {
    if let Some(name) = plain {
        return Some(name.to_owned());
    }
    let disposition = headers.get(header::CONTENT_DISPOSITION)?.to_str().ok()?;
    parameters(disposition)
        .find(|(key, _)| key.eq_ignore_ascii_case("name*"))
        .and_then(|(_, value)| decode_extended(value))
}

/// The `key=value` parameters after the disposition type, split on `;` outside quotes.
fn parameters(disposition: &str) -> impl Iterator<Item = (&str, &str)> {
    let mut pieces = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (at, c) in disposition.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ';' if !quoted => {
                pieces.push(&disposition[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    pieces.push(&disposition[start..]);
    pieces.into_iter().skip(1).filter_map(|piece| {
        let (key, value) = piece.split_once('=')?;
        Some((key.trim(), value.trim()))
    })
}

/// `charset'language'percent-encoded` with charset UTF-8 (any case) → the decoded text.
fn decode_extended(value: &str) -> Option<String> {
    let mut parts = value.splitn(3, '\'');
    let charset = parts.next()?;
    let _language = parts.next()?;
    let encoded = parts.next()?;
    if !charset.eq_ignore_ascii_case("utf-8") {
        return None;
    }
    percent_decode_str(encoded)
        .decode_utf8()
        .ok()
        .map(|name| name.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(disposition: &str) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert(header::CONTENT_DISPOSITION, disposition.parse().unwrap());
        map
    }

    #[test]
    fn reads_the_extended_name_that_reqwest_sends() {
        let sent = headers(r#"form-data; name*=utf-8''data%2Fa.pdb; filename="a.pdb""#);
        assert_eq!(field_name(None, &sent).as_deref(), Some("data/a.pdb"));
        let accents = headers(r#"form-data; name*=UTF-8''r%C3%A9sum%C3%A9.txt; filename="x""#);
        assert_eq!(field_name(None, &accents).as_deref(), Some("résumé.txt"));
    }

    #[test]
    fn the_plain_name_wins_and_bad_extended_names_are_none() {
        let both = headers(r#"form-data; name="plain"; name*=utf-8''other"#);
        assert_eq!(field_name(Some("plain"), &both).as_deref(), Some("plain"));
        for bad in [
            r#"form-data; name*=iso-8859-1''caf%E9"#,
            r#"form-data; name*=utf-8''%FF%FE"#,
            r#"form-data; name*=nolanguage"#,
            r#"form-data; filename="a; name*=utf-8''x""#,
            r#"form-data"#,
        ] {
            assert_eq!(field_name(None, &headers(bad)), None, "{bad}");
        }
    }
}
