//! Large objects (`lo_create`, `lo_import`: the `oid` columns of older applications): pg_dump
//! keeps them with the data, not the schema, so a backup reads them itself.
//!
//! They are stored as one SQL script, `1-data-large-objects.sql.gz`, that sorts after the
//! tables' data and before the post-data, so the stock `gunzip | psql` restores them too: per
//! object `lo_create` with its oid (columns refer to it), its bytes in `lo_put` calls of at most
//! [`CHUNK`] bytes, and its comment. Memory stays bounded by one chunk whatever the size.
//!
//! Their digest, like a table's, is a row count and an order-independent sum: one XXH3-64 per
//! object over its oid, a tab and its bytes.

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;
use xxhash_rust::xxh3::Xxh3;

use super::digest::Digest;
use crate::pg::ident::literal;

/// Bytes per `lo_put` (pg_dump writes 16 KiB per `lowrite`; larger calls mean fewer statements).
pub const CHUNK: i32 = 256 * 1024;

/// What a backup holds of the large objects (absent when the database has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LargeObjects {
    /// How many, and the sum of their hashes.
    #[serde(flatten)]
    pub digest: Digest,
}

/// One large object of the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Its oid.
    pub oid: u32,
    /// `COMMENT ON LARGE OBJECT`.
    pub comment: Option<String>,
}

/// Every large object, by oid.
pub async fn list(client: &Client) -> Result<Vec<Listed>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT m.oid, pg_catalog.obj_description(m.oid, 'pg_largeobject') \
             FROM pg_catalog.pg_largeobject_metadata m ORDER BY m.oid",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Listed {
            oid: r.get(0),
            comment: r.get(1),
        })
        .collect())
}

/// The bytes of `oid` from `offset`, at most [`CHUNK`]; fewer at its end.
pub async fn read_chunk(
    client: &Client,
    oid: u32,
    offset: i64,
) -> Result<Vec<u8>, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT pg_catalog.lo_get($1, $2, $3)",
            &[&oid, &offset, &CHUNK],
        )
        .await?;
    Ok(row.get(0))
}

/// The settings the script's literals need.
pub const SCRIPT_HEADER: &str =
    "SET client_encoding = 'UTF8';\nSET standard_conforming_strings = on;\n";

/// The statement that creates `oid`, empty.
pub fn create_line(oid: u32) -> String {
    format!("SELECT pg_catalog.lo_create('{oid}');\n")
}

/// The statement that writes `bytes` into `oid` at `offset`.
pub fn put_line(oid: u32, offset: i64, bytes: &[u8]) -> String {
    format!(
        "SELECT pg_catalog.lo_put('{oid}', {offset}, '\\x{}');\n",
        hex::encode(bytes)
    )
}

/// The statement that sets `oid`'s comment.
pub fn comment_line(oid: u32, comment: &str) -> String {
    format!("COMMENT ON LARGE OBJECT {oid} IS {};\n", literal(comment))
}

/// The hash of one large object, fed its bytes in order.
pub struct Hasher(Xxh3);

impl Hasher {
    /// For the object `oid`.
    pub fn new(oid: u32) -> Hasher {
        let mut h = Xxh3::new();
        h.update(oid.to_string().as_bytes());
        h.update(b"\t");
        Hasher(h)
    }

    /// The next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// Adds the object to `digest`.
    pub fn finish(self, digest: &mut Digest) {
        digest.add(Digest {
            rows: 1,
            checksum: self.0.digest(),
        });
    }
}

/// The digest of every large object as the database holds them now.
pub async fn digest(client: &Client) -> Result<Digest, tokio_postgres::Error> {
    let mut digest = Digest::default();
    for lo in list(client).await? {
        let mut hasher = Hasher::new(lo.oid);
        let mut offset = 0i64;
        loop {
            let chunk = read_chunk(client, lo.oid, offset).await?;
            hasher.update(&chunk);
            offset += chunk.len() as i64;
            if chunk.len() < CHUNK as usize {
                break;
            }
        }
        hasher.finish(&mut digest);
    }
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_is_plain_sql_psql_runs() {
        assert_eq!(
            create_line(16385),
            "SELECT pg_catalog.lo_create('16385');\n"
        );
        assert_eq!(
            put_line(16385, 262144, b"\x00\xffA"),
            "SELECT pg_catalog.lo_put('16385', 262144, '\\x00ff41');\n"
        );
        assert_eq!(
            comment_line(7, "the menu's photo"),
            "COMMENT ON LARGE OBJECT 7 IS 'the menu''s photo';\n"
        );
    }

    #[test]
    fn the_digest_counts_objects_and_does_not_depend_on_chunking() {
        let mut whole = Digest::default();
        let mut h = Hasher::new(1);
        h.update(b"hello world");
        h.finish(&mut whole);
        let mut parts = Digest::default();
        let mut h = Hasher::new(1);
        h.update(b"hello ");
        h.update(b"world");
        h.finish(&mut parts);
        assert_eq!(whole, parts);
        assert_eq!(whole.rows, 1);
        let mut other = Digest::default();
        let mut h = Hasher::new(2);
        h.update(b"hello world");
        h.finish(&mut other);
        assert_ne!(whole.checksum, other.checksum, "the oid counts");
    }
}
