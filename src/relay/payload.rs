//! Meta's webhook envelope → inbox items. Pure: bytes in, values out, never a panic.
//!
//! ```text
//! object: "whatsapp_business_account"
//! entry[]: { id: WABA, time, changes[]: { field, value: { metadata, contacts[], messages[], statuses[], errors[] } } }
//! ```
//! Every message, status and coexistence echo (`smb_message_echoes`' `message_echoes[]`) becomes
//! one [`Item`] (Chatwoot's mistake of reading only `entry[0].changes[0]` is not repeated); a
//! change with no such list (another field, `history`, `smb_app_state_sync`, system `errors[]`
//! alone) is one item, kept whole. Unknown message types are items like any other.
//!
//! **Meta's text, kept.** Nothing is re-serialized: each item keeps the exact text Meta sent
//! (numbers beyond 2^64, `-0`, escapes), and its [`Item::envelope`] is Meta's envelope
//! narrowed to that one item: the same top-level object, the item's entry and change, and a
//! `value` whose list holds just the item and whose `contacts` hold just its sender (or
//! recipient); every other member (`entry[].time`, `metadata`, `errors`, unknown keys) exactly
//! as sent. So a message's `errors` travel with it, and a backend written for Meta's webhooks
//! reads a delivery as it reads Meta's.
//!
//! **Bounded memory.** [`Webhook::read`] checks the body whole without building a tree and
//! notes where each item is ([`Webhook`] holds the body and byte ranges); [`Webhook::items`]
//! then materializes the rows a few at a time, so a 4 MB batch of 100,000 messages never
//! exists as 100,000 rows at once.
//!
//! What cannot be read is reported, never dropped: a body that is not JSON or not a WhatsApp
//! envelope is [`Unreadable`] (the caller dead-letters it whole); a part that is malformed (a
//! message without an id) is listed in [`Webhook::problems`] while the rest is stored.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::ops::Range;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::raw_json::{self, Member};

/// What an item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `value.messages[]`: a customer wrote.
    Message,
    /// `value.statuses[]`: what happened to a message the business sent.
    Status,
    /// `smb_message_echoes`' `message_echoes[]`: staff wrote from the WhatsApp Business app.
    Echo,
    /// Any other change, kept whole.
    Change,
}

impl Kind {
    /// The inbox's `kind` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Message => "message",
            Kind::Status => "status",
            Kind::Echo => "echo",
            Kind::Change => "change",
        }
    }
}

/// A customer's identifier changed (a `user_changed_number` or `user_changed_user_id` system
/// message): the new ones belong to the same customer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityChange {
    /// The new phone number (wa_id).
    pub phone: Option<String>,
    /// The new business-scoped user id.
    pub user_id: Option<String>,
}

/// One row of the inbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// What it is.
    pub kind: Kind,
    /// Unique per item: the wamid; `wamid status` for a status; `echo wamid` for an echo;
    /// `change <sha256 of entry id, entry time, field and value as sent>` for a change.
    pub dedupe_key: String,
    /// The message's id, or for a status the id of our message it is about.
    pub wamid: Option<String>,
    /// `entry[].id`.
    pub waba_id: Option<String>,
    /// `changes[].field`.
    pub field: String,
    /// `value.metadata`, storable (see [`raw_json::storable`]).
    pub metadata: Option<String>,
    /// Delivery order key before aliases: phone (wa_id), else user id, else `change:<waba>`.
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
    /// Meta's `timestamp` (unix seconds), when it is a plausible time.
    pub sent_at: Option<i64>,
    /// The message, status, echo or change value, storable.
    pub item: String,
    /// The matching `contacts[]` entry, storable.
    pub contact: Option<String>,
    /// Meta's envelope narrowed to this item, exactly as sent otherwise.
    pub envelope: String,
    /// New identifiers this item announces.
    pub identity_change: Option<IdentityChange>,
    /// Never answered by the AI fallback, and why (system messages).
    pub no_ai: Option<&'static str>,
}

impl Item {
    /// Every identifier of the customer this item names (phones and user ids, new ones too).
    pub fn identifiers(&self) -> impl Iterator<Item = &str> {
        let change = self.identity_change.as_ref();
        [
            self.customer_phone.as_deref(),
            self.customer_user_id.as_deref(),
            change.and_then(|c| c.phone.as_deref()),
            change.and_then(|c| c.user_id.as_deref()),
        ]
        .into_iter()
        .flatten()
    }
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

type Span = Range<usize>;

/// One change of the body: the envelope around its value, and the value's members.
#[derive(Debug, Clone)]
struct Frame {
    /// Top-level object up to the `entry` array, the entry up to `changes`, the change up to
    /// `value`: each followed by `[` (the first two) when rebuilt.
    before: [Span; 3],
    /// The change after `value`, the entry after `changes`, the object after `entry`: each but
    /// the first preceded by `]`.
    after: [Span; 3],
    /// The value as sent.
    value: Span,
    /// The value's members: their text, and the text up to their value (a list's key part:
    /// the list itself may be megabytes, and is never copied whole).
    members: Vec<(Span, Span, Role)>,
    waba_id: Option<String>,
    field: String,
    metadata: Option<Span>,
}

/// A change holding several items whose envelope besides them is larger than this is kept
/// whole as one change: each item's envelope would repeat it (megabytes times thousands).
const FRAME_MAX: usize = 64 * 1024;
/// When no contact matches an item, the change's contacts go with it unless larger than this.
const MEMBER_MAX: usize = 4 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Keep,
    Contacts,
    List(Kind),
    Drop,
}

#[derive(Debug, Clone)]
struct Slot {
    kind: Kind,
    frame: u32,
    /// The item's text (the value itself for a change).
    item: Span,
    contact: Option<Span>,
}

/// A readable webhook: the body and where each item is in it.
#[derive(Debug, Clone)]
pub struct Webhook {
    body: Bytes,
    frames: Vec<Frame>,
    slots: Vec<Slot>,
    /// Parts that could not be read, e.g. `entry[0].changes[1].value.messages[2]: no "id"`.
    pub problems: Vec<String>,
    identifiers: Vec<String>,
}

/// Every item of a body at once (for small bodies and tests): [`Webhook::read`] then every
/// item.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Parsed {
    /// Every item, in payload order.
    pub items: Vec<Item>,
    /// Parts that could not be read.
    pub problems: Vec<String>,
}

/// Reads a webhook body and materializes every item.
pub fn parse(body: &[u8]) -> Result<Parsed, Unreadable> {
    let webhook = Webhook::read(Bytes::copy_from_slice(body))?;
    Ok(Parsed {
        items: webhook.items(0..webhook.len()).collect(),
        problems: webhook.problems,
    })
}

fn span_of(outer: &str, inner: &str) -> Span {
    let start = inner.as_ptr() as usize - outer.as_ptr() as usize;
    start..start + inner.len()
}

impl Webhook {
    /// Checks `body` and notes where every item is; nothing is copied but small strings.
    pub fn read(body: Bytes) -> Result<Webhook, Unreadable> {
        let text = raw_json::validate(&body).map_err(Unreadable::NotJson)?;
        let mut webhook = Webhook {
            body: body.clone(),
            frames: Vec::new(),
            slots: Vec::new(),
            problems: Vec::new(),
            identifiers: Vec::new(),
        };
        let mut ids = HashSet::new();
        index(text, &mut webhook, &mut ids)?;
        webhook.identifiers = ids.into_iter().collect();
        if webhook.slots.is_empty() && webhook.problems.is_empty() {
            return Err(Unreadable::NotWhatsApp("no changes in any entry".into()));
        }
        Ok(webhook)
    }

    /// The body as received.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// How many items.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there is no item.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Every distinct customer identifier (phone or user id) the items name, and the order
    /// key of items without one (`change:<waba>`, `unknown`): what storing them locks.
    pub fn identifiers(&self) -> &[String] {
        &self.identifiers
    }

    fn text(&self, span: &Span) -> &str {
        self.body
            .get(span.clone())
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or("")
    }

    /// The items in `range` (by position), materialized one at a time.
    pub fn items(&self, range: Range<usize>) -> impl Iterator<Item = Item> + '_ {
        let end = range.end.min(self.slots.len());
        self.slots[range.start.min(end)..end]
            .iter()
            .map(|slot| self.item(slot))
    }

    fn item(&self, slot: &Slot) -> Item {
        let frame = &self.frames[slot.frame as usize];
        let item_text = self.text(&slot.item);
        let envelope = self.envelope(frame, slot);
        let metadata = frame
            .metadata
            .as_ref()
            .map(|m| raw_json::storable(self.text(m)).into_owned());
        let contact_text = slot.contact.as_ref().map(|c| self.text(c));
        let mut item = match slot.kind {
            Kind::Change => whole_change(frame, item_text, self),
            kind => {
                let members = raw_json::members(item_text).unwrap_or_default();
                read_listed(kind, &members, contact_text)
            }
        };
        item.waba_id = frame.waba_id.clone();
        item.field = frame.field.clone();
        item.metadata = metadata;
        item.item = raw_json::storable(item_text).into_owned();
        item.contact = contact_text.map(|c| raw_json::storable(c).into_owned());
        item.envelope = envelope;
        item
    }

    /// Meta's envelope narrowed to the item of `slot`.
    fn envelope(&self, frame: &Frame, slot: &Slot) -> String {
        let mut out = String::with_capacity(256 + slot.item.len());
        out.push_str(self.text(&frame.before[0]));
        out.push('[');
        out.push_str(self.text(&frame.before[1]));
        out.push('[');
        out.push_str(self.text(&frame.before[2]));
        match slot.kind {
            Kind::Change => out.push_str(self.text(&frame.value)),
            kind => {
                out.push('{');
                let mut first = true;
                for (span, key, role) in &frame.members {
                    let piece = match role {
                        Role::Keep => Cow::Borrowed(self.text(span)),
                        Role::List(k) if *k == kind => {
                            Cow::Owned(format!("{}[{}]", self.text(key), self.text(&slot.item)))
                        }
                        Role::List(_) | Role::Drop => continue,
                        Role::Contacts => match &slot.contact {
                            Some(c) => Cow::Owned(format!("{}[{}]", self.text(key), self.text(c))),
                            // No contact matched: all of them, unless that is a lot to repeat.
                            None if span.len() > MEMBER_MAX => continue,
                            None => Cow::Borrowed(self.text(span)),
                        },
                    };
                    if !first {
                        out.push(',');
                    }
                    first = false;
                    out.push_str(&piece);
                }
                out.push('}');
            }
        }
        out.push_str(self.text(&frame.after[0]));
        out.push(']');
        out.push_str(self.text(&frame.after[1]));
        out.push(']');
        out.push_str(self.text(&frame.after[2]));
        out
    }
}

fn index(text: &str, w: &mut Webhook, ids: &mut HashSet<String>) -> Result<(), Unreadable> {
    let top_text = text.trim_matches(|c: char| c.is_ascii_whitespace());
    let Some(top) = raw_json::members(top_text) else {
        return Err(Unreadable::NotWhatsApp(
            "the body is not a JSON object".into(),
        ));
    };
    match raw_json::get(&top, "object").map(raw_json::string) {
        Some(Some(o)) if o == "whatsapp_business_account" => {}
        Some(Some(other)) => {
            return Err(Unreadable::NotWhatsApp(format!(
                "\"object\" is {other:?}, expected \"whatsapp_business_account\""
            )));
        }
        _ => return Err(Unreadable::NotWhatsApp("no \"object\" string".into())),
    }
    let Some(entries_text) = raw_json::get(&top, "entry") else {
        return Err(Unreadable::NotWhatsApp("no \"entry\" array".into()));
    };
    let Some(entries) = raw_json::elements(entries_text) else {
        return Err(Unreadable::NotWhatsApp("no \"entry\" array".into()));
    };
    let top_span = span_of(text, top_text);
    let entries_span = span_of(text, entries_text);
    for (e, entry_text) in entries.into_iter().enumerate() {
        let at = format!("entry[{e}]");
        let Some(entry) = raw_json::members(entry_text).filter(|_| raw_json::is_object(entry_text))
        else {
            w.problems.push(format!("{at}: not an object"));
            continue;
        };
        let waba_id = raw_json::get(&entry, "id").and_then(id_text);
        let changes_text = raw_json::get(&entry, "changes");
        let Some(changes) = changes_text.and_then(raw_json::elements) else {
            w.problems.push(format!("{at}: no \"changes\" array"));
            continue;
        };
        let entry_span = span_of(text, entry_text);
        let changes_span = span_of(text, changes_text.unwrap_or_default());
        for (c, change_text) in changes.into_iter().enumerate() {
            let at = format!("{at}.changes[{c}]");
            let Some(change) = raw_json::members(change_text) else {
                w.problems.push(format!("{at}: not an object"));
                continue;
            };
            let Some(field) = raw_json::get(&change, "field").and_then(raw_json::string) else {
                w.problems.push(format!("{at}: no \"field\" string"));
                continue;
            };
            let Some(value_text) =
                raw_json::get(&change, "value").filter(|v| raw_json::is_object(v))
            else {
                w.problems.push(format!("{at}: no \"value\" object"));
                continue;
            };
            let change_span = span_of(text, change_text);
            let value_span = span_of(text, value_text);
            let frame = Frame {
                before: [
                    top_span.start..entries_span.start,
                    entry_span.start..changes_span.start,
                    change_span.start..value_span.start,
                ],
                after: [
                    value_span.end..change_span.end,
                    changes_span.end..entry_span.end,
                    entries_span.end..top_span.end,
                ],
                value: value_span,
                members: Vec::new(),
                waba_id: waba_id.clone(),
                field: raw_json::without_nul(field),
                metadata: None,
            };
            read_change(text, value_text, frame, &at, w, ids);
        }
    }
    Ok(())
}

fn read_change(
    text: &str,
    value_text: &str,
    mut frame: Frame,
    at: &str,
    w: &mut Webhook,
    ids: &mut HashSet<String>,
) {
    let members = raw_json::members(value_text).unwrap_or_default();
    frame.metadata = raw_json::get(&members, "metadata").map(|m| span_of(text, m));
    // Which lists hold items: messages and statuses of `messages`, echoes of
    // `smb_message_echoes`; the last member of a name is the one read (as JSON readers do).
    let lists: &[(&str, Kind)] = match frame.field.as_str() {
        "messages" => &[("messages", Kind::Message), ("statuses", Kind::Status)],
        "smb_message_echoes" => &[("message_echoes", Kind::Echo)],
        _ => &[],
    };
    let role_of = |i: usize, m: &Member<'_>| {
        let last = |name: &str| members.iter().rposition(|m| m.is(name)) == Some(i);
        match lists.iter().find(|(name, _)| m.is(name)) {
            // An earlier duplicate of a list is not what JSON readers see: not delivered.
            Some((name, kind)) if last(name) => Role::List(*kind),
            Some(_) => Role::Drop,
            None if !lists.is_empty() && m.is("contacts") && last("contacts") => Role::Contacts,
            None => Role::Keep,
        }
    };
    frame.members = members
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let span = span_of(text, m.text);
            let key = span.start..span.end - m.value.len();
            (span, key, role_of(i, m))
        })
        .collect();
    let contacts: Vec<&str> = raw_json::get(&members, "contacts")
        .filter(|_| !lists.is_empty())
        .and_then(raw_json::elements)
        .unwrap_or_default();
    let frame_no = w.frames.len() as u32;
    let mut listed = 0usize;
    let mut problems = 0usize;
    let mut finder: Option<ContactFinder<'_>> = None;
    for (name, kind) in lists {
        let Some(list) = raw_json::get(&members, name).and_then(raw_json::elements) else {
            continue;
        };
        for (i, item_text) in list.into_iter().enumerate() {
            let item = raw_json::members(item_text).filter(|_| raw_json::is_object(item_text));
            let checked = item
                .as_deref()
                .ok_or_else(|| "not an object".to_string())
                .and_then(|m| required(*kind, m));
            let (phone, user_id) = match checked {
                Ok(who) => who,
                Err(why) => {
                    w.problems.push(format!("{at}.value.{name}[{i}]: {why}"));
                    problems += 1;
                    continue;
                }
            };
            let finder = finder.get_or_insert_with(|| ContactFinder::new(&contacts));
            let contact = finder
                .find(phone.as_deref(), user_id.as_deref())
                .map(|c| span_of(text, c));
            let contact_user = contact
                .as_ref()
                .and_then(|c| text.get(c.clone()))
                .and_then(raw_json::members)
                .and_then(|m| raw_json::get(&m, "user_id").and_then(id_text));
            let members = item.unwrap_or_default();
            if phone.is_none() && user_id.is_none() && contact_user.is_none() {
                ids.insert("unknown".to_owned());
            }
            for id in [phone, user_id.or(contact_user)]
                .into_iter()
                .flatten()
                .chain(
                    identity_change(&members)
                        .into_iter()
                        .flat_map(|c| [c.phone, c.user_id])
                        .flatten(),
                )
            {
                ids.insert(id);
            }
            w.slots.push(Slot {
                kind: *kind,
                frame: frame_no,
                item: span_of(text, item_text),
                contact,
            });
            listed += 1;
        }
    }
    let repeated: usize = frame
        .members
        .iter()
        .filter(|(_, _, role)| *role == Role::Keep)
        .map(|(span, _, _)| span.len())
        .sum::<usize>()
        + frame
            .before
            .iter()
            .chain(&frame.after)
            .map(|s| s.len())
            .sum::<usize>();
    let whole = listed > 1 && repeated > FRAME_MAX;
    if whole {
        w.slots.truncate(w.slots.len() - listed);
        w.problems.push(format!(
            "{at}: {repeated} bytes besides its {listed} items, too many to repeat with each: kept as one change"
        ));
    }
    if whole || (listed == 0 && problems == 0) {
        ids.insert(format!("change:{}", frame.waba_id.as_deref().unwrap_or("")));
        w.slots.push(Slot {
            kind: Kind::Change,
            frame: frame_no,
            item: frame.value.clone(),
            contact: None,
        });
    }
    w.frames.push(frame);
}

/// Checks what an item of `kind` cannot be stored without; returns its phone and user id.
fn required(kind: Kind, m: &[Member<'_>]) -> Result<(Option<String>, Option<String>), String> {
    let nonempty = |name: &str| {
        raw_json::get(m, name)
            .and_then(raw_json::string)
            .filter(|s| !s.is_empty())
    };
    nonempty("id").ok_or("no \"id\" string")?;
    let (phone, user) = who(kind, m);
    if kind == Kind::Status {
        nonempty("status").ok_or("no \"status\" string")?;
    }
    Ok((phone, user))
}

/// The customer an item is from or to: (phone, user id).
fn who(kind: Kind, m: &[Member<'_>]) -> (Option<String>, Option<String>) {
    let (phone, user) = match kind {
        Kind::Message => ("from", &["from_user_id", "user_id"][..]),
        Kind::Status => ("recipient_id", &["recipient_user_id"][..]),
        Kind::Echo => ("to", &["to_user_id"][..]),
        Kind::Change => return (None, None),
    };
    (
        raw_json::get(m, phone).and_then(id_text),
        user.iter()
            .find_map(|k| raw_json::get(m, k).and_then(id_text)),
    )
}

/// Finds the contact of an item: by wa_id, else by user id, else the only one.
struct ContactFinder<'a> {
    contacts: &'a [&'a str],
    by_id: HashMap<String, usize>,
}

impl<'a> ContactFinder<'a> {
    fn new(contacts: &'a [&'a str]) -> ContactFinder<'a> {
        let mut by_id = HashMap::new();
        // Indexed only when there are several: the common case has one.
        if contacts.len() > 1 {
            for (i, c) in contacts.iter().enumerate() {
                let m = raw_json::members(c).unwrap_or_default();
                for key in ["user_id", "wa_id"] {
                    if let Some(id) = raw_json::get(&m, key).and_then(id_text) {
                        by_id.entry(format!("{key} {id}")).or_insert(i);
                    }
                }
            }
        }
        ContactFinder { contacts, by_id }
    }

    fn find(&self, phone: Option<&str>, user_id: Option<&str>) -> Option<&'a str> {
        match self.contacts {
            [] => None,
            [only] => {
                let m = raw_json::members(only).unwrap_or_default();
                let of = |key: &str| raw_json::get(&m, key).and_then(id_text);
                let matches = |want: Option<&str>, key: &str| {
                    want.is_some_and(|w| of(key).as_deref() == Some(w))
                };
                let unrelated = (phone.is_some() || user_id.is_some())
                    && (of("wa_id").is_some() || of("user_id").is_some())
                    && !matches(phone, "wa_id")
                    && !matches(user_id, "user_id");
                (!unrelated).then_some(*only)
            }
            _ => {
                let at = |key: &str, want: Option<&str>| {
                    want.and_then(|w| self.by_id.get(&format!("{key} {w}")))
                };
                at("wa_id", phone)
                    .or_else(|| at("user_id", user_id))
                    .map(|&i| self.contacts[i])
            }
        }
    }
}

fn whole_change(frame: &Frame, value_text: &str, w: &Webhook) -> Item {
    let mut hash = Sha256::new();
    // What makes two updates different: the account, the entry's time, the field and the
    // value, as sent. A retry repeats all four; APPROVED, PAUSED, APPROVED differ in time.
    hash.update(frame.waba_id.as_deref().unwrap_or("").as_bytes());
    hash.update([0]);
    let entry = w.text(&(frame.before[1].start..frame.after[1].end));
    let time = raw_json::members(entry).and_then(|m| raw_json::get(&m, "time").map(str::to_owned));
    hash.update(time.as_deref().unwrap_or("").as_bytes());
    hash.update([0]);
    hash.update(frame.field.as_bytes());
    hash.update([0]);
    hash.update(value_text.as_bytes());
    Item {
        kind: Kind::Change,
        dedupe_key: format!("change {}", hex::encode(hash.finalize())),
        wamid: None,
        waba_id: None,
        field: String::new(),
        metadata: None,
        customer: format!("change:{}", frame.waba_id.as_deref().unwrap_or("")),
        customer_phone: None,
        customer_user_id: None,
        customer_name: None,
        item_type: Some(frame.field.clone()),
        body: None,
        sent_at: None,
        item: String::new(),
        contact: None,
        envelope: String::new(),
        identity_change: None,
        no_ai: None,
    }
}

/// A message, status or echo, with its contact's text.
fn read_listed(kind: Kind, m: &[Member<'_>], contact: Option<&str>) -> Item {
    let text_of = |name: &str| {
        raw_json::get(m, name)
            .and_then(raw_json::string)
            .map(raw_json::without_nul)
    };
    let id = text_of("id").unwrap_or_default();
    let (phone, user_id) = who(kind, m);
    let contact = contact.and_then(raw_json::members).unwrap_or_default();
    let user_id = user_id.or_else(|| raw_json::get(&contact, "user_id").and_then(id_text));
    let customer_name = raw_json::get(&contact, "profile")
        .and_then(raw_json::members)
        .and_then(|p| raw_json::get(&p, "name").and_then(raw_json::string))
        .map(raw_json::without_nul);
    let (dedupe_key, item_type) = match kind {
        Kind::Status => {
            let state = text_of("status").unwrap_or_default();
            (format!("{id} {state}"), Some(state))
        }
        Kind::Echo => (format!("echo {id}"), text_of("type")),
        _ => (id.clone(), text_of("type")),
    };
    let body = match kind {
        Kind::Message | Kind::Echo => readable_text(m, item_type.as_deref()),
        _ => None,
    };
    let identity_change = (kind == Kind::Message)
        .then(|| identity_change(m))
        .flatten();
    let no_ai = (kind == Kind::Message && item_type.as_deref() == Some("system"))
        .then_some("system message");
    Item {
        kind,
        dedupe_key,
        wamid: Some(id),
        waba_id: None,
        field: String::new(),
        metadata: None,
        customer: phone
            .clone()
            .or_else(|| user_id.clone())
            .unwrap_or_else(|| "unknown".to_owned()),
        customer_phone: phone,
        customer_user_id: user_id,
        customer_name,
        item_type,
        body,
        sent_at: raw_json::get(m, "timestamp").and_then(unix_seconds),
        item: String::new(),
        contact: None,
        envelope: String::new(),
        identity_change,
        no_ai,
    }
}

/// The new identifiers of a `user_changed_number` / `user_changed_user_id` system message
/// (`system.wa_id`, or `new_wa_id` in older versions; `system.user_id` or `new_user_id`).
fn identity_change(m: &[Member<'_>]) -> Option<IdentityChange> {
    let is_system = raw_json::get(m, "type")
        .and_then(raw_json::string)
        .is_some_and(|t| t == "system");
    if !is_system {
        return None;
    }
    let system = raw_json::get(m, "system").and_then(raw_json::members)?;
    let kind = raw_json::get(&system, "type").and_then(raw_json::string)?;
    if !matches!(
        kind.as_ref(),
        "user_changed_number" | "customer_changed_number" | "user_changed_user_id"
    ) {
        return None;
    }
    let of = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| raw_json::get(&system, k).and_then(id_text))
    };
    let change = IdentityChange {
        phone: of(&["wa_id", "new_wa_id"]),
        user_id: of(&["user_id", "new_user_id"]),
    };
    (change.phone.is_some() || change.user_id.is_some()).then_some(change)
}

/// An id Meta sends as a string (sometimes a number in test payloads).
fn id_text(v: &str) -> Option<String> {
    let v = v.trim();
    if v.starts_with('"') {
        raw_json::string(v)
            .filter(|s| !s.is_empty())
            .map(raw_json::without_nul)
    } else if v.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        Some(v.to_owned())
    } else {
        None
    }
}

/// Meta's `timestamp`: unix seconds as a string (or a number), when it is a time PostgreSQL
/// can hold (year 1970 to 9999).
fn unix_seconds(v: &str) -> Option<i64> {
    let text = match raw_json::string(v) {
        Some(s) => s.into_owned(),
        None => v.to_owned(),
    };
    text.trim()
        .parse::<i64>()
        .ok()
        .filter(|s| (0..=253_402_300_799).contains(s))
}

/// What a person would read in a message of this type, if anything.
fn readable_text(m: &[Member<'_>], item_type: Option<&str>) -> Option<String> {
    let item_type = item_type?;
    let object = raw_json::get(m, item_type).and_then(raw_json::members);
    let at = |path: &[&str]| -> Option<String> {
        let mut members = object.clone()?;
        let (last, inner) = path.split_last()?;
        for step in inner {
            members = raw_json::get(&members, step).and_then(raw_json::members)?;
        }
        raw_json::get(&members, last)
            .and_then(raw_json::string)
            .map(raw_json::without_nul)
    };
    match item_type {
        "text" => at(&["body"]),
        "button" => at(&["text"]),
        "interactive" => at(&["button_reply", "title"]).or_else(|| at(&["list_reply", "title"])),
        "image" | "video" | "document" => at(&["caption"]),
        "reaction" => at(&["emoji"]),
        "location" => {
            let parts: Vec<String> = [at(&["name"]), at(&["address"])]
                .into_iter()
                .flatten()
                .collect();
            (!parts.is_empty()).then(|| parts.join(", "))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    pub(crate) const SAMPLE_TEXT: &str = include_str!("../../tests/payloads/text.json");

    fn json_of(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

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
            json_of(item.metadata.as_ref().unwrap())["phone_number_id"],
            "106540352242922"
        );
        // One message: the envelope is Meta's body, the same JSON.
        assert_eq!(json_of(&item.envelope), json_of(SAMPLE_TEXT));
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
        // Luis's delivery holds Luis's message and contact only.
        let luis = json_of(&parsed.items[1].envelope);
        let value = &luis["entry"][0]["changes"][0]["value"];
        assert_eq!(
            value["contacts"],
            json!([{"wa_id": "34600000002", "profile": {"name": "Luis"}}])
        );
        assert_eq!(value["messages"].as_array().unwrap().len(), 1);
        assert_eq!(value["messages"][0]["id"], "wamid.b");
        assert_eq!(luis["entry"].as_array().unwrap().len(), 1);
        assert_eq!(luis["entry"][0]["changes"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn the_envelope_keeps_every_other_field_and_the_items_text_exactly() {
        let body = r#"{"object":"whatsapp_business_account","x_unknown":{"n":-0},"entry":[
            {"id":"9","time":1749416383,"changes":[{"field":"messages","value":{
              "messaging_product":"whatsapp","metadata":{"phone_number_id":"1"},
              "contacts":[{"wa_id":"5","profile":{"name":"Bo"}}],
              "statuses":[{"id":"wamid.s1","status":"read","timestamp":"1","recipient_id":"5","n":123456789012345678901234567890},
                          {"id":"wamid.s2","status":"sent","timestamp":"1","recipient_id":"5","z":1.0e+400}],
              "errors":[{"code":131000}]}}]},
            {"id":"8","changes":[{"field":"account_update","value":{"event":"X"}}]}]}"#;
        let parsed = parse(body.as_bytes()).unwrap();
        assert_eq!(parsed.items.len(), 3);
        let first = &parsed.items[0].envelope;
        assert!(
            first.contains(r#""n":123456789012345678901234567890"#),
            "{first}"
        );
        assert!(first.contains(r#""x_unknown":{"n":-0}"#), "{first}");
        assert!(first.contains(r#""time":1749416383"#), "{first}");
        assert!(!first.contains("wamid.s2"), "{first}");
        assert!(parsed.items[1].envelope.contains("1.0e+400"));
        let v = json_of(first);
        let value = &v["entry"][0]["changes"][0]["value"];
        assert_eq!(
            value["contacts"][0]["profile"]["name"], "Bo",
            "contacts stay with statuses"
        );
        assert_eq!(
            value["errors"][0]["code"], 131000,
            "errors travel with the item"
        );
        assert_eq!(value["metadata"]["phone_number_id"], "1");
        assert_eq!(v["entry"][0]["id"], "9");
        let change = json_of(&parsed.items[2].envelope);
        assert_eq!(
            change["entry"][0]["changes"][0]["value"],
            json!({"event": "X"})
        );
        assert_eq!(change["entry"][0]["id"], "8");
    }

    #[test]
    fn a_message_with_errors_is_one_item_carrying_them() {
        let parsed = parse(&envelope(json!({
            "messages": [{"from": "1", "id": "wamid.e", "timestamp": "1", "type": "unsupported",
                          "errors": [{"code": 131051}]}],
            "errors": [{"code": 131000, "title": "x"}]})))
        .unwrap();
        assert_eq!(parsed.items.len(), 1, "{:?}", parsed.items);
        let v = json_of(&parsed.items[0].envelope);
        assert_eq!(
            v["entry"][0]["changes"][0]["value"]["errors"][0]["code"],
            131000
        );
        // Errors alone (or with empty lists) are one change.
        let parsed = parse(&envelope(json!({"messages": [], "errors": [{"code": 1}]}))).unwrap();
        assert_eq!(parsed.items.len(), 1);
        assert_eq!(parsed.items[0].kind, Kind::Change);
    }

    #[test]
    fn unknown_types_are_kept_as_sent() {
        let parsed = parse(&envelope(json!({"messages": [
            {"from": "1", "id": "wamid.u", "timestamp": "1", "type": "hologram", "hologram": {"x": 1}}]})))
        .unwrap();
        assert_eq!(parsed.items[0].item_type.as_deref(), Some("hologram"));
        assert_eq!(json_of(&parsed.items[0].item)["hologram"]["x"], 1);
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
    fn identity_changes_name_the_new_identifiers_and_never_get_ai() {
        let parsed = parse(&envelope(json!({"messages": [
            {"from": "972987654321", "id": "wamid.n", "timestamp": "1", "type": "system",
             "system": {"body": "User A changed from 972987654321 to 972912345678", "wa_id": "972912345678", "type": "user_changed_number"}},
            {"from": "972912345678", "from_user_id": "US.1", "id": "wamid.u", "timestamp": "2", "type": "system",
             "system": {"body": "x", "user_id": "US.2", "type": "user_changed_user_id"}}]})))
        .unwrap();
        let [number, user] = parsed.items.as_slice() else {
            panic!()
        };
        assert_eq!(
            number.identity_change,
            Some(IdentityChange {
                phone: Some("972912345678".into()),
                user_id: None
            })
        );
        assert_eq!(number.no_ai, Some("system message"));
        assert_eq!(
            user.identity_change.as_ref().unwrap().user_id.as_deref(),
            Some("US.2")
        );
        let ids: Vec<&str> = user.identifiers().collect();
        assert_eq!(ids, ["972912345678", "US.1", "US.2"]);
    }

    #[test]
    fn echoes_are_items_of_the_customer_they_went_to() {
        let body = json!({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [
            {"field": "smb_message_echoes", "value": {"messaging_product": "whatsapp",
              "metadata": {"phone_number_id": "1"},
              "message_echoes": [
                {"from": "15550001", "to": "34600000001", "id": "wamid.e1", "timestamp": "5", "type": "text", "text": {"body": "ya va"}},
                {"from": "15550001", "to": "34600000002", "id": "wamid.e2", "timestamp": "6", "type": "text", "text": {"body": "ok"}}]}},
            {"field": "history", "value": {"history": [{"threads": [{"id": "34600000001", "messages": [
                {"from": "34600000001", "id": "wamid.h", "timestamp": "1", "type": "text", "text": {"body": "old"}}]}]}]}},
            {"field": "smb_app_state_sync", "value": {"state_sync": [{"type": "contact", "action": "add"}]}}]}]});
        let parsed = parse(body.to_string().as_bytes()).unwrap();
        let kinds: Vec<Kind> = parsed.items.iter().map(|i| i.kind).collect();
        assert_eq!(kinds, [Kind::Echo, Kind::Echo, Kind::Change, Kind::Change]);
        assert_eq!(parsed.items[0].dedupe_key, "echo wamid.e1");
        assert_eq!(parsed.items[1].customer, "34600000002");
        assert_eq!(parsed.items[1].body.as_deref(), Some("ok"));
        assert_eq!(parsed.items[2].item_type.as_deref(), Some("history"));
        let echo = json_of(&parsed.items[0].envelope);
        assert_eq!(
            echo["entry"][0]["changes"][0]["value"]["message_echoes"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
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
        assert!(matches!(parse(b"\xff{}"), Err(Unreadable::NotJson(_))));
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
    fn equal_changes_share_a_key_and_repeated_state_changes_do_not() {
        let a = parse(&envelope(json!({"errors": [{"code": 131000}]}))).unwrap();
        let b = parse(&envelope(json!({"errors": [{"code": 131000}]}))).unwrap();
        let c = parse(&envelope(json!({"errors": [{"code": 131001}]}))).unwrap();
        assert_eq!(a.items[0].dedupe_key, b.items[0].dedupe_key);
        assert_ne!(a.items[0].dedupe_key, c.items[0].dedupe_key);
        let template = |time: i64, event: &str| {
            let body = json!({"object": "whatsapp_business_account", "entry": [{"id": "7", "time": time, "changes": [
                {"field": "message_template_status_update", "value": {"event": event, "message_template_id": 1}}]}]});
            parse(body.to_string().as_bytes()).unwrap().items[0]
                .dedupe_key
                .clone()
        };
        assert_ne!(template(100, "APPROVED"), template(300, "APPROVED"));
        assert_eq!(template(100, "APPROVED"), template(100, "APPROVED"));
    }

    #[test]
    fn nul_and_lone_surrogates_are_kept_exactly_and_stored_safely() {
        let body = r#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"field":"messages","value":{
            "contacts":[{"wa_id":"5","profile":{"name":"A\u0000B"}}],
            "messages":[{"from":"5","id":"wamid.\u0000","timestamp":"1","type":"text","text":{"body":"x\u0000y\ud800"},"k\u0000":1}]}}]}]}"#;
        let item = parse(body.as_bytes()).unwrap().items.remove(0);
        assert!(
            item.envelope
                .contains(r#""body":"x\u0000y\ud800"},"k\u0000":1"#)
        );
        assert!(!item.item.contains("\\u0000") && !item.item.contains("\\ud800"));
        assert_eq!(item.body.as_deref(), Some("x\u{FFFD}y\u{FFFD}"));
        assert_eq!(item.customer_name.as_deref(), Some("A\u{FFFD}B"));
        assert!(!item.dedupe_key.contains('\0'));
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

        /// Whatever the value, every item's envelope is JSON, holds the item's text exactly,
        /// and the items together are every message and status of the body.
        #[test]
        fn every_envelope_is_json_holding_its_item(value in arb_json()) {
            let body = envelope(value);
            if let Ok(parsed) = parse(&body) {
                for item in &parsed.items {
                    let v: Value = serde_json::from_str(&item.envelope).unwrap();
                    proptest::prop_assert_eq!(&v["object"], "whatsapp_business_account");
                }
            }
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
                        Just("contacts".to_string()),
                        Just("changes".to_string()),
                        Just("field".to_string()),
                        Just("value".to_string()),
                        Just("type".to_string()),
                        Just("from".to_string()),
                        Just("status".to_string()),
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
