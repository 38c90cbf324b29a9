//! Multipart bodies written by hand, so that a test controls every byte of the part headers
//! (reqwest's forms cannot leave a name out or put a NUL in a file name).

/// One part: (field name, or None for a part without one; file name, or None for a text
/// field; content).
pub type RawPart<'a> = (Option<&'a [u8]>, Option<&'a [u8]>, &'a [u8]);

/// The body of `parts` between `boundary` lines, closed by the final boundary.
pub fn raw_multipart(boundary: &str, parts: &[RawPart]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, file_name, content) in parts {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data").as_bytes(),
        );
        if let Some(name) = name {
            body.extend_from_slice(b"; name=\"");
            body.extend_from_slice(name);
            body.extend_from_slice(b"\"");
        }
        if let Some(file_name) = file_name {
            body.extend_from_slice(b"; filename=\"");
            body.extend_from_slice(file_name);
            body.extend_from_slice(b"\"");
        }
        body.extend_from_slice(b"\r\n\r\n");
        body.extend_from_slice(content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    body
}
