//! The signature of a notification: `X-Jobrelay-Signature: t=<unix seconds>,v1=<hex>` where
//! the hex is HMAC-SHA256, keyed with the service's webhook secret, of `"<t>.<body>"` (the
//! shape Stripe's and GitHub's users know). The time in the signed text lets a receiver
//! refuse a replayed old delivery.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Header carrying the signature.
pub const SIGNATURE_HEADER: &str = "X-Jobrelay-Signature";

fn mac(secret: &str, t: i64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The signature header's value for `body` sent at Unix time `t`.
pub fn signature(secret: &str, t: i64, body: &[u8]) -> String {
    let digest = mac(secret, t, body).finalize().into_bytes();
    format!("t={t},v1={}", hex::encode(digest))
}

/// Checks a signature header's value as a receiver does: a `v1` matching `body` (compared in
/// constant time), made within `tolerance_secs` of `now`.
pub fn verify(
    secret: &str,
    header: &str,
    body: &[u8],
    now: i64,
    tolerance_secs: i64,
) -> Result<(), String> {
    let mut t = None;
    let mut candidates = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => t = value.parse::<i64>().ok(),
            Some(("v1", value)) => candidates.push(value),
            _ => {}
        }
    }
    let t = t.ok_or("no t= in the signature")?;
    if (now - t).abs() > tolerance_secs {
        return Err(format!(
            "signed at {t}, more than {tolerance_secs} s from {now}"
        ));
    }
    let matches = candidates.iter().any(|candidate| {
        hex::decode(candidate).is_ok_and(|bytes| mac(secret, t, body).verify_slice(&bytes).is_ok())
    });
    if matches {
        Ok(())
    } else {
        Err("no v1= signature matches the body".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_time_dot_body() {
        // printf '%s' '1700000000.{"id":1}' | openssl dgst -sha256 -hmac whsec_test
        assert_eq!(
            signature("whsec_test", 1_700_000_000, br#"{"id":1}"#),
            "t=1700000000,v1=2f441ba4b3b2d50d28a9ab9d9fd8880376ecd1eb5d0435401553f5d8d0a5dcf8"
        );
    }

    #[test]
    fn verify_accepts_its_own_and_refuses_changes() {
        let body = br#"{"id":7,"status":"Completed"}"#;
        let header = signature("s3cret", 1000, body);
        assert_eq!(verify("s3cret", &header, body, 1100, 300), Ok(()));
        assert!(verify(
            "s3cret",
            &header,
            br#"{"id":7,"status":"Failed"}"#,
            1100,
            300
        )
        .is_err());
        assert!(verify("other", &header, body, 1100, 300).is_err());
        assert!(verify("s3cret", &header, body, 1301, 300).is_err());
        let forged_time = header.replace("t=1000", "t=1200");
        assert!(verify("s3cret", &forged_time, body, 1200, 300).is_err());
        assert!(verify("s3cret", "v1=00", body, 1000, 300).is_err());
    }
}
