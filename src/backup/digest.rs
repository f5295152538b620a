//! The row count and checksum of a table's data, as `COPY ... TO STDOUT` (text format) prints
//! it (pure).
//!
//! Each row is one line of COPY's text format (newlines inside values are escaped), hashed
//! with XXH3-64; the checksum is the wrapping sum of the row hashes. A sum does not depend on
//! the order rows come in (a restored table is read back in another physical order, and a large
//! table is dumped in parallel chunks whose digests add up), and unlike XOR it tells two
//! copies of a row from none.

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

/// Rows and the order-independent checksum of a table's COPY text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    /// Rows.
    pub rows: u64,
    /// Wrapping sum of the XXH3-64 of each row's line (without its newline), as 16 hex digits
    /// in the manifest.
    #[serde(with = "hex_u64")]
    pub checksum: u64,
}

impl Digest {
    /// Adds another part of the same table.
    pub fn add(&mut self, other: Digest) {
        self.rows += other.rows;
        self.checksum = self.checksum.wrapping_add(other.checksum);
    }
}

/// Feeds COPY text in chunks of any size (a row may be split across chunks).
#[derive(Debug, Default)]
pub struct Digester {
    digest: Digest,
    partial: Vec<u8>,
}

impl Digester {
    /// An empty digest.
    pub fn new() -> Digester {
        Digester::default()
    }

    /// Takes the next bytes of COPY text.
    pub fn update(&mut self, mut data: &[u8]) {
        while let Some(end) = data.iter().position(|b| *b == b'\n') {
            let line = &data[..end];
            if self.partial.is_empty() {
                self.row(line);
            } else {
                self.partial.extend_from_slice(line);
                let whole = std::mem::take(&mut self.partial);
                self.row(&whole);
            }
            data = &data[end + 1..];
        }
        self.partial.extend_from_slice(data);
    }

    fn row(&mut self, line: &[u8]) {
        self.digest.rows += 1;
        self.digest.checksum = self.digest.checksum.wrapping_add(xxh3_64(line));
    }

    /// The digest of everything fed; a last line without its newline counts as a row.
    pub fn finish(mut self) -> Digest {
        if !self.partial.is_empty() {
            let last = std::mem::take(&mut self.partial);
            self.row(&last);
        }
        self.digest
    }
}

mod hex_u64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{value:016x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = String::deserialize(d)?;
        u64::from_str_radix(&text, 16).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn digest(chunks: &[&[u8]]) -> Digest {
        let mut d = Digester::new();
        for c in chunks {
            d.update(c);
        }
        d.finish()
    }

    #[test]
    fn rows_are_lines_and_order_does_not_matter() {
        let a = digest(&[b"1\tpaid\n2\tnew\n"]);
        let b = digest(&[b"2\tnew\n1\tpaid\n"]);
        assert_eq!(a.rows, 2);
        assert_eq!(a, b);
        assert_ne!(a, digest(&[b"1\tpaid\n2\tnex\n"]));
    }

    #[test]
    fn a_duplicated_row_is_not_the_same_as_none() {
        let one = digest(&[b"1\n"]);
        let three = digest(&[b"1\n1\n1\n"]);
        assert_ne!(one.checksum, three.checksum);
        assert_eq!(three.rows, 3);
    }

    #[test]
    fn parts_add_up_to_the_whole() {
        let mut parts = digest(&[b"a\nb\n"]);
        parts.add(digest(&[b"c\n"]));
        assert_eq!(parts, digest(&[b"a\nb\nc\n"]));
    }

    #[test]
    fn the_manifest_form_round_trips() {
        let d = digest(&[b"x\n"]);
        let json = serde_json::to_string(&d).unwrap();
        assert!(json.contains(&format!("{:016x}", d.checksum)), "{json}");
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
    }

    proptest! {
        #[test]
        fn chunking_never_changes_the_digest(
            rows in proptest::collection::vec("[a-z\t\\\\]{0,12}", 0..40),
            cuts in proptest::collection::vec(0usize..400, 0..8),
        ) {
            let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
            let bytes = text.as_bytes();
            let whole = digest(&[bytes]);
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            points.sort();
            let mut d = Digester::new();
            let mut at = 0;
            for p in points {
                d.update(&bytes[at..p]);
                at = p;
            }
            d.update(&bytes[at..]);
            prop_assert_eq!(d.finish(), whole);
            prop_assert_eq!(whole.rows, rows.len() as u64);
        }
    }
}
