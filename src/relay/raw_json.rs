//! Reading JSON text as it was sent, without building a tree. Pure, never a panic.
//!
//! The relay keeps each webhook item as the exact text Meta sent (numbers beyond 2^64, `-0`,
//! escapes and all), and a 4 MB batch of 100,000 messages must not become a `serde_json::Value`
//! tree of the whole body. So the body is first checked whole by serde_json (UTF-8 and syntax,
//! nothing allocated: [`validate`]), and then read here as slices of that text: an object's
//! members ([`members`]), an array's elements ([`elements`]), a string's value
//! ([`string`], lenient: a lone surrogate becomes U+FFFD).
//!
//! The scanner trusts that the text was validated: on text that is not JSON it stops early
//! (returns fewer members, or `None`), it never panics and never loops.
//!
//! [`storable`] renders a value so PostgreSQL's `jsonb` accepts it: `jsonb` refuses `\u0000`
//! and lone surrogates, which JSON allows; they become `\ufffd` (the exact text is kept
//! elsewhere).

use std::borrow::Cow;

/// Checks that `body` is one UTF-8 JSON value (serde_json's syntax and depth limit), without
/// allocating; the error says what is wrong.
pub fn validate(body: &[u8]) -> Result<&str, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("not UTF-8: {e}"))?;
    serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|e| e.to_string())?;
    Ok(text)
}

/// One member of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member<'a> {
    /// The key as written, quotes included (e.g. `"messages"`).
    pub key: &'a str,
    /// The value as written.
    pub value: &'a str,
    /// The member as written: from the key's opening quote to the value's end.
    pub text: &'a str,
}

impl Member<'_> {
    /// Whether the key is `name` (escapes in the key decoded).
    pub fn is(&self, name: &str) -> bool {
        key_is(self.key, name)
    }
}

/// Whether a written key (quotes included) is `name`.
pub fn key_is(key: &str, name: &str) -> bool {
    match key.strip_prefix('"').and_then(|k| k.strip_suffix('"')) {
        Some(inner) if !inner.contains('\\') => inner == name,
        Some(_) => string(key).is_some_and(|k| k == name),
        None => false,
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// The end of the string starting at `i` (which is `"`), past its closing quote.
fn skip_string(b: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    while i < b.len() {
        match b[i] {
            b'"' => return Some(i + 1),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    None
}

/// The end of the value starting at `i`.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            // A number or a literal: up to the next delimiter.
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            {
                j += 1;
            }
            (j > i).then_some(j)
        }
    }
}

/// The members of the object `text` (surrounding whitespace allowed), in the order written,
/// duplicates included; `None` if `text` is not an object.
pub fn members(text: &str) -> Option<Vec<Member<'_>>> {
    let b = text.as_bytes();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    let mut out = Vec::new();
    if b.get(i) == Some(&b'}') {
        return Some(out);
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return Some(out);
        }
        let key_end = skip_string(b, i)?;
        let colon = skip_ws(b, key_end);
        if b.get(colon) != Some(&b':') {
            return Some(out);
        }
        let value_start = skip_ws(b, colon + 1);
        let value_end = skip_value(b, value_start)?;
        out.push(Member {
            key: text.get(i..key_end)?,
            value: text.get(value_start..value_end)?,
            text: text.get(i..value_end)?,
        });
        i = skip_ws(b, value_end);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            _ => return Some(out),
        }
    }
}

/// The last member named `name` (what most JSON readers see when a key repeats).
pub fn get<'a>(members: &[Member<'a>], name: &str) -> Option<&'a str> {
    members.iter().rev().find(|m| m.is(name)).map(|m| m.value)
}

/// The elements of the array `text`, as written; `None` if `text` is not an array.
pub fn elements(text: &str) -> Option<Vec<&str>> {
    let b = text.as_bytes();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'[') {
        return None;
    }
    i = skip_ws(b, i + 1);
    let mut out = Vec::new();
    if b.get(i) == Some(&b']') {
        return Some(out);
    }
    loop {
        let end = skip_value(b, i)?;
        out.push(text.get(i..end)?);
        i = skip_ws(b, end);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            _ => return Some(out),
        }
    }
}

/// Whether `text` is an object.
pub fn is_object(text: &str) -> bool {
    text.trim_start().starts_with('{')
}

/// The value of the JSON string `text` (quotes included), escapes decoded; a lone surrogate
/// becomes U+FFFD. `None` if `text` is not a string.
pub fn string(text: &str) -> Option<Cow<'_, str>> {
    let inner = text.trim().strip_prefix('"')?.strip_suffix('"')?;
    if !inner.contains('\\') {
        return Some(Cow::Borrowed(inner));
    }
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.char_indices();
    let hex = |at: usize| -> Option<u32> {
        let digits = inner.get(at..at + 4)?;
        u32::from_str_radix(digits, 16).ok()
    };
    while let Some((i, c)) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let (_, e) = chars.next()?;
        match e {
            '"' => out.push('"'),
            '\\' => out.push('\\'),
            '/' => out.push('/'),
            'b' => out.push('\u{8}'),
            'f' => out.push('\u{c}'),
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            't' => out.push('\t'),
            'u' => {
                let unit = hex(i + 2)?;
                for _ in 0..4 {
                    chars.next();
                }
                if (0xD800..0xDC00).contains(&unit) {
                    // A high surrogate: a low one must follow as `\uDC00`..`\uDFFF`.
                    let low = inner
                        .get(i + 6..i + 8)
                        .filter(|s| *s == "\\u")
                        .and_then(|_| hex(i + 8))
                        .filter(|l| (0xDC00..0xE000).contains(l));
                    match low {
                        Some(low) => {
                            for _ in 0..6 {
                                chars.next();
                            }
                            let c = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00);
                            out.push(char::from_u32(c).unwrap_or('\u{FFFD}'));
                        }
                        None => out.push('\u{FFFD}'),
                    }
                } else {
                    out.push(char::from_u32(unit).unwrap_or('\u{FFFD}'));
                }
            }
            _ => return None,
        }
    }
    Some(Cow::Owned(out))
}

/// `text` with every `\u0000` and lone surrogate escape replaced by `\ufffd`, which
/// PostgreSQL's `jsonb` accepts (it refuses those two, though JSON allows them). Valid JSON
/// in, valid JSON out; borrowed when there is nothing to replace.
pub fn storable(text: &str) -> Cow<'_, str> {
    if !text.contains("\\u") {
        return Cow::Borrowed(text);
    }
    let b = text.as_bytes();
    let unit_at = |i: usize| -> Option<u32> {
        if b.get(i) == Some(&b'\\') && b.get(i + 1) == Some(&b'u') {
            u32::from_str_radix(text.get(i + 2..i + 6)?, 16).ok()
        } else {
            None
        }
    };
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            i += 1;
            continue;
        }
        let Some(unit) = unit_at(i) else {
            // Any other escape is two bytes long.
            i += 2;
            continue;
        };
        let keep = match unit {
            0 => 0,
            0xD800..=0xDBFF => match unit_at(i + 6) {
                Some(0xDC00..=0xDFFF) => 12,
                _ => 0,
            },
            0xDC00..=0xDFFF => 0,
            _ => 6,
        };
        if keep > 0 {
            i += keep;
            continue;
        }
        let o = out.get_or_insert_with(|| String::with_capacity(text.len()));
        o.push_str(&text[copied..i]);
        o.push_str("\\ufffd");
        i += 6;
        copied = i;
    }
    match out {
        None => Cow::Borrowed(text),
        Some(mut o) => {
            o.push_str(&text[copied..]);
            Cow::Owned(o)
        }
    }
}

/// `s` without NUL characters (PostgreSQL's `text` cannot hold them): each becomes U+FFFD.
pub fn without_nul(s: Cow<'_, str>) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s.into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn members_and_elements_are_the_text_as_written() {
        let text = r#" { "a" : 1 , "b":[1, {"x": "]}"}] ,"c\u0041":-0, "big": 123456789012345678901234567890 } "#;
        let m = members(text).unwrap();
        let keys: Vec<&str> = m.iter().map(|m| m.key).collect();
        assert_eq!(keys, [r#""a""#, r#""b""#, r#""c\u0041""#, r#""big""#]);
        assert_eq!(m[0].text, r#""a" : 1"#);
        assert_eq!(m[1].value, r#"[1, {"x": "]}"}]"#);
        assert!(m[2].is("cA"));
        assert_eq!(get(&m, "cA"), Some("-0"));
        assert_eq!(get(&m, "big"), Some("123456789012345678901234567890"));
        assert_eq!(elements(m[1].value).unwrap(), ["1", r#"{"x": "]}"}"#]);
        assert_eq!(elements("[]").unwrap(), Vec::<&str>::new());
        assert_eq!(members("{}").unwrap(), vec![]);
        assert_eq!(members("[1]"), None);
        assert_eq!(elements("{}"), None);
    }

    #[test]
    fn strings_decode_leniently() {
        assert_eq!(string(r#""plain""#).as_deref(), Some("plain"));
        assert_eq!(
            string(r#""\u00bfs\u00ed? \/ \"q\" \ud83c\udf55""#).as_deref(),
            Some("¿sí? / \"q\" 🍕")
        );
        assert_eq!(string(r#""a\u0000b""#).as_deref(), Some("a\0b"));
        assert_eq!(
            string(r#""lone \ud800 high""#).as_deref(),
            Some("lone \u{FFFD} high")
        );
        assert_eq!(
            string(r#""lone \udc00 low""#).as_deref(),
            Some("lone \u{FFFD} low")
        );
        assert_eq!(string("12"), None);
    }

    #[test]
    fn storable_replaces_only_what_jsonb_refuses() {
        assert_eq!(storable(r#"{"a":"x"}"#), r#"{"a":"x"}"#);
        assert_eq!(
            storable(r#"{"k\u0000":"\u0000\\u0000\ud83c\udf55\ud800\udc00x\ud800"}"#),
            r#"{"k\ufffd":"\ufffd\\u0000\ud83c\udf55\ud800\udc00x\ufffd"}"#
        );
        assert_eq!(storable(r#""\udc00\u00e9""#), r#""\ufffd\u00e9""#);
    }

    fn arb_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            any::<String>().prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map(any::<String>(), inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// serde_json is the oracle: every member and element read here parses to what
        /// serde_json read, whatever the spacing.
        #[test]
        fn the_scanner_agrees_with_serde_json(value in arb_json(), pretty in proptest::prelude::any::<bool>()) {
            let text = if pretty { serde_json::to_string_pretty(&value).unwrap() } else { value.to_string() };
            // serde_json's own reading of the text (its float printing does not always round-trip).
            let value: Value = serde_json::from_str(&text).unwrap();
            match &value {
                Value::Object(map) => {
                    let m = members(&text).unwrap();
                    proptest::prop_assert_eq!(m.len(), map.len());
                    for member in m {
                        let key = string(member.key).unwrap();
                        let v: Value = serde_json::from_str(member.value).unwrap();
                        proptest::prop_assert_eq!(Some(&v), map.get(key.as_ref()));
                    }
                }
                Value::Array(list) => {
                    let e = elements(&text).unwrap();
                    proptest::prop_assert_eq!(e.len(), list.len());
                    for (raw, v) in e.iter().zip(list) {
                        proptest::prop_assert_eq!(&serde_json::from_str::<Value>(raw).unwrap(), v);
                    }
                }
                Value::String(s) => {
                    let decoded = string(&text).unwrap();
                    proptest::prop_assert_eq!(decoded.as_ref(), s.as_str());
                }
                _ => {}
            }
            // What storable renders is the same JSON when there was no NUL to replace.
            let rendered: Value = serde_json::from_str(&storable(&text)).unwrap();
            if !text.contains("\\u0000") {
                proptest::prop_assert_eq!(rendered, value);
            }
        }

        #[test]
        fn never_panics_on_any_text(text in ".{0,64}") {
            let _ = members(&text);
            let _ = elements(&text);
            let _ = string(&text);
            let _ = storable(&text);
        }
    }
}
