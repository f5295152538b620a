//! The WhatsApp Cloud API client: text, template and mark-as-read requests to
//! `POST {graph_api_url}/{version}/{phone_number_id}/messages`.
//!
//! The request bodies and the reading of Meta's answers are pure functions ([`text_request`],
//! [`template_request`], [`read_request`], [`parse_response`]); [`GraphClient`] only moves the
//! bytes. Invariants:
//! - The access token goes in the `Authorization` header and nowhere else: never in a URL, an
//!   error or a log line ([`Secret`] prints `***`, reqwest errors are stripped of their URL).
//! - A recipient with a `.` is a business-scoped user id (BSUID, e.g. `US.1349…`) and goes in
//!   `recipient`; anything else is a phone number whose digits go in `to`.
//! - Text is at most [`MAX_TEXT_CHARS`] characters, cut on a character boundary.
//! - [`GraphError::is_transient`] is the only retry decision: Meta's throughput and pair rate
//!   limits, call-rate limits, unknown/unavailable service, maintenance mode, HTTP 5xx and
//!   network failures are transient; the closed 24-hour window (131047), undeliverable
//!   (131026), ecosystem limit (131049), a bad token (190) and every other code are definite.

use std::time::Duration;

use serde_json::{Value, json};

use super::settings::{RelaySettings, Secret};

/// WhatsApp's limit on a text message's body.
pub const MAX_TEXT_CHARS: usize = 4096;
/// How long one Graph request may take when built from the settings.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// Meta error codes worth retrying after a pause (reference §5).
const RETRYABLE_CODES: [i64; 7] = [130429, 131056, 4, 80007, 131000, 131016, 131057];

/// Why a request could not be built or was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// A field of the request is unusable (names the field, never its value).
    #[error("invalid {field}: {problem}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        problem: &'static str,
    },
    /// Meta answered with its error envelope.
    #[error("graph api error {code} (http {status}): {title}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// `error.code`, e.g. 131047.
        code: i64,
        /// `error.error_subcode`, when given.
        subcode: Option<i64>,
        /// `error.message`, e.g. "(#131047) Re-engagement message".
        title: String,
        /// `error.error_data.details`, when given.
        details: Option<String>,
    },
    /// A non-2xx answer without a readable envelope.
    #[error("graph api answered http {status} without an error envelope")]
    Http {
        /// The HTTP status.
        status: u16,
    },
    /// A 2xx answer that says nothing about the message.
    #[error("graph api answered http {status} without a message id or success flag")]
    Unexpected {
        /// The HTTP status.
        status: u16,
    },
    /// No answer in time: Meta may or may not have the message.
    #[error("graph api request timed out")]
    Timeout,
    /// The request did not get through (connection refused, reset, DNS).
    #[error("could not reach the graph api")]
    Network(#[source] reqwest::Error),
}

impl GraphError {
    /// Whether the same request may succeed later with nothing changed.
    pub fn is_transient(&self) -> bool {
        match self {
            GraphError::Invalid { .. } | GraphError::Unexpected { .. } => false,
            GraphError::Api { status, code, .. } => {
                RETRYABLE_CODES.contains(code) || (*status >= 500 && !DEFINITE_CODES.contains(code))
            }
            GraphError::Http { status } => *status >= 500 || *status == 429,
            GraphError::Timeout | GraphError::Network(_) => true,
        }
    }

    /// Whether Meta certainly did not take the message, so sending it again cannot make a
    /// duplicate. A timeout is transient but not safe to repeat.
    pub fn surely_not_sent(&self) -> bool {
        match self {
            GraphError::Timeout => false,
            GraphError::Network(e) => e.is_connect(),
            _ => true,
        }
    }

    /// Meta's error code, when Meta gave one.
    pub fn code(&self) -> Option<i64> {
        match self {
            GraphError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Codes that say "do not retry" even behind a 5xx.
const DEFINITE_CODES: [i64; 4] = [131047, 131026, 131049, 190];

/// What Meta accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// `messages[0].id` for a sent message; none for mark-as-read (`{"success":true}`).
    pub wamid: Option<String>,
}

/// `("to", digits)` for a phone number, `("recipient", id)` for a BSUID.
pub fn recipient_field(to: &str) -> Result<(&'static str, String), GraphError> {
    let to = to.trim();
    if to.contains('.') {
        let ok = to
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-');
        if !ok || to.len() > 128 || to.starts_with('.') || to.ends_with('.') {
            return Err(GraphError::Invalid {
                field: "to",
                problem: "a user id (BSUID) is letters, digits and dots, like US.1349…",
            });
        }
        return Ok(("recipient", to.to_string()));
    }
    let formatting = |c: char| matches!(c, '+' | ' ' | '-' | '(' | ')');
    if !to.chars().all(|c| c.is_ascii_digit() || formatting(c)) {
        return Err(GraphError::Invalid {
            field: "to",
            problem: "expected a phone number (wa_id digits) or a user id (BSUID)",
        });
    }
    let digits: String = to.chars().filter(char::is_ascii_digit).collect();
    if !(6..=20).contains(&digits.len()) {
        return Err(GraphError::Invalid {
            field: "to",
            problem: "a phone number has 6 to 20 digits",
        });
    }
    Ok(("to", digits))
}

/// The first [`MAX_TEXT_CHARS`] characters of `text`, cut on a character boundary.
pub fn truncate_text(text: &str) -> &str {
    match text.char_indices().nth(MAX_TEXT_CHARS) {
        Some((at, _)) => &text[..at],
        None => text,
    }
}

fn envelope(to: &str, kind: &str) -> Result<serde_json::Map<String, Value>, GraphError> {
    let (field, value) = recipient_field(to)?;
    let mut body = serde_json::Map::new();
    body.insert("messaging_product".into(), json!("whatsapp"));
    body.insert("recipient_type".into(), json!("individual"));
    body.insert(field.into(), json!(value));
    body.insert("type".into(), json!(kind));
    Ok(body)
}

/// A text message (cut to [`MAX_TEXT_CHARS`]), quoting `reply_to` when given.
pub fn text_request(to: &str, text: &str, reply_to: Option<&str>) -> Result<Value, GraphError> {
    if text.trim().is_empty() {
        return Err(GraphError::Invalid {
            field: "text",
            problem: "must not be empty",
        });
    }
    let mut body = envelope(to, "text")?;
    body.insert(
        "text".into(),
        json!({"preview_url": false, "body": truncate_text(text)}),
    );
    if let Some(id) = reply_to.filter(|id| !id.is_empty()) {
        body.insert("context".into(), json!({"message_id": id}));
    }
    Ok(Value::Object(body))
}

/// A template message; `components` is passed as given (Meta validates it).
pub fn template_request(
    to: &str,
    name: &str,
    language: &str,
    components: Option<&Value>,
) -> Result<Value, GraphError> {
    if name.trim().is_empty() {
        return Err(GraphError::Invalid {
            field: "template.name",
            problem: "must not be empty",
        });
    }
    if language.trim().is_empty() {
        return Err(GraphError::Invalid {
            field: "template.language",
            problem: "must not be empty",
        });
    }
    let mut template = json!({"name": name, "language": {"code": language}});
    if let Some(c) = components {
        template["components"] = c.clone();
    }
    let mut body = envelope(to, "template")?;
    body.insert("template".into(), template);
    Ok(Value::Object(body))
}

/// Marks a customer's message as read, optionally showing the typing indicator.
pub fn read_request(message_id: &str, typing: bool) -> Result<Value, GraphError> {
    if message_id.trim().is_empty() {
        return Err(GraphError::Invalid {
            field: "message_id",
            problem: "must not be empty",
        });
    }
    let mut body =
        json!({"messaging_product": "whatsapp", "status": "read", "message_id": message_id});
    if typing {
        body["typing_indicator"] = json!({"type": "text"});
    }
    Ok(body)
}

/// Reads Meta's answer: `messages[0].id` or `success: true` on 2xx, the error envelope
/// otherwise.
pub fn parse_response(status: u16, body: &[u8]) -> Result<Sent, GraphError> {
    let value: Option<Value> = serde_json::from_slice(body).ok();
    if (200..300).contains(&status) {
        let value = value.ok_or(GraphError::Unexpected { status })?;
        if let Some(id) = value
            .pointer("/messages/0/id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
        {
            return Ok(Sent {
                wamid: Some(id.to_string()),
            });
        }
        if value.get("success").and_then(Value::as_bool) == Some(true) {
            return Ok(Sent { wamid: None });
        }
        return Err(GraphError::Unexpected { status });
    }
    let error = value.as_ref().and_then(|v| v.get("error"));
    match error.and_then(|e| e.get("code")).and_then(Value::as_i64) {
        Some(code) => {
            let e = error.expect("a code comes from an error object");
            Err(GraphError::Api {
                status,
                code,
                subcode: e.get("error_subcode").and_then(Value::as_i64),
                title: e
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                details: e
                    .pointer("/error_data/details")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            })
        }
        None => Err(GraphError::Http { status }),
    }
}

/// Meta's answer as it came: status and body bytes.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The HTTP status.
    pub status: u16,
    /// `Content-Type`, when given.
    pub content_type: Option<String>,
    /// The body.
    pub body: bytes::Bytes,
}

impl Reply {
    /// What the answer says about the message ([`parse_response`]).
    pub fn outcome(&self) -> Result<Sent, GraphError> {
        parse_response(self.status, &self.body)
    }
}

/// The largest answer read from the Graph API (Meta's are a few hundred bytes).
const MAX_REPLY: usize = 1024 * 1024;

/// Sends to one business number. Cheap to clone (the HTTP client is shared).
#[derive(Clone)]
pub struct GraphClient {
    http: reqwest::Client,
    base: String,
    version: String,
    phone_number_id: String,
    token: Secret,
}

impl std::fmt::Debug for GraphClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphClient")
            .field("url", &self.url(&self.version, "messages"))
            .field("token", &self.token)
            .finish()
    }
}

impl GraphClient {
    /// A client for `{base}/{version}/{phone_number_id}/messages`.
    pub fn new(
        base: &str,
        version: &str,
        phone_number_id: &str,
        token: Secret,
        timeout: Duration,
    ) -> GraphClient {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .build()
            .expect("a reqwest client with rustls builds");
        GraphClient {
            http,
            base: base.trim_end_matches('/').to_string(),
            version: version.to_string(),
            phone_number_id: phone_number_id.to_string(),
            token,
        }
    }

    /// The client the settings describe, or none when `WHATSAPP_ACCESS_TOKEN` or
    /// `WHATSAPP_PHONE_NUMBER_ID` is missing.
    pub fn from_settings(settings: &RelaySettings) -> Option<GraphClient> {
        let token = settings.access_token.clone()?;
        let phone = settings.phone_number_id.as_deref()?;
        Some(GraphClient::new(
            &settings.graph_api_url,
            &settings.graph_api_version,
            phone,
            token,
            DEFAULT_TIMEOUT,
        ))
    }

    /// The business number's id (`WHATSAPP_PHONE_NUMBER_ID`).
    pub fn phone_number_id(&self) -> &str {
        &self.phone_number_id
    }

    /// The configured Graph API version, e.g. `v25.0`.
    pub fn version(&self) -> &str {
        &self.version
    }

    fn url(&self, version: &str, edge: &str) -> String {
        format!("{}/{version}/{}/{edge}", self.base, self.phone_number_id)
    }

    /// POSTs one request body built by [`text_request`], [`template_request`] or
    /// [`read_request`].
    pub async fn send(&self, request: &Value) -> Result<Sent, GraphError> {
        let body = serde_json::to_vec(request).expect("a JSON value serializes");
        self.post(&self.version, "messages", "application/json", body.into())
            .await?
            .outcome()
    }

    /// POSTs a `/messages` body as it is, under API `version`; Meta's answer as it came
    /// (errors only when no answer came).
    pub async fn post_messages(
        &self,
        version: &str,
        body: bytes::Bytes,
    ) -> Result<Reply, GraphError> {
        self.post(version, "messages", "application/json", body.into())
            .await
    }

    /// POSTs a `/media` upload (a multipart body, streamed) under API `version`.
    pub async fn post_media(
        &self,
        version: &str,
        content_type: &str,
        body: reqwest::Body,
    ) -> Result<Reply, GraphError> {
        self.post(version, "media", content_type, body).await
    }

    async fn post(
        &self,
        version: &str,
        edge: &str,
        content_type: &str,
        body: reqwest::Body,
    ) -> Result<Reply, GraphError> {
        let mut sent = self
            .http
            .post(self.url(version, edge))
            .bearer_auth(self.token.expose())
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body)
            .send()
            .await
            .map_err(network)?;
        let status = sent.status().as_u16();
        let content_type = sent
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut body = Vec::new();
        while let Some(chunk) = sent.chunk().await.map_err(network)? {
            if body.len() + chunk.len() > MAX_REPLY {
                return Err(GraphError::Http { status });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Reply {
            status,
            content_type,
            body: body.into(),
        })
    }
}

fn network(e: reqwest::Error) -> GraphError {
    if e.is_timeout() {
        GraphError::Timeout
    } else {
        GraphError::Network(e.without_url())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_go_in_to_and_bsuids_in_recipient() {
        let r = text_request("+34 612 345 678", "hola", Some("wamid.X")).unwrap();
        assert_eq!(
            r,
            json!({"messaging_product":"whatsapp","recipient_type":"individual","to":"34612345678",
                   "type":"text","text":{"preview_url":false,"body":"hola"},
                   "context":{"message_id":"wamid.X"}})
        );
        let r = text_request("US.13491208655302741918", "hi", None).unwrap();
        assert_eq!(r["recipient"], "US.13491208655302741918");
        assert!(r.get("to").is_none() && r.get("context").is_none());
        assert!(matches!(
            text_request("robert'); drop", "x", None),
            Err(GraphError::Invalid { field: "to", .. })
        ));
        assert!(matches!(
            text_request("123", "x", None),
            Err(GraphError::Invalid { field: "to", .. })
        ));
        assert!(matches!(
            text_request("34612345678", "  ", None),
            Err(GraphError::Invalid { field: "text", .. })
        ));
    }

    #[test]
    fn long_text_is_cut_on_a_character_boundary() {
        let text = "ñ".repeat(5000);
        let cut = truncate_text(&text);
        assert_eq!(cut.chars().count(), MAX_TEXT_CHARS);
        assert_eq!(truncate_text("short"), "short");
        let r = text_request("34612345678", &text, None).unwrap();
        assert_eq!(
            r["text"]["body"].as_str().unwrap().chars().count(),
            MAX_TEXT_CHARS
        );
    }

    #[test]
    fn templates_and_read_receipts_have_metas_shape() {
        let c = json!([{"type":"body","parameters":[{"type":"text","text":"12"}]}]);
        let r = template_request("34612345678", "order_ready", "es", Some(&c)).unwrap();
        assert_eq!(r["type"], "template");
        assert_eq!(
            r["template"],
            json!({"name":"order_ready","language":{"code":"es"},"components":c})
        );
        assert_eq!(
            read_request("wamid.A", true).unwrap(),
            json!({"messaging_product":"whatsapp","status":"read","message_id":"wamid.A",
                   "typing_indicator":{"type":"text"}})
        );
        assert!(
            read_request("wamid.A", false)
                .unwrap()
                .get("typing_indicator")
                .is_none()
        );
        assert!(template_request("34612345678", "", "es", None).is_err());
    }

    #[test]
    fn answers_and_error_envelopes_are_read() {
        let ok = br#"{"messaging_product":"whatsapp","contacts":[{"input":"+1","wa_id":"1"}],"messages":[{"id":"wamid.HBg"}]}"#;
        assert_eq!(
            parse_response(200, ok).unwrap().wamid.as_deref(),
            Some("wamid.HBg")
        );
        assert_eq!(
            parse_response(200, br#"{"success":true}"#).unwrap().wamid,
            None
        );
        assert!(matches!(
            parse_response(200, b"{}"),
            Err(GraphError::Unexpected { status: 200 })
        ));
        let closed = br#"{"error":{"message":"(#131047) Re-engagement message","type":"OAuthException","code":131047,"error_data":{"messaging_product":"whatsapp","details":"Message failed to send because more than 24 hours have passed"},"fbtrace_id":"A"}}"#;
        let e = parse_response(400, closed).unwrap_err();
        assert_eq!(e.code(), Some(131047));
        assert!(!e.is_transient());
        assert!(e.to_string().contains("Re-engagement"));
        assert!(matches!(
            parse_response(502, b"<html>bad gateway</html>"),
            Err(GraphError::Http { status: 502 })
        ));
    }

    #[test]
    fn errors_are_classified_by_code_then_status() {
        let api = |status, code| GraphError::Api {
            status,
            code,
            subcode: None,
            title: String::new(),
            details: None,
        };
        for code in [130429, 131056, 4, 80007, 131000, 131016, 131057] {
            assert!(api(400, code).is_transient(), "{code}");
        }
        for code in [131047, 131026, 131049, 190, 100, 131009] {
            assert!(!api(400, code).is_transient(), "{code}");
        }
        assert!(api(500, 2).is_transient());
        assert!(!api(500, 190).is_transient());
        assert!(GraphError::Http { status: 503 }.is_transient());
        assert!(!GraphError::Http { status: 404 }.is_transient());
        assert!(GraphError::Timeout.is_transient());
        assert!(!GraphError::Timeout.surely_not_sent());
        assert!(api(400, 130429).surely_not_sent());
    }

    #[test]
    fn the_token_never_shows_in_debug() {
        let c = GraphClient::new(
            "http://127.0.0.1:9",
            "v25.0",
            "123",
            Secret::new("EAAG-secret"),
            DEFAULT_TIMEOUT,
        );
        let text = format!("{c:?}");
        assert!(!text.contains("EAAG") && text.contains("/v25.0/123/messages"));
    }
}
