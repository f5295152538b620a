//! The relay's and the delivery's settings: the old guide's environment variables
//! (`DATABASE_URL`, `WHATSAPP_VERIFY_TOKEN`, …) first, then `[relay]` and `[delivery]` in
//! `bite-sync.toml`, then defaults. Secrets come only from the environment (Railway's
//! variables), are held as [`Secret`] and never printed. Every problem is reported at once,
//! each with the variable or the file and key.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{ConfigError, parse_duration};
use crate::pg::connect::{DbUrl, Role};

/// `[relay]` as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRelay {
    /// Port to listen on (env `PORT` wins).
    pub port: Option<i64>,
    /// Graph API base URL (env `GRAPH_API_URL`).
    pub graph_api_url: Option<String>,
    /// Graph API version, e.g. "v25.0" (env `GRAPH_API_VERSION`).
    pub graph_api_version: Option<String>,
    /// The business number's id (env `WHATSAPP_PHONE_NUMBER_ID`).
    pub phone_number_id: Option<String>,
    /// Sends per second to WhatsApp for the whole number (Meta's default throughput: 80).
    pub send_rate: Option<i64>,
    /// Least time between two sends to one customer (Meta: about one every 6 s).
    pub customer_interval: Option<String>,
    /// Days delivered inbox items, sent messages and dead letters are kept.
    pub keep_days: Option<i64>,
    /// A window with signature failures and no valid webhook raises an alert.
    pub signature_alert_window: Option<String>,
    /// Longest lifetime of a JWT accepted by the relay's API (from `iat`, else from now).
    pub jwt_max_lifetime: Option<String>,
    /// How long a client may take to send a request's headers.
    pub header_timeout: Option<String>,
    /// How long a client may take to send a request's body.
    pub body_timeout: Option<String>,
    /// How long an idle keep-alive connection is kept open.
    pub idle_timeout: Option<String>,
    /// `[relay.ai]`
    #[serde(default)]
    pub ai: RawAi,
}

/// `[relay.ai]` as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAi {
    /// Provider order, e.g. ["anthropic", "openai"] (env `AI_PROVIDER` puts one first).
    pub providers: Option<Vec<String>>,
    /// How long the backend has to take a message before the AI answers.
    pub deadline: Option<String>,
    /// Messages older than this (by Meta's timestamp) never get an AI reply.
    pub fresh_for: Option<String>,
    /// Per-provider request timeout.
    pub timeout: Option<String>,
    /// Sent when every provider fails.
    pub fallback_text: Option<String>,
    /// The instructions given to the model ahead of the mirror's context.
    pub system_prompt: Option<String>,
    /// Most characters of mirror context put in a prompt.
    pub max_context_chars: Option<i64>,
    /// Most tokens of a reply.
    pub max_reply_tokens: Option<i64>,
    /// Models and base URLs (env `OPENAI_MODEL`, `OPENAI_BASE_URL`, …).
    pub openai_model: Option<String>,
    /// See `openai_model`.
    pub openai_base_url: Option<String>,
    /// See `openai_model`.
    pub gemini_model: Option<String>,
    /// See `openai_model`.
    pub gemini_base_url: Option<String>,
    /// See `openai_model`.
    pub anthropic_model: Option<String>,
    /// See `openai_model`.
    pub anthropic_base_url: Option<String>,
    /// SQL run on the mirror with `$1` = the customer's wa_id (digits) or user id: who they are.
    pub customer_query: Option<String>,
    /// SQL with `$1` as above: their recent orders.
    pub orders_query: Option<String>,
    /// SQL without parameters: what can be ordered.
    pub menu_query: Option<String>,
}

/// `[delivery]` as written: how inbox rows reach the restaurant's backend.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDelivery {
    /// The backend's base URL (env `LOCAL_BACKEND_URL`), e.g. "http://localhost:3000/api".
    pub backend_url: Option<String>,
    /// Appended to backend_url (default "/cloud-sync/webhook"; env `DELIVERY_PATH`; "/" allowed).
    pub path: Option<String>,
    /// "bite-sync" (Meta's envelope plus a `bite_sync` object, signed with SYNC_API_KEY) or
    /// "meta" (exactly Meta's webhook body, signed with META_APP_SECRET as Meta signs)
    /// (env `DELIVERY_FORMAT`).
    pub format: Option<String>,
    /// "pull" (bite-sync run delivers) or "push" (the relay delivers) (env `DELIVERY_MODE`).
    pub mode: Option<String>,
    /// Per-request timeout (push: at most 3s).
    pub timeout: Option<String>,
    /// Longest wait between two attempts of one row.
    pub max_backoff: Option<String>,
}

/// A secret value: `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// An AI provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// OpenAI Chat Completions.
    OpenAi,
    /// Google Gemini generateContent.
    Gemini,
    /// Anthropic Messages.
    Anthropic,
}

impl ProviderKind {
    /// Every provider, in the default order.
    pub const ALL: [ProviderKind; 3] = [
        ProviderKind::OpenAi,
        ProviderKind::Gemini,
        ProviderKind::Anthropic,
    ];

    /// The name used in config and logs.
    pub fn name(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Gemini => "gemini",
            ProviderKind::Anthropic => "anthropic",
        }
    }

    fn key_var(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "OPENAI_API_KEY",
            ProviderKind::Gemini => "GEMINI_API_KEY",
            ProviderKind::Anthropic => "ANTHROPIC_API_KEY",
        }
    }

    fn default_model(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "gpt-4.1-mini",
            ProviderKind::Gemini => "gemini-2.5-flash",
            ProviderKind::Anthropic => "claude-haiku-4-5",
        }
    }

    fn default_base_url(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "https://api.openai.com/v1",
            ProviderKind::Gemini => "https://generativelanguage.googleapis.com/v1beta",
            ProviderKind::Anthropic => "https://api.anthropic.com/v1",
        }
    }

    fn parse(name: &str) -> Option<ProviderKind> {
        ProviderKind::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(name.trim()))
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One configured provider (its key is set).
#[derive(Debug, Clone)]
pub struct Provider {
    /// Which.
    pub kind: ProviderKind,
    /// `OPENAI_API_KEY`, `GEMINI_API_KEY` or `ANTHROPIC_API_KEY`.
    pub api_key: Secret,
    /// The model.
    pub model: String,
    /// Base URL without a trailing slash, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
}

/// The AI fallback's settings.
#[derive(Debug, Clone)]
pub struct AiSettings {
    /// Configured providers, in the order they are tried; empty: only the fallback text.
    pub providers: Vec<Provider>,
    /// How long the backend has to take a message.
    pub deadline: Duration,
    /// Older messages never get an AI reply.
    pub fresh_for: Duration,
    /// Per-provider request timeout.
    pub timeout: Duration,
    /// Sent when every provider fails; empty: send nothing.
    pub fallback_text: String,
    /// The model's instructions.
    pub system_prompt: String,
    /// Most characters of mirror context.
    pub max_context_chars: usize,
    /// Most tokens of a reply.
    pub max_reply_tokens: u32,
    /// Context queries.
    pub queries: ContextQueries,
}

/// SQL that reads the AI's context from the mirror.
#[derive(Debug, Clone)]
pub struct ContextQueries {
    /// `$1` = customer key (wa_id digits or user id).
    pub customer: String,
    /// `$1` = customer key.
    pub orders: String,
    /// No parameters.
    pub menu: String,
}

/// The sample restaurant's context queries. Every column is read as text.
pub const DEFAULT_CUSTOMER_QUERY: &str = "SELECT name, preferences::text AS preferences \
     FROM public.customers WHERE regexp_replace(phone, '[^0-9]', '', 'g') = $1 LIMIT 1";
/// See [`DEFAULT_CUSTOMER_QUERY`].
pub const DEFAULT_ORDERS_QUERY: &str = "SELECT o.id::text AS order_id, o.status::text AS status, \
     o.total::text AS total, to_char(o.created_at, 'YYYY-MM-DD HH24:MI') AS placed_at, \
     (SELECT string_agg(oi.quantity || ' x ' || m.name, ', ' ORDER BY oi.line_no) \
        FROM public.order_items oi JOIN public.menu_items m ON m.id = oi.menu_item_id \
       WHERE oi.order_id = o.id) AS items \
     FROM public.orders o JOIN public.customers c ON c.id = o.customer_id \
     WHERE regexp_replace(c.phone, '[^0-9]', '', 'g') = $1 \
     ORDER BY o.created_at DESC LIMIT 5";
/// See [`DEFAULT_CUSTOMER_QUERY`].
pub const DEFAULT_MENU_QUERY: &str = "SELECT name, category, price::text AS price \
     FROM public.menu_items WHERE available ORDER BY category, name LIMIT 60";
/// The default instructions.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You answer WhatsApp messages for a restaurant while its staff are \
     unavailable. Reply in the customer's language, briefly and kindly, using only the facts \
     below about the customer, their orders and the menu. Never invent prices, order states or \
     dishes. If you cannot help, say that the restaurant will answer as soon as possible.";
/// The default text when no provider answers.
pub const DEFAULT_FALLBACK_TEXT: &str = "Thanks for your message! We can't answer right now; the \
     restaurant will get back to you as soon as possible.";

/// Delivery mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryMode {
    /// `bite-sync run` at the restaurant takes rows from the inbox (no inbound port).
    Pull,
    /// The relay POSTs to `LOCAL_BACKEND_URL` itself; rows it cannot deliver wait for pull.
    Push,
}

/// What a delivery's body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeliveryFormat {
    /// Meta's envelope narrowed to the item, plus a `bite_sync` object; `x-api-key` and
    /// `x-bite-signature-256` (HMAC with `SYNC_API_KEY`).
    BiteSync,
    /// Exactly a Meta webhook body narrowed to the item, with `X-Hub-Signature-256` (HMAC
    /// with `META_APP_SECRET`), so a backend written for Meta's webhooks takes it unchanged.
    Meta,
}

/// How inbox rows reach the backend.
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// Whether to deliver at all (`SYNC_ENABLED`, default true).
    pub enabled: bool,
    /// `LOCAL_BACKEND_URL` + path: where rows are POSTed; none: not configured.
    pub url: Option<String>,
    /// Pull or push.
    pub mode: DeliveryMode,
    /// `SYNC_API_KEY`: sent as `x-api-key` and the key of the body's HMAC signature.
    pub api_key: Option<Secret>,
    /// The body's shape and signature.
    pub format: DeliveryFormat,
    /// `META_APP_SECRET`: signs deliveries in the `meta` format (the daemon that delivers
    /// needs it then, like the relay).
    pub app_secret: Option<Secret>,
    /// `SYNC_API_KEY_PREVIOUS`: during a rotation, still accepted from the backend (never
    /// used to sign).
    pub api_key_previous: Option<Secret>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Longest wait between two attempts of one row.
    pub max_backoff: Duration,
}

/// Everything `bite-sync relay` needs.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// `PORT`.
    pub port: u16,
    /// The address to listen on (`relay --bind`), set by the caller; none: every interface
    /// (`[::]`, else `0.0.0.0`), what Railway needs.
    pub bind: Option<std::net::IpAddr>,
    /// `DATABASE_URL`: the cloud database (the mirror) holding the inbox.
    pub database: Option<DbUrl>,
    /// `WHATSAPP_VERIFY_TOKEN`.
    pub verify_token: Option<Secret>,
    /// `META_APP_SECRET`.
    pub app_secret: Option<Secret>,
    /// `META_APP_SECRET_PREVIOUS`: during a rotation, webhooks signed with it are accepted too.
    pub app_secret_previous: Option<Secret>,
    /// `WHATSAPP_ACCESS_TOKEN`.
    pub access_token: Option<Secret>,
    /// `WHATSAPP_PHONE_NUMBER_ID`.
    pub phone_number_id: Option<String>,
    /// Graph API base URL, no trailing slash.
    pub graph_api_url: String,
    /// Graph API version.
    pub graph_api_version: String,
    /// `JWT_SECRET`: HS256 tokens accepted by `POST /api/messages`.
    pub jwt_secret: Option<Secret>,
    /// `JWT_SECRET_PREVIOUS`: during a rotation, tokens signed with it are accepted too.
    pub jwt_secret_previous: Option<Secret>,
    /// Longest lifetime of an accepted JWT (`relay.jwt_max_lifetime`).
    pub jwt_max_lifetime: Duration,
    /// Timeouts of the relay's HTTP connections.
    pub http: HttpTimeouts,
    /// Sends per second for the business number.
    pub send_rate: u32,
    /// Least time between two sends to one customer.
    pub customer_interval: Duration,
    /// How long delivered inbox items, sent messages and dead letters are kept.
    pub keep: Duration,
    /// Signature failures are judged over windows this long (see `relay::alerts`).
    pub signature_alert_window: Duration,
    /// Where alerts go (`[alerts] webhook_url` / `BITE_ALERT_WEBHOOK`); set by the caller from
    /// the configuration, none here.
    pub alert_webhook: Option<crate::alert::WebhookUrl>,
    /// This process's name in the bookkeeping (`RAILWAY_REPLICA_ID`, else host and pid).
    pub replica: String,
    /// The AI fallback.
    pub ai: AiSettings,
    /// Delivery to the backend.
    pub delivery: DeliverySettings,
}

/// Timeouts of the relay's HTTP connections (`relay.header_timeout`, `body_timeout`,
/// `idle_timeout`): a client that is slow or silent gives its connection back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpTimeouts {
    /// From a request's first byte to the end of its headers.
    pub header: Duration,
    /// Reading a request's body.
    pub body: Duration,
    /// Between two requests on a keep-alive connection (longer than Railway's edge keeps
    /// one, so the edge never reuses a connection the relay is closing).
    pub idle: Duration,
}

impl Default for HttpTimeouts {
    fn default() -> HttpTimeouts {
        HttpTimeouts {
            header: Duration::from_secs(10),
            body: Duration::from_secs(30),
            idle: Duration::from_secs(75),
        }
    }
}

/// Where a problem is: the environment variable or the file's key.
struct Problems<'a> {
    file: Option<&'a std::path::Path>,
    list: Vec<String>,
}

impl Problems<'_> {
    fn at(&self, key: &str) -> String {
        match self.file {
            Some(f) => format!("{}: {key}", f.display()),
            None => key.to_string(),
        }
    }

    fn duration(
        &mut self,
        var: Option<(&str, String)>,
        key: &str,
        raw: Option<&String>,
        default: Duration,
    ) -> Duration {
        let (text, from) = match (var, raw) {
            (Some((name, v)), _) => (v, name.to_string()),
            (None, Some(v)) => (v.clone(), self.at(key)),
            (None, None) => return default,
        };
        match parse_duration(&text) {
            Ok(d) => d,
            Err(e) => {
                self.list.push(format!("{from}: {e}"));
                default
            }
        }
    }
}

/// Reads an environment variable; empty counts as unset (Railway's empty variables).
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment, for [`Env`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn http_url(text: &str) -> Result<String, String> {
    let t = text.trim().trim_end_matches('/');
    let rest = t
        .strip_prefix("http://")
        .or_else(|| t.strip_prefix("https://"))
        .ok_or_else(|| format!("expected an http:// or https:// URL, got {text:?}"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("the URL has no host: {text:?}"));
    }
    if rest.split('/').next().is_some_and(|a| a.contains('@')) {
        return Err("user names and passwords in the URL are not supported".into());
    }
    Ok(t.to_string())
}

impl DeliverySettings {
    /// Reads `[delivery]` and `LOCAL_BACKEND_URL`, `SYNC_API_KEY`, `SYNC_ENABLED`,
    /// `DELIVERY_MODE`.
    pub fn resolve(
        raw: &RawDelivery,
        file: Option<&std::path::Path>,
        env: Env<'_>,
    ) -> Result<DeliverySettings, ConfigError> {
        let mut p = Problems {
            file,
            list: Vec::new(),
        };
        let settings = delivery(raw, &mut p, env);
        if p.list.is_empty() {
            Ok(settings)
        } else {
            Err(ConfigError { problems: p.list })
        }
    }
}

fn delivery(raw: &RawDelivery, p: &mut Problems<'_>, env: Env<'_>) -> DeliverySettings {
    let enabled = match env("SYNC_ENABLED") {
        None => true,
        Some(v) => match v.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => true,
            "0" | "false" | "no" | "off" => false,
            _ => {
                p.list
                    .push(format!("SYNC_ENABLED: expected true or false, got {v:?}"));
                true
            }
        },
    };
    let base = match (env("LOCAL_BACKEND_URL"), &raw.backend_url) {
        (Some(v), _) => Some((v, "LOCAL_BACKEND_URL".to_string())),
        (None, Some(v)) => Some((v.clone(), p.at("delivery.backend_url"))),
        (None, None) => None,
    };
    let (path, path_from) = match (env("DELIVERY_PATH"), &raw.path) {
        (Some(v), _) => (v.trim().to_string(), "DELIVERY_PATH".to_string()),
        (None, Some(v)) => (v.clone(), p.at("delivery.path")),
        (None, None) => ("/cloud-sync/webhook".into(), String::new()),
    };
    if !path.starts_with('/') {
        p.list
            .push(format!("{path_from}: must start with /, got {path:?}"));
    }
    let url = base.and_then(|(text, from)| match http_url(&text) {
        Ok(u) => Some(format!("{u}{path}")),
        Err(e) => {
            p.list.push(format!("{from}: {e}"));
            None
        }
    });
    let mode = match (env("DELIVERY_MODE"), &raw.mode) {
        (Some(v), _) => Some((v, "DELIVERY_MODE".to_string())),
        (None, Some(v)) => Some((v.clone(), p.at("delivery.mode"))),
        (None, None) => None,
    };
    let mode = match mode {
        None => DeliveryMode::Pull,
        Some((v, from)) => match v.trim().to_ascii_lowercase().as_str() {
            "pull" => DeliveryMode::Pull,
            "push" => DeliveryMode::Push,
            _ => {
                p.list
                    .push(format!("{from}: expected \"pull\" or \"push\", got {v:?}"));
                DeliveryMode::Pull
            }
        },
    };
    let format = match (env("DELIVERY_FORMAT"), &raw.format) {
        (Some(v), _) => Some((v, "DELIVERY_FORMAT".to_string())),
        (None, Some(v)) => Some((v.clone(), p.at("delivery.format"))),
        (None, None) => None,
    };
    let format = match format {
        None => DeliveryFormat::BiteSync,
        Some((v, from)) => match v.trim().to_ascii_lowercase().as_str() {
            "bite-sync" | "bite_sync" => DeliveryFormat::BiteSync,
            "meta" => DeliveryFormat::Meta,
            _ => {
                p.list.push(format!(
                    "{from}: expected \"bite-sync\" or \"meta\", got {v:?}"
                ));
                DeliveryFormat::BiteSync
            }
        },
    };
    let app_secret = env("META_APP_SECRET").map(Secret::new);
    if format == DeliveryFormat::Meta && app_secret.is_none() && url.is_some() {
        p.list.push(
            "META_APP_SECRET is not set: the meta delivery format signs every delivery with it (X-Hub-Signature-256, as Meta signs); set it where the deliveries are made (bite-sync run, or the relay in push mode) to the app secret the backend checks".into(),
        );
    }
    let timeout = p.duration(
        None,
        "delivery.timeout",
        raw.timeout.as_ref(),
        Duration::from_secs(10),
    );
    let max_backoff = p.duration(
        None,
        "delivery.max_backoff",
        raw.max_backoff.as_ref(),
        Duration::from_secs(300),
    );
    if max_backoff < Duration::from_secs(1) {
        p.list.push(format!(
            "{}: must be at least 1s",
            p.at("delivery.max_backoff")
        ));
    }
    DeliverySettings {
        enabled,
        url,
        mode,
        api_key: env("SYNC_API_KEY").map(Secret::new),
        format,
        app_secret,
        api_key_previous: env("SYNC_API_KEY_PREVIOUS").map(Secret::new),
        timeout,
        max_backoff,
    }
}

impl RelaySettings {
    /// Reads the environment and `[relay]`/`[delivery]`; every problem at once. Nothing here
    /// is required yet: [`RelaySettings::require`] says what `bite-sync relay` cannot run
    /// without.
    pub fn resolve(
        raw: &RawRelay,
        raw_delivery: &RawDelivery,
        file: Option<&std::path::Path>,
        env: Env<'_>,
    ) -> Result<RelaySettings, ConfigError> {
        let mut p = Problems {
            file,
            list: Vec::new(),
        };
        let port = match (env("PORT"), raw.port) {
            (Some(v), _) => match v.trim().parse::<u16>() {
                Ok(n) => n,
                Err(_) => {
                    p.list
                        .push(format!("PORT: expected a port number, got {v:?}"));
                    5000
                }
            },
            (None, Some(n)) if (0..=65535).contains(&n) => n as u16,
            (None, Some(n)) => {
                p.list.push(format!(
                    "{}: expected 0 to 65535, got {n}",
                    p.at("relay.port")
                ));
                5000
            }
            (None, None) => 5000,
        };
        let database = env("DATABASE_URL").and_then(|url| match DbUrl::parse(Role::Mirror, &url) {
            Ok(db) => Some(db.with_origin("DATABASE_URL")),
            Err(e) => {
                p.list.push(format!("DATABASE_URL: {e}"));
                None
            }
        });
        let graph_api_url = match (env("GRAPH_API_URL"), &raw.graph_api_url) {
            (Some(v), _) => Some((v, "GRAPH_API_URL".to_string())),
            (None, Some(v)) => Some((v.clone(), p.at("relay.graph_api_url"))),
            (None, None) => None,
        }
        .map_or_else(
            || "https://graph.facebook.com".to_string(),
            |(v, from)| {
                http_url(&v).unwrap_or_else(|e| {
                    p.list.push(format!("{from}: {e}"));
                    String::new()
                })
            },
        );
        let graph_api_version = env("GRAPH_API_VERSION")
            .or_else(|| raw.graph_api_version.clone())
            .unwrap_or_else(|| "v25.0".into());
        if !graph_api_version.starts_with('v') || graph_api_version[1..].parse::<f32>().is_err() {
            p.list.push(format!(
                "GRAPH_API_VERSION / {}: expected a version like \"v25.0\", got {graph_api_version:?}",
                p.at("relay.graph_api_version")
            ));
        }
        let phone_number_id =
            env("WHATSAPP_PHONE_NUMBER_ID").or_else(|| raw.phone_number_id.clone());
        if let Some(id) = &phone_number_id
            && !id.chars().all(|c| c.is_ascii_digit())
        {
            p.list.push(format!(
                "WHATSAPP_PHONE_NUMBER_ID: expected digits (Meta's Phone Number ID, not the phone number), got {id:?}"
            ));
        }
        let send_rate = match raw.send_rate {
            None => 80,
            Some(n) if (1..=1000).contains(&n) => n as u32,
            Some(n) => {
                p.list.push(format!(
                    "{}: expected 1 to 1000, got {n}",
                    p.at("relay.send_rate")
                ));
                80
            }
        };
        let customer_interval = p.duration(
            None,
            "relay.customer_interval",
            raw.customer_interval.as_ref(),
            Duration::from_secs(6),
        );
        let keep_days = match raw.keep_days {
            None => 30,
            Some(n) if (1..=3650).contains(&n) => n as u64,
            Some(n) => {
                p.list.push(format!(
                    "{}: expected 1 to 3650, got {n}",
                    p.at("relay.keep_days")
                ));
                30
            }
        };
        let signature_alert_window = p.duration(
            None,
            "relay.signature_alert_window",
            raw.signature_alert_window.as_ref(),
            Duration::from_secs(60),
        );
        if signature_alert_window < Duration::from_secs(1) {
            p.list.push(format!(
                "{}: must be at least 1s",
                p.at("relay.signature_alert_window")
            ));
        }
        let jwt_max_lifetime = p.duration(
            None,
            "relay.jwt_max_lifetime",
            raw.jwt_max_lifetime.as_ref(),
            Duration::from_secs(3600),
        );
        if jwt_max_lifetime < Duration::from_secs(60) {
            p.list.push(format!(
                "{}: must be at least 1m",
                p.at("relay.jwt_max_lifetime")
            ));
        }
        let http = http_timeouts(raw, &mut p);
        let ai = ai(&raw.ai, &mut p, env);
        let delivery = delivery(raw_delivery, &mut p, env);
        let replica = env("RAILWAY_REPLICA_ID").unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "relay".into());
            format!("{host}:{}", std::process::id())
        });
        if !p.list.is_empty() {
            return Err(ConfigError { problems: p.list });
        }
        Ok(RelaySettings {
            port,
            bind: None,
            database,
            verify_token: env("WHATSAPP_VERIFY_TOKEN").map(Secret::new),
            app_secret: env("META_APP_SECRET").map(Secret::new),
            app_secret_previous: env("META_APP_SECRET_PREVIOUS").map(Secret::new),
            access_token: env("WHATSAPP_ACCESS_TOKEN").map(Secret::new),
            phone_number_id,
            graph_api_url,
            graph_api_version,
            jwt_secret: env("JWT_SECRET").map(Secret::new),
            jwt_secret_previous: env("JWT_SECRET_PREVIOUS").map(Secret::new),
            jwt_max_lifetime,
            http,
            send_rate,
            customer_interval,
            keep: Duration::from_secs(keep_days * 24 * 3600),
            signature_alert_window,
            alert_webhook: None,
            replica,
            ai,
            delivery,
        })
    }

    /// What `bite-sync relay` cannot start without, all at once: the database, the verify
    /// token and the app secret. Sending (AI replies, `/api/messages`) without
    /// `WHATSAPP_ACCESS_TOKEN` and `WHATSAPP_PHONE_NUMBER_ID` is only a warning.
    pub fn require(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.database.is_none() {
            problems.push("DATABASE_URL is not set: the relay stores every webhook in this database (on Railway: ${{Postgres.DATABASE_URL}})".to_string());
        }
        if self.verify_token.is_none() {
            problems.push("WHATSAPP_VERIFY_TOKEN is not set: the string you type as Verify token in Meta's App Dashboard > WhatsApp > Configuration".to_string());
        }
        if self.app_secret.is_none() {
            problems.push("META_APP_SECRET is not set: App Dashboard > App settings > Basic > App secret; every webhook's signature is checked with it".to_string());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Whether the relay can send WhatsApp messages (token and phone number id set).
    pub fn can_send(&self) -> bool {
        self.access_token.is_some() && self.phone_number_id.is_some()
    }
}

fn http_timeouts(raw: &RawRelay, p: &mut Problems<'_>) -> HttpTimeouts {
    let default = HttpTimeouts::default();
    let mut timeout = |key: &str, value: Option<&String>, default: Duration| {
        let d = p.duration(None, key, value, default);
        if d < Duration::from_millis(100) || d > Duration::from_secs(3600) {
            p.list.push(format!("{}: expected 100ms to 1h", p.at(key)));
            return default;
        }
        d
    };
    HttpTimeouts {
        header: timeout(
            "relay.header_timeout",
            raw.header_timeout.as_ref(),
            default.header,
        ),
        body: timeout(
            "relay.body_timeout",
            raw.body_timeout.as_ref(),
            default.body,
        ),
        idle: timeout(
            "relay.idle_timeout",
            raw.idle_timeout.as_ref(),
            default.idle,
        ),
    }
}

fn ai(raw: &RawAi, p: &mut Problems<'_>, env: Env<'_>) -> AiSettings {
    let mut order: Vec<ProviderKind> = Vec::new();
    if let Some(first) = env("AI_PROVIDER") {
        match ProviderKind::parse(&first) {
            Some(k) => order.push(k),
            None => p.list.push(format!(
                "AI_PROVIDER: expected openai, gemini or anthropic, got {first:?}"
            )),
        }
    }
    match &raw.providers {
        Some(list) => {
            for (i, name) in list.iter().enumerate() {
                match ProviderKind::parse(name) {
                    Some(k) if !order.contains(&k) => order.push(k),
                    Some(_) => {}
                    None => p.list.push(format!(
                        "{}[{i}]: expected openai, gemini or anthropic, got {name:?}",
                        p.at("relay.ai.providers")
                    )),
                }
            }
        }
        None => {
            for k in ProviderKind::ALL {
                if !order.contains(&k) {
                    order.push(k);
                }
            }
        }
    }
    let mut providers = Vec::new();
    for kind in order {
        let Some(key) = env(kind.key_var()) else {
            continue;
        };
        let upper = kind.name().to_ascii_uppercase();
        let (model, base) = match kind {
            ProviderKind::OpenAi => (&raw.openai_model, &raw.openai_base_url),
            ProviderKind::Gemini => (&raw.gemini_model, &raw.gemini_base_url),
            ProviderKind::Anthropic => (&raw.anthropic_model, &raw.anthropic_base_url),
        };
        let model = env(&format!("{upper}_MODEL"))
            .or_else(|| model.clone())
            .unwrap_or_else(|| kind.default_model().to_string());
        let base_var = format!("{upper}_BASE_URL");
        let base_url = match (env(&base_var), base) {
            (Some(v), _) => http_url(&v).map_err(|e| format!("{base_var}: {e}")),
            (None, Some(v)) => http_url(v).map_err(|e| {
                format!(
                    "{}: {e}",
                    p.at(&format!("relay.ai.{}_base_url", kind.name()))
                )
            }),
            (None, None) => Ok(kind.default_base_url().to_string()),
        };
        match base_url {
            Ok(base_url) => providers.push(Provider {
                kind,
                api_key: Secret::new(key),
                model,
                base_url,
            }),
            Err(e) => p.list.push(e),
        }
    }
    let deadline = p.duration(
        env("AI_DEADLINE").map(|v| ("AI_DEADLINE", v)),
        "relay.ai.deadline",
        raw.deadline.as_ref(),
        Duration::from_secs(20),
    );
    let fresh_for = p.duration(
        None,
        "relay.ai.fresh_for",
        raw.fresh_for.as_ref(),
        Duration::from_secs(600),
    );
    if fresh_for > Duration::from_secs(24 * 3600) {
        p.list.push(format!(
            "{}: at most 24h (WhatsApp's customer service window)",
            p.at("relay.ai.fresh_for")
        ));
    }
    let timeout = p.duration(
        None,
        "relay.ai.timeout",
        raw.timeout.as_ref(),
        Duration::from_secs(10),
    );
    let mut count = |key: &str,
                     value: Option<i64>,
                     range: std::ops::RangeInclusive<i64>,
                     default: i64| match value {
        None => default,
        Some(n) if range.contains(&n) => n,
        Some(n) => {
            p.list.push(format!(
                "{}: expected {} to {}, got {n}",
                p.at(key),
                range.start(),
                range.end()
            ));
            default
        }
    };
    let max_context_chars = count(
        "relay.ai.max_context_chars",
        raw.max_context_chars,
        200..=200_000,
        6000,
    ) as usize;
    let max_reply_tokens = count(
        "relay.ai.max_reply_tokens",
        raw.max_reply_tokens,
        16..=8192,
        400,
    ) as u32;
    AiSettings {
        providers,
        deadline,
        fresh_for,
        timeout,
        fallback_text: raw
            .fallback_text
            .clone()
            .unwrap_or_else(|| DEFAULT_FALLBACK_TEXT.to_string()),
        system_prompt: raw
            .system_prompt
            .clone()
            .unwrap_or_else(|| DEFAULT_SYSTEM_PROMPT.to_string()),
        max_context_chars,
        max_reply_tokens,
        queries: ContextQueries {
            customer: raw
                .customer_query
                .clone()
                .unwrap_or_else(|| DEFAULT_CUSTOMER_QUERY.to_string()),
            orders: raw
                .orders_query
                .clone()
                .unwrap_or_else(|| DEFAULT_ORDERS_QUERY.to_string()),
            menu: raw
                .menu_query
                .clone()
                .unwrap_or_else(|| DEFAULT_MENU_QUERY.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn defaults_need_only_the_three_required_variables() {
        let env = env_of(&[
            ("DATABASE_URL", "postgres://u:pw@localhost/db"),
            ("WHATSAPP_VERIFY_TOKEN", "tok"),
            ("META_APP_SECRET", "sec"),
        ]);
        let s = RelaySettings::resolve(&RawRelay::default(), &RawDelivery::default(), None, &env)
            .unwrap();
        s.require().unwrap();
        assert_eq!(s.port, 5000);
        assert_eq!(s.graph_api_url, "https://graph.facebook.com");
        assert_eq!(s.delivery.mode, DeliveryMode::Pull);
        assert!(s.delivery.enabled);
        assert!(s.ai.providers.is_empty());
        assert_eq!(s.ai.deadline, Duration::from_secs(20));
        assert_eq!(s.ai.fresh_for, Duration::from_secs(600));
        assert!(!s.can_send());
        assert!(s.app_secret_previous.is_none() && s.delivery.api_key_previous.is_none());
    }

    #[test]
    fn missing_requirements_are_listed_together() {
        let env = env_of(&[]);
        let s = RelaySettings::resolve(&RawRelay::default(), &RawDelivery::default(), None, &env)
            .unwrap();
        let e = s.require().unwrap_err();
        assert_eq!(e.problems.len(), 3, "{e}");
    }

    #[test]
    fn providers_follow_keys_and_order() {
        let env = env_of(&[
            ("ANTHROPIC_API_KEY", "sk-ant-secret"),
            ("OPENAI_API_KEY", "sk-secret"),
            ("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/"),
        ]);
        let s = RelaySettings::resolve(&RawRelay::default(), &RawDelivery::default(), None, &env)
            .unwrap();
        let kinds: Vec<_> = s.ai.providers.iter().map(|p| p.kind).collect();
        assert_eq!(kinds, [ProviderKind::OpenAi, ProviderKind::Anthropic]);
        assert_eq!(s.ai.providers[0].base_url, "http://127.0.0.1:9/v1");
        let env = env_of(&[
            ("ANTHROPIC_API_KEY", "k"),
            ("OPENAI_API_KEY", "k"),
            ("AI_PROVIDER", "anthropic"),
        ]);
        let s = RelaySettings::resolve(&RawRelay::default(), &RawDelivery::default(), None, &env)
            .unwrap();
        assert_eq!(s.ai.providers[0].kind, ProviderKind::Anthropic);
        assert!(!format!("{s:?}").contains("sk-"), "secrets never in Debug");
    }

    #[test]
    fn every_bad_value_is_reported_with_its_name() {
        let env = env_of(&[
            ("PORT", "http"),
            ("DATABASE_URL", "mysql://x"),
            ("LOCAL_BACKEND_URL", "localhost:3000"),
            ("DELIVERY_MODE", "carrier-pigeon"),
            ("SYNC_ENABLED", "maybe"),
            ("AI_PROVIDER", "eliza"),
        ]);
        let raw = RawRelay {
            ai: RawAi {
                deadline: Some("soon".into()),
                ..RawAi::default()
            },
            header_timeout: Some("5ms".into()),
            jwt_max_lifetime: Some("forever".into()),
            ..RawRelay::default()
        };
        let e = RelaySettings::resolve(
            &raw,
            &RawDelivery::default(),
            Some(std::path::Path::new("b.toml")),
            &env,
        )
        .unwrap_err();
        let text = e.to_string();
        for needle in [
            "PORT",
            "DATABASE_URL",
            "LOCAL_BACKEND_URL",
            "DELIVERY_MODE",
            "SYNC_ENABLED",
            "AI_PROVIDER",
            "b.toml: relay.ai.deadline",
            "b.toml: relay.header_timeout: expected 100ms to 1h",
            "b.toml: relay.jwt_max_lifetime",
        ] {
            assert!(text.contains(needle), "{needle} missing from {text}");
        }
    }

    #[test]
    fn the_committed_example_resolves() {
        let raw = crate::config::parse(crate::config::EXAMPLE).unwrap();
        let env = env_of(&[]);
        let s = RelaySettings::resolve(&raw.relay, &raw.delivery, None, &env).unwrap();
        assert_eq!(
            s.delivery.url.as_deref(),
            Some("http://localhost:3000/api/cloud-sync/webhook")
        );
        assert_eq!(s.ai.deadline, Duration::from_secs(20));
        assert_eq!(s.send_rate, 80);
        assert_eq!(s.jwt_max_lifetime, Duration::from_secs(3600));
        assert_eq!(s.http, HttpTimeouts::default());
    }

    #[test]
    fn the_meta_format_needs_the_app_secret_and_takes_any_path() {
        let env = env_of(&[
            ("LOCAL_BACKEND_URL", "http://127.0.0.1:8000"),
            ("DELIVERY_FORMAT", "meta"),
            ("DELIVERY_PATH", "/"),
        ]);
        let e = DeliverySettings::resolve(&RawDelivery::default(), None, &env).unwrap_err();
        assert!(e.to_string().contains("META_APP_SECRET"), "{e}");
        let env = env_of(&[
            ("LOCAL_BACKEND_URL", "http://127.0.0.1:8000"),
            ("DELIVERY_FORMAT", "Meta"),
            ("DELIVERY_PATH", "/"),
            ("META_APP_SECRET", "s3cret"),
        ]);
        let d = DeliverySettings::resolve(&RawDelivery::default(), None, &env).unwrap();
        assert_eq!(d.format, DeliveryFormat::Meta);
        assert_eq!(d.url.as_deref(), Some("http://127.0.0.1:8000/"));
        assert!(!format!("{d:?}").contains("s3cret"));
        let raw = RawDelivery {
            format: Some("xml".into()),
            path: Some("webhook".into()),
            ..RawDelivery::default()
        };
        let e = DeliverySettings::resolve(&raw, Some(std::path::Path::new("b.toml")), &env_of(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("b.toml: delivery.format") && e.contains("b.toml: delivery.path"),
            "{e}"
        );
        let d = DeliverySettings::resolve(&RawDelivery::default(), None, &env_of(&[])).unwrap();
        assert_eq!(d.format, DeliveryFormat::BiteSync, "the default stays");
    }

    #[test]
    fn the_backend_url_gets_the_delivery_path() {
        let env = env_of(&[("LOCAL_BACKEND_URL", "http://192.168.1.10:3000/api/")]);
        let d = DeliverySettings::resolve(&RawDelivery::default(), None, &env).unwrap();
        assert_eq!(
            d.url.as_deref(),
            Some("http://192.168.1.10:3000/api/cloud-sync/webhook")
        );
    }
}
