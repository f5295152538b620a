//! Who may call the relay's own API (`POST /api/messages`): the restaurant's backend, with
//! either `x-api-key: <SYNC_API_KEY>` or `Authorization: Bearer <JWT>` signed HS256 with
//! `JWT_SECRET`.
//!
//! Everything here is pure: headers and the current time in, a caller or a reason out.
//! Invariants:
//! - Keys and signatures are compared in constant time ([`same_token`], `Mac::verify_slice`).
//! - A JWT is accepted only with `alg: HS256` in its header (`none`, RS256 and every other
//!   algorithm are refused before any signature check: no algorithm confusion), a valid
//!   signature over `header.payload`, and, when present, `exp`/`nbf` within
//!   [`LEEWAY_SECS`] of now.
//! - A missing secret never matches: with neither `SYNC_API_KEY` nor `JWT_SECRET` set, every
//!   call is refused.
//! - Reasons name what was wrong, never the token, key or claims.

use axum::http::HeaderMap;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{KeyInit, Mac};
use serde_json::Value;

use super::settings::Secret;
use super::signature::same_token;

/// Clock skew allowed on `exp` and `nbf`.
pub const LEEWAY_SECS: i64 = 60;

/// How the caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// `x-api-key` matched `SYNC_API_KEY`.
    ApiKey,
    /// A valid HS256 JWT.
    Jwt,
}

/// Why a call was refused (said in the 401's body).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `x-api-key` and no bearer token.
    #[error("missing credentials: send x-api-key or Authorization: Bearer <jwt>")]
    Missing,
    /// `x-api-key` given but wrong (or `SYNC_API_KEY` not set).
    #[error("invalid x-api-key")]
    WrongApiKey,
    /// Not three base64url parts with JSON header and payload.
    #[error("malformed bearer token")]
    Malformed,
    /// The header's `alg` is not HS256.
    #[error("unsupported token algorithm (only HS256 is accepted)")]
    Algorithm,
    /// The signature does not match (or `JWT_SECRET` is not set).
    #[error("invalid token signature")]
    Signature,
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// `nbf` is still ahead.
    #[error("token not valid yet")]
    NotYetValid,
}

/// Checks the request's credentials at `now` (unix seconds).
pub fn check(
    headers: &HeaderMap,
    api_key: Option<&Secret>,
    jwt_secret: Option<&Secret>,
    now: i64,
) -> Result<Caller, AuthError> {
    if let Some(given) = headers.get("x-api-key") {
        return match api_key {
            Some(key) if same_token(given.as_bytes(), key.expose().as_bytes()) => {
                Ok(Caller::ApiKey)
            }
            _ => Err(AuthError::WrongApiKey),
        };
    }
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let Some(token) = bearer else {
        return Err(AuthError::Missing);
    };
    let secret = jwt_secret.ok_or(AuthError::Signature)?;
    verify_jwt(token, secret.expose().as_bytes(), now).map(|_| Caller::Jwt)
}

fn decode_json(part: &str) -> Result<Value, AuthError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| AuthError::Malformed)?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed)?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(AuthError::Malformed)
    }
}

/// Verifies an HS256 JWT and returns its claims.
pub fn verify_jwt(token: &str, secret: &[u8], now: i64) -> Result<Value, AuthError> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    let head = decode_json(header)?;
    if head.get("alg").and_then(Value::as_str) != Some("HS256") {
        return Err(AuthError::Algorithm);
    }
    let signature = URL_SAFE_NO_PAD
        .decode(signature.trim_end_matches('='))
        .map_err(|_| AuthError::Malformed)?;
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(header.as_bytes());
    mac.update(b".");
    mac.update(payload.as_bytes());
    mac.verify_slice(&signature)
        .map_err(|_| AuthError::Signature)?;
    let claims = decode_json(payload)?;
    let time = |name: &str| -> Result<Option<i64>, AuthError> {
        match claims.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|t| Some(t as i64))
                .ok_or(AuthError::Malformed),
        }
    };
    if let Some(exp) = time("exp")?
        && now > exp.saturating_add(LEEWAY_SECS)
    {
        return Err(AuthError::Expired);
    }
    if let Some(nbf) = time("nbf")?
        && now.saturating_add(LEEWAY_SECS) < nbf
    {
        return Err(AuthError::NotYetValid);
    }
    Ok(claims)
}

/// Signs `claims` as an HS256 JWT (for tests and for operators making a token).
pub fn sign_jwt(claims: &Value, secret: &[u8]) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(format!("{header}.{payload}").as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{header}.{payload}.{signature}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_760_000_000;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn a_token_signed_with_the_secret_passes() {
        let t = sign_jwt(&json!({"sub":"backend","exp": NOW + 300}), b"s3cret");
        assert_eq!(verify_jwt(&t, b"s3cret", NOW).unwrap()["sub"], "backend");
        // A known token from jwt.io's HS256 example (secret "your-256-bit-secret").
        let jwtio = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";
        assert_eq!(
            verify_jwt(jwtio, b"your-256-bit-secret", NOW).unwrap()["name"],
            "John Doe"
        );
    }

    #[test]
    fn wrong_secret_expired_future_and_tampered_tokens_fail() {
        let t = sign_jwt(&json!({"exp": NOW + 300}), b"s3cret");
        assert_eq!(verify_jwt(&t, b"other", NOW), Err(AuthError::Signature));
        let old = sign_jwt(&json!({"exp": NOW - 61}), b"s3cret");
        assert_eq!(verify_jwt(&old, b"s3cret", NOW), Err(AuthError::Expired));
        let skewed = sign_jwt(&json!({"exp": NOW - 59}), b"s3cret");
        assert!(verify_jwt(&skewed, b"s3cret", NOW).is_ok());
        let future = sign_jwt(&json!({"nbf": NOW + 120}), b"s3cret");
        assert_eq!(
            verify_jwt(&future, b"s3cret", NOW),
            Err(AuthError::NotYetValid)
        );
        let (h, rest) = t.split_once('.').unwrap();
        let (_, s) = rest.split_once('.').unwrap();
        let forged_payload = URL_SAFE_NO_PAD.encode(br#"{"exp":99999999999}"#);
        assert_eq!(
            verify_jwt(&format!("{h}.{forged_payload}.{s}"), b"s3cret", NOW),
            Err(AuthError::Signature)
        );
        assert_eq!(verify_jwt("a.b", b"s3cret", NOW), Err(AuthError::Malformed));
        assert_eq!(
            verify_jwt("%%.e30.", b"s3cret", NOW),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn only_hs256_is_accepted() {
        let payload = URL_SAFE_NO_PAD.encode(br#"{"sub":"x"}"#);
        for alg in ["none", "HS512", "RS256", "hs256"] {
            let header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"{alg}"}}"#));
            let token = format!("{header}.{payload}.");
            assert_eq!(
                verify_jwt(&token, b"s3cret", NOW),
                Err(AuthError::Algorithm),
                "{alg}"
            );
        }
    }

    #[test]
    fn headers_choose_the_method() {
        let key = Secret::new("k-123");
        let jwt = Secret::new("s3cret");
        let h = headers(&[("x-api-key", "k-123")]);
        assert_eq!(check(&h, Some(&key), Some(&jwt), NOW), Ok(Caller::ApiKey));
        let h = headers(&[("x-api-key", "k-124")]);
        assert_eq!(
            check(&h, Some(&key), Some(&jwt), NOW),
            Err(AuthError::WrongApiKey)
        );
        assert_eq!(
            check(&h, None, Some(&jwt), NOW),
            Err(AuthError::WrongApiKey)
        );
        let token = sign_jwt(&json!({"exp": NOW + 60}), b"s3cret");
        let h = headers(&[("authorization", &format!("Bearer {token}"))]);
        assert_eq!(check(&h, Some(&key), Some(&jwt), NOW), Ok(Caller::Jwt));
        assert_eq!(check(&h, Some(&key), None, NOW), Err(AuthError::Signature));
        assert_eq!(
            check(&HeaderMap::new(), Some(&key), Some(&jwt), NOW),
            Err(AuthError::Missing)
        );
        let h = headers(&[("authorization", "Basic dXNlcjpwYXNz")]);
        assert_eq!(
            check(&h, Some(&key), Some(&jwt), NOW),
            Err(AuthError::Missing)
        );
    }
}
