//! The AI providers behind the fallback reply: OpenAI Chat Completions, Google Gemini
//! generateContent and Anthropic Messages, with the HTTP contracts of the reference (§6).
//!
//! [`request`] builds each provider's URL, headers and JSON body and [`parse_reply`] reads its
//! answer; both are pure. [`ask`] only does the HTTP, within the configured timeout.
//! Invariants:
//! - A key travels only in its header (`Authorization: Bearer`, `x-goog-api-key`, `x-api-key`),
//!   never in a URL, so no error or log line can carry it; errors name the provider, the HTTP
//!   status and the provider's error *type* (e.g. `rate_limit_error`), never its message, which
//!   may echo part of the key ("Incorrect API key provided: sk-…").
//! - A reply is non-empty text or an error: a blocked prompt, a refusal, a content filter or an
//!   empty answer is an [`AiError::NoText`], so the caller moves to the next provider instead
//!   of sending an empty message.
//! - Gemini's thinking is disabled (`thinkingBudget: 0`): otherwise thinking tokens eat
//!   `maxOutputTokens` and the answer comes back empty with `MAX_TOKENS`; thought parts are
//!   skipped if they come anyway.

use std::time::Duration;

use serde_json::{Value, json};

use super::settings::{Provider, ProviderKind};

/// The Anthropic API version the request shape follows.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// What the model is given: instructions with the mirror's context, and the customer's words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// Instructions and context (the system / developer message).
    pub system: String,
    /// The customer's message(s).
    pub user: String,
}

/// One HTTP request to a provider, before it is sent.
#[derive(Debug, Clone)]
pub struct ProviderRequest {
    /// The full URL (no key in it).
    pub url: String,
    /// Headers besides `content-type`, the key's among them.
    pub headers: Vec<(&'static str, String)>,
    /// The JSON body.
    pub body: Value,
}

/// Why a provider gave no usable reply.
#[derive(Debug, thiserror::Error)]
pub enum AiError {
    /// A non-2xx answer.
    #[error("{provider} answered http {status}{}", kind.as_deref().map(|k| format!(" ({k})")).unwrap_or_default())]
    Http {
        /// The provider's name.
        provider: &'static str,
        /// The HTTP status.
        status: u16,
        /// The provider's error type or status word (`rate_limit_error`, `RESOURCE_EXHAUSTED`).
        kind: Option<String>,
    },
    /// A 2xx answer with nothing to send: blocked, refused, filtered or empty.
    #[error("{provider} gave no text: {reason}")]
    NoText {
        /// The provider's name.
        provider: &'static str,
        /// Why, in the provider's words (finish reason, block reason).
        reason: String,
    },
    /// A 2xx answer that is not the documented JSON.
    #[error("{provider} answered http {status} with an unreadable body")]
    Malformed {
        /// The provider's name.
        provider: &'static str,
        /// The HTTP status.
        status: u16,
    },
    /// No answer within the timeout.
    #[error("{provider} did not answer in {timeout:?}")]
    Timeout {
        /// The provider's name.
        provider: &'static str,
        /// The configured timeout.
        timeout: Duration,
    },
    /// The request did not get through.
    #[error("could not reach {provider}")]
    Network {
        /// The provider's name.
        provider: &'static str,
        /// The cause, without its URL.
        #[source]
        source: reqwest::Error,
    },
}

impl AiError {
    /// Whether asking the same provider again later may work (429, 5xx, 529, timeouts,
    /// network). The fallback worker does not retry a provider; it moves to the next one.
    pub fn is_transient(&self) -> bool {
        match self {
            AiError::Http { status, kind, .. } => {
                (*status == 429 && kind.as_deref() != Some("insufficient_quota")) || *status >= 500
            }
            AiError::Timeout { .. } | AiError::Network { .. } => true,
            AiError::NoText { .. } | AiError::Malformed { .. } => false,
        }
    }
}

/// The request for `provider` (URL, headers with its key, body).
pub fn request(provider: &Provider, prompt: &Prompt, max_tokens: u32) -> ProviderRequest {
    let base = provider.base_url.trim_end_matches('/');
    let key = provider.api_key.expose().to_string();
    match provider.kind {
        ProviderKind::OpenAi => ProviderRequest {
            url: format!("{base}/chat/completions"),
            headers: vec![("authorization", format!("Bearer {key}"))],
            body: json!({
                "model": provider.model,
                "messages": [
                    {"role": "system", "content": prompt.system},
                    {"role": "user", "content": prompt.user},
                ],
                "max_completion_tokens": max_tokens,
            }),
        },
        ProviderKind::Gemini => ProviderRequest {
            url: format!("{base}/models/{}:generateContent", provider.model),
            headers: vec![("x-goog-api-key", key)],
            body: json!({
                "system_instruction": {"parts": [{"text": prompt.system}]},
                "contents": [{"role": "user", "parts": [{"text": prompt.user}]}],
                "generationConfig": {
                    "maxOutputTokens": max_tokens,
                    "thinkingConfig": {"thinkingBudget": 0},
                },
            }),
        },
        ProviderKind::Anthropic => ProviderRequest {
            url: format!("{base}/messages"),
            headers: vec![
                ("x-api-key", key),
                ("anthropic-version", ANTHROPIC_VERSION.to_string()),
            ],
            body: json!({
                "model": provider.model,
                "max_tokens": max_tokens,
                "system": prompt.system,
                "messages": [{"role": "user", "content": prompt.user}],
            }),
        },
    }
}

/// The reply text of a 2xx answer, or why there is none.
pub fn parse_reply(kind: ProviderKind, status: u16, body: &[u8]) -> Result<String, AiError> {
    let provider = kind.name();
    let value: Value =
        serde_json::from_slice(body).map_err(|_| AiError::Malformed { provider, status })?;
    let no_text = |reason: String| AiError::NoText { provider, reason };
    let text = match kind {
        ProviderKind::OpenAi => {
            let choice = value
                .pointer("/choices/0")
                .ok_or_else(|| no_text("no choices".into()))?;
            if let Some(refusal) = choice.pointer("/message/refusal")
                && !refusal.is_null()
            {
                return Err(no_text("refused".into()));
            }
            let finish = choice.get("finish_reason").and_then(Value::as_str);
            if finish == Some("content_filter") {
                return Err(no_text("finish_reason content_filter".into()));
            }
            choice
                .pointer("/message/content")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        }
        ProviderKind::Gemini => {
            if let Some(block) = value
                .pointer("/promptFeedback/blockReason")
                .and_then(Value::as_str)
            {
                return Err(no_text(format!("prompt blocked ({block})")));
            }
            let candidate = value
                .pointer("/candidates/0")
                .ok_or_else(|| no_text("no candidates".into()))?;
            let finish = candidate
                .get("finishReason")
                .and_then(Value::as_str)
                .unwrap_or("");
            if matches!(
                finish,
                "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII"
            ) {
                return Err(no_text(format!("finishReason {finish}")));
            }
            let parts = candidate
                .pointer("/content/parts")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            let text: String = parts
                .iter()
                .filter(|p| p.get("thought").and_then(Value::as_bool) != Some(true))
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect();
            if text.trim().is_empty() && !finish.is_empty() {
                return Err(no_text(format!("empty answer (finishReason {finish})")));
            }
            text
        }
        ProviderKind::Anthropic => {
            let stop = value.get("stop_reason").and_then(Value::as_str);
            if stop == Some("refusal") {
                return Err(no_text("stop_reason refusal".into()));
            }
            let blocks = value
                .get("content")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            blocks
                .iter()
                .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
                .filter_map(|b| b.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("")
        }
    };
    let text = text.trim();
    if text.is_empty() {
        return Err(no_text("empty answer".into()));
    }
    Ok(text.to_string())
}

/// The provider's error type from its error body: OpenAI `error.code`/`error.type`, Gemini
/// `error.status`, Anthropic `error.type`. Never the message.
pub fn error_kind(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let error = value.get("error")?;
    ["code", "status", "type"]
        .iter()
        .filter_map(|k| error.get(*k).and_then(Value::as_str))
        .find(|k| {
            !k.is_empty()
                && k.len() <= 64
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .map(str::to_string)
}

/// Asks `provider` for a reply, giving up after `timeout`.
pub async fn ask(
    http: &reqwest::Client,
    provider: &Provider,
    prompt: &Prompt,
    max_tokens: u32,
    timeout: Duration,
) -> Result<String, AiError> {
    let name = provider.kind.name();
    let req = request(provider, prompt, max_tokens);
    let mut builder = http.post(&req.url).timeout(timeout).json(&req.body);
    for (header, value) in &req.headers {
        builder = builder.header(*header, value);
    }
    let network = |e: reqwest::Error| {
        if e.is_timeout() {
            AiError::Timeout {
                provider: name,
                timeout,
            }
        } else {
            AiError::Network {
                provider: name,
                source: e.without_url(),
            }
        }
    };
    let response = builder.send().await.map_err(network)?;
    let status = response.status().as_u16();
    let body = response.bytes().await.map_err(network)?;
    if !(200..300).contains(&status) {
        return Err(AiError::Http {
            provider: name,
            status,
            kind: error_kind(&body),
        });
    }
    parse_reply(provider.kind, status, &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::settings::Secret;

    fn provider(kind: ProviderKind) -> Provider {
        Provider {
            kind,
            api_key: Secret::new("sk-test-key"),
            model: "m-1".into(),
            base_url: "http://127.0.0.1:9/v1".into(),
        }
    }

    fn prompt() -> Prompt {
        Prompt {
            system: "be kind\ncustomer: Ana".into(),
            user: "¿Dónde está mi pedido?".into(),
        }
    }

    #[test]
    fn openai_request_and_reply() {
        let r = request(&provider(ProviderKind::OpenAi), &prompt(), 300);
        assert_eq!(r.url, "http://127.0.0.1:9/v1/chat/completions");
        assert_eq!(
            r.headers,
            vec![("authorization", "Bearer sk-test-key".to_string())]
        );
        assert_eq!(
            r.body,
            json!({"model":"m-1","messages":[{"role":"system","content":"be kind\ncustomer: Ana"},
                   {"role":"user","content":"¿Dónde está mi pedido?"}],"max_completion_tokens":300})
        );
        let ok = br#"{"id":"c","choices":[{"index":0,"message":{"role":"assistant","content":" Hola Ana ","refusal":null},"finish_reason":"stop"}]}"#;
        assert_eq!(
            parse_reply(ProviderKind::OpenAi, 200, ok).unwrap(),
            "Hola Ana"
        );
        let refused = br#"{"choices":[{"message":{"content":null,"refusal":"I can't"},"finish_reason":"stop"}]}"#;
        let filtered =
            br#"{"choices":[{"message":{"content":""},"finish_reason":"content_filter"}]}"#;
        for body in [&refused[..], filtered, br#"{"choices":[]}"#] {
            assert!(matches!(
                parse_reply(ProviderKind::OpenAi, 200, body),
                Err(AiError::NoText { .. })
            ));
        }
    }

    #[test]
    fn gemini_request_and_reply() {
        let r = request(&provider(ProviderKind::Gemini), &prompt(), 300);
        assert_eq!(r.url, "http://127.0.0.1:9/v1/models/m-1:generateContent");
        assert_eq!(
            r.headers,
            vec![("x-goog-api-key", "sk-test-key".to_string())]
        );
        assert_eq!(
            r.body["generationConfig"]["thinkingConfig"]["thinkingBudget"],
            0
        );
        assert_eq!(r.body["generationConfig"]["maxOutputTokens"], 300);
        assert_eq!(
            r.body["system_instruction"]["parts"][0]["text"],
            prompt().system
        );
        assert_eq!(r.body["contents"][0]["parts"][0]["text"], prompt().user);
        let ok = br#"{"candidates":[{"content":{"role":"model","parts":[{"text":"plan","thought":true},{"text":"Hola "},{"text":"Ana"}]},"finishReason":"STOP"}]}"#;
        assert_eq!(
            parse_reply(ProviderKind::Gemini, 200, ok).unwrap(),
            "Hola Ana"
        );
        let blocked = br#"{"promptFeedback":{"blockReason":"SAFETY"}}"#;
        let thinking =
            br#"{"candidates":[{"content":{"role":"model"},"finishReason":"MAX_TOKENS"}]}"#;
        let safety =
            br#"{"candidates":[{"content":{"parts":[{"text":"x"}]},"finishReason":"SAFETY"}]}"#;
        for body in [&blocked[..], thinking, safety] {
            assert!(matches!(
                parse_reply(ProviderKind::Gemini, 200, body),
                Err(AiError::NoText { .. })
            ));
        }
    }

    #[test]
    fn anthropic_request_and_reply() {
        let r = request(&provider(ProviderKind::Anthropic), &prompt(), 300);
        assert_eq!(r.url, "http://127.0.0.1:9/v1/messages");
        assert!(
            r.headers
                .contains(&("x-api-key", "sk-test-key".to_string()))
        );
        assert!(
            r.headers
                .contains(&("anthropic-version", "2023-06-01".to_string()))
        );
        assert_eq!(
            r.body,
            json!({"model":"m-1","max_tokens":300,"system":"be kind\ncustomer: Ana",
                   "messages":[{"role":"user","content":"¿Dónde está mi pedido?"}]})
        );
        let ok = br#"{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"thinking","thinking":"x"},{"type":"text","text":"Hola Ana"}],"stop_reason":"end_turn"}"#;
        assert_eq!(
            parse_reply(ProviderKind::Anthropic, 200, ok).unwrap(),
            "Hola Ana"
        );
        let refused = br#"{"content":[],"stop_reason":"refusal"}"#;
        for body in [&refused[..], br#"{"content":[]}"#, b"not json"] {
            assert!(parse_reply(ProviderKind::Anthropic, 200, body).is_err());
        }
    }

    #[test]
    fn error_kinds_never_carry_the_message() {
        let openai = br#"{"error":{"message":"Incorrect API key provided: sk-tes***key","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
        assert_eq!(error_kind(openai).as_deref(), Some("invalid_api_key"));
        let gemini = br#"{"error":{"code":429,"message":"quota","status":"RESOURCE_EXHAUSTED"}}"#;
        assert_eq!(error_kind(gemini).as_deref(), Some("RESOURCE_EXHAUSTED"));
        let anthropic =
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        assert_eq!(error_kind(anthropic).as_deref(), Some("overloaded_error"));
        let e = AiError::Http {
            provider: "openai",
            status: 401,
            kind: error_kind(openai),
        };
        assert_eq!(e.to_string(), "openai answered http 401 (invalid_api_key)");
        assert!(!e.is_transient());
        let quota = AiError::Http {
            provider: "openai",
            status: 429,
            kind: Some("insufficient_quota".into()),
        };
        assert!(!quota.is_transient());
        let overloaded = AiError::Http {
            provider: "anthropic",
            status: 529,
            kind: None,
        };
        assert!(overloaded.is_transient());
    }
}
