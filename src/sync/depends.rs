//! What the synced tables need on the mirror besides themselves, and what the mirror lacks.
//!
//! A table's definition leans on other objects: the types of its columns (enums, domains,
//! composite and range types, extension types such as `citext`), the collations they sort by,
//! the functions its defaults, checks, generated columns and index expressions call (and a
//! domain's checks and default), the sequences its defaults draw from (a default may call a
//! function that calls `nextval`), and the extensions that provide any of those. The mirror
//! must have every one before `CREATE TABLE` can work there.
//!
//! [`read`] finds them by walking `pg_depend` on the source from the tables outward: what each
//! object references, plus the parts that define a table's or a domain's behaviour (column
//! defaults, constraints, indexes). It stops at built-in objects and at extension members (the
//! extension is the dependency then). Sequences named in the text of a function's body
//! (`nextval('ticket_code_seq')`, which PostgreSQL does not record as a dependency) are found
//! by reading the body. The result is in dependency order: an object after everything it
//! needs.
//!
//! [`plan`] compares that list with the mirror: each object is there, or bite-sync creates it
//! (with the DDL it will run), or it cannot (an extension the mirror's server does not have, a
//! C function), which is a [`Missing`] with the DDL that would create it. Callers check every
//! dependency before they change anything on either side, so one run shows the whole to-do
//! list.

use std::collections::{BTreeMap, BTreeSet};

use tokio_postgres::Client;

use crate::pg::ident::{QualifiedName, literal, quote};

use super::catalog::{self, FIRST_USER_OID, SequenceDef, TypeDef};
use super::ddl;

// The system catalogs' own OIDs, fixed in PostgreSQL's headers for every version.
const PG_TYPE: u32 = 1247;
const PG_PROC: u32 = 1255;
const PG_CLASS: u32 = 1259;
const PG_ATTRDEF: u32 = 2604;
const PG_CONSTRAINT: u32 = 2606;
const PG_NAMESPACE: u32 = 2615;
const PG_EXTENSION: u32 = 3079;
const PG_COLLATION: u32 = 3456;

/// An object the synced tables need on the mirror.
#[derive(Debug, Clone, PartialEq)]
pub enum Need {
    /// A schema the other objects live in.
    Schema(String),
    /// An extension that provides a type, function or operator class used.
    Extension {
        /// Its name.
        name: String,
        /// The schema it is installed in on the source (the mirror needs the same, or the
        /// qualified type names in the tables' DDL would not resolve).
        schema: String,
    },
    /// A collation of our own (`CREATE COLLATION`).
    Collation {
        /// Schema and name.
        name: QualifiedName,
        /// The `CREATE COLLATION` statement.
        ddl: String,
    },
    /// A user type: enum, domain, composite, range, or one bite-sync cannot create.
    Type(TypeDef),
    /// A function called by a default, a check (of a table or a domain), a generated column
    /// or an index.
    Function {
        /// Schema and name.
        name: QualifiedName,
        /// `public.is_spanish_phone(text)`: how the mirror is asked whether it has it.
        signature: String,
        /// Its `CREATE FUNCTION`, or why it cannot be created.
        ddl: Result<String, String>,
    },
    /// A sequence a default draws from.
    Sequence(SequenceDef),
    /// A table a default or function needs that is not part of the sync.
    Table(QualifiedName),
    /// Something bite-sync neither creates nor can look for on the mirror (a user-defined
    /// operator, a text search configuration ...): `pg_describe_object`'s words for it.
    Other(String),
}

impl Need {
    /// How the object is named in messages: `type public.seat`, `extension hstore`.
    pub fn describe(&self) -> String {
        match self {
            Need::Schema(s) => format!("schema {s}"),
            Need::Extension { name, .. } => format!("extension {name}"),
            Need::Collation { name, .. } => format!("collation {name}"),
            Need::Type(t) => format!("type {}", t.name()),
            Need::Function { signature, .. } => format!("function {signature}"),
            Need::Sequence(s) => format!("sequence {}", s.name),
            Need::Table(t) => format!("table {t}"),
            Need::Other(what) => what.clone(),
        }
    }

    /// The statement that creates it on the mirror, when bite-sync knows one.
    pub fn ddl(&self) -> Option<String> {
        match self {
            Need::Schema(s) => Some(format!("CREATE SCHEMA IF NOT EXISTS {}", quote(s))),
            Need::Extension { name, schema } => Some(format!(
                "CREATE EXTENSION IF NOT EXISTS {} WITH SCHEMA {}",
                quote(name),
                quote(schema)
            )),
            Need::Collation { ddl, .. } => Some(ddl.clone()),
            Need::Type(t) => ddl::create_type(t),
            Need::Function { ddl, .. } => ddl.as_ref().ok().cloned(),
            Need::Sequence(s) => Some(ddl::create_sequence(s)),
            Need::Table(_) | Need::Other(_) => None,
        }
    }
}

/// An object of a system catalog: (the catalog's OID, the object's OID).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Obj {
    class: u32,
    oid: u32,
}

/// What one object turned out to be.
#[derive(Debug, Clone)]
enum Found {
    /// Built in, or otherwise not to follow.
    Skip,
    /// Part of the definition of the object that reached it (a column default, a constraint,
    /// an index, a composite type's attribute list): followed, with the same owner.
    Part,
    /// A member of this extension: the extension is the need.
    Member(u32),
    /// Something the mirror needs.
    Needed,
}

/// Finds what `tables` (OIDs of every synced table, partitions included) need on the source's
/// mirror; see the module docs. `search_path` resolves unqualified sequence names in function
/// bodies, as the functions would at run time.
pub async fn read(
    client: &Client,
    tables: &[u32],
    search_path: &[String],
) -> Result<Vec<Need>, tokio_postgres::Error> {
    let selected: BTreeSet<u32> = tables.iter().copied().collect();
    let mut found: BTreeMap<Obj, Found> = BTreeMap::new();
    let mut needs: BTreeMap<Obj, Need> = BTreeMap::new();
    // Each needed object's direct needs, for the order of creation.
    let mut edges: BTreeMap<Obj, BTreeSet<Obj>> = BTreeMap::new();
    // Every object queued for the walk, with the needed object whose definition it belongs to
    // (none for the tables themselves).
    let mut owner_of: BTreeMap<Obj, Option<Obj>> = BTreeMap::new();
    let mut queue: Vec<Obj> = Vec::new();
    for &oid in tables {
        let table = Obj {
            class: PG_CLASS,
            oid,
        };
        found.insert(table, Found::Part);
        owner_of.insert(table, None);
        queue.push(table);
    }
    // Links the catalog does not record, found while classifying: walked in the next round.
    let mut carried: Vec<(Obj, Obj)> = Vec::new();
    while !queue.is_empty() || !carried.is_empty() {
        let mut reached = step(client, &std::mem::take(&mut queue)).await?;
        reached.append(&mut carried);
        let fresh: Vec<Obj> = reached
            .iter()
            .map(|(_, to)| *to)
            .filter(|to| !found.contains_key(to))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        for (obj, (what, need, extra)) in classify(client, &fresh, &selected, search_path).await? {
            if let Found::Member(ext) = what {
                let ext_obj = Obj {
                    class: PG_EXTENSION,
                    oid: ext,
                };
                if let std::collections::btree_map::Entry::Vacant(e) = needs.entry(ext_obj) {
                    e.insert(read_extension(client, ext).await?);
                    found.insert(ext_obj, Found::Needed);
                }
            }
            found.insert(obj, what);
            if let Some(need) = need {
                needs.insert(obj, need);
            }
            carried.extend(extra.into_iter().map(|more| (obj, more)));
        }
        for (from, to) in reached {
            let owner = match found.get(&from) {
                Some(Found::Needed) => Some(from),
                _ => owner_of.get(&from).copied().flatten(),
            };
            let what = found.get(&to).cloned().unwrap_or(Found::Skip);
            let target = match what {
                Found::Member(ext) => Obj {
                    class: PG_EXTENSION,
                    oid: ext,
                },
                _ => to,
            };
            if let Some(owner) = owner
                && matches!(what, Found::Needed | Found::Member(_))
                && owner != target
            {
                edges.entry(owner).or_default().insert(target);
            }
            let walk_owner = match what {
                Found::Needed => Some(to),
                Found::Part => owner,
                Found::Skip | Found::Member(_) => continue,
            };
            if let std::collections::btree_map::Entry::Vacant(e) = owner_of.entry(to) {
                e.insert(walk_owner);
                queue.push(to);
            }
        }
    }
    Ok(in_dependency_order(needs, &edges))
}

/// One step of the walk: for each object, what it references (normal dependencies; not a
/// table's inheritance parent, which the mirror's table does not inherit from) and the parts of
/// its definition (a table's column defaults, constraints other than foreign keys and indexes;
/// a domain's constraints; a constraint's index).
async fn step(client: &Client, frontier: &[Obj]) -> Result<Vec<(Obj, Obj)>, tokio_postgres::Error> {
    if frontier.is_empty() {
        return Ok(Vec::new());
    }
    let classes: Vec<u32> = frontier.iter().map(|o| o.class).collect();
    let oids: Vec<u32> = frontier.iter().map(|o| o.oid).collect();
    let rows = client
        .query(
            "WITH f(classid, objid) AS (SELECT * FROM unnest($1::oid[], $2::oid[])) \
             SELECT f.classid, f.objid, d.refclassid, d.refobjid \
               FROM f JOIN pg_catalog.pg_depend d ON d.classid = f.classid AND d.objid = f.objid \
              WHERE d.deptype = 'n' \
                AND NOT (f.classid = 1259 AND d.refclassid = 1259 AND d.objsubid = 0 \
                         AND (SELECT relkind FROM pg_catalog.pg_class WHERE oid = d.refobjid) IN ('r', 'p', 'f', 'v', 'm')) \
             UNION \
             SELECT f.classid, f.objid, d.classid, d.objid \
               FROM f JOIN pg_catalog.pg_depend d ON d.refclassid = f.classid AND d.refobjid = f.objid \
              WHERE d.deptype IN ('a', 'i') \
                AND ((d.classid = 2604) \
                     OR (d.classid = 2606 AND (SELECT contype FROM pg_catalog.pg_constraint WHERE oid = d.objid) <> 'f') \
                     OR (d.classid = 1259 AND (SELECT relkind FROM pg_catalog.pg_class WHERE oid = d.objid) IN ('i', 'I')))",
            &[&classes, &oids],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                Obj {
                    class: r.get(0),
                    oid: r.get(1),
                },
                Obj {
                    class: r.get(2),
                    oid: r.get(3),
                },
            )
        })
        .collect())
}

type Classified = BTreeMap<Obj, (Found, Option<Need>, Vec<Obj>)>;

/// Decides what each newly reached object is; for some, further objects to walk that
/// `pg_depend` does not lead to (an array's element type, a composite type's attributes, the
/// sequences a function body names).
async fn classify(
    client: &Client,
    objects: &[Obj],
    selected: &BTreeSet<u32>,
    search_path: &[String],
) -> Result<Classified, tokio_postgres::Error> {
    let mut out = Classified::new();
    if objects.is_empty() {
        return Ok(out);
    }
    let classes: Vec<u32> = objects.iter().map(|o| o.class).collect();
    let oids: Vec<u32> = objects.iter().map(|o| o.oid).collect();
    let rows = client
        .query(
            "WITH o(classid, objid) AS (SELECT * FROM unnest($1::oid[], $2::oid[])) \
             SELECT o.classid, o.objid, \
                    (SELECT x.refobjid FROM pg_catalog.pg_depend x WHERE x.classid = o.classid AND x.objid = o.objid \
                        AND x.refclassid = 3079 AND x.deptype = 'e' LIMIT 1), \
                    pg_catalog.pg_describe_object(o.classid, o.objid, 0), \
                    CASE o.classid WHEN 1259 THEN (SELECT relkind::text FROM pg_catalog.pg_class WHERE oid = o.objid) \
                                   WHEN 1247 THEN (SELECT typtype::text FROM pg_catalog.pg_type WHERE oid = o.objid) \
                                   WHEN 1255 THEN (SELECT prokind::text FROM pg_catalog.pg_proc WHERE oid = o.objid) END \
             FROM o",
            &[&classes, &oids],
        )
        .await?;
    for r in rows {
        let obj = Obj {
            class: r.get(0),
            oid: r.get(1),
        };
        let extension: Option<u32> = r.get(2);
        let description: Option<String> = r.get(3);
        let kind: Option<String> = r.get(4);
        let kind = kind.and_then(|k| k.chars().next()).unwrap_or(' ');
        let entry = if let Some(ext) = extension {
            (Found::Member(ext), None, Vec::new())
        } else if obj.class == PG_EXTENSION {
            (
                Found::Needed,
                Some(read_extension(client, obj.oid).await?),
                Vec::new(),
            )
        } else if obj.oid < FIRST_USER_OID {
            (Found::Skip, None, Vec::new())
        } else {
            match obj.class {
                PG_NAMESPACE => {
                    let name: String = client
                        .query_one(
                            "SELECT nspname::text FROM pg_catalog.pg_namespace WHERE oid = $1",
                            &[&obj.oid],
                        )
                        .await?
                        .get(0);
                    (Found::Needed, Some(Need::Schema(name)), Vec::new())
                }
                PG_ATTRDEF | PG_CONSTRAINT => (Found::Part, None, Vec::new()),
                PG_CLASS => match kind {
                    'S' => match catalog::read_sequence(client, obj.oid).await? {
                        Some(seq) => (Found::Needed, Some(Need::Sequence(seq)), Vec::new()),
                        None => (Found::Skip, None, Vec::new()),
                    },
                    'i' | 'I' | 'c' => (Found::Part, None, Vec::new()),
                    _ if selected.contains(&obj.oid) => (Found::Skip, None, Vec::new()),
                    _ => {
                        let name = relation_name(client, obj.oid).await?;
                        (Found::Needed, Some(Need::Table(name)), Vec::new())
                    }
                },
                PG_TYPE => classify_type(client, obj, kind, selected).await?,
                PG_PROC => {
                    let (need, sequences) = read_function(client, obj.oid, search_path).await?;
                    let extra = sequences
                        .into_iter()
                        .map(|oid| Obj {
                            class: PG_CLASS,
                            oid,
                        })
                        .collect();
                    let need = if matches!(kind, 'f' | 'p') {
                        need
                    } else {
                        Need::Other(description.clone().unwrap_or_default())
                    };
                    (Found::Needed, Some(need), extra)
                }
                PG_COLLATION => (
                    Found::Needed,
                    Some(read_collation(client, obj.oid).await?),
                    Vec::new(),
                ),
                _ => (
                    Found::Needed,
                    Some(Need::Other(description.unwrap_or_default())),
                    Vec::new(),
                ),
            }
        };
        out.insert(obj, entry);
    }
    Ok(out)
}

async fn classify_type(
    client: &Client,
    obj: Obj,
    typtype: char,
    selected: &BTreeSet<u32>,
) -> Result<(Found, Option<Need>, Vec<Obj>), tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT t.typcategory::text, t.typelem, t.typrelid, \
                    (SELECT relkind::text FROM pg_catalog.pg_class WHERE oid = t.typrelid), \
                    (SELECT rngtypid FROM pg_catalog.pg_range WHERE rngmultitypid = t.oid) \
             FROM pg_catalog.pg_type t WHERE t.oid = $1",
            &[&obj.oid],
        )
        .await?;
    let category: String = row.get(0);
    let element: u32 = row.get(1);
    let relid: u32 = row.get(2);
    let relkind: Option<String> = row.get(3);
    let range_of_multirange: Option<u32> = row.get(4);
    let ty = |oid| Obj {
        class: PG_TYPE,
        oid,
    };
    if category == "A" && element != 0 {
        // An array type comes with its element type.
        return Ok((Found::Part, None, vec![ty(element)]));
    }
    if let Some(range) = range_of_multirange {
        // A multirange type comes with its range type.
        return Ok((Found::Part, None, vec![ty(range)]));
    }
    if typtype == 'c' {
        if relkind.as_deref() != Some("c") {
            // A table's row type: the table is the need.
            if selected.contains(&relid) {
                return Ok((Found::Skip, None, Vec::new()));
            }
            let name = relation_name(client, relid).await?;
            return Ok((Found::Needed, Some(Need::Table(name)), Vec::new()));
        }
        let def = catalog::read_type(client, obj.oid).await?;
        // Its attributes' types and collations hang off its pg_class row.
        return Ok((
            Found::Needed,
            Some(Need::Type(def)),
            vec![Obj {
                class: PG_CLASS,
                oid: relid,
            }],
        ));
    }
    let def = catalog::read_type(client, obj.oid).await?;
    Ok((Found::Needed, Some(Need::Type(def)), Vec::new()))
}

async fn relation_name(client: &Client, oid: u32) -> Result<QualifiedName, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
            &[&oid],
        )
        .await?;
    Ok(QualifiedName::new(
        row.get::<_, String>(0),
        row.get::<_, String>(1),
    ))
}

async fn read_extension(client: &Client, oid: u32) -> Result<Need, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT e.extname::text, n.nspname::text FROM pg_catalog.pg_extension e \
             JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.oid = $1",
            &[&oid],
        )
        .await?;
    Ok(Need::Extension {
        name: row.get(0),
        schema: row.get(1),
    })
}

/// A function's definition, and the sequences its body names in `nextval`, `currval` or
/// `setval` calls (resolved as the body would resolve them: a qualified name as it is, an
/// unqualified one along the function's own `search_path` setting, else `search_path`).
async fn read_function(
    client: &Client,
    oid: u32,
    search_path: &[String],
) -> Result<(Need, Vec<u32>), tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT n.nspname::text, p.proname::text, \
                    pg_catalog.format('%I.%I(%s)', n.nspname, p.proname, pg_catalog.oidvectortypes(p.proargtypes)), \
                    l.lanname::text, \
                    CASE WHEN p.prokind IN ('f', 'p') THEN pg_catalog.pg_get_functiondef(p.oid) END, \
                    ARRAY(SELECT m[1] FROM regexp_matches(COALESCE(p.prosrc, ''), \
                          '(?:nextval|currval|setval)\\s*\\(\\s*''([^'']+)''', 'gi') AS m)::text[], \
                    ARRAY(SELECT substr(c, 13) FROM unnest(p.proconfig) AS c WHERE c LIKE 'search_path=%')::text[] \
             FROM pg_catalog.pg_proc p \
             JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
             JOIN pg_catalog.pg_language l ON l.oid = p.prolang \
             WHERE p.oid = $1",
            &[&oid],
        )
        .await?;
    let name = QualifiedName::new(row.get::<_, String>(0), row.get::<_, String>(1));
    let signature: String = row.get(2);
    let language: String = row.get(3);
    let definition: Option<String> = row.get(4);
    let named: Vec<String> = row.get(5);
    let own_path: Vec<String> = row.get(6);
    let ddl = match (language.as_str(), definition) {
        ("c", _) => Err(
            "it is written in C, which needs its library on the mirror's server: install the extension or package that provides it there"
                .to_string(),
        ),
        (_, Some(definition)) => Ok(definition),
        (_, None) => Err("bite-sync creates functions and procedures only".to_string()),
    };
    let path: Vec<String> = match own_path.first() {
        Some(p) => p
            .split(',')
            .map(|s| s.trim().trim_matches('"').to_string())
            .filter(|s| !s.is_empty() && s != "$user")
            .collect(),
        None => search_path.to_vec(),
    };
    let mut sequences = Vec::new();
    for raw in named {
        let candidates: Vec<String> = if raw.contains('.') || raw.starts_with('"') {
            vec![raw.clone()]
        } else {
            path.iter()
                .map(|schema| format!("{}.{raw}", quote(schema)))
                .collect()
        };
        for candidate in candidates {
            let found: Option<u32> = client
                .query_one(
                    "SELECT c.oid FROM pg_catalog.pg_class c \
                     WHERE c.oid = pg_catalog.to_regclass($1) AND c.relkind = 'S'",
                    &[&candidate],
                )
                .await
                .ok()
                .map(|r| r.get(0));
            if let Some(oid) = found {
                sequences.push(oid);
                break;
            }
        }
    }
    Ok((
        Need::Function {
            name,
            signature,
            ddl,
        },
        sequences,
    ))
}

async fn read_collation(client: &Client, oid: u32) -> Result<Need, tokio_postgres::Error> {
    // to_jsonb reads the columns each version has (colliculocale, colllocale, collicurules).
    let row = client
        .query_one(
            "SELECT n.nspname::text, c.collname::text, to_jsonb(c)::text FROM pg_catalog.pg_collation c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.collnamespace WHERE c.oid = $1",
            &[&oid],
        )
        .await?;
    let name = QualifiedName::new(row.get::<_, String>(0), row.get::<_, String>(1));
    let fields: serde_json::Value =
        serde_json::from_str(&row.get::<_, String>(2)).unwrap_or_default();
    Ok(Need::Collation {
        ddl: collation_ddl(&name, &fields),
        name,
    })
}

/// `CREATE COLLATION` from a `pg_collation` row as JSON.
fn collation_ddl(name: &QualifiedName, row: &serde_json::Value) -> String {
    let text = |key: &str| row.get(key).and_then(|v| v.as_str()).map(str::to_string);
    let mut options = Vec::new();
    match text("collprovider").as_deref() {
        Some("i") => {
            options.push("provider = icu".to_string());
            if let Some(locale) = text("colllocale").or_else(|| text("colliculocale")) {
                options.push(format!("locale = {}", literal(&locale)));
            }
            if let Some(rules) = text("collicurules") {
                options.push(format!("rules = {}", literal(&rules)));
            }
        }
        Some("b") => {
            options.push("provider = builtin".to_string());
            if let Some(locale) = text("colllocale") {
                options.push(format!("locale = {}", literal(&locale)));
            }
        }
        _ => {
            options.push("provider = libc".to_string());
            if let Some(c) = text("collcollate") {
                options.push(format!("lc_collate = {}", literal(&c)));
            }
            if let Some(c) = text("collctype") {
                options.push(format!("lc_ctype = {}", literal(&c)));
            }
        }
    }
    if row.get("collisdeterministic").and_then(|v| v.as_bool()) == Some(false) {
        options.push("deterministic = false".to_string());
    }
    format!(
        "CREATE COLLATION IF NOT EXISTS {} ({})",
        name.quoted(),
        options.join(", ")
    )
}

/// The needs in an order that creates each after what it needs (depth first, dependencies
/// first; ties by kind, then OID, so the order is stable).
fn in_dependency_order(
    mut needs: BTreeMap<Obj, Need>,
    edges: &BTreeMap<Obj, BTreeSet<Obj>>,
) -> Vec<Need> {
    fn rank(need: &Need) -> u8 {
        match need {
            Need::Schema(_) => 0,
            Need::Extension { .. } => 1,
            Need::Collation { .. } => 2,
            Need::Type(_) | Need::Function { .. } => 3,
            Need::Sequence(_) => 4,
            Need::Table(_) | Need::Other(_) => 5,
        }
    }
    let mut roots: Vec<Obj> = needs.keys().copied().collect();
    roots.sort_by_key(|o| (rank(&needs[o]), *o));
    let mut visited = BTreeSet::new();
    let mut order = Vec::new();
    fn visit(
        o: Obj,
        edges: &BTreeMap<Obj, BTreeSet<Obj>>,
        visited: &mut BTreeSet<Obj>,
        order: &mut Vec<Obj>,
    ) {
        if !visited.insert(o) {
            return;
        }
        for dep in edges.get(&o).into_iter().flatten() {
            visit(*dep, edges, visited, order);
        }
        order.push(o);
    }
    for o in roots {
        visit(o, edges, &mut visited, &mut order);
    }
    // Schemas first of all: everything else is created in one.
    let mut out: Vec<Need> = order.into_iter().filter_map(|o| needs.remove(&o)).collect();
    out.sort_by_key(|n| !matches!(n, Need::Schema(_)));
    out
}

/// What the mirror lacks of one need, and what happens about it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Missing {
    /// `type public.seat`, `extension hstore`.
    pub object: String,
    /// Whether bite-sync creates it itself.
    pub created: bool,
    /// Whether nothing may change until the user has provided it. Objects bite-sync cannot
    /// look for on the mirror are not (it may well have them): they are a warning.
    pub blocking: bool,
    /// The DDL that creates it, when one is known.
    pub ddl: Option<String>,
    /// Why bite-sync cannot create it, and what to do.
    pub problem: Option<String>,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.object)?;
        if let Some(problem) = &self.problem {
            write!(f, ": {problem}")?;
        }
        if let Some(ddl) = &self.ddl {
            write!(f, "; it is created by: {}", ddl.trim_end())?;
        }
        Ok(())
    }
}

/// The mirror's side of one need, as [`plan`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnMirror {
    /// It has it.
    Present,
    /// An enum it has, with these labels.
    EnumLabels(Vec<String>),
    /// It lacks it.
    Absent,
    /// An extension it lacks: whether its server has the package, and whether this user may
    /// create it (superuser, or a trusted extension and CREATE on the database).
    ExtensionAbsent {
        /// `pg_available_extensions` lists it.
        available: bool,
        /// The user may run `CREATE EXTENSION` for it.
        may_create: bool,
    },
    /// An extension it has, in another schema.
    ExtensionElsewhere(String),
}

/// What to do about one need, given what the mirror has (pure: the decision, apart from the
/// look-ups): statements to run, or what is missing and cannot be created.
pub fn decide(need: &Need, mirror: &OnMirror) -> (Vec<String>, Option<Missing>) {
    let missing = |created: bool, problem: Option<String>| Missing {
        object: need.describe(),
        created,
        blocking: !created,
        ddl: need.ddl(),
        problem,
    };
    match (need, mirror) {
        (Need::Type(TypeDef::Enum { name, labels }), OnMirror::EnumLabels(have)) => {
            (ddl::add_enum_labels(name, labels, have), None)
        }
        (_, OnMirror::Present | OnMirror::EnumLabels(_)) => (Vec::new(), None),
        (Need::Extension { name, schema }, OnMirror::ExtensionElsewhere(other)) => (
            Vec::new(),
            Some(Missing {
                object: need.describe(),
                created: false,
                blocking: true,
                ddl: Some(format!(
                    "ALTER EXTENSION {} SET SCHEMA {}",
                    quote(name),
                    quote(schema)
                )),
                problem: Some(format!(
                    "the mirror has it in schema {other}, the source in {schema}, so the tables' column types would not be found there"
                )),
            }),
        ),
        (
            Need::Extension { name, .. },
            OnMirror::ExtensionAbsent {
                available: false, ..
            },
        ) => (
            Vec::new(),
            Some(missing(
                false,
                Some(format!(
                    "the mirror's server does not have it (pg_available_extensions does not list {name}): install the package that provides it on the mirror's server (for PostgreSQL's own extensions, its contrib package), or leave out the tables that use it"
                )),
            )),
        ),
        (
            Need::Extension { .. },
            OnMirror::ExtensionAbsent {
                may_create: false, ..
            },
        ) => (
            Vec::new(),
            Some(missing(
                false,
                Some(
                    "the mirror user may not create it (it is not a trusted extension, or the user lacks CREATE on the database): a superuser must create it on the mirror"
                        .to_string(),
                ),
            )),
        ),
        (Need::Function { ddl: Err(why), .. }, _) => {
            (Vec::new(), Some(missing(false, Some(why.clone()))))
        }
        (Need::Type(TypeDef::External { kind, .. }), _) => (
            Vec::new(),
            Some(missing(
                false,
                Some(format!(
                    "a {kind} type bite-sync cannot create: create it on the mirror first"
                )),
            )),
        ),
        (Need::Table(_), _) => (
            Vec::new(),
            Some(missing(
                false,
                Some(
                    "a default, check or function of the synced tables uses it: sync it too, or create it on the mirror first"
                        .to_string(),
                ),
            )),
        ),
        (Need::Other(_), _) => (
            Vec::new(),
            Some(Missing {
                blocking: false,
                ..missing(
                    false,
                    Some(
                        "bite-sync neither creates objects of this kind nor can look for them on the mirror: if the mirror lacks it, creating the table there fails; create it on the mirror first"
                            .to_string(),
                    ),
                )
            }),
        ),
        (need, _) => {
            let statements = need.ddl().into_iter().collect();
            let note = match need {
                // Created quietly: a schema or a sequence is not worth a line.
                Need::Schema(_) | Need::Sequence(_) => None,
                _ => Some(missing(true, None)),
            };
            (statements, note)
        }
    }
}

/// What a sync or the first `run` does about the needs on this mirror.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Statements that create what the mirror lacks, in order; run in one transaction with
    /// `check_function_bodies` off (a function body may name tables created later).
    pub statements: Vec<String>,
    /// Everything the mirror lacks: what bite-sync creates and what it cannot.
    pub missing: Vec<Missing>,
}

impl Plan {
    /// What the mirror lacks and bite-sync cannot create: nothing may change while any is left.
    pub fn problems(&self) -> Vec<&Missing> {
        self.missing.iter().filter(|m| m.blocking).collect()
    }

    /// What bite-sync can neither create nor look for (see [`Missing::blocking`]).
    pub fn warnings(&self) -> Vec<&Missing> {
        self.missing
            .iter()
            .filter(|m| !m.created && !m.blocking)
            .collect()
    }
}

/// Looks each need up on the mirror and decides (see [`decide`]).
pub async fn plan(mirror: &Client, needs: &[Need]) -> Result<Plan, tokio_postgres::Error> {
    let mut plan = Plan::default();
    for need in needs {
        let on_mirror = look_up(mirror, need).await?;
        let (statements, missing) = decide(need, &on_mirror);
        plan.statements.extend(statements);
        plan.missing.extend(missing);
    }
    Ok(plan)
}

async fn look_up(mirror: &Client, need: &Need) -> Result<OnMirror, tokio_postgres::Error> {
    let exists = |found: bool| {
        if found {
            OnMirror::Present
        } else {
            OnMirror::Absent
        }
    };
    Ok(match need {
        Need::Schema(s) => exists(
            mirror
                .query_opt(
                    "SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1",
                    &[s],
                )
                .await?
                .is_some(),
        ),
        Need::Extension { name, schema } => {
            let installed: Option<String> = mirror
                .query_opt(
                    "SELECT n.nspname::text FROM pg_catalog.pg_extension e \
                     JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = $1",
                    &[name],
                )
                .await?
                .map(|r| r.get(0));
            match installed {
                Some(s) if &s == schema => OnMirror::Present,
                Some(s) => OnMirror::ExtensionElsewhere(s),
                None => {
                    let row = mirror
                        .query_one(
                            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_available_extensions WHERE name = $1), \
                                    COALESCE((SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user), false) \
                                    OR (COALESCE((SELECT v.trusted FROM pg_catalog.pg_available_extension_versions v \
                                                  JOIN pg_catalog.pg_available_extensions a ON a.name = v.name AND a.default_version = v.version \
                                                  WHERE v.name = $1), false) \
                                        AND pg_catalog.has_database_privilege(pg_catalog.current_database(), 'CREATE'))",
                            &[name],
                        )
                        .await?;
                    OnMirror::ExtensionAbsent {
                        available: row.get(0),
                        may_create: row.get(1),
                    }
                }
            }
        }
        Need::Collation { name, .. } => exists(
            mirror
                .query_opt(
                    "SELECT 1 FROM pg_catalog.pg_collation c JOIN pg_catalog.pg_namespace n ON n.oid = c.collnamespace \
                     WHERE n.nspname = $1 AND c.collname = $2",
                    &[&name.schema, &name.name],
                )
                .await?
                .is_some(),
        ),
        Need::Type(t) => {
            let name = t.name();
            let row = mirror
                .query_opt(
                    "SELECT t.typtype::text, \
                            ARRAY(SELECT enumlabel::text FROM pg_catalog.pg_enum e WHERE e.enumtypid = t.oid ORDER BY enumsortorder) \
                     FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace \
                     WHERE n.nspname = $1 AND t.typname = $2",
                    &[&name.schema, &name.name],
                )
                .await?;
            match row {
                Some(r) if r.get::<_, String>(0) == "e" => OnMirror::EnumLabels(r.get(1)),
                Some(_) => OnMirror::Present,
                None => OnMirror::Absent,
            }
        }
        Need::Function { signature, .. } => exists(
            mirror
                .query_one(
                    "SELECT pg_catalog.to_regprocedure($1) IS NOT NULL",
                    &[signature],
                )
                .await?
                .get(0),
        ),
        Need::Sequence(s) => exists(relation_exists(mirror, &s.name).await?),
        Need::Table(t) => exists(relation_exists(mirror, t).await?),
        Need::Other(_) => OnMirror::Absent,
    })
}

async fn relation_exists(
    mirror: &Client,
    name: &QualifiedName,
) -> Result<bool, tokio_postgres::Error> {
    Ok(mirror
        .query_one(
            "SELECT pg_catalog.to_regclass($1) IS NOT NULL",
            &[&name.quoted()],
        )
        .await?
        .get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(available: bool, may_create: bool) -> OnMirror {
        OnMirror::ExtensionAbsent {
            available,
            may_create,
        }
    }

    #[test]
    fn an_extension_the_mirror_can_have_is_created_else_refused_by_name() {
        let hstore = Need::Extension {
            name: "hstore".into(),
            schema: "public".into(),
        };
        let (statements, missing) = decide(&hstore, &ext(true, true));
        assert_eq!(
            statements,
            ["CREATE EXTENSION IF NOT EXISTS \"hstore\" WITH SCHEMA \"public\""]
        );
        assert!(missing.unwrap().created);
        let (statements, missing) = decide(&hstore, &ext(false, true));
        assert!(statements.is_empty());
        let missing = missing.unwrap();
        assert!(!missing.created);
        let text = missing.to_string();
        assert!(
            text.starts_with("extension hstore: the mirror's server does not have it"),
            "{text}"
        );
        assert!(
            text.contains("CREATE EXTENSION IF NOT EXISTS \"hstore\" WITH SCHEMA \"public\""),
            "{text}"
        );
        let (_, missing) = decide(&hstore, &ext(true, false));
        assert!(
            missing
                .unwrap()
                .to_string()
                .contains("a superuser must create it")
        );
        let (_, missing) = decide(&hstore, &OnMirror::ExtensionElsewhere("extensions".into()));
        assert!(
            missing
                .unwrap()
                .to_string()
                .contains("ALTER EXTENSION \"hstore\" SET SCHEMA \"public\"")
        );
        assert_eq!(decide(&hstore, &OnMirror::Present), (vec![], None));
    }

    #[test]
    fn functions_are_created_unless_written_in_c() {
        let f = Need::Function {
            name: QualifiedName::new("public", "is_spanish_phone"),
            signature: "public.is_spanish_phone(text)".into(),
            ddl: Ok("CREATE OR REPLACE FUNCTION public.is_spanish_phone(p text) ...".into()),
        };
        let (statements, missing) = decide(&f, &OnMirror::Absent);
        assert_eq!(statements.len(), 1);
        assert_eq!(
            missing.unwrap().object,
            "function public.is_spanish_phone(text)"
        );
        let Need::Function {
            name, signature, ..
        } = f
        else {
            unreachable!()
        };
        let c = Need::Function {
            name,
            signature,
            ddl: Err("it is written in c".into()),
        };
        let (statements, missing) = decide(&c, &OnMirror::Absent);
        assert!(statements.is_empty());
        assert!(!missing.unwrap().created);
    }

    #[test]
    fn enums_gain_labels_and_present_objects_need_nothing() {
        let e = Need::Type(TypeDef::Enum {
            name: QualifiedName::new("public", "mood"),
            labels: vec!["sad".into(), "ok".into()],
        });
        let (statements, missing) = decide(&e, &OnMirror::EnumLabels(vec!["sad".into()]));
        assert_eq!(
            statements,
            ["ALTER TYPE \"public\".\"mood\" ADD VALUE IF NOT EXISTS 'ok' AFTER 'sad'"]
        );
        assert_eq!(missing, None);
        let seq = Need::Schema("sales".into());
        assert_eq!(
            decide(&seq, &OnMirror::Absent),
            (
                vec!["CREATE SCHEMA IF NOT EXISTS \"sales\"".to_string()],
                None
            )
        );
    }

    #[test]
    fn collations_keep_provider_locale_and_determinism() {
        let name = QualifiedName::new("public", "es_ci");
        let icu = serde_json::json!({"collprovider": "i", "colliculocale": "es-u-ks-level2", "collisdeterministic": false});
        assert_eq!(
            collation_ddl(&name, &icu),
            "CREATE COLLATION IF NOT EXISTS \"public\".\"es_ci\" (provider = icu, locale = 'es-u-ks-level2', deterministic = false)"
        );
        let libc = serde_json::json!({"collprovider": "c", "collcollate": "C", "collctype": "C", "collisdeterministic": true});
        assert_eq!(
            collation_ddl(&name, &libc),
            "CREATE COLLATION IF NOT EXISTS \"public\".\"es_ci\" (provider = libc, lc_collate = 'C', lc_ctype = 'C')"
        );
    }

    #[test]
    fn needs_come_after_what_they_need() {
        let o = |oid| Obj {
            class: PG_TYPE,
            oid,
        };
        let f = |oid| Obj {
            class: PG_PROC,
            oid,
        };
        let domain = Need::Type(TypeDef::External {
            name: QualifiedName::new("public", "phone"),
            kind: "domain",
            extension: None,
        });
        let function = Need::Function {
            name: QualifiedName::new("public", "check"),
            signature: "public.check(text)".into(),
            ddl: Ok("CREATE FUNCTION".into()),
        };
        let needs = BTreeMap::from([
            (o(1), domain.clone()),
            (f(9), function.clone()),
            (
                Obj {
                    class: PG_NAMESPACE,
                    oid: 5,
                },
                Need::Schema("s".into()),
            ),
        ]);
        let edges = BTreeMap::from([(o(1), BTreeSet::from([f(9)]))]);
        assert_eq!(
            in_dependency_order(needs, &edges),
            vec![Need::Schema("s".into()), function, domain]
        );
    }
}
