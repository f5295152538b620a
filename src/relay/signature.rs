//! HMAC-SHA256 signatures: Meta's `X-Hub-Signature-256` on webhooks (checked on the raw bytes,
//! in constant time) and the relay's own signature on what it delivers to the backend
//! (`X-Bite-Signature-256`, keyed with `SYNC_API_KEY`, same `sha256=<hex>` form so a backend
//! can check it the way it would check Meta's).
//!
//! A webhook's body is checked as it streams in ([`Verifier`]): the header is read first (a
//! missing or malformed one refuses the request before a byte of the body is read), each
//! chunk goes through the MAC as it arrives, and during a secret rotation the body is checked
//! against the current and the previous secret at once.

use hmac::{KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = hmac::Hmac<Sha256>;

/// The header Meta signs webhooks with.
pub const META_HEADER: &str = "x-hub-signature-256";
/// The header bite-sync signs deliveries with.
pub const DELIVERY_HEADER: &str = "x-bite-signature-256";

/// Why a signature was refused (said in the 401's body and the log; never the values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No header.
    #[error("missing X-Hub-Signature-256 header")]
    Missing,
    /// Not `sha256=` and 64 hex digits.
    #[error("malformed X-Hub-Signature-256 header (expected sha256= and 64 hex digits)")]
    Malformed,
    /// Well formed, wrong.
    #[error(
        "X-Hub-Signature-256 does not match the body (check META_APP_SECRET: the App secret, not the verify or access token)"
    )]
    Mismatch,
}

/// `sha256=<lowercase hex>` of `body` keyed with `secret`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The 32 bytes a `sha256=<64 hex digits>` header value names.
pub fn parse_header(header: Option<&[u8]>) -> Result<[u8; 32], SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let hex_part = header
        .strip_prefix(b"sha256=")
        .ok_or(SignatureError::Malformed)?;
    let mut expected = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut expected).map_err(|_| SignatureError::Malformed)?;
    Ok(expected)
}

/// Checks a `sha256=<hex>` header value against `body`, in constant time.
pub fn verify(secret: &[u8], body: &[u8], header: Option<&[u8]>) -> Result<(), SignatureError> {
    let expected = parse_header(header)?;
    let mut verifier = Verifier::new(&[secret]);
    verifier.update(body);
    verifier.finish(&expected).map(drop)
}

/// HMAC-SHA256 of a body fed in chunks, under one or more secrets at once (the current one
/// first, then the previous one during a rotation).
#[derive(Clone)]
pub struct Verifier {
    macs: Vec<HmacSha256>,
}

impl Verifier {
    /// A verifier for `secrets`, in order of preference.
    pub fn new(secrets: &[&[u8]]) -> Verifier {
        Verifier {
            macs: secrets
                .iter()
                .map(|s| HmacSha256::new_from_slice(s).expect("HMAC takes any key length"))
                .collect(),
        }
    }

    /// Adds the next chunk of the body.
    pub fn update(&mut self, chunk: &[u8]) {
        for mac in &mut self.macs {
            mac.update(chunk);
        }
    }

    /// Which secret (its index) signed the body as `expected` says; every secret is compared,
    /// in constant time, so the time taken does not tell which one matched.
    pub fn finish(self, expected: &[u8; 32]) -> Result<usize, SignatureError> {
        let mut matched = None;
        for (i, mac) in self.macs.into_iter().enumerate() {
            if mac.verify_slice(expected).is_ok() && matched.is_none() {
                matched = Some(i);
            }
        }
        matched.ok_or(SignatureError::Mismatch)
    }
}

/// Constant-time equality for tokens (`hub.verify_token`, `x-api-key`).
pub fn same_token(given: &[u8], expected: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    // Hashing first makes the comparison's length independent of the secret's.
    use sha2::Digest;
    let a = Sha256::digest(given);
    let b = Sha256::digest(expected);
    bool::from(a.as_slice().ct_eq(b.as_slice()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_style_signatures_round_trip() {
        let body = br#"{"text":"J'ai mang\u00e9 \/ a@b"}"#;
        let header = sign(b"app-secret", body);
        assert!(header.starts_with("sha256=") && header.len() == 71);
        assert_eq!(verify(b"app-secret", body, Some(header.as_bytes())), Ok(()));
    }

    #[test]
    fn wrong_missing_and_malformed_signatures_are_refused() {
        let body = b"{}";
        let good = sign(b"s", body);
        assert_eq!(
            verify(b"other", body, Some(good.as_bytes())),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"s", b"{} ", Some(good.as_bytes())),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(verify(b"s", body, None), Err(SignatureError::Missing));
        assert_eq!(
            verify(b"s", body, Some(&good.as_bytes()[..70])),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify(b"s", body, Some(&good.as_bytes()[7..])),
            Err(SignatureError::Malformed)
        );
        let not_hex = format!("sha256={}", "z".repeat(64));
        assert_eq!(
            verify(b"s", body, Some(not_hex.as_bytes())),
            Err(SignatureError::Malformed)
        );
        // The legacy SHA-1 form is not accepted.
        assert_eq!(
            verify(b"s", body, Some(b"sha1=abc")),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn a_body_in_chunks_verifies_as_a_whole_under_either_secret() {
        let body = br#"{"object":"whatsapp_business_account","entry":[]}"#;
        let header = sign(b"old", body);
        let expected = parse_header(Some(header.as_bytes())).unwrap();
        let mut v = Verifier::new(&[b"new", b"old"]);
        for chunk in body.chunks(7) {
            v.update(chunk);
        }
        assert_eq!(v.clone().finish(&expected), Ok(1));
        let new = parse_header(Some(sign(b"new", body).as_bytes())).unwrap();
        assert_eq!(v.clone().finish(&new), Ok(0));
        let other = parse_header(Some(sign(b"other", body).as_bytes())).unwrap();
        assert_eq!(v.finish(&other), Err(SignatureError::Mismatch));
        let mut only_new = Verifier::new(&[b"new"]);
        only_new.update(body);
        assert_eq!(only_new.finish(&expected), Err(SignatureError::Mismatch));
    }

    #[test]
    fn tokens_compare_by_value() {
        assert!(same_token(b"abc", b"abc"));
        assert!(!same_token(b"abc", b"abd"));
        assert!(!same_token(b"", b"abc"));
    }
}
