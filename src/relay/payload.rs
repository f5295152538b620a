//! Meta's webhook envelope → inbox items. Pure: bytes in, values out, never a panic.
//!
//! ```text
//! object: "whatsapp_business_account"
//! entry[]: { id: WABA, changes[]: { field, value: { metadata, contacts[], messages[], statuses[], errors[] } } }
//! ```
//! Every entry, change, message and status becomes one [`Item`] (Chatwoot's mistake of reading
//! only `entry[0].changes[0]` is not repeated). A change of another field, or a `messages`
//! change with neither messages nor statuses (system `errors[]`), is kept whole as a
//! [`Kind::Change`]. Unknown message types are items like any other: stored and delivered as
//! Meta sent them.
//!
//! What cannot be read is reported, never dropped: a body that is not JSON or not a WhatsApp
//! envelope is [`Unreadable`] (the caller dead-letters it whole); a part that is malformed (a
//! message without an id) is listed in [`Parsed::problems`] while the rest is stored.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// What an item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `value.messages[]`: a customer wrote.
    Message,
    /// `value.statuses[]`: what happened to a message the business sent.
    Status,
    /// Any other change, kept whole.
    Change,
}

impl Kind {
    /// The inbox's `kind` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Message => "message",
            Kind::Status => "status",
            Kind::Change => "change",
        }
    }
}

/// One row of the inbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// What it is.
    pub kind: Kind,
    /// Unique per item: the wamid; `wamid status` for a status; `change <sha256>` else.
    pub dedupe_key: String,
    /// The message's id, or for a status the id of our message it is about.
    pub wamid: Option<String>,
    /// `entry[].id`.
    pub waba_id: Option<String>,
    /// `changes[].field`.
    pub field: String,
    /// `value.metadata` (display number, phone number id).
    pub metadata: Option<Value>,
    /// Delivery order key: phone (wa_id), else user id, else `change:<waba>`.
    pub customer: String,
    /// The customer's wa_id, when Meta gives one.
    pub customer_phone: Option<String>,
    /// The customer's business-scoped user id (BSUID), when Meta gives one.
    pub customer_user_id: Option<String>,
    /// `contacts[].profile.name`.
    pub customer_name: Option<String>,
    /// Message type or status.
    pub item_type: Option<String>,
    /// What a person would read.
    pub body: Option<String>,
    /// Meta's `timestamp` (unix seconds).
    pub sent_at: Option<i64>,
    /// The message, status or change value as sent.
    pub item: Value,
    /// The matching `contacts[]` entry.
    pub contact: Option<Value>,
}

/// A readable payload.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Parsed {
    /// Every item, in payload order.
    pub items: Vec<Item>,
    /// Parts that could not be read, e.g. `entry[0].changes[1].value.messages[2]: no "id"`.
    pub problems: Vec<String>,
}

/// A payload that is not a WhatsApp webhook at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unreadable {
    /// Not JSON.
    #[error("not valid JSON: {0}")]
    NotJson(String),
    /// JSON of another shape.
    #[error("not a WhatsApp Business webhook: {0}")]
    NotWhatsApp(String),
}

/// Reads a webhook body.
pub fn parse(body: &[u8]) -> Result<Parsed, Unreadable> {
    let root: Value =
        serde_json::from_slice(body).map_err(|e| Unreadable::NotJson(e.to_string()))?;
    let Some(root) = root.as_object() else {
        return Err(Unreadable::NotWhatsApp(
            "the body is not a JSON object".into(),
        ));
    };
    match root.get("object").and_then(Value::as_str) {
        Some("whatsapp_business_account") => {}
        Some(other) => {
            return Err(Unreadable::NotWhatsApp(format!(
                "\"object\" is {other:?}, expected \"whatsapp_business_account\""
            )));
        }
        None => return Err(Unreadable::NotWhatsApp("no \"object\" string".into())),
    }
    let Some(entries) = root.get("entry").and_then(Value::as_array) else {
        return Err(Unreadable::NotWhatsApp("no \"entry\" array".into()));
    };
    let mut parsed = Parsed::default();
    for (e, entry) in entries.iter().enumerate() {
        let at = format!("entry[{e}]");
        let Some(entry) = entry.as_object() else {
            parsed.problems.push(format!("{at}: not an object"));
            continue;
        };
        let waba_id = entry.get("id").and_then(id_text);
        let Some(changes) = entry.get("changes").and_then(Value::as_array) else {
            parsed.problems.push(format!("{at}: no \"changes\" array"));
            continue;
        };
        for (c, change) in changes.iter().enumerate() {
            let at = format!("{at}.changes[{c}]");
            read_change(change, waba_id.as_deref(), &at, &mut parsed);
        }
    }
    if parsed.items.is_empty() && parsed.problems.is_empty() {
        return Err(Unreadable::NotWhatsApp("no changes in any entry".into()));
    }
    Ok(parsed)
}

fn read_change(change: &Value, waba_id: Option<&str>, at: &str, parsed: &mut Parsed) {
    let Some(change) = change.as_object() else {
        parsed.problems.push(format!("{at}: not an object"));
        return;
    };
    let Some(field) = change.get("field").and_then(Value::as_str) else {
        parsed.problems.push(format!("{at}: no \"field\" string"));
        return;
    };
    let Some(value) = change.get("value").and_then(Value::as_object) else {
        parsed.problems.push(format!("{at}: no \"value\" object"));
        return;
    };
    let messages = value.get("messages").and_then(Value::as_array);
    let statuses = value.get("statuses").and_then(Value::as_array);
    if field != "messages" || (messages.is_none() && statuses.is_none()) {
        parsed.items.push(whole_change(field, waba_id, value));
        return;
    }
    let metadata = value.get("metadata").cloned();
    let contacts = value
        .get("contacts")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let lists: [(&str, Option<&Vec<Value>>, ReadItem); 2] = [
        ("messages", messages, read_message),
        ("statuses", statuses, |status, _| read_status(status)),
    ];
    for (list, values, read) in lists {
        for (i, value) in values.into_iter().flatten().enumerate() {
            match read(value, contacts) {
                Ok(mut item) => {
                    item.waba_id = waba_id.map(str::to_owned);
                    item.field = field.to_owned();
                    item.metadata = metadata.clone();
                    parsed.items.push(item);
                }
                Err(why) => parsed
                    .problems
                    .push(format!("{at}.value.{list}[{i}]: {why}")),
            }
        }
    }
    // System-level errors beside messages or statuses are kept too.
    if value.get("errors").is_some_and(|e| e.is_array()) {
        parsed.items.push(whole_change(field, waba_id, value));
    }
}

/// Reads one message (with the change's contacts) or one status.
type ReadItem = fn(&Value, &[Value]) -> Result<Item, String>;

fn whole_change(field: &str, waba_id: Option<&str>, value: &Map<String, Value>) -> Item {
    let value = Value::Object(value.clone());
    let mut hash = Sha256::new();
    hash.update(waba_id.unwrap_or("").as_bytes());
    hash.update([0]);
    hash.update(field.as_bytes());
    hash.update([0]);
    // serde_json's map is ordered by key, so equal changes serialize to equal bytes.
    hash.update(value.to_string().as_bytes());
    Item {
        kind: Kind::Change,
        dedupe_key: format!("change {}", hex::encode(hash.finalize())),
        wamid: None,
        waba_id: waba_id.map(str::to_owned),
        field: field.to_owned(),
        metadata: value.get("metadata").cloned(),
        customer: format!("change:{}", waba_id.unwrap_or("")),
        customer_phone: None,
        customer_user_id: None,
        customer_name: None,
        item_type: Some(field.to_owned()),
        body: None,
        sent_at: None,
        item: value,
        contact: None,
    }
}

fn read_message(message: &Value, contacts: &[Value]) -> Result<Item, String> {
    let m = message.as_object().ok_or("not an object")?;
    let id = m
        .get("id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or("no \"id\" string")?;
    let phone = m.get("from").and_then(id_text);
    let user_id = m
        .get("from_user_id")
        .or_else(|| m.get("user_id"))
        .and_then(id_text);
    let contact = find_contact(contacts, phone.as_deref(), user_id.as_deref());
    let user_id = user_id.or_else(|| contact.and_then(|c| c.get("user_id")).and_then(id_text));
    let item_type = m.get("type").and_then(Value::as_str).map(str::to_owned);
    Ok(Item {
        kind: Kind::Message,
        dedupe_key: id.to_owned(),
        wamid: Some(id.to_owned()),
        waba_id: None,
        field: String::new(),
        metadata: None,
        customer: customer_key(phone.as_deref(), user_id.as_deref()),
        customer_name: contact
            .and_then(|c| c.pointer("/profile/name"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        customer_phone: phone,
        customer_user_id: user_id,
        body: readable_text(m, item_type.as_deref()),
        item_type,
        sent_at: m.get("timestamp").and_then(unix_seconds),
        item: message.clone(),
        contact: contact.cloned(),
    })
}

fn read_status(status: &Value) -> Result<Item, String> {
    let s = status.as_object().ok_or("not an object")?;
    let id = s
        .get("id")
        .and_then(Value::as_str)
        .filter(|v| !v.is_empty())
        .ok_or("no \"id\" string")?;
    let state = s
        .get("status")
        .and_then(Value::as_str)
        .filter(|v| !v.is_empty())
        .ok_or("no \"status\" string")?;
    let phone = s.get("recipient_id").and_then(id_text);
    let user_id = s.get("recipient_user_id").and_then(id_text);
    Ok(Item {
        kind: Kind::Status,
        dedupe_key: format!("{id} {state}"),
        wamid: Some(id.to_owned()),
        waba_id: None,
        field: String::new(),
        metadata: None,
        customer: customer_key(phone.as_deref(), user_id.as_deref()),
        customer_phone: phone,
        customer_user_id: user_id,
        customer_name: None,
        item_type: Some(state.to_owned()),
        body: None,
        sent_at: s.get("timestamp").and_then(unix_seconds),
        item: status.clone(),
        contact: None,
    })
}

/// The contact entry of the sender: by wa_id, else by user id, else the only one.
fn find_contact<'a>(
    contacts: &'a [Value],
    phone: Option<&str>,
    user_id: Option<&str>,
) -> Option<&'a Value> {
    let by = |key: &str, want: Option<&str>| {
        want.and_then(|w| {
            contacts
                .iter()
                .find(|c| c.get(key).and_then(id_text).as_deref() == Some(w))
        })
    };
    by("wa_id", phone)
        .or_else(|| by("user_id", user_id))
        .or(match contacts {
            [only] => Some(only),
            _ => None,
        })
}

fn customer_key(phone: Option<&str>, user_id: Option<&str>) -> String {
    phone
        .or(user_id)
        .map_or_else(|| "unknown".to_owned(), str::to_owned)
}

/// An id Meta sends as a string (sometimes a number in test payloads).
fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Meta's `timestamp`: unix seconds as a string (or a number).
fn unix_seconds(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.trim().parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

/// What a person would read in a message of this type, if anything.
fn readable_text(m: &Map<String, Value>, item_type: Option<&str>) -> Option<String> {
    let at = |pointer: &str| {
        m.get(item_type?)
            .and_then(|o| o.pointer(pointer))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    match item_type? {
        "text" => at("/body"),
        "button" => at("/text"),
        "interactive" => at("/button_reply/title").or_else(|| at("/list_reply/title")),
        "image" | "video" | "document" => at("/caption"),
        "reaction" => at("/emoji"),
        "location" => {
            let parts: Vec<String> = ["/name", "/address"].iter().filter_map(|p| at(p)).collect();
            (!parts.is_empty()).then(|| parts.join(", "))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) const SAMPLE_TEXT: &str = include_str!("../../tests/payloads/text.json");

    #[test]
    fn metas_text_sample_is_one_message() {
        let parsed = parse(SAMPLE_TEXT.as_bytes()).unwrap();
        assert!(parsed.problems.is_empty());
        let [item] = parsed.items.as_slice() else {
            panic!("{parsed:?}")
        };
        assert_eq!(item.kind, Kind::Message);
        assert_eq!(
            item.dedupe_key,
            "wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA="
        );
        assert_eq!(item.customer, "16505551234");
        assert_eq!(item.customer_name.as_deref(), Some("Sheena Nelson"));
        assert_eq!(item.body.as_deref(), Some("Does it come in another color?"));
        assert_eq!(item.sent_at, Some(1749416383));
        assert_eq!(item.waba_id.as_deref(), Some("102290129340398"));
        assert_eq!(item.field, "messages");
        assert_eq!(
            item.metadata.as_ref().unwrap()["phone_number_id"],
            "106540352242922"
        );
    }

    fn envelope(value: Value) -> Vec<u8> {
        json!({"object": "whatsapp_business_account",
               "entry": [{"id": "1", "changes": [{"field": "messages", "value": value}]}]})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn every_message_and_status_of_a_batch_is_an_item() {
        let body = json!({"object": "whatsapp_business_account", "entry": [
            {"id": "1", "changes": [
                {"field": "messages", "value": {
                    "contacts": [{"wa_id": "34600000001", "profile": {"name": "Ana"}},
                                 {"wa_id": "34600000002", "profile": {"name": "Luis"}}],
                    "messages": [
                        {"from": "34600000001", "id": "wamid.a", "timestamp": "10", "type": "text", "text": {"body": "hola"}},
                        {"from": "34600000002", "id": "wamid.b", "timestamp": "11", "type": "interactive",
                         "interactive": {"type": "button_reply", "button_reply": {"id": "x", "title": "Sí"}}}]}},
                {"field": "messages", "value": {"statuses": [
                    {"id": "wamid.out", "status": "sent", "timestamp": "12", "recipient_id": "34600000001"},
                    {"id": "wamid.out", "status": "read", "timestamp": "13", "recipient_id": "34600000001"}]}}]},
            {"id": "2", "changes": [
                {"field": "message_template_status_update", "value": {"event": "APPROVED"}}]}]});
        let parsed = parse(body.to_string().as_bytes()).unwrap();
        assert!(parsed.problems.is_empty());
        let keys: Vec<_> = parsed.items.iter().map(|i| i.dedupe_key.as_str()).collect();
        assert_eq!(
            keys[..4],
            ["wamid.a", "wamid.b", "wamid.out sent", "wamid.out read"]
        );
        assert!(keys[4].starts_with("change "));
        assert_eq!(parsed.items[1].customer_name.as_deref(), Some("Luis"));
        assert_eq!(parsed.items[1].body.as_deref(), Some("Sí"));
        assert_eq!(parsed.items[2].customer, "34600000001");
        assert_eq!(parsed.items[4].kind, Kind::Change);
        assert_eq!(parsed.items[4].waba_id.as_deref(), Some("2"));
    }

    #[test]
    fn unknown_types_are_kept_as_sent() {
        let parsed = parse(&envelope(json!({"messages": [
            {"from": "1", "id": "wamid.u", "timestamp": "1", "type": "hologram", "hologram": {"x": 1}}]})))
        .unwrap();
        assert_eq!(parsed.items[0].item_type.as_deref(), Some("hologram"));
        assert_eq!(parsed.items[0].item["hologram"]["x"], 1);
        assert_eq!(parsed.items[0].body, None);
    }

    #[test]
    fn a_username_without_phone_is_keyed_by_user_id() {
        let parsed = parse(&envelope(json!({
            "contacts": [{"user_id": "US.1349", "profile": {"name": "Zoe"}}],
            "messages": [{"from_user_id": "US.1349", "id": "wamid.z", "timestamp": "1", "type": "text", "text": {"body": "hi"}}]})))
        .unwrap();
        let item = &parsed.items[0];
        assert_eq!(item.customer, "US.1349");
        assert_eq!(item.customer_phone, None);
        assert_eq!(item.customer_name.as_deref(), Some("Zoe"));
    }

    #[test]
    fn malformed_parts_are_reported_and_the_rest_kept() {
        let parsed = parse(&envelope(json!({"messages": [
            {"from": "1", "timestamp": "1", "type": "text"},
            {"from": "1", "id": "wamid.ok", "timestamp": "1", "type": "text", "text": {"body": "x"}}],
            "statuses": [{"id": "wamid.s"}]})))
        .unwrap();
        assert_eq!(parsed.items.len(), 1);
        assert_eq!(parsed.problems.len(), 2, "{:?}", parsed.problems);
        assert!(parsed.problems[0].contains("messages[0]: no \"id\""));
        assert!(parsed.problems[1].contains("statuses[0]: no \"status\""));
    }

    #[test]
    fn not_json_and_other_shapes_are_unreadable() {
        assert!(matches!(parse(b"{not json"), Err(Unreadable::NotJson(_))));
        assert!(matches!(parse(b"[]"), Err(Unreadable::NotWhatsApp(_))));
        assert!(matches!(
            parse(br#"{"object":"page","entry":[]}"#),
            Err(Unreadable::NotWhatsApp(_))
        ));
        assert!(matches!(
            parse(br#"{"object":"whatsapp_business_account"}"#),
            Err(Unreadable::NotWhatsApp(_))
        ));
        assert!(matches!(
            parse(br#"{"object":"whatsapp_business_account","entry":[]}"#),
            Err(Unreadable::NotWhatsApp(_))
        ));
    }

    #[test]
    fn equal_changes_share_a_key() {
        let a = parse(&envelope(json!({"errors": [{"code": 131000}]}))).unwrap();
        let b = parse(&envelope(json!({"errors": [{"code": 131000}]}))).unwrap();
        let c = parse(&envelope(json!({"errors": [{"code": 131001}]}))).unwrap();
        assert_eq!(a.items[0].dedupe_key, b.items[0].dedupe_key);
        assert_ne!(a.items[0].dedupe_key, c.items[0].dedupe_key);
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_any_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn never_panics_on_any_json_under_the_envelope(value in arb_json()) {
            let _ = parse(&envelope(value.clone()));
            let body = json!({"object": "whatsapp_business_account", "entry": value}).to_string();
            let _ = parse(body.as_bytes());
        }
    }

    fn arb_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "[a-z.]{0,6}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("id".to_string()),
                        Just("messages".to_string()),
                        Just("statuses".to_string()),
                        Just("changes".to_string()),
                        Just("field".to_string()),
                        Just("value".to_string()),
                        Just("type".to_string()),
                        Just("from".to_string()),
                        Just("text".to_string()),
                        "[a-z]{1,4}",
                    ],
                    inner,
                    0..5
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
