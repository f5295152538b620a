//! HMAC-SHA256 signatures: Meta's `X-Hub-Signature-256` on webhooks (checked on the raw bytes,
//! in constant time) and the relay's own signature on what it delivers to the backend
//! (`X-Bite-Signature-256`, keyed with `SYNC_API_KEY`, same `sha256=<hex>` form so a backend
//! can check it the way it would check Meta's).

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

/// Checks a `sha256=<hex>` header value against `body`, in constant time.
pub fn verify(secret: &[u8], body: &[u8], header: Option<&[u8]>) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let hex_part = header
        .strip_prefix(b"sha256=")
        .ok_or(SignatureError::Malformed)?;
    if hex_part.len() != 64 {
        return Err(SignatureError::Malformed);
    }
    let expected = hex::decode(hex_part).map_err(|_| SignatureError::Malformed)?;
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    mac.verify_slice(&expected)
        .map_err(|_| SignatureError::Mismatch)
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
    fn tokens_compare_by_value() {
        assert!(same_token(b"abc", b"abc"));
        assert!(!same_token(b"abc", b"abd"));
        assert!(!same_token(b"", b"abc"));
    }
}
