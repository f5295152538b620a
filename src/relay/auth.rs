//! Who may call the relay's own API (`POST /api/messages` and the Graph-compatible
//! `POST /{version}/{phone_number_id}/messages`): the restaurant's backend, with
//! `x-api-key: <SYNC_API_KEY>`, `Authorization: Bearer <SYNC_API_KEY>` (what a client written
//! for Meta's API sends, with the key in place of Meta's token), or `Authorization: Bearer
//! <JWT>` signed HS256 with `JWT_SECRET`.
//!
//! Everything here is pure: headers and the current time in, a caller or a reason out.
//! Invariants:
//! - Keys and signatures are compared in constant time ([`same_token`], `Mac::verify_slice`).
//! - A JWT is accepted only with `alg: HS256` in its header (`none`, RS256 and every other
//!   algorithm are refused before any signature check: no algorithm confusion), a valid
//!   signature over `header.payload`, an `exp` (a token without one would be valid forever)
//!   no further away than the allowed lifetime (`relay.jwt_max_lifetime`; from `iat` when the
//!   token has one, else from now), and `nbf`/`iat` not ahead of now, all within
//!   [`LEEWAY_SECS`] of clock skew.
//! - During a rotation both the current and the previous value (`SYNC_API_KEY_PREVIOUS`,
//!   `JWT_SECRET_PREVIOUS`) are accepted, and the caller says which one matched.
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

/// Clock skew allowed on `exp`, `nbf` and `iat`.
pub const LEEWAY_SECS: i64 = 60;

/// How the caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// The key (`x-api-key`, or a bearer token that is not a JWT) matched `SYNC_API_KEY`
    /// (`previous`: `SYNC_API_KEY_PREVIOUS`).
    ApiKey {
        /// The previous value matched.
        previous: bool,
    },
    /// A valid HS256 JWT (`previous`: signed with `JWT_SECRET_PREVIOUS`).
    Jwt {
        /// The previous secret verified it.
        previous: bool,
    },
}

/// What calls are checked against: each secret's current and previous value, and the longest
/// lifetime a JWT may have.
#[derive(Debug, Clone, Copy, Default)]
pub struct Credentials<'a> {
    /// `SYNC_API_KEY`.
    pub api_key: Option<&'a Secret>,
    /// `SYNC_API_KEY_PREVIOUS`.
    pub api_key_previous: Option<&'a Secret>,
    /// `JWT_SECRET`.
    pub jwt_secret: Option<&'a Secret>,
    /// `JWT_SECRET_PREVIOUS`.
    pub jwt_secret_previous: Option<&'a Secret>,
    /// `relay.jwt_max_lifetime`, seconds.
    pub jwt_max_lifetime: i64,
}

/// Why a call was refused (said in the 401's body).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `x-api-key` and no bearer token.
    #[error("missing credentials: send x-api-key or Authorization: Bearer <SYNC_API_KEY or jwt>")]
    Missing,
    /// `x-api-key` given but wrong (or `SYNC_API_KEY` not set).
    #[error("invalid x-api-key")]
    WrongApiKey,
    /// A bearer token that is neither the key nor a JWT.
    #[error("invalid bearer token: neither SYNC_API_KEY nor a jwt")]
    WrongBearer,
    /// Not three base64url parts with JSON header and payload.
    #[error("malformed bearer token")]
    Malformed,
    /// The header's `alg` is not HS256.
    #[error("unsupported token algorithm (only HS256 is accepted)")]
    Algorithm,
    /// The signature does not match (or `JWT_SECRET` is not set).
    #[error("invalid token signature")]
    Signature,
    /// No `exp` claim.
    #[error("token has no exp claim: tokens must expire")]
    NoExpiry,
    /// `exp` (from `iat`, or from now) is further away than the allowed lifetime.
    #[error("token lives longer than relay.jwt_max_lifetime allows ({0} s)")]
    TooLong(i64),
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// `nbf` or `iat` is still ahead.
    #[error("token not valid yet")]
    NotYetValid,
}

/// Checks the request's credentials at `now` (unix seconds).
pub fn check(headers: &HeaderMap, creds: &Credentials<'_>, now: i64) -> Result<Caller, AuthError> {
    if let Some(given) = headers.get("x-api-key") {
        return api_key(given.as_bytes(), creds).ok_or(AuthError::WrongApiKey);
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
    if token.split('.').count() != 3 {
        return api_key(token.as_bytes(), creds).ok_or(AuthError::WrongBearer);
    }
    let max = creds.jwt_max_lifetime;
    let current = creds.jwt_secret.ok_or(AuthError::Signature)?;
    match verify_jwt(token, current.expose().as_bytes(), now, max) {
        Err(AuthError::Signature) => {}
        other => return other.map(|_| Caller::Jwt { previous: false }),
    }
    match creds.jwt_secret_previous {
        Some(previous) => verify_jwt(token, previous.expose().as_bytes(), now, max)
            .map(|_| Caller::Jwt { previous: true }),
        None => Err(AuthError::Signature),
    }
}

fn api_key(given: &[u8], creds: &Credentials<'_>) -> Option<Caller> {
    let matches =
        |key: Option<&Secret>| key.is_some_and(|k| same_token(given, k.expose().as_bytes()));
    // Both compared, so the time taken does not tell which one matched.
    let (current, previous) = (matches(creds.api_key), matches(creds.api_key_previous));
    match (current, previous) {
        (true, _) => Some(Caller::ApiKey { previous: false }),
        (false, true) => Some(Caller::ApiKey { previous: true }),
        (false, false) => None,
    }
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

/// Verifies an HS256 JWT at `now` and returns its claims; `max_lifetime` (seconds) bounds how
/// far `exp` may be from `iat` (or from now, without `iat`).
pub fn verify_jwt(
    token: &str,
    secret: &[u8],
    now: i64,
    max_lifetime: i64,
) -> Result<Value, AuthError> {
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
    let exp = time("exp")?.ok_or(AuthError::NoExpiry)?;
    let iat = time("iat")?;
    if now > exp.saturating_add(LEEWAY_SECS) {
        return Err(AuthError::Expired);
    }
    if let Some(nbf) = time("nbf")?
        && now.saturating_add(LEEWAY_SECS) < nbf
    {
        return Err(AuthError::NotYetValid);
    }
    if iat.is_some_and(|iat| now.saturating_add(LEEWAY_SECS) < iat) {
        return Err(AuthError::NotYetValid);
    }
    // From its issue when the token says; else what is left of it must fit.
    let from = iat.unwrap_or(now);
    if exp.saturating_sub(from) > max_lifetime.saturating_add(LEEWAY_SECS) {
        return Err(AuthError::TooLong(max_lifetime));
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
    const HOUR: i64 = 3600;

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
        assert_eq!(
            verify_jwt(&t, b"s3cret", NOW, HOUR).unwrap()["sub"],
            "backend"
        );
        // jwt.io's HS256 example (secret "your-256-bit-secret") has a valid signature but no
        // exp: it would be valid forever, so it is refused for that, after the signature.
        let jwtio = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";
        assert_eq!(
            verify_jwt(jwtio, b"your-256-bit-secret", NOW, HOUR),
            Err(AuthError::NoExpiry)
        );
        assert_eq!(
            verify_jwt(jwtio, b"not-the-secret", NOW, HOUR),
            Err(AuthError::Signature)
        );
    }

    #[test]
    fn tokens_must_expire_within_the_lifetime() {
        let no_exp = sign_jwt(&json!({"sub":"backend"}), b"s");
        assert_eq!(
            verify_jwt(&no_exp, b"s", NOW, HOUR),
            Err(AuthError::NoExpiry)
        );
        let year = sign_jwt(&json!({"exp": NOW + 365 * 24 * HOUR}), b"s");
        assert_eq!(
            verify_jwt(&year, b"s", NOW, HOUR),
            Err(AuthError::TooLong(HOUR))
        );
        let hour = sign_jwt(&json!({"exp": NOW + HOUR}), b"s");
        assert!(verify_jwt(&hour, b"s", NOW, HOUR).is_ok());
        // iat counts: a day-long token issued ten minutes ago is too long, though less than a
        // day is left of it; an hour-long one issued fifty minutes ago is fine.
        let day = sign_jwt(
            &json!({"iat": NOW - 600, "exp": NOW - 600 + 24 * HOUR}),
            b"s",
        );
        assert_eq!(
            verify_jwt(&day, b"s", NOW, HOUR),
            Err(AuthError::TooLong(HOUR))
        );
        let ok = sign_jwt(&json!({"iat": NOW - 3000, "exp": NOW + 600}), b"s");
        assert!(verify_jwt(&ok, b"s", NOW, HOUR).is_ok());
        let ahead = sign_jwt(&json!({"iat": NOW + 600, "exp": NOW + 1200}), b"s");
        assert_eq!(
            verify_jwt(&ahead, b"s", NOW, HOUR),
            Err(AuthError::NotYetValid)
        );
        // A longer lifetime when the operator allows it.
        assert!(verify_jwt(&year, b"s", NOW, 366 * 24 * HOUR).is_ok());
        let bad_exp = sign_jwt(&json!({"exp": "tomorrow"}), b"s");
        assert_eq!(
            verify_jwt(&bad_exp, b"s", NOW, HOUR),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn wrong_secret_expired_future_and_tampered_tokens_fail() {
        let t = sign_jwt(&json!({"exp": NOW + 300}), b"s3cret");
        assert_eq!(
            verify_jwt(&t, b"other", NOW, HOUR),
            Err(AuthError::Signature)
        );
        let old = sign_jwt(&json!({"exp": NOW - 61}), b"s3cret");
        assert_eq!(
            verify_jwt(&old, b"s3cret", NOW, HOUR),
            Err(AuthError::Expired)
        );
        let skewed = sign_jwt(&json!({"exp": NOW - 59}), b"s3cret");
        assert!(verify_jwt(&skewed, b"s3cret", NOW, HOUR).is_ok());
        let future = sign_jwt(&json!({"nbf": NOW + 120, "exp": NOW + 300}), b"s3cret");
        assert_eq!(
            verify_jwt(&future, b"s3cret", NOW, HOUR),
            Err(AuthError::NotYetValid)
        );
        let (h, rest) = t.split_once('.').unwrap();
        let (_, s) = rest.split_once('.').unwrap();
        let forged_payload = URL_SAFE_NO_PAD.encode(br#"{"exp":99999999999}"#);
        assert_eq!(
            verify_jwt(&format!("{h}.{forged_payload}.{s}"), b"s3cret", NOW, HOUR),
            Err(AuthError::Signature)
        );
        assert_eq!(
            verify_jwt("a.b", b"s3cret", NOW, HOUR),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            verify_jwt("%%.e30.", b"s3cret", NOW, HOUR),
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
                verify_jwt(&token, b"s3cret", NOW, HOUR),
                Err(AuthError::Algorithm),
                "{alg}"
            );
        }
    }

    fn creds<'a>(key: &'a Secret, jwt: &'a Secret) -> Credentials<'a> {
        Credentials {
            api_key: Some(key),
            jwt_secret: Some(jwt),
            jwt_max_lifetime: HOUR,
            ..Credentials::default()
        }
    }

    #[test]
    fn headers_choose_the_method() {
        let key = Secret::new("k-123");
        let jwt = Secret::new("s3cret");
        let c = creds(&key, &jwt);
        let h = headers(&[("x-api-key", "k-123")]);
        assert_eq!(check(&h, &c, NOW), Ok(Caller::ApiKey { previous: false }));
        let h = headers(&[("x-api-key", "k-124")]);
        assert_eq!(check(&h, &c, NOW), Err(AuthError::WrongApiKey));
        let no_key = Credentials { api_key: None, ..c };
        assert_eq!(check(&h, &no_key, NOW), Err(AuthError::WrongApiKey));
        let token = sign_jwt(&json!({"exp": NOW + 60}), b"s3cret");
        let h = headers(&[("authorization", &format!("Bearer {token}"))]);
        assert_eq!(check(&h, &c, NOW), Ok(Caller::Jwt { previous: false }));
        let no_jwt = Credentials {
            jwt_secret: None,
            ..c
        };
        assert_eq!(check(&h, &no_jwt, NOW), Err(AuthError::Signature));
        assert_eq!(check(&HeaderMap::new(), &c, NOW), Err(AuthError::Missing));
        let h = headers(&[("authorization", "Basic dXNlcjpwYXNz")]);
        assert_eq!(check(&h, &c, NOW), Err(AuthError::Missing));
        // What a client written for Meta's API sends: the key as its bearer token.
        let h = headers(&[("authorization", "Bearer k-123")]);
        assert_eq!(check(&h, &c, NOW), Ok(Caller::ApiKey { previous: false }));
        let h = headers(&[("authorization", "Bearer EAAG-a-meta-token")]);
        assert_eq!(check(&h, &c, NOW), Err(AuthError::WrongBearer));
    }

    #[test]
    fn previous_values_are_accepted_and_said() {
        let key = Secret::new("new-key");
        let old_key = Secret::new("old-key");
        let jwt = Secret::new("new-jwt");
        let old_jwt = Secret::new("old-jwt");
        let c = Credentials {
            api_key_previous: Some(&old_key),
            jwt_secret_previous: Some(&old_jwt),
            ..creds(&key, &jwt)
        };
        let h = headers(&[("x-api-key", "old-key")]);
        assert_eq!(check(&h, &c, NOW), Ok(Caller::ApiKey { previous: true }));
        let h = headers(&[("authorization", "Bearer old-key")]);
        assert_eq!(check(&h, &c, NOW), Ok(Caller::ApiKey { previous: true }));
        let h = headers(&[("x-api-key", "new-key")]);
        assert_eq!(check(&h, &c, NOW), Ok(Caller::ApiKey { previous: false }));
        let old = sign_jwt(&json!({"exp": NOW + 60}), b"old-jwt");
        let h = headers(&[("authorization", &format!("Bearer {old}"))]);
        assert_eq!(check(&h, &c, NOW), Ok(Caller::Jwt { previous: true }));
        // An expired token signed with the previous secret says expired, not signature.
        let expired = sign_jwt(&json!({"exp": NOW - 600}), b"old-jwt");
        let h = headers(&[("authorization", &format!("Bearer {expired}"))]);
        assert_eq!(check(&h, &c, NOW), Err(AuthError::Expired));
        let other = sign_jwt(&json!({"exp": NOW + 60}), b"someone-else");
        let h = headers(&[("authorization", &format!("Bearer {other}"))]);
        assert_eq!(check(&h, &c, NOW), Err(AuthError::Signature));
        // Without the previous values, the old ones are refused.
        let plain = creds(&key, &jwt);
        let h = headers(&[("x-api-key", "old-key")]);
        assert_eq!(check(&h, &plain, NOW), Err(AuthError::WrongApiKey));
    }
}
