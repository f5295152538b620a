//! PostgreSQL identifiers: quoting and parsing of table names and table patterns.
//!
//! Every identifier that reaches SQL text goes through [`quote`]: a table named `select` or
//! `Order Items` must work, and a crafted name must never become SQL. Parsing follows
//! PostgreSQL's own rules: unquoted names fold to lower case, quoted names keep their case and
//! may contain dots, spaces and doubled quotes.

use std::fmt;

/// Quotes an identifier for SQL text, always (quoting is never wrong, and always quoting means
/// keywords and mixed case need no special cases).
pub fn quote(ident: &str) -> String {
    let mut out = String::with_capacity(ident.len() + 2);
    out.push('"');
    for c in ident.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Quotes a string literal for SQL text (standard_conforming_strings on, the default since 9.1).
pub fn literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' {
            out.push('\'');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// A schema-qualified table (or type, or sequence) name, stored unquoted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct QualifiedName {
    /// The schema, as stored in the catalog.
    pub schema: String,
    /// The object's name, as stored in the catalog.
    pub name: String,
}

impl QualifiedName {
    /// Builds a name from catalog strings.
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// Schemas and names of `names` as two lists, the query parameters of
    /// `unnest($1::text[], $2::text[]) AS t(schema, name)`, the way catalog queries take a list
    /// of tables.
    pub fn split(names: &[QualifiedName]) -> (Vec<&str>, Vec<&str>) {
        names
            .iter()
            .map(|n| (n.schema.as_str(), n.name.as_str()))
            .unzip()
    }

    /// The name as SQL text: `"schema"."name"`.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote(&self.schema), quote(&self.name))
    }
}

impl fmt::Display for QualifiedName {
    /// Shows the name the way a user would type it: `orders`, `sales.orders`, `"Order Items"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.schema != "public" {
            write!(f, "{}.", display_part(&self.schema))?;
        }
        write!(f, "{}", display_part(&self.name))
    }
}

/// Shows one identifier part unquoted when PostgreSQL would read it back unchanged.
fn display_part(part: &str) -> String {
    let plain = !part.is_empty()
        && part
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && part
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
    if plain { part.to_string() } else { quote(part) }
}

/// What a `--tables` / `--exclude` entry asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TablePattern {
    /// One table; `schema` is `None` when the user did not qualify it.
    Table {
        /// The schema, if given.
        schema: Option<String>,
        /// The table name.
        name: String,
    },
    /// Every table of a schema: `schema.*`.
    Schema(String),
}

impl fmt::Display for TablePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TablePattern::Table {
                schema: Some(s),
                name,
            } => write!(f, "{}.{}", display_part(s), display_part(name)),
            TablePattern::Table { schema: None, name } => write!(f, "{}", display_part(name)),
            TablePattern::Schema(s) => write!(f, "{}.*", display_part(s)),
        }
    }
}

/// Why a table name or pattern could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentError {
    /// Nothing between separators.
    #[error("empty table name in {0:?}")]
    Empty(String),
    /// A `"` without its closing partner.
    #[error("unterminated quoted identifier in {0:?}")]
    Unterminated(String),
    /// A list with nothing in it: `--tables ''`, usually an unset shell variable.
    #[error(
        "the list is empty (an unset shell variable?): name the tables, e.g. customers,orders, or leave the option out"
    )]
    EmptyList,
    /// A list with an empty item: `a,,b`, `a,`.
    #[error("item {position} of {list:?} is empty: remove the extra comma")]
    EmptyItem {
        /// The list as given.
        list: String,
        /// Which item, from 1.
        position: usize,
    },
    /// More than `schema.table`.
    #[error("too many dots in {0:?}: expected table, schema.table or schema.*")]
    TooManyParts(String),
    /// Stray characters after a quoted part, or `*` in the wrong place.
    #[error(
        "cannot read {0:?} as a table name: expected table, schema.table, \"Quoted Name\" or schema.*"
    )]
    Malformed(String),
}

/// Splits a comma-separated list of table patterns, respecting quotes:
/// `customers, sales."Order Items", archive.*`. An empty list or item is an error, never
/// "every table": `--tables "$TABLES"` with the variable unset must not sync a whole database.
pub fn parse_pattern_list(list: &str) -> Result<Vec<TablePattern>, IdentError> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut in_quotes = false;
    for c in list.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                current.push(c);
            }
            ',' if !in_quotes => {
                items.push(std::mem::take(&mut current));
            }
            _ => current.push(c),
        }
    }
    if in_quotes {
        return Err(IdentError::Unterminated(list.to_string()));
    }
    items.push(current);
    if items.iter().all(|s| s.trim().is_empty()) && items.len() == 1 {
        return Err(IdentError::EmptyList);
    }
    items
        .iter()
        .enumerate()
        .map(|(i, s)| match s.trim() {
            "" => Err(IdentError::EmptyItem {
                list: list.to_string(),
                position: i + 1,
            }),
            item => parse_pattern(item),
        })
        .collect()
}

/// Parses one table pattern: `orders`, `Orders` (folds to `orders`), `"Order Items"`,
/// `sales.orders`, `"my schema"."my.table"`, `sales.*`.
pub fn parse_pattern(text: &str) -> Result<TablePattern, IdentError> {
    let text = text.trim();
    let mut parts: Vec<(String, bool)> = Vec::new(); // (value, was it `*`)
    let mut chars = text.chars().peekable();
    loop {
        // one part
        let mut part = String::new();
        let mut star = false;
        match chars.peek() {
            None => return Err(IdentError::Empty(text.to_string())),
            Some('"') => {
                chars.next();
                loop {
                    match chars.next() {
                        None => return Err(IdentError::Unterminated(text.to_string())),
                        Some('"') => {
                            if chars.peek() == Some(&'"') {
                                chars.next();
                                part.push('"');
                            } else {
                                break;
                            }
                        }
                        Some(c) => part.push(c),
                    }
                }
                if part.is_empty() {
                    return Err(IdentError::Empty(text.to_string()));
                }
            }
            Some('*') => {
                chars.next();
                star = true;
            }
            Some(_) => {
                while let Some(&c) = chars.peek() {
                    if c == '.' {
                        break;
                    }
                    if c == '"' || c == '*' {
                        return Err(IdentError::Malformed(text.to_string()));
                    }
                    part.push(c);
                    chars.next();
                }
                let trimmed = part.trim();
                if trimmed.is_empty() {
                    return Err(IdentError::Empty(text.to_string()));
                }
                if trimmed.chars().any(char::is_whitespace) {
                    return Err(IdentError::Malformed(text.to_string()));
                }
                part = trimmed.to_lowercase();
            }
        }
        parts.push((part, star));
        match chars.next() {
            None => break,
            Some('.') => continue,
            Some(_) => return Err(IdentError::Malformed(text.to_string())),
        }
    }
    match parts.as_slice() {
        [(name, false)] => Ok(TablePattern::Table {
            schema: None,
            name: name.clone(),
        }),
        [(schema, false), (_, true)] => Ok(TablePattern::Schema(schema.clone())),
        [(schema, false), (name, false)] => Ok(TablePattern::Table {
            schema: Some(schema.clone()),
            name: name.clone(),
        }),
        [_, _] | [_] => Err(IdentError::Malformed(text.to_string())),
        _ => Err(IdentError::TooManyParts(text.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(schema: Option<&str>, name: &str) -> TablePattern {
        TablePattern::Table {
            schema: schema.map(str::to_string),
            name: name.to_string(),
        }
    }

    #[test]
    fn quotes_everything_and_doubles_quotes() {
        assert_eq!(quote("select"), "\"select\"");
        assert_eq!(quote("Order Items"), "\"Order Items\"");
        assert_eq!(quote("a\"b"), "\"a\"\"b\"");
        assert_eq!(literal("it's"), "'it''s'");
    }

    #[test]
    fn parses_plain_qualified_quoted_and_schema_patterns() {
        assert_eq!(
            parse_pattern("Customers").unwrap(),
            table(None, "customers")
        );
        assert_eq!(
            parse_pattern("sales.orders").unwrap(),
            table(Some("sales"), "orders")
        );
        assert_eq!(
            parse_pattern("\"Order Items\"").unwrap(),
            table(None, "Order Items")
        );
        assert_eq!(
            parse_pattern("\"my schema\".\"a.b\"\"c\"").unwrap(),
            table(Some("my schema"), "a.b\"c")
        );
        assert_eq!(
            parse_pattern("archive.*").unwrap(),
            TablePattern::Schema("archive".into())
        );
    }

    #[test]
    fn rejects_malformed_patterns() {
        for bad in [
            "", "a.b.c", "\"open", "a..b", "*", "*.x", "a b", "a\"b\"", "\"\"",
        ] {
            assert!(parse_pattern(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn splits_lists_outside_quotes() {
        let list = parse_pattern_list("customers, \"Order, Items\" ,sales.*").unwrap();
        assert_eq!(
            list,
            vec![
                table(None, "customers"),
                table(None, "Order, Items"),
                TablePattern::Schema("sales".into())
            ]
        );
    }

    #[test]
    fn empty_lists_and_items_are_errors_not_every_table() {
        // `--tables "$TABLES"` with the variable unset, or `"$A,$B"` with one of them unset.
        for empty in ["", "  "] {
            assert_eq!(parse_pattern_list(empty), Err(IdentError::EmptyList));
        }
        for (list, position) in [(",", 1), ("a,,b", 2), ("a,", 2), (" , a", 1)] {
            assert_eq!(
                parse_pattern_list(list),
                Err(IdentError::EmptyItem {
                    list: list.to_string(),
                    position
                }),
                "{list:?}"
            );
        }
        assert_eq!(
            parse_pattern_list("a,,b").unwrap_err().to_string(),
            "item 2 of \"a,,b\" is empty: remove the extra comma"
        );
    }

    #[test]
    fn displays_names_as_typed() {
        assert_eq!(QualifiedName::new("public", "orders").to_string(), "orders");
        assert_eq!(
            QualifiedName::new("public", "Order Items").to_string(),
            "\"Order Items\""
        );
        assert_eq!(
            QualifiedName::new("sales", "select").to_string(),
            "sales.select"
        );
        assert_eq!(QualifiedName::new("s", "t").quoted(), "\"s\".\"t\"");
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any name, quoted, parses back to itself: what `quote` writes, the parser reads.
        #[test]
        fn quoted_names_round_trip(schema in "[^\u{0}]{1,20}", name in "[^\u{0}]{1,20}") {
            let text = format!("{}.{}", quote(&schema), quote(&name));
            prop_assert_eq!(
                parse_pattern(&text).unwrap(),
                TablePattern::Table { schema: Some(schema), name }
            );
        }

        /// The parsers return errors, never panic, whatever they are given.
        #[test]
        fn parsing_never_panics(text in "\\PC{0,40}") {
            let _ = parse_pattern(&text);
            let _ = parse_pattern_list(&text);
        }

        /// A quoted identifier is one token for PostgreSQL: it starts and ends with a quote
        /// and every quote inside is doubled.
        #[test]
        fn quoting_escapes_every_quote(name in "\\PC{0,30}") {
            let q = quote(&name);
            let inner = &q[1..q.len() - 1];
            prop_assert!(q.starts_with('"') && q.ends_with('"'));
            prop_assert_eq!(inner.replace("\"\"", ""), name.replace('"', ""));
        }
    }
}
